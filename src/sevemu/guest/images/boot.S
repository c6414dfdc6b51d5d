/* sevemu guest boot stub: from the defined initial state to C, in long mode.
 *
 * Initial state (docs/cpu-engine.md): 32-bit protected mode, flat segments, paging off, interrupts
 * off, no IDT; EIP = _start (the first byte of the image, GPA 1 MiB); ESI = vCPU index, EDI = vCPU
 * count.  With paging off every access of an SEV guest is private, so the page tables built here
 * are written with the guest's key.
 *
 * 1. RDMSR SEV_STATUS (never intercepted): bit 0 = memory encryption active.  If so, CPUID
 *    Fn8000_001F EBX[5:0] gives the C-bit position -- for an SEV-ES guest (bit 1), whose CPUID
 *    would raise #VC before any IDT exists, the GHCB MSR protocol's SEV information request does
 *    (GHCB 56421 2.3.1; a bad answer terminates the guest, reason set 0 code 0).  A plain VM uses
 *    no C-bit: the same image runs either way.
 * 2. Page tables: identity map of the first GiB with 2 MiB pages, C-bit set in every entry; the
 *    2 MiB region holding the shared page(s) gets a 4 KiB table in which those pages have C = 0.
 *    A and D are preset so the page walker never has to write them.
 * 3. CR4.PAE, CR3, EFER.LME, CR0.PG, then a far jump to the 64-bit code segment; a stack per
 *    vCPU; rt_start(cpu, ncpus, cbit_mask).  When it returns the vCPU halts at rt_done for good
 *    (every other HLT means "host, your turn": see the bounce buffer in rt.h).
 */
#define SEV_STATUS 0xC0010131
#define GHCB_MSR   0xC0010130
#define VMGEXIT    .byte 0xf3, 0x0f, 0x01, 0xd9   /* rep; vmmcall */
#define EFER       0xC0000080
#define MAX_VCPUS  8
#define STACK_SIZE 16384
#define PTE_TABLE  0x23         /* P | RW | A */
#define PTE_4K     0x63         /* P | RW | A | D */
#define PTE_2M     0x1E3        /* P | RW | A | D | PS */

    .section .text.boot, "ax"
    .code32
    .globl _start
_start:
    cli
    /* 1. memory encryption? (%ebp: C-bit mask bits 63:32, %edx below for bits 31:0) */
    mov     $SEV_STATUS, %ecx
    rdmsr
    xor     %ebp, %ebp
    movl    $0, boot_cmask_lo
    test    $1, %eax
    jz      2f
    test    $2, %eax                    /* SEV-ES: CPUID would be a #VC, and there is no IDT yet */
    jz      7f
    mov     $GHCB_MSR, %ecx             /* GHCB MSR protocol: SEV information request */
    mov     $0x002, %eax
    xor     %edx, %edx
    wrmsr
    VMGEXIT
    rdmsr
    mov     %eax, %ebx
    and     $0xFFF, %ebx
    cmp     $0x001, %ebx                /* SEV information response */
    jne     boot_terminate
    mov     %eax, %ebx
    shr     $24, %ebx                   /* the C-bit position */
    jmp     8f
7:  mov     $0x8000001F, %eax
    xor     %ecx, %ecx
    cpuid
8:  mov     %ebx, %ecx
    and     $0x3F, %ecx
    cmp     $32, %ecx
    jb      1f
    sub     $32, %ecx
    mov     $1, %ebp
    shl     %cl, %ebp
    jmp     2f
1:  mov     $1, %eax
    shl     %cl, %eax
    mov     %eax, boot_cmask_lo
2:  mov     %ebp, boot_cmask_hi

    /* 2. page tables */
    xor     %ecx, %ecx
3:  mov     %ecx, %eax
    shl     $21, %eax
    or      $PTE_2M, %eax
    or      boot_cmask_lo, %eax
    mov     %eax, pt_pd(,%ecx,8)
    mov     %ebp, pt_pd+4(,%ecx,8)
    inc     %ecx
    cmp     $512, %ecx
    jne     3b

    mov     $__shared_start, %eax
    shr     $21, %eax                   /* PD index of the shared region */
    mov     $pt_pt, %edx
    or      $PTE_TABLE, %edx
    or      boot_cmask_lo, %edx
    mov     %edx, pt_pd(,%eax,8)
    shl     $21, %eax                   /* base of the 2 MiB region */
    xor     %ecx, %ecx
