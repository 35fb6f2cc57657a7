"""Multi-CPU IPI delivery on bare metal through the whole stack (scenario -> kernel -> APIC bus).

Each test states an SDM rule and asserts exactly which CPUs ran which handler (and in what kind).
"""

from __future__ import annotations

import pytest

from navic.runner import run_scenario
from navic.scenario import loads_scenario


def run(text: str) -> dict:
    return run_scenario(loads_scenario(text, "test.toml"))


def got(result: dict) -> list[tuple[str, int, str]]:
    return sorted((d["cpu"], d["vector"], d["kind"]) for d in result["deliveries"])


def scenario(ops: str, *, vcpus: int = 4, apic: str = "xapic", setup: str = "", handlers: str = "",
             extra: str = "") -> str:
    progs = "".join(
        f'[[program]]\ncpu = "l1.{i}"\nops = [ {{ op = "sti" }}, {setup} {{ op = "compute", cycles = 1 }} ]\n'
        for i in range(1, vcpus)
    ) if setup else ""
    return (f'name = "t"\n[host]\nvirt = "none"\n[l1]\nvcpus = {vcpus}\napic = "{apic}"\n{extra}'
            f'[[program]]\ncpu = "l1.0"\nops = [ {{ op = "sti" }}, {{ op = "compute", cycles = 5000 }}, {ops} ]\n'
            f'{handlers}{progs}')


def test_fixed_physical_reaches_only_the_named_cpu():
    r = run(scenario('{ op = "ipi", to = 2, vector = 0x40 }'))
    assert got(r) == [("l1.2", 0x40, "fixed")]
    assert r["deliveries"][0]["sent_by"] == "l1.0" and r["deliveries"][0]["latency"] > 0


@pytest.mark.parametrize("apic, dest", [("xapic", 0xFF), ("x2apic", 0xFFFFFFFF)])
def test_physical_broadcast_reaches_everyone_including_self(apic, dest):
    r = run(scenario(f'{{ op = "ipi", dest = {dest}, vector = 0x41 }}', apic=apic))
    assert got(r) == [(f"l1.{i}", 0x41, "fixed") for i in range(4)]


@pytest.mark.parametrize("sh, cpus", [("self", [0]), ("all", [0, 1, 2, 3]), ("others", [1, 2, 3])])
def test_shorthands(sh, cpus):
    r = run(scenario(f'{{ op = "ipi", shorthand = "{sh}", vector = 0x42 }}'))
    assert got(r) == [(f"l1.{i}", 0x42, "fixed") for i in cpus]


def test_logical_flat_uses_each_cpus_ldr_bitmap():
    # Each CPU i sets LDR = 1 << (i + 24) (flat model); dest 0b1010 selects CPUs 1 and 3.
    progs = "".join(
        f'[[program]]\ncpu = "l1.{i}"\nops = [ {{ op = "sti" }}, {{ op = "write", reg = "LDR", '
        f'value = {1 << (i + 24)} }} ]\n' for i in range(1, 4))
    text = (f'name = "t"\n[host]\nvirt = "none"\n[l1]\nvcpus = 4\napic = "xapic"\n[[program]]\ncpu = "l1.0"\n'
            f'ops = [ {{ op = "sti" }}, {{ op = "compute", cycles = 5000 }}, '
            f'{{ op = "ipi", dest = 10, dest_mode = "logical", vector = 0x43 }} ]\n{progs}')
    assert got(run(text)) == [("l1.1", 0x43, "fixed"), ("l1.3", 0x43, "fixed")]


def test_logical_cluster_matches_cluster_and_member_bits():
    # DFR cluster model (0x0FFFFFFF); CPU i: cluster i // 2, member bit i % 2.
    progs = "".join(
        f'[[program]]\ncpu = "l1.{i}"\nops = [ {{ op = "sti" }}, {{ op = "write", reg = "DFR", value = 0x0FFFFFFF }}, '
        f'{{ op = "write", reg = "LDR", value = {((i // 2) << 28) | (1 << (24 + i % 2))} }} ]\n' for i in range(4))
    # dest 0x13 = cluster 1, members 0 and 1 -> CPUs 2 and 3; cluster 0 member 1 (0x02) -> CPU 1.
    text = (f'name = "t"\n[host]\nvirt = "none"\n[l1]\nvcpus = 5\napic = "xapic"\n{progs}'
            f'[[program]]\ncpu = "l1.4"\nops = [ {{ op = "sti" }}, {{ op = "compute", cycles = 5000 }}, '
            f'{{ op = "ipi", dest = 0x13, dest_mode = "logical", vector = 0x44 }}, '
            f'{{ op = "ipi", dest = 0x02, dest_mode = "logical", vector = 0x45 }} ]\n')
    assert got(run(text)) == [("l1.1", 0x45, "fixed"), ("l1.2", 0x44, "fixed"), ("l1.3", 0x44, "fixed")]


