/* victim: the target of the shellcode demo.
 *
 * report() sits alone in one page (.victim).  Between ticks the guest halts; a hypervisor may
 * overwrite that page with its own code.  In a plain VM the guest then runs the attacker's code; in
 * an SEV guest the fetch decrypts the attacker's bytes with the guest's key: garbage, a fault.
 */
#include "rt.h"

__attribute__((section(".victim"), noinline, used)) void report(u32 tick) {
    kprintf("victim: tick %u, all is well\n", tick);
}

int main(void) {
    for (u32 tick = 0; tick < 4; tick++) {
        report(tick);
        hlt();
    }
    puts("victim: done\n");
    return 0;
}
