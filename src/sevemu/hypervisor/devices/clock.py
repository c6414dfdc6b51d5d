"""Virtual time: one clock the devices of a VM share, driven by guest progress.

Model choice (documented in docs/devices.md).  QEMU derives its device clocks from
``QEMU_CLOCK_VIRTUAL`` (hw/acpi/core.c ``acpi_pm_tmr_get``, hw/intc/apic.c, hw/rtc/mc146818rtc.c),
which under KVM follows the host's monotonic time while the VM runs.  sevemu's vCPUs run orders of
magnitude slower than hardware and at a speed that depends on the machine's load and on the guest's
protection (every SEV-ES device access is a #VC and a GHCB round trip), so host time would make a
delay loop cost a different amount of guest work on every run.  Virtual time here is instead a
deterministic function of what the guest did:

* every device access (one exit, or one element of a string I/O) advances the clock by
  :attr:`VirtualClock.access_ns` (default 1 µs, the order of one exit round trip under KVM);
* a VMM that knows how much the guest ran in between may add it: :meth:`VirtualClock.advance`
  (nanoseconds) or :meth:`VirtualClock.retire` (instructions at :attr:`VirtualClock.ips`);
* a guest polling a timer (consecutive reads with no other device activity in between, see
  :meth:`VirtualClock.poll_step`) gets time that moves faster the longer it polls, doubling from one
  access step up to :attr:`VirtualClock.max_poll_ns`: a ``MicroSecondDelay`` ends after a number of
  reads that grows with the logarithm of the delay, not linearly.

The same guest work therefore always sees the same times, each timer read sees the clock move, and a
delay costs bounded guest work.  Time never goes backwards and is never frozen.
"""

from __future__ import annotations

from typing import Final

from sevemu.errors import InputError

__all__ = ["NS_PER_S", "VirtualClock"]

NS_PER_S: Final = 1_000_000_000


class VirtualClock:
    """Virtual nanoseconds since the VM's reset, advanced by guest progress (module docstring)."""

    __slots__ = ("_activity", "_ns", "_poll_seen", "_poll_streak", "access_ns", "ips", "max_poll_ns")

    def __init__(self, *, access_ns: int = 1_000, max_poll_ns: int = 50_000_000, ips: int = 1_000_000_000) -> None:
        if access_ns <= 0 or max_poll_ns < access_ns or ips <= 0:
            raise InputError("clock steps must be positive (access_ns <= max_poll_ns, ips > 0)")
        self._ns = 0
        self.access_ns = access_ns
        """Virtual time one device access takes."""
        self.max_poll_ns = max_poll_ns
        """The largest step a polled timer read adds (default 50 ms: far below a 24-bit PM timer's half
        period, 2^23 ticks = 2.34 s, so a delay loop never misreads a wrap)."""
        self.ips = ips
        """Instructions per virtual second for :meth:`retire`."""
        self._activity = 0  # bumped by everything that is not a timer poll
        self._poll_seen = -1
        self._poll_streak = 0

    @property
    def ns(self) -> int:
        """The current virtual time in nanoseconds."""
        return self._ns

    def advance(self, ns: int) -> None:
        """The guest ran for ``ns`` virtual nanoseconds (guest activity: ends a polling streak)."""
        if ns < 0:
            raise InputError(f"virtual time cannot go back ({ns} ns)")
        self._ns += ns
        self._activity += 1

    def retire(self, instructions: int) -> None:
        """The guest retired ``instructions`` instructions: time advances at :attr:`ips`."""
        self.advance(instructions * NS_PER_S // self.ips)

    def access(self) -> None:
        """One device access that is not a timer poll."""
        self._ns += self.access_ns
        self._activity += 1

    def quiet_access(self) -> None:
        """One access that does not end a polling streak (a PCI config cycle a timer read needs)."""
        self._ns += self.access_ns

    def touch(self) -> None:
        """Device activity that is not a timer poll, its time already counted (ends a polling streak)."""
        self._activity += 1

    def poll_step(self) -> None:
        """A timer read (after its access step): while the guest keeps polling with nothing else
        happening, an extra step that doubles per read up to :attr:`max_poll_ns`."""
        if self._poll_seen == self._activity:
            self._poll_streak = min(self._poll_streak + 1, 40)
        else:
            self._poll_streak = 0
        self._poll_seen = self._activity
        extra = 0 if self._poll_streak == 0 else min(self.access_ns << self._poll_streak, self.max_poll_ns)
        self._ns += extra
