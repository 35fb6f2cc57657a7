"""L1: the guest hypervisor. The same KVM code as L0, on the virtual SVM that L0 provides.

* :class:`L1Host` is what L1's :class:`~navic.hv.kvm.Kvm` sees as its host: the L1 vCPUs are its
  "pCPUs" (their L1 APIC IDs are the host IDs it writes into its AVIC tables), its memory is L1
  guest-physical memory (:class:`~navic.hv.guestmem.GuestMemory`), and its doorbells and host IPIs
  are instructions that the current L1 thread executes (WRMSR to the doorbell MSR or to its x2APIC
  ICR), which L0 intercepts or accelerates like any guest's.
* :class:`L1Cpu` is the L1 kernel on one L1 vCPU: it implements the guest-CPU protocol the silicon
  steps (``next_insn`` / ``retire`` / ``enter_handler`` / ``IF`` / ``epoch``) by running the L1
  scheduler's current thread — an L1 KVM vCPU thread for an L2 vCPU — or idling in HLT.
* :class:`VirtualSvm` is L1 KVM's "silicon": VMRUN is the ``isa.Vmrun`` instruction, which exits
  to L0 and comes back as a nested #VMEXIT (docs/nested-design.md).
* :class:`VirtualVmx` is its VMX counterpart (``cpu = "spr"``): VM entry is the ``isa.Vmresume``
  instruction naming vmcs12 by its L1 GPA; L1 KVM's :class:`~navic.hv.vmx.VmxVendor` runs on it
  unchanged, its PIDs and PID-pointer table in L1 memory (docs/model.md "Nested VMX").

What an L1 thread yields is translated into instructions: ``int n`` → ``Compute(n)`` (``0`` keeps
the atomic-step boundary; ``n`` cycles of L1 kernel code run with interrupts enabled, so they are
interruptible like a guest program's ``compute``: an interrupt to the L1 vCPU, or a host event
that exits to L0, cuts them short and the rest runs when the thread next runs — see
:meth:`L1Cpu.suspend` and docs/model.md "Interrupts during compute"), a ``Signal`` → the thread
blocks and the scheduler switches or idles (a wake-up from elsewhere is delivered as a reschedule
IPI to that L1 vCPU, as Linux's ``ttwu`` does), an instruction → executed by the silicon with its
result sent back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from navic.hv.sched import HostScheduler
from navic.hw import isa
from navic.hw.isa import Insn
from navic.sim.engine import Signal

if TYPE_CHECKING:
    from navic.hv.guestmem import GuestMemory
    from navic.hv.kvm import Kvm, Vcpu
    from navic.hw.svm import GuestContext

RESCHEDULE_VECTOR = 0xFD      # Linux RESCHEDULE_VECTOR
LOCAL_TIMER_VECTOR = 0xEC     # Linux LOCAL_TIMER_VECTOR
MSR_DOORBELL = 0xC001011B
POSTED_INTR_VECTOR = 0xF2          # Linux POSTED_INTR_VECTOR (L1 KVM's notifications on VMX)
POSTED_INTR_WAKEUP_VECTOR = 0xF1   # Linux POSTED_INTR_WAKEUP_VECTOR
# What an L1 KVM "host IPI" of each kind is on the wire (a WRMSR to the L1 vCPU's x2APIC ICR).
HOST_IPI_VECTORS = {"posted_intr": POSTED_INTR_VECTOR, "pi_wakeup": POSTED_INTR_WAKEUP_VECTOR}
X2APIC_ICR_MSR = 0x830
X2APIC_EOI_MSR = 0x80B


class L1Thread:
    """A thread of the L1 OS: the generator of L1 KVM's vcpu_thread for one L2 vCPU."""

    __slots__ = ("gen", "vcpu", "result", "waiting", "pending", "host")

    def __init__(self, host: L1Host, vcpu: Vcpu, gen: Generator[Any, Any, Any]) -> None:
        self.host = host
        self.vcpu = vcpu
        self.gen = gen
        self.result: Any = None
        self.waiting: Signal | None = None
        self.pending: deque[Insn] = deque()   # instructions queued by synchronous KVM code

    def wake(self, value: Any) -> None:
        """Signal-waiter protocol (navic.sim.engine.Signal.fire)."""
        self.waiting = None
        self.result = value
        self.host.thread_runnable(self)


