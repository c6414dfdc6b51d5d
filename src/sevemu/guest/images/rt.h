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
static inline void hlt(void) { __asm__ volatile("hlt" : : : "memory"); }
static inline void pause(void) { __asm__ volatile("pause" : : : "memory"); }
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }

/* ---- what the boot stub learned -------------------------------------------------------------- */
extern u64 rt_cmask;           /* the C-bit as a mask (0 in a plain VM) */
extern u32 rt_ncpus;           /* number of vCPUs */
int sev_active(void);
int cbit_position(void);       /* -1 when memory encryption is off */

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
