"""Real guest code as SEV-ES guests: registers in the encrypted VMSA, exits through the GHCB and #VC
(issue 10).  The same images as plain VMs and SEV guests, the same output; what the hypervisor can
no longer read or write; a tampered VMSA never runs; malformed GHCBs end in the guest's termination.

Needs gcc and binutils; without them every test here is skipped with the reason.
"""

from __future__ import annotations

import pytest

from sevemu.cli.run import FORGED_R12, GuestRun, launch_guest, register_attack, vmsa_tamper
from sevemu.errors import InputError
from sevemu.guest.build import build_guest
from sevemu.hypervisor.vm import VmState

pytest.importorskip("unicorn")
pytestmark = pytest.mark.usefixtures("guest_builds")




def _run(guest: str, mode: str, vcpus: int = 1, **kw: object) -> tuple[GuestRun, str, str]:
    run = launch_guest(build_guest(guest), mode=mode, vcpus=vcpus, seed=f"es-{guest}")
    try:
        out = run.run(timeout=60, **kw)  # type: ignore[arg-type]
    finally:
        run.close()
    return run, out.status, out.console


@pytest.mark.parametrize("guest,vcpus", [("hello", 1), ("secret", 1), ("shared", 1), ("smp", 4), ("regs", 1)])
def test_same_image_same_output_as_plain_and_sev(guest: str, vcpus: int) -> None:
    outputs = {}
    for mode in ("plain", "sev", "sev-es"):
        run, status, console = _run(guest, mode, vcpus)
        assert status == "finished", (mode, console)
        outputs[mode] = console
    if guest == "smp":  # the vCPUs print in the order they get there
        outputs = {k: sorted(v.splitlines()) for k, v in outputs.items()}  # type: ignore[misc]
    assert outputs["sev-es"] == outputs["plain"] == outputs["sev"]
    es = run.vm
    assert es.es and all(v.guest_state_protected and v.vmcb.vmsa_pa for v in es.vcpus)
    # every exit the hypervisor saw was automatic: VMGEXIT, HLT, NPF, INTR -- never CPUID, IOIO, MSR
    seen = set().union(*(v.exits for v in es.vcpus))
    assert seen <= {"VMGEXIT", "HLT", "NPF", "INTR"}, seen
    assert "VMGEXIT" in seen


def test_sevinfo_reports_sev_es_and_the_measurement_covers_the_vmsas() -> None:
    from sevemu.cli.run import _launch_info

    run = launch_guest(build_guest("sevinfo"), mode="sev-es", vcpus=2, seed="es-info")
    try:
        info = _launch_info(run)
        assert info["mode"] == "sev-es" and info["measurement_verified"] is True
        out = run.run(timeout=60)
    finally:
        run.close()
    assert out.status == "finished"
    assert "SEV_STATUS MSR: 3 (memory encryption active, SEV-ES" in out.console
    assert "C-bit (bit 51)" in out.console  # learned through the GHCB MSR protocol's SEV information


def test_register_attack_works_under_sev_and_not_under_sev_es() -> None:
    results = {}
    for mode in ("sev", "sev-es"):
        log: list[str] = []
        _, status, console = _run("regs", mode, on_halt=register_attack(quiet=True, log=log))
        assert status == "finished"
        results[mode] = (console, log)
    sev_console, sev_log = results["sev"]
    es_console, es_log = results["sev-es"]
    # plain SEV: the key sits in the VMCB at the exit, the host's write lands in the guest's R12
    assert "R12 in the VMCB = 0xf75d451849412abb" in sev_log[0]
    assert "was CHANGED by the host" in sev_console
    # SEV-ES: the VMCB holds nothing of the guest's, the write changes nothing, the VMSA is ciphertext
    assert "R12 in the VMCB = 0x0000000000000000" in es_log[0]
    assert "key in R12 survived the exit" in es_console
    vmsa_line = es_log[-1]
    assert "VMSA page in DRAM" in vmsa_line and "bb2a414918455df7" not in vmsa_line  # the key's bytes
    # CPUID stays the host's to answer in both (SNP's CPUID page is what validates it)
    assert "CPUID(0).EAX = 1337" in sev_console and "CPUID(0).EAX = 1337" in es_console
    assert FORGED_R12 != 0xF75D451849412ABB


