"""An interrupt taken right after an instruction retired must not lose that instruction's result:
the handler's IRET returns to the interrupted code, which then consumes the value it read (or the
fault it raised). Regression: IRET's retire used to overwrite the interrupted code's result."""

from __future__ import annotations

import pytest

from navic.runner import run_scenario
from navic.scenario import loads_scenario

READS = ('{ op = "read", reg = "tpr", into = "t" }, { op = "read", reg = "ldr", into = "ldr" }, '
         '{ op = "read", reg = "id", into = "id" }, { op = "read", reg = "svr", into = "svr" }')


@pytest.mark.parametrize("virt", ["none", "kvm"])
def test_reads_survive_an_interrupt_after_them(virt: str) -> None:
    text = f'''name = "read-then-interrupt"
[host]
virt = "{virt}"
[l1]
vcpus = 1
apic = "x2apic"
[[program]]
cpu = "l1.0"
ops = [ {{ op = "sti" }}, {{ op = "ipi", shorthand = "self", vector = 0x40 }}, {READS},
        {{ op = "compute", cycles = 1000 }} ]
[program.handlers]
0x40 = [ {{ op = "eoi" }} ]
'''
    res = run_scenario(loads_scenario(text, "t.toml"))
    assert [d["vector"] for d in res["deliveries"]] == [0x40]    # the self-IPI lands among the reads
    reads = res["reads"]["l1.0"]
    assert None not in reads.values(), reads
    assert reads["id"] == 0 and reads["t"] == 0 and reads["ldr"] == 1 and reads["svr"] & 0x100
