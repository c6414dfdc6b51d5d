/* AES-256-GCM for guest code: what an SNP guest needs to talk to its firmware (SNP ABI 56860, guest
 * messages: AES-256-GCM under a VMPCK, 12-byte IV, 16-byte tag).
 *
 * AES is FIPS 197 (AES-256: 14 rounds, the key schedule of section 5.2); GCM is NIST SP 800-38D with
 * a 96-bit IV (J0 = IV || 0^31 || 1, GCTR from inc32(J0), GHASH over A, C and their bit lengths).
 * Written for clarity, not speed: a byte-wise AES and a bit-serial GF(2^128) multiply -- a guest
 * message is a few blocks.  Header-only (static functions); the includer defines u8, u32 and u64
 * (rt.h in a guest; the host test's wrapper when it checks this code against `cryptography`).
 * Not constant-time in its table lookups (the S-box); the tag comparison is.
 */
#ifndef SEVEMU_AESGCM_H
#define SEVEMU_AESGCM_H

struct aes256 {
    u8 rk[15][16];   /* round keys 0..14, bytes in state order (column-major) */
};

static const u8 aes_sbox[256] = {
    0x63, 0x7c, 0x77, 0x7b, 0xf2, 0x6b, 0x6f, 0xc5, 0x30, 0x01, 0x67, 0x2b, 0xfe, 0xd7, 0xab, 0x76,
    0xca, 0x82, 0xc9, 0x7d, 0xfa, 0x59, 0x47, 0xf0, 0xad, 0xd4, 0xa2, 0xaf, 0x9c, 0xa4, 0x72, 0xc0,
    0xb7, 0xfd, 0x93, 0x26, 0x36, 0x3f, 0xf7, 0xcc, 0x34, 0xa5, 0xe5, 0xf1, 0x71, 0xd8, 0x31, 0x15,
    0x04, 0xc7, 0x23, 0xc3, 0x18, 0x96, 0x05, 0x9a, 0x07, 0x12, 0x80, 0xe2, 0xeb, 0x27, 0xb2, 0x75,
    0x09, 0x83, 0x2c, 0x1a, 0x1b, 0x6e, 0x5a, 0xa0, 0x52, 0x3b, 0xd6, 0xb3, 0x29, 0xe3, 0x2f, 0x84,
    0x53, 0xd1, 0x00, 0xed, 0x20, 0xfc, 0xb1, 0x5b, 0x6a, 0xcb, 0xbe, 0x39, 0x4a, 0x4c, 0x58, 0xcf,
    0xd0, 0xef, 0xaa, 0xfb, 0x43, 0x4d, 0x33, 0x85, 0x45, 0xf9, 0x02, 0x7f, 0x50, 0x3c, 0x9f, 0xa8,
    0x51, 0xa3, 0x40, 0x8f, 0x92, 0x9d, 0x38, 0xf5, 0xbc, 0xb6, 0xda, 0x21, 0x10, 0xff, 0xf3, 0xd2,
    0xcd, 0x0c, 0x13, 0xec, 0x5f, 0x97, 0x44, 0x17, 0xc4, 0xa7, 0x7e, 0x3d, 0x64, 0x5d, 0x19, 0x73,
    0x60, 0x81, 0x4f, 0xdc, 0x22, 0x2a, 0x90, 0x88, 0x46, 0xee, 0xb8, 0x14, 0xde, 0x5e, 0x0b, 0xdb,
    0xe0, 0x32, 0x3a, 0x0a, 0x49, 0x06, 0x24, 0x5c, 0xc2, 0xd3, 0xac, 0x62, 0x91, 0x95, 0xe4, 0x79,
    0xe7, 0xc8, 0x37, 0x6d, 0x8d, 0xd5, 0x4e, 0xa9, 0x6c, 0x56, 0xf4, 0xea, 0x65, 0x7a, 0xae, 0x08,
    0xba, 0x78, 0x25, 0x2e, 0x1c, 0xa6, 0xb4, 0xc6, 0xe8, 0xdd, 0x74, 0x1f, 0x4b, 0xbd, 0x8b, 0x8a,
    0x70, 0x3e, 0xb5, 0x66, 0x48, 0x03, 0xf6, 0x0e, 0x61, 0x35, 0x57, 0xb9, 0x86, 0xc1, 0x1d, 0x9e,
    0xe1, 0xf8, 0x98, 0x11, 0x69, 0xd9, 0x8e, 0x94, 0x9b, 0x1e, 0x87, 0xe9, 0xce, 0x55, 0x28, 0xdf,
    0x8c, 0xa1, 0x89, 0x0d, 0xbf, 0xe6, 0x42, 0x68, 0x41, 0x99, 0x2d, 0x0f, 0xb0, 0x54, 0xbb, 0x16,
};

