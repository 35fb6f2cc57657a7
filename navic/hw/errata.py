"""Silicon errata: a registry (which CPU model has which erratum) and executable models.

Erratum 1235 (AMD revision guide 56323, Family 17h; digest §8): "Guest With AVIC Enabled May Fail to
Process IPI Until Guest Is Re-Scheduled".  KVM's characterisation: while executing a guest ICR
write, the CPU may not observe a *recent software clear* of IsRunning in a physical APIC ID table
entry; it treats the target as running, rings a doorbell at the target's former host core and does
NOT take ``AVIC_INCOMPLETE_IPI`` — so the hypervisor never learns that it must wake the target.

Model (:class:`Erratum1235`): the model watches software writes to the physical-table frames
(:meth:`HostMemory.watch`).  When a write turns an entry from IR=1 into IR=0 it records
``(ipi_seq, old_host_id)`` for that entry.  Every hardware IPI evaluation that consults the table
calls :meth:`Erratum1235.begin_ipi`, which advances ``ipi_seq``.  When the hardware then reads
IR=0 in a recorded entry while ``ipi_seq - recorded_seq <= window`` (the evaluation in flight at the
time of the clear plus the next ``window`` ones), the read is offered as a nondeterministic choice
``engine.choose("erratum1235", 2, weights=[1 - p, p])``; alternative 1 = the stale read (IR=1 with
the old host APIC ID).  Any software write that sets IR=1 again closes the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from navic.hw.memory import HostMemory
    from navic.sim.engine import Engine

__all__ = ["Erratum", "ERRATA", "errata_for", "has_erratum", "Erratum1235",
           "ERRATUM_1235_WINDOW", "ERRATUM_1235_P"]


@dataclass(frozen=True)
class Erratum:
    number: str
    title: str
    cpus: tuple[str, ...]
    source: str


ERRATA: dict[str, Erratum] = {
    "1235": Erratum(
        "1235",
        "Guest With AVIC (Advanced Virtual Interrupt Controller) Enabled May Fail to Process IPI "
        "(Inter-Processor Interrupt) Until Guest Is Re-Scheduled",
        # Family 17h (Zen1/Zen2).  KVM also applies the workaround to Hygon family 18h (Zen1-derived).
        ("zen1", "zen2", "hygon"),
        "AMD revision guide 56323; KVM avic_hardware_setup (enable_ipiv forced off on family 0x17/0x18)",
    ),
}

_BY_CPU: dict[str, frozenset[str]] = {}
for _e in ERRATA.values():
    for _c in _e.cpus:
        _BY_CPU[_c] = _BY_CPU.get(_c, frozenset()) | {_e.number}
del _e, _c


def errata_for(cpu_name: str) -> frozenset[str]:
    """Erratum numbers (strings) that affect CPU model ``cpu_name`` (canonical features name)."""
    return _BY_CPU.get(cpu_name, frozenset())


def has_erratum(cpu_name: str, number: str) -> bool:
    return number in errata_for(cpu_name)


# Defaults (no published data exists; see docs/model.md "Silicon"): a short window (the evaluation in
# flight plus 2 more) and a rare stale read, so seeded runs hit it occasionally; the explorer
# enumerates both alternatives regardless of the weights.
ERRATUM_1235_WINDOW = 2
ERRATUM_1235_P = 0.1

_IR = 1 << 62
_V = 1 << 63
_HOST_ID = 0xFFF


class Erratum1235:
    """Stale-IsRunning model.  One instance per machine (hardware IPI evaluations on every core
    advance the same sequence counter)."""

    __slots__ = ("engine", "mem", "window", "p", "ipi_seq", "_cleared", "_tracked", "stale_reads")

    def __init__(self, engine: Engine, mem: HostMemory, window: int = ERRATUM_1235_WINDOW,
                 p: float = ERRATUM_1235_P) -> None:
        if window < 0 or not 0.0 <= p <= 1.0:
            raise ValueError("window must be >= 0 and 0 <= p <= 1")
        self.engine = engine
        self.mem = mem
        self.window = window
        self.p = p
        self.ipi_seq = 0
        self._cleared: dict[int, tuple[int, int]] = {}  # entry HPA -> (ipi_seq at clear, old host ID)
        self._tracked: set[int] = set()  # pfns of physical-table frames being watched
        self.stale_reads = 0

    def track_table(self, table_hpa: int, npages: int = 1) -> None:
        """Start observing software writes to a physical APIC ID table (idempotent)."""
        base = table_hpa >> 12
        for i in range(npages):
            pfn = base + i
            if pfn not in self._tracked:
                self._tracked.add(pfn)
                self.mem.watch(pfn << 12, self._on_write)

    def is_tracking(self, table_hpa: int) -> bool:
        return (table_hpa >> 12) in self._tracked

    def _on_write(self, addr: int, size: int, old: int, new: int) -> None:
        # Split the written unit into the (aligned) 8-byte entries it touches.
        if size == 8 and not addr & 7:
            self._entry_changed(addr, old, new)
            return
        start = addr & ~7
        end = addr + size
        cur_unit_mask = (1 << (8 * size)) - 1
        for q in range(start, end, 8):
            new_q = self.mem.read64(q)
            # rebuild the old qword: replace the bytes of the written unit that fall in this qword
            shift = (addr - q) * 8
            if shift >= 0:
                m = (cur_unit_mask << shift) & 0xFFFFFFFFFFFFFFFF
                old_q = (new_q & ~m) | ((old << shift) & m)
            else:
                m = cur_unit_mask >> -shift
                old_q = (new_q & ~m) | ((old >> -shift) & m)
            self._entry_changed(q, old_q, new_q)

    def _entry_changed(self, entry_hpa: int, old: int, new: int) -> None:
        if new & _IR:
            self._cleared.pop(entry_hpa, None)
        elif old & _IR and old & _V:
            self._cleared[entry_hpa] = (self.ipi_seq, old & _HOST_ID)

    def begin_ipi(self) -> None:
        """A hardware ICR-write evaluation that consults the physical table is starting."""
        self.ipi_seq += 1

    def stale_host_id(self, entry_hpa: int) -> int | None:
        """Called by the hardware when it reads IR=0 in ``entry_hpa``.  Returns the stale host APIC
        ID if this read observes the old IR=1 (the erratum fires), else None."""
        rec = self._cleared.get(entry_hpa)
        if rec is None:
            return None
        seq, host = rec
        if self.ipi_seq - seq > self.window:
            del self._cleared[entry_hpa]
            return None
        if self.engine.choose("erratum1235", 2, [1.0 - self.p, self.p]) == 1:
            self.stale_reads += 1
            return host
        return None

    def window_open(self, entry_hpa: int) -> bool:
        rec = self._cleared.get(entry_hpa)
        return rec is not None and self.ipi_seq - rec[0] <= self.window
