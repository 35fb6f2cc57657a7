"""Helpers for the nested tests: scenario text builders, traced runs, EXITINFO decoding, and
watchers for the nested invariants of digest §9.2 (L1's own AVIC inhibited while in L2; shadow
IsRunning only for loaded L1 vCPUs; the dummy table never IsRunning)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import navic.runner as runner
from navic.hw import avic as A
from navic.scenario import loads_scenario

INCOMPLETE_IPI = "avic_incomplete_ipi"
DESIGNS = ("none", "shadow", "dummy", "runcache")


def prog(cpu: str, ops: list[str] | str, handlers: dict[int, str] | None = None) -> str:
    """One ``[[program]]`` for ``cpu`` ("l2.0"); ``ops`` are inline-table strings."""
    if isinstance(ops, list):
        ops = ", ".join(ops)
    text = f'[[program]]\ncpu = "{cpu}"\nops = [ {ops} ]\n'
    if handlers:
        text += "[program.handlers]\n" + "".join(f"{v:#x} = [ {h} ]\n" for v, h in handlers.items())
    return text


def scenario(programs: list[str], *, design: str, cpu: str = "zen4", pcpus: int = 4, l1_vcpus: int = 2,
             l1_apic: str = "x2apic", l2_vcpus: int = 2, l2_apic: str = "xapic", l0: str = "", l1: str = "",
             l2: str = "", max_time_us: float = 5000, seed: int = 1) -> str:
    if cpu in ("zen1", "zen2", "zen3") and "avic" not in l0.replace("force_avic", ""):
        l0 = "avic = true\n" + l0   # kvm_amd avic "auto" leaves AVIC off before Zen4: these study AVIC
    return (f'name = "t"\nseed = {seed}\nmax_time_us = {max_time_us}\n'
            f'[host]\ncpu = "{cpu}"\npcpus = {pcpus}\nvirt = "kvm"\n'
            f'[l0]\nnested_apicv = "{design}"\n{l0}\n'
            f'[l1]\nvcpus = {l1_vcpus}\napic = "{l1_apic}"\n{l1}\n'
            f'[l2]\nvcpus = {l2_vcpus}\napic = "{l2_apic}"\n{l2}\n' + "".join(programs))


def pingpong(design: str, *, n: int = 20, how: str = "spin", compute: int = 0, lead: int = 0,
             **kw: Any) -> str:
    """l2.0 sends 0x40 to l2.1 ``n`` times and waits for l2.1's 0x41 reply each time (after
    ``lead`` cycles of computing once, and ``compute`` cycles before each send)."""
    pre = [f'{{ op = "compute", cycles = {compute} }}'] if compute else []
    sender = ['{ op = "sti" }', *([f'{{ op = "compute", cycles = {lead} }}'] if lead else []),
              f'{{ op = "repeat", times = {n}, ops = [ ' + ", ".join(
                  [*pre, '{ op = "ipi", to = 1, vector = 0x40 }',
                   f'{{ op = "wait", vector = 0x41, how = "{how}" }}']) + " ] }"]
    receiver = ['{ op = "sti" }', f'{{ op = "wait", vector = 0x40, count = {n}, how = "{how}" }}']
    return scenario([prog("l2.0", sender),
                     prog("l2.1", receiver, {0x40: '{ op = "ipi", to = 0, vector = 0x41 }, { op = "eoi" }'})],
                    design=design, **kw)


@dataclass
class Traced:
    run: Any
    result: dict[str, Any]
    log: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def kvm(self) -> Any:
        return self.run.kvm

    @property
    def kvm2(self) -> Any:
        return self.run.kvm2

    @property
    def design(self) -> Any:
        return self.run.kvm.vendor.nested.design

    def ev(self, name: str, vcpu: str | None = None) -> list[Any]:
        return [e for e in self.run.trace.events if e.name == name and (vcpu is None or e.vcpu == vcpu)]

    def exits(self, level: str) -> dict[str, int]:
        return self.result["exits"].get(level, {})

    def l0_l2_exits(self, reason: str | None = None) -> list[Any]:
        """kvm_exit events L0 handled alone while L2 ran (nested = 1)."""
        return [e for e in self.ev("kvm_exit") if e.fields.get("nested") == 1
                and (reason is None or e.fields["reason"] == reason)]

    def nested_vmexits(self, reason: str | None = None) -> list[Any]:
        return [e for e in self.ev("kvm_nested_vmexit") if reason is None or e.fields["reason"] == reason]

    def counter(self, name: str) -> int:
        return self.result["counters"].get(name, 0)

    def got(self, cpu: str, vector: int) -> int:
        return sum(1 for d in self.result["deliveries"] if (d["cpu"], d["vector"]) == (cpu, vector))

    def l2_latencies(self) -> list[int]:
        return sorted(d["latency"] for d in self.result["deliveries"]
                      if d["cpu"].startswith("l2.") and d["latency"] is not None)

    def l2_p50(self) -> int:
        lat = self.l2_latencies()
        return lat[len(lat) // 2]


def failure(e: Any) -> tuple[int, int]:
    """(failure ID, index) from an AVIC_INCOMPLETE_IPI's EXITINFO2 (trace fields)."""
    info2 = e.fields["info2"]
    return info2 >> 32, info2 & 0xFFF