/* FIPS 197 5.2: w[i] = w[i-8] ^ (i % 8 == 0 ? SubWord(RotWord(w[i-1])) ^ Rcon : i % 8 == 4 ?
 * SubWord(w[i-1]) : w[i-1]); a word is 4 bytes, round key r is words 4r..4r+3. */
static void aes256_init(struct aes256 *k, const u8 key[32]) {
    u8 w[60][4];
    u8 rcon = 1;
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 4; j++) w[i][j] = key[4 * i + j];
    for (int i = 8; i < 60; i++) {
        u8 t[4] = {w[i - 1][0], w[i - 1][1], w[i - 1][2], w[i - 1][3]};
        if (i % 8 == 0) {
            u8 first = t[0];
            t[0] = aes_sbox[t[1]] ^ rcon;
            t[1] = aes_sbox[t[2]];
            t[2] = aes_sbox[t[3]];
            t[3] = aes_sbox[first];
            rcon = (u8)((rcon << 1) ^ ((rcon >> 7) * 0x1b));
        } else if (i % 8 == 4) {
            for (int j = 0; j < 4; j++) t[j] = aes_sbox[t[j]];
        }
        for (int j = 0; j < 4; j++) w[i][j] = w[i - 8][j] ^ t[j];
    }
    for (int r = 0; r < 15; r++)
        for (int c = 0; c < 4; c++)
            for (int j = 0; j < 4; j++) k->rk[r][4 * c + j] = w[4 * r + c][j];
}

static u8 aes_xtime(u8 x) { return (u8)((x << 1) ^ ((x >> 7) * 0x1b)); }

/* FIPS 197 5.1: AddRoundKey, then 13 x (SubBytes, ShiftRows, MixColumns, AddRoundKey), then a last
 * round without MixColumns.  The state is column-major: s[4c + r] = row r of column c. */
static void aes256_encrypt(const struct aes256 *k, const u8 in[16], u8 out[16]) {
    u8 s[16], t[16];
    for (int i = 0; i < 16; i++) s[i] = in[i] ^ k->rk[0][i];
    for (int round = 1; round <= 14; round++) {
        for (int c = 0; c < 4; c++)          /* SubBytes and ShiftRows: row r moves left by r */
            for (int r = 0; r < 4; r++) t[4 * c + r] = aes_sbox[s[4 * ((c + r) & 3) + r]];
        if (round != 14) {
            for (int c = 0; c < 4; c++) {    /* MixColumns */
                u8 a0 = t[4 * c], a1 = t[4 * c + 1], a2 = t[4 * c + 2], a3 = t[4 * c + 3];
                u8 all = a0 ^ a1 ^ a2 ^ a3;
                t[4 * c] = a0 ^ all ^ aes_xtime(a0 ^ a1);
                t[4 * c + 1] = a1 ^ all ^ aes_xtime(a1 ^ a2);
                t[4 * c + 2] = a2 ^ all ^ aes_xtime(a2 ^ a3);
                t[4 * c + 3] = a3 ^ all ^ aes_xtime(a3 ^ a0);
            }
        }
        for (int i = 0; i < 16; i++) s[i] = t[i] ^ k->rk[round][i];
    }
    for (int i = 0; i < 16; i++) out[i] = s[i];
}

