"""The x86 reset state on the Unicorn engine (hw/uc/reset.py): real mode, CS base 0xFFFF0000, RIP 0xFFF0,
loaded by the engine's first VMRUN; then protected mode by a far jump, as firmware reset vectors do."""

from __future__ import annotations

import pytest

from sevemu._util.units import GiB
from sevemu.hw.svm import Segment as HwSegment
from sevemu.hw.ucengine import UcEngine, check_vmcb_state
from sevemu.hypervisor.vm import VmKind, VmState
from sevemu.scenario import build_machine

pytest.importorskip("unicorn")

TOP = 4 * GiB - 0x1000  # the last page below 4 GiB: the "flash"


def _flash() -> bytes:
    page = bytearray(0x1000)
    # 16-bit code at 0xFFFFFF00 (CS base 0xFFFF0000 + 0xFF00):
    #   mov si, 0x1234 ; o32 lgdt cs:[0xFF80] ; mov eax, cr0 ; or al, 1 ; mov cr0, eax ;
    #   jmp dword 0x08:0xFFFFFF40
    code16 = bytes.fromhex("be3412" "2e66" "0f011680ff" "0f20c0" "0c01" "0f22c0" "66ea40ffffff0800")
    page[0xF00 : 0xF00 + len(code16)] = code16
    # 32-bit code at 0xFFFFFF40: mov ebx, 0xC0DE ; hlt
    page[0xF40 : 0xF46] = bytes.fromhex("bbdec00000f4")
    # GDT at 0xFFFFFF60: null, flat 32-bit code (0x08); GDTR at 0xFFFFFF80 (limit, base)
    page[0xF60 : 0xF70] = bytes(8) + bytes.fromhex("ffff0000009acf00")
    page[0xF80 : 0xF86] = (15).to_bytes(2, "little") + (0xFFFFFF60).to_bytes(4, "little")
    # the reset vector at 0xFFFFFFF0: jmp near 0xFF00 (16-bit: E9 rel16)
    page[0xFF0 : 0xFF3] = bytes.fromhex("e90dff")
    return bytes(page)


@pytest.mark.parametrize("kind", [VmKind.PLAIN, VmKind.SEV])
def test_the_first_instruction_is_at_the_reset_vector_and_the_far_jump_enters_protected_mode(kind: VmKind) -> None:
    m = build_machine("milan", seed="uc-reset")
    vm = m.hv.create_vm("reset", 4 * GiB, kind)
    eng = UcEngine(name="reset")
    v = vm.add_vcpu(eng)  # the x86 reset state (hypervisor/vcpu.py)
    v.vmcb.segments = {n: HwSegment(s.selector, s.attrib, s.limit, s.base) for n, s in v.arch.segments.items()}
    assert v.vmcb.cr0 & 1 == 0 and v.vmcb.rip == 0xFFF0 and v.vmcb.segments["cs"].base == 0xFFFF_0000
    assert check_vmcb_state(v.vmcb) is None
    m.hv.launch(vm, [(TOP, _flash())])
    r = m.hv.run(vm, 0)
    assert r.reason == "hlt", (r, vm.crash_reason, eng.crash)
    assert v.vmcb.regs["rsi"] & 0xFFFF == 0x1234  # the 16-bit code ran from the top of the flash
    assert v.vmcb.regs["rbx"] == 0xC0DE and v.vmcb.cr0 & 1  # and its far jump reached 32-bit protected mode
    assert v.vmcb.rip == 0xFFFF_FF46
    m.hv.destroy(vm)


def test_real_mode_without_its_code_segment_is_refused() -> None:
    m = build_machine("milan", seed="uc-reset-bad")
    vm = m.hv.create_vm("reset", 4 * GiB, VmKind.PLAIN)
    eng = UcEngine(name="reset")
    v = vm.add_vcpu(eng)
    v.vmcb.segments = {}
    assert "code segment" in (check_vmcb_state(v.vmcb) or "")
    m.hv.launch(vm, [(TOP, _flash())])
    m.hv.run(vm, 0)
    assert vm.state is VmState.CRASHED and "VMEXIT_INVALID" in (vm.crash_reason or "")
    assert "code segment" in (eng.crash or "")
