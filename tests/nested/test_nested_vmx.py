"""Nested VMX (``cpu = "spr"``): L1's KVM (the same VmxVendor) runs on L0's virtual VMX and offers
L2 APICv/IPIv per design (digest §6.3 step 8, §7; docs/model.md "Nested VMX").

* ``none``: L1 has no APICv; it emulates L2's APIC (APIC-access / MSR exits reflected to L1).
* ``dummy``: vmcs02 has APICv with L2's real virtual-APIC page and L1's PID, and IPIv with L0's
  EMPTY PID-pointer table: every L2 unicast ICR write takes one APIC-write exit to L0, which posts
  into the PID L1's own PID-pointer table names and notifies (PI processing in L2: no further exit).
  Anything IPIv would not accelerate with L1's table is reflected to L1 unchanged.
"""

from __future__ import annotations

import pytest
from _nested_util import pingpong, prog, scenario, traced

from navic.hv.nested import vmx_core as VC
from navic.hv.nested.ipi_emulation import L1TableIpiEmulation
from navic.hw import vmx as X
from navic.runner import UnsupportedScenario

N = 10
APIC_WRITE = "apic_write"
VMX_DESIGNS = ("none", "dummy")


def spr(text_fn, *a, **kw):
    return text_fn(*a, cpu="spr", **kw)


def _per_ipi(design: str, **kw) -> tuple[dict[str, dict[str, int]], object]:
    """Exits added by N more ping-pong rounds (2N more IPIs), free of start-up and end exits."""
    a = traced(spr(pingpong, design, n=N, **kw))
    b = traced(spr(pingpong, design, n=2 * N, **kw))
    for t, n in ((a, N), (b, 2 * N)):
        assert t.result["violations"] == [] and t.result["errors"] == []
        assert t.got("l2.1", 0x40) == n and t.got("l2.0", 0x41) == n
    delta = {}
    for lvl in ("l0", "l0_l2", "l1"):
        ea, eb = a.exits(lvl), b.exits(lvl)
        d = {k: eb.get(k, 0) - ea.get(k, 0) for k in set(ea) | set(eb)}
        delta[lvl] = {k: v for k, v in d.items() if v}
    return delta, b


@pytest.mark.parametrize("l2_apic", ["xapic", "x2apic"])
def test_vmx_l2_pingpong_exits_per_ipi_and_latency_order(l2_apic):
    """spr, 4 pCPUs, both L2 vCPUs' L1 vCPUs running, spinning waits."""
    ipis = 2 * N
    dummy, td = _per_ipi("dummy", l2_apic=l2_apic)
    none, tn = _per_ipi("none", l2_apic=l2_apic)
    # dummy: exactly one L0 exit per IPI (the APIC-write exit of the empty PID-pointer table, handled
    # by L0 alone), none reflected to L1, and the receiver takes the posted interrupt without exit.
    assert dummy == {"l0": {}, "l0_l2": {APIC_WRITE: ipis}, "l1": {}}
    assert {e.fields["info1"] for e in td.l0_l2_exits()} == {0x300}
    assert td.counter("nested_ipi_emulations") == td.exits("l0_l2")[APIC_WRITE] == 4 * N
    assert td.counter("posted_intr_processed") >= 4 * N - 2   # PI processing in L2 (the first may be at entry)
    # none: L1 emulates L2's APIC — exits at L0 (the L1 kick's external interrupt, VMRESUMEs) and at L1.
    icr = {"apic_access": 3 * ipis} if l2_apic == "xapic" else {"msr_write": 2 * ipis}
    assert none == {"l0": {"vmresume": (4 if l2_apic == "xapic" else 3) * ipis},
                    "l0_l2": {"external_interrupt": ipis},
                    "l1": {**icr, "external_interrupt": ipis}}
    assert tn.counter("nested_ipi_emulations") == 0
    assert td.l2_p50() < tn.l2_p50(), (td.l2_p50(), tn.l2_p50())