class L1PCpu:
    """An L1 vCPU as L1's KVM sees it: a 'physical' CPU with an APIC ID."""

    def __init__(self, index: int, apic_id: int) -> None:
        self.index = index
        self.apic_id = apic_id
        self.intr_pending = False   # written by generic KVM code; meaningless at L1


class L1Host:
    """L1's host: what ``Kvm.host`` is for the L1 hypervisor."""

    def __init__(self, l0_kvm: Kvm, mem: GuestMemory, vm: Any, params: Any) -> None:
        """``vm`` is the L1 VM's configuration (its vCPU count and APIC IDs); its vCPUs are L0's
        (``l0_kvm.vcpus``), created after this host view exists because each runs an L1Cpu."""
        self.l0 = params                  # L1 KVM's module parameters (an L0Config-shaped object)
        self.kvm0 = l0_kvm
        self.engine = l0_kvm.engine
        self.costs = l0_kvm.costs
        self.rec = l0_kvm.rec
        self.trace = l0_kvm.trace
        self.mem = mem
        self.l1_vcpus: list[Vcpu] = l0_kvm.vcpus
        self.pcpus = [L1PCpu(i, vm.apic_id(i)) for i in range(vm.vcpus)]
        self.by_apic_id = {p.apic_id: p for p in self.pcpus}
        slice_cycles = int(params.timeslice_us * self.costs.ghz * 1000)
        self.sched = HostScheduler(self.engine, len(self.pcpus), slice_cycles, self.costs.CONTEXT_SWITCH,
                                   on_slice_end=self._slice_end)
        self.backing_owner: dict[int, Any] = {}
        self.threads: dict[str, L1Thread] = {}
        self.cpus: list[L1Cpu] = []
        self.stepping: L1Thread | None = None   # the L1 thread whose code is running right now
        self.silicon: Any = VirtualSvm(self)   # VirtualVmx for a VMX host (navic.hv.nested.vmx_core)
        self.iommu = None
        self.pi_wakeup_handler: Any = None      # set by L1's VmxVendor (vector 0xF1 at L1)
        self.l0_nested: Any = None              # L0's NestedSvm (its doorbell-write emulation)

    # -- threads ------------------------------------------------------------------------------
    def spawn(self, vcpu: Vcpu, gen: Generator[Any, Any, Any]) -> L1Thread:
        t = L1Thread(self, vcpu, gen)
        self.threads[vcpu.name] = t
        # The thread starts on its home L1 vCPU: it is runnable there until it acquires it.
        self.cpus[vcpu.home].runnable.append(t)
        return t

    def thread_runnable(self, t: L1Thread) -> None:
        cpu = self.cpus[t.vcpu.cpu if t.vcpu.cpu is not None else t.vcpu.home]
        if t not in cpu.runnable:
            cpu.runnable.append(t)
        cpu.poke(self.stepping)

    # -- what L1's KVM calls on its "host" ----------------------------------------------------
    def send_host_ipi(self, cpu: int, kind: str, src: int | None = None) -> None:
        """A reschedule IPI (VMX: or a posted-interrupt notification / wake-up vector) to another L1
        vCPU: a WRMSR to the L1 vCPU's x2APIC ICR."""
        self.rec.count("l1_host_ipis")
        dest = self.pcpus[cpu].apic_id
        vector = HOST_IPI_VECTORS.get(kind, RESCHEDULE_VECTOR)
        t = self.stepping
        sender = self.l1_vcpus[t.vcpu.cpu if t is not None and t.vcpu.cpu is not None else cpu]
        if sender.apic.mode == "x2apic":
            self._issue(isa.Wrmsr(X2APIC_ICR_MSR, (dest << 32) | vector), cpu, vector)
        else:   # an xAPIC L1 kernel writes ICR2 then ICR through its MMIO page
            base = sender.guest.apic_base
            self._issue(isa.MmioWrite(base + 0x310, (dest & 0xFF) << 24), None)
            self._issue(isa.MmioWrite(base + 0x300, vector), cpu, vector)

    def doorbell(self, host_apic_id: int, src: int | None = None) -> None:
        """avic_ring_doorbell() at L1: WRMSR(C001_011B), which L0 intercepts and emulates. Rung
        from outside L1 code — an L1 hrtimer callback, e.g. a posted L2 APIC timer interrupt
        (kvm_use_posted_timer_interrupt) — the write runs on an L1 CPU navic does not step (the
        housekeeping CPU the timer fires on, as for L0's own posted timer): L0's emulation of
        it, without the instruction (docs/model.md "L1 timer callbacks")."""
        self.rec.count("l1_doorbells")
        if self.stepping is None and self.l0_nested is not None:
            self.l0_nested.doorbell_write_outside_l1(host_apic_id)
            return
        self._issue(isa.Wrmsr(MSR_DOORBELL, host_apic_id), None)

    def _issue(self, insn: Insn, target_cpu: int | None, vector: int = RESCHEDULE_VECTOR) -> None:
        t = self.stepping
        if t is not None:
            t.pending.append(insn)
            return
        # Not inside L1 code (an L1 timer callback): the effect without the instruction.
        if target_cpu is not None:
            self.interrupt_l1_vcpu(target_cpu, vector)

    def interrupt_l1_vcpu(self, cpu: int, vector: int) -> None:
        """Deliver an interrupt to an L1 vCPU through L0 (as its APIC would receive it)."""
        from navic.hv.kvm import DM_FIXED, drain

        v = self.l1_vcpus[cpu]
        drain(self.kvm0.kvm_apic_accept_irq(v, DM_FIXED, vector, 0, 1, None, self.engine.now, kind="l1-kernel"))

    def _slice_end(self, cpu: int) -> None:
        self.interrupt_l1_vcpu(cpu, LOCAL_TIMER_VECTOR)

    def on_hw_irr_set(self, backing_gpa: int, vector: int, sender: str, t_sent: int | None = None) -> None:
        owner = self.backing_owner.get(backing_gpa)
        if owner is not None:
            self.rec.accepted(owner.name, vector, "fixed", sender, self.engine.now if t_sent is None else t_sent)
            owner.poll.fire()