4:  mov     %ecx, %edx
    shl     $12, %edx
    add     %eax, %edx                  /* the page's address */
    mov     %edx, %ebx
    or      $PTE_4K, %ebx
    cmp     $__shared_start, %edx
    jb      5f
    cmp     $__shared_end, %edx
    jae     5f
    mov     %ebx, pt_pt(,%ecx,8)        /* shared: C = 0 */
    movl    $0, pt_pt+4(,%ecx,8)
    jmp     6f
5:  or      boot_cmask_lo, %ebx
    mov     %ebx, pt_pt(,%ecx,8)        /* private: C = 1 */
    mov     %ebp, pt_pt+4(,%ecx,8)
6:  inc     %ecx
    cmp     $512, %ecx
    jne     4b

    mov     $pt_pd, %eax
    or      $PTE_TABLE, %eax
    or      boot_cmask_lo, %eax
    mov     %eax, pt_pdpt
    mov     %ebp, pt_pdpt+4
    mov     $pt_pdpt, %eax
    or      $PTE_TABLE, %eax
    or      boot_cmask_lo, %eax
    mov     %eax, pt_pml4
    mov     %ebp, pt_pml4+4

    /* 3. long mode */
    mov     %cr4, %eax
    or      $0x20, %eax                 /* PAE */
    mov     %eax, %cr4
    mov     $pt_pml4, %eax
    mov     %eax, %cr3
    mov     $EFER, %ecx
    rdmsr
    or      $0x100, %eax                /* LME */
    wrmsr
    mov     %cr0, %eax
    or      $0x80000000, %eax           /* PG: long mode is active from here (compatibility mode) */
    mov     %eax, %cr0
    lgdt    gdt_desc
    ljmp    $0x08, $long_mode

    .code64
long_mode:
    mov     $0x10, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    mov     %eax, %fs
    mov     %eax, %gs
    mov     %esi, %eax
    cmp     $MAX_VCPUS, %eax
    jae     rt_done
    inc     %eax
    imul    $STACK_SIZE, %eax
    lea     boot_stacks(%rax), %rsp
    mov     %edi, %eax                  /* rt_start(cpu, ncpus, cmask) */
    mov     %esi, %edi
    mov     %eax, %esi
    mov     boot_cmask_hi(%rip), %edx
    shl     $32, %rdx
    mov     boot_cmask_lo(%rip), %eax
    or      %rax, %rdx
    call    rt_start
    .globl  rt_done
rt_done:                                /* the guest is finished: the host sees HLT here */
    hlt
    jmp     rt_done

    .code32
boot_terminate:                         /* GHCB MSR protocol: terminate, reason set 0, code 0 */
    mov     $GHCB_MSR, %ecx
    mov     $0x100, %eax
    xor     %edx, %edx
    wrmsr
    VMGEXIT
    hlt
    jmp     boot_terminate

    /* #VC (vector 29): save the GPRs, vc_handler(struct vc_frame *), restore, drop the error code */
    .code64
    .globl  vc_entry
vc_entry:
    push    %rax
    push    %rbx
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    push    %rbp
    push    %r8
    push    %r9
    push    %r10
    push    %r11
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    mov     %rsp, %rdi
    sub     $8, %rsp                    /* the ABI's 16-byte alignment at the call */
    call    vc_handler
    add     $8, %rsp
    pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %r11
    pop     %r10
    pop     %r9
    pop     %r8
    pop     %rbp
    pop     %rdi
    pop     %rsi
    pop     %rdx
    pop     %rcx
    pop     %rbx
    pop     %rax
    add     $8, %rsp                    /* the error code */
    iretq

    .section .rodata
    .p2align 4
gdt:
    .quad   0
    .quad   0x00AF9A000000FFFF          /* 0x08: 64-bit code, DPL 0 */
    .quad   0x00CF92000000FFFF          /* 0x10: flat data */
gdt_end:
gdt_desc:
    .word   gdt_end - gdt - 1
    .long   gdt

    .section .data
    .p2align 3
    .globl boot_cmask_lo, boot_cmask_hi
boot_cmask_lo:  .long 0
boot_cmask_hi:  .long 0

    .section .pagetables, "aw", @nobits
    .p2align 12
    .globl pt_pml4, pt_pdpt, pt_pd, pt_pt
pt_pml4:    .skip 4096
pt_pdpt:    .skip 4096
pt_pd:      .skip 4096
pt_pt:      .skip 4096

    .section .stacks, "aw", @nobits
    .p2align 12
    .globl  boot_stacks
boot_stacks:
    .skip   MAX_VCPUS * STACK_SIZE
