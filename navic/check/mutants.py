"""Mutants: deliberately broken variants of the model, to show the explorer catches real bugs.

A mutant is selected only from tests and ``navic explore --mutant NAME`` (and by a schedule file
that such a run wrote). It is applied by monkeypatching one method for the duration of a ``with
active(name):`` block — the model's source is never edited.

========  ==============================================================================
name      bug
========  ==============================================================================
a         ``block-reads-virr-first`` — L0's block path reads vIRR *before* clearing IsRunning
          (the missing barrier of ``avic_vcpu_blocking``/``kvm_vcpu_check_block``, digest
          §5.3): an IPI whose IRR set lands after the read and whose IsRunning read lands
          before the clear rings a doorbell at a pCPU that has left guest mode; the vCPU
          blocks with the interrupt pending (stuck).
b         ``id1-sets-irr-again`` — the AVIC_INCOMPLETE_IPI (ID 1, target not running) handler
          emulates the IPI (sets IRR again) instead of only kicking the targets (digest §9.2
          invariant 4): if the target already took the first copy, it runs the handler twice
          for one send (duplicated).
========  ==============================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

Gen = Generator[Any, Any, Any]


@dataclass(frozen=True)
class Mutant:
    name: str
    alias: str
    description: str
    target: str          # "module:Class.method"
    expect: str          # the violation kind it should produce
    make: Callable[[Any], Any]   # original method -> replacement


# --- (a) L0 block path reads vIRR before clearing IsRunning ------------------------------------
def _make_block_reads_virr_first(orig: Any) -> Any:
    def kvm_vcpu_block(self: Any, vcpu: Any) -> Gen:
        events = self.kvm_vcpu_has_events(vcpu)   # BUG: vIRR read before IsRunning <- 0
        yield 0
        self.vendor.vcpu_blocking(vcpu)           # avic_vcpu_blocking(): IsRunning <- 0
        vcpu.blocking = True
        yield 0
        while not events:
            vcpu.blocked = True
            self.rec.count("blocks")
            self.host.sched.release(vcpu)
            yield vcpu.wakeup
            vcpu.blocked = False
            yield self.costs.VCPU_WAKE
            yield from self.host.sched.acquire(vcpu)
            vcpu.last_cpu = vcpu.cpu
            events = self.kvm_vcpu_has_events(vcpu)
        vcpu.blocking = False
        self.vendor.vcpu_unblocking(vcpu)

    return kvm_vcpu_block


# --- (b) ID-1 handler sets IRR again ------------------------------------------------------------
def _make_id1_sets_irr_again(orig: Any) -> Any:
    def kick_target_vcpus(self: Any, src: Any, icr: Any, index: int) -> Generator[Any, Any, int]:
        # BUG: treat ID 1 like ID 0/2 — emulate the whole IPI (IRR set again in every target).
        yield from self.kvm.kvm_apic_send_ipi(src, icr)
        return (yield from orig(self, src, icr, index))

    return kick_target_vcpus


MUTANTS: dict[str, Mutant] = {m.name: m for m in (
    Mutant("a", "block-reads-virr-first",
           "L0 block path reads vIRR before clearing IsRunning (the barrier bug)",
           "navic.hv.kvm:Kvm.kvm_vcpu_block", "stuck", _make_block_reads_virr_first),
    Mutant("b", "id1-sets-irr-again",
           "AVIC_INCOMPLETE_IPI ID-1 handler sets IRR again (emulates the IPI): duplicate delivery",
           "navic.hv.avic:AvicVm.kick_target_vcpus", "duplicated", _make_id1_sets_irr_again),
)}
_ALIASES = {m.alias: m.name for m in MUTANTS.values()}


def get(name: str) -> Mutant:
    key = _ALIASES.get(name, name)
    if key not in MUTANTS:
        choices = ", ".join(f"{m.name} ({m.alias})" for m in MUTANTS.values())
        raise KeyError(f"unknown mutant {name!r}; known: {choices}")
    return MUTANTS[key]


def names() -> list[str]:
    return [m.name for m in MUTANTS.values()] + [m.alias for m in MUTANTS.values()]


@contextlib.contextmanager
def active(name: str) -> Iterator[Mutant]:
    """Apply mutant ``name`` (or its alias) for the duration of the block."""
    import importlib

    m = get(name)
    mod_name, qual = m.target.split(":")
    cls_name, meth = qual.split(".")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    orig = cls.__dict__[meth]
    setattr(cls, meth, m.make(orig))
    try:
        yield m
    finally:
        setattr(cls, meth, orig)