class VirtualSvm:
    """The SVM that L0 offers L1: VMRUN is an instruction that L0 intercepts (nested.c)."""

    def __init__(self, host: L1Host) -> None:
        self.host = host
        self.features: Any = None

    def vmrun(self, pcpu: Any, ctx: GuestContext) -> Generator[Any, Any, int]:
        self.host.rec.count("l1_vmruns")
        code = yield isa.Vmrun(ctx.vmcb.hpa)
        return int(code)


class VirtualVmx:
    """The VMX that L0 offers L1: VM entry is VMRESUME, which L0 intercepts (nested.c on VMX).
    ``pid_owner`` maps a PID's L1 GPA to L1 KVM's vCPU (as :class:`navic.hw.vmx_guest.Vmx` does)."""

    def __init__(self, host: L1Host) -> None:
        self.host = host
        self.features: Any = None
        self.pid_owner: dict[int, Any] = {}
        self.fine_grained = True

    def vmentry(self, pcpu: Any, ctx: Any) -> Generator[Any, Any, int]:
        self.host.rec.count("l1_vmruns")
        reason = yield isa.Vmresume(ctx.vmcs_gpa)
        if isinstance(reason, isa.Fault):
            raise RuntimeError(f"{ctx.name}: VMRESUME failed: {reason}")
        return int(reason)


class _Frame:
    __slots__ = ("gen", "saved_if", "result", "resume")

    def __init__(self, gen: Generator[Insn, Any, None], saved_if: bool) -> None:
        self.gen = gen
        self.saved_if = saved_if
        self.result: Any = None
        self.resume: Insn | None = None   # the rest of a Compute an NMI / exit cut short


