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
g         ``invalid-target-dropped`` — AVIC_INCOMPLETE_IPI ID 2 (invalid target) is ignored
          (before 5aede752a839): the hardware exits before delivering to anyone, so a logical
          multicast that names one unused logical ID is lost for its valid targets (lost).
h         ``x2apic-logical-kick-bitmap`` — avic_kick_target_vcpus_fast takes the x2APIC logical
          bitmap from ICRH[31:16] (603ccef42ce9 .. da3fb46d226a): for cluster 0 the bitmap is 0
          and nobody is kicked; a blocked target keeps the IRR bit the hardware set (stuck).
i         ``kick-broadcast-first-only`` — the kick fast path before 603ccef42ce9 (issue 1): a
          physical broadcast without shorthand kicks only the target the exit's index names.
j         ``kick-logical-first-only`` — the same fast path (issue 2): an xAPIC logical multicast
          kicks only the vCPU of the logical-table entry the exit's index names.
k         ``erratum1235-ipiv-on`` — enable_ipiv is not forced off on erratum-1235 parts (before
          8de4a1c8164e): IsRunning = 1 reaches the table and the erratum's stale read leaves a
          blocked target with the IPI pending (stuck).
l         ``id1-wake-only`` — avic_kick_target_vcpus() only wakes the targets (before
          66fa226c131f): an L1 vCPU running L2 (its AVIC off) is not kicked out to take the
          interrupt L1's KVM sent it (lost).
m         ``refresh-no-put`` — svm_refresh_apicv_exec_ctrl() only rewrites the VMCB (before
          df7e4827c549): a vCPU whose AVIC goes off (here: an L1 vCPU entering L2) keeps
          IsRunning = 1, so a sender's AVIC rings a doorbell instead of exiting (lost).
n         ``logical-aliased-no-inhibit`` — no LOGICAL_ID_ALIASED inhibit (before 9a364857ab4f):
          two vCPUs sharing an xAPIC logical ID share one logical-table entry, and a logical IPI
          to that ID reaches only the vCPU the entry names (lost).
o         ``physical-aliased-no-inhibit`` — no PHYSICAL_ID_ALIASED inhibit when xAPIC IDs alias
          through vcpu_id truncation (before 5063c41bebac): IPIv (or AVIC) indexes its table with
          the 8-bit destination and reaches only one of the aliased vCPUs (lost).
p         ``pi-load-no-on-recompute`` — vmx_vcpu_pi_load() clears SN without setting ON again
          (before c112b5f50232): a vector posted by IPI virtualisation while the target was
          preempted (SN = 1: PIR set, ON not) stays in the PIR, and the target blocks (stuck).
========  ==============================================================================

Mutants ``g``–``p`` (and ``b``) are the *regression corpus*: each one is the pre-fix behaviour of
a real upstream KVM fix (``commit`` and ``subject`` name it; for ``b``, whose fix is a revert
whose id was not found, ``introduced`` names the commit that brought the bug in; ``source`` says
where the commit was read), with a scenario that exercises it (``examples/corpus/`` or an
existing example) and the bound within which the explorer finds it. ``navic mutants`` lists them all;
docs/verification.md "Regression corpus" has the table of how each is found.
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
    commit: str = ""     # upstream fix (12+ hex digits) whose pre-fix behaviour this is
    subject: str = ""    # that commit's subject line
    source: str = ""     # where the commit (id, subject, diff or message) was read
    scenario: str = ""   # the scenario that exercises it (path from the repository root)
    design: str | None = None   # the nested design to explore it under, if any
    introduced: str = ""   # upstream commit that introduced the bug (when the fix's id is unknown)
    bound: int = 1         # the preemption bound within which the explorer finds it


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


# =================================================================================================
# Regression corpus: the pre-fix behaviour of real upstream KVM fixes.
# =================================================================================================

