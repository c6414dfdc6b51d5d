/* smp: every vCPU sums a slice of a private table; vCPU 0 waits for the others and prints the total. */
#include "rt.h"

#define N 4096
static u32 table[N];
static volatile u64 partial[8];
static volatile u32 done;

static u64 sum_slice(u32 cpu, u32 ncpus) {
    u64 s = 0;
    for (u32 i = cpu; i < N; i += ncpus) s += table[i];
    return s;
}

void ap_main(u32 cpu) {
    while (__atomic_load_n(&done, __ATOMIC_ACQUIRE) == 0) pause();   /* vCPU 0 fills the table first */
    partial[cpu] = sum_slice(cpu, rt_ncpus);
    kprintf("vCPU %u: partial sum %lu\n", cpu, partial[cpu]);
    __atomic_fetch_add(&done, 1, __ATOMIC_RELEASE);
}

int main(void) {
    for (u32 i = 0; i < N; i++) table[i] = i * 2654435761u;
    partial[0] = sum_slice(0, rt_ncpus);
    __atomic_store_n(&done, 1, __ATOMIC_RELEASE);
    while (__atomic_load_n(&done, __ATOMIC_ACQUIRE) < rt_ncpus) pause();
    u64 total = 0;
    for (u32 c = 0; c < rt_ncpus; c++) total += partial[c];
    kprintf("smp: %u vCPU(s), total %lu (expected %lu)\n", rt_ncpus, total, sum_slice(0, 1));
    return 0;
}
