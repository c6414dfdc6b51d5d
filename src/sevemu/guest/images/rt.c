/* sevemu guest runtime (see rt.h). */
#include "rt.h"

u64 rt_cmask;
u32 rt_ncpus;
u64 vc_count[MAX_VCPUS];
static spinlock_t console_lock;
__attribute__((section(".shared"), aligned(4096))) static struct bounce shared_bounce;
__attribute__((section(".shared.ghcb"), aligned(4096))) static u8 ghcbs[MAX_VCPUS][PAGE_SIZE];
static u32 rt_es;
static u32 rt_snp;
static u32 pvalidate(u64 va, u32 validate);
u64 snp_validated_on_demand;
u32 snp_aps_created;
static volatile u8 ghcb_msr_is_gpa[MAX_VCPUS];  /* the GHCB MSR holds this vCPU's GHCB GPA */
extern char boot_stacks[];
extern void vc_entry(void);

/* ---- the IDT: #VC (vector 29) ------------------------------------------------------------------ */
struct idt_gate {
    u16 off0, sel;
    u8 ist, attr;
    u16 off1;
    u32 off2, zero;
} __attribute__((packed));
static struct idt_gate idt[32] __attribute__((aligned(16)));

static void idt_init(void) {
    u64 h = (u64)vc_entry;
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    /* every vCPU writes the same gate, so no vCPU waits for another */
    idt[29] = (struct idt_gate){(u16)h, cs, 0, 0x8E, (u16)(h >> 16), (u32)(h >> 32), 0};
    struct { u16 limit; u64 base; } __attribute__((packed)) d = {sizeof idt - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(d));
}

/* ---- SEV-ES: GHCB ---------------------------------------------------------------------------- */
int sev_es_active(void) { return rt_es; }

u32 rt_cpu(void) {
    u64 sp;
    __asm__ volatile("mov %%rsp, %0" : "=r"(sp));
    return (u32)((sp - (u64)boot_stacks) / STACK_SIZE);
}

u8 *ghcb_page(void) { return ghcbs[rt_cpu()]; }

#define G64(g, off) (*(volatile u64 *)((g) + (off)))
void ghcb_clear(u8 *g) {
    for (int i = 0; i < 16; i++) ((volatile u8 *)g)[0x3F0 + i] = 0;
}
void ghcb_set(u8 *g, u32 off, u64 v) {
    G64(g, off) = v;
    ((volatile u8 *)g)[0x3F0 + off / 64] |= (u8)(1u << ((off / 8) % 8));
}
u64 ghcb_get(u8 *g, u32 off) {
    if (!(((volatile u8 *)g)[0x3F0 + off / 64] & (1u << ((off / 8) % 8)))) sev_es_terminate(0, 0);
    return G64(g, off);
}

u64 ghcb_msr_call(u64 request) {
    ghcb_msr_is_gpa[rt_cpu()] = 0;
    wrmsr(GHCB_MSR, request);
    vmgexit();
    return rdmsr(GHCB_MSR);
}

void sev_es_terminate(u32 reason_set, u32 reason_code) {
    for (;;) ghcb_msr_call(0x100 | (u64)(reason_set & 0xF) << 12 | (u64)(reason_code & 0xFF) << 16);
}

void ghcb_call(u8 *g, u64 exit_code, u64 info1, u64 info2) {
    u32 cpu = rt_cpu();
    ghcb_set(g, GHCB_SW_EXIT_CODE, exit_code);
    ghcb_set(g, GHCB_SW_EXIT_INFO_1, info1);
    ghcb_set(g, GHCB_SW_EXIT_INFO_2, info2);
    *(volatile u16 *)(g + 0xFFA) = 2;   /* protocol version */
    *(volatile u32 *)(g + 0xFFC) = 0;   /* usage: the standard layout */
    if (!ghcb_msr_is_gpa[cpu]) {
        wrmsr(GHCB_MSR, (u64)g);
        ghcb_msr_is_gpa[cpu] = 1;
    }
    vmgexit();
    if ((u32)G64(g, GHCB_SW_EXIT_INFO_1)) sev_es_terminate(0, 0);  /* an error or an event: as Linux, give up */
}

