"""KVM's generic x86 logic (virt/kvm/kvm_main.c, arch/x86/kvm/x86.c, lapic.c delivery).

One :class:`Kvm` per VM, one :class:`Vcpu` per vCPU. A vCPU is a host thread (an engine
process) that loops like ``vcpu_run()``: enter the guest, take a #VMEXIT, handle it, maybe block
on HLT, maybe be preempted. Vendor code plugs in through :attr:`Kvm.vendor` (SVM/AVIC in
:mod:`navic.hv.svm` and :mod:`navic.hv.avic`).

Ordering KVM relies on is kept as separate atomic steps (``yield 0``) so the interleaving
explorer can probe it: ``vcpu->mode = IN_GUEST_MODE`` then re-check requests; set IRR then read
``vcpu->mode`` (svm_deliver_interrupt); clear IsRunning then re-read vIRR (avic_vcpu_blocking /
kvm_vcpu_check_block).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from navic.apic import dest as apic_dest
from navic.apic.icr import Icr
from navic.apic.lapic import ApicHooks, GPFault, LocalApic
from navic.apic.registers import APIC_ID, APIC_TDCR, MSR_IA32_APICBASE, MSR_IA32_TSC_DEADLINE
from navic.apic.registers import APIC_LDR as APIC_LDR_OFFSET
from navic.guest.kernel import GuestCpu
from navic.hv.inhibit import Inhibits
from navic.hw import isa
from navic.hw.isa import Fault
from navic.sim.engine import Handle, Signal

if TYPE_CHECKING:
    from navic.hv.host import Host

OUTSIDE_GUEST_MODE, IN_GUEST_MODE, EXITING_GUEST_MODE = 0, 1, 2
# vcpu->arch.mp_state (the two KVM_MP_STATE_* values navic needs).
MP_STATE_RUNNABLE, MP_STATE_INIT_RECEIVED = "runnable", "init_received"
MODE_NAMES = {OUTSIDE_GUEST_MODE: "outside", IN_GUEST_MODE: "in_guest", EXITING_GUEST_MODE: "exiting"}

# Requests (KVM_REQ_*).
REQ_EVENT = "event"
REQ_APICV_UPDATE = "apicv_update"
REQ_UNBLOCK = "unblock"

DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_SIPI, DM_EXTINT = 0, 1, 2, 4, 5, 6, 7
KIND_BY_MODE = {DM_FIXED: "fixed", DM_LOWEST: "lowest", DM_SMI: "smi", DM_NMI: "nmi",
                DM_INIT: "init", DM_SIPI: "sipi", DM_EXTINT: "extint"}

Gen = Generator[Any, Any, Any]

MSR_X2APIC_ICR = 0x830


def icr_fastpath_ok(value: int) -> bool:
    """handle_fastpath_set_x2apic_icr_irqoff(): fixed, physical, no shorthand, not broadcast."""
    lo = value & 0xFFFFFFFF
    return not (lo >> 18) & 3 and not (lo >> 11) & 1 and not (lo >> 8) & 7 and (value >> 32) != 0xFFFFFFFF

# kvm_main.c halt_poll_ns_grow_start (10 µs): the first grown poll window, and the floor below which
# a shrunk window drops to 0.
HALT_POLL_NS_GROW_START = 10_000


def drain(gen: Gen) -> Any:
    """Run a step generator to completion at once (for callback contexts such as timer or
    IOMMU interrupts, which are not vCPU threads and have no steps to interleave)."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


