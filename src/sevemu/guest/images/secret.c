/* secret: derives a 4 KiB key into private memory at run time and computes with it.
 *
 * The key never exists outside the guest: it is expanded from the seed below (splitmix64), kept in
 * .bss (private, C-bit set), and used to MAC a message.  Only the MAC is printed.  The hypervisor,
 * which saw this image, knows the seed -- the point is that at run time it can read neither the key
 * nor the note below from memory: guest-private pages are ciphertext to it and in DRAM.
 */
#include "rt.h"

static const u64 seed = 0x5345564D55534543ul;            /* "CESUMVES" */
static const char message[] = "attack at dawn; bring the launch codes";
static u64 key[512];                                      /* 4 KiB of secret, private */
static char note[64];                                     /* a recognisable private string */

static u64 splitmix64(u64 *s) {
    u64 z = (*s += 0x9E3779B97F4A7C15ul);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ul;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBul;
    return z ^ (z >> 31);
}

static u64 mac(const char *msg, u64 len) {
    u64 h = 0xCBF29CE484222325ul;
    for (u32 round = 0; round < 64; round++)
        for (u64 i = 0; i < len; i++) {
            h ^= (u8)msg[i] ^ key[(h + i + round) & 511];
            h *= 0x100000001B3ul;
            h = (h << 13) | (h >> 51);
        }
    return h;
}

int main(void) {
    u64 s = seed;
    for (int i = 0; i < 512; i++) key[i] = splitmix64(&s);
    const char prefix[] = "TOP-SECRET launch code ";
    memcpy(note, prefix, sizeof prefix - 1);
    u64 code = key[7];
    for (int i = 0; i < 16; i++) note[sizeof prefix - 1 + i] = "0123456789ABCDEF"[(code >> (60 - 4 * i)) & 15];
    note[sizeof prefix - 1 + 16] = 0;
    puts("secret: derived a 4096-byte key in private memory\n");
    kprintf("secret: MAC(message) = %016lx\n", mac(message, sizeof message - 1));
    kprintf("secret: key checksum = %016lx\n", key[0] ^ key[255] ^ key[511]);
    hlt();                                                /* the host may look at memory now */
    kprintf("secret: still intact after the host looked: %s\n",
            memcmp(note, prefix, sizeof prefix - 1) == 0 ? "yes" : "NO");
    return 0;
}