static void ghcb_register(u32 cpu) {
    u64 gpa = (u64)ghcbs[cpu];
    u64 resp = ghcb_msr_call(0x012 | gpa);            /* register the GHCB GPA */
    if ((resp & 0xFFF) != 0x013 || (resp & ~0xFFFul) != gpa) sev_es_terminate(1, 0);
    u64 info = ghcb_msr_call(0x002);                  /* SEV information: the protocol range */
    if ((info & 0xFFF) != 0x001 || (info >> 48) < 2 || ((info >> 32) & 0xFFFF) > 2) sev_es_terminate(0, 1);
}

/* ---- the #VC handler --------------------------------------------------------------------------- */
struct vc_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 error, rip, cs, rflags, rsp, ss;
};

static void vc_ioio(struct vc_frame *f, u8 *g, const u8 *ip) {
    u32 i = 0, osz16 = 0, rep = 0;
    for (;; i++) {
        if (ip[i] == 0x66) osz16 = 1;
        else if (ip[i] == 0xF3) rep = 1;
        else break;
    }
    u8 op = ip[i];
    u32 len = i + 1, port = f->rdx & 0xFFFF, size = (op & 1) ? (osz16 ? 2 : 4) : 1;
    int in, str = 0;
    if (op >= 0xE4 && op <= 0xE7) {
        port = ip[i + 1];
        len++;
        in = !(op & 2);
    } else if (op >= 0xEC && op <= 0xEF) {
        in = !(op & 2);
    } else if (op >= 0x6C && op <= 0x6F) {
        str = 1;
        in = !(op & 2);
    } else {
        sev_es_terminate(0, 0);
    }
    u64 info = (u64)port << 16 | (size == 1 ? 0x10 : size == 2 ? 0x20 : 0x40) | 0x200 | (in ? 1 : 0);
    u64 mask = size == 4 ? 0xFFFFFFFFul : (1ul << (8 * size)) - 1;
    if (!str) {
        if (!in) ghcb_set(g, GHCB_RAX, f->rax & mask);
        ghcb_call(g, 0x7B, info, 0);
        if (in) f->rax = (f->rax & ~mask) | (ghcb_get(g, GHCB_RAX) & mask);
        f->rip += len;
        return;
    }
    u64 count = rep ? f->rcx : 1;
    while (count) {   /* through the GHCB's shared buffer, a bufferful at a time */
        u64 n = count < GHCB_SHARED_BUF_SIZE / size ? count : GHCB_SHARED_BUF_SIZE / size;
        ghcb_clear(g);
        ghcb_set(g, GHCB_SW_SCRATCH, (u64)g + GHCB_SHARED_BUF);
        if (!in) memcpy(g + GHCB_SHARED_BUF, (const void *)f->rsi, n * size);
        ghcb_call(g, 0x7B, info | 4 | (rep ? 8 : 0), n);
        if (in) {
            memcpy((void *)f->rdi, g + GHCB_SHARED_BUF, n * size);
            f->rdi += n * size;
        } else {
            f->rsi += n * size;
        }
        count -= n;
        if (rep) f->rcx = count;
    }
    f->rip += len;
}

/* MMIO (#VC 0x400: the NPF of a reserved-bit NPT entry): MOV r32/r64 <-> [reg], the forms MMIO
 * accessors compile to; the address is a guest-virtual one, identity mapped. */
static u64 *vc_reg(struct vc_frame *f, u32 n) {
    u64 *order[16] = {&f->rax, &f->rcx, &f->rdx, &f->rbx, &f->rsp, &f->rbp, &f->rsi, &f->rdi,
                      &f->r8, &f->r9, &f->r10, &f->r11, &f->r12, &f->r13, &f->r14, &f->r15};
    return order[n & 15];
}

