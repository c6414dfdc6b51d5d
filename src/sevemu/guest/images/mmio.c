/* mmio: a device register at GPA 0xF00000 (SEV-ES only).
 *
 * The host emulates an MMIO page there (its NPT entry has a reserved bit set), so every access is a
 * nested page fault with RSVD -- which the CPU turns into #VC 0x400 in an SEV-ES guest.  The
 * runtime's #VC handler decodes the MOV, asks the host with MMIO_WRITE / MMIO_READ through the
 * GHCB's shared buffer, and completes the instruction.
 */
#include "rt.h"

__asm__(".globl mmio_page\n.set mmio_page, 0xF00000");   /* the host maps the page at this symbol */
#define REG ((u64)0xF00000)

int main(void) {
    if (!sev_es_active()) {
        puts("mmio: not an SEV-ES guest, nothing to do\n");
        return 0;
    }
    u32 v = 0xC0FFEE, back;
    __asm__ volatile("movl %k0, (%1)" : : "r"(v), "r"(REG) : "memory");
    __asm__ volatile("movl (%1), %k0" : "=r"(back) : "r"(REG + 0) : "memory");
    u64 w = 0x1122334455667788ul, wback;
    __asm__ volatile("movq %0, (%1)" : : "r"(w), "r"(REG + 8) : "memory");
    __asm__ volatile("movq (%1), %0" : "=r"(wback) : "r"(REG + 8) : "memory");
    kprintf("mmio: wrote %x, read back %x; wrote %lx, read back %lx; %lu #VC\n", v, back, w, wback,
            vc_count[0]);
    return 0;
}
