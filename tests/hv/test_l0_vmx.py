"""KVM at L0 on Intel VMX (cpu = "spr"): APICv, posted interrupts and IPI virtualisation, end to end.

Every test runs a scenario through the whole stack (guest program -> VMX non-root silicon -> KVM's VMX
code) and asserts the exits KVM took (names and qualifications from the ``kvm_exit`` trace), the state
of the posted-interrupt descriptors at the moments that matter (snapshotted by wrapping the silicon's
posted-interrupt processing, the wake-up handler and ``vmx_vcpu_pi_load``), and the deliveries.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _kvm_util import prog, scenario, traced

from navic.apic.registers import APIC_LDR
from navic.hv import kvm as K
from navic.hv import vmx as HV
from navic.hw import vmx as X
from navic.hw import vmx_guest as HW
from navic.runner import run_scenario
from navic.scenario import loads_scenario

STI = '{ op = "sti" }'
VEC = 0x40


def spin(vec: int = VEC, count: int = 1) -> list[str]:
    return [STI, f'{{ op = "wait", vector = {vec:#x}, count = {count}, how = "spin" }}']


def hlt(vec: int = VEC, count: int = 1) -> list[str]:
    return [STI, f'{{ op = "wait", vector = {vec:#x}, count = {count}, how = "hlt" }}']


def after(cycles: int, *ops: str) -> list[str]:
    return [STI, f'{{ op = "compute", cycles = {cycles} }}', *ops]


def spr(programs: list[str], *, l0: str = "", **kw) -> str:
    return scenario(programs, cpu="spr", l0=l0, **kw)


def clean(t) -> None:
    assert t.result["violations"] == []
    assert t.result["errors"] == []


def pid_state(pid: X.PostedInterruptDesc) -> dict:
    return {"on": pid.on, "sn": pid.sn, "nv": pid.nv, "ndst": pid.ndst, "pir": pid.pir}


def snoop(monkeypatch, cls, name: str, grab) -> list:
    """Wrap ``cls.name``; before each call append ``grab(*args)`` to the returned list."""
    seen: list = []
    orig = getattr(cls, name)

    def wrapper(*a, **kw):
        seen.append(grab(*a, **kw))
        return orig(*a, **kw)

    monkeypatch.setattr(cls, name, wrapper)
    return seen


def exits_of(t, vcpu: str) -> list[tuple[str, int]]:
    """(reason, qualification) of every exit of ``vcpu`` except HLT (a program that ends halts)."""
    return [(e.fields["reason"], e.fields["info1"]) for e in t.busy_exits(vcpu)]


# =====================================================================================================
# Fixed physical unicast to a running target
# =====================================================================================================
@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
def test_unicast_running_target_ipiv_no_exit(monkeypatch, apic):
    """IPIv: the silicon sets PIR[v] and ON in the target's PID and sends POSTED_INTR_VECTOR to its
    pCPU; the target, in non-root mode, merges PIR into vIRR without an exit; nobody exits."""
    seen = snoop(monkeypatch, HW.Vmx, "_process_posted", lambda self, ctx: (ctx.name, pid_state(ctx.pid)))
    t = traced(spr([prog(0, after(20000, f'{{ op = "ipi", to = 1, vector = {VEC:#x} }}')), prog(1, spin())],
                   apic=apic))
    clean(t)
    assert t.got() == [("l1.1", VEC, "fixed")]
    assert t.result["deliveries"][0]["sent_by"] == "l1.0"
    assert t.busy_exits() == []                     # neither the sender nor the target exits
    assert t.counter("ipiv_ipis") == 1 and t.counter("emulated_ipis") == 0
    # The notification: a host IPI with the posted-interrupt vector to l1.1's pCPU (1) ...
    assert [(e.fields["kind"], e.fields["dest"]) for e in t.ev("navic_host_ipi")] == [("posted_intr", 1)]
    # ... processed in non-root mode with PIR[v] and ON set by the silicon.
    assert seen == [("l1.1", {"on": True, "sn": False, "nv": X.POSTED_INTR_VECTOR, "ndst": 1, "pir": 1 << VEC})]
    pid = t.kvm.vcpus[1].pid
    assert not pid.on and pid.pir == 0


@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
def test_unicast_running_target_ipiv_off_exit_emulate_post(monkeypatch, apic):
    """enable_ipiv = false: the sender's ICR write exits (xAPIC: trap-like APIC-write with the write
    in the page; x2APIC: KVM intercepts the ICR MSR), KVM emulates it and posts: PIR + ON, then the
    POSTED_INTR_VECTOR notification; the running target still takes it without exiting."""
    seen = snoop(monkeypatch, HW.Vmx, "_process_posted", lambda self, ctx: (ctx.name, pid_state(ctx.pid)))
    t = traced(spr([prog(0, after(20000, f'{{ op = "ipi", to = 1, vector = {VEC:#x} }}')), prog(1, spin())],
                   apic=apic, l0="ipiv = false"))
    clean(t)
    assert not t.kvm.vendor.enable_ipiv and t.kvm.vendor.enable_apicv
    assert t.got() == [("l1.1", VEC, "fixed")]
    want = ("apic_write", 0x300) if apic == "xapic" else ("msr_write", 0)
    assert exits_of(t, "l1.0") == [want]
    assert exits_of(t, "l1.1") == []
    assert t.counter("emulated_ipis") == 1 and t.counter("ipiv_ipis") == 0
    assert t.counter("posted_intr_notifications") == 1       # KVM's notification (vmx_deliver_posted_interrupt)
    assert seen == [("l1.1", {"on": True, "sn": False, "nv": X.POSTED_INTR_VECTOR, "ndst": 1, "pir": 1 << VEC})]


# =====================================================================================================
# Blocked target: the wake-up vector
# =====================================================================================================
@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
def test_unicast_to_blocked_target_wakeup_vector(monkeypatch, apic):
    """The target halts (halt polling off) with IF = 1: vmx_vcpu_pi_put switches NV to the wake-up
    vector and queues it on its pCPU's wake-up list. The sender's virtualised IPI then notifies the
    wake-up vector; pi_wakeup_handler finds ON set and wakes it; vmx_vcpu_pi_load restores NV."""
    def at_wakeup(self, cpu):
        v = self.kvm.vcpus[1]
        return cpu, [w.name for w in self.wakeup_list[cpu]], pid_state(v.pid), v.blocked

    seen = snoop(monkeypatch, HV.VmxVendor, "pi_wakeup_handler", at_wakeup)
    loads = snoop(monkeypatch, HV.VmxVendor, "pi_load", lambda self, v, cpu: (v.name, pid_state(v.pid)))
    t = traced(spr([prog(0, after(30000, f'{{ op = "ipi", to = 1, vector = {VEC:#x} }}')), prog(1, hlt())],
                   apic=apic, l0="halt_poll_ns = 0"))
    clean(t)
    assert t.got() == [("l1.1", VEC, "fixed")]
    assert exits_of(t, "l1.0") == []                # the sender never exits: IPIv to a blocked vCPU
    assert t.counter("ipiv_ipis") == 1
    kinds = [(e.fields["kind"], e.fields["dest"]) for e in t.ev("navic_host_ipi")]
    assert kinds == [("pi_wakeup", 1)]
    assert seen == [(1, ["l1.1"], {"on": True, "sn": False, "nv": X.POSTED_INTR_WAKEUP_VECTOR, "ndst": 1,
                                   "pir": 1 << VEC}, True)]
    assert t.counter("pi_wakeups") == 1 and t.counter("wakeups") == 1
    # The sched-in after the wake-up found NV = wake-up vector and restored the posted vector.
    assert ("l1.1", X.POSTED_INTR_WAKEUP_VECTOR) in [(name, st["nv"]) for name, st in loads]
    t_wake = next(e.t for e in t.ev("kvm_vcpu_wakeup", "l1.1"))
    after_wake = next(e for e in t.ev("navic_vmx_pi_load", "l1.1") if e.t >= t_wake)
    ctl = after_wake.fields["control"]
    assert (ctl & X.PID_NV_MASK) >> X.PID_NV_SHIFT == X.POSTED_INTR_VECTOR and not ctl & X.PID_SN
    # The delivery paid the wake-up (schedule-in) cost.
    assert t.result["deliveries"][0]["latency"] > t.kvm.costs.VCPU_WAKE


def test_blocked_target_with_if0_is_suppressed_not_woken(monkeypatch):
    """A vCPU that halts with interrupts disabled cannot be woken by an interrupt: KVM sets SN
    instead of arming the wake-up vector, so the IPI posts silently (no host IPI) and stays pending."""
    t = traced(spr([prog(0, after(30000, f'{{ op = "ipi", to = 1, vector = {VEC:#x} }}')),
                    prog(1, ['{ op = "cli" }', '{ op = "hlt" }'])], l0="halt_poll_ns = 0", max_time_us=100))
    assert t.got() == []
    assert t.ev("navic_host_ipi") == [] and t.counter("ipiv_ipis") == 1
    pid = t.kvm.vcpus[1].pid
    assert pid.sn and not pid.on and pid.pir == 1 << VEC and pid.nv == X.POSTED_INTR_VECTOR
    assert t.kvm.vendor.wakeup_list[1] == []


# =====================================================================================================
# Preempted target: SN = 1
# =====================================================================================================
@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
def test_unicast_to_preempted_target_suppressed_then_delivered_at_load(monkeypatch, apic):
    """l1.2 shares pCPU 0 with a busy l1.0 under a 5 µs slice. While it is preempted its PID has
    SN = 1: the silicon sets PIR[v] but neither ON nor a notification; when L0 schedules it back in,
    vmx_vcpu_pi_load clears SN and sets ON (PIR not empty) and the entry's sync delivers it."""
    posts = snoop(monkeypatch, HW.Vmx, "_icr_write",
                  lambda self, pcpu, ctx, lo, hi, x2: pid_state(
                      next(o for o in self.pid_owner.values() if o.name == "l1.2").pid))
    loads = snoop(monkeypatch, HV.VmxVendor, "pi_load",
                  lambda self, v, cpu: (v.name, pid_state(v.pid), self.kvm.engine.now))
    progs = [prog(0, [STI, '{ op = "repeat", times = 200, ops = [ { op = "compute", cycles = 1000 } ] }']),
             prog(1, after(40000, f'{{ op = "ipi", to = 2, vector = {VEC:#x} }}')),
             prog(2, spin())]
    t = traced(spr(progs, apic=apic, vcpus=3, pcpus=2, l0="timeslice_us = 5\nhalt_poll_ns = 0"))
    clean(t)
    assert t.got() == [("l1.2", VEC, "fixed")]
    assert exits_of(t, "l1.1") == []
    assert len(posts) == 1 and posts[0]["sn"] and not posts[0]["on"]   # target preempted at send time
    assert t.ev("navic_host_ipi") == []                                # SN: no notification at all
    assert t.counter("ipiv_ipis") == 1 and t.counter("ipiv_notifications") == 0
    # The first load of l1.2 after the post found SN = 1 with PIR[v] set; it cleared SN and set ON.
    first = next(s for name, s, _ in loads if name == "l1.2" and s["pir"])
    assert first["sn"] and not first["on"] and first["pir"] == 1 << VEC
    t_load = next(tt for name, st, tt in loads if name == "l1.2" and st["pir"])
    ctl = next(e for e in t.ev("navic_vmx_pi_load", "l1.2") if e.t == t_load).fields["control"]
    assert ctl & X.PID_ON and not ctl & X.PID_SN                      # ... and left SN = 0, ON = 1
    assert t.result["deliveries"][0]["latency"] > t.kvm.costs.CONTEXT_SWITCH


