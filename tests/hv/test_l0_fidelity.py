"""KVM fidelity fixes of issue 13 (items 2-9, 11): each test pins one upstream behaviour that navic
used to model differently, naming the upstream function it follows (see docs/model.md "KVM fidelity
(issue 13)")."""

from __future__ import annotations

import pytest
from _kvm_util import prog, scenario, traced

from navic.hw import avic as A

STI = '{ op = "sti" }'


def after(cycles: int, *ops: str) -> list[str]:
    return [STI, f'{{ op = "compute", cycles = {cycles} }}', *ops]


def clean(t) -> None:
    assert t.result["violations"] == []
    assert t.ir_violations == []
    assert t.result["errors"] == []


# -- item 5: APIC_ID_MODIFIED is recomputed by kvm_recalculate_apic_map, not sticky ----------------
def test_apic_id_restored_clears_the_inhibit_and_avic_comes_back(monkeypatch):
    """An xAPIC guest moves its ID away and back: kvm_recalculate_apic_map() clears
    APIC_ID_MODIFIED again (upstream since "KVM: x86: Allow APICv APIC ID inhibit to be cleared"),
    so AVIC is active at the end and an IPI after the restore is accelerated (no emulation)."""
    progs = [prog(0, after(60000, '{ op = "ipi", dest = 1, vector = 0x41 }')),
             prog(1, [STI, '{ op = "write", reg = "ID", value = 0x05000000 }',
                      '{ op = "compute", cycles = 10000 }',
                      '{ op = "write", reg = "ID", value = 0x01000000 }',
                      '{ op = "wait", vector = 0x41, how = "spin" }'])]
    t = traced(scenario(progs, apic="xapic", l0="halt_poll_ns = 0"), monkeypatch=monkeypatch)
    clean(t)
    (rng,) = t.result["inhibits"]["APIC_ID_MODIFIED"]
    assert rng[1] is not None and rng[1] > rng[0]          # raised, then cleared
    assert all(v.apicv_active for v in t.kvm.vcpus)
    assert t.got() == [("l1.1", 0x41, "fixed")]
    assert t.counter("emulated_ipis") == 0                  # the IPI went through AVIC


# -- item 7: x2AVIC keeps TMCCT reads intercepted ---------------------------------------------------
def test_x2avic_tmcct_read_exits_other_timer_reads_do_not(monkeypatch):
    """kvm_x2apic_disable_read_intercept_reg_mask() leaves TMCCT out: KVM computes the current
    count; TMICT/LVTT reads are accelerated."""
    progs = [prog(0, [STI, '{ op = "read", reg = "TIMER_INITIAL" }', '{ op = "read", reg = "LVT_TIMER" }',
                      '{ op = "read", reg = "TIMER_CURRENT" }'])]
    t = traced(scenario(progs, cpu="zen4", apic="x2apic", vcpus=1), monkeypatch=monkeypatch)
    clean(t)
    assert t.l0_exits().get("msr", 0) == 1
    assert 0x839 in t.kvm.vcpus[0].ctx.msr_rd and 0x838 not in t.kvm.vcpus[0].ctx.msr_rd


# -- item 8: DFR trap only invalidates the logical entry; RRR trap is ignored -----------------------
def test_dfr_write_leaves_logical_entry_invalid_until_ldr_changes(monkeypatch):
    """avic_handle_dfr_update() invalidates the entry and records the DFR; ldr_reg keeps the old
    LDR, so nothing is written until the LDR changes: a logical IPI in between exits (ID 2, emulated),
    one after a new LDR is accelerated."""
    progs = [prog(0, ['{ op = "write", reg = "DFR", value = 0x0FFFFFFF }',
                      *after(30000, '{ op = "ipi", dest = 0x12, dest_mode = "logical", vector = 0x61 }',
                           '{ op = "compute", cycles = 30000 }',
                           '{ op = "ipi", dest = 0x14, dest_mode = "logical", vector = 0x62 }')]),
             prog(1, [STI, '{ op = "write", reg = "LDR", value = 0x12000000 }',
                      '{ op = "write", reg = "DFR", value = 0x0FFFFFFF }',
                      '{ op = "wait", vector = 0x61, how = "spin" }',
                      '{ op = "write", reg = "LDR", value = 0x14000000 }',
                      '{ op = "wait", vector = 0x62, how = "spin" }'])]
    t = traced(scenario(progs, apic="xapic"), monkeypatch=monkeypatch)
    clean(t)
    mem, lt = t.kvm.mem, t.kvm.vendor.avic.logical_table_hpa
    fids = [fid for (_lo, _hi, fid, _idx) in t.incomplete_ipis("l1.0")]
    assert fids == [A.AVIC_IPI_FAILURE_INVALID_TARGET]      # only 0x61 (index 5 still invalid)
    assert t.got() == [("l1.1", 0x61, "fixed"), ("l1.1", 0x62, "fixed")]
    # Cluster 1, member bit 2 -> index 6: written by the LDR write, not by the DFR write.
    assert mem.read32(lt + 4 * 6) == A.LOG_VALID | 1
    assert mem.read32(lt + 4 * 5) & A.LOG_VALID == 0