# --- (g) AVIC_INCOMPLETE_IPI ID 2 (invalid target) ignored ---------------------------------------
def _make_invalid_target_dropped(orig: Any) -> Any:
    """``_handlers`` is SvmVendor's exit dispatch table: replace the AVIC_INCOMPLETE_IPI entry."""
    from navic.hw import avic as A
    from navic.hw import vmcb as V

    handle = orig[V.SVM_EXIT_AVIC_INCOMPLETE_IPI]

    def _exit_incomplete_ipi(self: Any, vcpu: Any) -> Gen:
        if vcpu.vmcb.exit_info_2 >> 32 == A.AVIC_IPI_FAILURE_INVALID_TARGET:
            # BUG (before 5aede752a839): `case AVIC_IPI_FAILURE_INVALID_TARGET: break;` — the
            # hardware exits *before* delivering to the valid targets, so they never get it.
            self.kvm.rec.count("avic_incomplete_ipi_id2")
            yield self.kvm.costs.AVIC_INCOMPLETE_IPI
            return "continue"
        return (yield from handle(self, vcpu))

    return dict(orig) | {V.SVM_EXIT_AVIC_INCOMPLETE_IPI: _exit_incomplete_ipi}


# --- (h) avic_kick_target_vcpus_fast: x2APIC logical bitmap taken from ICRH[31:16] -----------------
def _make_x2apic_logical_kick_bitmap(orig: Any) -> Any:
    def kick_target_vcpus(self: Any, src: Any, icr: Any, index: int) -> Generator[Any, Any, int]:
        if icr.shorthand == 0 and icr.dest_mode == 1 and src.apic.mode == "x2apic" \
                and icr.dest != 0xFFFFFFFF:
            # BUG (603ccef42ce9 .. da3fb46d226a): `bitmap = dest & 0xFFFF0000` is the cluster, not
            # the member bits; for cluster 0 it is 0 and the fast path returns 0 ("nobody to send
            # the logical interrupt to"): no target is kicked.
            bitmap = icr.dest & 0xFFFF0000
            if not bitmap:
                return 0
        return (yield from orig(self, src, icr, index))

    return kick_target_vcpus


# --- (i), (j) avic_kick_target_vcpus_fast before 603ccef42ce9: only the reported index is kicked ---
def _kick_only_index(self: Any, src: Any, icr: Any, index: int) -> Generator[Any, Any, int]:
    """The fast path before 603ccef42ce9: the vCPU named by the exit's index (physical: the APIC
    ID; xAPIC logical: the guest physical ID in that logical-table entry), kicked if it matches
    the destination — and nothing else, whatever the destination covers."""
    kvm = self.kvm
    if icr.dest_mode == 0:
        apic_id = index
    else:
        from navic.hw import avic as A

        entry = self.mem.read32(self.logical_table_hpa + 4 * index)
        apic_id = entry & A.LOG_GUEST_PHYS_ID_MASK
    target = kvm.vcpu_by_id.get(apic_id)
    if target is None:
        return -1
    from navic.apic import dest as apic_dest

    if not apic_dest.match_dest(target.apic, src.apic, icr):
        return -1
    yield 0
    kvm.vendor.complete_interrupt_delivery(target, from_vcpu=src)
    return 1


def _make_kick_broadcast_first_only(orig: Any) -> Any:
    def kick_target_vcpus(self: Any, src: Any, icr: Any, index: int) -> Generator[Any, Any, int]:
        if icr.shorthand == 0 and icr.dest_mode == 0 and icr.dest in (0xFF, 0xFFFFFFFF):
            # BUG (before 603ccef42ce9, issue 1): a physical broadcast without shorthand takes the
            # fast path, which kicks only the first not-running target the exit reports.
            n = yield from _kick_only_index(self, src, icr, index)
            if n >= 0:
                return n
        return (yield from orig(self, src, icr, index))

    return kick_target_vcpus


