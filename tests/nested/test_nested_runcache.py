"""Design ``runcache`` (dummy table + L0-published IsRunning for the L2 vCPUs that run) and the
``table-churn`` workload: delivery under every design, exits vs dummy, write tracking vs shadow,
the explorer at K = 1, and that the explorer sees the design's two critical orderings (a broken
variant of each is found)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _nested_util import pingpong, run, traced

from navic.check.explore import Explorer, Options
from navic.compare import CONFIGS, DEFAULT_SUITE, Case, run_suite
from navic.hv.nested import runcache as R
from navic.hw import avic as A
from navic.scenario import ScenarioError, load_scenario, loads_scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ALL = ("none", "shadow", "dummy", "runcache")


def churn(design: str, *, cpu: str = "zen4", rounds: int = 10, l1_vcpus: int = 2, l2_vcpus: int = 4) -> str:
    return (f'name = "churn"\nseed = 1\nmax_time_us = 50000\n[host]\ncpu = "{cpu}"\npcpus = 4\n'
            f'[l0]\nnested_apicv = "{design}"\n[l1]\nvcpus = {l1_vcpus}\napic = "x2apic"\n'
            f'[l2]\nvcpus = {l2_vcpus}\napic = "xapic"\n'
            f'[workload]\nkind = "table-churn"\nlevel = "l2"\nrounds = {rounds}\n')


# -- the churn workload ----------------------------------------------------------------------------
@pytest.mark.parametrize("design", ALL)
def test_table_churn_delivers_every_token_under_every_design(design):
    r = run(churn(design))
    assert r["violations"] == []
    got = [d for d in r["deliveries"] if d["cpu"].startswith("l2.") and d["vector"] == 0xF4]
    assert len(got) == 4 * 10                               # every CPU gets the token every round
    assert {d["cpu"] for d in got} == {"l2.0", "l2.1", "l2.2", "l2.3"}


def test_table_churn_costs_shadow_write_tracking_and_runcache_none():
    shadow = run(churn("shadow"))
    mine = run(churn("runcache"))
    # Every hop blocks one L2 vCPU and unblocks the next in L1: L1 rewrites their table entries.
    assert shadow["counters"]["npf_write_tracking"] >= 2 * 4 * 10 - 4
    assert mine["counters"].get("npf_write_tracking", 0) == 0
    assert "npf" not in mine["exits"].get("l0", {})


def test_table_churn_is_a_workload_with_checked_parameters():
    with pytest.raises(ScenarioError) as e:
        loads_scenario(churn("runcache").replace("rounds = 10", "round = 10"), "c.toml")
    assert e.value.path == "workload.round"


# -- ping-pong: runcache vs dummy --------------------------------------------------------------------
def test_runcache_pingpong_to_running_target_takes_no_exit_dummy_takes_one_per_ipi():
    n = 20
    dummy = traced(pingpong("dummy", n=n))
    mine = traced(pingpong("runcache", n=n))
    assert dummy.result["violations"] == mine.result["violations"] == []
    assert dummy.got("l2.1", 0x40) == mine.got("l2.1", 0x40) == n
    assert len(dummy.l0_l2_exits("avic_incomplete_ipi")) == 2 * n
    assert mine.l0_l2_exits("avic_incomplete_ipi") == []      # both targets published: hardware
    assert mine.exits("l1") == dummy.exits("l1")
    assert mine.l2_p50() < dummy.l2_p50()


def test_runcache_on_zen2_publishes_nothing_and_is_dummy():
    """enable_ipiv is forced off on zen2 (erratum 1235): never IsRunning = 1 in the hardware table."""
    d = run(pingpong("dummy", n=10, cpu="zen2"))
    m = run(pingpong("runcache", n=10, cpu="zen2"))
    assert m["counters"].get("runcache_publish", 0) == 0
    assert m["exits"] == d["exits"]
    assert [x["latency"] for x in m["deliveries"]] == [x["latency"] for x in d["deliveries"]]


def test_published_entry_names_a_loaded_l1_vcpu_in_l2_on_that_pcpu():
    """The invariant the safety argument rests on (docs/nested-design.md): IsRunning = 1 in
    runcache's table ⇒ the L1 vCPU running that L2 vCPU is in L2 and loaded on that pCPU."""

    def watch(kvm0, log):
        design = kvm0.vendor.nested.design
        mem = kvm0.mem
        for n in range(len(design.sinks)):
            e = mem.read64(design.table_hpa + 8 * n)
            if not e & A.PHYS_IS_RUNNING:
                continue
            log.setdefault("published", []).append(n)
            owners = [v for v, m in design.owner.items() if m == n]
            ok = (len(owners) == 1 and owners[0].nested.active and owners[0].nested.l2.vcpu_id == n
                  and owners[0].cpu is not None
                  and kvm0.host.pcpus[owners[0].cpu].apic_id == e & A.PHYS_HOST_ID_MASK)
            if not ok:
                log.setdefault("bad", []).append((kvm0.engine.now, n))

    t = traced(pingpong("runcache", n=20, l0="timeslice_us = 20", pcpus=1), watch=watch, sample_us=0.2)
    assert t.log.get("published") and not t.log.get("bad")
    assert t.result["violations"] == []