static void vc_mmio(struct vc_frame *f, u8 *g, const u8 *ip) {
    u32 i = 0, rex = 0;
    if ((ip[0] & 0xF0) == 0x40) rex = ip[i++];
    u8 op = ip[i], modrm = ip[i + 1];
    if ((op != 0x8B && op != 0x89) || (modrm >> 6) != 0 || (modrm & 7) == 4 || (modrm & 7) == 5)
        sev_es_terminate(0, 0);
    u32 size = (rex & 8) ? 8 : 4;
    u64 *reg = vc_reg(f, ((modrm >> 3) & 7) | ((rex & 4) << 1));
    u64 gpa = *vc_reg(f, (modrm & 7) | ((rex & 1) << 3)) & ~rt_cmask;
    ghcb_set(g, GHCB_SW_SCRATCH, (u64)g + GHCB_SHARED_BUF);
    if (op == 0x89) {
        memcpy(g + GHCB_SHARED_BUF, reg, size);
        ghcb_call(g, 0x80000002ul, gpa, size);
    } else {
        ghcb_call(g, 0x80000001ul, gpa, size);
        u64 v = 0;
        memcpy(&v, g + GHCB_SHARED_BUF, size);
        *reg = v;   /* a 32-bit load zero-extends */
    }
    f->rip += i + 2;
}

void vc_handler(struct vc_frame *f);
void vc_handler(struct vc_frame *f) {
    u32 cpu = rt_cpu();
    u8 *g = ghcbs[cpu];
    const u8 *ip = (const u8 *)f->rip;
    vc_count[cpu]++;
    ghcb_clear(g);
    switch (f->error) {
    case 0x72: /* CPUID */
        ghcb_set(g, GHCB_RAX, f->rax & 0xFFFFFFFF);
        ghcb_set(g, GHCB_RCX, f->rcx & 0xFFFFFFFF);
        if ((u32)f->rax == 0xD) ghcb_set(g, GHCB_XCR0, 1);
        ghcb_call(g, 0x72, 0, 0);
        f->rax = ghcb_get(g, GHCB_RAX);
        f->rbx = ghcb_get(g, GHCB_RBX);
        f->rcx = ghcb_get(g, GHCB_RCX);
        f->rdx = ghcb_get(g, GHCB_RDX);
        f->rip += 2;
        break;
    case 0x7B: /* IOIO */
        vc_ioio(f, g, ip);
        break;
    case 0x7C: { /* MSR */
        int wr = ip[1] == 0x30;
        ghcb_set(g, GHCB_RCX, f->rcx & 0xFFFFFFFF);
        if (wr) {
            ghcb_set(g, GHCB_RAX, f->rax & 0xFFFFFFFF);
            ghcb_set(g, GHCB_RDX, f->rdx & 0xFFFFFFFF);
        }
        ghcb_call(g, 0x7C, wr, 0);
        if (!wr) {
            f->rax = ghcb_get(g, GHCB_RAX) & 0xFFFFFFFF;
            f->rdx = ghcb_get(g, GHCB_RDX) & 0xFFFFFFFF;
        }
        f->rip += 2;
        break;
    }
    case 0x81: /* VMMCALL */
        ghcb_set(g, GHCB_RAX, f->rax);
        ghcb_set(g, GHCB_RBX, f->rbx);
        ghcb_set(g, GHCB_RCX, f->rcx);
        ghcb_set(g, GHCB_RDX, f->rdx);
        g[0xCB] = 0;
        g[0x3F0 + 0xC8 / 64] |= 1u << ((0xC8 / 8) % 8);   /* cpl (0xCB) is in the quadword at 0xC8 */
        ghcb_call(g, 0x81, 0, 0);
        f->rax = ghcb_get(g, GHCB_RAX);
        f->rip += 3;
        break;
    case 0x400: /* NPF on a reserved-bit entry: MMIO */
        vc_mmio(f, g, ip);
        break;
    case 0x404: { /* SNP: a private page this guest never validated (the model gives its address in CR2) */
        u64 cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
        if (!rt_snp || pvalidate(cr2 & ~0xFFFul, 1)) sev_es_terminate(1, 2);
        snp_validated_on_demand++;
        break;                  /* the access runs again */
    }
    default:   /* an exit this runtime cannot handle: ask to be terminated, as Linux does */
        sev_es_terminate(0, 0);
    }
}