class L1Cpu:
    """The L1 kernel on one L1 vCPU (the guest-CPU protocol the silicon steps)."""

    def __init__(self, host: L1Host, index: int, name: str, *, x2apic: bool = True) -> None:
        host.cpus.append(self)
        self.host = host
        self.index = index
        self.name = name
        self.x2apic = x2apic
        self.apic_base = 0xFEE00000
        self.IF = True
        self.nmi_blocked = False
        self.wait_for_sipi = False
        self.epoch = 0
        self.finished = True
        self.reads: dict[str, int] = {}
        self.handled: dict[int, int] = {}
        self.frames: list[_Frame] = []
        self.runnable: deque[L1Thread] = deque()
        self._issuer: L1Thread | _Frame | None = None   # who gets the result of the last fetch
        self._source: L1Thread | _Frame | None = None   # whose code the last fetch came from
        self.poll_wake: Any = None
        self.clock = host.engine
        self.ipi_sent_at = 0
        self.shared = None

    # -- wake-ups ----------------------------------------------------------------------------
    def poke(self, waker: L1Thread | None) -> None:
        """A thread became runnable here: the vCPU re-checks (a spin loop sees it; a halted vCPU
        needs a reschedule IPI, which a remote waker sends)."""
        self.epoch += 1
        if self.poll_wake is not None:
            self.poll_wake()
        if waker is None or waker.vcpu.cpu != self.index:
            self.host.interrupt_l1_vcpu(self.index, RESCHEDULE_VECTOR)

    # -- guest-CPU protocol -------------------------------------------------------------------
    def next_insn(self) -> Insn:
        host = self.host
        while True:
            if self.frames:
                f = self.frames[-1]
                self._source = f
                if f.resume is not None:   # interrupted inside a compute: its rest first
                    insn, f.resume = f.resume, None
                    self._issuer = f
                    return insn
                res, f.result = f.result, None
                try:
                    insn = f.gen.send(res)
                    self._issuer = f
                    return insn
                except StopIteration:
                    self.frames.pop()
                    self.IF = f.saved_if
                    self._issuer = self._source = None
                    return isa.IRET
            t = self._current()
            self._source = t
            if t is None:
                self._issuer = None
                return isa.HLT
            if t.pending:
                self._issuer = None
                return t.pending.popleft()
            if t.waiting is not None:
                # The thread holds this CPU but waits (halt polling): spin until something changes.
                self._issuer = self._source = None
                return isa.Pause(self.epoch)
            res, t.result = t.result, None
            host.stepping = t
            try:
                y = t.gen.send(res)
            finally:
                host.stepping = None
            ty = type(y)
            if ty is int or y is None:
                self._issuer = t
                if t.pending:   # synchronous side effects first (doorbell, IPI, tracked store)
                    t.pending.append(isa.Compute(y or 0))
                    self._issuer = None
                    return t.pending.popleft()
                return isa.Compute(y or 0)
            if ty is Signal:
                t.waiting = y
                y.waiters.append(t)  # type: ignore[arg-type]
                if t.pending:
                    self._issuer = None
                    return t.pending.popleft()
                continue
            self._issuer = t
            if t.pending:
                t.pending.append(y)
                self._issuer = None
                return t.pending.popleft()
            return y

    def _current(self) -> L1Thread | None:
        """The thread to step: first any runnable thread that does not hold this CPU yet (it runs
        until it queues for the CPU, so the scheduler knows it exists and arms its slice), then
        the thread that holds the CPU (even if it waits without releasing it: halt polling)."""
        host = self.host
        cur = host.sched.current[self.index]
        cur_t = host.threads[cur.name] if cur is not None else None
        runnable = self.runnable
        while runnable:
            t = runnable[0]
            if t.waiting is not None or t is cur_t:
                runnable.popleft()
                continue
            return t
        return cur_t

    def retire(self, result: Any) -> None:
        i = self._issuer
        if i is not None:
            i.result = result
        self._issuer = None

    def suspend(self, rest: Insn) -> None:
        """A ``Compute`` of L1 code was cut short (an interrupt to this L1 vCPU, or an exit to L0):
        ``rest`` runs first when that code resumes — a handler's rest when the handler does, a
        thread's (queued ahead of its pending instructions) when the thread next runs here,
        whichever thread the handler lets run in between (a timer tick may switch threads)."""
        src = self._source
        if type(src) is L1Thread:
            src.pending.appendleft(rest)
        elif src is not None:
            src.resume = rest
        self._issuer = None

    def enter_handler(self, vector: int, kind: str) -> None:
        saved = self.IF
        self.IF = False
        self.frames.append(_Frame(self._handler(vector), saved))
        self.handled[vector] = self.handled.get(vector, 0) + 1
        self.epoch += 1
        self.host.rec.delivered(self.name, vector, kind)
        cur = self.host.sched.current[self.index]
        if vector == LOCAL_TIMER_VECTOR and cur is not None and self.host.sched.runq[self.index]:
            cur.need_resched = True

    def note_event(self, vector: int, kind: str) -> None:
        self.epoch += 1

    def _handler(self, vector: int) -> Generator[Insn, Any, None]:
        yield isa.Compute(self.host.costs.INTR_ENTRY)
        if vector == POSTED_INTR_WAKEUP_VECTOR and self.host.pi_wakeup_handler is not None:
            self.host.pi_wakeup_handler(self.index)   # L1 KVM's pi_wakeup_handler (VMX)
        if self.x2apic:
            yield isa.Wrmsr(X2APIC_EOI_MSR, 0)
        else:
            yield isa.MmioWrite(self.apic_base + 0xB0, 0)

    @property
    def in_handler(self) -> bool:
        return bool(self.frames)
