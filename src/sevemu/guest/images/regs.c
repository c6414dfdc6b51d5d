/* regs: what SEV-ES changes -- a key held in a register across an exit, and a CPUID result.
 *
 * The guest derives a key at run time and keeps it in R12 while it halts (an exit: "host, your
 * turn").  Under plain SEV the hypervisor reads the guest's registers in the VMCB at that exit and
 * may write them; under SEV-ES they are in the encrypted VMSA: the host reads ciphertext and its
 * writes to the VMCB change nothing.  Then the guest mixes CPUID(0).EAX into a result: the host
 * answers CPUID (through the VMCB, or through the GHCB under SEV-ES) and may lie about it in both --
 * validating CPUID is what SNP's CPUID page is for.
 */
#include "rt.h"

int main(void) {
    u64 seed = 0x243F6A8885A308D3ul;
    for (int i = 0; i < 1000; i++) seed = seed * 6364136223846793005ul + 1442695040888963407ul;
    register u64 key __asm__("r12") = seed;
    u64 before = seed;
    __asm__ volatile("hlt" : "+r"(key) : : "memory");   /* the exit the host looks at */
    kprintf("regs: key in R12 %s the exit\n", key == before ? "survived" : "was CHANGED by the host at");
    u32 a, b, c, d;
    cpuid(0, 0, &a, &b, &c, &d);
    kprintf("regs: CPUID(0).EAX = %x, result %lx\n", a, (key ^ a) & 0xFFFF);
    return 0;
}
