"""The scenario TOML contract: parsing into navic.config / navic.guest.ops, and one-line errors."""

# The tables of scenario text -> expected message read best one case per line.
# ruff: noqa: E501

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from navic.config import DeviceConfig, HostConfig, L0Config, Scenario, VmConfig
from navic.guest import ops as O
from navic.scenario import (
    DEVICE_KEYS,
    OP_NAMES,
    OP_SPECS,
    PROGRAM_KEYS,
    REGISTER_NAMES,
    SECTION_KEYS,
    TOP_KEYS,
    ScenarioError,
    load_scenario,
    loads_scenario,
    parse_scenario,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
REQUIRED_EXAMPLES = {
    "self-ipi", "ipi-pingpong", "broadcast", "logical-flat", "logical-cluster", "x2apic-cluster",
    "nmi-init", "illegal-vector", "lowest-priority", "timer",
}

FULL = """
name = "full"
seed = 7
max_time_us = 500

[host]
cpu = "spr"
pcpus = 8
virt = "kvm"

[l0]
apicv = true
force_avic = true
ipiv = false
halt_poll_ns = 0
timeslice_us = 1000
errata = ["1235", "1681"]
nested_apicv = "shadow"
doorbell_strict = false

[l1]
vcpus = 4
apic = "xapic"
apic_ids = [0, 2, 4, 6]
apicv_for_l2 = false
timeslice_us = 2000

[l2]
vcpus = 2
apic = "x2apic"

[[device]]
vector = 0x90
target = "l2.1"
period_us = 12.5
count = 3
start_us = 1

[[program]]
cpu = "l1.0"
ops = [ { op = "sti" },
        { op = "ipi", to = 1, vector = 0x40 },
        { op = "ipi", dest = 0x3, dest_mode = "logical", vector = 0x41, mode = "fixed", trigger = "edge", shorthand = "none" },
        { op = "write", reg = "TPR", value = 0x20 },
        { op = "read", reg = "PPR", into = "ppr0" },
        { op = "wrmsr", msr = 0x1b, value = 0xfee00d00 },
        { op = "rdmsr", msr = 0x802, into = "id" },
        { op = "mmio_write", offset = 0x80, value = 0x20 },
        { op = "mmio_read", offset = 0x20, into = "xid" },
        { op = "eoi" }, { op = "cli" }, { op = "hlt" },
        { op = "wait", vector = 0x40, count = 1, how = "spin" },
        { op = "compute", cycles = 2000 },
        { op = "repeat", times = 100, ops = [ { op = "eoi" }, { op = "ipi", shorthand = "others", vector = 0x42 } ] } ]
[program.handlers]
0x40 = [ { op = "ipi", to = 0, vector = 0x41 }, { op = "eoi" } ]
"65" = [ { op = "eoi" } ]

[[program]]
cpu = "l2.1"
ops = [ { op = "ipi", to = 0, vector = 0x50 } ]
"""


def parse(text: str, source: str = "t.toml") -> Scenario:
    return loads_scenario(text, source)


def error_of(text: str, source: str = "t.toml") -> str:
    with pytest.raises(ScenarioError) as info:
        parse(text, source)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{source}:")
    return message


BASE = 'name = "x"\n[l1]\nvcpus = 4\n'


def prog(ops: str, cpu: str = "l1.0", extra: str = "") -> str:
    return BASE + f'[[program]]\ncpu = "{cpu}"\nops = [ {ops} ]\n{extra}'


# ------------------------------------------------------------------------------------------ examples
def test_required_examples_exist() -> None:
    assert REQUIRED_EXAMPLES <= {p.stem for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_parses(path: Path) -> None:
    scn = load_scenario(path)
    assert scn.name == path.stem
    assert scn.source == str(path)
    assert scn.programs
    raw = tomllib.loads(path.read_text())
    assert raw["host"]["virt"] in ("none", "kvm"), "examples state [host] virt explicitly"


# ------------------------------------------------------------------------------------------ success
def test_full_contract() -> None:
    scn = parse(FULL)
    assert scn.name == "full" and scn.seed == 7 and scn.max_time_us == 500.0
    assert scn.host == HostConfig(cpu="spr", pcpus=8, virt="kvm")
    assert scn.l0 == L0Config(apicv=True, force_avic=True, ipiv=False, halt_poll_ns=0, timeslice_us=1000,
                              errata=("1235", "1681"), nested_apicv="shadow", doorbell_strict=False)
    assert scn.l1 == VmConfig(vcpus=4, apic="xapic", apic_ids=(0, 2, 4, 6), apicv_for_l2=False,
                              timeslice_us=2000)
    assert scn.l1.apic_id(3) == 6
    assert scn.l2 == VmConfig(vcpus=2, apic="x2apic")
    assert scn.devices == (DeviceConfig(vector=0x90, target="l2.1", period_us=12.5, count=3, start_us=1.0),)
    p0, p1 = scn.programs
    assert (p0.cpu, p0.level, p0.vcpu) == ("l1.0", 1, 0)
    assert (p1.cpu, p1.level, p1.vcpu) == ("l2.1", 2, 1)
    assert [type(op) for op in p0.ops] == [
        O.Sti, O.Ipi, O.Ipi, O.Write, O.Read, O.Wrmsr, O.Rdmsr, O.MmioWrite, O.MmioRead, O.Eoi, O.Cli,
        O.Hlt, O.Wait, O.Compute, O.Repeat,
    ]
    assert [op.index for op in p0.ops] == list(range(15))
    assert p0.ops[1] == O.Ipi(index=1, vector=0x40, to=1)
    assert p0.ops[2] == O.Ipi(index=2, vector=0x41, dest=3, dest_mode="logical")
    assert p0.ops[3] == O.Write(index=3, reg="TPR", value=0x20)
    assert p0.ops[4] == O.Read(index=4, reg="PPR", into="ppr0")
    assert p0.ops[5] == O.Wrmsr(index=5, msr=0x1B, value=0xFEE00D00)
    assert p0.ops[6] == O.Rdmsr(index=6, msr=0x802, into="id")
    assert p0.ops[7] == O.MmioWrite(index=7, offset=0x80, value=0x20)
    assert p0.ops[8] == O.MmioRead(index=8, offset=0x20, into="xid")
    assert p0.ops[12] == O.Wait(index=12, vector=0x40, count=1, how="spin")
    assert p0.ops[13] == O.Compute(index=13, cycles=2000)
    rep = p0.ops[14]
    assert isinstance(rep, O.Repeat) and rep.times == 100
    assert rep.ops == (O.Eoi(index=0), O.Ipi(index=1, vector=0x42, shorthand="others"))
    assert p0.handlers == {
        0x40: (O.Ipi(index=0, vector=0x41, to=0), O.Eoi(index=1)),
        65: (O.Eoi(index=0),),
    }
    assert p1.handlers == {}


def test_defaults() -> None:
    scn = parse('name = "d"\n')
    assert scn == Scenario(name="d", source="t.toml")
    assert scn.host == HostConfig() and scn.l0 == L0Config() and scn.l1 == VmConfig()
    assert scn.l2 is None and scn.programs == () and scn.devices == ()


def test_ipi_defaults_and_non_vectored_modes() -> None:
    scn = parse(prog('{ op = "ipi", to = 1, mode = "nmi" }, { op = "ipi", to = 1, mode = "init", '
                     'trigger = "level", level = 0 }, { op = "ipi", shorthand = "self", vector = 0x30 }'))
    nmi, init, self_ipi = scn.programs[0].ops
    assert nmi == O.Ipi(index=0, vector=0, to=1, mode="nmi")
    assert init == O.Ipi(index=1, vector=0, to=1, mode="init", trigger="level", level=0)
    assert self_ipi == O.Ipi(index=2, vector=0x30, shorthand="self")


def test_register_names_aliases_and_case() -> None:
    ops = ", ".join(f'{{ op = "read", reg = "{r}" }}' for r in ("spiv", "ICR_LO", "ICR_HI", "isr7", "SELF_IPI"))
    regs = [op.reg for op in parse(prog(ops)).programs[0].ops]
    # Stored upper-case, as a name the APIC model knows (an alias may be kept or canonicalised).
    assert regs[0] in ("SPIV", "SVR") and regs[1] in ("ICR_LO", "ICR") and regs[2] in ("ICR_HI", "ICR2")
    assert regs[3:] == ["ISR7", "SELF_IPI"]
    for name in ("ID", "VER", "TPR", "APR", "PPR", "EOI", "RRD", "LDR", "DFR", "SVR", "ESR", "ICR", "ICR2",
                 "LVT_TIMER", "LVT_THERMAL", "LVT_PERF", "LVT_LINT0", "LVT_LINT1", "LVT_ERROR",
                 "TIMER_INITIAL", "TIMER_CURRENT", "TIMER_DIVIDE", "SELF_IPI",
                 *(f"{a}{i}" for a in ("ISR", "TMR", "IRR") for i in range(8))):
        assert name in REGISTER_NAMES


def test_stored_register_names_are_known_to_the_apic_model() -> None:
    registers = pytest.importorskip("navic.apic.registers")
    by_name = getattr(registers, "REG_BY_NAME", None)
    if by_name is None:
        pytest.skip("navic.apic.registers.REG_BY_NAME not there yet")
    for name in REGISTER_NAMES:
        op = parse(prog(f'{{ op = "read", reg = "{name.lower()}" }}')).programs[0].ops[0]
        assert op.reg in by_name


def test_handler_keys_decimal_and_hex() -> None:
    extra = '[program.handlers]\n"0x40" = []\n"255" = [ { op = "eoi" } ]\n0XfE = []\n'
    handlers = parse(prog('{ op = "sti" }', extra=extra)).programs[0].handlers
    assert set(handlers) == {0x40, 255, 0xFE}


def test_xapic_vm_may_have_4096_vcpus() -> None:
    scn = parse('name = "big"\n[l1]\nvcpus = 4096\napic = "xapic"\n[[program]]\ncpu = "l1.4095"\n'
                'ops = [ { op = "ipi", to = 300, vector = 0x40 } ]\n')
    assert scn.l1.vcpus == 4096 and scn.programs[0].vcpu == 4095


def test_float_time_keys_accept_integers() -> None:
    scn = parse('name = "x"\nmax_time_us = 1.5\n[[device]]\nvector = 0x40\ntarget = "l1.0"\nperiod_us = 10\n')
    assert scn.max_time_us == 1.5 and scn.devices[0].period_us == 10.0


def test_load_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text('name = "ok"\n')
    assert load_scenario(path).source == str(path)
    assert load_scenario(str(path)).name == "ok"


# ------------------------------------------------------------------------------------------ errors
ERRORS = [
    # (scenario text, expected message after "t.toml: ")
    ("", "name: expected a non-empty string, got nothing (the key is missing)"),
    ('name = 3\n', "name: expected a non-empty string, got 3"),
    ('name = "x"\nseed = -1\n', "seed: expected an integer 0..0xffffffffffffffff, got -1"),
    ('name = "x"\nseed = true\n', "seed: expected an integer 0..0xffffffffffffffff, got true (a boolean)"),
    ('name = "x"\nmax_time_us = 0\n', "max_time_us: expected a number > 0, got 0"),
    ('name = "x"\nbogus = 1\n', "bogus: unknown key"),
    ('name = "x"\n[host]\npcpu = 4\n', 'host.pcpu: unknown key (did you mean "pcpus"?); expected one of cpu, pcpus, virt'),
    ('name = "x"\n[host]\ncpu = "zen9"\n', 'host.cpu: expected one of "zen2", "zen3", "zen4", "zen5", "spr", got "zen9"'),
    ('name = "x"\n[host]\npcpus = 0\n', "host.pcpus: expected an integer 1..4096, got 0"),
    ('name = "x"\n[host]\nvirt = "xen"\n', 'host.virt: expected one of "none", "kvm", got "xen"'),
    ('name = "x"\nhost = 3\n', "host: expected a table, got 3"),
    ('name = "x"\n[l0]\napicv = 1\n', "l0.apicv: expected true or false, got 1"),
    ('name = "x"\n[l0]\napicv = "true"\n', 'l0.apicv: expected true or false, got "true" (a string'),
    ('name = "x"\n[l0]\nipiv = "on"\n', 'l0.ipiv: expected one of "auto", true, false, got "on"'),
    ('name = "x"\n[l0]\nerrata = [1235]\n', 'l0.errata[0]: expected an erratum number as a string, got 1235 (write "1235")'),
    ('name = "x"\n[l0]\nerrata = "all"\n', 'l0.errata: expected "auto" or an array'),
    ('name = "x"\n[l0]\nnested_apicv = "full"\n', 'l0.nested_apicv: expected one of "none", "shadow", "dummy"'),
    ('name = "x"\n[l1]\nvcpus = 0\n', "l1.vcpus: expected an integer 1..4096, got 0"),
    ('name = "x"\n[l1]\nvcpus = 4097\n', "l1.vcpus: expected an integer 1..4096, got 4097"),
    ('name = "x"\n[l1]\nvcpus = true\n', "l1.vcpus: expected an integer 1..4096, got true (a boolean)"),
    ('name = "x"\n[l1]\napic = "x3apic"\n', 'l1.apic: expected one of "xapic", "x2apic", got "x3apic"'),
    ('name = "x"\n[l1]\nvcpus = 2\napic_ids = [0]\n', "l1.apic_ids: expected 2 APIC IDs"),
    ('name = "x"\n[l1]\nvcpus = 2\napic_ids = [3, 3]\n', "l1.apic_ids[1]: expected a unique APIC ID, got 3"),
    ('name = "x"\n[l2]\napicv_for_l2 = true\n', "l2.apicv_for_l2: unknown key"),
    ('name = "x"\n[[device]]\nvector = 0x40\ntarget = "l1.0"\n',
     "device[0].period_us: expected a number > 0, got nothing"),
    ('name = "x"\n[[device]]\nvector = 0x40\ntarget = "l2.0"\nperiod_us = 5\n',
     'device[0].target: expected a CPU of l1, "l1.0".."l1.3" (there is no [l2] section), got "l2.0"'),
    ('name = "x"\n[[device]]\nvector = 0x40\ntarget = "cpu0"\nperiod_us = 5\n',
     'device[0].target: expected a CPU name "l1.N" or "l2.N", got "cpu0"'),
    ('name = "x"\n[program]\ncpu = "l1.0"\nops = []\n', "program: expected an array of tables ([[program]]), got a table"),
    # programs
    (prog('{ op = "sti" }', cpu="l1.9"), 'program[0].cpu: expected "l1.0".."l1.3" (l1 has 4 vCPUs), got "l1.9"'),
    (prog('{ op = "sti" }', cpu="l2.0"), 'program[0].cpu: expected a CPU of l1, "l1.0".."l1.3" (there is no [l2] section), got "l2.0"'),
    (prog('{ op = "sti" }', cpu="l1.01"), 'program[0].cpu: expected "l1.0".."l1.3"'),
    (prog('{ op = "sti" }') + '[[program]]\ncpu = "l1.0"\nops = []\n',
     'program[1].cpu: expected a CPU that has no other program, got "l1.0" (already used by program[0])'),
    (BASE + '[[program]]\ncpu = "l1.0"\n', "program[0].ops: expected an array of op tables, got nothing"),
    (prog('{ op = "sti" }', extra="colour = 1\n"), "program[0].colour: unknown key"),
    (prog('{ op = "sti", x = 1 }'), 'program[0].ops[0].x: unknown key; expected one of op'),
    (prog('{ op = "jump" }'), 'program[0].ops[0].op: expected an op name, one of sti, cli, hlt, eoi, ipi, write'),
    (prog('{ vector = 3 }'), "program[0].ops[0].op: expected an op name"),
    (prog('"sti"'), 'program[0].ops[0]: expected an op table like { op = "sti" }, got "sti"'),
    # ipi
    (prog('{ op = "sti" }, { op = "ipi", to = 1, vector = 300 }'),
     "program[0].ops[1].vector: expected an integer 0..255, got 300"),
    (prog('{ op = "ipi", to = 1, vector = true }'),
     "program[0].ops[0].vector: expected an integer 0..255, got true (a boolean)"),
    (prog('{ op = "ipi", to = 1, vector = "0x40" }'),
     'program[0].ops[0].vector: expected an integer 0..255, got "0x40" (a string; write 0x40 without quotes)'),
    (prog('{ op = "ipi", to = 4, vector = 0x40 }'),
     "program[0].ops[0].to: expected a vCPU index 0..3 (l1 has 4 vCPUs), got 4"),
    (prog('{ op = "ipi", to = 1, dest = 1, vector = 0x40 }'),
     'program[0].ops[0].dest: expected exactly one of "to" and "dest", got both'),
    (prog('{ op = "ipi", vector = 0x40 }'), 'program[0].ops[0]: expected exactly one of "to"'),
    (prog('{ op = "ipi", shorthand = "all", to = 1, vector = 0x40 }'),
     'program[0].ops[0].to: expected neither "to" nor "dest" with shorthand = "all", got to = 1'),
    (prog('{ op = "ipi", to = 1, dest_mode = "logical", vector = 0x40 }'),
     'program[0].ops[0].to: expected "dest" (a logical destination) with dest_mode = "logical"'),
    (prog('{ op = "ipi", to = 1 }'),
     'program[0].ops[0].vector: expected an integer 0..255 (required for mode = "fixed"), got nothing'),
    (prog('{ op = "ipi", to = 1, vector = 1, mode = "lowpri" }'),
     'program[0].ops[0].mode: expected one of "fixed", "lowest", "smi", "nmi", "init", "sipi", "extint", got "lowpri"'),
    (prog('{ op = "ipi", to = 1, vector = 1, dest_mode = "phys" }'),
     'program[0].ops[0].dest_mode: expected one of "physical", "logical", got "phys" (did you mean "physical"?)'),
    (prog('{ op = "ipi", to = 1, vector = 1, trigger = "rising" }'), "program[0].ops[0].trigger: expected one of"),
    (prog('{ op = "ipi", to = 1, vector = 1, shorthand = "everyone" }'), "program[0].ops[0].shorthand: expected one of"),
    (prog('{ op = "ipi", to = 1, vector = 1, level = 2 }'), "program[0].ops[0].level: expected an integer 0..1, got 2"),
    (prog('{ op = "ipi", dest = 0x100000000, vector = 1 }'), "program[0].ops[0].dest: expected an integer 0..0xffffffff"),
    # other ops
    (prog('{ op = "write", reg = "TRP", value = 1 }'), 'program[0].ops[0].reg: expected an APIC register name, one of ID'),
    (prog('{ op = "write", reg = "TPR" }'), "program[0].ops[0].value: expected an integer 0..0xffffffffffffffff, got nothing"),
    (prog('{ op = "write", reg = "TPR", value = -1 }'), "program[0].ops[0].value: expected an integer"),
    (prog('{ op = "read", reg = "PPR", into = "1x" }'), "program[0].ops[0].into: expected a variable name"),
    (prog('{ op = "wrmsr", msr = 0x100000000, value = 0 }'), "program[0].ops[0].msr: expected an MSR number 0..0xffffffff"),
    (prog('{ op = "rdmsr" }'), "program[0].ops[0].msr: expected an MSR number"),
    (prog('{ op = "mmio_write", offset = 0x82, value = 0 }'),
     "program[0].ops[0].offset: expected a 4-byte-aligned offset 0..0xffc, got 130 (not a multiple of 4)"),
    (prog('{ op = "mmio_read", offset = 0x1000 }'), "program[0].ops[0].offset: expected a 4-byte-aligned offset 0..0xffc, got 4096"),
    (prog('{ op = "mmio_write", offset = 0x80, value = 0x100000000 }'), "program[0].ops[0].value: expected a 32-bit integer"),
    (prog('{ op = "wait", vector = 0x40, count = 0 }'), "program[0].ops[0].count: expected an integer >= 1, got 0"),
    (prog('{ op = "wait", vector = 0x40, how = "sleep" }'), 'program[0].ops[0].how: expected one of "spin", "hlt"'),
    (prog('{ op = "compute", cycles = 1.5 }'), "program[0].ops[0].cycles: expected an integer"),
    (prog('{ op = "repeat", times = 2, ops = [] }'), "program[0].ops[0].ops: expected a non-empty array of op tables"),
    (prog('{ op = "repeat", times = 2, ops = [ { op = "sti" }, { op = "ipi", to = 7, vector = 1 } ] }'),
     "program[0].ops[0].ops[1].to: expected a vCPU index 0..3 (l1 has 4 vCPUs), got 7"),
    # handlers
    (prog('{ op = "sti" }', extra='[program.handlers]\n"0x40" = [ { op = "ipi", to = 9, vector = 1 } ]\n'),
     "program[0].handlers.0x40[0].to: expected a vCPU index 0..3"),
    (prog('{ op = "sti" }', extra='[program.handlers]\n"300" = []\n'),
     'program[0].handlers.300: expected a vector key 0..255 in decimal or 0x-hex'),
    (prog('{ op = "sti" }', extra='[program.handlers]\nfoo = []\n'), "program[0].handlers.foo: expected a vector key"),
    (prog('{ op = "sti" }', extra='[program.handlers]\n"64" = []\n"0x40" = []\n'),
     "program[0].handlers.0x40: expected one handler per vector, got vector 0x40 again (also program[0].handlers.64)"),
    (prog('{ op = "sti" }', extra='[program.handlers]\n"0x40" = 3\n'),
     "program[0].handlers.0x40: expected an array of op tables, got 3"),
    (prog('{ op = "sti" }', extra="handlers = 1\n"), "program[0].handlers: expected a table of vector -> ops"),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS, ids=[e[1][:60] for e in ERRORS])
def test_errors_name_the_key_path(text: str, expected: str) -> None:
    message = error_of(text)
    assert message.startswith("t.toml: " + expected), message


def test_l2_program_checks_to_against_l2() -> None:
    text = BASE + '[l2]\nvcpus = 2\n[[program]]\ncpu = "l2.1"\nops = [ { op = "ipi", to = 2, vector = 1 } ]\n'
    assert "program[0].ops[0].to: expected a vCPU index 0..1 (l2 has 2 vCPUs), got 2" in error_of(text)


def test_toml_syntax_error_has_line_and_column() -> None:
    message = error_of('name = "x"\nseed = = 3\n', "bad.toml")
    assert re.fullmatch(r"bad\.toml:2:\d+: invalid TOML: .+", message), message


def test_toml_error_at_end_of_document() -> None:
    message = error_of('name = "x"\nops = [', "bad.toml")
    assert re.fullmatch(r"bad\.toml:\d+:\d+: invalid TOML: .+", message), message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}: cannot read file")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b'name = "\xff"\n')
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}:1:1: invalid TOML")