def test_rrr_write_trap_is_not_replayed(monkeypatch):
    """avic_unaccel_trap_write(): "Ignore writes to Read Remote Data" — no kvm_apic_write_nodecode."""
    from navic.apic.lapic import LocalApic

    replayed: list[int] = []
    orig = LocalApic.write_reg

    def spy(self, off, value):
        replayed.append(off)
        return orig(self, off, value)

    monkeypatch.setattr(LocalApic, "write_reg", spy)
    progs = [prog(0, [STI, '{ op = "write", reg = "RRD", value = 0x5 }'])]
    t = traced(scenario(progs, apic="xapic", vcpus=1))
    assert t.noaccels("l1.0") == [(0xC0, True, 0)]
    assert 0xC0 not in replayed


# -- item 4: shrink_halt_poll_ns divides by halt_poll_ns_shrink ------------------------------------
def _halt_poll_run(l0: str):
    """l1.1 halts for five IPIs: four after gaps of 30, 50, 90, 170 µs (each halt is longer than the
    window and shorter than halt_poll_ns = 200 µs: it grows 10 → 20 → 40 → 80 µs), then one after a
    400 µs gap (longer than halt_poll_ns: shrink)."""
    ops = []
    for v, us in enumerate((30, 50, 90, 170)):
        ops += [f'{{ op = "compute", cycles = {us * 3000} }}', f'{{ op = "ipi", to = 1, vector = {0x40 + v:#x} }}']
    ops += ['{ op = "compute", cycles = 1200000 }', '{ op = "ipi", to = 1, vector = 0x44 }']
    progs = [prog(0, [STI, *ops]),
             prog(1, [STI] + [f'{{ op = "wait", vector = {0x40 + v:#x}, how = "hlt" }}' for v in range(5)]
                  + ['{ op = "compute", cycles = 3000000 }'])]
    t = traced(scenario(progs, cpu="zen4", apic="x2apic", l0=l0, max_time_us=2000))
    clean(t)
    assert len(t.got()) == 5
    return t.kvm.vcpus[1].halt_poll_ns


def test_halt_poll_window_halves_after_a_long_halt():
    """KVM default halt_poll_ns_shrink = 2: 80 µs → 40 µs (navic used to reset it to 0)."""
    assert _halt_poll_run("") == 40_000


def test_halt_poll_shrink_zero_resets_and_small_windows_drop_to_zero():
    assert _halt_poll_run("halt_poll_ns_shrink = 0") == 0
    assert _halt_poll_run("halt_poll_ns_shrink = 9") == 0     # 80 µs / 9 < halt_poll_ns_grow_start
    assert _halt_poll_run("halt_poll_ns_shrink = 4") == 20_000