class _LapicHooks(ApicHooks):
    """What KVM's emulated local APIC of a vCPU is wired to (lapic.c callbacks)."""

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.timer: Handle | None = None

    def send_ipi(self, apic: LocalApic, icr: Icr) -> None:
        # kvm_apic_send_ipi() runs in the vCPU thread after the emulated ICR write completes.
        self.vcpu.pending_ipis.append(icr)

    def eoi_level(self, apic: LocalApic, vector: int) -> None:
        self.vcpu.kvm.rec.count("level_eois")

    def arm_timer(self, apic: LocalApic, deadline: int | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if deadline is not None:
            self.timer = self.vcpu.kvm.engine.call_at(deadline, self.vcpu.kvm.apic_timer_fn, self.vcpu,
                                                      label=f"{self.vcpu.name}.hrtimer")

    def now(self) -> int:
        return self.vcpu.kvm.engine.now


class Vcpu:
    """``struct kvm_vcpu`` (+ the vendor fields navic models, set by the vendor code)."""

    def __init__(self, kvm: Kvm, idx: int, name: str, apic_id: int, apic_mode: str,
                 guest: GuestCpu, backing_hpa: int, home: int) -> None:
        self.kvm = kvm
        self.idx = idx                 # vcpu_idx
        self.vcpu_id = apic_id         # KVM's vcpu_id is the initial APIC ID
        self.name = name
        self.guest = guest
        self.backing_hpa = backing_hpa
        self.apic = LocalApic(apic_id, page=kvm.mem.page(backing_hpa), hooks=_LapicHooks(self),
                              mode=apic_mode, bsp=(idx == 0),
                              cycles_per_timer_tick=kvm.costs.TIMER_TICK)
        self.apic.icr_stores_reserved = True   # kvm_lapic_reg_write(APIC_ICR): only BUSY is cleared
        # Scheduling (the thread).
        self.home = home
        self.cpu: int | None = None       # pCPU while loaded (vcpu->cpu)
        self.last_cpu: int | None = None
        self.granted = kvm.engine.signal(f"{name}.granted")
        self.need_resched = False
        self.preempted = False
        # KVM state.
        self.mode = OUTSIDE_GUEST_MODE
        self.requests: set[str] = set()
        self.blocking = False             # between kvm_arch_vcpu_blocking and _unblocking
        self.blocked = False              # thread asleep in kvm_vcpu_block
        self.wakeup: Signal = kvm.engine.signal(f"{name}.wakeup")
        self.poll: Signal = kvm.engine.signal(f"{name}.poll")
        self.halt_poll_ns = 0
        self.apicv_active = False
        self.timer_pending: int | None = None   # lapic_timer.pending: expiry time of a timer not yet injected
        self.pending_ipis: list[Icr] = []
        self.exit_insn: Any = None        # instruction a fault-style exit left for emulation
        self.nmi_injected = False
        self.nmi_queued = 0               # NMIs accepted since the last process_nmi() (nmi_queued)
        self.nmis_pending = 0             # vcpu->arch.nmi_pending: 0..2 (process_nmi)
        self.mp_state = MP_STATE_RUNNABLE
        self.saved_ldr: int | None = None  # the OS's LDR, restored by its AP start-up path after SIPI
        self.interrupt_window = False     # V_IRQ requested (APICv off)
        self.host_t0: int | None = None   # time of the last #VMEXIT (hypervisor CPU-time accounting)
        self.host_off_cpu = 0

    def __repr__(self) -> str:
        return f"<Vcpu {self.name}>"

    @property
    def pcpu(self) -> Any:
        return self.kvm.host.pcpus[self.cpu] if self.cpu is not None else None


class Kvm:
    """One VM at L0 and the generic KVM logic that drives its vCPUs."""

    def __init__(self, host: Host, name: str = "l1") -> None:
        self.host = host
        self.name = name
        self.engine = host.engine
        self.costs = host.costs
        self.rec = host.rec
        self.trace = host.trace
        self.mem = host.mem
        self.vcpus: list[Vcpu] = []
        self.vcpu_by_id: dict[int, Vcpu] = {}   # vcpu_id (initial APIC ID) -> vCPU (kvm_get_vcpu_by_id)
        self.vendor: Any = None  # set by the vendor module (SVM/AVIC or VMX)
        self.apic_timer_fn = self._apic_timer_expired
        self.inhibits = Inhibits(self.engine)
        self.exit_level = "l0"   # where this KVM's exits are counted ("l1" for L1's KVM)

    # -- creating vCPUs (kvm_vm_ioctl_create_vcpu) ------------------------------------------
    def create_vcpus(self, vm: Any, guest_of: Callable[[int], GuestCpu], prefix: str = "l1", *,
                     poll_wake_of: Callable[[Vcpu], Callable[[], None]] | None = None,
                     after_create: Callable[[Vcpu], None] | None = None) -> list[Vcpu]:
        """One vCPU per ``vm.vcpus``: its backing page (= the emulated APIC's register page),
        the OS's APIC defaults, the vendor's per-vCPU state; then the APIC map and the initial
        APICv activation. A vCPU spinning on memory is woken through its pCPU (``poll_wake``;
        ``poll_wake_of`` overrides it, e.g. for an L2 vCPU, whose "pCPU" is an L1 vCPU);
        ``after_create`` sees each vCPU right after the vendor created its state."""
        from navic.hw.machine import os_apic_defaults

        npcpus = len(self.host.pcpus)
        made = []
        for i in range(vm.vcpus):
            backing = self.mem.alloc(1)
            v = Vcpu(self, i, f"{prefix}.{i}", vm.apic_id(i), vm.apic, guest_of(i), backing, home=i % npcpus)
            bus_ns = getattr(vm, "apic_bus_cycles_ns", None)
            if bus_ns is not None:   # KVM_CAP_X86_APIC_BUS_CYCLES_NS: the timer's bus cycle in ns
                v.apic.cycles_per_timer_tick = max(1, round(bus_ns * self.costs.ghz))
                v.apic.write_reg(APIC_TDCR, v.apic.read_reg(APIC_TDCR))   # the tick follows
            self.vcpus.append(v)
            self.vcpu_by_id.setdefault(v.vcpu_id, v)   # the first vCPU with this ID, as a scan finds
            v.guest.poll_wake = (poll_wake_of(v) if poll_wake_of is not None
                                 else (lambda v=v: v.pcpu.wake.fire() if v.cpu is not None else None))
            self.host.backing_owner[backing] = v
            os_apic_defaults(v.apic)
            self.vendor.vcpu_create(v)
            if after_create is not None:
                after_create(v)
            made.append(v)
        self.recalc_apic_map()
        self.vendor.post_create()
        return made

    # -- APICv inhibits (kvm_set_or_clear_apicv_inhibit) -----------------------------------
    def set_apicv_inhibit(self, reason: str) -> None:
        if self.inhibits.set(reason):
            self._apicv_changed(reason, True)

    def clear_apicv_inhibit(self, reason: str) -> None:
        if self.inhibits.clear(reason):
            self._apicv_changed(reason, False)

    def _apicv_changed(self, reason: str, inhibited: bool) -> None:
        """kvm_make_all_cpus_request(KVM_REQ_APICV_UPDATE): every vCPU re-evaluates on entry."""
        if self.trace.on:
            self.trace.emit("kvm_apicv_inhibit_changed", level="L0", reason=reason, set=inhibited)
        for v in self.vcpus:
            v.requests.add(REQ_APICV_UPDATE)
            # KVM_REQ_APICV_UPDATE is KVM_REQUEST_NO_WAKEUP: a blocked vCPU is not woken, it
            # re-evaluates at its next entry; one in guest mode is forced out.
            self.kvm_vcpu_kick_no_wakeup(v)

    def recalc_apic_map(self) -> None:
        """kvm_recalculate_apic_map(): physical IDs must be 1:1 with vCPUs for APICv, and an xAPIC
        ID that differs from the vCPU ID (``xapic_id_mismatch``) raises APIC_ID_MODIFIED — which is
        cleared again once every xAPIC ID matches ("KVM: x86: Allow APICv APIC ID inhibit to be
        cleared", 2023; see docs/model.md "APIC ID inhibit")."""
        ids = [v.apic.apic_id for v in self.vcpus]
        if len(set(ids)) != len(ids):
            self.set_apicv_inhibit("PHYSICAL_ID_ALIASED")
        else:
            self.clear_apicv_inhibit("PHYSICAL_ID_ALIASED")
        if any(v.apic.mode == "xapic" and v.apic.apic_id != (v.vcpu_id & 0xFF) for v in self.vcpus):
            self.set_apicv_inhibit("APIC_ID_MODIFIED")
        else:
            self.clear_apicv_inhibit("APIC_ID_MODIFIED")
        self.vendor.recalc_logical_aliasing()

    # -- vCPU thread: vcpu_run() -----------------------------------------------------------
    def vcpu_thread(self, vcpu: Vcpu) -> Gen:
        host = self.host
        yield from host.sched.acquire(vcpu)
        self.vendor.vcpu_load(vcpu, vcpu.cpu)
        while True:
            if vcpu.mp_state != MP_STATE_RUNNABLE:
                # vcpu_run() -> vcpu_block(): INIT received, not runnable until a SIPI arrives.
                yield from self.kvm_vcpu_block(vcpu)
                self.kvm_apic_accept_events(vcpu)
            else:
                why = yield from self.vcpu_enter_guest(vcpu)
                if why is None:
                    # In guest mode: VMRUN runs in this frame (each guest instruction resumes one
                    # generator level less), then the exit is handled.
                    r = yield from self.vcpu_exit(vcpu, (yield from self.vendor.run(vcpu)))
                else:
                    r = why
                if r == "halt":
                    yield from self.kvm_vcpu_halt(vcpu)
            if vcpu.need_resched:
                yield from self.preempt(vcpu)

    def preempt(self, vcpu: Vcpu) -> Gen:
        """kvm_sched_out()/kvm_sched_in() around the host scheduler's context switch."""
        vcpu.preempted = True
        self.vendor.vcpu_put(vcpu)
        self.rec.count("preemptions")
        off = self.engine.now
        yield from self.host.sched.yield_cpu(vcpu)
        vcpu.host_off_cpu += self.engine.now - off
        vcpu.preempted = False
        self.vendor.vcpu_load(vcpu, vcpu.cpu)

    def vcpu_enter_guest(self, vcpu: Vcpu) -> Gen:
        """x86.c vcpu_enter_guest() up to VMRUN: requests, event injection, the mode barrier.
        Returns None when the vCPU is IN_GUEST_MODE and must run (the caller, :meth:`vcpu_thread`,
        then runs ``vendor.run`` and :meth:`vcpu_exit`), else why it did not enter."""
        pcpu = self.host.pcpus[vcpu.cpu]   # vcpu.pcpu (it holds a CPU here) without the property call
        if vcpu.timer_pending is not None:
            self.kvm_inject_pending_timer_irqs(vcpu)
        if REQ_APICV_UPDATE in vcpu.requests:
            vcpu.requests.discard(REQ_APICV_UPDATE)
            self.vendor.refresh_apicv_exec_ctrl(vcpu)
        if vcpu.pending_ipis:
            yield from self.flush_ipis(vcpu)
        self.kvm_apic_accept_events(vcpu)
        if vcpu.mp_state != MP_STATE_RUNNABLE:
            return "init_received"
        check_nested = getattr(self.vendor, "check_nested_events", None)
        if check_nested is not None:
            yield from check_nested(vcpu)
        self.vendor.inject_pending_events(vcpu)
        vcpu.requests.discard(REQ_EVENT)
        # local_irq_disable(): host interrupts that arrived while IRQs were enabled have been
        # handled; any that arrives from here on stays pending and makes VMRUN exit at once.
        pcpu.intr_pending = False
        vcpu.mode = IN_GUEST_MODE
        yield 0  # smp_mb__after_srcu_read_unlock(): pairs with kvm_vcpu_kick()'s mode read
        if vcpu.requests or vcpu.need_resched:
            vcpu.mode = OUTSIDE_GUEST_MODE
            return "cancel"
        if self.trace.on:
            ctx = getattr(vcpu, "ctx", None)
            self.trace.emit("kvm_entry", pcpu=vcpu.cpu, level=self.exit_level.upper(),
                            vcpu=ctx.name if ctx is not None else vcpu.name,
                            guest_level=ctx.level if ctx is not None else "L1")
        self._account_host_time(vcpu)
        return None

    def vcpu_exit(self, vcpu: Vcpu, exit_reason: int) -> Gen:
        """The rest of x86.c vcpu_enter_guest() after VMRUN: out of guest mode, handle the exit.
        (A frame of its own, as when vcpu_enter_guest() held the exit reason: the explorer's state
        hash sees the suspended frames' locals.)"""
        vcpu.host_t0 = self.engine.now
        vcpu.mode = OUTSIDE_GUEST_MODE
        return (yield from self.vendor.handle_exit(vcpu, exit_reason))

    def _account_host_time(self, vcpu: Vcpu) -> None:
        """Hypervisor CPU time: from a #VMEXIT to the next VMRUN of the vCPU, less the time it was
        not on a CPU (blocked, or waiting in the run queue). Halt polling counts: it burns CPU.
        Counted as ``l0_cycles`` (or ``l1_cycles`` for L1's KVM)."""
        t0 = vcpu.host_t0
        if t0 is not None:
            spent = self.engine.now - t0 - vcpu.host_off_cpu
            if spent > 0:
                self.rec.count(f"{self.exit_level}_cycles", spent)
        vcpu.host_t0 = None
        vcpu.host_off_cpu = 0

    # -- HLT: kvm_vcpu_halt() / kvm_vcpu_block() -------------------------------------------
    def kvm_apic_accept_events(self, vcpu: Vcpu) -> None:
        """kvm_apic_accept_events() (+ the SMI request): a latched INIT resets the APIC and makes
        the vCPU wait for SIPI (KVM_MP_STATE_INIT_RECEIVED); a SIPI in that state restarts it (see
        docs/model.md "INIT and SIPI"); a SIPI to a running vCPU is dropped. An SMI enters SMM,
        which the program does not see: it is only recorded, as on bare metal."""
        a = vcpu.apic
        if a.init_pending:
            vcpu.saved_ldr = a.read_reg(APIC_LDR_OFFSET)
            a.take_init()
            a.init_reset()
            self.rec.discard_pending(vcpu.name)
            vcpu.mp_state = MP_STATE_INIT_RECEIVED
            vcpu.guest.note_event(0, "init")
        if a.sipi_vector is not None:
            vec = a.take_sipi()
            if vcpu.mp_state == MP_STATE_INIT_RECEIVED:
                from navic.hw.machine import os_apic_defaults

                os_apic_defaults(a, ldr=vcpu.saved_ldr)
                vcpu.mp_state = MP_STATE_RUNNABLE
                vcpu.guest.note_event(vec if vec is not None else 0, "sipi")
        if a.smi_pending and vcpu.mp_state == MP_STATE_RUNNABLE:
            a.take_smi()
            vcpu.guest.note_event(0, "smi")

    def kvm_vcpu_has_events(self, vcpu: Vcpu) -> bool:
        """kvm_arch_vcpu_runnable(): something the guest can take now."""
        a = vcpu.apic
        g = vcpu.guest
        if vcpu.mp_state != MP_STATE_RUNNABLE:
            return a.init_pending or a.sipi_vector is not None
        if REQ_EVENT in vcpu.requests and not vcpu.apicv_active:
            return True
        if vcpu.timer_pending is not None:
            return True   # kvm_vcpu_check_block(): kvm_cpu_has_pending_timer()
        sync = getattr(self.vendor, "sync_pir_to_irr", None)
        if sync is not None:
            sync(vcpu)   # kvm_apic_has_interrupt() -> sync_pir_to_irr (VMX: posted interrupts -> vIRR)
        if a.nmi_pending or a.init_pending or vcpu.nmi_injected:
            return True
        return g.IF and a.has_interrupt() >= 0

    def kvm_vcpu_halt(self, vcpu: Vcpu) -> Gen:
        costs = self.costs
        start = self.engine.now
        ns_to_cyc = costs.ghz
        woke_in_poll = False
        if vcpu.halt_poll_ns and not self.kvm_vcpu_has_events(vcpu):
            # Halt polling: the vCPU stays loaded (IsRunning stays 1) and spins on its events.
            deadline = start + int(vcpu.halt_poll_ns * ns_to_cyc)
            self.rec.count("halt_polls")
            while self.engine.now < deadline:
                if self.kvm_vcpu_has_events(vcpu) or vcpu.need_resched:
                    break
                timer = self.engine.call_at(deadline, vcpu.poll.fire, label=f"{vcpu.name}.poll-end")
                yield vcpu.poll
                timer.cancel()
            woke_in_poll = self.kvm_vcpu_has_events(vcpu)
            if woke_in_poll:
                self.rec.count("halt_poll_successes")
        if not woke_in_poll and not self.kvm_vcpu_has_events(vcpu):
            yield from self.kvm_vcpu_block(vcpu)
        # Adapt the poll window (kvm_vcpu_halt: grow_halt_poll_ns / shrink_halt_poll_ns).
        halt_ns = (self.engine.now - start) / ns_to_cyc
        limit = self.host.l0.halt_poll_ns
        if limit:
            if halt_ns <= vcpu.halt_poll_ns:
                pass
            elif vcpu.halt_poll_ns and halt_ns > limit:
                self.shrink_halt_poll_ns(vcpu)
            elif vcpu.halt_poll_ns < limit and halt_ns < limit:
                vcpu.halt_poll_ns = min(limit, max(HALT_POLL_NS_GROW_START, vcpu.halt_poll_ns * 2))
        else:
            vcpu.halt_poll_ns = 0

    def shrink_halt_poll_ns(self, vcpu: Vcpu) -> None:
        """kvm_main.c shrink_halt_poll_ns(): divide by ``halt_poll_ns_shrink`` (0: reset to 0) and
        drop to 0 below ``halt_poll_ns_grow_start`` (Sergey Senozhatsky, 2021, lore
        20210902031100.252080-1). The module default is 2 in current kvm_main.c ("Default halves
        per-vcpu halt_poll_ns"); older kernels had 0 ("Default resets per-vcpu halt_poll_ns")."""
        shrink = self.host.l0.halt_poll_ns_shrink
        val = vcpu.halt_poll_ns // shrink if shrink else 0
        vcpu.halt_poll_ns = 0 if val < HALT_POLL_NS_GROW_START else val

    def kvm_vcpu_block(self, vcpu: Vcpu) -> Gen:
        self.vendor.vcpu_blocking(vcpu)   # avic_vcpu_blocking(): IsRunning <- 0
        vcpu.blocking = True
        yield 0                           # set_current_state(): the barrier before re-reading vIRR
        while not self.kvm_vcpu_has_events(vcpu):
            vcpu.blocked = True
            self.rec.count("blocks")
            self.host.sched.release(vcpu)
            if self.trace.on:
                self.trace.emit("kvm_vcpu_block", pcpu=vcpu.last_cpu, level="L0", vcpu=vcpu.name)
            off = self.engine.now
            yield vcpu.wakeup
            vcpu.blocked = False
            yield self.costs.VCPU_WAKE
            yield from self.host.sched.acquire(vcpu)
            vcpu.host_off_cpu += self.engine.now - off
            vcpu.last_cpu = vcpu.cpu
        vcpu.blocking = False
        self.vendor.vcpu_unblocking(vcpu)  # avic_vcpu_unblocking(): avic_vcpu_load()

    def kvm_vcpu_wake_up(self, vcpu: Vcpu) -> bool:
        vcpu.poll.fire()
        if vcpu.blocked and vcpu.wakeup.fire():
            self.rec.count("wakeups")
            if self.trace.on:
                self.trace.emit("kvm_vcpu_wakeup", level="L0", vcpu=vcpu.name)
            return True
        return False

    def kvm_vcpu_kick(self, vcpu: Vcpu, *, from_vcpu: Vcpu | None = None) -> None:
        """kvm_vcpu_kick(): wake it if blocked, else force a VM-exit with a reschedule IPI."""
        if self.kvm_vcpu_wake_up(vcpu):
            return
        self.kvm_vcpu_kick_no_wakeup(vcpu, from_vcpu=from_vcpu)

    def kvm_vcpu_kick_no_wakeup(self, vcpu: Vcpu, *, from_vcpu: Vcpu | None = None) -> None:
        """The IPI half of kvm_vcpu_kick() (kvm_make_all_cpus_request() with NO_WAKEUP):
        IN_GUEST_MODE -> EXITING_GUEST_MODE and a reschedule IPI to its pCPU."""
        if vcpu.mode == IN_GUEST_MODE:
            vcpu.mode = EXITING_GUEST_MODE
            if vcpu.cpu is not None and not (from_vcpu is not None and from_vcpu.cpu == vcpu.cpu):
                self.rec.count("kicks")
                self.host.send_host_ipi(vcpu.cpu, "reschedule", src=from_vcpu.cpu if from_vcpu else None)

    # -- interrupt delivery: lapic.c __apic_accept_irq() + vendor deliver ------------------
    def flush_ipis(self, vcpu: Vcpu) -> Gen:
        while vcpu.pending_ipis:
            icr = vcpu.pending_ipis.pop(0)
            yield from self.kvm_apic_send_ipi(vcpu, icr)

    def kvm_apic_send_ipi(self, src: Vcpu, icr: Icr) -> Gen:
        """Emulate an IPI: resolve destinations with the APIC model, accept into each target."""
        t = src.guest.ipi_sent_at  # latency counts from the guest's ICR write
        self.rec.count("emulated_ipis")
        apics = [v.apic for v in self.vcpus]
        targets = apic_dest.resolve(apics, src.apic, icr)
        yield self.costs.KVM_IPI_EMULATE
        by_apic = {id(v.apic): v for v in self.vcpus}
        for a in targets:
            yield from self.kvm_apic_accept_irq(by_apic[id(a)], icr.delivery_mode, icr.vector,
                                                icr.trigger, icr.level, src.name, t, from_vcpu=src)

    def kvm_apic_accept_irq(self, vcpu: Vcpu, mode: int, vector: int, trigger: int, level: int,
                            sender: str | None, t_sent: int, *, kind: str | None = None,
                            from_vcpu: Vcpu | None = None) -> Gen:
        a = vcpu.apic
        if mode in (DM_FIXED, DM_LOWEST):
            if not a.sw_enabled or vector < 16:
                a.accept_irq(mode, vector, trigger, level)  # records ESR / refusal
                return False
            # svm_deliver_interrupt(): set IRR, barrier, then decide how to notify.
            if trigger:
                a.set_tmr(vector)
            else:
                a.clear_tmr(vector)
            deliver = getattr(self.vendor, "deliver_interrupt", None)
            if deliver is None:
                a.set_irr(vector)
            self.rec.accepted(vcpu.name, vector, kind or KIND_BY_MODE[mode], sender, t_sent)
            if self.trace.on:
                self.trace.emit("kvm_apic_accept_irq", pcpu=vcpu.cpu, level="L0", vcpu=vcpu.name,
                                vec=vector, dm=KIND_BY_MODE[mode], tm="level" if trigger else "edge")
            if deliver is not None:
                # kvm_x86_ops.deliver_interrupt (VMX: post into the PIR, then notify or wake).
                yield from deliver(vcpu, mode, trigger, vector, from_vcpu=from_vcpu)
                return True
            vcpu.poll.fire()
            yield 0  # smp_mb__after_atomic(): IRR is visible before vcpu->mode is read
            self.vendor.complete_interrupt_delivery(vcpu, from_vcpu=from_vcpu)
            return True
        ok = a.accept_irq(mode, vector, trigger, level)
        if ok:
            if mode == DM_NMI:
                vcpu.nmi_queued += 1      # kvm_inject_nmi(): atomic_inc(&vcpu->arch.nmi_queued)
            rec_vec = 2 if mode == DM_NMI else (vector if mode == DM_SIPI else 0)
            self.rec.accepted(vcpu.name, rec_vec, KIND_BY_MODE.get(mode, "fixed"), sender, t_sent)
            vcpu.requests.add(REQ_EVENT)
            yield 0
            self.kvm_vcpu_kick(vcpu, from_vcpu=from_vcpu)
        return ok

    def process_nmi(self, vcpu: Vcpu, *, masked: bool) -> int:
        """process_nmi(): fold the NMIs queued since the last call into the pending count, at most
        two (one while NMIs are masked): KVM cannot react as fast as hardware, so two NMIs that
        arrive together are both delivered (one injected, the other after an NMI window). The
        APIC's NMI latch says whether any is pending at all (an INIT clears it). Returns the count."""
        a = vcpu.apic
        if not a.nmi_pending:
            vcpu.nmis_pending = vcpu.nmi_queued = 0
            return 0
        n = min(vcpu.nmis_pending + vcpu.nmi_queued, 1 if masked else 2)
        vcpu.nmis_pending = max(n, 1)
        vcpu.nmi_queued = 0
        return vcpu.nmis_pending

    def take_pending_nmi(self, vcpu: Vcpu) -> None:
        """One pending NMI is injected now (the APIC latch stays set while another is pending)."""
        vcpu.nmis_pending -= 1
        if vcpu.nmis_pending == 0:
            vcpu.apic.take_nmi()

    def kvm_emulate_halt(self, vcpu: Vcpu) -> str:
        """kvm_emulate_halt(): skip the HLT instruction; the caller then halts the vCPU
        (kvm_vcpu_halt)."""
        vcpu.guest.retire(None)
        vcpu.ctx.exit_insn = None
        return "halt"

    def exit_fastpath(self, vcpu: Vcpu, insn: Any, *, hlt: bool) -> bool:
        """{svm,vmx}_exit_handlers_fastpath() for an exit of this KVM's own guest (exits from L2
        never take it): HLT (handle_fastpath_hlt) and WRMSR (handle_fastpath_wrmsr) of the x2APIC ICR
        when the IPI can be sent at once (handle_fastpath_set_x2apic_icr_irqoff: x2APIC mode, fixed,
        physical, no shorthand, not broadcast) or of IA32_TSC_DEADLINE (handle_fastpath_set_tscdeadline,
        unconditional — on AMD too — since "KVM: x86: Unconditionally handle MSR_IA32_TSC_DEADLINE in
        fastpath exits", 2025). The exit is then handled without the full dispatch (EXIT_FASTPATH)."""
        if hlt:
            return True
        if type(insn) is not isa.Wrmsr:
            return False
        if insn.msr == MSR_IA32_TSC_DEADLINE:
            return True
        return insn.msr == MSR_X2APIC_ICR and vcpu.apic.mode == "x2apic" and icr_fastpath_ok(insn.value)

    def kvm_apic_msr(self, vcpu: Vcpu, insn: Any) -> Any:
        """An intercepted APIC MSR access (lapic.c kvm_x2apic_msr_read/write, x86.c
        kvm_set_apic_base): returns the value read, None, or the #GP to inject."""
        a = vcpu.apic
        msr = insn.msr
        write = type(insn) is isa.Wrmsr
        try:
            if msr == MSR_IA32_APICBASE and write:
                old = a.apic_base
                a.set_apic_base(insn.value)
                self.vendor._apic_base_changed(vcpu, old)
                return None
            if 0x800 <= msr <= 0x8FF or msr in (MSR_IA32_APICBASE, MSR_IA32_TSC_DEADLINE):
                if write:
                    a.wrmsr(msr, insn.value)
                    return None
                return a.rdmsr(msr)
            return Fault("#GP", f"MSR {msr:#x} not implemented")
        except GPFault as e:
            return Fault("#GP", str(e))

    def emulate_apic_mmio(self, vcpu: Vcpu, insn: Any) -> Gen:
        """An emulated guest MMIO access (x86_emulate_instruction -> vcpu_mmio_read/write -> the
        local APIC's kvm_io_device): ``apic_mmio_in_range()`` decodes it against the APIC's own base
        (``apic->base_address``: a relocated APIC decodes at its new base). In range,
        ``apic_mmio_read()`` / ``apic_mmio_write()`` with the LAPIC_MMIO_HOLE quirk (a
        hardware-disabled or x2APIC-mode APIC reads all-ones and drops writes: LocalApic.mmio_read /
        mmio_write); outside it, -EOPNOTSUPP: a KVM_EXIT_MMIO for userspace, which has nothing there
        (QEMU's unassigned memory: reads 0, writes dropped; counter ``mmio_userspace``)."""
        yield self.costs.MMIO_EMULATE
        a = vcpu.apic
        write = type(insn) is isa.MmioWrite
        off = insn.addr - (a.apic_base & 0xFFFFF000)
        if not 0 <= off < 0x1000:
            self.rec.count("mmio_userspace")
            vcpu.guest.retire(None if write else 0)
            return
        if write:
            old_id = a.read_reg(APIC_ID)
            a.mmio_write(off, insn.value)
            self.vendor._after_apic_write(vcpu, off, old_id)
            vcpu.guest.retire(None)
        else:
            vcpu.guest.retire(a.mmio_read(off))

    def defer_apic_timer(self, vcpu: Vcpu) -> None:
        """apic_timer_expired(from_timer_fn = true) without a posted timer interrupt: bump
        ``lapic_timer.pending``, KVM_REQ_UNBLOCK and kvm_vcpu_kick() — a vCPU in guest mode exits, a
        blocked one wakes; the interrupt is injected by :meth:`kvm_inject_pending_timer_irqs` on the
        way back into the guest."""
        if vcpu.timer_pending is not None:
            return   # "if (atomic_read(&apic->lapic_timer.pending)) return;"
        vcpu.timer_pending = self.engine.now
        vcpu.requests.add(REQ_UNBLOCK)
        if self.trace.on:
            self.trace.emit("navic_apic_timer_pending", pcpu=vcpu.cpu, level=self.exit_level.upper(),
                            vcpu=vcpu.name, mode=MODE_NAMES[vcpu.mode])
        self.kvm_vcpu_kick(vcpu)

    def kvm_inject_pending_timer_irqs(self, vcpu: Vcpu) -> None:
        """vcpu_run(): kvm_cpu_has_pending_timer() -> kvm_inject_pending_timer_irqs(): the LVT timer
        fires into the APIC now, from the vCPU thread (svm_deliver_interrupt() finds the vCPU
        outside guest mode: no doorbell; the next VMRUN evaluates the IRR). A timer the guest re-armed
        or stopped meanwhile is stale and delivers nothing (__start_apic_timer() clears ``pending``).
        Latency counts from the expiry."""
        t_expired = vcpu.timer_pending if vcpu.timer_pending is not None else self.engine.now
        vcpu.timer_pending = None
        vcpu.requests.discard(REQ_UNBLOCK)
        self._fire_lvt_timer(vcpu, t_expired)

    def _fire_lvt_timer(self, vcpu: Vcpu, t_expired: int) -> bool:
        """kvm_apic_local_deliver(apic, APIC_LVTT): the LVT timer fires into the vCPU's APIC. True
        when that set a new IRR bit, which is recorded as a timer acceptance from ``t_expired``."""
        a = vcpu.apic
        lvtt = a.read_reg(0x320)
        vec = lvtt & 0xFF
        had = a.test_irr(vec)
        a.timer_expired()
        if not lvtt & (1 << 16) and a.test_irr(vec) and not had:
            self.rec.accepted(vcpu.name, vec, "timer", None, t_expired)
            return True
        return False

    def _apic_timer_expired(self, vcpu: Vcpu) -> None:
        """apic_timer_expired() in hrtimer context, delivering at once: the LVT timer fires into the
        vCPU's APIC and the vendor notifies it (VMX: KVM_REQ_EVENT + kick; SVM with a posted timer
        interrupt: a doorbell, see :meth:`navic.hv.svm.SvmVendor.apic_timer_expired`)."""
        if self._fire_lvt_timer(vcpu, self.engine.now):
            vcpu.poll.fire()
            self.vendor.complete_interrupt_delivery(vcpu, from_vcpu=None)
