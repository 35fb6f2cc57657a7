"""Helpers for the peer-suite ports (kvm-unit-tests / KVM selftests assertions as navic scenarios):
one scenario text run at each level where the assertion applies."""

from __future__ import annotations

from typing import Any

import navic.runner as runner
from navic.scenario import loads_scenario

# name -> (host cpu, virt, level of the programs, extra [l0] text)
LEVELS: dict[str, tuple[str, str, int, str]] = {
    "bare": ("zen4", "none", 1, ""),
    "zen4": ("zen4", "kvm", 1, ""),
    "zen2": ("zen2", "kvm", 1, ""),
    "spr": ("spr", "kvm", 1, ""),
    "noapicv": ("zen4", "kvm", 1, "apicv = false\n"),
    "spr-noapicv": ("spr", "kvm", 1, "apicv = false\n"),
    "l2": ("zen4", "kvm", 2, 'nested_apicv = "shadow"\n'),
    "l2-none": ("zen4", "kvm", 2, ""),
    "l2-spr": ("spr", "kvm", 2, ""),
}
L1_LEVELS = ["bare", "zen4", "zen2", "spr", "noapicv"]
ALL_LEVELS = [*L1_LEVELS, "l2", "l2-spr"]


def prog(cpu: int, ops: list[str], handlers: dict[int, list[str]] | None = None, *, level: int = 1) -> str:
    """One ``[[program]]`` for ``lN.<cpu>`` (ops and handler ops as inline-table strings)."""
    text = f'[[program]]\ncpu = "l{level}.{cpu}"\nops = [ {", ".join(ops)} ]\n'
    if handlers:
        text += "[program.handlers]\n" + "".join(f"{v:#x} = [ {', '.join(h)} ]\n" for v, h in handlers.items())
    return text


def run(level: str, programs: list[tuple[list[str], dict[int, list[str]] | None]], *, apic: str = "x2apic",
        vcpus: int | None = None, max_time_us: float = 500, l1: str = "", top: str = "") -> dict[str, Any]:
    """Run ``programs`` (ops, handlers per CPU 0..n-1) at ``level``; the JSON result."""
    cpu, virt, lvl, l0 = LEVELS[level]
    n = vcpus or len(programs)
    text = (f'name = "peer"\nseed = 1\nmax_time_us = {max_time_us}\n{top}'
            f'[host]\ncpu = "{cpu}"\npcpus = {max(n, 2)}\nvirt = "{virt}"\n[l0]\n{l0}'
            f'[l1]\nvcpus = {n}\napic = "{apic if lvl == 1 else "x2apic"}"\n{l1}')
    if lvl == 2:
        text += f'[l2]\nvcpus = {n}\napic = "{apic}"\n'
    text += "".join(prog(i, ops, h, level=lvl) for i, (ops, h) in enumerate(programs))
    return runner.run_scenario(loads_scenario(text, "peer.toml"))


def cpu(level: str, i: int) -> str:
    return f"l{LEVELS[level][2]}.{i}"


def got(res: dict[str, Any], name: str, vector: int | None = None) -> list[dict[str, Any]]:
    return [d for d in res["deliveries"] if d["cpu"] == name and (vector is None or d["vector"] == vector)]


def reads(res: dict[str, Any], name: str) -> dict[str, Any]:
    return res["reads"].get(name, {})


def errors(res: dict[str, Any], name: str | None = None) -> list[dict[str, Any]]:
    return [e for e in res["errors"] if name is None or e["cpu"] == name]
