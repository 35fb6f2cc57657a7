"""Intel VMX APIC virtualisation silicon: posted-interrupt descriptors, the IPIv PID-pointer table,
virtualised ICR writes and posted-interrupt processing (digest §7; SDM vol. 3C ch. 30/31).

Posted-interrupt descriptor (64-byte aligned, in host memory)::

    bytes 0-31   PIR   256-bit posted-interrupt requests
    byte  32     control qword: bit 0 ON (outstanding notification), bit 1 SN (suppress notification),
                 bits 23:16 NV (notification vector), bits 63:32 NDST (notification destination;
                 xAPIC form = APIC ID in bits 15:8, i.e. (id << 8) & 0xFF00)

PID-pointer table: one u64 per guest APIC ID, entry = PID physical address | bit 0 valid
(``PID_TABLE_ENTRY_VALID``); LAST_PID_POINTER_INDEX bounds the index.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from navic.apic.registers import APIC_ICR, APIC_ICR2, APIC_IRR, ICR_BUSY
from navic.hw.memory import HostMemory

# --- VMCS encodings and controls used here --------------------------------------------------------
POSTED_INTR_NV = 0x0002
LAST_PID_POINTER_INDEX = 0x0008
GUEST_INTR_STATUS = 0x0810
POSTED_INTR_DESC_ADDR = 0x2016
PID_POINTER_TABLE = 0x2042
TERTIARY_EXEC_IPI_VIRT = 1 << 4
PIN_BASED_POSTED_INTR = 1 << 7

# Linux host vectors (arch/x86/include/asm/irq_vectors.h)
POSTED_INTR_VECTOR = 0xF2
POSTED_INTR_WAKEUP_VECTOR = 0xF1
POSTED_INTR_NESTED_VECTOR = 0xF0

# --- PID layout -----------------------------------------------------------------------------------
PID_SIZE = 64
PID_PIR = 0
PID_CONTROL = 32
POSTED_INTR_ON = 0  # bit numbers in the control qword
POSTED_INTR_SN = 1
PID_ON = 1 << POSTED_INTR_ON
PID_SN = 1 << POSTED_INTR_SN
PID_NV_SHIFT = 16
PID_NV_MASK = 0xFF << PID_NV_SHIFT
PID_NDST_SHIFT = 32
PID_NDST_MASK = 0xFFFFFFFF << PID_NDST_SHIFT
PID_TABLE_ENTRY_VALID = 1
PID_ADDR_MASK = ((1 << 52) - 1) & ~(PID_SIZE - 1)

# --- exit reasons (uapi/asm/vmx.h numbers; names = KVM's VMX_EXIT_REASONS strings, lower-cased) -----
EXIT_REASON_EXCEPTION_NMI = 0
EXIT_REASON_EXTERNAL_INTERRUPT = 1
EXIT_REASON_TRIPLE_FAULT = 2
EXIT_REASON_INIT_SIGNAL = 3
EXIT_REASON_SIPI_SIGNAL = 4
EXIT_REASON_INTERRUPT_WINDOW = 7
EXIT_REASON_NMI_WINDOW = 8
EXIT_REASON_CPUID = 10
EXIT_REASON_HLT = 12
EXIT_REASON_VMCALL = 18
EXIT_REASON_VMLAUNCH = 20
EXIT_REASON_VMRESUME = 24
EXIT_REASON_CR_ACCESS = 28
EXIT_REASON_IO_INSTRUCTION = 30
EXIT_REASON_MSR_READ = 31
EXIT_REASON_MSR_WRITE = 32
EXIT_REASON_INVALID_STATE = 33
EXIT_REASON_PAUSE_INSTRUCTION = 40
EXIT_REASON_TPR_BELOW_THRESHOLD = 43
EXIT_REASON_APIC_ACCESS = 44
EXIT_REASON_EOI_INDUCED = 45
EXIT_REASON_EPT_VIOLATION = 48
EXIT_REASON_EPT_MISCONFIG = 49
EXIT_REASON_PREEMPTION_TIMER = 52
EXIT_REASON_APIC_WRITE = 56
EXIT_REASON_NOTIFY = 75

EXIT_REASON_NAMES: dict[int, str] = {
    0: "exception_nmi", 1: "external_interrupt", 2: "triple_fault", 3: "init_signal", 4: "sipi_signal",
    7: "interrupt_window", 8: "nmi_window", 9: "task_switch", 10: "cpuid", 12: "hlt", 13: "invd",
    14: "invlpg", 15: "rdpmc", 16: "rdtsc", 18: "vmcall", 19: "vmclear", 20: "vmlaunch", 21: "vmptrld",
    22: "vmptrst", 23: "vmread", 24: "vmresume", 25: "vmwrite", 26: "vmoff", 27: "vmon", 28: "cr_access",
    29: "dr_access", 30: "io_instruction", 31: "msr_read", 32: "msr_write", 33: "invalid_state",
    34: "msr_load_fail", 36: "mwait_instruction", 37: "monitor_trap_flag", 39: "monitor_instruction",
    40: "pause_instruction", 41: "mce_during_vmentry", 43: "tpr_below_threshold", 44: "apic_access",
    45: "eoi_induced", 46: "gdtr_idtr", 47: "ldtr_tr", 48: "ept_violation", 49: "ept_misconfig",
    50: "invept", 51: "rdtscp", 52: "preemption_timer", 53: "invvpid", 54: "wbinvd", 55: "xsetbv",
    56: "apic_write", 57: "rdrand", 58: "invpcid", 59: "vmfunc", 60: "encls", 61: "rdseed",
    62: "pml_full", 63: "xsaves", 64: "xrstors", 67: "umwait", 68: "tpause", 74: "bus_lock", 75: "notify",
}


def exit_reason_name(reason: int) -> str:
    return EXIT_REASON_NAMES.get(reason & 0xFFFF, f"unknown_{reason}")


class VmxExit:
    """A VM exit produced by the VMX APIC-virtualisation hardware (basic reason + qualification)."""

    __slots__ = ("reason", "qualification")

    def __init__(self, reason: int, qualification: int = 0) -> None:
        self.reason = reason
        self.qualification = qualification

    def __repr__(self) -> str:
        return f"VmxExit({self.name}, {self.qualification:#x})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VmxExit) and (self.reason, self.qualification) == (
            other.reason, other.qualification)

    def __hash__(self) -> int:
        return hash((self.reason, self.qualification))

    @property
    def name(self) -> str:
        return exit_reason_name(self.reason)


def ndst_for(apic_id: int, x2apic: bool) -> int:
    """NDST encoding of a host APIC ID: x2APIC = the 32-bit ID; xAPIC = (id << 8) & 0xFF00."""
    return apic_id & 0xFFFFFFFF if x2apic else (apic_id << 8) & 0xFF00


def ndst_to_apic_id(ndst: int, x2apic: bool) -> int:
    return ndst if x2apic else (ndst >> 8) & 0xFF


class PostedInterruptDesc:
    """A posted-interrupt descriptor at ``hpa`` (64-byte aligned) in host memory."""

    __slots__ = ("mem", "hpa")

    def __init__(self, mem: HostMemory, hpa: int) -> None:
        if hpa & (PID_SIZE - 1):
            raise ValueError(f"PID address {hpa:#x} is not 64-byte aligned")
        mem.page(hpa)
        self.mem = mem
        self.hpa = hpa

    def __repr__(self) -> str:
        return f"<PID @{self.hpa:#x} ON={int(self.on)} SN={int(self.sn)} NV={self.nv:#x} NDST={self.ndst:#x}>"

    # -- PIR ------------------------------------------------------------------------------------
    def pir_test(self, vector: int) -> bool:
        return self.mem.test_bit(self.hpa, vector & 0xFF)

    def pir_set(self, vector: int) -> bool:
        """Atomic test-and-set of PIR[vector]; returns the old bit."""
        return self.mem.set_bit(self.hpa, vector & 0xFF)

    @property
    def pir(self) -> int:
        """The 256-bit PIR as an int (bit v = vector v)."""
        p = self.mem.page(self.hpa)
        o = self.hpa & 0xFFF
        return int.from_bytes(p[o : o + 32], "little")

    def pir_pending(self) -> bool:
        return self.pir != 0

    def pir_take(self) -> int:
        """Atomically fetch and clear the PIR (the xchg of posted-interrupt processing)."""
        v = self.pir
        if v:
            for k in range(4):
                if (v >> (64 * k)) & U64:
                    self.mem.write64(self.hpa + 8 * k, 0)
        return v

    # -- control qword ---------------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self.mem.read64(self.hpa + PID_CONTROL)

    @control.setter
    def control(self, value: int) -> None:
        self.mem.write64(self.hpa + PID_CONTROL, value)

    @property
    def on(self) -> bool:
        return bool(self.control & PID_ON)

    @on.setter
    def on(self, v: bool) -> None:
        c = self.control
        self.control = c | PID_ON if v else c & ~PID_ON

    @property
    def sn(self) -> bool:
        return bool(self.control & PID_SN)

    @sn.setter
    def sn(self, v: bool) -> None:
        c = self.control
        self.control = c | PID_SN if v else c & ~PID_SN

    @property
    def nv(self) -> int:
        return (self.control & PID_NV_MASK) >> PID_NV_SHIFT

    @nv.setter
    def nv(self, v: int) -> None:
        self.control = (self.control & ~PID_NV_MASK) | ((v & 0xFF) << PID_NV_SHIFT)

    @property
    def ndst(self) -> int:
        return self.control >> PID_NDST_SHIFT

    @ndst.setter
    def ndst(self, v: int) -> None:
        self.control = (self.control & ~PID_NDST_MASK) | ((v & 0xFFFFFFFF) << PID_NDST_SHIFT)

    def test_and_set_on(self) -> bool:
        return self.mem.set_bit(self.hpa + PID_CONTROL, POSTED_INTR_ON)

    # -- posting -----------------------------------------------------------------------------------
    def post(self, vector: int) -> bool:
        """KVM's software posting (``vmx_deliver_posted_interrupt``): set PIR[vector]; if it was
        clear, test-and-set ON.  Returns True iff a notification must be sent (PIR bit newly set and
        ON was clear).  SN is not consulted (KVM decides from ``vcpu->mode`` whether to send)."""
        if self.pir_set(vector):
            return False
        return not self.test_and_set_on()

    def hw_post_control(self) -> bool:
        """The hardware (IPIv / VT-d) control update after a PIR bit was set: if ON = 0 and SN = 0, set
        ON and return True (send notification NV to NDST); otherwise change nothing, return False."""
        c = self.control
        if c & (PID_ON | PID_SN):
            return False
        self.control = c | PID_ON
        return True


U64 = (1 << 64) - 1


def pid_table_entry(pid_hpa: int) -> int:
    return (pid_hpa & PID_ADDR_MASK) | PID_TABLE_ENTRY_VALID


Notify = Callable[[int, int], None]  # notify(nv, ndst)


def ipiv_icr_write(mem: HostMemory, pid_table_hpa: int, last_index: int, icr_lo: int, icr_hi: int,
                   x2apic: bool, notify: Notify, *, self_ipi: Callable[[int], None] | None = None,
                   vapic_page: bytearray | None = None,
                   pir_set: Callable[[int, int, int], None] | None = None,
                   fine_grained: bool = True) -> Generator[int, Any, VmxExit | None]:
    """A guest ICR write with APIC-register virtualisation, virtual-interrupt delivery and IPI
    virtualisation enabled (xAPIC: write to VICR_LO with ``icr_hi`` = VICR_HI; x2APIC: WRMSR 830h).

    * If ``vapic_page`` is given the value first lands in the virtual-APIC page (300h, and 310h for
      x2APIC).
    * ICR reserved bits (31:20, 17:16, 13) must be 0, trigger edge, delivery mode Fixed, vector >= 16.
    * Shorthand self → self-IPI virtualisation via ``self_ipi(vector)`` (if None: APIC-write exit).
    * No shorthand + physical destination: dest ≤ ``last_index`` and a valid PID-pointer entry →
      IPI virtualisation: set PIR[vector] (step; ``pir_set(pid_hpa, vector, dest)`` is told), then
      the control update: if ON = 0 and SN = 0 set ON and ``notify(NV, NDST)`` (step).
    * Everything else (logical, broadcast, other shorthands, NMI/INIT/SIPI, level, out-of-range or
      invalid entry) → trap-like APIC-write VM exit (reason 56, qualification 300h).
    """
    icr_lo &= 0xFFFFFFFF
    icr_hi &= 0xFFFFFFFF
    if vapic_page is not None:
        vapic_page[APIC_ICR : APIC_ICR + 4] = (icr_lo & ~ICR_BUSY).to_bytes(4, "little")
        if x2apic:
            vapic_page[APIC_ICR2 : APIC_ICR2 + 4] = icr_hi.to_bytes(4, "little")
    apic_write = VmxExit(EXIT_REASON_APIC_WRITE, APIC_ICR)
    vector = icr_lo & 0xFF
    if icr_lo & 0xFFF32000 or vector < 16 or (icr_lo >> 15) & 1 or (icr_lo >> 8) & 7:
        return apic_write
    sh = (icr_lo >> 18) & 3
    if sh == 1:
        if self_ipi is None:
            return apic_write
        self_ipi(vector)
        return None
    if sh != 0 or (icr_lo >> 11) & 1:
        return apic_write
    dest = icr_hi if x2apic else icr_hi >> 24
    if dest > last_index:
        return apic_write
    entry = mem.read64(pid_table_hpa + 8 * dest)
    if not entry & PID_TABLE_ENTRY_VALID:
        return apic_write
    pid = PostedInterruptDesc(mem, entry & PID_ADDR_MASK)
    pid.pir_set(vector)
    if pir_set is not None:
        pir_set(pid.hpa, vector, dest)
    if fine_grained:
        yield 0
    if pid.hw_post_control():
        notify(pid.nv, pid.ndst)
    if fine_grained:
        yield 0
    return None


def process_posted_interrupts(pid: PostedInterruptDesc, vapic_page: bytearray, rvi: int) -> int:
    """Posted-interrupt processing at the target (SDM 30.6; the physical EOI is the caller's):
    clear ON, move PIR into VIRR (OR, PIR cleared), RVI = max(RVI, highest vector moved).
    Returns the new RVI (GUEST_INTR_STATUS[7:0])."""
    c = pid.control
    if c & PID_ON:
        pid.control = c & ~PID_ON
    pir = pid.pir_take()
    if not pir:
        return rvi
    for i in range(8):
        w = (pir >> (32 * i)) & 0xFFFFFFFF
        if w:
            o = APIC_IRR + 0x10 * i
            cur = int.from_bytes(vapic_page[o : o + 4], "little")
            vapic_page[o : o + 4] = (cur | w).to_bytes(4, "little")
    return max(rvi, pir.bit_length() - 1)
