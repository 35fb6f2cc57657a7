"""Per-send provenance checks: duplicated and misrouted deliveries.

The oracle (:mod:`navic.check.oracle`) looks at what is still pending at the end of a run (stuck,
lost). This module looks at where every handler run came from:

* **duplicated** — more handler runs for (cpu, vector) than *distinct* acceptances into it. An
  acceptance is attributed to the send (guest ICR / SELF_IPI write) it came from; the same send
  accepted twice into the same target (e.g. an AVIC_INCOMPLETE_IPI handler that sets IRR again
  after the hardware already did — digest §9.2 invariant 4) counts once. Concretely, a handler run
  is a duplicate when every acceptance it consumes belongs to a send an earlier handler run on that
  (cpu, vector) already served. Acceptances from timers, devices and writes this module cannot
  attribute are always distinct; handler runs that consume no acceptance at all come from local
  sources the recorder does not see (LVT error, LINT) and are not judged.
* **lost (never accepted)** — a fixed or lowest-priority send (vector ≥ 16) whose destination,
  resolved at the ICR write, selected an enabled APIC that no acceptance from that send ever
  reached (lowest priority: none of the candidates), at the end of a quiescent run or when the
  send is older than the oracle's bound. Such a send leaves nothing pending anywhere, so the
  end-of-run oracle cannot see it (a broadcast skipping invalid physical-table entries).
* **misrouted** — a handler ran (consumed an acceptance) on a CPU that the architectural
  destination resolution *at send time* did not select: for fixed/NMI/INIT/SIPI messages every
  matching APIC; for lowest priority any legal candidate (arbitration is the platform's choice).

Sends are observed at the instruction level: :class:`Tracker` installs a watcher on each guest
CPU (``GuestCpu.send_watch``, called with every WRMSR / MMIO write as it is fetched; other
instruction sources get their ``next_insn`` wrapped) and, when an instruction is an ICR write
(x2APIC MSR 830h, xAPIC MMIO 300h) or an x2APIC SELF_IPI write (MSR 83Fh), resolves its
destinations with :mod:`navic.apic.dest` against the current APIC state of the sender's VM
(nested runs: L2's sends resolve among L2's vCPUs). Acceptances and handler runs come from :attr:`Recorder.history`.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any

from navic.apic import dest as apic_dest
from navic.apic.icr import _DECODE_CACHE, DM_FIXED, DM_INIT, DM_LOWEST, DM_NMI, DM_SMI, SH_SELF, Icr
from navic.apic.registers import APIC_ICR, APIC_ICR2, APIC_SVR, ICR_LOW_MASK, SVR_APIC_ENABLED
from navic.check.oracle import DEFAULT_BOUND_US
from navic.hv.hypercall import APIC_DEST_MASK, APIC_SHORT_MASK, KVM_HC_SEND_IPI, pv_ipi_ids
from navic.hw import isa

_MSR_ICR = 0x830
_MSR_SELF_IPI = 0x83F
_IPI_KINDS = frozenset({"fixed", "lowest", "nmi", "init", "sipi", "smi"})
_W_SVR = APIC_SVR >> 2


class Tracker:
    """Observes the sends of one run; :meth:`check` returns the provenance violations."""

    def __init__(self, run: Any) -> None:
        self.run = run
        # sender name -> ([send times], [(vector key, allowed target names, must-accept names)])
        self.times: dict[str, list[int]] = {}
        self.sends: dict[str, list[tuple[int, Any, Any]]] = {}
        # One group of (name, apic) pairs per VM: destinations resolve within the sender's VM
        # (bare metal: the machine; KVM: L1's vCPUs; nested: L1's vCPUs, and L2's vCPUs).
        if run.kvm is not None:
            groups = [[(v.name, v.apic) for v in run.kvm.vcpus]]
            kvm2 = getattr(run, "kvm2", None)
            if kvm2 is not None:
                groups.append([(v.name, v.apic) for v in kvm2.vcpus])
        else:
            groups = [[(n, a) for n, a in zip(run.machine.names, run.machine.apics, strict=False)]]
        # sender -> (its VM's APICs, apic -> its name in that VM; APICs hash by identity)
        self.group_of: dict[str, tuple[list[Any], dict[Any, str]]] = {}
        for pairs in groups:
            g = ([a for _, a in pairs], {a: n for n, a in pairs})
            for n, _ in pairs:
                self.group_of[n] = g
        self.apic_of = {n: a for pairs in groups for n, a in pairs}
        # sender -> (its last noted send, the guest's fetch point of that send's instruction)
        self._last_send: dict[str, tuple[Any, Any]] = {}
        for n in self.apic_of:   # every watched sender has its (possibly empty) send lists
            self.times[n] = []
            self.sends[n] = []
        clock = run.engine
        for g in run.guests:
            if g.name in self.apic_of:
                self._wrap(g, clock)

    def _wrap(self, g: Any, clock: Any) -> None:
        orig = g.next_insn
        src = self.apic_of[g.name]
        note = self._note
        name = g.name
        wrmsr, mmio, hypercall = isa.Wrmsr, isa.MmioWrite, isa.Hypercall
        icr_off = APIC_ICR

        decoded = _DECODE_CACHE
        last = self._last_send
        sends = self.sends[name]
        point = getattr(g, "fetch_point", None)   # a GuestCpu: its faults are reported (_fault)

        def watch(insn: Any) -> None:
            t = type(insn)
            if t is wrmsr:
                msr = insn.msr
                if msr == _MSR_ICR:
                    v = insn.value
                    lo, hi = v & 0xFFFFFFFF, v >> 32
                    # Icr.decode(lo, hi, True), through its cache without the call when possible
                    # (the cache key masks lo and hi; a value with reserved bits takes the call).
                    icr = decoded.get((lo, hi, True)) or Icr.decode(lo, hi, True)
                elif msr == _MSR_SELF_IPI:
                    icr = Icr(insn.value & 0xFF, shorthand=SH_SELF, x2apic=True)
                else:
                    return
            elif t is mmio and insn.addr - g.apic_base == icr_off and src.mode == "xapic":
                # (An x2APIC or disabled APIC does not decode its MMIO page: the store is no send.)
                lo, hi = insn.value & ICR_LOW_MASK, src.regs[APIC_ICR2 >> 2]
                icr = decoded.get((lo, hi, False)) or Icr.decode(lo, hi, False)   # (as above)
            elif t is hypercall and insn.nr == KVM_HC_SEND_IPI:
                if insn.a3 & (APIC_DEST_MASK | APIC_SHORT_MASK):
                    return   # -KVM_EINVAL: nothing is sent
                ids = pv_ipi_ids(insn.a0, insn.a1, insn.a2)
                icr = Icr.decode(insn.a3 & 0xFFFFFFFF, 0, True)
                note(name, src, clock.now, icr, [a for a in self.group_of[name][0] if a.apic_id in ids])
                if point is not None:
                    last[name] = (sends[-1], point())
                return
            else:
                return
            note(name, src, clock.now, icr)
            if point is not None:
                last[name] = (sends[-1], point())

        if getattr(g, "send_watch", False) is None and "next_insn" not in vars(g):
            # A GuestCpu: it calls the watcher for its WRMSR / MMIO writes as they are fetched
            # (no extra frame per instruction), and reports faults: a write that faults sent nothing.
            g.send_watch = watch
            g.fault_watch = self._fault
            return

        def next_insn() -> Any:
            insn = orig()
            t = type(insn)
            if t is wrmsr or t is mmio or t is hypercall:
                watch(insn)
            return insn

        g.next_insn = next_insn

    def _fault(self, g: Any) -> None:
        """An instruction of ``g`` faulted: if it is the send noted last (same frame, same fetch
        point), the write did not happen and sent nothing (SDM §11.12.1.2: the #GP is raised
        instead of the write) - forget it."""
        entry = self._last_send.get(g.name)
        if entry is None or entry[1] != g.fetch_point():
            return
        del self._last_send[g.name]
        sends, times = self.sends[g.name], self.times[g.name]
        for i in range(len(sends) - 1, -1, -1):
            if sends[i] is entry[0]:
                del sends[i]
                del times[i]
                break

    def _note(self, sender: str, src: Any, now: int, icr: Icr, pv_targets: list[Any] | None = None) -> None:
        """Note one send: ``icr`` resolved against the sender's VM, or (a PV send-IPI hypercall)
        the APICs ``pv_targets`` its bitmap names."""
        mode = icr.delivery_mode
        apics, name_of = self.group_of[sender]
        # The APICs the send selects: every matching APIC (for lowest priority every legal
        # candidate), in VM order.  Outside the "self" shorthand and lowest priority that is
        # exactly dest.resolve (the [a for a in apics if match_dest(a, src, icr)] filter, with its
        # physical unicast inlined).
        allowed: Any
        selected: Any
        if pv_targets is not None:
            selected = pv_targets
            n_sel = len(selected)
            allowed = tuple([name_of[a] for a in selected])
        elif icr.shorthand == SH_SELF:
            allowed = (sender,)
            selected = [self.apic_of[sender]]
            n_sel = 1
        else:
            if mode == DM_LOWEST:
                selected = apic_dest.lowest_priority_candidates(apics, src, icr)
            else:
                selected = apic_dest.resolve(apics, src, icr)
            n_sel = len(selected)
            if n_sel == 1:
                allowed = (name_of[selected[0]],)
            else:
                allowed = tuple([name_of[a] for a in selected])
        # Who must accept it (the "never accepted" check): fixed IPIs with a legal vector, every
        # selected APIC that is enabled now (hardware and software); lowest priority: at least
        # one enabled candidate.
        must: Any = ()
        # (A level-triggered de-assert, level = 0 with trigger = level, is accepted by nobody:
        # KVM __apic_accept_irq drops it for fixed and lowest priority.)
        if (mode == DM_FIXED or mode == DM_LOWEST) and icr.vector >= 16 and (icr.level or not icr.trigger):
            if n_sel == 1:   # (allowed is then the name of selected[0])
                a = selected[0]
                ok = allowed if a._hw_enabled and a.regs[_W_SVR] & SVR_APIC_ENABLED else ()
            else:
                ok = tuple([name_of[a] for a in selected
                            if a._hw_enabled and a.regs[_W_SVR] & SVR_APIC_ENABLED])
            must = ok if mode == DM_FIXED or not ok else (ok,)   # (ok,): any one of them
        if n_sel > 8:   # (n_sel == len(allowed))
            allowed = frozenset(allowed)
        if mode == DM_NMI:
            key = 2
        elif mode == DM_INIT or mode == DM_SMI:
            key = 0
        else:
            key = icr.vector
        times = self.times[sender]
        sends = self.sends[sender]
        if times and times[-1] == now:
            times.pop()
            sends.pop()
        times.append(now)
        sends.append((key, allowed, must))

    def _never_accepted(self, got: dict[tuple[str, str, int], int], bound_us: float) -> list[dict[str, Any]]:
        """**lost** (never accepted): a fixed/lowest-priority send whose destination, resolved at
        the ICR write, selected an enabled APIC that no acceptance from that send ever reached —
        at the end of a quiescent run, or older than the bound. Such a send leaves nothing
        pending anywhere, so the end-of-run oracle cannot see it (e.g. a broadcast that skips
        invalid physical-table entries). Counted per (sender, target, vector): fewer acceptances
        than judged sends is a loss (robust to acceptances whose recorded send time is not the
        ICR write's; a same-send IRR set counted twice only makes the check more lenient)."""
        run = self.run
        eng = run.engine
        now = eng.now
        quiescent = not eng._q
        bound = 0 if quiescent else int(bound_us * run.costs.ghz * 1000)
        need: dict[tuple[str, str, int], tuple[int, int]] = {}   # -> (sends, first such send time)
        apic_of = getattr(self, "apic_of", {})
        for sender, times in sorted(self.times.items()):
            for t, (key, _allowed, must) in zip(times, self.sends[sender], strict=True):
                if not must or (not quiescent and now - t <= bound):
                    continue
                if isinstance(must[0], tuple):   # lowest priority: any one candidate
                    if any(getattr(apic_of.get(c), "refusing_at", -1) >= t for c in must[0]):
                        continue   # a candidate was reset since (see below)
                    if not any(got.get((sender, c, key)) for c in must[0]):
                        need.setdefault((sender, must[0][0], key), (1 << 30, t))
                    continue
                for c in must:
                    if getattr(apic_of.get(c), "refusing_at", -1) >= t:
                        continue   # the target was reset or software-disabled since: it may refuse it
                    n, t0 = need.get((sender, c, key), (0, t))
                    need[(sender, c, key)] = (n + 1, t0)
        out: list[dict[str, Any]] = []
        seen: set[tuple[str, int]] = set()
        for (sender, cpu, key), (n, t0) in sorted(need.items()):
            have = got.get((sender, cpu, key), 0)
            if (have >= n and n < 1 << 30) or (cpu, key) in seen:
                continue
            seen.add((cpu, key))
            out.append({"kind": "lost", "cpu": cpu, "vector": key, "sent_by": sender, "t_sent": t0,
                        "pending_cycles": now - t0, "detail": _fmt_never(sender, t0, key, cpu, n, have)})
        return out

    def check(self, bound_us: float = DEFAULT_BOUND_US) -> list[dict[str, Any]]:
        hist = self.run.recorder.history
        # (defaultdicts: a missing key is created without a .get()/.setdefault() call)
        got: defaultdict[tuple[str, str, int], int] = defaultdict(int)   # (sender, target, vector) -> acceptances
        pending: defaultdict[tuple[str, int], list[tuple[Any, str | None, bool, int]]] = defaultdict(list)
        served: defaultdict[tuple[str, int], set[Any]] = defaultdict(set)
        runs: defaultdict[tuple[str, int], int] = defaultdict(int)
        dups: dict[tuple[str, int], int] = {}
        out: list[dict[str, Any]] = []
        misrouted_seen: set[Any] = set()
        attributed: set[tuple[str, str, int]] = set()   # (target, sender, send time) with an acceptance
        times_of, sends_of = self.times, self.sends
        bisect_right = bisect.bisect_right
        for n, h in enumerate(hist):
            if h[0] == "a":
                _, cpu, vector, kind, sent_by, t_sent = h
                key: Any = None
                bad = False
                if sent_by is not None:
                    got[(sent_by, cpu, vector)] += 1
                    if kind in _IPI_KINDS and sent_by in times_of:
                        # The send it came from: the sender's latest send at or before t_sent
                        # (emulated and bare-metal paths pass the ICR-write time; the AVIC path
                        # the IRR-set time, which falls inside the ICR write) -- unless that
                        # send had another vector (a write this tracker does not see).
                        times = times_of[sent_by]
                        i = bisect_right(times, t_sent) - 1
                        if i >= 0:
                            skey, allowed, _must = sends_of[sent_by][i]
                            if i > 0 and times[i] == t_sent and (cpu, sent_by, times[i - 1]) not in attributed:
                                # A tie: the AVIC path sets IRR at the very end of an ICR write, the
                                # instant the next one is fetched (the emulated paths record the
                                # fetch of the write itself). The earlier send, if it selected this
                                # CPU with this vector and has no acceptance here yet, is the one.
                                pkey, pallowed, _pm = sends_of[sent_by][i - 1]
                                if pkey == vector and cpu in pallowed:
                                    i -= 1
                                    skey, allowed = pkey, pallowed
                            attributed.add((cpu, sent_by, times[i]))
                            if skey == vector:
                                key = (sent_by, times[i])
                                bad = cpu not in allowed
                if key is None:
                    key = ("#", n)
                pending[(cpu, vector)].append((key, sent_by, bad, t_sent))
                continue
            _, cpu, vector = h
            cv = (cpu, vector)
            consumed = pending.pop(cv, None)
            if not consumed:
                continue   # a local source the recorder does not see (LVT error, thermal...)
            runs[cv] += 1
            done = served[cv]
            if (consumed[0][0] in done if len(consumed) == 1
                    else all(c[0] in done for c in consumed)):
                dups[cv] = dups.get(cv, 0) + 1
            for key, sent_by, bad, t_sent in consumed:
                done.add(key)
                if bad and (cpu, key) not in misrouted_seen:
                    misrouted_seen.add((cpu, key))
                    out.append({
                        "kind": "misrouted", "cpu": cpu, "vector": vector, "sent_by": sent_by,
                        "t_sent": t_sent,
                        "detail": (f"handler for vector {vector:#x} ran on {cpu}, which the destination "
                                   f"of {sent_by}'s send at t={key[1]} did not select"),
                    })
        out.extend(self._never_accepted(got, bound_us))
        for (cpu, vector), n_dup in sorted(dups.items()):
            n_runs = runs[(cpu, vector)]
            out.append({
                "kind": "duplicated", "cpu": cpu, "vector": vector, "sent_by": None, "t_sent": None,
                "detail": (f"{n_runs} handler runs for vector {vector:#x} on {cpu} but only "
                           f"{len(served[(cpu, vector)])} distinct acceptance(s): {n_dup} run(s) served "
                           "sends that had already been handled"),
            })
        return out


def _fmt_never(sender: str, t: int, vector: int, cpu: str, n: int, have: int) -> str:
    sends = "a send" if n >= 1 << 30 else f"{n} send(s)"
    return (f"{sender}'s IPIs with vector {vector:#x} (first at t={t}) selected {cpu} in {sends}, but "
            f"only {have} acceptance(s) from {sender} ever reached it: an IPI was never accepted")


def track(run: Any) -> Tracker:
    return Tracker(run)
