"""What the explorer calls *the state* of a run, as named **locations** with **owners**.

A run's state is cut into locations — one per process position, guest, vCPU (with its APIC page),
physical CPU, scheduler, AVIC table entry, L1 thread, nested vCPU state, design table, erratum
window, ... (:func:`locations`). Two uses:

* **State hashing** (:func:`state_hash`): a digest of every location's value, with times relative
  to now (a state and its translate in time are one state), plus the order of the pending events.
  A state already explored with at least as much budget is not explored again.
* **Footprints** (:mod:`navic.check.independence`, ``--reduction dpor``): with times absolute
  (``now = 0``), a location's value changes only when some step writes it, so the locations that
  differ between two decision points are what the steps in between wrote. Each location also has
  an **owner**: the agent (the vCPU thread — a whole pCPU stack — or the callback) whose steps
  alone may touch it without interacting with anybody, or ``None`` for shared state (schedulers,
  KVM-wide inhibits and maps, the erratum window, logical tables, design tables, callbacks' own
  events).

Owners follow the hardware: an L0 vCPU thread owns its vCPU (APIC page, VMCB, requests, mode),
its L1 guest, its physical ID table entry, its nested state (vmcb02), its L1 kernel CPU, and —
while loaded on it — the L2 vCPUs L1 runs there (their L1-level vCPU, L1 thread, guest, entries in
L1's table and in the dummy table). A physical CPU belongs to the vCPU loaded on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from navic.sim.engine import Handle, _label

_PLAIN = (int, bool, str, float, type(None))


# Locals of model generators that hold an engine timestamp across a yield, by (code qualname,
# local): hashed relative to now, as pending events are (a state and its translate in time are
# one state; the code only ever uses them as ``now - t`` or against ``now``). A generator that
# keeps ``engine.now`` in a local across a ``yield`` is listed here.
TIME_LOCALS = frozenset({
    ("Kvm.kvm_vcpu_halt", "start"), ("Kvm.kvm_vcpu_halt", "deadline"),   # halt-poll window
    ("Kvm.kvm_vcpu_block", "off"), ("Kvm.preempt", "off"),              # host_off_cpu accounting
})


def _locals(frame: Any, now: int = 0) -> tuple[Any, ...]:
    out = []
    qual = frame.f_code.co_qualname
    for k, v in frame.f_locals.items():
        if type(v) in _PLAIN:
            out.append((k, now - v if type(v) is int and (qual, k) in TIME_LOCALS else v))
        elif hasattr(v, "index") and type(v).__module__.endswith("ops"):
            out.append((k, type(v).__name__, v.index))   # a guest op: which one
    return tuple(out)


def _stack(gen: Any) -> list[Any]:
    """The frames of a generator and of everything it ``yield from``s, outermost first; None
    for a finished one."""
    out = []
    while gen is not None:
        f = getattr(gen, "gi_frame", None)
        out.append(f)
        if f is None:
            break
        gen = getattr(gen, "gi_yieldfrom", None)
    return out


def _pc(gen: Any, now: int = 0) -> tuple[Any, ...]:
    """Where a generator (and everything it ``yield from``s) is suspended, with its plain locals
    (the :data:`TIME_LOCALS` ones relative to ``now``)."""
    return tuple(None if f is None else (f.f_code, f.f_lasti, _locals(f, now)) for f in _stack(gen))


def _where(gen: Any) -> tuple[Any, ...]:
    """Where a generator stack is suspended, without locals (footprints: a process's locals change
    only when it steps itself, and nobody else reads them)."""
    return tuple(None if f is None else (f.f_code, f.f_lasti) for f in _stack(gen))


# Locations that hold suspended frames (where the explorer looks for interaction code).
FRAME_LOCATIONS = ("proc:", "l1thread:", "l1cpu:")


def _apic(a: Any, now: int) -> tuple[Any, ...]:
    deadline = a._tmr_deadline
    return (hash(bytes(a.page)), a.nmi_pending, a.init_pending, a.smi_pending, a.extint_pending,
            getattr(a, "sipi_vector", None), a._esr_pending, a._esr_armed,
            None if deadline is None else deadline - now)


def _apic_abs(rel: tuple[Any, ...], a: Any) -> tuple[Any, ...]:
    """An :func:`_apic` tuple with the timer deadline absolute (its footprint value)."""
    return rel if rel[-1] is None else (*rel[:-1], a._tmr_deadline)


def _insn(x: Any) -> Any:
    """An instruction (or other queued object) as plain data."""
    return repr(x) if type(x).__module__.endswith("isa") else type(x).__name__


def _guest_ctx(ctx: Any) -> Any:
    """A guest context (SVM ``GuestContext``, VMX ``VmcsContext``): its plain fields (controls,
    guest state, exit information), its MSR intercept sets, the exit instruction and, for VMX, the
    bytes of its posted-interrupt descriptor. The guest, the VMCB page and the virtual-APIC page
    are hashed with their owner."""
    if ctx is None:
        return None
    out: list[Any] = []
    for f in dataclasses.fields(ctx):
        x = getattr(ctx, f.name)
        if type(x) in _PLAIN:
            out.append(x)
        elif type(x) is frozenset:
            out.append(hash(x))
        elif f.name == "exit_insn":
            out.append(_insn(x))
        elif f.name == "pid":
            out.append(bytes(x.mem.page(x.hpa)[x.hpa & 0xFFF:(x.hpa & 0xFFF) + 64]))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------------------------
# The owner of a *derived* location: hashed (it is state) but no footprint, because it is a
# function of other locations that footprints do see (the shadow design's usecount is the number
# of vCPUs whose nested VMRUN took the table; its one reader is declared interaction code).
DERIVED = "=derived"


class Locations:
    """An ordered map location -> value (times relative to now: what the state hash digests), with
    each location's owner (an agent name or None) and, when asked for, its *footprint value*
    (times absolute, frames without locals: what changes only when some step writes it)."""

    __slots__ = ("values", "owners", "fvalues", "_frames")

    def __init__(self, footprint: bool = False) -> None:
        self.values: dict[str, Any] = {}
        self.owners: dict[str, str | None] = {}
        self.fvalues: dict[str, Any] | None = {} if footprint else None
        self._frames: list[str] | None = None

    def frame_keys(self) -> list[str]:
        """The locations that hold suspended frames (:data:`FRAME_LOCATIONS`)."""
        if self._frames is None:
            self._frames = [k for k in self.values if k.startswith(FRAME_LOCATIONS)]
        return self._frames

    def put(self, key: str, value: Any, owner: str | None, fvalue: Any = None) -> None:
        """``fvalue``: the footprint value when it differs from ``value`` (time-dependent ones)."""
        self.values[key] = value
        self.owners[key] = owner
        if self.fvalues is not None:
            self.fvalues[key] = value if fvalue is None else fvalue

    def footprint(self) -> Locations:
        """The footprint view: the footprint values under the same owners."""
        out = Locations()
        out.values = self.fvalues if self.fvalues is not None else self.values
        out.owners = self.owners
        return out


class _Agents:
    """Who owns what: the agent (a live process's name) behind each vCPU, guest and CPU name. A
    vCPU thread is pinned to its home CPU (navic.hv.sched), so ownership is static: an L0 vCPU is
    its thread's; an L2 vCPU (an L1-level vCPU) is the agent's of the L1 vCPU it is homed on; a
    physical CPU is the agent's of the one vCPU homed on it (shared when several are)."""

    def __init__(self, run: Any) -> None:
        eng = run.engine
        self.procs = {p.name for p in eng.processes if p.alive}
        self.by_name: dict[str, str | None] = {}
        self.pcpu: dict[str, dict[int, str | None]] = {}
        kvm = run.kvm
        if kvm is None:
            return
        for v in kvm.vcpus:
            self.by_name[v.name] = v.name if v.name in self.procs else None
        self.pcpu["0"] = _homes(kvm.vcpus, self.by_name)
        kvm2 = getattr(run, "kvm2", None)
        if kvm2 is not None:
            l1 = kvm.vcpus
            self.pcpu["1"] = {i: self.by_name.get(v.name) for i, v in enumerate(l1)}
            for v in kvm2.vcpus:
                self.by_name[v.name] = self.pcpu["1"].get(v.home)

    def of_pcpu(self, lvl: str, index: int) -> str | None:
        return self.pcpu.get(lvl, {}).get(index)

    def of(self, name: str | None) -> str | None:
        if name is None:
            return None
        if name in self.by_name:
            return self.by_name[name]
        return name if name in self.procs else None


def _homes(vcpus: Any, by_name: dict[str, str | None]) -> dict[int, str | None]:
    homes: dict[int, list[Any]] = {}
    for v in vcpus:
        homes.setdefault(v.home, []).append(v)
    return {p: by_name.get(vs[0].name) if len(vs) == 1 else None for p, vs in homes.items()}


def locations(run: Any, now: int | None = None, *, footprint: bool = False) -> Locations:
    """The run's state as locations (module docstring). ``now``: the time values are made
    relative to (the engine's time by default). ``footprint``: also the footprint values
    (:class:`Locations`), in the same pass."""
    eng = run.engine
    if now is None:
        now = eng.now
    fp = footprint
    loc = Locations(footprint)
    agents = _Agents(run)
    # Pending events per agent (the process's own next event or Cuttable end: owned by it; a
    # callback's: shared), relative to now; their global order is in state_hash.
    events: dict[str, list[int]] = {}
    for e in eng._q:
        t = e[2]
        if type(t) is Handle and t.cancelled:
            continue
        events.setdefault(_label(t), []).append(e[0])
    for label in sorted(events):
        ts = sorted(events[label])
        loc.put("ev:" + label, tuple(t - now for t in ts), label if label in agents.procs else None,
                tuple(ts) if fp else None)
    for p in eng.processes:
        if p.alive:
            w = p.waiting_on.name if p.waiting_on else None
            loc.put("proc:" + p.name, (_pc(p.gen, now), w), p.name, (_where(p.gen), w) if fp else None)
    for g in run.guests:
        loc.put("guest:" + g.name,
                (g.IF, g.nmi_blocked, g.wait_for_sipi, g.finished,
                 tuple(sorted(g.handled.items())), tuple(sorted(g._consumed.items())),
                 tuple(sorted(g.reads.items())), g.x2apic, g.apic_base,
                 len(getattr(g, "_once_done", ())),   # (not hlt_count: see docs/model.md)
                 tuple((f.kind, f.saved_if, f.position()) for f in g.frames)),
                agents.of(g.name))
    rec = run.recorder
    # Pending acceptances with their provenance (send times relative to now: which send they are),
    # owned by the receiving CPU.
    for k, q in sorted(rec._pending.items()):
        if q:
            loc.put(f"rec:{k}", tuple((now - t, sb, kind) for t, sb, kind in q),
                    agents.of(k[0] if isinstance(k, tuple) else None), tuple(q) if fp else None)
    kvm = run.kvm
    if kvm is not None:
        _kvm(kvm, "0", now, loc, agents)
        kvm2 = getattr(run, "kvm2", None)
        if kvm2 is not None:
            _kvm(kvm2, "1", now, loc, agents)
            _nested(kvm, kvm2, now, loc, agents)
    else:
        m = run.machine
        for i, a in enumerate(m.apics):
            cpu = m.pcpus[i]
            halted = getattr(cpu, "halted", None)
            ap = _apic(a, now)
            loc.put(f"cpu:{i}", (ap, halted), agents.of(getattr(cpu, "name", None)),
                    (_apic_abs(ap, a), halted) if fp else None)
    return loc


def _table(loc: Locations, key: str, mem: Any, hpa: int, npages: int, owner_of: dict[int, str | None]) -> None:
    """A physical APIC ID table: one location per entry whose index is a vCPU's APIC ID (owned
    by that vCPU's agent), the rest of each page as one shared location."""
    for pg in range(npages):
        page = mem.page(hpa + 4096 * pg)
        q = memoryview(page).cast("Q")
        rest = bytearray(page)
        for i, owner in owner_of.items():
            if i >> 9 == pg:
                j = i & 511
                loc.put(f"{key}:{i}", q[j], owner)
                rest[8 * j:8 * j + 8] = bytes(8)
        loc.put(f"{key}:page{pg}", hash(bytes(rest)), None)


def _kvm(kvm: Any, lvl: str, now: int, loc: Locations, agents: _Agents) -> None:
    """One KVM (L0's, ``lvl`` "0", or L1's, "1"): its vCPUs, its host's CPUs and scheduler, its
    AVIC tables, the erratum window and the inhibits."""
    mem = kvm.mem
    for v in kvm.vcpus:
        vmcb = getattr(v, "vmcb", None)
        ctx = getattr(v, "ctx", None)
        owner = agents.of(v.name)
        ap = _apic(v.apic, now)
        rest = (v.mode, v.blocking, v.blocked, v.cpu,
                 tuple(sorted(v.requests)), v.apicv_active, len(v.pending_ipis),
                 v.need_resched, v.preempted, v.halt_poll_ns, v.nmi_injected,
                 v.nmi_queued, v.nmis_pending,
                 v.interrupt_window, getattr(v, "avic_physical_id_entry", None),
                 hash(bytes(vmcb.mem.page(vmcb.hpa))) if vmcb is not None else None,
                 _guest_ctx(ctx),
                 getattr(v, "nested_inhibit", None))
        loc.put(f"vcpu{lvl}:{v.name}", (ap, *rest), owner,
                (_apic_abs(ap, v.apic), *rest) if loc.fvalues is not None else None)
    host = kvm.host
    for p in host.pcpus:
        loc.put(f"pcpu{lvl}:{p.index}",
                (getattr(p, "guest_mode", None), getattr(p, "doorbell_pending", None),
                 p.intr_pending, getattr(p, "pi_pending", None),
                 getattr(getattr(p, "running", None), "name", None)),
                agents.of_pcpu(lvl, p.index))
    s = host.sched    # per CPU: its running thread, run queue and time slice
    for i, t in enumerate(s.current):
        cur, rq = getattr(t, "name", None), tuple(x.name for x in s.runq[i])
        loc.put(f"sched{lvl}:{i}", (cur, rq, now - s.slice_start[i]), agents.of_pcpu(lvl, i),
                (cur, rq, -s.slice_start[i]) if loc.fvalues is not None else None)
    av = getattr(kvm.vendor, "avic", None)
    if av is not None:
        _table(loc, f"pid{lvl}", mem, av.physical_table_hpa, av.physical_table_pages,
               {v.vcpu_id: agents.of(v.name) for v in kvm.vcpus})
        loc.put(f"lid{lvl}", hash(bytes(mem.page(av.logical_table_hpa))), None)
    err = getattr(getattr(getattr(host, "silicon", None), "avic", None), "erratum", None)
    if err is not None:
        loc.put(f"erratum{lvl}", tuple(sorted((hpa, err.ipi_seq - seq, hid)
                                              for hpa, (seq, hid) in err._cleared.items())), None)
    inh = getattr(kvm, "inhibits", None)
    if inh is not None:
        loc.put(f"inhibits{lvl}", tuple(sorted(inh.active)), None)


def _nested(kvm0: Any, kvm2: Any, now: int, loc: Locations, agents: _Agents) -> None:
    """What a nested run adds: the L1 kernel on each L1 vCPU (its threads — L1 KVM's vCPU threads —
    with their positions, queued instructions and waits; handler frames; run queues), L0's nested
    state per L1 vCPU (vmcb02) and the design's tables (shadow tables and their cached guest
    entries; the dummy table)."""
    l1host = kvm2.host
    fp = loc.fvalues is not None
    for c in getattr(l1host, "cpus", ()):
        head = (c.IF, c.nmi_blocked, tuple(sorted(c.handled.items())))
        runnable = tuple(t.vcpu.name for t in c.runnable)
        loc.put("l1cpu:" + c.name,
                (*head, tuple((f.saved_if, _pc(f.gen, now), repr(f.resume)) for f in c.frames), runnable),
                agents.of(c.name),
                (*head, tuple((f.saved_if, _where(f.gen), repr(f.resume)) for f in c.frames), runnable)
                if fp else None)
    for name, t in sorted(getattr(l1host, "threads", {}).items()):
        rest = (t.waiting.name if t.waiting is not None else None, tuple(_insn(i) for i in t.pending),
                t.result if type(t.result) in _PLAIN else _insn(t.result))
        loc.put("l1thread:" + name, (_pc(t.gen, now), *rest), agents.of(t.vcpu.name),
                (_where(t.gen), *rest) if fp else None)
    hmem = kvm0.mem
    for v in kvm0.vcpus:
        owner = agents.of(v.name)
        st = getattr(v, "nested", None)
        if st is not None:
            vmcb02 = getattr(st, "vmcb02", None)          # nested SVM: the vmcb02 page
            loc.put("nested:" + v.name,
                    (st.active, getattr(st.l2, "name", None),
                     hash(bytes(hmem.page(vmcb02.hpa))) if vmcb02 is not None
                     else (_guest_ctx(st.ctx02), _guest_ctx(st.ctx12), st.vmcs12_gpa)),   # nested VMX
                    owner)
        t = getattr(v, "shadow_table", None)
        if t is not None:
            loc.put("shadowref:" + v.name, t.gfn, owner)
    design = getattr(getattr(kvm0.vendor, "nested", None), "design", None)
    l2_owner = {v.vcpu_id: agents.of(v.name) for v in kvm2.vcpus}
    for t in getattr(design, "tables", {}).values():   # shadow: cached guest entries, hardware entries
        loc.put(f"shadow:{t.gfn}", (t.nentries, tuple(t.gentries), getattr(t, "flood_count", 0)), None)
        loc.put(f"shadowuse:{t.gfn}", t.usecount, DERIVED)
        _table(loc, f"shadowe:{t.gfn}", hmem, t.hpa, getattr(design, "table_pages", 1), l2_owner)
    table = getattr(design, "table_hpa", None)           # dummy
    if table is not None:
        _table(loc, "dummy", hmem, table, 8, l2_owner)


def state_hash(run: Any, locs: Locations | None = None) -> bytes:
    """A digest of everything that determines how the run continues: every location (times
    relative to now; ``locs`` if already taken) and the order in which the pending events would
    run."""
    eng = run.engine
    now = eng.now
    order = tuple((e[0] - now, _label(e[2])) for e in sorted(eng._q)
                  if not (type(e[2]) is Handle and e[2].cancelled))
    if locs is None:
        locs = locations(run, now)
    return hashlib.blake2b(repr((order, list(locs.values.items()))).encode(), digest_size=16).digest()
