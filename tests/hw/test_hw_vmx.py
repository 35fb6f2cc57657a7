"""Posted-interrupt descriptor layout, IPIv virtualised ICR writes vs APIC-write exits, and
posted-interrupt processing (digest §7)."""

from __future__ import annotations

import pytest
from _hw_util import icr, irr_bit

from navic.hw.avic import run_to_completion
from navic.hw.memory import HostMemory
from navic.hw.vmx import (
    EXIT_REASON_APIC_WRITE,
    EXIT_REASON_NAMES,
    PID_TABLE_ENTRY_VALID,
    PostedInterruptDesc,
    VmxExit,
    ipiv_icr_write,
    ndst_for,
    pid_table_entry,
    process_posted_interrupts,
)

NV = 0xF2


def test_pid_control_layout():
    mem = HostMemory()
    base = mem.alloc()
    pid = PostedInterruptDesc(mem, base + 64)
    pid.on = True
    assert mem.read64(base + 64 + 32) == 1
    pid.sn = True
    assert mem.read64(base + 96) == 3
    pid.nv = 0xF2
    assert mem.page(base)[64 + 34] == 0xF2 and mem.read64(base + 96) == 0xF20003
    pid.ndst = 0x1234
    assert mem.read64(base + 96) == 0x00001234_00F20003
    pid.on = False
    pid.sn = False
    assert (pid.on, pid.sn, pid.nv, pid.ndst) == (False, False, 0xF2, 0x1234)
    assert ndst_for(5, x2apic=False) == 0x500 and ndst_for(0x1234, x2apic=True) == 0x1234
    with pytest.raises(ValueError):
        PostedInterruptDesc(mem, base + 8)


def test_pir_bits_and_software_post():
    mem = HostMemory()
    pid = PostedInterruptDesc(mem, mem.alloc())
    assert pid.post(0x41) is True  # new bit, ON was clear -> notify
    assert mem.read64(pid.hpa + 8) == 1 << 1  # vector 0x41 = bit 65 -> qword 1 bit 1
    assert pid.on
    assert pid.post(0x42) is False  # ON already set
    assert pid.post(0x41) is False  # PIR bit already set
    assert pid.pir == (1 << 0x41) | (1 << 0x42)


class Ipiv:
    def __init__(self, n=4, x2=False):
        self.mem = mem = HostMemory()
        self.table = mem.alloc()
        self.pids = []
        for i in range(n):
            pid = PostedInterruptDesc(mem, mem.alloc())
            pid.nv = NV
            pid.ndst = ndst_for(50 + i, x2)
            self.pids.append(pid)
            mem.write64(self.table + 8 * i, pid_table_entry(pid.hpa))
        self.x2 = x2
        self.last = n - 1
        self.notes = []
        self.selfs = []

    def send(self, lo, dest, **kw):
        hi = dest if self.x2 else dest << 24
        return run_to_completion(ipiv_icr_write(self.mem, self.table, self.last, lo, hi, self.x2,
                                                lambda nv, nd: self.notes.append((nv, nd)),
                                                self_ipi=self.selfs.append, **kw))


def test_pid_table_entry_valid_bit():
    assert PID_TABLE_ENTRY_VALID == 1 and pid_table_entry(0x1000) == 0x1001


def test_ipiv_virtualises_physical_fixed_edge_unicast():
    s = Ipiv()
    assert s.send(icr(0x30), 2) is None
    assert s.pids[2].pir_test(0x30) and s.pids[2].on
    assert s.notes == [(NV, 52 << 8)]
    assert s.send(icr(0x31), 2) is None  # ON already set: PIR only, no second notification
    assert s.notes == [(NV, 52 << 8)] and s.pids[2].pir_test(0x31)


def test_ipiv_sn_suppresses_notification_and_on():
    s = Ipiv(x2=True)
    s.pids[1].sn = True
    assert s.send(icr(0x30), 1) is None
    assert s.pids[1].pir_test(0x30) and not s.pids[1].on and s.notes == []


def test_ipiv_steps():
    s = Ipiv()
    g = ipiv_icr_write(s.mem, s.table, s.last, icr(0x30), 1 << 24, False, lambda nv, nd: s.notes.append(nd))
    next(g)
    assert s.pids[1].pir_test(0x30) and not s.pids[1].on  # PIR set; ON not yet
    run_to_completion(g)
    assert s.pids[1].on and s.notes == [51 << 8]


@pytest.mark.parametrize("lo,dest", [
    (icr(0x30, logical=1), 1),  # logical
    (icr(0x30, sh=2), 0),  # all including self
    (icr(0x30, sh=3), 0),  # all excluding self
    (icr(0x30, dm=4), 1),  # NMI
    (icr(0x30, dm=5), 1),  # INIT
    (icr(0x30, dm=1), 1),  # lowest priority
    (icr(0x30, trig=1), 1),  # level
    (icr(0x0F), 1),  # vector < 16
    (icr(0x30), 4),  # beyond LAST_PID_POINTER_INDEX
    (icr(0x30), 0xFF),  # xAPIC broadcast
])
def test_ipiv_apic_write_exits(lo, dest):
    s = Ipiv()
    r = s.send(lo, dest)
    assert r == VmxExit(EXIT_REASON_APIC_WRITE, 0x300)
    assert r.name == "apic_write" and r.reason == 56
    assert all(p.pir == 0 for p in s.pids) and s.notes == []


def test_ipiv_invalid_entry_exits():
    s = Ipiv()
    s.mem.write64(s.table + 8, s.pids[1].hpa)  # valid bit clear
    assert s.send(icr(0x30), 1) == VmxExit(56, 0x300)


def test_self_ipi_virtualisation_and_vicr_write():
    s = Ipiv(x2=True)
    page = bytearray(4096)
    assert s.send(icr(0x33, sh=1), 0, vapic_page=page) is None
    assert s.selfs == [0x33] and s.notes == []
    assert int.from_bytes(page[0x300:0x304], "little") == icr(0x33, sh=1)


def test_process_posted_interrupts_moves_pir_to_virr_and_rvi():
    mem = HostMemory()
    pid = PostedInterruptDesc(mem, mem.alloc())
    pid.post(0x31)
    pid.post(0x81)
    page = bytearray(4096)
    page[0x200 + 0x10 * 1] = 1  # vector 32 already pending
    rvi = process_posted_interrupts(pid, page, 0x20)
    assert rvi == 0x81
    assert irr_bit(page, 0x31) and irr_bit(page, 0x81) and irr_bit(page, 0x20)
    assert pid.pir == 0 and not pid.on
    assert process_posted_interrupts(pid, page, 0x90) == 0x90


def test_exit_reason_names():
    for n, name in {1: "external_interrupt", 12: "hlt", 32: "msr_write", 45: "eoi_induced",
                    56: "apic_write", 44: "apic_access", 48: "ept_violation"}.items():
        assert EXIT_REASON_NAMES[n] == name