def run(text: str) -> dict[str, Any]:
    return runner.run_scenario(loads_scenario(text, "t.toml"))


def traced(text: str, *, watch: Any = None, on_build: Any = None, sample_us: float = 0.5) -> Traced:
    """Run with tracing on. ``on_build(kvm0, kvm1, log)`` runs once the nested system is built;
    ``watch(kvm0, log)`` every ``sample_us`` of simulated time and once at the end. Both append
    what they find to ``log``."""
    scn = loads_scenario(text, "t.toml")
    log: dict[str, list[Any]] = {}
    if watch is None and on_build is None:
        r = runner.simulate(scn, trace=True)
        return Traced(r, r.result(), log)
    import navic.hv.nested.build as B

    orig = B.build_nested

    def build(*a: Any, **kw: Any) -> Any:
        kvm0, kvm1 = orig(*a, **kw)
        if on_build is not None:
            on_build(kvm0, kvm1, log)
        if watch is not None:
            engine = kvm0.engine
            period = max(1, int(sample_us * kvm0.costs.ghz * 1000))

            def sample() -> None:
                watch(kvm0, log)
                if engine._q:
                    engine.call_later(period, sample, label="nested-check")

            engine.call_later(period, sample, label="nested-check")
        return kvm0, kvm1

    B.build_nested = build
    try:
        r = runner.simulate(scn, trace=True)
    finally:
        B.build_nested = orig
    if watch is not None:
        watch(r.kvm, log)
    return Traced(r, r.result(), log)


# -- invariants (digest §9.2) ------------------------------------------------------------------
def check_shadow(kvm0: Any, log: dict[str, list[Any]]) -> None:
    """(6) shadow IR = 1 ⇒ guest IR = 1 ∧ the named L1 vCPU is loaded (not blocking) on the pCPU
    whose APIC ID the shadow entry carries."""
    design = kvm0.vendor.nested.design
    host = kvm0.host
    mem = host.mem
    bad = log.setdefault("bad", [])
    seen = log.setdefault("ir1", [])
    for t in design.tables.values():
        for i in range(t.nentries):
            s = mem.read64(t.hpa + 8 * i)
            if not s & A.PHYS_IS_RUNNING:
                continue
            seen.append((kvm0.engine.now, i))
            g = design.core.l1mem.read64((t.gfn << 12) + 8 * i)
            if not g & A.PHYS_IS_RUNNING:
                bad.append(f"t={kvm0.engine.now}: shadow entry {i} IR=1 but L1's entry IR=0")
                continue
            x = next((v for v in kvm0.vcpus if v.vcpu_id == g & A.PHYS_HOST_ID_MASK), None)
            hid = s & A.PHYS_HOST_ID_MASK
            if x is None or x.cpu is None or x.blocking or host.pcpus[x.cpu].apic_id != hid:
                bad.append(f"t={kvm0.engine.now}: shadow entry {i} IR=1 host {hid} but L1 vCPU "
                           f"{getattr(x, 'name', None)} cpu={getattr(x, 'cpu', None)}")


def watch_dummy(kvm0: Any, kvm1: Any, log: dict[str, list[Any]]) -> None:
    """(7) the dummy physical table never has IsRunning = 1: every write to it is checked (none is
    expected at all: it is built once, Valid + IR = 0 + the sink page, and only the hardware reads
    it), and ``check_dummy`` scans it at the end."""
    from navic.hv.nested.dummy import DUMMY_ENTRIES

    design = kvm0.vendor.nested.design
    mem = kvm0.host.mem
    bad = log.setdefault("bad", [])

    def on_write(addr: int, size: int, old: int, new: int) -> None:
        bad.append(f"t={kvm0.engine.now}: write to the dummy table at {addr:#x}: {new:#x}")

    for p in range(DUMMY_ENTRIES * 8 // 4096):
        mem.watch(design.table_hpa + 4096 * p, on_write)


def check_dummy(kvm0: Any, log: dict[str, list[Any]]) -> None:
    from navic.hv.nested.dummy import DUMMY_ENTRIES

    design = kvm0.vendor.nested.design
    mem = kvm0.host.mem
    bad = log.setdefault("bad", [])
    for i in range(DUMMY_ENTRIES):
        e = mem.read64(design.table_hpa + 8 * i)
        if e & A.PHYS_IS_RUNNING or not e & A.PHYS_VALID or A.phys_entry_backing(e) != design.sink_hpa:
            bad.append(f"t={kvm0.engine.now}: dummy entry {i} = {e:#x}")
            break
