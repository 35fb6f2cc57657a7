"""Helpers for the L0 (KVM on SVM/AVIC) tests: scenario text builders, traced runs, exit-info
decoding, and invariant watchers on the real physical APIC ID table (digest §9.2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import navic.runner as runner
from navic.hw import avic as A
from navic.scenario import loads_scenario

EXIT_INCOMPLETE_IPI = "avic_incomplete_ipi"
EXIT_NOACCEL = "avic_unaccelerated_access"


def prog(cpu: int, ops: list[str] | str, handlers: dict[int, str] | None = None) -> str:
    """One ``[[program]]`` for ``l1.<cpu>``; ``ops`` are inline-table strings."""
    if isinstance(ops, list):
        ops = ", ".join(ops)
    text = f'[[program]]\ncpu = "l1.{cpu}"\nops = [ {ops} ]\n'
    if handlers:
        text += "[program.handlers]\n" + "".join(f"{v:#x} = [ {h} ]\n" for v, h in handlers.items())
    return text


AVIC_OPT_IN = ("zen1", "zen2", "zen3")   # kvm_amd avic "auto" leaves AVIC off there (avic_want_avic_enabled)


def scenario(programs: list[str], *, cpu: str = "zen4", apic: str = "x2apic", vcpus: int = 2,
             pcpus: int = 4, virt: str = "kvm", l0: str = "", l1: str = "", max_time_us: float = 2000,
             seed: int = 1) -> str:
    """A scenario; on zen1–3 these tests study AVIC, so kvm_amd is loaded with ``avic = true``
    unless ``l0`` says otherwise."""
    if cpu in AVIC_OPT_IN and "avic" not in l0.replace("force_avic", ""):
        l0 = "avic = true\n" + l0
    return (f'name = "t"\nseed = {seed}\nmax_time_us = {max_time_us}\n'
            f'[host]\ncpu = "{cpu}"\npcpus = {pcpus}\nvirt = "{virt}"\n'
            f'[l0]\n{l0}\n[l1]\nvcpus = {vcpus}\napic = "{apic}"\n{l1}\n' + "".join(programs))


@dataclass
class Traced:
    """A finished traced run plus its JSON result and what the table watchers saw."""

    run: Any
    result: dict[str, Any]
    real_writes: list[tuple[int, int, int]] = field(default_factory=list)  # (t, index, entry)
    ir_violations: list[str] = field(default_factory=list)

    @property
    def kvm(self) -> Any:
        return self.run.kvm

    @property
    def events(self) -> list[Any]:
        return self.run.trace.events

    def ev(self, name: str, vcpu: str | None = None) -> list[Any]:
        return [e for e in self.events if e.name == name and (vcpu is None or e.vcpu == vcpu)]

    def exits(self, reason: str | None = None, vcpu: str | None = None) -> list[Any]:
        return [e for e in self.ev("kvm_exit", vcpu) if reason is None or e.fields["reason"] == reason]

    def busy_exits(self, vcpu: str | None = None) -> list[Any]:
        """Every exit except HLT (a program that ends halts, which exits)."""
        return [e for e in self.ev("kvm_exit", vcpu) if e.fields["reason"] != "hlt"]

    def incomplete_ipis(self, vcpu: str | None = None) -> list[tuple[int, int, int, int]]:
        """(icr_lo, icr_hi, failure ID, index) of every AVIC_INCOMPLETE_IPI, decoded from the
        exit's EXITINFO1/2 exactly as KVM does."""
        return [A.incomplete_ipi_decode(e.fields["info1"], e.fields["info2"])
                for e in self.exits(EXIT_INCOMPLETE_IPI, vcpu)]

    def noaccels(self, vcpu: str | None = None) -> list[tuple[int, bool, int]]:
        """(offset, write, vector) of every AVIC_NOACCEL exit."""
        return [A.noaccel_decode(e.fields["info1"], e.fields["info2"]) for e in self.exits(EXIT_NOACCEL, vcpu)]

    def l0_exits(self) -> dict[str, int]:
        return self.result["exits"].get("l0", {})

    def got(self) -> list[tuple[str, int, str]]:
        return sorted((d["cpu"], d["vector"], d["kind"]) for d in self.result["deliveries"])

    def counter(self, name: str) -> int:
        return self.result["counters"].get(name, 0)


def run(text: str) -> dict[str, Any]:
    return runner.run_scenario(loads_scenario(text, "t.toml"))