def _make_kick_logical_first_only(orig: Any) -> Any:
    def kick_target_vcpus(self: Any, src: Any, icr: Any, index: int) -> Generator[Any, Any, int]:
        if icr.shorthand == 0 and icr.dest_mode == 1 and src.apic.mode == "xapic":
            # BUG (before 603ccef42ce9, issue 2): a logical multicast takes the fast path, which
            # kicks only the vCPU of the logical-table entry the exit reports (the first one).
            n = yield from _kick_only_index(self, src, icr, index)
            if n >= 0:
                return n
        return (yield from orig(self, src, icr, index))

    return kick_target_vcpus


# --- (k) IPI virtualisation left on on erratum-1235 parts ------------------------------------------
def _make_erratum1235_ipiv_on(orig: Any) -> Any:
    def __init__(self: Any, kvm: Any, host: Any, silicon: Any, features: Any) -> None:
        orig(self, kvm, host, silicon, features)
        # BUG (before 8de4a1c8164e): avic_hardware_setup() does not force enable_ipiv off on
        # family 17h, so IsRunning = 1 reaches the hardware table and erratum 1235 bites.
        if host.l0.ipiv == "auto":
            self.enable_ipiv = True
            self.avic.enable_ipiv = True

    return __init__


# --- (l) ID 1: wake the targets, nothing else ------------------------------------------------------
def _make_id1_wake_only(orig: Any) -> Any:
    def kick_target_vcpus(self: Any, src: Any, icr: Any, index: int) -> Generator[Any, Any, int]:
        # BUG (before 66fa226c131f): avic_kick_target_vcpus() only kvm_vcpu_wake_up()s each match;
        # a target whose AVIC is off (here: an L1 vCPU running L2) gets no KVM_REQ_EVENT and no
        # kick, so the IRR bit the hardware set is not noticed while it stays in the guest.
        from navic.apic import dest as apic_dest

        n = 0
        for v in self.kvm.vcpus:
            if apic_dest.match_dest(v.apic, src.apic, icr):
                yield 0
                self.kvm.kvm_vcpu_wake_up(v)
                n += 1
        return n

    return kick_target_vcpus


# --- (m) APICv refresh does not put/load the AVIC entry ------------------------------------------
def _skip_avic_put_load(*_args: Any, **_kw: Any) -> None:
    """Stands in for AvicVm.vcpu_put / AvicVm._load while mutant ``m`` runs the refresh."""


def _make_refresh_no_put_load(orig: Any) -> Any:
    def refresh_apicv_exec_ctrl(self: Any, vcpu: Any) -> None:
        # BUG (before df7e4827c549): svm_refresh_apicv_exec_ctrl() only rewrites the VMCB's AVIC
        # controls; it neither avic_vcpu_put()s on deactivation nor avic_vcpu_load()s on
        # activation, so a vCPU whose AVIC goes off keeps IsRunning = 1 in the physical ID table.
        # (The real refresh runs with the AvicVm's put/load shadowed for the call, so the mutant
        # follows any other change to that method.)
        avic = self.avic
        if avic.vcpu_put is _skip_avic_put_load:   # already shadowed (the mutant applied twice)
            orig(self, vcpu)
            return
        avic.vcpu_put = avic._load = _skip_avic_put_load
        try:
            orig(self, vcpu)
        finally:
            del avic.vcpu_put, avic._load

    return refresh_apicv_exec_ctrl


# --- (n) no LOGICAL_ID_ALIASED inhibit ------------------------------------------------------------
def _make_logical_aliased_no_inhibit(orig: Any) -> Any:
    def recalc_logical_aliasing(self: Any) -> None:
        # BUG (before 9a364857ab4f): AVIC stays active when two vCPUs share a logical ID; the
        # logical table's one entry for that ID names only the last vCPU that wrote its LDR.
        return None

    return recalc_logical_aliasing