# =====================================================================================================
# Non-virtualisable IPIs: logical, broadcast, shorthands
# =====================================================================================================
def _xapic_ldr(i: int) -> str:
    return f'{{ op = "write", reg = "LDR", value = {(1 << i) << 24:#x} }}'


@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
@pytest.mark.parametrize("kind", ["logical", "broadcast", "others", "all"])
def test_non_unicast_ipis_take_apic_write_exit(kind, apic):
    """IPIv virtualises only physical fixed edge unicast: logical, broadcast and shorthand IPIs make
    the sender take a trap-like APIC-write exit (qualification 300h, also for x2APIC MSR 830h); KVM
    emulates them and posts to every target."""
    bcast = 0xFF if apic == "xapic" else 0xFFFFFFFF
    ipi = {
        "logical": f'{{ op = "ipi", dest = 0b110, dest_mode = "logical", vector = {VEC:#x} }}',
        "broadcast": f'{{ op = "ipi", dest = {bcast:#x}, vector = {VEC:#x} }}',
        "others": f'{{ op = "ipi", shorthand = "others", vector = {VEC:#x} }}',
        "all": f'{{ op = "ipi", shorthand = "all", vector = {VEC:#x} }}',
    }[kind]

    def p(i: int, ops: list[str]) -> str:
        pre = [_xapic_ldr(i)] if apic == "xapic" else []
        return prog(i, pre + ops)

    progs = [p(0, after(30000, ipi) + spin() if kind == "all" else after(30000, ipi)),
             p(1, spin()), p(2, spin())]
    t = traced(spr(progs, apic=apic, vcpus=3))
    clean(t)
    # Physical broadcast includes the sender (its default handler takes it); "others" excludes it.
    want = {"logical": ["l1.1", "l1.2"], "broadcast": ["l1.0", "l1.1", "l1.2"], "others": ["l1.1", "l1.2"],
            "all": ["l1.0", "l1.1", "l1.2"]}[kind]
    assert sorted(c for c, _, _ in t.got()) == want
    # xAPIC: each program's LDR write is itself a trap-like APIC-write exit (KVM recalculates the map).
    ldr = [("apic_write", APIC_LDR)] if apic == "xapic" else []
    assert exits_of(t, "l1.0") == ldr + [("apic_write", 0x300)]
    assert t.counter("emulated_ipis") == 1 and t.counter("ipiv_ipis") == 0
    assert exits_of(t, "l1.1") == ldr and exits_of(t, "l1.2") == ldr


