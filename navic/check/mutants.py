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
c         ``dummy-no-doorbell`` — the ``dummy`` design's software IPI emulation (L0, after an
          AVIC_INCOMPLETE_IPI from L2) sets IRR in the target's real backing page but forgets
          the doorbell / wake-up toward the L1 vCPU that L1's table says runs the target: a
          target spinning in L2 never evaluates its IRR (lost).
d         ``shadow-untracked`` — the ``shadow`` design emulates L1's stores to its physical APIC
          ID table but does not update the shadow entry (write tracking without the notifier):
          when L1 clears IsRunning on blocking an L2 vCPU, the shadow keeps IsRunning = 1 and
          the hardware rings a doorbell at a pCPU that no longer runs that L2 vCPU (stuck).
e         ``vmrun-no-l2-eval`` — nested VMRUN with AVIC on in vmcb02 does not evaluate the L2
          backing page's IRR (the silicon's evaluation-pending flag starts clear for L2
          contexts): an IRR bit set while the L2 vCPU was not running — by L1 after an ID-1
          exit, or by L0's dummy emulation — is not seen until the next doorbell/EOI/TPR write.
f         ``dummy-all-invalid`` — the ``dummy`` design fills its physical ID table with
          *invalid* entries: a broadcast/shorthand IPI skips invalid entries without an exit
          (APM; digest §3.3), so every L2 target is skipped silently (lost / stuck).
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


# --- (c) dummy: the emulated IPI forgets the doorbell/wake of running targets --------------------
class _NoDoorbellEmulator:
    """Wraps the dummy design's software IPI engine: every doorbell it would ring is dropped."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def icr_write(self, *args: Any, doorbell: Any = None, **kw: Any) -> Gen:
        # BUG: IRR is set in the target's backing page, the doorbell toward the L1 vCPU that L1's
        # entry names (IsRunning = 1) never happens.
        return self._inner.icr_write(*args, doorbell=lambda _l1_apic_id: None, **kw)


def _make_dummy_no_doorbell(orig: Any) -> Any:
    def __init__(self: Any, core: Any) -> None:
        orig(self, core)
        self.emulator = _NoDoorbellEmulator(self.emulator)

    return __init__


# --- (d) shadow: tracked stores do not update the shadow entry ----------------------------------
def _make_shadow_untracked(orig: Any) -> Any:
    def emulate_store(self: Any, vcpu: Any, gpa: int, size: int, value: int) -> None:
        # BUG: the store lands in L1's table; the shadow entry (IsRunning, host ID) is left stale.
        self.host.mem.write(self.core.l1mem.hpa(gpa), size, value)

    return emulate_store


# --- (e) nested VMRUN does not evaluate the L2 backing page ---------------------------------------
class _NoFirstEval:
    """The register file of an L2 backing page, except that the first interrupt evaluation (the
    one VMRUN performs) sees nothing: the silicon's evaluation-pending flag starts clear."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._first = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def has_interrupt(self) -> int:
        if self._first:
            self._first = False
            return -1
        return int(self._inner.has_interrupt())


def _make_vmrun_no_l2_eval(orig: Any) -> Any:
    def vmrun(self: Any, pcpu: Any, ctx: Any) -> Generator[Any, Any, int]:
        if ctx.level != "L2" or not ctx.vmcb.avic_enable:
            return (yield from orig(self, pcpu, ctx))
        real = ctx._vapic
        ctx._vapic = _NoFirstEval(real)   # BUG: VMRUN's own IRR evaluation is skipped
        try:
            return (yield from orig(self, pcpu, ctx))
        finally:
            if isinstance(ctx._vapic, _NoFirstEval):
                ctx._vapic = real

    return vmrun


# --- (f) dummy: an all-invalid dummy table --------------------------------------------------------
def _make_dummy_all_invalid(orig: Any) -> Any:
    def __init__(self: Any, core: Any) -> None:
        orig(self, core)
        from navic.hv.nested.dummy import DUMMY_ENTRIES

        mem = self.host.mem
        for i in range(DUMMY_ENTRIES):   # BUG: invalid entries — broadcasts skip them silently
            mem.write64(self.table_hpa + 8 * i, 0)

    return __init__


MUTANTS: dict[str, Mutant] = {m.name: m for m in (
    Mutant("a", "block-reads-virr-first",
           "L0 block path reads vIRR before clearing IsRunning (the barrier bug)",
           "navic.hv.kvm:Kvm.kvm_vcpu_block", "stuck", _make_block_reads_virr_first),
    Mutant("b", "id1-sets-irr-again",
           "AVIC_INCOMPLETE_IPI ID-1 handler sets IRR again (emulates the IPI): duplicate delivery",
           "navic.hv.avic:AvicVm.kick_target_vcpus", "duplicated", _make_id1_sets_irr_again),
    Mutant("c", "dummy-no-doorbell",
           "dummy design: L0's emulated L2 IPI forgets the doorbell/wake of a target L1 says is running",
           "navic.hv.nested.dummy:DummyDesign.__init__", "lost", _make_dummy_no_doorbell),
    Mutant("d", "shadow-untracked",
           "shadow design: tracked stores to L1's physical ID table do not update the shadow entry",
           "navic.hv.nested.shadow:ShadowDesign.emulate_store", "stuck", _make_shadow_untracked),
    Mutant("e", "vmrun-no-l2-eval",
           "nested VMRUN with AVIC on in vmcb02 does not evaluate the L2 backing page's IRR",
           "navic.hw.svm:Svm.vmrun", "stuck", _make_vmrun_no_l2_eval),
    Mutant("f", "dummy-all-invalid",
           "dummy design: an all-invalid dummy table; broadcasts skip every L2 target silently",
           "navic.hv.nested.dummy:DummyDesign.__init__", "lost", _make_dummy_all_invalid),
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