def test_error_attributes() -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario({"name": "x", "host": {"pcpus": 0}}, "s.toml")
    assert (info.value.source, info.value.path) == ("s.toml", "host.pcpus")
    assert info.value.message.startswith("expected an integer")


def test_messages_stay_on_one_line() -> None:
    message = error_of('name = "x"\n[host]\ncpu = "a\\nb"\n')
    assert "\n" not in message and "\\n" in message


# ------------------------------------------------------------------------------------------ tables/docs
def test_tables_cover_every_op_and_dataclass_field() -> None:
    assert set(OP_NAMES) == {"sti", "cli", "hlt", "eoi", "ipi", "write", "read", "wrmsr", "rdmsr",
                             "mmio_write", "mmio_read", "wait", "compute", "repeat", "add", "await", "tsc_deadline",
                             "cr8_write", "cr8_read", "cpuid", "rdtsc", "poll", "once", "sti_shadow", "hlt_count", "hypercall"}
    for spec in OP_SPECS.values():
        fields = set(spec.cls.__dataclass_fields__) - {"index"}
        assert {k.field or k.name for k in spec.keys} == fields, spec.cls


def test_docs_mention_every_key_and_op() -> None:
    docs = (ROOT / "docs" / "scenarios.md").read_text()
    names = {k.name for k in TOP_KEYS + DEVICE_KEYS + PROGRAM_KEYS}
    names |= {k.name for keys in SECTION_KEYS.values() for k in keys}
    names |= {k.name for spec in OP_SPECS.values() for k in spec.keys}
    names |= set(OP_NAMES) | {f"[{s}]" for s in SECTION_KEYS} | {"[[device]]", "[[program]]"}
    missing = sorted(n for n in names if f"`{n}`" not in docs and f"`{n} " not in docs)
    assert not missing, f"docs/scenarios.md does not mention: {missing}"