# -- item 9: nested #VMEXIT re-activates the L1 vCPU's AVIC at once ----------------------------------
def _nested_pingpong() -> str:
    l2 = ('[[program]]\ncpu = "l2.0"\nops = [ { op = "sti" }, '
          '{ op = "repeat", times = 5, ops = [ '
          '{ op = "ipi", to = 1, vector = 0x40 }, { op = "wait", vector = 0x41, how = "hlt" } ] } ]\n'
          '[[program]]\ncpu = "l2.1"\n'
          'ops = [ { op = "sti" }, { op = "wait", vector = 0x40, count = 5, how = "hlt" } ]\n'
          '[program.handlers]\n0x40 = [ { op = "ipi", to = 0, vector = 0x41 }, { op = "eoi" } ]\n')
    return ('name = "t"\nmax_time_us = 5000\n[host]\ncpu = "zen4"\npcpus = 4\n[l0]\nnested_apicv = "shadow"\n'
            '[l1]\nvcpus = 2\napic = "x2apic"\n[l2]\nvcpus = 2\napic = "xapic"\n' + l2)


def test_nested_vmexit_reactivates_avic_before_returning(monkeypatch):
    """nested_svm_vmexit() calls __kvm_vcpu_update_apicv() itself: when it returns, the L1 vCPU's
    AVIC is active and its real physical-table entry has IsRunning = 1 (it used to wait for
    KVM_REQ_APICV_UPDATE at the next entry)."""
    from navic.hv.nested.core import NestedSvm

    seen: list[tuple[bool, bool]] = []
    orig = NestedSvm.nested_svm_vmexit

    def wrapped(self, vcpu, code, info1, info2):
        r = yield from orig(self, vcpu, code, info1, info2)
        av = self.kvm.vendor.avic
        entry = self.kvm.mem.read64(av.physical_entry_hpa(vcpu.vcpu_id))
        seen.append((vcpu.apicv_active, bool(entry & A.PHYS_IS_RUNNING)))
        return r

    monkeypatch.setattr(NestedSvm, "nested_svm_vmexit", wrapped)
    t = traced(_nested_pingpong())
    assert t.result["violations"] == [] and t.result["errors"] == []
    assert sum(d["cpu"].startswith("l2.") for d in t.result["deliveries"]) == 10
    assert seen and all(s == (True, True) for s in seen)


# -- item 2: APIC timer expiry on SVM: pending + kick by default, posted only on request ---------------
def _timer_spin(l0: str = ""):
    """l1.0 arms a TSC-deadline timer (vector 0xE1, at TSC 300000) and spin-waits for it in the guest."""
    progs = [prog(0, [STI, '{ op = "write", reg = "LVT_TIMER", value = 0x400E1 }',
                      '{ op = "wrmsr", msr = 0x6E0, value = 300000 }',
                      '{ op = "wait", vector = 0xE1, how = "spin" }'])]
    t = traced(scenario(progs, cpu="zen4", apic="x2apic", vcpus=1, l0=l0, max_time_us=400),
               monkeypatch=None)
    clean(t)
    (d,) = t.result["deliveries"]
    assert (d["vector"], d["kind"]) == (0xE1, "timer")
    return t, d


def test_timer_expiry_on_svm_kicks_and_injects_at_the_next_entry():
    """apic_timer_expired(): kvm_use_posted_timer_interrupt() is false by default (pi_inject_timer
    needs HLT/MWAIT in the guest), so the hrtimer bumps ``pending`` and kicks: the spinning vCPU exits
    (reschedule IPI -> #VMEXIT(INTR)) and the interrupt is injected on re-entry — no doorbell."""
    t, d = _timer_spin()
    assert t.counter("kicks") == 1
    assert t.l0_exits().get("interrupt", 0) == 1
    assert t.counter("doorbells_sent") == 0
    pend = t.ev("navic_apic_timer_pending")
    assert len(pend) == 1 and pend[0].fields["mode"] == "in_guest"
    entries = [e.t for e in t.ev("kvm_entry") if e.t > pend[0].t]
    assert entries and d["t"] >= entries[0]      # delivered only after KVM re-entered the guest


def test_posted_timer_rings_the_doorbell_without_an_exit():
    """[l0] posted_timer = true: kvm_use_posted_timer_interrupt() — the hrtimer sets IRR and rings the
    doorbell of the running vCPU: no exit."""
    t, _ = _timer_spin("posted_timer = true")
    assert t.counter("kicks") == 0
    assert t.l0_exits().get("interrupt", 0) == 0
    assert t.ev("navic_apic_timer_pending") == []
    assert t.counter("doorbells_sent") == 1