def test_x2apic_cluster_logical_destination():
    # x2APIC LDR is derived: cluster = id >> 4, bit = id & 0xF. dest (0 << 16) | 0b0110 -> IDs 1, 2.
    r = run(scenario('{ op = "ipi", dest = 6, dest_mode = "logical", vector = 0x46 }', apic="x2apic"))
    assert got(r) == [("l1.1", 0x46, "fixed"), ("l1.2", 0x46, "fixed")]


def test_lowest_priority_picks_exactly_one_legal_receiver():
    r = run(scenario('{ op = "ipi", dest = 0xFF, mode = "lowest", vector = 0x47 }'))
    d = got(r)
    assert len(d) == 1 and d[0][1:] == (0x47, "lowest")


def test_nmi_runs_even_with_interrupts_disabled_and_uses_vector_2():
    text = scenario('{ op = "ipi", to = 1, mode = "nmi" }', setup='{ op = "cli" }, { op = "compute", cycles = 20000 },')
    assert got(run(text)) == [("l1.1", 2, "nmi")]


def test_init_then_sipi_restarts_the_target_and_resets_its_apic():
    text = scenario('{ op = "ipi", to = 1, mode = "init" }, { op = "compute", cycles = 3000 }, '
                    '{ op = "ipi", to = 1, mode = "sipi", vector = 0x9A }')
    r = run(text)
    assert got(r) == [("l1.1", 0, "init"), ("l1.1", 0x9A, "sipi")]
    assert r["apic"]["l1.1"]["svr"] == 0x1FF  # the OS start-up path re-enabled it


def test_smi_is_recorded_and_runs_no_handler():
    r = run(scenario('{ op = "ipi", to = 3, mode = "smi" }'))
    assert got(r) == [("l1.3", 0, "smi")]


def test_fixed_ipi_to_a_cpu_with_interrupts_disabled_stays_in_irr():
    text = scenario('{ op = "ipi", to = 1, vector = 0x48 }', setup='{ op = "cli" },')
    r = run(text)
    assert got(r) == []
    assert r["apic"]["l1.1"]["irr"][2] == 1 << (0x48 - 64)


def test_tpr_masks_a_lower_priority_class_until_lowered():
    ops = ('{ op = "write", reg = "TPR", value = 0x50 }, { op = "ipi", shorthand = "self", vector = 0x48 }, '
           '{ op = "compute", cycles = 3000 }, { op = "read", reg = "IRR2", into = "irr" }, '
           '{ op = "write", reg = "TPR", value = 0 }, { op = "compute", cycles = 3000 }')
    r = run(scenario(ops))
    assert r["reads"]["l1.0"]["irr"] == 1 << (0x48 - 64)
    assert got(r) == [("l1.0", 0x48, "fixed")]


def test_illegal_vector_sets_send_and_receive_illegal_vector_and_delivers_nothing():
    ops = ('{ op = "ipi", to = 1, vector = 5 }, { op = "compute", cycles = 3000 }, '
           '{ op = "write", reg = "ESR", value = 0 }, { op = "read", reg = "ESR", into = "esr" }')
    # The receiver reads its ESR well after the message has arrived (ICR writes + wire delay).
    setup = ('{ op = "compute", cycles = 30000 }, { op = "write", reg = "ESR", value = 0 }, '
             '{ op = "read", reg = "ESR", into = "esr" },')
    r = run(scenario(ops, setup=setup, vcpus=2))
    assert got(r) == []
    assert r["reads"]["l1.0"]["esr"] == 1 << 5   # Send Illegal Vector
    assert r["reads"]["l1.1"]["esr"] == 1 << 6   # Receive Illegal Vector


def test_periodic_timer_interrupts_recorded_as_timer_deliveries():
    ops = ('{ op = "write", reg = "TIMER_DIVIDE", value = 0xB }, '
           '{ op = "write", reg = "LVT_TIMER", value = 0x20050 }, '
           '{ op = "write", reg = "TIMER_INITIAL", value = 1000 }, '
           '{ op = "repeat", times = 100, ops = [ { op = "compute", cycles = 1000 } ] }, '
           '{ op = "write", reg = "LVT_TIMER", value = 0x10050 }')
    r = run(scenario(ops, vcpus=1))
    kinds = {d["kind"] for d in r["deliveries"]}
    assert kinds == {"timer"}
    # divide-by-1, 30 cycles per tick: one interrupt every 30,000 cycles over ~100,000 cycles
    # (interrupts are taken between the 1,000-cycle computes, so none coalesce).
    assert len(r["deliveries"]) == 3


def test_tsc_deadline_timer_fires_once_at_the_deadline():
    ops = ('{ op = "write", reg = "LVT_TIMER", value = 0x40051 }, '
           '{ op = "wrmsr", msr = 0x6E0, value = 20000 }, { op = "compute", cycles = 40000 }')
    r = run(scenario(ops, vcpus=1))
    assert [(d["vector"], d["kind"]) for d in r["deliveries"]] == [(0x51, "timer")]
    assert r["deliveries"][0]["t"] >= 20000
