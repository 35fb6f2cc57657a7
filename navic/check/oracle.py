"""The interrupt oracle: checks a finished run for lost and stuck interrupts.

Every acceptance into a target (an IRR bit set, an NMI latched) is registered with the run's
:class:`~navic.sim.record.Recorder` together with its send time; a handler run consumes it. At the
end of the run every acceptance still pending is examined (definitions from the oracle issue):

* **stuck** — pending for longer than the bound while the target sits halted (asleep in HLT /
  kvm_vcpu_block, no wake-up fired) and could take it: IF = 1, APIC enabled, its priority class
  above the PPR class, no higher vector pending. This is the erratum-1235 symptom.
* **lost** — pending for longer than the bound although the target has been running on its CPU
  for longer than the bound and could take it; or accepted, gone from IRR, and never handled.

Pending interrupts a target cannot take (IF = 0, masked by TPR/PPR, queued behind a higher
vector, APIC disabled), interrupts a reset / INIT / APIC disable discarded, and targets that are
preempted (runnable, waiting for a CPU) are architectural or scheduling delays, not violations.
docs/verification.md, "What stuck and lost mean", has the precise rules.
"""

from __future__ import annotations

from typing import Any

DEFAULT_BOUND_US = 100.0


def end_of_run(run: Any, bound_us: float = DEFAULT_BOUND_US, *, quiescent: bool = False
               ) -> list[dict[str, Any]]:
    """``quiescent``: the run ended because nothing was left to happen, so whatever is pending
    now stays pending forever — the bound does not apply."""
    rec = run.recorder
    now = run.engine.now
    bound = 0 if quiescent else int(bound_us * run.costs.ghz * 1000)
    cpus = _cpu_views(run)
    views_vcpu = {v.name: v for v in run.kvm.vcpus} if run.kvm is not None else {}
    out: list[dict[str, Any]] = []
    for (cpu, vector), pending in sorted(rec._pending.items()):
        if not pending:
            continue
        t_sent, sent_by, kind = pending[0]
        if (now - t_sent <= bound and not quiescent) or cpu not in cpus:
            continue
        apic, guest, halted, scheduled = cpus[cpu]
        if not halted and not scheduled and not quiescent:
            continue
        if kind in ("nmi", "init", "sipi", "smi", "extint"):   # latched events, not IRR bits
            continue
        pid = getattr(views_vcpu.get(cpu), "pid", None) if views_vcpu else None
        in_pir = pid is not None and pid.pir_test(vector)   # VMX: posted but not yet synced to vIRR
        if t_sent <= getattr(apic, "cleared_at", -1):
            continue   # discarded by a RESET, INIT or hardware disable of the APIC (SDM §11.4.7)
        if not (apic.test_irr(vector) or in_pir):
            if not apic.test_isr(vector) or halted or quiescent:
                # Accepted, left IRR, and no handler ever ran for it: it vanished.
                out.append(_violation("lost", cpu, vector, sent_by, t_sent, now,
                                      f"vector {vector:#x} was accepted by {cpu} but left IRR without "
                                      f"its handler running"))
            continue
        if not apic.hw_enabled:
            continue
        if not guest.IF or (vector & 0xF0) <= (apic.regs[0xA0 >> 2] & 0xF0):
            continue
        if not halted and not quiescent and now - max(t_sent, _on_cpu_since(run, cpu)) <= bound:
            continue   # it got its CPU back only now: waiting until then was a scheduling delay
        if apic.highest_irr() > vector:
            continue   # queued behind a higher vector the APIC presents first (SDM §11.8.4)
        out.append({
            "kind": "stuck" if halted else "lost",
            "cpu": cpu,
            "vector": vector,
            "sent_by": sent_by,
            "t_sent": t_sent,
            "pending_cycles": now - t_sent,
            "detail": (f"vector {vector:#x} pending in {cpu}'s IRR for {now - t_sent} cycles while "
                       f"{'halted' if halted else 'running'} with IF=1 and PPR "
                       f"{apic.regs[0xA0 >> 2]:#x}"),
        })
    return out