/* SP 800-38D 6.3: X * Y in GF(2^128), bits numbered from the most significant of byte 0; R = 0xE1 || 0^120. */
static void gcm_mul(u8 x[16], const u8 h[16]) {
    u8 z[16] = {0}, v[16];
    for (int i = 0; i < 16; i++) v[i] = h[i];
    for (int i = 0; i < 128; i++) {
        if ((x[i >> 3] >> (7 - (i & 7))) & 1)
            for (int j = 0; j < 16; j++) z[j] ^= v[j];
        u8 lsb = v[15] & 1;
        for (int j = 15; j > 0; j--) v[j] = (u8)((v[j] >> 1) | (v[j - 1] << 7));
        v[0] >>= 1;
        if (lsb) v[0] ^= 0xE1;
    }
    for (int i = 0; i < 16; i++) x[i] = z[i];
}

static void gcm_ghash(u8 y[16], const u8 h[16], const u8 *data, u64 len) {
    for (u64 off = 0; off < len; off += 16) {
        for (u64 i = 0; i < 16 && off + i < len; i++) y[i] ^= data[off + i];   /* zero padded */
        gcm_mul(y, h);
    }
}

/* GCTR from inc32(J0): the counter is the last 4 bytes, big endian */
static void gcm_ctr(const struct aes256 *k, const u8 j0[16], const u8 *in, u8 *out, u64 len) {
    u8 ctr[16], ks[16];
    for (int i = 0; i < 16; i++) ctr[i] = j0[i];
    for (u64 off = 0; off < len; off += 16) {
        for (int i = 15; i >= 12; i--)
            if (++ctr[i]) break;
        aes256_encrypt(k, ctr, ks);
        for (u64 i = 0; i < 16 && off + i < len; i++) out[off + i] = in[off + i] ^ ks[i];
    }
}

/* the tag: E(K, J0) ^ GHASH(H, A || pad || C || pad || [len(A)]64 || [len(C)]64) */
static void gcm_tag(const struct aes256 *k, const u8 j0[16], const u8 *aad, u64 aad_len, const u8 *ct, u64 len,
                    u8 tag[16]) {
    u8 h[16] = {0}, y[16] = {0}, lens[16], ek[16];
    aes256_encrypt(k, h, h);
    gcm_ghash(y, h, aad, aad_len);
    gcm_ghash(y, h, ct, len);
    for (int i = 0; i < 8; i++) {
        lens[i] = (u8)((aad_len * 8) >> (56 - 8 * i));
        lens[8 + i] = (u8)((len * 8) >> (56 - 8 * i));
    }
    gcm_ghash(y, h, lens, 16);
    aes256_encrypt(k, j0, ek);
    for (int i = 0; i < 16; i++) tag[i] = ek[i] ^ y[i];
}

static void gcm_j0(const u8 iv[12], u8 j0[16]) {
    for (int i = 0; i < 12; i++) j0[i] = iv[i];
    j0[12] = j0[13] = j0[14] = 0;
    j0[15] = 1;
}

/* Encrypt pt[0..len) into ct (may be the same buffer) and write the 16-byte tag. */
static void aes256gcm_seal(const u8 key[32], const u8 iv[12], const u8 *aad, u64 aad_len, const u8 *pt, u64 len,
                           u8 *ct, u8 tag[16]) {
    struct aes256 k;
    u8 j0[16];
    aes256_init(&k, key);
    gcm_j0(iv, j0);
    gcm_ctr(&k, j0, pt, ct, len);
    gcm_tag(&k, j0, aad, aad_len, ct, len, tag);
}

/* Check the tag first (compared in constant time), then decrypt ct[0..len) into pt.  0: authentic;
 * -1: not (pt untouched). */
static int aes256gcm_open(const u8 key[32], const u8 iv[12], const u8 *aad, u64 aad_len, const u8 *ct, u64 len,
                          const u8 tag[16], u8 *pt) {
    struct aes256 k;
    u8 j0[16], want[16], diff = 0;
    aes256_init(&k, key);
    gcm_j0(iv, j0);
    gcm_tag(&k, j0, aad, aad_len, ct, len, want);
    for (int i = 0; i < 16; i++) diff |= (u8)(want[i] ^ tag[i]);
    if (diff) return -1;
    gcm_ctr(&k, j0, ct, pt, len);
    return 0;
}

#endif
