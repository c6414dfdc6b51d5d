"""Guest images from source (guest/build.py) running on the Unicorn engine: what the hypervisor can
and cannot do to real guest code, plain VM against SEV guest.

Needs gcc and binutils; without them every test here is skipped with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sevemu.cli.run import GuestRun, launch_guest, load_image, run_guest
from sevemu.errors import GuestBuildError
from sevemu.guest.build import GUESTS, build_guest, build_source, images_dir, toolchain
from sevemu.hw.dram import ColdBootImage
from sevemu.owner.measurement import expected_launch_digest, verify_measurement

pytest.importorskip("unicorn")
pytestmark = pytest.mark.usefixtures("guest_builds")

M64 = (1 << 64) - 1
# x86-64: lea msg(%rip),%rsi; mov $0x3f8,%dx; 1: lodsb; test %al,%al; jz 2f; out %al,%dx; jmp 1b;
# 2: hlt; jmp 2b; msg: "PWNED..."
SHELLCODE = bytes.fromhex("488d350f00000066baf803ac84c07403eeebf8f4ebfd") + b"PWNED by the hypervisor\n\0"




# ---- the secret guest's computation, written independently in Python ------------------------------
def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def _secret_key() -> list[int]:
    s, key = 0x5345564D55534543, []
    for _ in range(512):
        s, v = _splitmix64(s)
        key.append(v)
    return key


def _secret_mac(key: list[int]) -> int:
    msg = b"attack at dawn; bring the launch codes"
    h = 0xCBF29CE484222325
    for rnd in range(64):
        for i, ch in enumerate(msg):
            h ^= ch ^ key[(h + i + rnd) & 511]
            h = (h * 0x100000001B3) & M64
            h = ((h << 13) | (h >> 51)) & M64
    return h


# ---- building ------------------------------------------------------------------------------------
def test_every_bundled_guest_builds_and_is_cached() -> None:
    for name in GUESTS:
        img = build_guest(name)
        assert img.entry == img.base == 0x100000
        assert len(img.data) % 4096 == 0
        for sym in ("main", "rt_done", "__shared_start", "pt_pml4"):
            assert sym in img.symbols
        again = build_guest(name)
        assert again.path == img.path and again.digest == img.digest  # from the cache


def test_a_guest_that_does_not_build_is_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "broken.c"
    src.write_text('#include "rt.h"\nint main(void) { return undefined_thing; }\n')
    with pytest.raises(GuestBuildError, match="compiling broken.c failed"):
        build_source(src)
    with pytest.raises(GuestBuildError, match="does not exist"):
        build_source(tmp_path / "missing.c")
    with pytest.raises(GuestBuildError, match="no bundled guest"):
        build_guest("nosuchguest")


def test_a_missing_compiler_is_a_clear_error() -> None:
    with pytest.raises(GuestBuildError, match="not found"):
        toolchain(cc="sevemu-no-such-compiler")


def test_a_user_guest_source_builds_with_the_runtime(tmp_path: Path) -> None:
    src = tmp_path / "mine.c"
    src.write_text('#include "rt.h"\nint main(void) { kprintf("mine: %d\\n", 6 * 7); return 0; }\n')
    out = run_guest(load_image(str(src)), "sev", seed="u")
    assert out.status == "finished" and out.console == "mine: 42\n"
    assert (images_dir() / "rt.h").is_file()


def test_an_image_larger_than_guest_memory_is_refused_before_anything_runs() -> None:
    img = build_guest("hello")
    with pytest.raises(GuestBuildError, match="more than the VM"):
        launch_guest(img, memory=1 << 20)


# ---- running -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["plain", "sev"])
def test_hello_prints(mode: str) -> None:
    out = run_guest("hello", mode, seed="h")
    assert out.status == "finished"
    assert out.console.startswith("Hello from a sevemu guest")
    assert "fib(90) = 2880067194370816120" in out.console


def test_same_image_same_output_plain_and_sev() -> None:
    for name, vcpus in (("hello", 1), ("secret", 1), ("shared", 1), ("victim", 1), ("smp", 3)):
        plain = run_guest(name, "plain", seed="same", vcpus=vcpus)
        sev = run_guest(name, "sev", seed="same", vcpus=vcpus)
        assert plain.status == sev.status == "finished", (name, plain.reason, sev.reason)
        if vcpus == 1:
            assert plain.console == sev.console, name
        else:  # the vCPUs' lines interleave as the time slices fall
            assert sorted(plain.console.splitlines()) == sorted(sev.console.splitlines())


def test_sevinfo_sees_its_protection() -> None:
    assert "memory encryption off" in run_guest("sevinfo", "plain", seed="i").console
    sev = run_guest("sevinfo", "sev", seed="i")
    assert "memory encryption active" in sev.console and "C-bit (bit 51)" in sev.console


def test_secret_computes_right_and_the_hypervisor_finds_only_ciphertext(tmp_path: Path) -> None:
    key = _secret_key()
    key_bytes = b"".join(k.to_bytes(8, "little") for k in key)
    mac = _secret_mac(key)
    for mode in ("sev", "plain"):
        run = launch_guest(build_guest("secret"), mode=mode, seed="secret")
        found: dict[str, object] = {}

        def look(r: GuestRun, vcpu: int, found: dict[str, object] = found, mode: str = mode) -> bool:
            # the guest printed its MAC and halted: the hypervisor looks everywhere it can
            key_gpa, note_gpa = r.image.symbol("key"), r.image.symbol("note")
            found["host_key"] = r.vm.host_read(key_gpa, 4096)
            found["host_note"] = r.vm.host_read(note_gpa, 22)
            r.machine.soc.wbinvd_all()
            dram = r.machine.soc.dram
            found["dram_key"] = dram.find(key_bytes[:64])  # every populated page of DRAM
            found["dram_note"] = dram.find(b"TOP-SECRET launch code")
            # and as a cold-boot attacker would: a raw image of the guest's memory, searched
            spas = sorted(r.vm.npt.mappings.values())
            path = tmp_path / f"dram-{mode}.img"
            dram.dump(path, spas[0], spas[-1] + 4096 - spas[0])
            found["image_note"] = ColdBootImage(path).find(b"TOP-SECRET launch code")
            found["host_key_after"] = r.vm.host_read(key_gpa, 4096)
            return True

        out = run.run(on_halt=look)
        run.close()
        assert out.status == "finished"
        assert f"MAC(message) = {mac:016x}" in out.console  # the right result, under SEV too
        assert "still intact after the host looked: yes" in out.console
        if mode == "sev":
            assert found["dram_key"] == [] and found["dram_note"] == [] and found["image_note"] == []
            assert found["host_key"] != key_bytes and found["host_key_after"] != key_bytes
            assert found["host_note"] != b"TOP-SECRET launch code"
        else:  # the same look at a plain VM finds everything
            assert found["dram_key"] and found["dram_note"] and found["image_note"]
            assert found["host_key_after"] == key_bytes


@pytest.mark.parametrize("mode", ["plain", "sev"])
def test_shared_page_exchange(mode: str) -> None:
    run = launch_guest(build_guest("shared"), mode=mode, seed="s")
    seen = []

    def peek(r: GuestRun, vcpu: int) -> bool:
        seen.append(r.vm.host_read(r.image.symbol("__shared_start") + 16, 64))
        return True

    out = run.run(on_halt=peek)
    assert out.status == "finished"
    assert 'host replied "HELLO HOST, THIS IS THE GUEST"' in out.console
    assert "host computed sum=2003, guest computed sum=2003" in out.console
    # what the guest copied into the bounce buffer is plaintext to the host, in both modes
    assert any(b"HELLO HOST" in s or b"hello host" in s for s in seen)
    if mode == "sev":
        # KVM_HC_MAP_GPA_RANGE: exactly the shared region (the bounce page first, then the GHCBs)
        start, end = run.image.symbol("__shared_start"), run.image.symbol("__shared_end")
        assert run.vm.shared_gpas == set(range(start, end, 4096))
        assert start in run.vm.shared_gpas


def _inject(mode: str, seed: str = "a") -> tuple[str, str]:
    run = launch_guest(build_guest("victim"), mode=mode, seed=seed)
    state = {"done": False}

    def attack(r: GuestRun, vcpu: int) -> bool:
        if state["done"]:
            return False  # stop at the next HLT after the attack
        r.vm.host_write(r.image.symbol("report"), SHELLCODE)  # the hypervisor's own code...
        r.machine.soc.wbinvd_all()  # ...pushed to DRAM, the guest's cached copy evicted
        state["done"] = True
        return True

    out = run.run(on_halt=attack, timeout=10)
    run.close()
    return out.status, out.console


def test_shellcode_injection_runs_in_a_plain_vm() -> None:
    _status, console = _inject("plain")
    assert "PWNED by the hypervisor" in console
    assert "victim: tick 1" not in console


def test_shellcode_injection_faults_under_sev() -> None:
    crashed = []
    for seed in ("a", "b", "c"):  # the garbage differs with the key; it never is the attacker's code
        status, console = _inject("sev", seed)
        assert "PWNED" not in console  # the guest fetched the bytes decrypted with its key: garbage
        assert "victim: tick 1" not in console
        crashed.append(status == "crashed")
        if crashed[-1]:
            break
    assert any(crashed)


def test_a_crash_is_reported_with_reason_and_rip() -> None:
    img = build_guest("crash")
    for mode in ("plain", "sev"):
        out = run_guest(img, mode, seed="c")
        assert out.status == "crashed"
        assert "#UD" in out.reason and "triple fault" in out.reason
        assert out.rip is not None and img.base <= out.rip < img.end
        assert "about to execute UD2" in out.console


def test_launch_measurement_covers_exactly_the_image() -> None:
    img = build_guest("hello")
    run = launch_guest(img, mode="sev", seed="m")
    st = run.machine.hv.platform_status()
    verify_measurement(run.measurement, bytes(16), st.api_major, st.api_minor, st.build, run.vm.policy,
                       expected_launch_digest([img.data]))
    other = img.patched("rt_ncpus", 7, 4)  # one changed byte: another image, another digest
    with pytest.raises(Exception):  # noqa: B017 - MeasureMacError, whatever its base
        verify_measurement(run.measurement, bytes(16), st.api_major, st.api_minor, st.build, run.vm.policy,
                           expected_launch_digest([other.data]))
    run.close()


@pytest.mark.slow
def test_a_guest_bigger_than_the_page_pool(tmp_path: Path) -> None:
    src = tmp_path / "big.c"
    src.write_text(
        '#include "rt.h"\n'
        "static u8 big[2 << 20];\n"
        "int main(void) {\n"
        "    for (u64 i = 0; i < sizeof big; i++) big[i] = (u8)(i * 7);\n"
        "    u64 sum = 0;\n"
        "    for (u64 i = 0; i < sizeof big; i += 4096) sum += big[i + 5];\n"
        '    kprintf("sum %lu\\n", sum);\n'
        "    return 0;\n"
        "}\n"
    )
    img = load_image(str(src))
    expected = sum(((i + 5) * 7) & 0xFF for i in range(0, 2 << 20, 4096))
    for mode in ("plain", "sev"):
        run = launch_guest(img, mode=mode, seed="big", pool_pages=64)
        out = run.run(timeout=120)
        assert out.status == "finished", out.reason
        assert out.console == f"sum {expected}\n"
        assert run.engines[0].stats.evictions > 0  # 512+ pages through 64 slots, written back and refilled
        run.close()