def traced(text: str, *, monkeypatch: Any = None, check_ir: bool = True, sample_us: float = 1.0) -> Traced:
    """Run with tracing on. With ``monkeypatch``, watch every write to the real physical table and
    check invariants 1/2 of digest §9.2 on each write and every ``sample_us`` of simulated time:

    * IR = 1 in the real table ⇒ enable_ipiv, APICv active for the vCPU, and it is loaded (not
      blocking) on the pCPU whose host APIC ID the entry names;
    * every created vCPU has a Valid entry while APICv is active for it.
    """
    box: dict[str, Any] = {}
    if monkeypatch is not None:
        orig = runner.build_kvm

        def build(*a: Any, **kw: Any) -> Any:
            kvm = orig(*a, **kw)
            box["kvm"] = kvm
            _install_watch(kvm, box, check_ir, sample_us)
            return kvm

        monkeypatch.setattr(runner, "build_kvm", build)
    r = runner.simulate(loads_scenario(text, "t.toml"), trace=True)
    t = Traced(r, r.result(), box.get("writes", []), box.get("bad", []))
    if monkeypatch is not None and check_ir:
        t.ir_violations.extend(check_table(r.kvm))
    return t


def check_table(kvm: Any) -> list[str]:
    """Invariants 1 and 2 of digest §9.2 against the live state, now."""
    bad: list[str] = []
    av = kvm.vendor.avic
    host = kvm.host
    for v in kvm.vcpus:
        if v.vcpu_id > av.x2avic_max_id and v.vcpu_id > av.features.avic_max_physical_id:
            continue   # no entry at all (PHYSICAL_ID_TOO_BIG)
        e = kvm.mem.read64(av.physical_entry_hpa(v.vcpu_id))
        if v.apicv_active and not e & A.PHYS_VALID:
            bad.append(f"t={kvm.engine.now}: {v.name} active but its entry is not Valid")
        if e & A.PHYS_IS_RUNNING:
            if not av.enable_ipiv:
                bad.append(f"t={kvm.engine.now}: {v.name}: IR=1 in the real table with enable_ipiv off")
            if not v.apicv_active:
                bad.append(f"t={kvm.engine.now}: {v.name}: IR=1 in the real table with APICv inactive")
            hid = e & A.PHYS_HOST_ID_MASK
            if v.cpu is None or host.pcpus[v.cpu].apic_id != hid or v.blocking:
                bad.append(f"t={kvm.engine.now}: {v.name}: IR=1 host {hid} but cpu={v.cpu} "
                           f"blocking={v.blocking}")
    return bad


def _install_watch(kvm: Any, box: dict[str, Any], check_ir: bool, sample_us: float) -> None:
    av = kvm.vendor.avic
    base = av.physical_table_hpa
    writes: list[tuple[int, int, int]] = box.setdefault("writes", [])
    bad: list[str] = box.setdefault("bad", [])
    engine = kvm.engine

    def on_write(addr: int, size: int, old: int, new: int) -> None:
        idx = (addr - base) >> 3
        e = kvm.mem.read64(base + 8 * idx)
        writes.append((engine.now, idx, e))
        if check_ir and e & A.PHYS_IS_RUNNING and not av.enable_ipiv:
            bad.append(f"t={engine.now}: entry {idx}: IR=1 written with enable_ipiv off")

    for p in range(av.physical_table_pages):
        kvm.mem.watch(base + 4096 * p, on_write)
    if not check_ir:
        return
    period = max(1, int(sample_us * kvm.costs.ghz * 1000))

    def sample() -> None:
        bad.extend(check_table(kvm))
        if engine._q:
            engine.call_later(period, sample, label="ir-check")

    engine.call_later(period, sample, label="ir-check")


@dataclass
class VcpuSnap:
    """A vCPU's state at the instant KVM's AVIC_INCOMPLETE_IPI handler was entered."""

    irr: frozenset[int]     # vectors pending in its backing-page IRR
    loaded: bool            # vcpu->cpu set (the thread owns a pCPU)
    in_guest: bool          # vcpu->mode == IN_GUEST_MODE
    blocking: bool
    preempted: bool


def snoop_incomplete_ipi(monkeypatch: Any) -> list[tuple[str, dict[str, VcpuSnap]]]:
    """Wrap ``avic_incomplete_ipi_interception`` so each exit records (sender, {vcpu: VcpuSnap})
    taken before KVM does anything — i.e. exactly what the hardware left behind."""
    from navic.hv import svm as S
    from navic.hv.kvm import IN_GUEST_MODE
    from navic.hw import vmcb as V

    orig = S.SvmVendor._handlers[V.SVM_EXIT_AVIC_INCOMPLETE_IPI]
    log: list[tuple[str, dict[str, VcpuSnap]]] = []

    def wrapper(self: Any, vcpu: Any) -> Any:
        snap = {}
        for v in self.kvm.vcpus:
            irr = frozenset(x for x in range(256) if v.apic.test_irr(x))
            snap[v.name] = VcpuSnap(irr, v.cpu is not None, v.mode == IN_GUEST_MODE, v.blocking, v.preempted)
        log.append((vcpu.name, snap))
        return (yield from orig(self, vcpu))

    monkeypatch.setitem(S.SvmVendor._handlers, V.SVM_EXIT_AVIC_INCOMPLETE_IPI, wrapper)
    return log
