/* hello: prints through the serial console (COM1, emulated by the hypervisor). */
#include "rt.h"

static u64 fib(u32 n) {
    u64 a = 0, b = 1;
    while (n--) {
        u64 t = a + b;
        a = b;
        b = t;
    }
    return a;
}

int main(void) {
    puts("Hello from a sevemu guest: real x86-64 code, built from C.\n");
    kprintf("fib(90) = %lu\n", fib(90));
    kprintf("%u vCPU(s)\n", rt_ncpus);
    return 0;
}
