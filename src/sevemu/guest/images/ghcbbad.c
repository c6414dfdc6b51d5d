/* ghcbbad: malformed GHCBs, and what the hypervisor answers (SEV-ES only).
 *
 * Each request goes through the guest's GHCB with VMGEXIT directly (not ghcb_call, which gives up
 * on the first error): a bad ghcb_usage, a valid bitmap missing what the event needs, an unknown
 * exit code.  The hypervisor answers SW_EXITINFO1 = 2 with the GHCB error in SW_EXITINFO2.  Then the
 * guest does what Linux does on such an answer: it asks to be terminated (reason set 0, code 0).
 */
#include "rt.h"

static void raw(u8 *g, u32 usage, u64 code, int with_rax) {
    ghcb_clear(g);
    if (with_rax) ghcb_set(g, GHCB_RAX, 0);
    ghcb_set(g, GHCB_SW_EXIT_CODE, code);
    ghcb_set(g, GHCB_SW_EXIT_INFO_1, (u64)0x80 << 16 | 0x10 | 0x200);   /* IOIO OUT to port 0x80 */
    ghcb_set(g, GHCB_SW_EXIT_INFO_2, 0);
    *(volatile u16 *)(g + 0xFFA) = 2;
    *(volatile u32 *)(g + 0xFFC) = usage;
    wrmsr(GHCB_MSR, (u64)g);
    vmgexit();
}

int main(void) {
    if (!sev_es_active()) {
        puts("ghcbbad: not an SEV-ES guest, nothing to do\n");
        return 0;
    }
    u8 *g = ghcb_page();
    static const char *what[] = {"usage 1", "no RAX for OUT", "exit code 0x1234"};
    for (int t = 0; t < 3; t++) {
        raw(g, t == 0 ? 1 : 0, t == 2 ? 0x1234 : 0x7B, t != 1);
        u64 info1 = *(volatile u64 *)(g + GHCB_SW_EXIT_INFO_1), info2 = *(volatile u64 *)(g + GHCB_SW_EXIT_INFO_2);
        kprintf("ghcbbad: %s -> SW_EXITINFO1 %lx SW_EXITINFO2 %lx\n", what[t], info1, info2);
    }
    puts("ghcbbad: giving up, as Linux does\n");
    sev_es_terminate(0, 0);
}
