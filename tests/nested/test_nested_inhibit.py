"""An L1 vCPU that enters L2 inhibits its own AVIC (APICV_INHIBIT_REASON_NESTED, per vCPU; digest
§6.1): while the silicon runs L2 on it, its entry in L0's real physical APIC ID table has
IsRunning = 0 and vmcb01 AVIC is off; nested #VMEXIT re-activates it. L1 peers' IPIs to it (here:
the L1 kernel's reschedule IPIs, which L1's KVM sends to wake the L1 vCPU hosting an L2 vCPU)
therefore exit AVIC_INCOMPLETE_IPI ID 1 at L0, which kicks it: L2 exits (#VMEXIT(INTR), reflected
to L1 as a nested #VMEXIT(INTR)) and the L1 kernel takes the interrupt."""

from __future__ import annotations

import pytest
from _nested_util import DESIGNS, INCOMPLETE_IPI, pingpong, traced

from navic.hv import svm as S
from navic.hv.l1 import RESCHEDULE_VECTOR
from navic.hw import avic as A
from navic.hw import vmcb as V


def _watch_entries(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Every VMRUN L0 issues for an L1 vCPU: (vcpu, in L2?, APICv active, real-table entry,
    vmcb01 AVIC enable); every AVIC_INCOMPLETE_IPI L0 handles: (sender, ID, index, target in L2?)."""
    log: dict[str, list] = {"runs": [], "ipis": []}
    orig_run = S.SvmVendor.run

    def run(self, vcpu):
        if self.kvm.exit_level == "l0":
            e = self.kvm.mem.read64(self.avic.physical_entry_hpa(vcpu.vcpu_id))
            in_l2 = vcpu.nested is not None and vcpu.nested.active
            log["runs"].append((vcpu.name, in_l2, vcpu.apicv_active, e, vcpu.vmcb.avic_enable))
        return orig_run(self, vcpu)

    orig_ipi = S.SvmVendor._handlers[V.SVM_EXIT_AVIC_INCOMPLETE_IPI]

    def ipi(self, vcpu):
        if self.kvm.exit_level == "l0":
            fid, index = vcpu.vmcb.exit_info_2 >> 32, vcpu.vmcb.exit_info_2 & 0xFFF
            tgt = next(v for v in self.kvm.vcpus if v.vcpu_id == index)
            log["ipis"].append((vcpu.name, fid, index, tgt.nested is not None and tgt.nested.active))
        return (yield from orig_ipi(self, vcpu))

    monkeypatch.setattr(S.SvmVendor, "run", run)
    monkeypatch.setitem(S.SvmVendor._handlers, V.SVM_EXIT_AVIC_INCOMPLETE_IPI, ipi)
    return log


@pytest.mark.parametrize("design", DESIGNS)
def test_l1_vcpu_in_l2_has_its_own_avic_inhibited(design, monkeypatch):
    log = _watch_entries(monkeypatch)
    t = traced(pingpong(design, n=10, how="hlt"))
    assert t.result["violations"] == []
    runs = log["runs"]
    in_l2 = [r for r in runs if r[1]]
    in_l1 = [r for r in runs if not r[1]]
    assert in_l2 and in_l1
    # While the silicon runs L2: APICv inactive, vmcb01 AVIC off, real entry Valid with IR = 0.
    for name, _, active, entry, avic in in_l2:
        assert not active and not avic, name
        assert entry & A.PHYS_VALID and not entry & A.PHYS_IS_RUNNING, (name, hex(entry))
    # In L1 (after nested #VMEXIT re-activated it): APICv active, IR = 1 (zen4: IPI virtualisation on).
    for name, _, active, entry, avic in in_l1:
        assert active and avic, name
        assert entry & A.PHYS_IS_RUNNING, (name, hex(entry))
    # Both transitions happen for every L1 vCPU that ran L2.
    assert {r[0] for r in in_l2} == {r[0] for r in in_l1} == {"l1.0", "l1.1"}
    assert t.counter("nested_vmrun") == t.counter("nested_vmexit") >= 2


def test_l1_reschedule_ipi_to_vcpu_in_l2_exits_id1_at_l0_and_arrives(monkeypatch):
    """Design none: every L2 IPI is emulated by L1's KVM, which wakes the L1 thread of the target L2
    vCPU with a reschedule IPI (an x2APIC ICR write, x2AVIC-accelerated) to the L1 vCPU hosting it —
    which is in L2, so its IR is 0: ID 1 with its index. L0 kicks it, L2 exits #VMEXIT(INTR) (L0
    alone: l0_l2) and is reflected as a nested #VMEXIT(INTR); the L1 kernel handles vector 0xFD."""
    log = _watch_entries(monkeypatch)
    n = 10
    t = traced(pingpong("none", n=n))
    assert t.result["violations"] == []
    assert t.got("l2.1", 0x40) == n and t.got("l2.0", 0x41) == n
    ipis = log["ipis"]
    to_l2 = [x for x in ipis if x[3]]
    # One reschedule IPI per L2 IPI, each from the L1 vCPU of the sender to that of the target.
    assert sorted(to_l2) == sorted([("l1.0", 1, 1, True)] * n + [("l1.1", 1, 0, True)] * n)
    assert t.exits("l0")[INCOMPLETE_IPI] == len(ipis) == 2 * n
    # The trace has them too: KVM's kvm_avic_incomplete_ipi at L0 (from L1 vCPUs), ID 1.
    l0_ev = [e for e in t.ev("kvm_avic_incomplete_ipi") if e.vcpu.startswith("l1.")]
    assert [(e.fields["id"], e.fields["icrl"] & 0xFF) for e in l0_ev] == [(1, RESCHEDULE_VECTOR)] * (2 * n)
    # Delivered: each L1 vCPU's kernel took exactly one reschedule interrupt per IPI.
    cpus = t.kvm.vendor.nested.l1host.cpus
    assert [c.handled.get(RESCHEDULE_VECTOR, 0) for c in cpus] == [n, n]
    # The kick: #VMEXIT(INTR) of L2 at L0, reflected to L1 as a nested #VMEXIT(INTR).
    assert t.exits("l0_l2")["interrupt"] == 2 * n
    assert t.exits("l1")["interrupt"] == 2 * n
    assert len(t.nested_vmexits("interrupt")) == 2 * n