def test_vmx_dummy_vmcs02_uses_the_empty_table_and_l1s_pid():
    """While L2 runs: vmcs02 IPIv on with L0's all-zero table, posted interrupts through the PID
    L1 set up for that L2 vCPU with the nested notification vector; L1's own APICv is not
    inhibited (VMX KVM has no NESTED inhibit); the empty table is never written."""
    seen = []
    bad = []

    def on_build(kvm0, kvm1, log):
        design = kvm0.vendor.nested.design
        kvm0.host.mem.watch(design.table_hpa, lambda *a: bad.append(a))
        orig = kvm0.vendor.nested.run_l2

        def run_l2(vcpu):
            ctx02 = vcpu.ctx
            l2 = vcpu.nested.l2
            seen.append((ctx02.ipiv, ctx02.pid_table_hpa == design.table_hpa, ctx02.pi_nv,
                         ctx02.pid.hpa == kvm0.vendor.nested.l1mem.hpa(l2.pid.hpa), vcpu.apicv_active))
            return (yield from orig(vcpu))

        kvm0.vendor.nested.run_l2 = run_l2

    t = traced(spr(pingpong, "dummy", n=N), on_build=on_build)
    assert t.result["violations"] == [] and bad == []
    assert seen and set(seen) == {(True, True, X.POSTED_INTR_NESTED_VECTOR, True, True)}
    assert "NESTED" not in t.result["inhibits"]
    assert isinstance(t.design.ipis, L1TableIpiEmulation)
    mem = t.kvm.host.mem
    assert all(mem.read64(t.design.table_hpa + 8 * i) == 0 for i in range(512))


def test_svm_and_vmx_dummy_share_the_emulation_core():
    svm = traced(pingpong("dummy", n=2))
    vmx = traced(spr(pingpong, "dummy", n=2))
    assert type(svm.design.ipis) is type(vmx.design.ipis) is L1TableIpiEmulation
    assert svm.counter("nested_ipi_emulations") == vmx.counter("nested_ipi_emulations") == 4


@pytest.mark.parametrize("dest", [1, 5])
def test_vmx_dummy_ipi_to_nonexistent_l2_apic_id_is_reflected_to_l1(dest):
    """L2 APIC IDs 0 and 2: L1's PID-pointer table has no valid entry 1 (and entry 5 is beyond its
    LAST_PID_POINTER_INDEX). With L1's table IPIv would have exited APIC-write: L0 reflects exactly
    that, L1's KVM emulates it (no target); the next IPI (to ID 2) is L0's alone again."""
    sender = prog("l2.0", ['{ op = "sti" }', f'{{ op = "ipi", dest = {dest}, vector = 0x50 }}',
                           '{ op = "ipi", to = 1, vector = 0x52 }', '{ op = "wait", vector = 0x51 }'])
    rx = prog("l2.1", ['{ op = "sti" }', '{ op = "wait", vector = 0x52 }',
                       '{ op = "ipi", to = 0, vector = 0x51 }'])
    t = traced(scenario([sender, rx], design="dummy", cpu="spr", l2="apic_ids = [0, 2]"))
    assert t.result["violations"] == [] and t.result["errors"] == []
    (e,) = t.nested_vmexits(APIC_WRITE)
    assert e.vcpu == "l2.0" and e.fields["info1"] == 0x300
    assert t.exits("l1").get(APIC_WRITE) == 1
    # Three emulations: the reflected one (counted under l1) and the two directed IPIs (L0's alone).
    assert t.counter("nested_ipi_emulations") == 3
    assert t.exits("l0_l2") == {APIC_WRITE: 2}
    assert t.got("l2.1", 0x52) == 1 and t.got("l2.0", 0x51) == 1
    assert not any(d["vector"] == 0x50 for d in t.result["deliveries"])


