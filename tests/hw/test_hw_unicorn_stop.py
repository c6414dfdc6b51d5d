"""Unicorn 2.1.4's stop semantics that the engine's time slices and fill-hook stops depend on
(issue 13: SNP runs of OVMF decompressing a wrong PEI volume).

Unicorn checks for a pending stop after every guest load and store (``check_exit_request`` in
``tcg_gen_qemu_st_*``) and, when one is pending, leaves with RIP restored to the *start* of the
instruction -- after its store.  Resuming there runs a read-modify-write such as ``addq $1,(m)``
a second time.  A stop requested from a hook at the start of a translated block lands before any
instruction of the block and repeats nothing.  Plain 64-bit code on bare Unicorn, no sevemu code.
"""

from __future__ import annotations

import pytest

unicorn = pytest.importorskip("unicorn")
from unicorn import x86_const

N = 1000
# 1: addq $1,0x2000; incq %rbx; cmpq $N,%rbx; jb 1b; hlt
CODE = bytes.fromhex("4883042500200000" "01" "48ffc3" "4881fb") + N.to_bytes(4, "little") + bytes.fromhex("72eb" "f4")
END = 0x1000 + len(CODE)


def _run(stop_in_block_hook: bool) -> int:
    mu = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    mu.mem_map(0x1000, 0x2000)
    mu.mem_write(0x1000, CODE)
    writes = [0]
    pending = [False]

    def on_write(uc: object, access: int, addr: int, size: int, value: int, user: object) -> None:
        writes[0] += 1
        if writes[0] == N // 2:  # a stop asked for during the add's store (as the engine's fill hook does)
            if stop_in_block_hook:
                pending[0] = True
            else:
                mu.emu_stop()

    def on_block(uc: object, addr: int, size: int, user: object) -> None:
        if pending[0]:
            pending[0] = False
            mu.emu_stop()

    mu.hook_add(unicorn.UC_HOOK_MEM_WRITE, on_write)
    if stop_in_block_hook:
        mu.hook_add(unicorn.UC_HOOK_BLOCK, on_block)
    rip = 0x1000
    for _ in range(10):
        mu.emu_start(rip, END)
        rip = mu.reg_read(x86_const.UC_X86_REG_RIP)
        if rip >= END - 1:
            break
    return int.from_bytes(mu.mem_read(0x2000, 8), "little")


def test_a_stop_pending_at_a_store_repeats_the_read_modify_write() -> None:
    """The hazard: the add whose store saw the stop runs again (the counter is one too high)."""
    assert _run(stop_in_block_hook=False) == N + 1


def test_a_stop_taken_at_a_block_start_repeats_nothing() -> None:
    """The remedy: the stop request is a flag a block hook turns into ``uc_emu_stop``."""
    assert _run(stop_in_block_hook=True) == N
