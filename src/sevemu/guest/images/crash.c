/* crash: a guest that dies -- an invalid instruction with no IDT is a triple fault (#VMEXIT(SHUTDOWN)). */
#include "rt.h"

int main(void) {
    puts("crash: about to execute UD2\n");
    __asm__ volatile("ud2");
    puts("crash: unreachable\n");
    return 0;
}