# -- item 3: the SVM exit fastpath (svm_exit_handlers_fastpath) --------------------------------------
def _exit_to_next(t, reason: str, vcpu: str, then: str) -> list[int]:
    """For each ``reason`` exit of ``vcpu``: cycles from kvm_exit to the vCPU's next ``then`` event."""
    out = []
    for e in t.exits(reason, vcpu):
        nxt = min(x.t for x in t.ev(then, vcpu) if x.t >= e.t)
        out.append(nxt - e.t)
    return out


@pytest.mark.parametrize("cpu,msr_exit", [("zen4", "msr"), ("spr", "msr_write")])
def test_fastpath_tsc_deadline_icr_and_hlt_skip_the_full_dispatch(cpu, msr_exit):
    """x2APIC, APICv off (every x2APIC MSR exits): a TSC_DEADLINE WRMSR and a fixed physical ICR
    WRMSR take EXIT_FASTPATH; a logical-destination ICR WRMSR (not fastpath-eligible) takes
    EXIT_DISPATCH; the HLT exit takes EXIT_FASTPATH (handle_fastpath_hlt) before blocking — on SVM
    (svm_exit_handlers_fastpath, new) as on VMX (vmx_exit_handlers_fastpath: ICR only before)."""
    progs = [prog(0, [STI, '{ op = "wrmsr", msr = 0x6E0, value = 1000000000 }',
                      '{ op = "ipi", to = 1, vector = 0x40 }',
                      '{ op = "compute", cycles = 20000 }',
                      '{ op = "ipi", dest = 0x2, dest_mode = "logical", vector = 0x41 }']),
             prog(1, [STI, '{ op = "wait", vector = 0x40, how = "spin" }',
                      '{ op = "wait", vector = 0x41, how = "spin" }'])]
    t = traced(scenario(progs, cpu=cpu, apic="x2apic", l0="apicv = false\nhalt_poll_ns = 0"))
    clean(t)
    c = t.kvm.costs
    tsc, icr_phys, icr_logical = _exit_to_next(t, msr_exit, "l1.0", "kvm_entry")
    assert tsc == c.EXIT_FASTPATH + c.MSR_EMULATE
    assert icr_logical - icr_phys == c.EXIT_DISPATCH - c.EXIT_FASTPATH
    (hlt,) = _exit_to_next(t, "hlt", "l1.0", "kvm_vcpu_block")
    assert hlt == c.EXIT_FASTPATH



# -- item 6: kvm_amd avic "auto" / enable_ipiv forced off on family 17h --------------------------------
def _vendor(cpu: str, l0: str):
    text = (f'name = "t"\nmax_time_us = 50\n[host]\ncpu = "{cpu}"\npcpus = 2\n[l0]\n{l0}\n'
            '[l1]\nvcpus = 2\napic = "xapic"\n')
    from navic.runner import simulate
    from navic.scenario import loads_scenario

    r = simulate(loads_scenario(text, "t.toml"))
    return r.kvm.vendor, r.result()


@pytest.mark.parametrize("cpu,l0,on", [
    ("zen2", "", False), ("zen3", "", False), ("zen4", "", True), ("zen5", "", True),
    ("zen2", "avic = true", True), ("zen3", "avic = true", False), ("zen3", "force_avic = true", False),
    ("zen3", "avic = true\nforce_avic = true", True), ("zen4", "avic = false", False),
    ("zen4", "apicv = false", False), ("zen2", "avic = true\napicv = false", False),
])
def test_avic_module_parameter_auto_is_zen4_and_later(cpu, l0, on):
    """avic_want_avic_enabled(): "auto" = X2AVIC on Zen4 or family >= 0x1A; zen1-3 need avic=1, and zen3
    (AVIC not in CPUID) force_avic too."""
    vendor, res = _vendor(cpu, l0)
    assert vendor.enable_apicv is on
    assert all(v.apicv_active is on for v in vendor.kvm.vcpus)
    assert ("DISABLED" in res["inhibits"]) is (not on)