/* AP bring-up under SEV-ES: park in AP reset hold until the BSP publishes the AP jump table */
static void ap_reset_hold(void) {
    for (;;) {
        u64 resp = ghcb_msr_call(0x006);
        if ((resp & 0xFFF) == 0x007 && (resp >> 12)) return;
    }
}

static u64 ap_jump_table(u32 op, u64 address) {
    u8 *g = ghcb_page();
    ghcb_clear(g);
    ghcb_call(g, 0x80000005ul, op, address);
    return op ? ghcb_get(g, GHCB_SW_EXIT_INFO_2) : 0;
}

/* ---- SEV-SNP: page states ---------------------------------------------------------------------- */
int sev_snp_active(void) { return rt_snp; }

/* GHCB MSR protocol page-state change of one 4 KiB page (GHCB 56421 2.3.1): op 1 private, 2 shared */
static void snp_psc_msr(u64 gpa, u64 op) {
    u64 resp = ghcb_msr_call(0x014 | (gpa & ~0xFFFul) | op << 52);
    if ((resp & 0xFFF) != 0x015 || (resp >> 32)) sev_es_terminate(1, 1);   /* Linux: GHCB_TERM_PSC */
}

/* PVALIDATE (F2 0F 01 FF): RAX = address, ECX = size (0: 4 KiB), EDX = validate; EAX the result */
static u32 pvalidate(u64 va, u32 validate) {
    u32 rc;
    __asm__ volatile(".byte 0xf2, 0x0f, 0x01, 0xff" : "=a"(rc) : "a"(va), "c"(0), "d"(validate) : "memory", "cc");
    return rc;
}

void snp_make_private(u64 gpa) {            /* page-state change to private, then validate */
    snp_psc_msr(gpa, 1);
    if (pvalidate(gpa, 1)) sev_es_terminate(1, 2);                              /* GHCB_TERM_PVALIDATE */
}

void snp_make_shared(u64 gpa) {             /* rescind the validation, then the page-state change */
    if (pvalidate(gpa, 0)) sev_es_terminate(1, 2);
    snp_psc_msr(gpa, 2);
}

static void rt_cpu_init(void) {
    idt_init();
    u64 status = rdmsr(SEV_STATUS_MSR);
    rt_es = (status & 2) != 0;
    rt_snp = (status & 4) != 0;                 /* SEV_FEATURES bit 0: SNP active */
    if (rt_snp && rt_cpu() == 0) {
        /* the VMM left the shared pages (GHCBs, bounce buffer) out of the launch: they are the
         * hypervisor's in the RMP and never validated; the guest asks for them shared before use */
        for (u64 gpa = (u64)__shared_start; gpa < (u64)__shared_end; gpa += PAGE_SIZE) snp_psc_msr(gpa, 2);
    }
    if (rt_es) ghcb_register(rt_cpu());
}

static void ap_entry(u32 cpu) { ap_main(cpu); }

/* ---- SEV-SNP: AP creation (GHCB 56421 4.1.9; Linux arch/x86/coco/sev wakeup_cpu_via_vmgexit) -------
 * The host cannot set an SNP vCPU's registers, so the BSP writes each AP's VMSA into a private page of
 * its own -- 64-bit mode, this vCPU's page tables, the AP's stack with rt_done as the return address,
 * RIP = rt_start(cpu, ncpus, cmask) -- gives the page the VMSA bit with RMPADJUST (target VMPL1, no
 * permissions) and asks for the AP with the GHCB's AP Creation event (RAX: the SEV_FEATURES, which
 * the hypervisor checks against the VM's).  One spare page: the hypervisor refuses a 2 MiB-aligned
 * VMSA. */
