/* sevemu guest runtime: the few things a freestanding guest needs (console, hypercalls, CPU access).
 *
 * Everything here runs in the guest; the only ways out are the exits the hypervisor intercepts
 * (port I/O, CPUID, MSR, VMMCALL, HLT) and the shared page.
 */
#ifndef SEVEMU_RT_H
#define SEVEMU_RT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long size_t;

#define COM1 0x3F8
#define PAGE_SIZE 4096
#define KVM_HC_MAP_GPA_RANGE 12
#define SEV_STATUS_MSR 0xC0010131u
#define GHCB_MSR 0xC0010130u
#define MAX_VCPUS 8
#define STACK_SIZE 16384

/* ---- CPU access ---------------------------------------------------------------------------- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline u64 rdmsr(u32 msr) {
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline u64 vmmcall(u64 nr, u64 a, u64 b, u64 c) {
    u64 ret;
    __asm__ volatile("vmmcall" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return ret;
}
static inline void wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
/* VMGEXIT (rep; vmmcall): an SEV-ES guest's exit through its GHCB */
static inline void vmgexit(void) { __asm__ volatile("rep; vmmcall" : : : "memory"); }
static inline void hlt(void) { __asm__ volatile("hlt" : : : "memory"); }
static inline void pause(void) { __asm__ volatile("pause" : : : "memory"); }
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }

/* ---- what the boot stub learned -------------------------------------------------------------- */
extern u64 rt_cmask;           /* the C-bit as a mask (0 in a plain VM) */
extern u32 rt_ncpus;           /* number of vCPUs */
int sev_active(void);
int cbit_position(void);       /* -1 when memory encryption is off */

/* ---- SEV-ES: the GHCB and #VC (GHCB 56421) ----------------------------------------------------- *
 * Each vCPU has its own GHCB, a shared page.  Non-automatic exits (CPUID, IN/OUT, RDMSR/WRMSR,
 * VMMCALL, MMIO) raise #VC; the runtime's handler fills the GHCB and executes VMGEXIT.  A guest may
 * also call the hypervisor itself: fill the fields (ghcb_set), then ghcb_call().  Offsets are the
 * GHCB's (struct ghcb in Linux). */
#define GHCB_RAX 0x1F8
#define GHCB_RCX 0x308
#define GHCB_RDX 0x310
#define GHCB_RBX 0x318
#define GHCB_SW_EXIT_CODE 0x390
#define GHCB_SW_EXIT_INFO_1 0x398
#define GHCB_SW_EXIT_INFO_2 0x3A0
#define GHCB_SW_SCRATCH 0x3A8
#define GHCB_XCR0 0x3E8
#define GHCB_SHARED_BUF 0x800
#define GHCB_SHARED_BUF_SIZE 2032
int sev_es_active(void);
int sev_snp_active(void);                    /* SEV_STATUS bit 2: SEV-SNP */
/* where `sevemu run --mode snp` launches the secrets and CPUID pages (SNP ABI 56860 page types 5, 6) */
#define SNP_SECRETS_GPA 0xFE000ul
#define SNP_CPUID_GPA   0xFF000ul
void snp_make_private(u64 gpa);              /* PSC to private, then PVALIDATE (identity-mapped page) */
void snp_make_shared(u64 gpa);               /* PVALIDATE rescind, then PSC to shared */
extern u64 snp_validated_on_demand;          /* pages the #VC 0x404 handler validated */
extern u32 snp_aps_created;                  /* APs the BSP started with SNP AP creation */
u32 rt_cpu(void);                            /* this vCPU's index (from its stack) */
u8 *ghcb_page(void);                         /* this vCPU's GHCB */
void ghcb_clear(u8 *g);                      /* clear the valid bitmap (before filling it) */
void ghcb_set(u8 *g, u32 off, u64 v);        /* write a field and mark it valid */
u64 ghcb_get(u8 *g, u32 off);                /* a field the hypervisor wrote (terminates if not valid) */
void ghcb_call(u8 *g, u64 exit_code, u64 info1, u64 info2);  /* VMGEXIT; terminates on an error */
u64 ghcb_msr_call(u64 request);              /* GHCB MSR protocol: request -> response */
void sev_es_terminate(u32 reason_set, u32 reason_code) __attribute__((noreturn));
extern u64 vc_count[MAX_VCPUS];              /* #VC exceptions handled, per vCPU */

/* ---- the shared (C-bit clear) page: a virtio-style bounce buffer ------------------------------ */
extern char __shared_start[], __shared_end[];
struct bounce {
    u32 magic;                 /* BOUNCE_MAGIC */
    u32 state;                 /* BOUNCE_IDLE / BOUNCE_REQUEST (guest -> host) / BOUNCE_REPLY */
    u32 op;
    u32 len;                   /* bytes used in data[] */
    u8 data[PAGE_SIZE - 16];
};
#define BOUNCE_MAGIC 0x42425653u  /* "SVBB" */
#define BOUNCE_IDLE 0
#define BOUNCE_REQUEST 1
#define BOUNCE_REPLY 2
#define BOUNCE_OP_ECHO_UPPER 1     /* host answers with the text in upper case */
#define BOUNCE_OP_CHECKSUM 2       /* host answers with "sum=<decimal>" of the bytes */
struct bounce *bounce_page(void);
/* Send data[0..len) to the host and wait (HLT) for its reply; returns the reply length. */
u32 bounce_call(u32 op, const void *data, u32 len, void *reply, u32 reply_max);

/* ---- console and strings ------------------------------------------------------------------- */
void putc(char c);
void puts(const char *s);
void kprintf(const char *fmt, ...);
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* ---- locks (the vCPUs of one VM share private memory) ----------------------------------------- */
typedef struct { volatile u32 v; } spinlock_t;
static inline void spin_lock(spinlock_t *l) {
    while (__atomic_exchange_n(&l->v, 1u, __ATOMIC_ACQUIRE)) pause();
}
static inline void spin_unlock(spinlock_t *l) { __atomic_store_n(&l->v, 0u, __ATOMIC_RELEASE); }

/* ---- entry points a guest provides ---------------------------------------------------------- */
int main(void);                    /* vCPU 0 */
void ap_main(u32 cpu);             /* other vCPUs (weak default: halt) */

#endif