# --- (o) no PHYSICAL_ID_ALIASED inhibit for truncated xAPIC IDs --------------------------------------
def _make_physical_aliased_no_inhibit(orig: Any) -> Any:
    def recalc_apic_map(self: Any) -> None:
        # BUG (before 5063c41bebac): kvm_recalculate_apic_map() does not inhibit APICv/AVIC when the
        # optimized physical map is disabled; two vCPUs whose xAPIC IDs alias (vcpu_id 256 truncates
        # to xAPIC ID 0) keep APICv, and the hardware delivers a physical IPI only to the vCPU whose
        # table entry the 8-bit destination indexes.
        orig(self)
        self.clear_apicv_inhibit("PHYSICAL_ID_ALIASED")

    return recalc_apic_map


# --- (p) vmx_vcpu_pi_load() clears SN without recomputing ON ----------------------------------------
def _make_pi_load_no_on_recompute(orig: Any) -> Any:
    def pi_load(self: Any, vcpu: Any, cpu: int) -> None:
        # BUG (before c112b5f50232): SN is cleared, but ON is not set again for PIR bits that a
        # poster (VT-d, or here IPI virtualisation) set while SN = 1 without setting ON; the
        # pending vector stays in the PIR, which vmx_sync_pir_to_irr() reads only when ON = 1.
        pid = getattr(vcpu, "pid", None)
        was_on = pid is not None and pid.on
        orig(self, vcpu, cpu)
        if pid is not None and not was_on:
            pid.on = False

    return pi_load


