/* attest: an SEV-SNP guest asks its firmware for an attestation report, from its own code.
 *
 * What Linux's sev-guest driver does (drivers/virt/coco/sev-guest/sev-guest.c), in guest code:
 * VMPCK0 and the message sequence number come from the secrets page (SNP ABI 56860 "Secrets Page";
 * Linux keeps msg_seqno_0 in the guest-OS area at 0xA0); the MSG_REPORT_REQ is sealed with
 * AES-256-GCM (aesgcm.h; IV = the sequence number, AAD = header bytes 0x30..0x5F, tag in the header)
 * into a shared page; the host is asked through the GHCB (NAE 0x8000_0011 SNP Guest Request,
 * SW_EXITINFO1/2 = request/response GPAs, GHCB 56421); the response is copied into private memory,
 * checked (type, version, sequence number, size) and opened.  Any failure disables VMPCK0 (zeroed in
 * the secrets page) as Linux does.  The report is printed in hex for the host to verify
 * (`sevemu run attest --mode snp` does, against the emulated AMD's VCEK chain).
 */
#include "rt.h"
#include "aesgcm.h"

#define MSG_HDR_SIZE 0x60
#define MSG_REPORT_REQ 5
#define MSG_REPORT_RSP 6
#define REPORT_REQ_SIZE 0x60
#define REPORT_RSP_SIZE 0x4C0           /* status, size, reserved, then the 0x4A0-byte report */
#define REPORT_SIZE 0x4A0
#define SECRETS_VMPCK0 0x20
#define SECRETS_SEQNO0 0xA0             /* Linux's msg_seqno_0 (u32) in the OS area */
#define NAE_SNP_GUEST_REQUEST 0x80000011ul

__attribute__((section(".shared"), aligned(4096))) static u8 req_page[PAGE_SIZE];
__attribute__((section(".shared"), aligned(4096))) static u8 resp_page[PAGE_SIZE];

static u8 response[MSG_HDR_SIZE + REPORT_RSP_SIZE];
static u8 plain[REPORT_RSP_SIZE];

/* REPORT_DATA: what the guest binds into its report (the host checks it) */
static const char report_data[64] = "sevemu attest guest: REPORT_DATA from guest code";

static void put_hex(const u8 *p, u32 n) {
    static const char digits[] = "0123456789abcdef";
    for (u32 i = 0; i < n; i++) {
        putc(digits[p[i] >> 4]);
        putc(digits[p[i] & 15]);
    }
}

static void put64(u8 *p, u64 v) { for (int i = 0; i < 8; i++) p[i] = (u8)(v >> (8 * i)); }
static u64 get64(const u8 *p) { u64 v = 0; for (int i = 7; i >= 0; i--) v = v << 8 | p[i]; return v; }
static u16 get16(const u8 *p) { return (u16)(p[0] | p[1] << 8); }

static void disable_vmpck(volatile u8 *secrets, const char *why) {
    for (int i = 0; i < 32; i++) secrets[SECRETS_VMPCK0 + i] = 0;
    kprintf("attest: %s: VMPCK0 disabled\n", why);
}

int main(void) {
    if (!sev_snp_active()) {
        puts("attest: not an SEV-SNP guest: no attestation report\n");
        return 0;
    }
    volatile u8 *secrets = (volatile u8 *)SNP_SECRETS_GPA;
    u8 vmpck[32], any = 0;
    for (int i = 0; i < 32; i++) any |= vmpck[i] = secrets[SECRETS_VMPCK0 + i];
    if (!any) {
        puts("attest: VMPCK0 is zero (disabled): no guest messages\n");
        return 1;
    }
    u32 count = *(volatile u32 *)(secrets + SECRETS_SEQNO0);
    if (count >= 0xFFFFFFFDu) {
        puts("attest: sequence numbers exhausted\n");
        return 1;
    }
    u64 seq = (u64)count + 1;

    /* the request: header, then MSG_REPORT_REQ (REPORT_DATA, VMPL 0, KEY_SEL 0) sealed in place */
    u8 hdr[MSG_HDR_SIZE] = {0}, payload[REPORT_REQ_SIZE] = {0}, iv[12] = {0};
    for (int i = 0; i < 64; i++) payload[i] = (u8)report_data[i];
    put64(hdr + 0x20, seq);
    hdr[0x30] = 1;                       /* ALGO: AES-256-GCM */
    hdr[0x31] = 1;                       /* HDR_VERSION */
    hdr[0x32] = MSG_HDR_SIZE;            /* HDR_SIZE (u16) */
    hdr[0x34] = MSG_REPORT_REQ;
    hdr[0x35] = 1;                       /* MSG_VERSION */
    hdr[0x36] = REPORT_REQ_SIZE;         /* MSG_SIZE (u16) */
    hdr[0x3C] = 0;                       /* MSG_VMPCK */
    put64(iv, seq);
    aes256gcm_seal(vmpck, iv, hdr + 0x30, MSG_HDR_SIZE - 0x30, payload, REPORT_REQ_SIZE, payload, hdr);
    memcpy(req_page, hdr, MSG_HDR_SIZE);
    memcpy(req_page + MSG_HDR_SIZE, payload, REPORT_REQ_SIZE);

    u8 *g = ghcb_page();
    ghcb_clear(g);
    ghcb_call(g, NAE_SNP_GUEST_REQUEST, (u64)req_page, (u64)resp_page);
    u64 info2 = *(volatile u64 *)(g + GHCB_SW_EXIT_INFO_2);
    /* whatever happens next, the number was used (Linux: snp_inc_msg_seqno) */
    *(volatile u32 *)(secrets + SECRETS_SEQNO0) = count + 2;
    if (info2) {
        kprintf("attest: the guest request failed: firmware error %x, VMM error %x\n", (u32)info2, (u32)(info2 >> 32));
        disable_vmpck(secrets, "request failed");
        return 1;
    }

    /* the response: copied out of the shared page first (the host may change it), then checked */
    memcpy(response, resp_page, sizeof(response));
    const u8 *r = response;
    if (get64(r + 0x20) != seq + 1 || r[0x30] != 1 || r[0x31] != 1 || get16(r + 0x32) != MSG_HDR_SIZE ||
        r[0x34] != MSG_REPORT_RSP || r[0x35] != 1 || get16(r + 0x36) != REPORT_RSP_SIZE || r[0x3C] != 0) {
        disable_vmpck(secrets, "the response is not the request's answer");
        return 1;
    }
    put64(iv, seq + 1);
    if (aes256gcm_open(vmpck, iv, r + 0x30, MSG_HDR_SIZE - 0x30, r + MSG_HDR_SIZE, REPORT_RSP_SIZE, r, plain)) {
        disable_vmpck(secrets, "the response does not authenticate");
        return 1;
    }
    u32 status = (u32)get64(plain) & 0xFFFFFFFFu, size = (u32)(get64(plain) >> 32);
    if (status || size != REPORT_SIZE) {
        kprintf("attest: the firmware answered status %x (report size %x)\n", status, size);
        return 1;
    }
    const u8 *report = plain + 0x20;
    kprintf("attest: report version %d, VMPL %d, signed by the %s\n", (int)report[0], (int)report[0x30],
            ((report[0x48] >> 2) & 7) == 0 ? "VCEK" : ((report[0x48] >> 2) & 7) == 1 ? "VLEK" : "nobody");
    puts("attest: measurement ");
    put_hex(report + 0x90, 48);
    puts("\nattest: report ");
    put_hex(report, REPORT_SIZE);
    puts("\n");
    return 0;
}