def test_vmx_dummy_broadcast_is_reflected_and_reaches_every_target():
    """IPIv accelerates only physical unicast: a broadcast takes the APIC-write exit with L1's table
    too, so L0 reflects it and L1 emulates it — every target exactly once."""
    n2 = 3
    sender = prog("l2.0", ['{ op = "sti" }', '{ op = "ipi", shorthand = "others", vector = 0x50 }',
                           *[f'{{ op = "wait", vector = {0x50 + i} }}' for i in range(1, n2)]])
    rx = [prog(f"l2.{i}", ['{ op = "sti" }', '{ op = "wait", vector = 0x50 }',
                           f'{{ op = "ipi", to = 0, vector = {0x50 + i} }}']) for i in range(1, n2)]
    t = traced(scenario([sender, *rx], design="dummy", cpu="spr", l1_vcpus=n2, l2_vcpus=n2))
    assert t.result["violations"] == [] and t.result["errors"] == []
    assert [t.got(f"l2.{i}", 0x50) for i in range(n2)] == [0, 1, 1]
    assert [t.got("l2.0", 0x50 + i) for i in range(1, n2)] == [1] * (n2 - 1)
    (e,) = t.nested_vmexits(APIC_WRITE)
    assert e.vcpu == "l2.0" and t.exits("l1").get(APIC_WRITE) == 1
    # The two directed replies are L0's alone; the broadcast was emulated, then reflected.
    assert t.exits("l0_l2")[APIC_WRITE] == n2 - 1
    assert t.counter("nested_ipi_emulations") == n2


OVERCOMMIT = {
    "l0": dict(pcpus=1, l0="timeslice_us = 100\nhalt_poll_ns = 0"),   # 2 L1 vCPUs on 1 pCPU
    "l1": dict(l1_vcpus=1, l1="timeslice_us = 100", l0="halt_poll_ns = 0"),   # 2 L2 vCPUs on 1 L1 vCPU
}


@pytest.mark.parametrize("design", VMX_DESIGNS)
@pytest.mark.parametrize("where", sorted(OVERCOMMIT))
@pytest.mark.parametrize("how", ["hlt", "spin"])
def test_vmx_overcommit_delivers_every_ipi(design, where, how):
    t = traced(spr(pingpong, design, n=N, how=how, max_time_us=50000, **OVERCOMMIT[where]))
    r = t.result
    assert r["violations"] == [] and r["errors"] == []
    assert t.got("l2.1", 0x40) == N and t.got("l2.0", 0x41) == N
    assert r["sim_time_cycles"] < 50000 * 3000          # finished, not cut off at max_time_us
    assert t.counter("nested_vmrun") == t.counter("nested_vmexit") > 0


def test_vmx_l1_interrupt_while_l2_runs_is_a_nested_exit():
    """An interrupt for L1 itself (its reschedule IPI, posted by L0's IPIv into the L1 vCPU's PID)
    reaches a pCPU running vmcs02: the notification vector is not vmcs02's, so it exits to L0,
    which sees the L1 event and makes a nested VM exit (external interrupt) to L1."""
    t = traced(spr(pingpong, "none", n=N))
    assert t.result["violations"] == []
    ext = t.nested_vmexits("external_interrupt")
    assert len(ext) >= 2 * N
    assert len(t.l0_l2_exits("external_interrupt")) >= 2 * N


def test_vmx_shadow_is_unsupported_with_a_clear_message():
    with pytest.raises(UnsupportedScenario, match="shadow.*not implemented on VMX"):
        traced(spr(pingpong, "shadow", n=1))


def test_vmx_designs_are_the_ones_built():
    assert VC.VMX_DESIGNS == VMX_DESIGNS


@pytest.mark.parametrize("design", VMX_DESIGNS)
def test_vmx_event_injected_by_l1_survives_a_nested_exit_before_entry(design):
    """Halting L2 vCPUs (no overcommit): L1 often injects an interrupt into vmcs12 and VMRESUMEs just
    as an interrupt for L1 itself arrives, so L0 exits to L1 before entering L2. The injected event
    must go back to vmcs12 (KVM: IDT-vectoring info → re-queued), not vanish."""
    t = traced(spr(pingpong, design, n=2 * N, how="hlt", max_time_us=50000))
    r = t.result
    assert r["violations"] == [] and r["errors"] == []
    assert t.got("l2.1", 0x40) == 2 * N and t.got("l2.0", 0x41) == 2 * N
    assert r["sim_time_cycles"] < 50000 * 3000