MUTANTS: dict[str, Mutant] = {m.name: m for m in (
    Mutant("a", "block-reads-virr-first",
           "L0 block path reads vIRR before clearing IsRunning (the barrier bug)",
           "navic.hv.kvm:Kvm.kvm_vcpu_block", "stuck", _make_block_reads_virr_first),
    Mutant("b", "id1-sets-irr-again",
           "AVIC_INCOMPLETE_IPI ID-1 handler sets IRR again (emulates the IPI): duplicate delivery",
           "navic.hv.avic:AvicVm.kick_target_vcpus", "duplicated", _make_id1_sets_irr_again,
           introduced="bb218fbcfaaa3b115d4cd7a43c0ca164f3a96e57",
           subject="svm: Fix AVIC incomplete IPI emulation",
           source="kvm@vger.kernel.org: [PATCH] Revert \"svm: Fix AVIC incomplete IPI emulation\" "
                  "(Suravee Suthikulpanit: \"This reverts commit bb218fbcfaaa... could potentially "
                  "cause an extra IPI\"), mailing-list digest in the code index; digest [HIST-BB218]",
           scenario="examples/explore-pingpong-zen4.toml", bound=4),
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
    # -- the regression corpus ----------------------------------------------------------------
    Mutant("g", "invalid-target-dropped",
           "AVIC_INCOMPLETE_IPI ID 2 (invalid target) is ignored: a logical multicast naming one "
           "unused logical ID is lost for its valid targets too",
           "navic.hv.svm:SvmVendor._handlers", "lost", _make_invalid_target_dropped,
           commit="5aede752a839904059c2b5d68be0dc4501c6c15f",
           subject="KVM: SVM: Process ICR on AVIC IPI delivery failure due to invalid target",
           source="stable@vger.kernel.org FAILED-patch mail for 5.4.y quoting the commit in Linus's "
                  "tree (message and diff), code index",
           scenario="examples/corpus/avic-invalid-target.toml"),
    Mutant("h", "x2apic-logical-kick-bitmap",
           "avic_kick_target_vcpus_fast takes the x2APIC logical bitmap from ICRH[31:16]: a "
           "cluster-0 logical IPI to a blocked vCPU kicks nobody",
           "navic.hv.avic:AvicVm.kick_target_vcpus", "stuck", _make_x2apic_logical_kick_bitmap,
           commit="da3fb46d226a",
           subject="KVM: SVM: Fix x2APIC Logical ID calculation for avic_kick_target_vcpus_fast",
           source="kvm@vger.kernel.org: [PATCH v5 13/33] (diff `bitmap = dest & 0xFFFF0000` -> "
                  "`dest & 0xFFFF`, Fixes: 603ccef42ce9) and Sean's reply naming the commit "
                  "da3fb46d226a in Paolo's tree; kvm.git shortlog (da3fb46d226a3e..., code index)",
           scenario="examples/corpus/x2avic-logical-kick.toml"),
    Mutant("i", "kick-broadcast-first-only",
           "before the fast-path fix, a physical broadcast (dest 0xFF, no shorthand) after an ID-1 "
           "exit kicks only the target the exit's index names",
           "navic.hv.avic:AvicVm.kick_target_vcpus", "stuck", _make_kick_broadcast_first_only,
           commit="603ccef42ce9f07840cf4c0448f3261413460b07",
           subject="KVM: x86: SVM: fix avic_kick_target_vcpus_fast",
           source="kvm@vger.kernel.org [PATCH 4/7] (Maxim Levitsky, 2022-06-06: \"There are two issues "
                  "... 1. ... physical destination of 0xFF ... must be a broadcast\") and kvm.git "
                  "post-receive log with the full id (code index)",
           scenario="examples/corpus/avic-broadcast-kick.toml"),
    Mutant("j", "kick-logical-first-only",
           "before the fast-path fix, an xAPIC logical multicast after an ID-1 exit kicks only the "
           "vCPU of the logical-table entry the exit's index names",
           "navic.hv.avic:AvicVm.kick_target_vcpus", "stuck", _make_kick_logical_first_only,
           commit="603ccef42ce9f07840cf4c0448f3261413460b07",
           subject="KVM: x86: SVM: fix avic_kick_target_vcpus_fast",
           source="as for i (issue 2 of the same commit: \"a logical IPI request to more than one "
                  "target. Index field only provides index ... of first such target\")",
           scenario="examples/corpus/avic-logical-multicast-kick.toml"),
    Mutant("k", "erratum1235-ipiv-on",
           "enable_ipiv is not forced off on erratum-1235 parts: IsRunning = 1 reaches the table "
           "and a stale IsRunning read leaves a blocked target with the IPI pending",
           "navic.hv.svm:SvmVendor.__init__", "stuck", _make_erratum1235_ipiv_on,
           commit="8de4a1c8164e5b2e40d1df764840a31de983f40b",
           subject="KVM: SVM: Disable (x2)AVIC IPI virtualization if CPU has erratum #1235",
           source="kvm-x86 'applied' mail ([18/62], github.com/kvm-x86/linux/commit/8de4a1c8164e) and "
                  "a shortlog with the full id (code index); digest §8",
           scenario="examples/corpus/erratum1235-ipiv-auto.toml"),
    Mutant("l", "id1-wake-only",
           "AVIC_INCOMPLETE_IPI ID 1 only wakes the targets: one whose AVIC is off (an L1 vCPU "
           "running L2) is neither kicked nor given KVM_REQ_EVENT",
           "navic.hv.avic:AvicVm.kick_target_vcpus", "lost", _make_id1_wake_only,
           commit="66fa226c131fb89287f8f7d004a46e39a859fbf6",
           subject="KVM: SVM: fix race between interrupt delivery and AVIC inhibition",
           source="kvm@vger.kernel.org [PATCH RESEND 10/30] (Maxim Levitsky, 2022-02-07; message and "
                  "diff: avic_kick_target_vcpus() went from kvm_vcpu_wake_up() to "
                  "svm_complete_interrupt_delivery()) and kvm.git post-receive log with the full id",
           scenario="examples/explore-nested-spin.toml", design="none"),
    Mutant("m", "refresh-no-put",
           "svm_refresh_apicv_exec_ctrl() does not avic_vcpu_put() a vCPU whose AVIC goes off: "
           "IsRunning stays 1 and senders' doorbells reach a pCPU that no longer runs it with AVIC",
           "navic.hv.svm:SvmVendor.refresh_apicv_exec_ctrl", "lost", _make_refresh_no_put_load,
           commit="df7e4827c5490a6a0cc41341497f5267712511cf",
           subject="KVM: SVM: call avic_vcpu_load/avic_vcpu_put when enabling/disabling AVIC",
           source="kvm@vger.kernel.org [PATCH v4 15/16] (Maxim Levitsky, 2021-08-10; message and "
                  "diff: avic_vcpu_load()/avic_vcpu_put() added to svm_refresh_apicv_exec_ctrl()), "
                  "a kvm.git log with the full id and Paolo Bonzini's reply naming df7e4827c549",
           scenario="examples/explore-nested-spin.toml", design="none"),
    Mutant("n", "logical-aliased-no-inhibit",
           "AVIC is not inhibited when vCPUs share an xAPIC logical ID: the logical table names one of "
           "them and a logical IPI to that ID reaches only that one",
           "navic.hv.svm:SvmVendor.recalc_logical_aliasing", "lost", _make_logical_aliased_no_inhibit,
           commit="9a364857ab4f8d59d417eca88a39ddf9b308237b",
           subject="KVM: SVM: Inhibit AVIC if vCPUs are aliased in logical mode",
           source="kvm@vger.kernel.org patch mail (Sean Christopherson; message and diff: "
                  "APICV_INHIBIT_REASON_LOGICAL_ID_ALIASED set from kvm_recalculate_apic_map() when "
                  "the logical map is disabled, Fixes: 18f40c53e10f), a kvm.git log with the full id "
                  "and a stable FAILED-patch mail listing 9a364857ab4f (code index)",
           scenario="examples/corpus/avic-logical-aliased.toml"),
    Mutant("o", "physical-aliased-no-inhibit",
           "APICv is not inhibited when xAPIC IDs alias through vcpu_id truncation: a physical IPI "
           "to the aliased ID reaches only the vCPU the accelerated table names",
           "navic.hv.kvm:Kvm.recalc_apic_map", "lost", _make_physical_aliased_no_inhibit,
           commit="5063c41bebac8d18a83ac7b5d54782d73a9ab5f7",
           subject="KVM: x86: Inhibit APICv/AVIC if the optimized physical map is disabled",
           source="kvm@vger.kernel.org [PATCH v4 24/32] and its v5 (Sean Christopherson; message and "
                  "diff: PHYSICAL_ID_ALIASED set when kvm_recalculate_apic_map() has no optimized map, "
                  "added to the SVM and VMX required inhibits) and a kvm.git log with the full id",
           scenario="examples/corpus/ipiv-xapic-id-alias.toml"),
    Mutant("p", "pi-load-no-on-recompute",
           "vmx_vcpu_pi_load() clears SN but does not set ON for PIR bits posted while SN = 1: a vCPU "
           "that was not loaded when IPI virtualisation posted to it never sees the vector",
           "navic.hv.vmx:VmxVendor.pi_load", "stuck", _make_pi_load_no_on_recompute,
           commit="c112b5f50232",
           subject="KVM: x86: Recompute PID.ON when clearing PID.SN",
           source="commit page on a kernel-tree mirror (git.cdn.openwrt.org, staging/blogic.git, "
                  "h=c112b5f50232a257056903040c66d97efb536889; Luwei Kang's message: \"If a posted "
                  "interrupt comes at this time, the irq remapping facility will set the bit of PIR "
                  "... but not ON ... To fix this, restore the invariant after PID.SN is cleared\"); "
                  "the resulting code (clear SN, barrier, set ON if the PIR is not empty) in later "
                  "vmx_vcpu_pi_load() versions (code index)",
           scenario="examples/corpus/ipiv-preempted-target.toml"),
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
