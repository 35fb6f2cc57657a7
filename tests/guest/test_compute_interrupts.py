"""Interrupts during ``compute`` (issue 13 item 1): a compute is a run of ordinary instructions, so
an interrupt that arrives during it is taken at the next instruction boundary (SDM vol. 3 §6.6),
not when the compute ends; the rest of the compute runs after the handler's IRET (or after the
next VMRUN / VM entry when the event was an exit), so the compute's work is done in full.

Each level runs the same programs: l?.0 computes a little, sends 0x40 to l?.1 and spins waiting
for 0x41; l?.1 computes ``LONG`` cycles, then replies with 0x41. The handler of 0x40 computes
``HANDLER`` cycles. On the old model 0x40 waited for the end of the long compute."""

from __future__ import annotations

import pytest

from navic.runner import run_scenario
from navic.scenario import loads_scenario
from navic.sim.cost import load_costs
from navic.sim.engine import Engine, Signal

LONG = 400_000
HANDLER = 5_000
PRE = 2_000


def _programs(level: str) -> str:
    return f'''
[[program]]
cpu = "{level}.0"
ops = [ {{ op = "sti" }}, {{ op = "compute", cycles = {PRE} }}, {{ op = "ipi", to = 1, vector = 0x40 }},
        {{ op = "wait", vector = 0x41 }} ]
[[program]]
cpu = "{level}.1"
ops = [ {{ op = "sti" }}, {{ op = "compute", cycles = {LONG} }}, {{ op = "ipi", to = 0, vector = 0x41 }} ]
[program.handlers]
0x40 = [ {{ op = "compute", cycles = {HANDLER} }}, {{ op = "eoi" }} ]
'''


# The mechanism that reaches the computing CPU at each level (a counter or exit the run must show).
MECHANISM = {
    "bare": None,
    "l1-avic-zen4": ("counters", "doorbells_received"),        # AVIC doorbell: IRR evaluation
    "l1-noapicv-zen4": ("exits", "interrupt"),                  # a kick: #VMEXIT(INTR) mid-compute
    "l1-ipiv-spr": ("counters", "posted_intr_processed"),       # IPIv notification: PIR -> vIRR
    "l2-dummy-zen4": ("counters", "doorbells_received"),
    "l2-shadow-zen4": ("counters", "doorbells_received"),
    "l2-dummy-spr": ("counters", "posted_intr_processed"),
}

CONFIGS = {
    # level, [host], [l0] lines, L2 section
    "bare": ("l1", 'cpu = "zen4"\nvirt = "none"', "", False),
    "l1-avic-zen4": ("l1", 'cpu = "zen4"\nvirt = "kvm"', "apicv = true", False),
    "l1-noapicv-zen4": ("l1", 'cpu = "zen4"\nvirt = "kvm"', "apicv = false", False),
    "l1-ipiv-spr": ("l1", 'cpu = "spr"\nvirt = "kvm"', "apicv = true", False),
    "l2-dummy-zen4": ("l2", 'cpu = "zen4"\nvirt = "kvm"', 'nested_apicv = "dummy"', True),
    "l2-shadow-zen4": ("l2", 'cpu = "zen4"\nvirt = "kvm"', 'nested_apicv = "shadow"', True),
    "l2-dummy-spr": ("l2", 'cpu = "spr"\nvirt = "kvm"', 'nested_apicv = "dummy"', True),
}


def _run(config: str) -> dict:
    level, host, l0, nested = CONFIGS[config]
    text = (f'name = "compute-interrupt"\nseed = 1\nmax_time_us = 2000\n[host]\n{host}\npcpus = 4\n'
            f'[l0]\n{l0}\n[l1]\nvcpus = 2\napic = "x2apic"\n'
            + ('[l2]\nvcpus = 2\napic = "x2apic"\n' if nested else "") + _programs(level))
    return run_scenario(loads_scenario(text, "t.toml"))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_an_ipi_is_handled_inside_a_long_compute_and_the_compute_completes(config: str) -> None:
    level = CONFIGS[config][0]
    res = _run(config)
    assert res["violations"] == [] and res["errors"] == []
    ping = [d for d in res["deliveries"] if d["vector"] == 0x40]
    pong = [d for d in res["deliveries"] if d["vector"] == 0x41]
    assert len(ping) == 1 and len(pong) == 1, res["deliveries"]
    ping, pong = ping[0], pong[0]
    assert ping["cpu"] == f"{level}.1" and pong["cpu"] == f"{level}.0"
    # The IPI is handled about one IPI latency after it was sent (a few µs at most, however slow
    # the level), long before the compute ends (LONG cycles = 133 µs at 3 GHz).
    assert ping["latency"] < 30_000, ping
    assert ping["t"] < LONG // 2
    # The whole compute still ran: the reply is sent after LONG cycles of compute plus the
    # handler's HANDLER cycles (and not much later: the rest resumed right after the handler).
    reply_sent = pong["t"] - pong["latency"]
    assert LONG + HANDLER <= reply_sent < LONG + HANDLER + 60_000, (reply_sent, res["deliveries"])
    mech = MECHANISM[config]
    if mech == ("exits", "interrupt"):
        assert res["exits"]["l0"].get("interrupt", 0) >= 1, res["exits"]
    elif mech is not None:
        assert res["counters"].get(mech[1], 0) >= 1, res["counters"]


