"""KVM's SVM vendor code at L0 (arch/x86/kvm/svm/svm.c + the AVIC glue of avic.c).

Exit handlers keep KVM's names in their docstrings. Exit reasons are counted under the level the
exit was handled at (``l0`` here) with KVM's lowercase tracepoint names.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from navic.apic.icr import Icr
from navic.apic.lapic import GPFault
from navic.apic.registers import (
    APIC_DFR,
    APIC_ICR,
    APIC_ICR2,
    APIC_ID,
    APIC_LDR,
    APIC_RRR,
    APIC_TMCCT,
    MSR_IA32_APICBASE,
    MSR_IA32_TSC_DEADLINE,
    X2APIC_MSR_BASE,
    X2APIC_READABLE,
)
from navic.hv.avic import PRE_IPIV_FORCE_OFF, AvicVm, avic_want_avic_enabled, ipiv_forced_off
from navic.hv.hypercall import kvm_emulate_hypercall
from navic.hv.kvm import IN_GUEST_MODE, REQ_APICV_UPDATE, REQ_EVENT, Kvm, Vcpu
from navic.hw import avic as A
from navic.hw import isa
from navic.hw import vmcb as V
from navic.hw.isa import Fault
from navic.hw.svm import GuestContext, Svm

if TYPE_CHECKING:
    from navic.hv.host import Host

Gen = Generator[Any, Any, Any]

X2APIC_MSRS = range(0x800, 0x900)
# x2AVIC (avic_set_x2apic_msr_interception): writes KVM lets through (TPR, EOI, ICR, SELF_IPI); reads
# of the registers in kvm_x2apic_disable_read_intercept_reg_mask() — every readable register except
# TMCCT, whose current count only KVM's timer emulation knows (the backing page holds no live count).
# Reads of the other x2APIC MSRs (reserved, write-only) exit and #GP in kvm_x2apic_msr_read().
X2AVIC_PASSTHROUGH_WRITES = frozenset({0x808, 0x80B, 0x830, 0x83F})
X2AVIC_PASSTHROUGH_READS = frozenset(X2APIC_MSR_BASE + (off >> 4) for off in X2APIC_READABLE if off != APIC_TMCCT)
LVTT_MSR = 0x832


_MSR_POLICIES: dict[tuple[bool, bool], tuple[frozenset[int], frozenset[int]]] = {}


def _msr_intercepts(*, doorbell: bool, x2avic: bool) -> tuple[frozenset[int], frozenset[int]]:
    """(read, write) intercepted MSRs of one MSR-permission-map policy, built once and shared by
    every vCPU with that policy (each vCPU used to get its own ~16 KiB pair of sets).

    APIC_BASE and TSC_DEADLINE always exit, LVTT writes too; ``doorbell``: nested doorbell
    emulation (writes to the AVIC doorbell MSR exit); ``x2avic``: x2AVIC active for an x2APIC
    guest, only the writes it does not accelerate exit, and reads of TMCCT and of non-readable
    registers (:data:`X2AVIC_PASSTHROUGH_READS`); otherwise (APICv off, or hybrid AVIC:
    AVIC without x2AVIC) every x2APIC MSR exits."""
    key = (doorbell, x2avic)
    pol = _MSR_POLICIES.get(key)
    if pol is None:
        rd = {MSR_IA32_APICBASE, MSR_IA32_TSC_DEADLINE}
        wr = {MSR_IA32_APICBASE, MSR_IA32_TSC_DEADLINE, LVTT_MSR}
        if doorbell:
            wr.add(A.MSR_AMD64_SVM_AVIC_DOORBELL)
        if x2avic:
            rd |= set(X2APIC_MSRS) - X2AVIC_PASSTHROUGH_READS
            wr |= set(X2APIC_MSRS) - X2AVIC_PASSTHROUGH_WRITES
        else:
            rd |= set(X2APIC_MSRS)
            wr |= set(X2APIC_MSRS)
        pol = _MSR_POLICIES[key] = (frozenset(rd), frozenset(wr))
    return pol


class SvmVendor:
    """``kvm_x86_ops`` for SVM with AVIC, for one VM."""

    def __init__(self, kvm: Kvm, host: Host, silicon: Svm, features: Any) -> None:
        self.kvm = kvm
        self.host = host
        self.hw = silicon
        self.features = features
        l0 = host.l0
        errata = self._errata(l0, features)
        self.errata = errata
        # enable_apicv = avic_hardware_setup(): avic "auto" is on only for Zen4+ with X2AVIC; AVIC must
        # be enumerated (zen3: only with force_avic). [l0] apicv = false turns it off as well.
        self.enable_apicv = bool(l0.apicv) and avic_want_avic_enabled(l0.avic, l0.force_avic, features)
        # enable_ipiv (default on) is forced off on family 17h/18h after the module parameters are read;
        # an explicit ipiv = true there models a kernel before that (PRE_IPIV_FORCE_OFF).
        self.notes: list[str] = []
        if ipiv_forced_off(features):
            self.enable_ipiv = l0.ipiv is True
            if self.enable_ipiv and self.enable_apicv:
                self.notes.append(f"l0.ipiv = true on {features.name} (family {features.family:#x}): KVM forces "
                                  f"enable_ipiv off there (avic_hardware_setup); this run models a "
                                  f"{PRE_IPIV_FORCE_OFF}")
        else:
            self.enable_ipiv = l0.ipiv is not False
        if l0.ipiv is True and l0.apicv and not self.enable_apicv and features.avic:
            force = "" if features.avic_enumerated else " and l0.force_avic = true"
            self.notes.append(f"l0.ipiv = true has no effect: AVIC is off on {features.name} "
                              f"(kvm_amd avic = {l0.avic!r}); set l0.avic = true{force}")
        self.avic = AvicVm(kvm, features, enable_ipiv=self.enable_ipiv)
        self.nested: Any = None   # navic.hv.nested.core.NestedSvm when L1 may run L2
        self.posted_timer = bool(l0.posted_timer)
        kvm.apic_timer_fn = self.apic_timer_expired

    @staticmethod
    def _errata(l0: Any, features: Any) -> frozenset[str]:
        if l0.errata == "auto":
            # zen3 with force_avic "behaves as zen2 without the erratum".
            return frozenset(features.errata)
        return frozenset(l0.errata)

    # -- vCPU creation ---------------------------------------------------------------------
    def vcpu_create(self, vcpu: Vcpu) -> None:
        mem = self.kvm.mem
        hpa = mem.alloc(1)
        vmcb = V.Vmcb(mem, hpa)
        vcpu.vmcb = vmcb
        vcpu.ctx = GuestContext(vcpu.name, "L2" if self.kvm.exit_level == "l1" else "L1", vmcb, vcpu.guest)
        vcpu.ctx.bind_vapic(vcpu.apic)
        vcpu.ctx01 = vcpu.ctx          # the vCPU's own context; ctx02 replaces vcpu.ctx while it runs L2
        vcpu.nested = None
        vcpu.nested_inhibit = False
        vcpu.ldr_reg = 0
        vcpu.dfr_reg = 0xFFFFFFFF
        vcpu.avic_physical_id_entry = 0
        vcpu.irtes = []
        for bit in (V.INTERCEPT_INTR, V.INTERCEPT_NMI, V.INTERCEPT_HLT, V.INTERCEPT_MSR_PROT,
                    V.INTERCEPT_VMRUN, V.INTERCEPT_SHUTDOWN, V.INTERCEPT_VMMCALL):
            vmcb.set_intercept(bit)
        vmcb.v_intr_masking = 1
        vmcb.asid = 1           # any non-zero ASID (KVM allocates them per pCPU generation)
        vmcb.np_enable = True   # AVIC requires nested paging
        # avic_init_vmcb(): pointers always programmed.
        vmcb.avic_vapic_bar = 0xFEE00000
        vmcb.backing_page_hpa = vcpu.backing_hpa
        vmcb.logical_table_hpa = self.avic.logical_table_hpa
        vmcb.physical_table_hpa = self.avic.physical_table_hpa
        if self.enable_apicv and not self.avic.init_backing_page(vcpu):
            self.kvm.set_apicv_inhibit("PHYSICAL_ID_TOO_BIG")

    def post_create(self) -> None:
        """After all vCPUs exist: initial activation and logical-table state."""
        if not self.enable_apicv:
            self.kvm.set_apicv_inhibit("DISABLED")
        for v in self.kvm.vcpus:
            v.apicv_active = self.apicv_allowed(v)
            if v.apicv_active:
                self.activate_vmcb(v)
            else:
                self.deactivate_vmcb(v)
            self.avic.handle_dfr_update(v)
            self.avic.handle_ldr_update(v)

    # -- activation ------------------------------------------------------------------------
    def apicv_allowed(self, vcpu: Vcpu) -> bool:
        """kvm_vcpu_apicv_activated() and, per vCPU, __kvm_vcpu_update_apicv(): APICv is off while
        the vCPU's APIC is hardware-disabled (LAPIC_MODE_DISABLED)."""
        return (self.enable_apicv and not self.kvm.inhibits and not getattr(vcpu, "nested_inhibit", False)
                and vcpu.apic.hw_enabled)

    def activate_vmcb(self, vcpu: Vcpu) -> None:
        """avic_activate_vmcb(): AVIC on; x2AVIC if the guest is in x2APIC mode and the CPU has it."""
        vmcb = vcpu.vmcb
        x2 = vcpu.apic.mode == "x2apic"
        vmcb.avic_enable = 1
        vmcb.x2avic_enable = 1 if (x2 and self.features.x2avic) else 0
        vmcb.max_index = self.avic.max_physical_id(x2 and self.features.x2avic)
        vmcb.mark_dirty(V.VMCB_CLEAN_AVIC)
        self._set_msr_intercepts(vcpu, active=True)

    def deactivate_vmcb(self, vcpu: Vcpu) -> None:
        vmcb = vcpu.vmcb
        vmcb.avic_enable = 0
        vmcb.x2avic_enable = 0
        vmcb.max_index = 0
        self._set_msr_intercepts(vcpu, active=False)

    def _set_msr_intercepts(self, vcpu: Vcpu, *, active: bool) -> None:
        """The MSR permission map of vmcb01: shared immutable sets, one per policy (see
        :func:`_msr_intercepts`); a change assigns another set, never edits one in place."""
        ctx = getattr(vcpu, "ctx01", vcpu.ctx)
        ctx.msr_rd, ctx.msr_wr = _msr_intercepts(
            doorbell=self.nested is not None,
            x2avic=bool(active and self.features.x2avic and vcpu.apic.mode == "x2apic"))

    def refresh_apicv_exec_ctrl(self, vcpu: Vcpu) -> None:
        """avic_refresh_apicv_exec_ctrl(): follow the inhibit state (KVM_REQ_APICV_UPDATE)."""
        active = self.apicv_allowed(vcpu)
        if active == vcpu.apicv_active:
            if active:
                self.activate_vmcb(vcpu)   # e.g. xAPIC <-> x2APIC switch
            return
        vcpu.apicv_active = active
        if active:
            self.avic.handle_dfr_update(vcpu)
            self.avic.handle_ldr_update(vcpu)
            self.activate_vmcb(vcpu)
            if vcpu.cpu is not None:
                self.avic._load(vcpu, vcpu.cpu)
        else:
            self.deactivate_vmcb(vcpu)
            self.avic.vcpu_put(vcpu)
        self.kvm.rec.count("apicv_toggles")

    # -- scheduling hooks ------------------------------------------------------------------
    def vcpu_load(self, vcpu: Vcpu, cpu: int | None) -> None:
        vcpu.last_cpu = cpu
        if cpu is not None:
            self.avic.vcpu_load(vcpu, cpu)
            if self.nested is not None and not vcpu.blocking:
                self.nested.design.vcpu_load(vcpu, cpu)   # __nested_avic_load()

    def vcpu_put(self, vcpu: Vcpu) -> None:
        if vcpu.blocking:
            return
        if not self.host.l0.doorbell_strict:
            return   # RFC v3 patch 18 (avic_doorbell_strict=0): svm_vcpu_put skips both puts
        self.avic.vcpu_put(vcpu)
        if self.nested is not None:
            self.nested.design.vcpu_put(vcpu, blocking=False)   # __nested_avic_put()

    def vcpu_blocking(self, vcpu: Vcpu) -> None:
        self.avic.vcpu_put(vcpu, blocking=True)
        if self.nested is not None:
            self.nested.design.vcpu_put(vcpu, blocking=True)

    def vcpu_unblocking(self, vcpu: Vcpu) -> None:
        if vcpu.cpu is not None and vcpu.apicv_active:
            self.avic._load(vcpu, vcpu.cpu)
        if self.nested is not None and vcpu.cpu is not None:
            self.nested.design.vcpu_load(vcpu, vcpu.cpu)

    def update_irtes(self, vcpu: Vcpu, *, running: bool, host_id: int | None, ga_log: bool = False) -> None:
        iommu = getattr(self.host, "iommu", None)
        if iommu is not None:
            iommu.update_vcpu(vcpu, running=running, host_id=host_id, ga_log=ga_log)

    def recalc_logical_aliasing(self) -> None:
        """kvm_recalculate_logical_map() + kvm_recalculate_apic_map(): LOGICAL_ID_ALIASED is set when
        the logical map is KVM_APIC_MODE_MAP_DISABLED — software-enabled APICs with an LDR in
        different logical modes (xAPIC flat, xAPIC cluster, x2APIC: a mixed-mode guest), or xAPIC
        logical IDs that do not map 1:1 to vCPUs. x2APIC LDRs are derived from the ID and never
        alias. (Upstream: "KVM: x86: Inhibit APICv/AVIC if the optimized logical map is disabled".)"""
        seen: dict[int, int] = {}
        aliased = False
        modes: set[str] = set()
        for v in self.kvm.vcpus:
            if v.apic.mode not in ("xapic", "x2apic") or not v.apic.sw_enabled:
                continue
            if v.apic.mode == "x2apic":
                modes.add("x2apic")
                continue
            ldr = v.apic.read_reg(APIC_LDR) >> 24
            if not ldr:
                continue
            flat = v.apic.read_reg(APIC_DFR) == 0xFFFFFFFF
            modes.add("flat" if flat else "cluster")
            bits = ldr if flat else ldr & 0xF
            if bin(bits).count("1") != 1:
                aliased = True
                break
            key = ldr if flat else ldr
            if key in seen:
                aliased = True
                break
            seen[key] = v.idx
        if aliased or len(modes) > 1:
            self.kvm.set_apicv_inhibit("LOGICAL_ID_ALIASED")
        else:
            self.kvm.clear_apicv_inhibit("LOGICAL_ID_ALIASED")

    # -- delivery ---------------------------------------------------------------------------
    def apic_timer_expired(self, vcpu: Vcpu) -> None:
        """lapic.c apic_timer_expired(apic, from_timer_fn = true) (the hrtimer callback). The timer
        interrupt is posted (IRR + doorbell, no exit) only if kvm_use_posted_timer_interrupt():
        kvm_can_post_timer_interrupt() — ``pi_inject_timer`` with HLT/MWAIT in the guest, off by
        default ([l0] posted_timer) — and APICv active and the vCPU IN_GUEST_MODE. Otherwise (KVM's
        default) ``pending`` + kick: an exit, and injection on the next entry (Kvm.defer_apic_timer)."""
        if self.posted_timer and vcpu.apicv_active and vcpu.mode == IN_GUEST_MODE:
            self.kvm._apic_timer_expired(vcpu)
        else:
            self.kvm.defer_apic_timer(vcpu)

    def complete_interrupt_delivery(self, vcpu: Vcpu, *, from_vcpu: Vcpu | None) -> None:
        """svm_complete_interrupt_delivery(): doorbell if in guest mode, else wake up; with APICv
        inactive, KVM_REQ_EVENT + kick so the entry path injects it."""
        kvm = self.kvm
        if not vcpu.apicv_active:
            vcpu.requests.add(REQ_EVENT)
            kvm.kvm_vcpu_kick(vcpu, from_vcpu=from_vcpu)
            return
        if vcpu.mode == IN_GUEST_MODE:
            if vcpu.cpu is not None and not (from_vcpu is not None and from_vcpu.cpu == vcpu.cpu):
                # avic_ring_doorbell(): WRMSR(C001_011B, target pCPU's APIC ID)
                self.host.doorbell(self.host.pcpus[vcpu.cpu].apic_id, src=from_vcpu.cpu if from_vcpu else None)
            return
        kvm.kvm_vcpu_wake_up(vcpu)

    def inject_pending_events(self, vcpu: Vcpu) -> None:
        """kvm_check_and_inject_events(): NMIs always through EVENTINJ; maskable interrupts only
        when APICv is inactive (EVENTINJ if IF = 1, else an interrupt window via V_IRQ + VINTR)."""
        a = vcpu.apic
        vmcb = vcpu.vmcb
        g = vcpu.guest
        if vcpu.nested is not None and vcpu.nested.active:
            return   # L1 events while L2 runs: nested #VMEXIT(INTR) first (check_nested_events)
        if vmcb.event_inj & (1 << 31):
            return
        shadow = vmcb.int_state & 1   # svm_nmi_blocked() / svm_interrupt_blocked(): the STI shadow
        nmi = False
        if self.kvm.process_nmi(vcpu, masked=g.nmi_blocked):
            if not g.nmi_blocked and not shadow:
                self.kvm.take_pending_nmi(vcpu)
                vmcb.event_inj = (1 << 31) | (2 << 8) | 2
                # svm_inject_nmi() without vNMI: track the NMI's masking through the IRET intercept.
                vmcb.set_intercept(V.INTERCEPT_IRET)
                nmi = True
            else:
                self.enable_nmi_window(vcpu)
        if vcpu.apicv_active:
            return
        v = a.has_interrupt()
        if v < 0:
            return
        # An NMI went into EVENTINJ: the interrupt waits for its window (kvm_check_and_inject_events
        # ends with enable_irq_window() whenever an interrupt is still injectable).
        if g.IF and not shadow and not nmi:
            a.ack_interrupt()
            vmcb.event_inj = (1 << 31) | v
            vmcb.v_irq = 0
            vmcb.clr_intercept(V.INTERCEPT_VINTR)
        else:
            vmcb.v_irq = 1
            vmcb.v_intr_vector = 0
            vmcb.set_intercept(V.INTERCEPT_VINTR)

    def enable_nmi_window(self, vcpu: Vcpu) -> None:
        """svm_enable_nmi_window() without vNMI: an NMI arrived while the guest cannot take one.
        process_nmi() keeps it pending. Still in its NMI handler: KVM intercepts IRET to learn when
        the guest unblocks NMIs (``iret_interception`` + the single-step over the IRET, which navic
        folds into one exit taken after the IRET: docs/model.md "Peer suites"). Only in the STI
        shadow: single-step one instruction (RFLAGS.TF, ``nmi_singlestep``), then inject."""
        if vcpu.guest.nmi_blocked:
            vcpu.vmcb.set_intercept(V.INTERCEPT_IRET)
        else:
            vcpu.ctx.single_step = True

    # -- running ---------------------------------------------------------------------------
    def run(self, vcpu: Vcpu) -> Gen:
        """svm_vcpu_run(): VMRUN on this pCPU. Returns the silicon's VMRUN steps themselves (not a
        generator around them: one level less on every guest instruction)."""
        return self.hw.vmrun(self.host.pcpus[vcpu.cpu], vcpu.ctx)

    def handle_exit(self, vcpu: Vcpu, code: int) -> Gen:
        """svm_handle_exit(): the steps that handle the exit (exits from L2 go to nested.c first).
        Returns the handler's steps directly, like :meth:`run`."""
        st = vcpu.nested
        if st is not None and st.active:
            return self.nested.handle_l2_exit(vcpu, code)
        return self._handle_exit(vcpu, code)

    def _handle_exit(self, vcpu: Vcpu, code: int) -> Gen:
        """Dispatch on the exit code of an exit L0 handles for this guest."""
        kvm = self.kvm
        name = V.exit_name(code)
        kvm.rec.exit(kvm.exit_level, name)
        vmcb = vcpu.vmcb
        eii = vmcb.exit_int_info
        if eii & (1 << 31):
            # svm_complete_interrupts(): an event injected but not delivered comes back in
            # EXITINTINFO; KVM re-queues it for the next entry.
            vmcb.exit_int_info = 0
            vmcb.event_inj = eii
        if kvm.trace.on:
            kvm.trace.emit("kvm_exit", pcpu=vcpu.cpu, level=kvm.exit_level.upper(), vcpu=vcpu.ctx.name,
                           reason=name, info1=vmcb.exit_info_1, info2=vmcb.exit_info_2)
        # svm_exit_handlers_fastpath() (needs next_rip: every modelled part has NRIPS).
        fast = kvm.exit_fastpath(vcpu, vcpu.ctx.exit_insn, hlt=code == V.SVM_EXIT_HLT)
        yield kvm.costs.EXIT_FASTPATH if fast else kvm.costs.EXIT_DISPATCH
        handler = self._handlers.get(code)
        if handler is None:
            raise RuntimeError(f"{vcpu.name}: unhandled #VMEXIT {name} ({code:#x})")
        r = yield from handler(self, vcpu)
        if vcpu.pending_ipis:
            yield from kvm.flush_ipis(vcpu)
        return r

    def _exit_intr(self, vcpu: Vcpu) -> Gen:
        """An external (host) interrupt: the host handled it; nothing to do for the guest."""
        return "continue"
        yield  # pragma: no cover

    def _exit_vintr(self, vcpu: Vcpu) -> Gen:
        """interrupt_window_interception(): the guest opened its interrupt window."""
        vmcb = vcpu.vmcb
        vmcb.v_irq = 0
        vmcb.clr_intercept(V.INTERCEPT_VINTR)
        vcpu.requests.add(REQ_EVENT)
        return "continue"
        yield  # pragma: no cover

    def _exit_hlt(self, vcpu: Vcpu) -> Gen:
        """The HLT intercept: kvm_emulate_halt()."""
        return self.kvm.kvm_emulate_halt(vcpu)
        yield  # pragma: no cover

    def _exit_db(self, vcpu: Vcpu) -> Gen:
        """db_interception() with nmi_singlestep: the instruction in the shadow has run; drop TF and
        re-evaluate events (the pending NMI is injected now)."""
        vcpu.ctx.single_step = False
        vcpu.requests.add(REQ_EVENT)
        return "continue"
        yield  # pragma: no cover

    def _exit_vmmcall(self, vcpu: Vcpu) -> Gen:
        """vmmcall_interception() -> kvm_emulate_hypercall() (navic.hv.hypercall); RAX is the result."""
        insn = vcpu.ctx.exit_insn
        vcpu.ctx.exit_insn = None
        vcpu.guest.retire((yield from kvm_emulate_hypercall(self.kvm, vcpu, insn)))
        return "continue"

    def _exit_iret(self, vcpu: Vcpu) -> Gen:
        """iret_interception(): the guest left its NMI handler; drop the intercept and re-evaluate
        events (KVM_REQ_EVENT), so a pending NMI is injected now."""
        vcpu.vmcb.clr_intercept(V.INTERCEPT_IRET)
        vcpu.requests.add(REQ_EVENT)
        return "continue"
        yield  # pragma: no cover

    def _exit_msr(self, vcpu: Vcpu) -> Gen:
        """msr_interception(): x2APIC MSRs through kvm_x2apic_msr_{read,write}; APIC_BASE."""
        insn = vcpu.ctx.exit_insn
        vcpu.ctx.exit_insn = None
        costs = self.kvm.costs
        yield costs.MSR_EMULATE
        write = type(insn) is isa.Wrmsr
        if insn.msr == A.MSR_AMD64_SVM_AVIC_DOORBELL:
            if not write:
                vcpu.guest.retire(Fault("#GP", "the AVIC doorbell MSR is write-only"))
            elif self.nested is None:
                vcpu.guest.retire(Fault("#GP", "AVIC is not offered to this guest"))
            else:
                vcpu.guest.retire((yield from self.nested.design.on_doorbell_write(vcpu, insn.value)))
            return "continue"
        vcpu.guest.retire(self.kvm.kvm_apic_msr(vcpu, insn))
        return "continue"

    def _apic_base_changed(self, vcpu: Vcpu, old: int) -> None:
        a = vcpu.apic
        if a.hw_enabled and a.apic_base & 0xFFFFF000 != 0xFEE00000:
            # __kvm_apic_set_base(): only an enabled APIC away from APIC_DEFAULT_PHYS_BASE (sticky);
            # disabling the APIC with a zero base, as guests do, inhibits nothing.
            self.kvm.set_apicv_inhibit("APIC_BASE_MODIFIED")
        if (old ^ a.apic_base) & (1 << 11):
            # EN toggled: kvm_lapic_set_base() -> kvm_vcpu_update_apicv(); LAPIC_MODE_DISABLED
            # deactivates APICv for this vCPU (apicv_allowed).
            vcpu.requests.add(REQ_APICV_UPDATE)
        if (old ^ a.apic_base) & (1 << 10):
            # xAPIC <-> x2APIC: KVM re-programs AVIC (x2AVIC bit, max index, MSR intercepts).
            vcpu.requests.add(REQ_APICV_UPDATE)
            if a.mode == "x2apic":
                self.avic.invalidate_logical(vcpu)
                vcpu.ldr_reg = 0
            self.kvm.recalc_apic_map()

    def _exit_npf(self, vcpu: Vcpu) -> Gen:
        """npf_interception(): a tracked store of a guest hypervisor (write tracking of its AVIC
        tables), or the APIC page with APICv off (MMIO emulation: instruction decode)."""
        insn = vcpu.ctx.exit_insn
        vcpu.ctx.exit_insn = None
        if type(insn) is isa.MemWrite:
            yield from self.nested.design.on_tracked_write(vcpu, insn.gpa, insn.size, insn.value)
            vcpu.guest.retire(None)
            return "continue"
        yield from self.kvm.emulate_apic_mmio(vcpu, insn)
        return "continue"

    def _after_apic_write(self, vcpu: Vcpu, off: int, old_id: int) -> None:
        if off == APIC_ID and vcpu.apic.read_reg(APIC_ID) != old_id:
            self.kvm.recalc_apic_map()   # raises or clears APIC_ID_MODIFIED
        elif off in (APIC_LDR, APIC_DFR):
            self.kvm.recalc_apic_map()

    def _exit_noaccel(self, vcpu: Vcpu) -> Gen:
        """avic_unaccelerated_access_interception(): trap -> replay the write through the APIC
        model (LDR/DFR also rewrite the logical table); fault -> emulate the access."""
        vmcb = vcpu.vmcb
        off = vmcb.exit_info_1 & A.AVIC_UNACCEL_ACCESS_OFFSET_MASK
        write = bool((vmcb.exit_info_1 >> 32) & A.AVIC_UNACCEL_ACCESS_WRITE_MASK)
        kvm = self.kvm
        if kvm.trace.on:
            kvm.trace.emit("kvm_avic_unaccelerated_access", pcpu=vcpu.cpu, level="L0", vcpu=vcpu.name,
                           offset=off, trap=A.kvm_is_trap_offset(off), write=write,
                           vec=vmcb.exit_info_2 & 0xFFFFFFFF)
        a = vcpu.apic
        if A.kvm_is_trap_offset(off, self.features.ext_lvt_avic_access_chg) and vcpu.ctx.exit_insn is None:
            yield kvm.costs.AVIC_NOACCEL_TRAP
            if off == APIC_RRR:
                return "continue"   # avic_unaccel_trap_write(): "Ignore writes to Read Remote Data"
            if off == APIC_LDR:
                self.avic.handle_ldr_update(vcpu)
            elif off == APIC_DFR:
                self.avic.handle_dfr_update(vcpu)
            value = a.regs[off >> 2]
            if off == APIC_ICR:
                a.write_reg(APIC_ICR2, a.regs[APIC_ICR2 >> 2])
            # kvm_apic_write_nodecode(): replay the value already in the page.
            a.write_reg(off, value)
            if off == APIC_ID:
                kvm.recalc_apic_map()   # raises or clears APIC_ID_MODIFIED
            elif off in (APIC_LDR, APIC_DFR):
                kvm.recalc_apic_map()
            return "continue"
        # Fault: kvm_emulate_instruction() on the access the guest attempted.
        insn = vcpu.ctx.exit_insn
        vcpu.ctx.exit_insn = None
        yield kvm.costs.AVIC_NOACCEL_FAULT
        try:
            if type(insn) is isa.MmioWrite:
                a.mmio_write(off, insn.value)
                res: Any = None
            elif type(insn) is isa.MmioRead:
                res = a.mmio_read(off)
            elif type(insn) is isa.Wrmsr:
                a.wrmsr(insn.msr, insn.value)
                res = None
            else:
                res = a.rdmsr(insn.msr)
        except GPFault as e:
            res = Fault("#GP", str(e))
        vcpu.guest.retire(res)
        return "continue"

    def _exit_incomplete_ipi(self, vcpu: Vcpu) -> Gen:
        """avic_incomplete_ipi_interception(): ID 0/2 emulate the IPI; ID 1 kick the targets
        (hardware already set IRR — never again); ID 3 cannot happen; ID 4 ignored."""
        kvm = self.kvm
        vmcb = vcpu.vmcb
        icrl = vmcb.exit_info_1 & 0xFFFFFFFF
        icrh = vmcb.exit_info_1 >> 32
        fid = vmcb.exit_info_2 >> 32
        index = vmcb.exit_info_2 & 0xFFF
        kvm.rec.count(f"avic_incomplete_ipi_id{fid}")
        if kvm.trace.on:
            kvm.trace.emit("kvm_avic_incomplete_ipi", pcpu=vcpu.cpu, level="L0", vcpu=vcpu.name,
                           icrh=icrh, icrl=icrl, id=fid, index=index)
        x2 = vcpu.apic.mode == "x2apic"
        icr = Icr.decode(icrl, icrh if x2 else icrh, x2)
        if fid in (A.AVIC_IPI_FAILURE_INVALID_INT_TYPE, A.AVIC_IPI_FAILURE_INVALID_TARGET):
            yield kvm.costs.AVIC_INCOMPLETE_IPI
            yield from kvm.kvm_apic_send_ipi(vcpu, icr)
        elif fid == A.AVIC_IPI_FAILURE_TARGET_NOT_RUNNING:
            yield kvm.costs.AVIC_INCOMPLETE_IPI
            yield from self.avic.kick_target_vcpus(vcpu, icr, index)
        elif fid == A.AVIC_IPI_FAILURE_INVALID_BACKING_PAGE:
            kvm.rec.count("avic_invalid_backing_page_warn")
        return "continue"

    def _exit_vmrun(self, vcpu: Vcpu) -> Gen:
        """vmrun_interception(): nested.c's nested_svm_vmrun(); #UD when SVM is not offered."""
        if self.nested is None:
            vcpu.guest.retire(Fault("#UD", "VMRUN: SVM is not exposed to this guest"))
            vcpu.ctx.exit_insn = None
            return "continue"
        return (yield from self.nested.vmrun(vcpu))

    def check_nested_events(self, vcpu: Vcpu) -> Gen | tuple[()]:
        """kvm_x86_ops.nested_ops->check_events: the steps to run (none without nested SVM)."""
        if self.nested is None:
            return ()
        return self.nested.check_nested_events(vcpu)

    _handlers: dict[int, Any] = {
        V.SVM_EXIT_VMRUN: _exit_vmrun,
        V.SVM_EXIT_INTR: _exit_intr,
        V.SVM_EXIT_VINTR: _exit_vintr,
        V.SVM_EXIT_HLT: _exit_hlt,
        V.SVM_EXIT_IRET: _exit_iret,
        V.SVM_EXIT_VMMCALL: _exit_vmmcall,
        V.SVM_EXIT_EXCP_BASE + 1: _exit_db,
        V.SVM_EXIT_MSR: _exit_msr,
        V.SVM_EXIT_NPF: _exit_npf,
        V.SVM_EXIT_AVIC_UNACCELERATED_ACCESS: _exit_noaccel,
        V.SVM_EXIT_AVIC_INCOMPLETE_IPI: _exit_incomplete_ipi,
    }