def stalls(run: Any, *, quiescent: bool) -> list[dict[str, Any]]:
    """Warnings, not violations: when nothing is left to happen, a CPU still inside its program
    and not halted spins forever (a wait for a vector nobody sends, or a lost wake-up of a memory
    handshake such as a TLB-shootdown acknowledgement)."""
    if not quiescent:
        return []
    now = run.engine.now
    out = []
    for cpu, (_apic, guest, halted, _scheduled) in sorted(_cpu_views(run).items()):
        if getattr(guest, "program", None) is not None and not guest.finished and not halted:
            out.append({"kind": "stalled", "cpu": cpu, "t": now,
                        "detail": f"{cpu} is still in its program, spinning, when nothing is left to happen"})
    return out


def _violation(kind: str, cpu: str, vector: int, sent_by: Any, t_sent: int, now: int, detail: str) -> dict[str, Any]:
    return {"kind": kind, "cpu": cpu, "vector": vector, "sent_by": sent_by, "t_sent": t_sent,
            "pending_cycles": now - t_sent, "detail": detail}


def _cpu_views(run: Any) -> dict[str, tuple[Any, Any, bool, bool]]:
    """cpu name -> (apic, guest, halted, scheduled). A vCPU that is neither halted nor scheduled
    is preempted: waiting for it is a scheduling delay, not a loss (unless the run went quiet).

    *Halted* is asleep in kvm_vcpu_block (``blocked`` and nobody has fired its wake-up yet). A
    vCPU that was woken (kvm_vcpu_wake_up) and now waits for a CPU — in the host's run queue,
    or, for an L2 vCPU, for an L1 vCPU that is itself preempted — is runnable, i.e. preempted, not halted."""
    views: dict[str, tuple[Any, Any, bool, bool]] = {}
    if run.kvm is not None:
        l1 = list(run.kvm.vcpus)
        for v in l1:
            on_cpu = v.cpu is not None
            views[v.name] = (v.apic, v.guest, _halted(v, on_cpu), on_cpu)
        for v in (run.kvm2.vcpus if getattr(run, "kvm2", None) is not None else ()):
            host_vcpu = l1[v.cpu] if v.cpu is not None else None
            on_cpu = host_vcpu is not None and host_vcpu.cpu is not None
            views[v.name] = (v.apic, v.guest, _halted(v, on_cpu), on_cpu)
        return views
    m = run.machine
    for i, g in enumerate(m.guests):
        if g is not None:
            views[g.name] = (m.apics[i], g, m.pcpus[i].halted, True)
    return views


def _halted(v: Any, on_cpu: bool) -> bool:
    """Asleep in kvm_vcpu_block with no wake-up fired yet. (Entering kvm_vcpu_block takes no time;
    leaving it, the vCPU is runnable: waiting for a CPU, or about to resume.)"""
    wakeup = getattr(v, "wakeup", None)
    return bool(v.blocked) and (wakeup is None or bool(wakeup.waiters))


def _on_cpu_since(run: Any, cpu: str) -> int:
    """When the vCPU ``cpu`` last got a CPU (L0's scheduler; for an L2 vCPU the later of L1's
    scheduler and its L1 vCPU's); 0 on bare metal or when unknown."""
    if run.kvm is None:
        return 0
    by_name = {v.name: v for v in run.kvm.vcpus}
    kvm2 = getattr(run, "kvm2", None)
    if cpu in by_name:
        v = by_name[cpu]
        return run.kvm.host.sched.slice_start[v.cpu] if v.cpu is not None else 0
    for v in (kvm2.vcpus if kvm2 is not None else ()):
        if v.name == cpu and v.cpu is not None:
            sched = getattr(kvm2.host, "sched", None)
            mine = sched.slice_start[v.cpu] if sched is not None else 0
            return max(mine, _on_cpu_since(run, run.kvm.vcpus[v.cpu].name))
    return 0
