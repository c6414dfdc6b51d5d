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
    if (sev_active())
        kprintf("this guest's page tables set the C-bit (bit %d) on every private page\n", cbit_position());
    else
        puts("this guest's memory is not encrypted\n");
    return 0;
}