def test_bare_metal_timing_is_exact() -> None:
    """Bare metal: the reply is sent exactly when the compute's LONG cycles, the handler (entry, its
    HANDLER cycles, the EOI, IRET) and the STI before have run: no cycle lost or added by the cut."""
    c = load_costs("zen4")
    res = _run("bare")
    ping = next(d for d in res["deliveries"] if d["vector"] == 0x40)
    pong = next(d for d in res["deliveries"] if d["vector"] == 0x41)
    assert ping["latency"] < 5_000
    reply_sent = pong["t"] - pong["latency"]
    assert reply_sent == c.INSN + LONG + c.INTR_ENTRY + HANDLER + c.APIC_ACCESS + c.IRET


def test_compute_with_interrupts_masked_is_not_cut() -> None:
    """IF = 0 (after CLI): the interrupt stays pending until the compute ends and STI opens it."""
    text = f'''name = "cli-compute"
[host]
virt = "none"
[l1]
vcpus = 2
apic = "x2apic"
[[program]]
cpu = "l1.0"
ops = [ {{ op = "compute", cycles = {PRE} }}, {{ op = "ipi", to = 1, vector = 0x40 }} ]
[[program]]
cpu = "l1.1"
ops = [ {{ op = "cli" }}, {{ op = "compute", cycles = {LONG} }}, {{ op = "sti" }}, {{ op = "compute", cycles = 100 }} ]
[program.handlers]
0x40 = [ {{ op = "eoi" }} ]
'''
    res = run_scenario(loads_scenario(text, "t.toml"))
    (ping,) = res["deliveries"]
    assert ping["t"] >= LONG


def test_lock_add_is_one_instruction() -> None:
    """``add`` (a LOCK-prefixed RMW) is atomic: its compute time has no boundary inside."""
    from navic.hw import isa

    assert isa.Compute(40, atomic=True).atomic and not isa.Compute(40).atomic
    assert repr(isa.Compute(40, atomic=True)) == repr(isa.Compute(40))


# -- the engine primitive ------------------------------------------------------------------------
def _proc(sig: Signal, cycles: int, cut, log: list) -> object:
    from navic.sim.engine import Cuttable

    w = Cuttable(cycles, sig, cut)
    yield w
    log.append(("resumed", sig.engine.now, w.rest))


def test_cuttable_runs_to_its_end_when_nothing_cuts_it() -> None:
    eng = Engine()
    sig = eng.signal("s")
    log: list = []
    eng.spawn(_proc(sig, 1000, lambda: True, log), "p")
    eng.call_at(10, lambda: None, label="other")   # another event: no run-ahead
    eng.run()
    assert log == [("resumed", 1000, 0)] and sig.waiters == []


def test_cuttable_is_cut_only_when_cut_says_so() -> None:
    eng = Engine()
    sig = eng.signal("s")
    log: list = []
    armed = {"on": False}
    eng.spawn(_proc(sig, 1000, lambda: armed["on"], log), "p")
    eng.call_at(100, sig.fire, label="fire-ignored")
    eng.call_at(300, lambda: (armed.update(on=True), sig.fire()), label="fire-cuts")
    eng.run()
    assert log == [("resumed", 300, 700)] and sig.waiters == []


# -- work conservation on a busy workload ---------------------------------------------------------
@pytest.mark.parametrize("config", ["bare", "l1-avic-zen4", "l1-ipiv-spr", "l1-noapicv", "l2-dummy-zen4",
                                    "l2-none-spr"])