static u8 snp_vmsa_pages[MAX_VCPUS + 1][PAGE_SIZE] __attribute__((aligned(4096)));
extern char rt_done[];
void rt_start(u32 cpu, u32 ncpus, u64 cmask);

/* RMPADJUST (F3 0F 01 FE): RAX = address, ECX = size, EDX = target VMPL | perms << 8 | VMSA << 16 */
static u32 rmpadjust(u64 va, u64 attrs) {
    u32 rc;
    __asm__ volatile(".byte 0xf3, 0x0f, 0x01, 0xfe" : "=a"(rc) : "a"(va), "c"(0), "d"(attrs) : "memory", "cc");
    return rc;
}

#define VMSA_SEG(v, off, sel, attr, lim, base) do { \
    *(u16 *)((v) + (off)) = (sel); *(u16 *)((v) + (off) + 2) = (attr); \
    *(u32 *)((v) + (off) + 4) = (lim); *(u64 *)((v) + (off) + 8) = (base); } while (0)
#define VMSA_Q(v, off) (*(u64 *)((v) + (off)))

static void snp_create_ap(u32 cpu, u32 ncpus) {
    u8 *vmsa = snp_vmsa_pages[cpu];
    if (!((u64)vmsa & 0x1FFFFF)) vmsa = snp_vmsa_pages[MAX_VCPUS];       /* never 2 MiB aligned */
    for (u32 i = 0; i < PAGE_SIZE; i += 8) VMSA_Q(vmsa, i) = 0;
    u64 cr0, cr3, cr4;
    u16 cs;
    struct { u16 limit; u64 base; } __attribute__((packed)) gdtr;
    __asm__ volatile("mov %%cr0, %0; mov %%cr3, %1; mov %%cr4, %2; mov %%cs, %3; sgdt %4"
                     : "=r"(cr0), "=r"(cr3), "=r"(cr4), "=r"(cs), "=m"(gdtr));
    for (u32 off = 0x00; off <= 0x50; off += 0x10)                       /* ES CS SS DS FS GS (APM2 B-4) */
        VMSA_SEG(vmsa, off, 0x10, 0xC93, 0xFFFFFFFF, 0);
    VMSA_SEG(vmsa, 0x10, cs, 0xA9B, 0xFFFFFFFF, 0);                       /* CS: 64-bit code */
    VMSA_SEG(vmsa, 0x60, 0, 0, gdtr.limit, gdtr.base);                   /* GDTR */
    VMSA_SEG(vmsa, 0x70, 0, 0x82, 0xFFFF, 0);                             /* LDTR */
    VMSA_SEG(vmsa, 0x90, 0, 0x8B, 0xFFFF, 0);                             /* TR */
    u64 *stack = (u64 *)(boot_stacks + (cpu + 1) * STACK_SIZE) - 1;
    *stack = (u64)rt_done;                                                /* rt_start returns there */
    VMSA_Q(vmsa, 0xD0) = 0x1500;                                          /* EFER: SVME LMA LME */
    VMSA_Q(vmsa, 0x148) = cr4;
    VMSA_Q(vmsa, 0x150) = cr3;
    VMSA_Q(vmsa, 0x158) = cr0;
    VMSA_Q(vmsa, 0x160) = 0x400;                                          /* DR7 */
    VMSA_Q(vmsa, 0x168) = 0xFFFF0FF0;                                     /* DR6 */
    VMSA_Q(vmsa, 0x170) = 2;                                              /* RFLAGS */
    VMSA_Q(vmsa, 0x178) = (u64)rt_start;                                  /* RIP */
    VMSA_Q(vmsa, 0x1D8) = (u64)stack;                                     /* RSP */
    VMSA_Q(vmsa, 0x268) = 0x0007040600070406ul;                           /* G_PAT */
    VMSA_Q(vmsa, 0x338) = cpu;                                            /* RDI */
    VMSA_Q(vmsa, 0x330) = ncpus;                                          /* RSI */
    VMSA_Q(vmsa, 0x310) = rt_cmask;                                       /* RDX */
    u64 features = rdmsr(SEV_STATUS_MSR) >> 2;                            /* SEV_STATUS[n+2] = SEV_FEATURES[n] */
    VMSA_Q(vmsa, 0x3B0) = features;
    VMSA_Q(vmsa, 0x3E8) = 1;                                              /* XCR0: x87 */
    if (rmpadjust((u64)vmsa, 1 | 1ul << 16)) sev_es_terminate(1, 2);      /* VMPL1, VMSA bit */
    u8 *g = ghcb_page();
    ghcb_clear(g);
    ghcb_set(g, GHCB_RAX, features);
    ghcb_call(g, 0x80000013ul, (u64)cpu << 32 | 1, (u64)vmsa);            /* AP CREATE, APIC ID = cpu */
    snp_aps_created++;
}

