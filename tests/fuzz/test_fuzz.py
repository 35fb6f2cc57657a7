"""Fuzzing navic (issue 16): every input ends as ran / rejected (one line naming file and key) /
unsupported (one line) / stopped by a limit (one line) — never a traceback, never silence — and
valid bare-metal scenarios report no violation. The bounded run here is part of `make test`; the
long one is bench/fuzz.py (docs/verification.md, "Fuzzing")."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from fuzzgen import DataPicker, RandomPicker, classify, fuzz_input, mutate_doc, to_toml, valid_scenario
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from navic import runner
from navic.apic.lapic import LocalApic
from navic.cli import main
from navic.scenario import MAX_DIGITS, MAX_NESTING, ScenarioError, load_scenario, loads_scenario

CASES = sorted((Path(__file__).parent / "cases").glob("*.toml"))
_SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _check(o, what: str) -> None:
    assert not o.failed, f"{what}: {o.kind}: {o.site} {o.message}"
    assert o.kind in ("ran", "rejected", "unsupported", "limit")
    if o.kind == "ran" and o.virt == "none":
        unexplained = [v for v in o.violations if not v.get("explained")]
        assert not unexplained, f"{what}: bare-metal violations {unexplained}"


@_SETTINGS
@given(st.data())
def test_valid_scenarios_run_or_are_refused_in_one_line(tmp_path_factory, data) -> None:
    doc = valid_scenario(DataPicker(data))
    path = tmp_path_factory.mktemp("v") / "valid.toml"
    o = classify(to_toml(doc), path, timeout_s=10)
    _check(o, to_toml(doc))
    assert o.kind != "rejected", o.message   # generated to pass the checker


@_SETTINGS
@given(st.data())
def test_mutated_scenarios_never_crash(tmp_path_factory, data) -> None:
    p = DataPicker(data)
    doc = mutate_doc(valid_scenario(p), p)
    path = tmp_path_factory.mktemp("m") / "mutated.toml"
    _check(classify(to_toml(doc), path, timeout_s=10), to_toml(doc))


def test_seeded_mix_of_valid_mutated_and_malformed_inputs(tmp_path: Path) -> None:
    """300 inputs of bench/fuzz.py's seed 1 (valid, structural and textual mutations of generated
    scenarios and of examples/), in-process."""
    for i in range(300):
        _family, data = fuzz_input(RandomPicker(random.Random(1_000_003 + i)))
        _check(classify(data, tmp_path / f"in{i}.toml", timeout_s=10), f"seed 1 input {i}")


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_fuzz_found_false_alarms_stay_fixed(case: Path) -> None:
    """Violations the fuzzer found on valid scenarios that were oracle false alarms (the header
    of each file says why)."""
    assert runner.run_scenario(load_scenario(case))["violations"] == []


# -- crash sites found by the fuzzer ----------------------------------------------------------
@pytest.mark.parametrize("text, where", [
    ("name = 'x'\nseed = " + "[" * 5000 + "]" * 5000, "2:"),                 # RecursionError in tomllib
    ("name = 'x'\nx = {a=" * 1 + "{a=" * 3000 + "1" + "}" * 3001, "2:"),
    ("name = 'x'\nseed = " + "9" * 5000, "2:8"),                            # ValueError (4300 digits)
    ("name = 'x'\nseed = -0x" + "f" * 200, "2:"),
])
def test_tomllib_limits_are_scenario_errors(text: str, where: str) -> None:
    with pytest.raises(ScenarioError) as e:
        loads_scenario(text, "bad.toml")
    assert str(e.value).startswith(f"bad.toml:{where}") and "\n" not in str(e.value)
    assert str(MAX_NESTING) in str(e.value) or str(MAX_DIGITS) in str(e.value)


def test_nesting_inside_strings_and_comments_is_not_counted() -> None:
    scn = loads_scenario('name = "' + "[" * 200 + '"  # ' + "{" * 200 + "\n", "ok.toml")
    assert scn.name.startswith("[[[")


@pytest.mark.parametrize("text, path", [
    ('name = "x"\n[workload]\nkind = []\n', "workload.kind"),               # TypeError (unhashable)
    ('name = "x"\n[workload]\nkind = {a = 1}\n', "workload.kind"),
    ('name = "x"\n"" = 1\n', '""'),                                          # unnamed unknown key
    ('name = "x"\n[host]\n"a.b" = 1\n', 'host."a.b"'),
])
def test_rejections_name_the_key(text: str, path: str) -> None:
    with pytest.raises(ScenarioError) as e:
        loads_scenario(text, "bad.toml")
    assert str(e.value).startswith(f"bad.toml: {path}: "), str(e.value)


def test_x2apic_logical_id_uses_id_bits_19_to_4() -> None:
    """An x2APIC ID above 0xFFFFF (an allowed apic_ids value) crashed LocalApic: the derived LDR
    overflowed 32 bits. SDM §11.12.10.2: logical ID = (ID[19:4] << 16) | (1 << ID[3:0])."""
    a = LocalApic(0xFFFFFFED, mode="x2apic")
    assert a.read_reg(0xD0) == (0xFFFE << 16) | (1 << 0xD)
    scn = loads_scenario('name = "x"\n[host]\nvirt = "kvm"\n[l1]\nvcpus = 2\napic_ids = [4294967277, 5]\n'
                         '[[program]]\ncpu = "l1.0"\nops = [{ op = "read", reg = "LDR", into = "ldr" }]\n')
    assert runner.run_scenario(scn)["reads"]["l1.0"]["ldr"] == (0xFFFE << 16) | (1 << 0xD)


@pytest.mark.parametrize("extra", [
    '[[program]]\ncpu = "l1.1"\nops = [{ op = "sti" }]\n',
    '[[device]]\nvector = 0x40\ntarget = "l2.0"\nperiod_us = 1.0\n',
])
def test_nested_parts_that_would_not_run_are_refused(extra: str) -> None:
    """With [l2], an L1 program or a device used to be ignored without a word."""
    scn = loads_scenario('name = "x"\n[host]\nvirt = "kvm"\n[l1]\nvcpus = 2\n[l2]\nvcpus = 1\n' + extra, "n.toml")
    with pytest.raises(runner.UnsupportedScenario, match=r"^n\.toml: "):
        runner.simulate(scn)


# -- limits -----------------------------------------------------------------------------------
_LONG = ('name = "long"\nmax_time_us = 1e9\n[host]\nvirt = "none"\n[l1]\nvcpus = 2\n[[program]]\ncpu = "l1.0"\n'
         'ops = [{ op = "sti" }, { op = "repeat", times = 1000000000, ops = [{ op = "ipi", to = 1, vector = 0x40 },'
         ' { op = "compute", cycles = 100 }] }]\n')


@pytest.mark.parametrize("flags, limit", [(["--max-events", "5000"], "max_events"), (["--timeout", "0.5"], "timeout")])
def test_run_limits_stop_with_one_line_and_exit_1(tmp_path: Path, flags: list[str], limit: str) -> None:
    f = tmp_path / "long.toml"
    f.write_text(_LONG)
    r = CliRunner().invoke(main, ["run", str(f), "--json", *flags])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["stopped_by"]["limit"] == limit and doc["deliveries"]   # partial results
    assert r.stderr.strip() == doc["stopped_by"]["message"]
    assert r.stderr.startswith(f"{f}: stopped by ") and r.stderr.count("\n") == 1
    if limit == "max_events":
        assert doc["stopped_by"]["events"] == 5000


def test_limits_do_not_change_a_run_that_ends_within_them() -> None:
    scn = load_scenario(Path(__file__).parents[2] / "examples" / "ipi-pingpong.toml")
    plain = runner.run_scenario(scn)
    bounded = runner.simulate(scn, limits=runner.Limits(max_events=10**9, timeout_s=600)).result()
    assert plain == bounded and "stopped_by" not in plain


def test_cli_outcomes_are_exit_codes_with_one_line(tmp_path: Path) -> None:
    """A few inputs through the real command: exit 0, or 2 with one stderr line naming the file."""
    cli = CliRunner()
    for i in range(40):
        _family, data = fuzz_input(RandomPicker(random.Random(7_000_003 + i)))
        f = tmp_path / f"in{i}.toml"
        f.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        r = cli.invoke(main, ["run", str(f), "--json", "--timeout", "10"])
        assert r.exception is None or isinstance(r.exception, SystemExit), (i, r.exception)
        assert r.exit_code in (0, 2), (i, r.exit_code, r.stderr)
        if r.exit_code == 2:
            assert r.stderr.startswith(f"{f}:") and r.stderr.count("\n") == 1, (i, r.stderr)


def test_tsc_deadline_delta_near_2_64_wraps_like_u64() -> None:
    """tsc_deadline delta up to 2^64-1 is valid; rdtsc + delta is u64 arithmetic in the guest
    (Linux lapic_next_deadline), so it wraps instead of crashing the MSR model."""
    scn = loads_scenario('name = "x"\n[host]\nvirt = "none"\n[l1]\nvcpus = 1\n[[program]]\ncpu = "l1.0"\n'
                         'ops = [{ op = "compute", cycles = 1000 },'
                         ' { op = "tsc_deadline", delta = 18446744073709551615 }]\n')
    assert runner.run_scenario(scn)["errors"] == []


_GP_OPS = ('ops = [{ op = "wrmsr", msr = 0x1B, value = 0xFEE00800 }, { op = "wrmsr", msr = 0x1B, value = 0xFEE00400 },'
           ' { op = "wrmsr", msr = 0x1B, value = 0xFEE00D01 }, { op = "wrmsr", msr = 0x1B, value = 0 },'
           ' { op = "wrmsr", msr = 0x1B, value = 0xFEE00C00 }, { op = "add", var = "done" },'
           ' { op = "read", reg = "ID", into = "id" }]\n')


@pytest.mark.parametrize("host, l2", [('virt = "none"', False), ('virt = "kvm"', False),
                                      ('virt = "kvm"\ncpu = "spr"', False), ('virt = "kvm"', True),
                                      ('virt = "kvm"\ncpu = "spr"', True)],
                         ids=["bare", "l1-avic", "l1-vmx", "l2-svm", "l2-vmx"])
def test_illegal_apic_base_writes_are_gp_in_the_guest(host: str, l2: bool) -> None:
    """SDM §11.12.5: x2APIC -> xAPIC directly, EN=0 with EXTD=1, reserved bits, disabled -> x2APIC
    each raise #GP in the guest (recorded in errors) and the program goes on."""
    cpu = "l2.0" if l2 else "l1.0"
    scn = loads_scenario(f'name = "gp"\n[host]\n{host}\n[l1]\nvcpus = 1\n' + ("[l2]\nvcpus = 1\n" if l2 else "")
                         + f'[[program]]\ncpu = "{cpu}"\n' + _GP_OPS)
    r = runner.run_scenario(scn)
    assert [e["index"] for e in r["errors"]] == [0, 1, 2, 4]
    assert all(e["error"].startswith("#GP: IA32_APIC_BASE: ") for e in r["errors"])
    assert "id" in r["reads"][cpu]   # the program continued to its end


def test_max_time_us_near_the_float_limit_runs() -> None:
    """max_time_us = 1e308 is a valid number; its cycle count overflowed to infinity (OverflowError)."""
    scn = loads_scenario('name = "x"\nmax_time_us = 1e308\n[host]\nvirt = "none"\n[l1]\nvcpus = 1\n'
                         '[[program]]\ncpu = "l1.0"\nops = [{ op = "compute", cycles = 10 }]\n')
    assert runner.run_scenario(scn)["violations"] == []


def test_event_budget_also_bounds_a_cpu_that_only_computes() -> None:
    """A lone CPU computing runs ahead without the event queue (no other event can cut its compute):
    the event budget still stops it there."""
    scn = loads_scenario('name = "c"\nmax_time_us = 1e9\n[host]\nvirt = "none"\n[l1]\nvcpus = 1\n[[program]]\n'
                         'cpu = "l1.0"\nops = [{ op = "sti" }, { op = "repeat", times = 100000, ops = '
                         '[{ op = "compute", cycles = 100 }] }]\n', "c.toml")
    res = runner.simulate(scn, limits=runner.Limits(max_events=5000, timeout_s=600)).result()
    assert res["stopped_by"]["limit"] == "max_events" and res["stopped_by"]["events"] == 5000