@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
def test_self_ipi_is_virtualised(apic):
    """Self-IPI virtualisation (ICR with the self shorthand; x2APIC SELF_IPI MSR): VIRR + RVI, no exit."""
    ops = [STI, f'{{ op = "ipi", shorthand = "self", vector = {VEC:#x} }}',
           f'{{ op = "wait", vector = {VEC:#x}, how = "spin" }}']
    if apic == "x2apic":
        ops += [f'{{ op = "write", reg = "SELF_IPI", value = {VEC + 1:#x} }}',
                f'{{ op = "wait", vector = {VEC + 1:#x}, how = "spin" }}']
    t = traced(spr([prog(0, ops)], apic=apic, vcpus=1))
    clean(t)
    assert [v for _, v, _ in t.got()] == ([VEC] if apic == "xapic" else [VEC, VEC + 1])
    assert t.busy_exits() == []


# =====================================================================================================
# EOI: level-triggered vectors are in the EOI-exit bitmap
# =====================================================================================================
@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
def test_level_eoi_takes_eoi_induced_exit(monkeypatch, apic):
    """A level-triggered interrupt (not virtualisable by IPIv: the sender exits, KVM emulates and sets
    TMR) puts its vector in the EOI-exit bitmap; the guest's EOI is virtualised (vISR cleared) and then
    exits EOI-induced with the vector as qualification; KVM runs the level-EOI side. An edge vector's
    EOI never exits."""
    seen = snoop(monkeypatch, K._LapicHooks, "eoi_level",
                 lambda self, apic, vector: (self.vcpu.name, vector, apic.test_isr(vector), self.vcpu.ctx.svi))
    progs = [prog(0, after(20000, f'{{ op = "ipi", to = 1, vector = {VEC:#x}, trigger = "level" }}',
                           '{ op = "compute", cycles = 20000 }',
                           f'{{ op = "ipi", to = 1, vector = {VEC + 1:#x} }}')),
             prog(1, spin() + spin(VEC + 1))]
    t = traced(spr(progs, apic=apic))
    clean(t)
    assert [v for _, v, _ in t.got()] == [VEC, VEC + 1]
    assert exits_of(t, "l1.0") == [("apic_write", 0x300)]       # level: not virtualised
    assert exits_of(t, "l1.1") == [("eoi_induced", VEC)]        # only the level vector's EOI exits
    assert seen == [("l1.1", VEC, False, 0)]                     # the EOI was already virtualised
    assert t.counter("level_eois") == 1


