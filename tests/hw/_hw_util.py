"""Hand-built AVIC VMs for the silicon tests: host memory, one physical (and logical) APIC ID table,
one backing page and one VMCB per vCPU, recording doorbells and hardware IRR sets."""

from __future__ import annotations

from typing import Any

from navic.apic.registers import APIC_DFR, APIC_IRR
from navic.hw.avic import AvicEngine, log_entry, phys_entry, phys_table_pages, run_to_completion
from navic.hw.errata import Erratum1235
from navic.hw.features import features_for
from navic.hw.memory import HostMemory
from navic.hw.vmcb import AVIC_ENABLE_MASK, X2APIC_MODE_MASK, Vmcb


def icr(vector: int, dm: int = 0, logical: int = 0, trig: int = 0, sh: int = 0, level: int = 1) -> int:
    return (vector & 0xFF) | dm << 8 | logical << 11 | level << 14 | trig << 15 | sh << 18


def irr_bit(page: bytearray, vector: int) -> bool:
    o = APIC_IRR + 0x10 * (vector >> 5)
    return bool(int.from_bytes(page[o : o + 4], "little") >> (vector & 31) & 1)


class Vm:
    def __init__(self, n: int, *, x2: bool = False, cpu: str = "zen4", max_index: int | None = None,
                 erratum: Erratum1235 | None = None, fine_grained: bool = True,
                 host_base: int = 100, flat: bool = True) -> None:
        self.mem = mem = HostMemory()
        self.features = features_for(cpu)
        self.n = n
        self.x2 = x2
        self.max_index = n - 1 if max_index is None else max_index
        self.table = mem.alloc(phys_table_pages(self.max_index))
        self.ltable = mem.alloc()
        self.pages = [mem.alloc() for _ in range(n)]
        self.host = [host_base + i for i in range(n)]
        self.doorbells: list[int] = []
        self.irr_log: list[tuple[int, int, int]] = []
        self.avic = AvicEngine(mem, self.features, self.doorbells.append,
                               lambda b, v, i: self.irr_log.append((b, v, i)), erratum=erratum,
                               fine_grained=fine_grained)
        self.vmcbs = []
        for i in range(n):
            v = Vmcb(mem, mem.alloc())
            v.int_ctl = AVIC_ENABLE_MASK | (X2APIC_MODE_MASK if x2 else 0)
            v.backing_page_hpa = self.pages[i]
            v.physical_table_hpa = self.table
            v.max_index = self.max_index
            v.logical_table_hpa = self.ltable
            self.vmcbs.append(v)
            mem.write64(self.table + 8 * i, phys_entry(self.pages[i], self.host[i], running=True))
            mem.write32(self.pages[i] + APIC_DFR, 0xFFFFFFFF if flat else 0x0FFFFFFF)

    def set_entry(self, i: int, *, running: bool = True, valid: bool = True,
                  host_id: int | None = None) -> None:
        hid = self.host[i] if host_id is None else host_id
        self.mem.write64(self.table + 8 * i, phys_entry(self.pages[i], hid, running=running, valid=valid))

    def set_logical(self, index: int, guest_phys_id: int, valid: bool = True) -> None:
        self.mem.write32(self.ltable + 4 * index, log_entry(guest_phys_id, valid))

    def irr(self, i: int, vector: int) -> bool:
        return irr_bit(self.mem.page(self.pages[i]), vector)

    def irr_targets(self, vector: int) -> list[int]:
        return [i for i in range(self.n) if self.irr(i, vector)]

    def gen(self, src: int, icr_lo: int, icr_hi: int = 0) -> Any:
        hi = icr_hi if self.x2 else icr_hi << 24
        return self.avic.icr_write(self.vmcbs[src], src, self.host[src], icr_lo, hi)

    def send(self, src: int, icr_lo: int, icr_hi: int = 0) -> Any:
        """icr_hi = destination (8-bit xAPIC, shifted into ICR2[31:24] here; 32-bit x2APIC)."""
        return run_to_completion(self.gen(src, icr_lo, icr_hi))
