/* bench: the CPU benchmark's guest (sevemu bench cpu).
 *
 * bench_compute() is the measured loop: 15 instructions per iteration, registers plus one
 * read-modify-write of a private 4 KiB buffer.  The host times it between two writes to port 0x80,
 * then times bench_exits round trips (OUT to port 0x80, each an IOIO #VMEXIT).
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

int main(void) {
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
