"""Invariants of digest §9.2 on the real physical APIC ID table over busy, overcommitted runs:

1. IR = 1 in the real table ⇒ enable_ipiv, and the vCPU is loaded, not blocking, on the pCPU
   whose host APIC ID the entry names;
2. every created vCPU with APICv active has a Valid entry;
and with enable_ipiv off no write ever puts IR = 1 into the real table (host.mem.watch).
The checks run on every table write and every simulated microsecond (_kvm_util.traced).
"""

from __future__ import annotations

import pytest
from _kvm_util import prog, scenario, traced

from navic.hw import avic as A

ROUNDS = 15


def _storm(cpu: str, apic: str, ipiv: str, extra_ops: str = "") -> str:
    """A token ring over 4 vCPUs on 2 pCPUs (overcommitted, 5 µs slices): l1.0 sends 0x40 to l1.1,
    each vCPU passes it on after some work; odd vCPUs halt while waiting, even ones spin. Ends with
    a broadcast."""
    progs = []
    for i in range(4):
        how = "hlt" if i % 2 else "spin"
        send = f'{{ op = "ipi", to = {(i + 1) % 4}, vector = 0x40 }}'
        wait = f'{{ op = "wait", vector = 0x40, how = "{how}" }}'
        work = '{ op = "compute", cycles = 3000 }'
        body = f"{send}, {wait}" if i == 0 else f"{wait}, {work}, {send}"
        ops = ['{ op = "sti" }', extra_ops if i == 3 else "",
               f'{{ op = "repeat", times = {ROUNDS}, ops = [ {body} ] }}',
               '{ op = "ipi", shorthand = "others", vector = 0x50 }']
        progs.append(prog(i, [o for o in ops if o]))
    return scenario(progs, cpu=cpu, apic=apic, vcpus=4, pcpus=2,
                    l0=f"ipiv = {ipiv}\ntimeslice_us = 5\nhalt_poll_ns = 2000\n", max_time_us=5000)


@pytest.mark.parametrize("cpu, apic", [("zen4", "x2apic"), ("zen4", "xapic"), ("zen2", "xapic")])
@pytest.mark.parametrize("ipiv", ["true", "false"])
def test_table_invariants_hold_under_overcommit(monkeypatch, cpu, apic, ipiv):
    t = traced(_storm(cpu, apic, ipiv), monkeypatch=monkeypatch, sample_us=0.5)
    assert t.result["violations"] == [] and t.result["errors"] == []
    assert t.ir_violations == []
    assert sum(1 for d in t.result["deliveries"] if d["vector"] == 0x40) == 4 * ROUNDS
    assert t.counter("preemptions") > 0 and t.counter("blocks") > 0
    ir_writes = [e for _, _, e in t.real_writes if e & A.PHYS_IS_RUNNING]
    if ipiv == "true":
        assert ir_writes                                   # IsRunning really is exposed
    else:
        assert t.real_writes and ir_writes == []           # never, not even transiently
        # ... while KVM's shadow entries do track running state.
        assert any(e.fields["entry"] & A.PHYS_IS_RUNNING for e in t.ev("navic_avic_vcpu_load"))
    # Every created vCPU's entry is Valid and names its own backing page.
    for v in t.kvm.vcpus:
        e = t.kvm.mem.read64(t.kvm.vendor.avic.physical_entry_hpa(v.vcpu_id))
        assert e & A.PHYS_VALID and A.phys_entry_backing(e) == v.backing_hpa


def test_deactivation_clears_is_running(monkeypatch):
    """APIC_ID_MODIFIED mid-run (l1.3 rewrites its xAPIC ID): AVIC goes off VM-wide, every entry
    loses IsRunning (__avic_vcpu_put(AVIC_DEACTIVATE)), and delivery keeps working."""
    t = traced(_storm("zen4", "xapic", "true", '{ op = "write", reg = "ID", value = 0x03000000 }'),
               monkeypatch=monkeypatch, sample_us=0.5)
    assert t.result["inhibits"] == {}                      # same ID: not a modification
    t = traced(_storm("zen4", "xapic", "true", '{ op = "write", reg = "ID", value = 0x09000000 }'),
               monkeypatch=monkeypatch, sample_us=0.5)
    assert "APIC_ID_MODIFIED" in t.result["inhibits"]
    assert t.ir_violations == [] and t.result["errors"] == []
    t_inh = t.result["inhibits"]["APIC_ID_MODIFIED"][0][0]
    from navic.hv.kvm import REQ_APICV_UPDATE

    for v in t.kvm.vcpus:
        # Deactivated, or blocked since before the inhibit: KVM_REQ_APICV_UPDATE is NO_WAKEUP, so
        # the vCPU still has the request pending (it applies it at its next entry).
        assert not v.apicv_active or (v.blocked and REQ_APICV_UPDATE in v.requests)
        assert not t.kvm.mem.read64(t.kvm.vendor.avic.physical_entry_hpa(v.vcpu_id)) & A.PHYS_IS_RUNNING
    # Deliveries after the inhibit are emulated; the ring to l1.3 now uses a stale ID 3 that no
    # longer matches anyone, so only the other three ring hops are checked.
    late = [d for d in t.result["deliveries"] if d["t"] > t_inh and d["vector"] == 0x40 and d["cpu"] != "l1.3"]
    assert late and t.counter("emulated_ipis") > 0
