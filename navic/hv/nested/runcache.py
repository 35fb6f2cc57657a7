"""Design ``runcache`` — the dummy table plus an L0-side IsRunning cache (navic's fourth design;
docs/nested-design.md, "A fourth design: runcache").

L2 runs on a table L0 owns, as in :mod:`.dummy`, but L0 *publishes* in it the one thing only L0
knows for certain and never has to learn by tracking L1's writes: which L2 vCPU is running right now,
and on which pCPU. Entry ``n`` of the table is

* **published** — Valid, IsRunning = 1, backing = the HPA of the L2 vCPU's real backing page, host ID
  = the pCPU — while an L1 vCPU X runs L2 vCPU ``n`` (X is in guest mode at L0 level, i.e. between
  nested VMRUN and nested #VMEXIT) and X is loaded on that pCPU; or
* **parked** — Valid, IsRunning = 0, backing = a sink page of its own (``sink[n]``) — otherwise.

Publication follows KVM's own ``avic_vcpu_load`` / ``avic_vcpu_put`` protocol (digest §5.3), applied
to vmcb02's entry: set on nested VMRUN and on L0's load of X while X is in L2; cleared on nested
#VMEXIT (before L1 runs again), on L0's put of X and before X blocks. L0 publishes only if L1's own
entry ``n`` agrees — Valid, IsRunning = 1, host ID = X's L1 APIC ID, backing = vmcb12's backing page —
read once, at that moment, from L1 memory: no write tracking, no cached copy of L1's table.

So an IPI to an L2 vCPU that runs is delivered by the hardware (IRR in its backing page, doorbell to
its pCPU: no exit at all), and every other IPI takes AVIC_INCOMPLETE_IPI ID 1 to L0, which finishes
it against L1's table exactly as ``dummy`` does. For a multi-destination IPI (broadcast, logical)
the hardware may have delivered to the published destinations already; the per-entry sink pages
tell L0 which destinations it did *not* deliver to (their sink holds the IRR bit), so L0 delivers
only those — never twice.

Where L0's ``enable_ipiv`` is off (erratum 1235 on zen2: the hardware may read a stale IsRunning = 1)
nothing is ever published, and the design is exactly ``dummy``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from navic.hv.nested.base import HANDLED, REFLECT, Gen, done
from navic.hv.nested.dummy import DummyDesign
from navic.hw import avic as A
from navic.hw import vmcb as V

if TYPE_CHECKING:
    from navic.hv.kvm import Vcpu
    from navic.hv.nested.core import NestedSvm
    from navic.hw.vmcb import Vmcb

_IRR = 0x200


def _irr_bit(vector: int) -> tuple[int, int]:
    """(byte offset, bit) of ``vector`` in a backing page's IRR."""
    return _IRR + ((vector >> 5) << 4) + ((vector & 31) >> 3), vector & 7


