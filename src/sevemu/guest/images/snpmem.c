/* snpmem: an SEV-SNP guest takes memory the launch left out.  Every page of it is the hypervisor's
 * in the RMP until the guest asks for it: one by page-state change (GHCB MSR protocol) then
 * PVALIDATE, the others on demand -- the first private access is #VC 0x404 (KVM assigned the page
 * on the RMP fault, nobody validated it), the runtime's handler validates it and the access runs
 * again.  Then a page goes back to the host: PVALIDATE rescind, page-state change to shared. */
#include "rt.h"

#define EXTRA 0x800000ul          /* 8 MiB: outside the image */
#define ON_DEMAND 256             /* pages validated through #VC 0x404 (1 MiB) */

int main(void) {
    if (!sev_snp_active()) {
        puts("snpmem: not an SEV-SNP guest: its memory needs no validation\n");
        return 0;
    }
    snp_make_private(EXTRA);
    volatile u64 *p = (volatile u64 *)EXTRA;
    p[0] = 0x5e5e5e5e;
    u64 sum = 0;
    for (u64 i = 1; i <= ON_DEMAND; i++) {
        volatile u64 *q = (volatile u64 *)(EXTRA + i * PAGE_SIZE);
        q[0] = i;                 /* #VC 0x404 the first time */
        sum += q[0];
    }
    kprintf("snpmem: validated 1 page by PSC + PVALIDATE and %d on demand (#VC 0x404), sum %d\n",
            (int)snp_validated_on_demand, (int)sum);
    snp_make_shared(EXTRA);
    puts("snpmem: gave one page back to the host (rescinded, then shared)\n");
    return 0;
}