int sev_active(void) { return rt_cmask != 0; }

int cbit_position(void) {
    for (int i = 0; i < 64; i++)
        if (rt_cmask == (1ul << i)) return i;
    return -1;
}

struct bounce *bounce_page(void) { return &shared_bounce; }

__attribute__((weak)) void ap_main(u32 cpu) { (void)cpu; }

void rt_start(u32 cpu, u32 ncpus, u64 cmask) {
    rt_cpu_init();
    if (cpu == 0) {
        rt_cmask = cmask;
        rt_ncpus = ncpus ? ncpus : 1;
        /* An SEV guest tells the host which pages it shares (KVM_HC_MAP_GPA_RANGE, attrs 0). */
        if (cmask) {
            u64 pages = (u64)(__shared_end - __shared_start) / PAGE_SIZE;
            vmmcall(KVM_HC_MAP_GPA_RANGE, (u64)__shared_start, pages, 0);
        }
        if (rt_snp)                                                    /* SNP: the BSP makes its APs */
            for (u32 c = 1; c < rt_ncpus; c++) snp_create_ap(c, rt_ncpus);
        else if (rt_es && rt_ncpus > 1) ap_jump_table(0, (u64)ap_entry);  /* releases the parked APs */
        main();
    } else if (rt_es && !rt_snp) {
        ap_reset_hold();
        ((void (*)(u32))ap_jump_table(1, 0))(cpu);
    } else {
        ap_main(cpu);
    }
    /* An SEV-ES vCPU parks in AP reset hold for good (its RIP is not the host's to see); the
     * others go back to the boot stub, which halts at rt_done for good. */
    if (rt_es)
        for (;;) ghcb_msr_call(0x006);
}

/* ---- console ---------------------------------------------------------------------------------- */
void putc(char c) { outb(COM1, (u8)c); }

/* n bytes to the console: under SEV-ES one string OUT (one #VC, the bytes in the GHCB's buffer)
 * instead of one #VC per byte */
static void console_write(const char *s, size_t n) {
    if (rt_es && n > 1) {
        __asm__ volatile("rep outsb" : "+S"(s), "+c"(n) : "d"((u16)COM1) : "memory");
        return;
    }
    while (n--) putc(*s++);
}

void puts(const char *s) {
    spin_lock(&console_lock);
    console_write(s, strlen(s));
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

struct outbuf {
    char b[128];
    size_t n;
};

static void emit(struct outbuf *o, char c) {
    if (o->n == sizeof o->b) {
        console_write(o->b, o->n);
        o->n = 0;
    }
    o->b[o->n++] = c;
}

void kprintf(const char *fmt, ...) {
    __builtin_va_list ap;
    char buf[32];
    struct outbuf ob = {{0}, 0};
    __builtin_va_start(ap, fmt);
    spin_lock(&console_lock);
    for (const char *p = fmt; *p; p++) {
        if (*p != '%') {
            emit(&ob, *p);
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
        for (int n = (int)strlen(s); n < width; n++) emit(&ob, pad);
        while (*s) emit(&ob, *s++);
    }
    console_write(ob.b, ob.n);
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
