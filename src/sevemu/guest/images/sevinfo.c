/* sevinfo: what the guest can learn about its own protection (differs between plain and SEV). */
#include "rt.h"

int main(void) {
    u32 a, b, c, d;
    u64 status = rdmsr(SEV_STATUS_MSR);
    cpuid(0x8000001F, 0, &a, &b, &c, &d);
    kprintf("SEV_STATUS MSR: %lx (memory encryption %s%s%s)\n", status, status & 1 ? "active" : "off",
            status & 2 ? ", SEV-ES: registers encrypted, exits through the GHCB" : "",
            status & 4 ? ", SEV-SNP: memory integrity through the RMP, pages validated by the guest" : "");
    kprintf("CPUID 0x8000001F: EAX %x EBX %x ECX %x EDX %x\n", a, b, c, d);
    if (status & 4) {
        /* SEV-SNP: the firmware's secrets page and the CPUID page it checked (SNP ABI 56860) */
        const volatile u32 *sp = (const volatile u32 *)SNP_SECRETS_GPA;
        const volatile u8 *vmpck0 = (const volatile u8 *)(SNP_SECRETS_GPA + 0x20);
        u32 nonzero = 0;
        for (int i = 0; i < 32; i++) nonzero |= vmpck0[i];
        kprintf("secrets page: version %d, FMS %x, VMPCK0 %s\n", sp[0], sp[2], nonzero ? "present" : "missing");
        const volatile u32 *cp = (const volatile u32 *)SNP_CPUID_GPA;
        u32 n = cp[0];
        kprintf("CPUID page: %d functions\n", n);
        for (u32 i = 0; i < n && i < 64; i++) {
            const volatile u32 *f = cp + 4 + i * 12;     /* 0x10 header, 0x30 per function */
            if (f[0] == 0x8000001F)
                kprintf("CPUID page 0x8000001F: EAX %x EBX %x ECX %x EDX %x\n", f[6], f[7], f[8], f[9]);
        }
    }
    if (sev_active())
        kprintf("this guest's page tables set the C-bit (bit %d) on every private page\n", cbit_position());
    else
        puts("this guest's memory is not encrypted\n");
    return 0;
}
