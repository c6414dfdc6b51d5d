/* sevemu guest runtime (see rt.h). */
#include "rt.h"

u64 rt_cmask;
u32 rt_ncpus;
static spinlock_t console_lock;
__attribute__((section(".shared"), aligned(4096))) static struct bounce shared_bounce;

int sev_active(void) { return rt_cmask != 0; }

int cbit_position(void) {
    for (int i = 0; i < 64; i++)
        if (rt_cmask == (1ul << i)) return i;
    return -1;
}

struct bounce *bounce_page(void) { return &shared_bounce; }

__attribute__((weak)) void ap_main(u32 cpu) { (void)cpu; }

void rt_start(u32 cpu, u32 ncpus, u64 cmask) {
    if (cpu == 0) {
        rt_cmask = cmask;
        rt_ncpus = ncpus ? ncpus : 1;
        /* An SEV guest tells the host which pages it shares (KVM_HC_MAP_GPA_RANGE, attrs 0). */
        if (cmask) {
            u64 pages = (u64)(__shared_end - __shared_start) / PAGE_SIZE;
            vmmcall(KVM_HC_MAP_GPA_RANGE, (u64)__shared_start, pages, 0);
        }
        main();
    } else {
        ap_main(cpu);
    }
    /* back to the boot stub, which halts at rt_done for good */
}

/* ---- console ---------------------------------------------------------------------------------- */
void putc(char c) { outb(COM1, (u8)c); }

void puts(const char *s) {
    spin_lock(&console_lock);
    while (*s) putc(*s++);
    spin_unlock(&console_lock);
}

static char *fmt_num(char *end, u64 v, unsigned base, int upper) {
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    *--end = 0;
    do {
        *--end = digits[v % base];
        v /= base;
    } while (v);
    return end;
}

void kprintf(const char *fmt, ...) {
    __builtin_va_list ap;
    char buf[32];
    __builtin_va_start(ap, fmt);
    spin_lock(&console_lock);
    for (const char *p = fmt; *p; p++) {
        if (*p != '%') {
            putc(*p);
            continue;
        }
        p++;
        char pad = ' ';
        int width = 0, longarg = 0;
        if (*p == '0') {
            pad = '0';
            p++;
        }
        while (*p >= '0' && *p <= '9') width = width * 10 + (*p++ - '0');
        while (*p == 'l') {
            longarg = 1;
            p++;
        }
        const char *s = 0;
        switch (*p) {
        case 'c':
            buf[0] = (char)__builtin_va_arg(ap, int);
            buf[1] = 0;
            s = buf;
            break;
        case 's':
            s = __builtin_va_arg(ap, const char *);
            if (!s) s = "(null)";
            break;
        case 'd': {
            i64 v = longarg ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
            if (v < 0) {
                s = fmt_num(buf + sizeof buf, (u64)-v, 10, 0);
                *(char *)--s = '-';
            } else {
                s = fmt_num(buf + sizeof buf, (u64)v, 10, 0);
            }
            break;
        }
        case 'u':
            s = fmt_num(buf + sizeof buf, longarg ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 10, 0);
            break;
        case 'x':
        case 'X':
            s = fmt_num(buf + sizeof buf, longarg ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32), 16,
                        *p == 'X');
            break;
        case '%':
            s = "%";
            break;
        default:
            s = "?";
            break;
        }
        for (int n = (int)strlen(s); n < width; n++) putc(pad);
        while (*s) putc(*s++);
    }
    spin_unlock(&console_lock);
    __builtin_va_end(ap);
}

/* ---- the bounce buffer ------------------------------------------------------------------------ */
u32 bounce_call(u32 op, const void *data, u32 len, void *reply, u32 reply_max) {
    struct bounce *b = &shared_bounce;
    if (len > sizeof b->data) len = sizeof b->data;
    memcpy(b->data, data, len);     /* private -> shared: the only copy the host can read */
    b->op = op;
    b->len = len;
    b->magic = BOUNCE_MAGIC;
    barrier();
    b->state = BOUNCE_REQUEST;
    while (b->state != BOUNCE_REPLY) hlt();   /* the host answers while the guest is halted */
    u32 n = b->len < reply_max ? b->len : reply_max;
    memcpy(reply, b->data, n);      /* shared -> private */
    b->state = BOUNCE_IDLE;
    return n;
}

/* ---- string functions (GCC may call these even in freestanding code) -------------------------- */
void *memcpy(void *dst, const void *src, size_t n) {
    u8 *d = dst;
    const u8 *s = src;
    while (n--) *d++ = *s++;
    return dst;
}

void *memset(void *dst, int c, size_t n) {
    u8 *d = dst;
    while (n--) *d++ = (u8)c;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n) {
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y) return *x - *y;
    return 0;
}

size_t strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}
