/* shared: talks to the host through a bounce buffer, a page mapped with the C-bit clear.
 *
 * Requests are copied from private memory into the shared page, the host answers there, the guest
 * copies the answer back into private memory.  Only what is copied into the shared page is visible
 * to the host, in plaintext; everything else stays ciphertext.
 */
#include "rt.h"

static char reply[256];
static const char *const lines[] = {
    "hello host, this is the guest",
    "virtio-style bounce buffers keep private memory private",
};

int main(void) {
    for (u32 i = 0; i < sizeof lines / sizeof lines[0]; i++) {
        u32 n = bounce_call(BOUNCE_OP_ECHO_UPPER, lines[i], (u32)strlen(lines[i]), reply, sizeof reply - 1);
        reply[n] = 0;
        kprintf("guest sent \"%s\"\nhost replied \"%s\"\n", lines[i], reply);
    }
    const char data[] = "checksum these bytes";
    u32 n = bounce_call(BOUNCE_OP_CHECKSUM, data, sizeof data - 1, reply, sizeof reply - 1);
    reply[n] = 0;
    u64 sum = 0;
    for (u32 i = 0; i < sizeof data - 1; i++) sum += (u8)data[i];
    kprintf("host computed %s, guest computed sum=%lu\n", reply, sum);
    return 0;
}
