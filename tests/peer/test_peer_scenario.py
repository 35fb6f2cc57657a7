"""The scenario contract of the peer keys and ops: bad input is one line naming the key path."""

from __future__ import annotations

import pytest

from navic.scenario import ScenarioError, loads_scenario

BASE = 'name = "t"\n[host]\nvirt = "{virt}"\n[l1]\nvcpus = 2\n'
SL = '[[set_lapic]]\ncpu = "l1.{cpu}"\nregs = {{ {regs} }}\n'


@pytest.mark.parametrize("extra,virt,message", [
    (SL.format(cpu=0, regs="TPR = 1"), "none",
     'set_lapic[0]: expected host.virt = "kvm" (KVM_SET_LAPIC is a KVM ioctl), got virt = "none"'),
    (SL.format(cpu=0, regs="TIMER_INITIAL = 1"), "kvm", "set_lapic[0].regs.TIMER_INITIAL: expected a settable"),
    (SL.format(cpu=5, regs="TPR = 1"), "kvm", "set_lapic[0].cpu: expected"),
    (SL.format(cpu=0, regs="TPR = 0x100000000"), "kvm", "set_lapic[0].regs.TPR: expected a 32-bit integer"),
    ('[[program]]\ncpu = "l1.0"\nops = [ { op = "cr8_write", value = 16 } ]\n', "kvm",
     "program[0].ops[0].value: expected an integer 0..15"),
    ('[[program]]\ncpu = "l1.0"\nops = [ { op = "cpuid", leaf = 4 } ]\n', "kvm", "program[0].ops[0].leaf: expected"),
    ('[[program]]\ncpu = "l1.0"\nops = [ { op = "once", ops = [] } ]\n', "kvm", "program[0].ops[0].ops: expected"),
    ('[[program]]\ncpu = "l1.0"\nops = [ { op = "poll", reg = "NOPE" } ]\n', "kvm", "program[0].ops[0].reg: expected"),
    ('[[program]]\ncpu = "l1.0"\nops = [ { op = "hypercall" } ]\n', "kvm", "program[0].ops[0].nr: expected"),
    ('[[program]]\ncpu = "l1.0"\nops = [ { op = "sti_shadow" } ]\n', "kvm", "program[0].ops[0].into: expected"),
    ('[l1]\n', "kvm", None),
])
def test_bad_peer_input_is_one_line(extra: str, virt: str, message: str | None) -> None:
    text = BASE.format(virt=virt) + extra
    if message is None:   # (a duplicate [l1] table is a TOML error, also one line)
        with pytest.raises(ScenarioError) as e:
            loads_scenario(text, "bad.toml")
        assert "\n" not in str(e.value)
        return
    with pytest.raises(ScenarioError) as e:
        loads_scenario(text, "bad.toml")
    assert str(e.value).startswith(f"bad.toml: {message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_apic_bus_cycles_ns_range() -> None:
    with pytest.raises(ScenarioError) as e:
        loads_scenario(BASE.format(virt="kvm").replace("vcpus = 2\n", "vcpus = 2\napic_bus_cycles_ns = 0\n"), "b.toml")
    assert str(e.value).startswith("b.toml: l1.apic_bus_cycles_ns: expected an integer 1..")