@pytest.mark.parametrize("cpu,l0,ipiv", [
    ("zen2", "avic = true", False),
    ("zen2", 'avic = true\nerrata = []', False),          # family 17h, not the erratum list, decides
    ("zen4", 'errata = ["1235"]', True), ("zen2", "avic = true\nipiv = true", True),
    ("zen4", "ipiv = false", False), ("zen3", "avic = true\nforce_avic = true", True),
])
def test_enable_ipiv_is_forced_off_on_family_17h(cpu, l0, ipiv):
    vendor, res = _vendor(cpu, l0)
    assert vendor.enable_ipiv is ipiv
    notes = [w["detail"] for w in res["warnings"] if w["kind"] == "config"]
    if ipiv and cpu == "zen2":
        assert len(notes) == 1 and "pre-8de4a1c8164e kernel" in notes[0]
    else:
        assert notes == []


# -- item 11: zen5's X2AVIC_EXT is an assumption, and the compare report says so ---------------------
def test_compare_report_marks_zen5_x2avic_ext_as_an_assumption():
    from navic.compare import markdown_report
    from navic.hw.features import features_for

    assert features_for("zen5").x2avic_ext      # still modelled, ...
    text = markdown_report([], [], "navic compare")
    sec = text[text.index("## Model assumptions"):]
    assert "X2AVIC_EXT" in sec and "assumption" in sec   # ... but labelled


def test_ipiv_true_with_avic_left_at_auto_on_zen2_says_it_has_no_effect():
    vendor, res = _vendor("zen2", "ipiv = true")
    assert not vendor.enable_apicv
    (w,) = res["warnings"]
    assert w["kind"] == "config" and "set l0.avic = true" in w["detail"]


# -- mixed xAPIC / x2APIC logical modes disable KVM's logical map: LOGICAL_ID_ALIASED --------------
def test_mixed_xapic_x2apic_logical_modes_inhibit_avic(monkeypatch):
    """kvm_recalculate_logical_map() sets logical_mode = KVM_APIC_MODE_MAP_DISABLED when enabled APICs
    with an LDR use different logical modes (here xAPIC flat and x2APIC), and
    kvm_recalculate_apic_map() then sets APICV_INHIBIT_REASON_LOGICAL_ID_ALIASED; it is cleared when
    the guest is back to one mode."""
    progs = [prog(0, [STI, '{ op = "write", reg = "LDR", value = 0x01000000 }',
                      '{ op = "compute", cycles = 20000 }']),
             prog(1, [STI, '{ op = "compute", cycles = 5000 }',
                      '{ op = "wrmsr", msr = 0x1b, value = 0xfee00c00 }',     # EN | EXTD: to x2APIC
                      '{ op = "compute", cycles = 5000 }'])]
    t = traced(scenario(progs, cpu="zen4", apic="xapic"), monkeypatch=monkeypatch)
    assert t.result["errors"] == []
    (rng,) = t.result["inhibits"]["LOGICAL_ID_ALIASED"]
    assert rng[0] > 0 and rng[1] is None          # raised when l1.1 entered x2APIC mode, never cleared
    assert not any(v.apicv_active for v in t.kvm.vcpus)


# -- __kvm_apic_set_base: only an enabled APIC away from the default base inhibits -----------------
def test_disabling_the_apic_with_a_zero_base_does_not_inhibit_avic(monkeypatch):
    """A guest that hardware-disables its APIC writing IA32_APIC_BASE = 0 and re-enables it at
    0xFEE00000 never had an enabled APIC at another base: __kvm_apic_set_base() raises
    APICV_INHIBIT_REASON_APIC_BASE_MODIFIED only for ``enabled && base != APIC_DEFAULT_PHYS_BASE``."""
    progs = [prog(0, [STI, '{ op = "wrmsr", msr = 0x1b, value = 0 }', '{ op = "compute", cycles = 2000 }',
                      '{ op = "wrmsr", msr = 0x1b, value = 0xfee00800 }', '{ op = "compute", cycles = 2000 }'])]
    t = traced(scenario(progs, cpu="zen4", apic="xapic", vcpus=1), monkeypatch=monkeypatch)
    assert t.result["errors"] == []
    assert "APIC_BASE_MODIFIED" not in t.result["inhibits"]