# -- the explorer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["explore-nested-pingpong", "explore-nested-broadcast",
                                  "explore-nested-spin", "explore-nested-mixed", "explore-nested-churn"])
def test_explorer_finds_no_violation_under_runcache_at_bound_1(name):
    out = Explorer(load_scenario(str(EXAMPLES / f"{name}.toml")), Options(preemptions=1, design="runcache")).run()
    assert out.violation is None and out.complete


def test_mixed_example_takes_runcache_partial_path():
    r = run((EXAMPLES / "explore-nested-mixed.toml").read_text())
    assert r["counters"]["runcache_partial"] >= 1 and r["violations"] == []


@pytest.mark.parametrize("broken, kind", [("nested_vmexit", "stuck"), ("_take_sink_bit", "duplicated")])
def test_explorer_finds_a_runcache_that_breaks_its_ordering(monkeypatch, broken, kind):
    """Forget to park the entry at nested #VMEXIT (IsRunning stays 1 while L1 blocks the L2 vCPU:
    the IPI lands in a page nobody evaluates), or ignore the sink pages (deliver a broadcast's
    published destinations twice): the explorer finds each."""
    if broken == "nested_vmexit":
        monkeypatch.setattr(R.RunCacheDesign, "nested_vmexit", lambda self, vcpu: None)
    else:
        orig = R.RunCacheDesign._take_sink_bit
        monkeypatch.setattr(R.RunCacheDesign, "_take_sink_bit",
                            lambda self, pid, vector: orig(self, pid, vector) or pid in self.published)
    out = Explorer(load_scenario(str(EXAMPLES / "explore-nested-mixed.toml")),
                   Options(preemptions=1, design="runcache")).run()
    assert out.violation is not None and out.violation["kind"] == kind


# -- navic compare ----------------------------------------------------------------------------------
def test_compare_has_runcache_rows_and_the_churn_case():
    assert {"l2-runcache-zen4", "l2-runcache-zen5", "l2-runcache-zen2"} <= set(CONFIGS)
    churn_case = next(c for c in DEFAULT_SUITE if c.workload == "table-churn")
    assert churn_case.l1_vcpus < churn_case.vcpus
    assert "l2-runcache-zen4" in churn_case.configs
    rows, skipped = run_suite([Case("table-churn", {"rounds": 3}, vcpus=3, apic="xapic", l1_vcpus=2,
                                    configs=("l2-shadow-zen4", "l2-runcache-zen4"))], jobs=1)
    assert skipped == []
    by = {r["config"]: r for r in rows}
    assert by["l2-runcache-zen4"]["design"] == "runcache"
    assert by["l2-runcache-zen4"]["write_tracking_per_ipi"] == 0
    assert by["l2-shadow-zen4"]["write_tracking_per_ipi"] > 0


def test_explorer_finds_the_publish_race_without_the_sink_drain(monkeypatch):
    """The race the explorer found in runcache's first version (explore-nested-churn, K = 1): a
    sender's IRR write lands in a parked entry's sink, L0 then publishes the entry, the sender reads
    IsRunning = 1 — no exit, the bit stays in the sink. Publishing drains the sink; without it the
    IPI is lost."""
    monkeypatch.setattr(R.RunCacheDesign, "_drain", lambda self, n, backing_gpa: None)
    out = Explorer(load_scenario(str(EXAMPLES / "explore-nested-churn.toml")),
                   Options(preemptions=1, design="runcache")).run()
    assert out.violation is not None and out.violation["kind"] in ("lost", "stuck")


@pytest.mark.parametrize("design", ["none", "shadow", "dummy"])
def test_churn_explore_example_has_no_violation_at_bound_0(design):
    out = Explorer(load_scenario(str(EXAMPLES / "explore-nested-churn.toml")),
                   Options(preemptions=0, design=design)).run()
    assert out.violation is None and out.complete