def test_the_vmsa_holds_the_registers_encrypted_and_a_flipped_bit_stops_vmrun() -> None:
    run = launch_guest(build_guest("regs"), mode="sev-es", seed="es-tamper")
    try:
        out = run.run(timeout=60, on_halt=vmsa_tamper(quiet=True))
    finally:
        run.close()
    assert out.status == "crashed"
    assert "VMEXIT_INVALID" in out.reason
    assert out.rip is None  # an SEV-ES guest's RIP is not the host's to report
    assert "survived" not in out.console  # the guest never ran again


def test_tmr_checksum_tamper_stops_vmrun() -> None:
    run = launch_guest(build_guest("regs"), mode="sev-es", seed="es-tmr")
    hv = run.machine.hv

    def tamper(r: GuestRun, vcpu: int) -> bool:
        # the checksum block the page names (it is set up by the firmware; the host finds it in the
        # decrypted-by-nobody ciphertext only by guessing, so it writes over the whole TMR half)
        for off in range(hv.tmr_spa + (1 << 19), hv.tmr_spa + (1 << 19) + 64, 8):
            hv.core.host_write(off, bytes(8))
            hv.core.clflush(off)
        return True

    try:
        out = run.run(timeout=60, on_halt=tamper)
    finally:
        run.close()
    assert out.status == "crashed" and "VMEXIT_INVALID" in out.reason


def test_malformed_ghcbs_get_ghcb_errors_then_the_guest_terminates() -> None:
    run, status, console = _run("ghcbbad", "sev-es")
    assert status == "crashed"
    assert "ghcbbad: usage 1 -> SW_EXITINFO1 2 SW_EXITINFO2 2" in console  # GHCB_ERR_INVALID_USAGE
    assert "ghcbbad: no RAX for OUT -> SW_EXITINFO1 2 SW_EXITINFO2 4" in console  # GHCB_ERR_MISSING_INPUT
    assert "ghcbbad: exit code 0x1234 -> SW_EXITINFO1 2 SW_EXITINFO2 6" in console  # GHCB_ERR_INVALID_EVENT
    assert run.vm.state is VmState.CRASHED and run.vm.termination == (0, 0)
    assert "reason set 0, code 0 (general request)" in (run.vm.crash_reason or "")
    assert [e.split(":")[0] for e in run.vm.vcpus[0].ghcb_errors] == ["INVALID_USAGE", "MISSING_INPUT",
                                                                       "INVALID_EVENT"]


def test_mmio_through_a_reserved_bit_npt_entry_is_vc_0x400() -> None:
    run, status, console = _run("mmio", "sev-es")
    assert status == "finished", console
    assert "wrote c0ffee, read back c0ffee; wrote 1122334455667788, read back 1122334455667788" in console
    assert bytes(run.vm.mmio[0xF00000][:4]) == (0xC0FFEE).to_bytes(4, "little")
    assert "MMIO" not in str(run.vm.vcpus[0].exits)  # the hypervisor saw VMGEXITs, not the accesses


def test_smp_aps_start_through_the_ap_jump_table() -> None:
    run, status, _console = _run("smp", "sev-es", vcpus=3)
    assert status == "finished"
    assert run.vm.ap_jump_table == run.image.symbol("ap_entry")
    assert all(v.released for v in run.vm.vcpus[1:]) and not run.vm.vcpus[0].released


def test_sev_es_mode_refusals() -> None:
    with pytest.raises(InputError, match="unknown mode"):
        launch_guest(build_guest("hello"), mode="es")
