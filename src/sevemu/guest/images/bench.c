/* bench: the CPU benchmark's guest (sevemu bench cpu).
 *
 * bench_compute() is the measured loop: 15 instructions per iteration, registers plus one
 * read-modify-write of a private 4 KiB buffer.  The host times it between two writes to port 0x80,
 * then times bench_exits round trips (OUT to port 0x80, each an IOIO #VMEXIT).
 *
 * As an SEV-ES guest (whose registers the host cannot read, so no marks) it halts, runs
 * bench_exits VMGEXIT round trips (the GHCB filled with an IOIO OUT to port 0x80, then VMGEXIT),
 * halts, runs bench_exits / 4 OUTs to port 0x80 (each a #VC, its handler's VMGEXIT, IRET), halts.
 */
#include "rt.h"

#define MARK 0x80
volatile u64 bench_iterations = 1ul << 22;
volatile u64 bench_exits = 20000;
u64 bench_buffer[512] __attribute__((aligned(4096)));

__attribute__((noinline, used)) u64 bench_compute(u64 n, u64 *buf) {
    u64 x = 0x9E3779B97F4A7C15ul, acc = 0;
    if (!n) return 0;
    __asm__ volatile(
        "1:\n\t"
        "mov %[x], %%rdx\n\t"
        "shl $13, %%rdx\n\t"
        "xor %%rdx, %[x]\n\t"
        "mov %[x], %%rdx\n\t"
        "shr $7, %%rdx\n\t"
        "xor %%rdx, %[x]\n\t"
        "mov %[x], %%rdx\n\t"
        "shl $17, %%rdx\n\t"
        "xor %%rdx, %[x]\n\t"
        "mov %[x], %%rdx\n\t"
        "and $0xff8, %%edx\n\t"
        "add %[x], (%[buf],%%rdx)\n\t"
        "add %[x], %[acc]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        : [x] "+r"(x), [acc] "+r"(acc), [n] "+r"(n)
        : [buf] "r"(buf)
        : "rdx", "memory", "cc");
    return acc;
}

static void es_main(void) {
    u64 n = bench_exits;
    u8 *g = ghcb_page();
    ghcb_clear(g);
    ghcb_set(g, GHCB_RAX, 0);
    ghcb_call(g, 0x7B, (u64)MARK << 16 | 0x10 | 0x200, 0);   /* the GHCB MSR now holds the GHCB's GPA */
    hlt();
    /* the loop keeps to registers and the GHCB (no stack traffic): what is timed is the exit */
    volatile u64 *q = (volatile u64 *)g;
    for (u64 i = 0; i < n; i++) {
        q[GHCB_RAX / 8] = 0;
        q[GHCB_SW_EXIT_CODE / 8] = 0x7B;                           /* IOIO: OUT, 8 bits, port MARK */
        q[GHCB_SW_EXIT_INFO_1 / 8] = (u64)MARK << 16 | 0x10 | 0x200;
        q[GHCB_SW_EXIT_INFO_2 / 8] = 0;
        q[0x3F0 / 8] = 1ul << (GHCB_RAX / 8);                      /* valid bitmap: RAX ... */
        q[0x3F8 / 8] = 1ul << (GHCB_SW_EXIT_CODE / 8 - 64) | 1ul << (GHCB_SW_EXIT_INFO_1 / 8 - 64)
                     | 1ul << (GHCB_SW_EXIT_INFO_2 / 8 - 64);      /* ... and SW_EXITCODE, SW_EXITINFO1/2 */
        vmgexit();
        if ((u32)q[GHCB_SW_EXIT_INFO_1 / 8]) sev_es_terminate(0, 0);
    }
    hlt();
    for (u64 i = 0; i < n / 4; i++) outb(MARK, 0);
    hlt();
    puts("bench: done\n");
}

int main(void) {
    if (sev_es_active()) {
        es_main();
        return 0;
    }
    outb(MARK, 1);
    u64 r = bench_compute(bench_iterations, bench_buffer);
    outb(MARK, 2);
    kprintf("bench: compute result %016lx\n", r);
    u64 n = bench_exits;
    outb(MARK, 3);
    for (u64 i = 0; i < n; i++) outb(MARK, 0);
    outb(MARK, 4);
    puts("bench: done\n");
    return 0;
}