def test_level_eoi_without_apicv_is_an_msr_exit():
    t = traced(spr([prog(0, after(20000, f'{{ op = "ipi", to = 1, vector = {VEC:#x}, trigger = "level" }}')),
                    prog(1, spin())], l0="apicv = false"))
    clean(t)
    assert [r for r, _ in exits_of(t, "l1.1")] == ["external_interrupt", "msr_write"]   # kick, EOI
    assert t.counter("level_eois") == 1


# =====================================================================================================
# APICv off: injection through the VM-entry interruption information and interrupt windows
# =====================================================================================================
@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
def test_apicv_off_everything_emulated(apic):
    """[l0] apicv = false: the ICR write exits (xAPIC: APIC-access, fault-like, emulated; x2APIC: MSR),
    KVM sets IRR and kicks the running target (reschedule IPI -> external-interrupt exit), injects at
    entry; the handler's EOI exits too."""
    t = traced(spr([prog(0, after(20000, f'{{ op = "ipi", to = 1, vector = {VEC:#x} }}')), prog(1, spin())],
                   apic=apic, l0="apicv = false"))
    clean(t)
    assert "DISABLED" in t.result["inhibits"]
    assert t.got() == [("l1.1", VEC, "fixed")]
    if apic == "xapic":
        assert exits_of(t, "l1.0") == [("apic_access", 0x1310), ("apic_access", 0x1300)]   # ICR2, ICR
        assert exits_of(t, "l1.1") == [("external_interrupt", 0), ("apic_access", 0x10B0)]  # kick, EOI
    else:
        assert exits_of(t, "l1.0") == [("msr_write", 0)]
        assert exits_of(t, "l1.1") == [("external_interrupt", 0), ("msr_write", 0)]
    assert t.counter("kicks") == 1 and t.counter("posted_intr_processed") == 0