class RunCacheDesign(DummyDesign):
    name = "runcache"
    offers_avic = True

    def __init__(self, core: NestedSvm) -> None:
        super().__init__(core)
        self.sinks: list[int] = []                 # sink page of entry n (parked)
        self.published: dict[int, int] = {}        # L2 APIC ID -> pCPU it is published on
        self.owner: dict[Any, int] = {}            # L1 vCPU -> the L2 APIC ID it runs (in L2)
        avic = getattr(self.kvm.vendor, "avic", None)
        self.enabled = bool(avic is not None and avic.enable_ipiv)

    # -- the table ---------------------------------------------------------------------------
    def _park_all(self, max_index: int) -> None:
        """Give entries 0..max_index their own sink page (lazily, as the table grows). A sink is
        L0's: an IRR bit the hardware sets there is an IPI accepted for that L2 vCPU, which L0 then
        moves into its real backing page (so the run record takes the acceptance there)."""
        mem = self.host.mem
        l2_by_id = {v.vcpu_id: v for v in self.core.vcpu_by_vmcb12.values()}
        while len(self.sinks) <= max_index:
            i = len(self.sinks)
            sink = mem.alloc(1)
            self.sinks.append(sink)
            if i in l2_by_id:
                self.host.backing_owner[sink] = l2_by_id[i]
            mem.write64(self.table_hpa + 8 * i, A.phys_entry(sink, running=False, valid=True))

    def _entry_hpa(self, n: int) -> int:
        return self.table_hpa + 8 * n

    def publish(self, vcpu: Vcpu, cpu: int) -> None:
        """L0 loads L1 vCPU ``vcpu`` on pCPU ``cpu``: publish the L2 vCPU it runs, if it is in L2."""
        st = getattr(vcpu, "nested", None)
        if st is not None and st.active:
            self._publish(vcpu, cpu, st.l2, st.vmcb12)

    def _publish(self, vcpu: Vcpu, cpu: int, l2: Vcpu, vmcb12: Vmcb) -> None:
        """__avic_vcpu_load() for vmcb02's entry: L2 vCPU ``l2`` runs on L1 vCPU ``vcpu``, loaded on
        pCPU ``cpu`` — published if L1's own entry says so too (read now from L1 memory)."""
        n = l2.vcpu_id
        if (not self.enabled or not vmcb12.avic_enable or n > vmcb12.max_index or n >= len(self.sinks)
                or not vmcb12.intercept(V.INTERCEPT_HLT)):   # (an L0-handled HLT would block X in L2)
            return
        g = self.core.l1mem.read64(vmcb12.physical_table_hpa + 8 * n)
        if not (g & A.PHYS_VALID and g & A.PHYS_IS_RUNNING
                and self.kvm.vcpu_by_id.get(g & A.PHYS_HOST_ID_MASK) is vcpu
                and g & A.PHYS_BACKING_MASK == vmcb12.backing_page_hpa & A.PHYS_BACKING_MASK):
            return
        self.unpublish(vcpu)
        backing = self.core.l1mem.hpa(vmcb12.backing_page_hpa) & ~0xFFF
        self.host.mem.write64(self._entry_hpa(n), A.phys_entry(
            backing, host_id=self.host.pcpus[cpu].apic_id, running=True, valid=True))
        self.published[n] = cpu
        self.owner[vcpu] = n
        self.kvm.rec.count("runcache_publish")
        self._drain(n, vmcb12.backing_page_hpa)

    def _drain(self, n: int, backing_gpa: int) -> None:
        """Right after publishing entry ``n``: move the IRR bits a sender left in ``sink[n]`` into
        the real backing page. (The hardware reads an entry twice — backing pointer with the IRR
        write, IsRunning after it, APM 15.29.6.1 step 5 — so a sender that wrote the sink just
        before the publish may read IsRunning = 1 just after it: no exit, and only this finds its
        bit.) The vCPU's next VMRUN evaluates the page."""
        mem = self.host.mem
        sink = self.sinks[n]
        l1mem = self.core.l1mem
        for w in range(8):
            off = _IRR + 16 * w
            bits = mem.read32(sink + off)
            for b in range(32):
                if bits >> b & 1 and mem.clear_bit(sink + off, b):
                    l1mem.set_bit(backing_gpa + off, b)
                    self.kvm.rec.count("runcache_drained")

    def unpublish(self, vcpu: Vcpu) -> None:
        """__avic_vcpu_put() for vmcb02's entry: park it (IsRunning = 0, its own sink page)."""
        n = self.owner.pop(vcpu, None)
        if n is None:
            return
        self.host.mem.write64(self._entry_hpa(n), A.phys_entry(self.sinks[n], running=False, valid=True))
        del self.published[n]

    # -- hooks: nested VMRUN / #VMEXIT, L0's load / put / block --------------------------------
    def prepare_vmcb02(self, vcpu: Vcpu, vmcb12: Vmcb, vmcb02: Vmcb) -> None:
        super().prepare_vmcb02(vcpu, vmcb12, vmcb02)
        if not vmcb02.avic_enable or not self.enabled:
            return
        self._park_all(vmcb12.max_index)
        self.unpublish(vcpu)             # a new L2 vCPU on this L1 vCPU (or the same one again)
        if vcpu.cpu is not None:
            self._publish(vcpu, vcpu.cpu, self.core.vcpu_by_vmcb12[vmcb12.hpa], vmcb12)

    def nested_vmexit(self, vcpu: Vcpu) -> None:
        self.unpublish(vcpu)

    def vcpu_load(self, vcpu: Vcpu, cpu: int) -> None:
        self.publish(vcpu, cpu)

    def vcpu_put(self, vcpu: Vcpu, *, blocking: bool) -> None:
        self.unpublish(vcpu)

    # -- AVIC exits from L2 -------------------------------------------------------------------
    def on_avic_exit(self, vcpu: Vcpu, code: int, info1: int, info2: int) -> Gen:
        """ID 1: the destinations whose sink page got the IRR bit were parked when the hardware
        looked (nothing delivered to them); the others were published and the hardware delivered.
        All parked → ``dummy``'s emulation of the whole IPI; some → only the parked ones."""
        if not self.enabled:
            return super().on_avic_exit(vcpu, code, info1, info2)   # nothing published: dummy
        if code != V.SVM_EXIT_AVIC_INCOMPLETE_IPI or (info2 >> 32) != A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING:
            return done((REFLECT, code, info1, info2))
        st = vcpu.nested
        vmcb12 = st.vmcb12
        icr_lo, icr_hi = info1 & 0xFFFFFFFF, info1 >> 32
        dests = self._destinations(vmcb12, st.vmcb02, st.l2.vcpu_id, icr_lo, icr_hi)
        parked = [(rep, pid) for rep, pid in dests if self._take_sink_bit(pid, icr_lo & 0xFF)]
        if len(parked) < len(dests):
            self.kvm.rec.count("runcache_partial")
        return self._finish(vcpu, (code, info1, info2), parked, directed=len(dests) == 1)

    def _take_sink_bit(self, pid: int, vector: int) -> bool:
        """Test and clear ``vector`` in entry ``pid``'s sink page (the hardware set it iff it found
        the entry parked)."""
        if pid >= len(self.sinks):
            return False
        off, bit = _irr_bit(vector)
        return self.host.mem.clear_bit(self.sinks[pid] + off, bit)

    def _destinations(self, vmcb12: Vmcb, vmcb02: Vmcb, self_id: int, lo: int, hi: int
                      ) -> list[tuple[int, int]]:
        """(reported index, physical index) of every destination the hardware iterated (APM
        15.29.6.1 steps 2-4 over this table, with L1's logical table for xAVIC logical)."""
        sh = (lo >> 18) & 3
        logical = (lo >> 11) & 1
        x2 = bool(vmcb02.x2avic_enable)
        dest = hi if x2 else hi >> 24
        top = vmcb12.max_index
        if sh in (2, 3) or dest == (0xFFFFFFFF if x2 else 0xFF):
            return [(i, i) for i in range(top + 1) if not (sh == 3 and i == self_id)]
        if not logical:
            return [(dest, dest)] if dest <= top else []
        if x2:
            return [(i, i) for i in A.x2apic_logical_dest_ids(dest) if i <= top]
        l1mem = self.core.l1mem
        flat = A.dfr_is_flat(l1mem.read32(vmcb12.backing_page_hpa + 0xE0))
        out = []
        for li in A.logical_dest_indices(dest, flat):
            le = l1mem.read32(vmcb12.logical_table_hpa + 4 * li)
            if le & A.LOG_VALID and (le & A.LOG_GUEST_PHYS_ID_MASK) <= top:
                out.append((li, le & A.LOG_GUEST_PHYS_ID_MASK))
        return out

    def _finish(self, vcpu: Vcpu, exit_: tuple[int, int, int], parked: list[tuple[int, int]], *,
                directed: bool) -> Gen:
        """Deliver the parked destinations against L1's table — what the hardware would have done
        with L1's entry (APM 15.29.6.1 steps 4-6): invalid → ID 2 for a directed IPI (nothing
        delivered), skipped otherwise (the broadcast rule; multicast: docs/model.md); unbacked →
        ID 3 likewise; else move the IRR bit into the page L1's entry names, then read L1's
        IsRunning: the emulated doorbell toward that L1 vCPU, or ID 1 to L1 with that index."""
        kvm = self.kvm
        kvm.rec.count("nested_ipi_emulations")
        yield kvm.costs.NESTED_IPI_EMULATE
        code, info1, info2 = exit_
        vmcb12 = vcpu.nested.vmcb12
        l1mem = self.core.l1mem
        off, bit = _irr_bit(info1 & 0xFF)
        first_nr = -1
        for rep, pid in parked:
            gpa = vmcb12.physical_table_hpa + 8 * pid
            g = l1mem.read64(gpa)
            backing = g & A.PHYS_BACKING_MASK
            failure = (A.AVIC_IPI_FAILURE_INVALID_TARGET if not g & A.PHYS_VALID else
                       A.AVIC_IPI_FAILURE_INVALID_BACKING_PAGE if not l1mem.is_valid(backing) else 0)
            if failure:
                if directed:
                    return (REFLECT, code, info1, (failure << 32) | rep)
                continue
            l1mem.set_bit(backing + off, bit)
            # The same send as the sink's acceptance (the run record counts it once); a halt-polling
            # L1 thread re-checks.
            self.ipis.delivered(vcpu.nested.l2, backing, info1 & 0xFF)
            yield 0
            g = l1mem.read64(gpa)              # IsRunning is read after the IRR bit is set
            if g & A.PHYS_IS_RUNNING:
                self.emulate_doorbell(vcpu, g & A.PHYS_HOST_ID_MASK)
            elif first_nr < 0:
                first_nr = rep
        if first_nr < 0:
            return (HANDLED, code, info1, info2)
        return (REFLECT, code, info1, (A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING << 32) | first_nr)