def test_hackbench_computes_are_cut_and_every_cycle_still_runs(config: str, monkeypatch) -> None:
    """hackbench: reschedule IPIs land in the middle of computes. Every compute cycle fetched is
    run exactly once, cut or not (cycles run + cycles still suspended = cycles of computes begun,
    counting a resumed rest once), and cuts do happen — in L1 KVM's threads too (l2-none-spr)."""
    from navic import compare
    from navic.guest import kernel
    from navic.hv import l1
    from navic.hw import isa
    from navic.runner import simulate
    from navic.scenario import parse_scenario
    from navic.sim.engine import Cuttable

    rests: list[isa.Compute] = []          # the rests created (held: ids stay unique)
    begun = ran = 0
    cuts: dict[str, int] = {}
    run_compute = isa.run_compute

    def spy_run(insn, g, wake, cut):
        nonlocal begun, ran
        if not any(r is insn for r in rests):
            begun += insn.cycles
        inner = run_compute(insn, g, wake, cut)
        y = next(inner)
        sent = yield y
        ran += insn.cycles - (y.rest if type(y) is Cuttable else 0)
        with pytest.raises(StopIteration):
            inner.send(sent)

    def spy_suspend(orig, kind):
        def suspend(self, rest):
            rests.append(rest)
            cuts[kind] = cuts.get(kind, 0) + 1
            orig(self, rest)
        return suspend

    monkeypatch.setattr(isa, "run_compute", spy_run)
    monkeypatch.setattr(kernel.GuestCpu, "suspend", spy_suspend(kernel.GuestCpu.suspend, "guest"))
    monkeypatch.setattr(l1.L1Cpu, "suspend", spy_suspend(l1.L1Cpu.suspend, "l1"))
    case = compare.Case("hackbench", {"iterations": 20}, vcpus=4, apic="xapic")
    run = simulate(parse_scenario(compare.scenario_dict(case, compare.CONFIGS[config]), "t"))
    left = sum(f.resume.cycles for g in run.guests for f in g.frames if f.resume is not None)
    kvm2 = getattr(run, "kvm2", None)
    if kvm2 is not None:
        left += sum(f.resume.cycles for c in kvm2.host.cpus for f in c.frames if f.resume is not None)
        left += sum(i.cycles for t in kvm2.host.threads.values() for i in t.pending
                    if any(r is i for r in rests))
    assert ran + left == begun and begun > 0
    assert cuts.get("guest", 0) >= 5, cuts
    if config == "l2-none-spr":
        assert cuts.get("l1", 0) >= 1, cuts


def test_a_cuttable_is_the_same_window_candidate_as_yield_n() -> None:
    """Window mode (the explorer): a compute's end is one candidate of the process, at the same
    time and with the same label as ``yield n``; an arrival before it is the same choice either
    way — taking the arrival first is what cuts the compute."""
    from navic.sim.chooser import Chooser
    from navic.sim.engine import Cuttable

    class Record(Chooser):
        wants_window = True
        horizon = 10_000
        width = 4

        def __init__(self, pick_last: bool) -> None:
            self.windows: list[list[tuple[int, str]]] = []
            self.pick_last = pick_last

        def window(self, candidates: list[tuple[int, str]]) -> int:
            self.windows.append(candidates)   # pick_last: run the compute's end before the ipi
            return candidates.index((1000, "cpu")) if self.pick_last and (1000, "cpu") in candidates else 0

    def windows(cuttable: bool, pick_last: bool) -> tuple[list, list]:
        ch = Record(pick_last)
        eng = Engine(chooser=ch)
        sig = eng.signal("wake")
        log: list = []

        def cpu():
            w = Cuttable(1000, sig, lambda: True) if cuttable else 1000
            yield w
            log.append((eng.now, w.rest if cuttable else 0))

        eng.spawn(cpu(), "cpu")
        eng.call_at(400, sig.fire, label="ipi")
        eng.run()
        return ch.windows, log

    for pick_last in (False, True):
        old, old_log = windows(False, pick_last)
        new, new_log = windows(True, pick_last)
        assert new == old and new[-1] == [(400, "ipi"), (1000, "cpu")]
    # ipi first (time order): the compute is cut at 400 with 600 left; delayed past the end: not cut.
    assert windows(True, False)[1] == [(400, 600)] and windows(True, True)[1] == [(1000, 0)]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_an_interrupt_pending_at_sti_is_taken_after_the_first_instruction_of_a_compute(config: str) -> None:
    """STI's shadow covers one instruction (SDM vol. 2B STI): an interrupt already pending when
    STI opens IF is taken after the first instruction of a following compute, not at its end."""
    level, host, l0, nested = CONFIGS[config]
    text = (f'name = "sti-compute"\nseed = 1\nmax_time_us = 2000\n[host]\n{host}\npcpus = 4\n'
            f'[l0]\n{l0}\n[l1]\nvcpus = 2\napic = "x2apic"\n'
            + ('[l2]\nvcpus = 2\napic = "x2apic"\n' if nested else "") + f'''
[[program]]
cpu = "{level}.0"
ops = [ {{ op = "cli" }}, {{ op = "ipi", shorthand = "self", vector = 0x40 }},
        {{ op = "compute", cycles = 20000 }}, {{ op = "sti" }}, {{ op = "compute", cycles = {LONG} }},
        {{ op = "ipi", shorthand = "self", vector = 0x41 }} ]
[program.handlers]
0x40 = [ {{ op = "eoi" }} ]
0x41 = [ {{ op = "eoi" }} ]
''')
    res = run_scenario(loads_scenario(text, "t.toml"))
    assert res["violations"] == [] and res["errors"] == []
    d40 = [d for d in res["deliveries"] if d["vector"] == 0x40]
    d41 = [d for d in res["deliveries"] if d["vector"] == 0x41]
    assert len(d40) == 1 and len(d41) == 1, res["deliveries"]
    assert d40[0]["t"] < 20_000 + 30_000, d40          # right after the STI, not after LONG cycles
    assert d41[0]["t"] - d41[0]["latency"] >= 20_000 + LONG   # and the compute still ran whole
