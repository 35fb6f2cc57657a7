"""Design ``shadow`` — full nested AVIC, Maxim Levitsky's RFC v3 (2022; digest §6.2).

L1's physical APIC ID table cannot be given to the hardware (its entries hold L1 GPAs and L1 APIC
IDs), so L0 keeps a *shadow* table per L1 table frame, with translated entries:

* backing page: L1 GPA → HPA (a dummy page if it does not map: IPIs to it then exit, and L0
  reports ID 3 to L1);
* IsRunning/host ID: 1 and the pCPU's APIC ID iff L1 says the L2 vCPU runs on L1 vCPU X (guest
  IR = 1, host ID = X's APIC ID) AND X is loaded on a pCPU right now; L0's load/put of X rewrites
  every shadow entry that names X (``__nested_avic_load`` / ``__nested_avic_put``).

L1's table frame is write-protected in L0's NPT: every L1 store to it takes a nested page fault,
L0 emulates it and updates the shadow entry (or invalidates the table when a backing pointer
changes; a flood of writes to a table nobody uses also invalidates it). An L2 IPI that finds a
shadow IR = 0 exits AVIC_INCOMPLETE_IPI ID 1 to L0, which hides it and wakes the L1 vCPU when only
L0 had descheduled it (guest IR = 1), and reflects ID 1 (or ID 3 for dummy-page entries) with the
index otherwise (ID 3 from L2 cannot happen — unmapped backing pages use the dummy page — and is
handled in L0 with a WARN, patch 16). With ``doorbell_strict = false`` only blocking clears shadow
IR (patch 18; svm_vcpu_put then skips ``__avic_vcpu_put`` and ``__nested_avic_put`` both).

``[l0] shadow_variant``: ``"navic"`` (default) is the RFC with bugs of the posted text fixed;
``"rfc-v3"`` reproduces the posted patches exactly (docs/model.md, "Shadow design vs the posted
RFC v3"):

* patch 13 takes ``physid_nentries = avic_physical_id & AVIC_PHYSICAL_ID_TABLE_SIZE_MASK`` (0xFF):
  that is MAX_INDEX, so entries 0..MAX_INDEX-1 are synced and the entry AT MAX_INDEX stays 0
  (invalid). A 2022 L1 programmed MAX_INDEX = 255 and never noticed; a modern L1 programs the
  highest APIC ID, so its last vCPU is unreachable by hardware (ID 2, or silently skipped in a
  broadcast). navic syncs MAX_INDEX + 1 entries.
* patch 16 decodes an xAPIC cluster destination as ``cluster = dest & 0x3C``, members
  ``dest & 0x3`` (and gives up for dest >= 0x40), and indexes L1's logical table as ``u64 *``
  (entries are 32-bit), reporting the last logical index addressed. navic uses the APM decode
  (4 * dest[7:4] + bit, bits 0-3; u32 entries) and reports the first not-running index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from navic.hv.nested.base import HANDLED, REFLECT, Design, Gen
from navic.hw import avic as A
from navic.hw import vmcb as V
from navic.hw.memory import PAGE_SHIFT

if TYPE_CHECKING:
    from navic.hv.kvm import Vcpu
    from navic.hv.nested.core import NestedSvm
    from navic.hw.vmcb import Vmcb

FLOOD_FACTOR = 1000   # AVIC_PHYSID_FLOOD_COUNT = 1000 x nentries
AVIC_PHYSICAL_ID_TABLE_SIZE_MASK = 0xFF   # asm/svm.h when the RFC was posted (v5.18)
APIC_DFR_CLUSTER = 0x0FFFFFFF


@dataclass
class ShadowTable:
    """``struct avic_physid_table``: one per L1 table frame."""

    gfn: int
    hpa: int                       # the shadow table page(s) the hardware reads
    nentries: int = 0
    gentries: list[int] = field(default_factory=list)   # cached guest entries
    usecount: int = 0              # L1 vCPUs in L2 on this table (++ nested VMRUN, -- #VMEXIT)
    flood_count: int = 0           # tracked writes while usecount == 0
    frames: int = 1                # L1 frames write-protected (gfn, gfn + 1, ...)


class ShadowDesign(Design):
    name = "shadow"
    offers_avic = True
    table_pages = 1   # avic_physid_shadow_table_alloc(): alloc_page() — 512 u64 slots, xAVIC uses 0..255

    def __init__(self, core: NestedSvm) -> None:
        super().__init__(core)
        self.tables: dict[int, ShadowTable] = {}
        self.tracked: dict[int, ShadowTable] = {}   # write-protected L1 frame -> its table
        self.dummy_page = self.host.mem.alloc(1)
        self.strict = self.host.l0.doorbell_strict
        self.rfc_v3 = self.host.l0.shadow_variant == "rfc-v3"   # [l0] shadow_variant
        core.l1mem.on_tracked_write = self._l1_store

    # -- the shadow table ------------------------------------------------------------------------
    def _table(self, gpa: int, nentries: int) -> ShadowTable:
        gfn = gpa >> PAGE_SHIFT
        t = self.tables.get(gfn)
        if t is None:
            t = ShadowTable(gfn, self.host.mem.alloc(self.table_pages), frames=0)
            self.tables[gfn] = t
            self.kvm.rec.count("shadow_tables")
        while t.frames * 512 < nentries:             # kvm_slot_page_track_add_page(WRITE)
            self.core.l1mem.npt.write_protect(gfn + t.frames)
            self.tracked[gfn + t.frames] = t
            t.frames += 1
        if nentries > t.nentries:                    # avic_physid_shadow_table_sync()
            for i in range(t.nentries, nentries):
                t.gentries.append(0)
                self._sync_entry(t, i)
            t.nentries = nentries
        return t

    def _sync_entry(self, t: ShadowTable, i: int) -> None:
        l1mem = self.core.l1mem
        g = l1mem.read64((t.gfn << PAGE_SHIFT) + 8 * i)
        t.gentries[i] = g
        self.host.mem.write64(t.hpa + 8 * i, self._translate(g))

    def _translate(self, g: int) -> int:
        if not g & A.PHYS_VALID:
            return 0
        gpa = g & A.PHYS_BACKING_MASK
        l1mem = self.core.l1mem
        hpa = l1mem.npt.lookup(gpa)
        backing = (hpa & ~0xFFF) if hpa is not None else self.dummy_page
        running, host_id = False, 0
        if g & A.PHYS_IS_RUNNING and hpa is not None:
            x = self._l1_vcpu(g & A.PHYS_HOST_ID_MASK)
            if x is not None and x.cpu is not None and not x.blocking and (
                    not self.strict or not x.preempted):
                running, host_id = True, self.host.pcpus[x.cpu].apic_id
        return A.phys_entry(backing, host_id=host_id, running=running, valid=True)

    def _l1_vcpu(self, l1_apic_id: int) -> Vcpu | None:
        return self.kvm.vcpu_by_id.get(l1_apic_id)

    def invalidate(self, t: ShadowTable) -> None:
        """Erase and rebuild (KVM_REQ_APIC_PAGE_RELOAD + re-sync on next use; done at once here)."""
        self.kvm.rec.count("shadow_invalidations")
        n = t.nentries
        t.nentries = 0                              # avic_physid_shadow_table_erase()
        t.flood_count = 0
        t.gentries.clear()
        self._table(t.gfn << PAGE_SHIFT, n)

    # -- nested VMRUN -----------------------------------------------------------------------------
    def prepare_vmcb02(self, vcpu: Vcpu, vmcb12: Vmcb, vmcb02: Vmcb) -> None:
        if not vmcb12.avic_enable:
            super().prepare_vmcb02(vcpu, vmcb12, vmcb02)
            return
        l1mem = self.core.l1mem
        max_index, nentries = self._table_size(vmcb12)
        t = self._table(vmcb12.physical_table_hpa, nentries)
        vcpu.shadow_table = t
        t.usecount += 1            # nested_vmcb02_prepare_avic(): atomic_inc(&t->usecount)
        vcpu.shadow_in_use = t
        vmcb02.avic_enable = 1
        vmcb02.x2avic_enable = 0   # the RFC did not implement x2AVIC for L2
        vmcb02.avic_vapic_bar = vmcb12.avic_vapic_bar & V.VMCB_AVIC_APIC_BAR_MASK
        vmcb02.backing_page_hpa = l1mem.hpa(vmcb12.backing_page_hpa)
        vmcb02.logical_table_hpa = l1mem.hpa(vmcb12.logical_table_hpa)
        vmcb02.physical_table_hpa = t.hpa
        vmcb02.max_index = max_index

    def _table_size(self, vmcb12: Vmcb) -> tuple[int, int]:
        """(vmcb02 MAX_INDEX, entries to shadow). The posted patch 13 uses ``avic_physical_id &
        AVIC_PHYSICAL_ID_TABLE_SIZE_MASK`` for both, so the entry at MAX_INDEX is never synced;
        navic shadows 0..MAX_INDEX."""
        if self.rfc_v3:
            n = vmcb12.max_index & AVIC_PHYSICAL_ID_TABLE_SIZE_MASK
            return n, n
        return vmcb12.max_index, vmcb12.max_index + 1

    def nested_vmexit(self, vcpu: Vcpu) -> None:
        """nested_svm_vmexit(): ``atomic_dec(&t->usecount)`` when the VMRUN used nested AVIC."""
        t = getattr(vcpu, "shadow_in_use", None)
        if t is not None:
            t.usecount -= 1
            vcpu.shadow_in_use = None

    # -- write tracking -----------------------------------------------------------------------------
    def _l1_store(self, gpa: int, size: int, value: int) -> None:
        """GuestMemory hook: L1 stores to a write-protected frame. Inside L1 code the store is an
        instruction that faults to L0; elsewhere (a callback) it is emulated at once."""
        from navic.hw import isa

        stepping = self.core.l1host.stepping if self.core.l1host is not None else None
        if stepping is not None:
            stepping.pending.append(isa.MemWrite(gpa, size, value))
            return
        self.emulate_store(None, gpa, size, value)

    def on_tracked_write(self, vcpu: Vcpu, gpa: int, size: int, value: int) -> Gen:
        """The NPF exit of a tracked store (kvm_page_track_write → the notifier)."""
        self.kvm.rec.count("npf_write_tracking")
        yield self.kvm.costs.NPF_WRITE_TRACK
        self.emulate_store(vcpu, gpa, size, value)
        return None

    def emulate_store(self, vcpu: Vcpu | None, gpa: int, size: int, value: int) -> None:
        """Emulate the store, then avic_physid_shadow_table_track_write()."""
        l1mem = self.core.l1mem
        self.host.mem.write(l1mem.hpa(gpa), size, value)
        t = self.tracked.get(gpa >> PAGE_SHIFT)
        if t is None:
            return
        off = gpa - (t.gfn << PAGE_SHIFT)
        first = off // 8
        last = (off + size - 1) // 8
        if first >= t.nentries:
            return   # beyond the synced part (hot-plug appends)
        if first != last:
            self.invalidate(t)
            return
        old = t.gentries[first]
        new = l1mem.read64(gpa & ~7)
        if not old & A.PHYS_VALID or _backing(old) != _backing(new):
            self.invalidate(t)   # an invalid-at-sync entry or a backing pointer changed
            return
        if t.usecount == 0:      # write flooding to a table nobody uses (patch 11)
            t.flood_count += 1
            if t.flood_count > FLOOD_FACTOR * t.nentries:
                self.invalidate(t)
                return
        else:
            t.flood_count = 0
        t.gentries[first] = new
        self.host.mem.write64(t.hpa + 8 * first, self._translate(new))

    # -- scheduling hooks (__nested_avic_load / __nested_avic_put) ------------------------------
    def vcpu_load(self, vcpu: Vcpu, cpu: int) -> None:
        self._refresh_entries_naming(vcpu)

    def vcpu_put(self, vcpu: Vcpu, *, blocking: bool) -> None:
        if not self.strict and not blocking:
            return   # non-strict doorbell mode: only blocking clears IsRunning
        self._refresh_entries_naming(vcpu, force_off=True)

    def _refresh_entries_naming(self, vcpu: Vcpu, force_off: bool = False) -> None:
        for t in self.tables.values():
            for i in range(t.nentries):
                g = t.gentries[i]
                if g & A.PHYS_VALID and g & A.PHYS_IS_RUNNING and (g & A.PHYS_HOST_ID_MASK) == vcpu.vcpu_id:
                    e = self._translate(g)
                    if force_off:
                        e &= ~A.PHYS_IS_RUNNING
                    self.host.mem.write64(t.hpa + 8 * i, e)

    # -- AVIC exits from L2 ---------------------------------------------------------------------------
    def on_avic_exit(self, vcpu: Vcpu, code: int, info1: int, info2: int) -> Gen:
        if code != V.SVM_EXIT_AVIC_INCOMPLETE_IPI:
            return (REFLECT, code, info1, info2)
        fid = info2 >> 32
        if fid == A.AVIC_IPI_FAILURE_INVALID_BACKING_PAGE:
            # Patch 16: WARN_ON_ONCE(1); break — L0 handles it, L1 never sees it.
            self.kvm.rec.count("shadow_id3_warn")
            return (HANDLED, code, info1, info2)
        if fid != A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING:
            return (REFLECT, code, info1, info2)
        yield self.kvm.costs.NESTED_IPI_EMULATE
        t: ShadowTable = vcpu.shadow_table
        st = vcpu.nested
        vmcb12 = st.vmcb12
        icr_lo, icr_hi = info1 & 0xFFFFFFFF, info1 >> 32
        dests = self._destinations(vcpu, vmcb12, st.l2.vcpu_id, icr_lo, icr_hi, t)
        first: tuple[int, bool] | None = None
        for rep, pid in dests:
            g = t.gentries[pid] if pid < t.nentries else 0
            if not g & A.PHYS_VALID:
                continue
            if g & A.PHYS_IS_RUNNING:
                # L1 says it runs: only L0 descheduled its L1 vCPU → wake it, hide the exit.
                x = self._l1_vcpu(g & A.PHYS_HOST_ID_MASK)
                if x is not None and x is not vcpu:
                    self.kvm.rec.count("shadow_hidden_id1_wakeups")
                    self.kvm.kvm_vcpu_wake_up(x)
            elif first is None:
                s = self.host.mem.read64(t.hpa + 8 * pid)
                first = (rep, (s & A.PHYS_BACKING_MASK) == self.dummy_page)
        if first is None:
            return (HANDLED, code, info1, info2)
        rep, dummy = first
        if self.rfc_v3 and _xapic_logical(icr_lo, icr_hi) and not st.vmcb02.x2avic_enable:
            # As posted, "if (physical_index != -1) *index = logical_index;" runs on every later
            # iteration too: the index reported is the last valid logical entry addressed.
            rep = dests[-1][0]
        new_id = A.AVIC_IPI_FAILURE_INVALID_BACKING_PAGE if dummy else A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING
        return (REFLECT, code, info1, (new_id << 32) | rep)

    def _destinations(self, vcpu: Vcpu, vmcb12: Vmcb, self_id: int, lo: int, hi: int,
                      t: ShadowTable) -> list[tuple[int, int]]:
        """avic_kick_target_vcpus_nested(): (reported index, physical index) for each destination,
        from L1's (guest) tables."""
        sh = (lo >> 18) & 3
        logical = (lo >> 11) & 1
        dest = hi >> 24
        if sh == 1:
            return []
        if sh in (2, 3) or dest == 0xFF:
            # The posted patch walks every valid entry for ALLBUT too (self included).
            skip = self_id if sh == 3 and not self.rfc_v3 else -1
            return [(i, i) for i in range(t.nentries) if i != skip]
        if logical:
            return self._logical_destinations(vmcb12, dest)
        return [(dest, dest)]

    def _logical_destinations(self, vmcb12: Vmcb, dest: int) -> list[tuple[int, int]]:
        """avic_kick_target_vcpus_nested_logical(): (logical index, L2 physical ID) for each valid
        logical entry ``dest`` addresses, read from L1's logical table."""
        l1mem = self.core.l1mem
        dfr = l1mem.read32(vmcb12.backing_page_hpa + 0xE0)
        out = []
        if self.rfc_v3:
            # As posted: cluster = dest & 0x3C, members dest & 0x3, no cluster >= 0x40, and the
            # table read as u64 entries (logical_id_table[logical_index] on a u64 *).
            cluster = 0
            if dfr == APIC_DFR_CLUSTER:
                if dest >= 0x40:
                    return []
                cluster, dest = dest & 0x3C, dest & 0x3
            for bit in range(8):
                if dest >> bit & 1:
                    li = cluster | bit
                    le = l1mem.read64(vmcb12.logical_table_hpa + 8 * li)
                    if le & A.LOG_VALID:
                        out.append((li, le & A.LOG_GUEST_PHYS_ID_MASK))
            return out
        for li in A.logical_dest_indices(dest, A.dfr_is_flat(dfr)):
            le = l1mem.read32(vmcb12.logical_table_hpa + 4 * li)
            if le & A.LOG_VALID:
                out.append((li, le & A.LOG_GUEST_PHYS_ID_MASK))
        return out

    def on_doorbell_write(self, vcpu: Vcpu, value: int) -> Gen:
        if value >> 12:
            from navic.hw.isa import Fault

            return Fault("#GP", "AVIC doorbell: reserved bits set")
        yield 0
        self.core.emulate_doorbell(vcpu, value & 0xFFF)
        return None


def _backing(g: int) -> int | None:
    """physid_entry_get_backing_table(): the backing GPA, or None (INVALID_BACKING_PAGE) if V = 0."""
    return g & A.PHYS_BACKING_MASK if g & A.PHYS_VALID else None


def _xapic_logical(lo: int, hi: int) -> bool:
    """An xAPIC logical, no-shorthand, non-broadcast ICR."""
    return bool((lo >> 11) & 1) and not (lo >> 18) & 3 and (hi >> 24) != 0xFF
