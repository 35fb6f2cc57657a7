"""Design ``dummy`` (Sean Christopherson's intermediate step; digest §6.3): every L2 runs on one
dummy physical table (Valid, IsRunning = 0, sink page), so every non-self L2 IPI exits ID 1 at L0,
which re-runs the APM algorithm on L1's tables. Broadcasts must exit too (an all-invalid table
would skip them silently), and L0 must turn "no such L2 APIC ID" back into ID 2 for L1."""

from __future__ import annotations

import pytest
from _nested_util import INCOMPLETE_IPI, check_dummy, failure, prog, scenario, traced, watch_dummy

from navic.hv.nested import core as C

N2 = 3   # L2 vCPUs


def _broadcast(design: str, how: str) -> str:
    # Each target answers with its own vector (0x50 + i): same-vector replies could coalesce.
    sender = prog("l2.0", ['{ op = "sti" }', f'{{ op = "ipi", {how}, vector = 0x50 }}',
                           *[f'{{ op = "wait", vector = {0x50 + i} }}' for i in range(1, N2)]])
    rx = [prog(f"l2.{i}", ['{ op = "sti" }', '{ op = "wait", vector = 0x50 }',
                           f'{{ op = "ipi", to = 0, vector = {0x50 + i} }}']) for i in range(1, N2)]
    return scenario([sender, *rx], design=design, l1_vcpus=N2, l2_vcpus=N2)


@pytest.mark.parametrize(("how", "sh", "self_too"), [('shorthand = "others"', 3, False),
                                                     ('shorthand = "all"', 2, True),
                                                     ("dest = 0xFF", 0, True)])
def test_dummy_broadcast_exits_id1_at_l0_and_reaches_every_target_once(how, sh, self_too):
    t = traced(_broadcast("dummy", how), on_build=watch_dummy, watch=check_dummy, sample_us=20)
    assert t.result["violations"] == [] and t.log["bad"] == []
    # The broadcast is the first L0 exit from l2.0 (the replies are directed ones from l2.1/l2.2).
    ex = [e for e in t.l0_l2_exits(INCOMPLETE_IPI) if e.vcpu == "l2.0"]
    assert len(ex) == 1
    lo, hi = ex[0].fields["info1"] & 0xFFFFFFFF, ex[0].fields["info1"] >> 32
    assert lo & 0xFF == 0x50 and (lo >> 18) & 3 == sh and (sh or hi >> 24 == 0xFF)
    # ID 1 (a valid dummy entry, IR = 0), index = the first entry the hardware walked.
    assert failure(ex[0]) == (1, 0 if self_too else 1)
    assert ex[0].fields["info2"] >> 32 == 1
    # Every L2 target exactly once, and nothing reflected to L1 (L1 says they all run).
    for i in range(N2):
        assert t.got(f"l2.{i}", 0x50) == (1 if i or self_too else 0), i
    assert [t.got("l2.0", 0x50 + i) for i in range(1, N2)] == [1] * (N2 - 1)
    assert INCOMPLETE_IPI not in t.exits("l1")
    assert t.counter("nested_ipi_emulations") == len(t.l0_l2_exits(INCOMPLETE_IPI)) == N2


def test_shadow_broadcast_needs_no_exit():
    """Contrast: with the shadow table (IR = 1 for running L2 vCPUs) the broadcast is accelerated."""
    t = traced(_broadcast("shadow", 'shorthand = "others"'))
    assert t.result["violations"] == []
    assert t.l0_l2_exits() == [] and INCOMPLETE_IPI not in t.exits("l1")
    assert [t.got(f"l2.{i}", 0x50) for i in range(N2)] == [0, 1, 1]


@pytest.mark.parametrize("design", ["shadow", "dummy"])
@pytest.mark.parametrize("dest", [1, 5])
def test_ipi_to_nonexistent_l2_apic_id_is_id2_for_l1(design, dest, monkeypatch):
    """L2 APIC IDs 0 and 2: L1's table has entries 0..2 with entry 1 invalid. An IPI to ID 1 (inside
    MAX_INDEX) or 5 (beyond it) must reach L1 as AVIC_INCOMPLETE_IPI ID 2 with that index, as real
    hardware would have shown L1. Under shadow the hardware says so itself (shadow entry 1 invalid);
    under dummy the hardware sees a valid dummy entry 1 and exits ID 1 — L0 recomputes ID 2."""
    raw = []
    orig = C.NestedSvm.handle_l2_exit

    def handle_l2_exit(self, vcpu, code):
        if code == 0x401:
            raw.append(vcpu.nested.vmcb02.exit_info_2)
        return (yield from orig(self, vcpu, code))

    monkeypatch.setattr(C.NestedSvm, "handle_l2_exit", handle_l2_exit)
    sender = prog("l2.0", ['{ op = "sti" }', f'{{ op = "ipi", dest = {dest}, vector = 0x50 }}',
                           '{ op = "ipi", to = 1, vector = 0x52 }', '{ op = "wait", vector = 0x51 }'])
    rx = prog("l2.1", ['{ op = "sti" }', '{ op = "wait", vector = 0x52 }', '{ op = "ipi", to = 0, vector = 0x51 }'])
    t = traced(scenario([sender, rx], design=design, l2="apic_ids = [0, 2]"))
    assert t.result["violations"] == [] and t.result["errors"] == []
    (e,) = t.nested_vmexits(INCOMPLETE_IPI)
    assert e.vcpu == "l2.0" and failure(e) == (2, dest) and e.fields["info2"] >> 32 == 2
    assert e.fields["info1"] & 0xFF == 0x50
    # L1's KVM handled it (avic_incomplete_ipi_interception at L1: emulate → no target).
    (k,) = t.ev("kvm_avic_incomplete_ipi")
    assert (k.vcpu, k.fields["id"], k.fields["index"]) == ("l2.0", 2, dest)
    assert t.exits("l1")[INCOMPLETE_IPI] == 1
    assert not any(d["vector"] == 0x50 for d in t.result["deliveries"])
    assert t.got("l2.1", 0x52) == 1 and t.got("l2.0", 0x51) == 1
    # What the silicon reported for the bad IPI (the first AVIC exit from L2).
    expect_raw = 1 if (design == "dummy" and dest <= 2) else 2
    assert raw[0] >> 32 == expect_raw