def test_apicv_off_interrupt_window():
    """With IF = 0 at the kick KVM cannot inject: it requests an interrupt window; the guest's STI
    opens it (exit interrupt_window) and the next entry injects."""
    t = traced(spr([prog(0, after(20000, f'{{ op = "ipi", to = 1, vector = {VEC:#x} }}')),
                    prog(1, ['{ op = "compute", cycles = 40000 }', *spin()])], l0="apicv = false"))
    clean(t)
    assert t.got() == [("l1.1", VEC, "fixed")]
    assert [r for r, _ in exits_of(t, "l1.1")] == ["external_interrupt", "interrupt_window", "msr_write"]


# =====================================================================================================
# Ping-pong: bare metal < APICv+IPIv < APICv without IPIv < APICv off
# =====================================================================================================
PINGPONG = (Path(__file__).resolve().parents[2] / "examples" / "ipi-pingpong.toml").read_text()
N = 200


def _pingpong(apic: str, virt: str, l0: str = "") -> dict:
    text = (PINGPONG.replace('virt = "none"', f'virt = "{virt}"').replace('cpu = "zen4"', 'cpu = "spr"')
            .replace('apic = "x2apic"', f'apic = "{apic}"').replace('how = "hlt"', 'how = "spin"'))
    if l0:
        text += f"\n[l0]\n{l0}\n"
    r = run_scenario(loads_scenario(text, "pp.toml"))
    assert r["violations"] == [] and r["errors"] == [] and len(r["deliveries"]) == N
    exits = sum(n for reason, n in r["exits"].get("l0", {}).items() if reason != "hlt")
    return {"exits_per_ipi": exits / N, "lat": r["counters"]["latency_p50_cycles"], "r": r}


@pytest.mark.parametrize("apic", ["xapic", "x2apic"])
def test_pingpong_ordering(apic):
    bm = _pingpong(apic, "none")
    iv = _pingpong(apic, "kvm")
    nv = _pingpong(apic, "kvm", "ipiv = false")
    off = _pingpong(apic, "kvm", "apicv = false")
    assert bm["r"]["exits"] == {}
    assert bm["exits_per_ipi"] == iv["exits_per_ipi"] == 0          # IPIv: no exit per IPI at all
    assert iv["exits_per_ipi"] < nv["exits_per_ipi"] < off["exits_per_ipi"]
    assert nv["exits_per_ipi"] == 1                                   # the sender's ICR write
    assert off["exits_per_ipi"] >= 3                                  # ICR, kick, EOI (xAPIC: + ICR2)
    assert bm["lat"] < iv["lat"] < nv["lat"] < off["lat"]
