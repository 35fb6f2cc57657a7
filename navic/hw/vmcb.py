"""The SVM VMCB as a view on a 4 KiB page of :class:`~navic.hw.memory.HostMemory` (digest §2).

Offsets and bits follow Linux ``arch/x86/include/asm/svm.h`` (``struct vmcb_control_area``) and the
APM Table B-1.  Because the VMCB is just memory, an L1 hypervisor's vmcb12 can live in L1 memory and
L0 reads it with the same class (pass the HPA that backs it); writes go through
``HostMemory.write*`` so write observers see them.

Reads are one element of the page's cached word views (``mem.views``: the frame and its u16 / u32 /
u64 ``memoryview`` casts, for a :class:`HostMemory` or a guest memory through its NPT), i.e. the
same little-endian bytes ``mem.read`` returns, without the accessor calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from navic.hw.memory import _SIZE_K, PAGE_MASK, PAGE_SHIFT, HostMemory

if TYPE_CHECKING:
    from navic.hw.features import CpuFeatures

U64_MASK = (1 << 64) - 1

# --- intercept bits (bit number = 32 * word + bit; word w lives at byte offset 4 * w) -------------
INTERCEPT_CR8_READ = 8
INTERCEPT_CR8_WRITE = 16 + 8
INTERCEPT_INTR = 96
INTERCEPT_NMI = 97
INTERCEPT_SMI = 98
INTERCEPT_INIT = 99
INTERCEPT_VINTR = 100
INTERCEPT_CPUID = 96 + 18
INTERCEPT_IRET = 96 + 20
INTERCEPT_PAUSE = 96 + 23
INTERCEPT_HLT = 96 + 24
INTERCEPT_IOIO_PROT = 96 + 27
INTERCEPT_MSR_PROT = 96 + 28
INTERCEPT_SHUTDOWN = 96 + 31
INTERCEPT_VMRUN = 128
INTERCEPT_VMMCALL = 129
INTERCEPT_VMLOAD = 130
INTERCEPT_VMSAVE = 131
INTERCEPT_STGI = 132
INTERCEPT_CLGI = 133
INTERCEPT_IDLE_HLT = 166

# --- control-area offsets -------------------------------------------------------------------------
VMCB_INTERCEPTS = 0x00  # 6 x u32
VMCB_PAUSE_FILTER_THRESH = 0x3C
VMCB_PAUSE_FILTER_COUNT = 0x3E
VMCB_IOPM_BASE_PA = 0x40
VMCB_MSRPM_BASE_PA = 0x48
VMCB_TSC_OFFSET = 0x50
VMCB_ASID = 0x58
VMCB_TLB_CTL = 0x5C
VMCB_INT_CTL = 0x60
VMCB_INT_VECTOR = 0x64
VMCB_INT_STATE = 0x68
VMCB_EXIT_CODE = 0x70
VMCB_EXIT_INFO_1 = 0x78
VMCB_EXIT_INFO_2 = 0x80
VMCB_EXIT_INT_INFO = 0x88
VMCB_EXIT_INT_INFO_ERR = 0x8C
VMCB_NESTED_CTL = 0x90
VMCB_AVIC_VAPIC_BAR = 0x98
VMCB_GHCB_GPA = 0xA0
VMCB_EVENT_INJ = 0xA8
VMCB_EVENT_INJ_ERR = 0xAC
VMCB_NESTED_CR3 = 0xB0
VMCB_VIRT_EXT = 0xB8
VMCB_CLEAN = 0xC0
VMCB_NEXT_RIP = 0xC8
VMCB_INSN_LEN = 0xD0
VMCB_AVIC_BACKING_PAGE = 0xE0
VMCB_AVIC_LOGICAL_ID = 0xF0
VMCB_AVIC_PHYSICAL_ID = 0xF8
VMCB_SAVE_AREA = 0x400
# save area (offsets from the start of the VMCB)
VMCB_SAVE_CPL = 0x400 + 0xCB
VMCB_SAVE_EFER = 0x400 + 0xD0
VMCB_SAVE_CR4 = 0x400 + 0x148
VMCB_SAVE_CR3 = 0x400 + 0x150
VMCB_SAVE_CR0 = 0x400 + 0x158
VMCB_SAVE_RFLAGS = 0x400 + 0x170
VMCB_SAVE_RIP = 0x400 + 0x178
VMCB_SAVE_RSP = 0x400 + 0x1D8
VMCB_SAVE_RAX = 0x400 + 0x1F8

# --- int_ctl (060h) -------------------------------------------------------------------------------
V_TPR_MASK = 0x0F  # KVM uses 3:0; field is 7:0 with 7:4 SBZ
V_TPR_FIELD_MASK = 0xFF
V_IRQ_SHIFT = 8
V_IRQ_MASK = 1 << 8
V_GIF_MASK = 1 << 9
V_NMI_PENDING_MASK = 1 << 11
V_NMI_BLOCKING_MASK = 1 << 12
V_INTR_PRIO_SHIFT = 16
V_INTR_PRIO_MASK = 0x0F << 16
V_IGN_TPR_SHIFT = 20
V_IGN_TPR_MASK = 1 << 20
V_IRQ_INJECTION_BITS_MASK = V_IRQ_MASK | V_INTR_PRIO_MASK | V_IGN_TPR_MASK
V_INTR_MASKING_SHIFT = 24
V_INTR_MASKING_MASK = 1 << 24
V_GIF_ENABLE_MASK = 1 << 25
V_NMI_ENABLE_MASK = 1 << 26
X2APIC_MODE_SHIFT = 30
X2APIC_MODE_MASK = 1 << 30
AVIC_ENABLE_SHIFT = 31
AVIC_ENABLE_MASK = 1 << 31
SVM_INT_VECTOR_MASK = 0xFF

# --- nested_ctl (090h) ------------------------------------------------------------------------------
SVM_NESTED_CTL_NP_ENABLE = 1 << 0
SVM_NESTED_CTL_SEV_ENABLE = 1 << 1
SVM_NESTED_CTL_SEV_ES_ENABLE = 1 << 2

# --- tlb_ctl ---------------------------------------------------------------------------------------
TLB_CONTROL_DO_NOTHING = 0
TLB_CONTROL_FLUSH_ALL_ASID = 1
TLB_CONTROL_FLUSH_ASID = 3
TLB_CONTROL_FLUSH_ASID_LOCAL = 7

# --- EVENTINJ (0A8h) ------------------------------------------------------------------------------
SVM_EVTINJ_VEC_MASK = 0xFF
SVM_EVTINJ_TYPE_SHIFT = 8
SVM_EVTINJ_TYPE_MASK = 7 << 8
SVM_EVTINJ_TYPE_INTR = 0 << 8
SVM_EVTINJ_TYPE_NMI = 2 << 8
SVM_EVTINJ_TYPE_EXEPT = 3 << 8
SVM_EVTINJ_TYPE_SOFT = 4 << 8
SVM_EVTINJ_VALID = 1 << 31
SVM_EVTINJ_VALID_ERR = 1 << 11

# --- clean bits (0C0h; KVM enum in arch/x86/kvm/svm/svm.h) -----------------------------------------
VMCB_CLEAN_INTERCEPTS = 0
VMCB_CLEAN_PERM_MAP = 1
VMCB_CLEAN_ASID = 2
VMCB_CLEAN_INTR = 3
VMCB_CLEAN_NPT = 4
VMCB_CLEAN_CR = 5
VMCB_CLEAN_DR = 6
VMCB_CLEAN_DT = 7
VMCB_CLEAN_SEG = 8
VMCB_CLEAN_CR2 = 9
VMCB_CLEAN_LBR = 10
VMCB_CLEAN_AVIC = 11
VMCB_CLEAN_SW = 31
# KVM's names
VMCB_INTR = VMCB_CLEAN_INTR
VMCB_AVIC = VMCB_CLEAN_AVIC

# --- AVIC pointer fields ----------------------------------------------------------------------------
AVIC_HPA_MASK = ~((0xFFF << 52) | 0xFFF) & U64_MASK  # bits 51:12
VMCB_AVIC_APIC_BAR_MASK = 0xFFFFFFFFFF000
AVIC_PHYSICAL_MAX_INDEX_MASK = 0xFFF  # 11:0 of 0F8h

# --- exit codes (uapi/asm/svm.h) ----------------------------------------------------------------------
SVM_EXIT_READ_CR8 = 0x008
SVM_EXIT_WRITE_CR8 = 0x018
SVM_EXIT_EXCP_BASE = 0x040
SVM_EXIT_INTR = 0x060
SVM_EXIT_NMI = 0x061
SVM_EXIT_SMI = 0x062
SVM_EXIT_INIT = 0x063
SVM_EXIT_VINTR = 0x064
SVM_EXIT_CPUID = 0x072
SVM_EXIT_IRET = 0x074
SVM_EXIT_PAUSE = 0x077
SVM_EXIT_HLT = 0x078
SVM_EXIT_IOIO = 0x07B
SVM_EXIT_MSR = 0x07C
SVM_EXIT_SHUTDOWN = 0x07F
SVM_EXIT_VMRUN = 0x080
SVM_EXIT_VMMCALL = 0x081
SVM_EXIT_VMLOAD = 0x082
SVM_EXIT_VMSAVE = 0x083
SVM_EXIT_STGI = 0x084
SVM_EXIT_CLGI = 0x085
SVM_EXIT_NPF = 0x400
SVM_EXIT_AVIC_INCOMPLETE_IPI = 0x401
SVM_EXIT_AVIC_UNACCELERATED_ACCESS = 0x402
SVM_EXIT_VMGEXIT = 0x403
SVM_EXIT_ERR = U64_MASK  # -1 as u64
VMEXIT_INVALID = SVM_EXIT_ERR

# KVM's SVM_EXIT_REASONS strings, as its kvm_exit / kvm_nested_vmexit tracepoints print them.
EXIT_NAMES: dict[int, str] = {
    0x000: "read_cr0", 0x002: "read_cr2", 0x003: "read_cr3", 0x004: "read_cr4", 0x008: "read_cr8",
    0x010: "write_cr0", 0x012: "write_cr2", 0x013: "write_cr3", 0x014: "write_cr4", 0x018: "write_cr8",
    **{0x020 + i: f"read_dr{i}" for i in range(8)},
    **{0x030 + i: f"write_dr{i}" for i in range(8)},
    **{SVM_EXIT_EXCP_BASE + v: f"{n} excp" for v, n in (
        (0, "DE"), (1, "DB"), (3, "BP"), (4, "OF"), (5, "BR"), (6, "UD"), (7, "NM"), (8, "DF"),
        (10, "TS"), (11, "NP"), (12, "SS"), (13, "GP"), (14, "PF"), (16, "MF"), (17, "AC"), (18, "MC"),
        (19, "XF"))},
    0x060: "interrupt", 0x061: "nmi", 0x062: "smi", 0x063: "init", 0x064: "vintr",
    0x065: "cr0_sel_write", 0x066: "read_idtr", 0x067: "read_gdtr", 0x068: "read_ldtr", 0x069: "read_rt",
    0x06A: "write_idtr", 0x06B: "write_gdtr", 0x06C: "write_ldtr", 0x06D: "write_rt", 0x06E: "rdtsc",
    0x06F: "rdpmc", 0x070: "pushf", 0x071: "popf", 0x072: "cpuid", 0x073: "rsm", 0x074: "iret",
    0x075: "swint", 0x076: "invd", 0x077: "pause", 0x078: "hlt", 0x079: "invlpg", 0x07A: "invlpga",
    0x07B: "io", 0x07C: "msr", 0x07D: "task_switch", 0x07E: "ferr_freeze", 0x07F: "shutdown",
    0x080: "vmrun", 0x081: "hypercall", 0x082: "vmload", 0x083: "vmsave", 0x084: "stgi", 0x085: "clgi",
    0x086: "skinit", 0x087: "rdtscp", 0x088: "icebp", 0x089: "wbinvd", 0x08A: "monitor", 0x08B: "mwait",
    0x08D: "xsetbv",
    0x400: "npf", 0x401: "avic_incomplete_ipi", 0x402: "avic_unaccelerated_access", 0x403: "vmgexit",
    SVM_EXIT_ERR: "invalid_guest_state",
}


def exit_name(code: int) -> str:
    code &= U64_MASK
    try:
        return EXIT_NAMES[code]
    except KeyError:
        return f"unknown_{code:#x}"


_Q_EXIT_CODE = VMCB_EXIT_CODE >> 3
_Q_EXIT_INFO_1 = VMCB_EXIT_INFO_1 >> 3
_Q_EXIT_INFO_2 = VMCB_EXIT_INFO_2 >> 3
_W_EXIT_INT_INFO = VMCB_EXIT_INT_INFO >> 2


class _Field:
    """A little-endian unsigned field of ``size`` bytes at ``off`` in the VMCB page (naturally
    aligned: element ``off >> k`` of the page's view ``k``, ``size == 1 << k``)."""

    __slots__ = ("off", "size", "k", "i")

    def __init__(self, off: int, size: int) -> None:
        if size not in (1, 2, 4, 8) or off & (size - 1):
            raise ValueError("VMCB fields are naturally aligned units of 1, 2, 4 or 8 bytes")
        self.off = off
        self.size = size
        self.k = _SIZE_K[size]
        self.i = off >> self.k

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        # == obj.mem.read(obj.hpa + off, size)
        try:
            return obj.mem._vw[obj.hpa >> PAGE_SHIFT][self.k][self.i]
        except KeyError:   # the page's first access through this memory
            return obj.mem.views(obj.hpa)[self.k][self.i]

    def __set__(self, obj: Any, value: int) -> None:
        obj.mem.write(obj.hpa + self.off, self.size, value)


class _Bits:
    """A bit field ``[hi:lo]`` of the 32-bit field at ``off``."""

    __slots__ = ("off", "lo", "mask", "i")

    def __init__(self, off: int, hi: int, lo: int) -> None:
        self.off = off
        self.lo = lo
        self.mask = ((1 << (hi - lo + 1)) - 1) << lo
        self.i = off >> 2

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        try:
            return (obj.mem._vw[obj.hpa >> PAGE_SHIFT][2][self.i] & self.mask) >> self.lo
        except KeyError:
            return (obj.mem.views(obj.hpa)[2][self.i] & self.mask) >> self.lo

    def __set__(self, obj: Any, value: int) -> None:
        mem = obj.mem
        try:
            cur = mem._vw[obj.hpa >> PAGE_SHIFT][2][self.i]
        except KeyError:
            cur = mem.views(obj.hpa)[2][self.i]
        mem.write(obj.hpa + self.off, 4, (cur & ~self.mask) | ((int(value) << self.lo) & self.mask))


class Vmcb:
    """A VMCB at host-physical address ``hpa`` (4 KiB aligned) in ``mem``."""

    __slots__ = ("mem", "hpa")

    def __init__(self, mem: HostMemory, hpa: int) -> None:
        if hpa & PAGE_MASK:
            raise ValueError(f"VMCB address {hpa:#x} is not 4 KiB aligned")
        mem.page(hpa)  # must be backed
        self.mem = mem
        self.hpa = hpa

    def __repr__(self) -> str:
        return f"<Vmcb @{self.hpa:#x}>"

    @property
    def page(self) -> bytearray:
        return self.mem.page(self.hpa)

    def views(self) -> tuple:
        """The VMCB page's word views (``mem.views``): ``views()[k][off >> k]`` is the
        ``1 << k``-byte field at ``off`` — for reading several fields with one lookup."""
        try:
            return self.mem._vw[self.hpa >> PAGE_SHIFT]
        except KeyError:
            return self.mem.views(self.hpa)

    # -- intercepts ---------------------------------------------------------------------------
    def intercept(self, bit: int) -> bool:
        try:
            w = self.mem._vw[self.hpa >> PAGE_SHIFT][2]
        except KeyError:
            w = self.mem.views(self.hpa)[2]
        return bool(w[bit >> 5] >> (bit & 31) & 1)

    def set_intercept(self, bit: int, on: bool = True) -> None:
        a = self.hpa + 4 * (bit >> 5)
        v = self.mem.read32(a)
        self.mem.write32(a, v | (1 << (bit & 31)) if on else v & ~(1 << (bit & 31)))

    def clr_intercept(self, bit: int) -> None:
        self.set_intercept(bit, False)

    def intercept_word(self, word: int) -> int:
        return self.views()[2][word]

    # -- raw fields -----------------------------------------------------------------------------
    pause_filter_thresh = _Field(VMCB_PAUSE_FILTER_THRESH, 2)
    pause_filter_count = _Field(VMCB_PAUSE_FILTER_COUNT, 2)
    iopm_base_pa = _Field(VMCB_IOPM_BASE_PA, 8)
    msrpm_base_pa = _Field(VMCB_MSRPM_BASE_PA, 8)
    tsc_offset = _Field(VMCB_TSC_OFFSET, 8)
    asid = _Field(VMCB_ASID, 4)
    tlb_ctl = _Field(VMCB_TLB_CTL, 1)
    int_ctl = _Field(VMCB_INT_CTL, 4)
    int_vector = _Field(VMCB_INT_VECTOR, 4)
    int_state = _Field(VMCB_INT_STATE, 4)
    exit_code = _Field(VMCB_EXIT_CODE, 8)
    exit_info_1 = _Field(VMCB_EXIT_INFO_1, 8)
    exit_info_2 = _Field(VMCB_EXIT_INFO_2, 8)
    exit_int_info = _Field(VMCB_EXIT_INT_INFO, 4)
    exit_int_info_err = _Field(VMCB_EXIT_INT_INFO_ERR, 4)
    nested_ctl = _Field(VMCB_NESTED_CTL, 8)
    avic_vapic_bar = _Field(VMCB_AVIC_VAPIC_BAR, 8)
    ghcb_gpa = _Field(VMCB_GHCB_GPA, 8)
    event_inj = _Field(VMCB_EVENT_INJ, 4)
    event_inj_err = _Field(VMCB_EVENT_INJ_ERR, 4)
    nested_cr3 = _Field(VMCB_NESTED_CR3, 8)
    virt_ext = _Field(VMCB_VIRT_EXT, 8)
    clean = _Field(VMCB_CLEAN, 4)
    next_rip = _Field(VMCB_NEXT_RIP, 8)
    insn_len = _Field(VMCB_INSN_LEN, 1)
    avic_backing_page = _Field(VMCB_AVIC_BACKING_PAGE, 8)
    avic_logical_id = _Field(VMCB_AVIC_LOGICAL_ID, 8)
    avic_physical_id = _Field(VMCB_AVIC_PHYSICAL_ID, 8)
    # save area
    cpl = _Field(VMCB_SAVE_CPL, 1)
    efer = _Field(VMCB_SAVE_EFER, 8)
    cr0 = _Field(VMCB_SAVE_CR0, 8)
    cr3 = _Field(VMCB_SAVE_CR3, 8)
    cr4 = _Field(VMCB_SAVE_CR4, 8)
    rflags = _Field(VMCB_SAVE_RFLAGS, 8)
    rip = _Field(VMCB_SAVE_RIP, 8)
    rsp = _Field(VMCB_SAVE_RSP, 8)
    rax = _Field(VMCB_SAVE_RAX, 8)

    # -- int_ctl bit fields --------------------------------------------------------------------
    v_tpr = _Bits(VMCB_INT_CTL, 7, 0)
    v_irq = _Bits(VMCB_INT_CTL, 8, 8)
    v_gif = _Bits(VMCB_INT_CTL, 9, 9)
    v_intr_prio = _Bits(VMCB_INT_CTL, 19, 16)
    v_ign_tpr = _Bits(VMCB_INT_CTL, 20, 20)
    v_intr_masking = _Bits(VMCB_INT_CTL, 24, 24)
    x2avic_enable = _Bits(VMCB_INT_CTL, 30, 30)
    avic_enable = _Bits(VMCB_INT_CTL, 31, 31)
    v_intr_vector = _Bits(VMCB_INT_VECTOR, 7, 0)

    @property
    def np_enable(self) -> bool:
        return bool(self.nested_ctl & SVM_NESTED_CTL_NP_ENABLE)

    @np_enable.setter
    def np_enable(self, on: bool) -> None:
        v = self.nested_ctl
        self.nested_ctl = v | SVM_NESTED_CTL_NP_ENABLE if on else v & ~SVM_NESTED_CTL_NP_ENABLE

    # -- AVIC pointers ------------------------------------------------------------------------
    @property
    def backing_page_hpa(self) -> int:
        return self.avic_backing_page & AVIC_HPA_MASK

    @backing_page_hpa.setter
    def backing_page_hpa(self, hpa: int) -> None:
        self.avic_backing_page = hpa & AVIC_HPA_MASK

    @property
    def logical_table_hpa(self) -> int:
        return self.avic_logical_id & AVIC_HPA_MASK

    @logical_table_hpa.setter
    def logical_table_hpa(self, hpa: int) -> None:
        self.avic_logical_id = hpa & AVIC_HPA_MASK

    @property
    def physical_table_hpa(self) -> int:
        return self.avic_physical_id & AVIC_HPA_MASK

    @physical_table_hpa.setter
    def physical_table_hpa(self, hpa: int) -> None:
        self.avic_physical_id = (hpa & AVIC_HPA_MASK) | (self.avic_physical_id & AVIC_PHYSICAL_MAX_INDEX_MASK)

    @property
    def max_index(self) -> int:
        """AVIC_PHYSICAL_MAX_INDEX (0F8h bits 11:0)."""
        return self.avic_physical_id & AVIC_PHYSICAL_MAX_INDEX_MASK

    @max_index.setter
    def max_index(self, value: int) -> None:
        self.avic_physical_id = (self.avic_physical_id & ~AVIC_PHYSICAL_MAX_INDEX_MASK) | (
            value & AVIC_PHYSICAL_MAX_INDEX_MASK)

    # -- clean bits -----------------------------------------------------------------------------
    def is_clean(self, bit: int) -> bool:
        return bool(self.clean >> bit & 1)

    def mark_dirty(self, bit: int) -> None:
        """KVM's vmcb_mark_dirty: clear clean bit ``bit``."""
        self.clean = self.clean & ~(1 << bit)

    def mark_all_dirty(self) -> None:
        self.clean = 0

    def mark_all_clean(self) -> None:
        """KVM's vmcb_mark_all_clean: all defined clean bits set except VMCB_SW-reserved ones."""
        self.clean = (1 << (VMCB_CLEAN_AVIC + 1)) - 1

    # -- exits ------------------------------------------------------------------------------------
    def set_exit(self, code: int, info1: int = 0, info2: int = 0, int_info: int = 0) -> None:
        w = self.mem.direct_views(self.hpa)
        if w is not None:
            # nobody observes the page: the four field writes below as direct stores
            q = w[3]
            q[_Q_EXIT_CODE] = code & U64_MASK
            q[_Q_EXIT_INFO_1] = info1 & U64_MASK
            q[_Q_EXIT_INFO_2] = info2 & U64_MASK
            w[2][_W_EXIT_INT_INFO] = int_info & 0xFFFFFFFF
            return
        self.exit_code = code & U64_MASK
        self.exit_info_1 = info1 & U64_MASK
        self.exit_info_2 = info2 & U64_MASK
        self.exit_int_info = int_info

    @property
    def exit_reason(self) -> str:
        return exit_name(self.exit_code)


def vmrun_checks(vmcb: Vmcb, features: CpuFeatures) -> str | None:
    """Consistency checks VMRUN performs on the control area (the subset navic models).

    Returns None if VMRUN may proceed, else a short reason; the caller then completes VMRUN with
    ``#VMEXIT(VMEXIT_INVALID)`` (exit code -1).  Checks (APM 15.5.1, 15.29 / digest §2):

    * the VMRUN intercept bit must be set; ASID must not be 0;
    * int_ctl bit 30 (x2AVIC) without bit 31 (AVIC);
    * (model choice) bit 30 on a CPU without x2AVIC;
    * with AVIC enabled: MAX_INDEX > 255 (xAVIC), > 511 (x2AVIC without x2AVIC_EXT), > 4095 (with);
    * with AVIC enabled: backing page / logical table / APIC_BAR (xAVIC only for the last two) not
      4 KiB aligned, or any AVIC pointer above the 52-bit physical-address limit.
    """
    try:   # every field below read from the page's views (vmcb.views(), inline)
        w = vmcb.mem._vw[vmcb.hpa >> PAGE_SHIFT]
    except KeyError:
        w = vmcb.mem.views(vmcb.hpa)
    d = w[2]
    if not d[INTERCEPT_VMRUN >> 5] >> (INTERCEPT_VMRUN & 31) & 1:
        return "VMRUN intercept not set"
    if d[VMCB_ASID >> 2] == 0:
        return "ASID is 0"
    int_ctl = d[VMCB_INT_CTL >> 2]
    avic = bool(int_ctl & AVIC_ENABLE_MASK)
    x2 = bool(int_ctl & X2APIC_MODE_MASK)
    if x2 and not avic:
        return "x2AVIC enable (int_ctl bit 30) without AVIC enable (bit 31)"
    if not avic:
        return None
    if x2 and not features.x2avic:
        return "x2AVIC enable on a CPU without x2AVIC"
    q = w[3]
    physical_id = q[VMCB_AVIC_PHYSICAL_ID >> 3]
    mi = physical_id & AVIC_PHYSICAL_MAX_INDEX_MASK
    if not x2:
        if mi > 255:
            return f"AVIC_PHYSICAL_MAX_INDEX {mi} > 255 in xAVIC mode"
    elif not features.x2avic_ext:
        if mi > 511:
            return f"AVIC_PHYSICAL_MAX_INDEX {mi} > 511 in x2AVIC mode without x2AVIC_EXT"
    elif mi > 4095:  # pragma: no cover - a 12-bit field cannot exceed 4095
        return f"AVIC_PHYSICAL_MAX_INDEX {mi} > 4095"
    ptrs: tuple[tuple[str, int, bool], ...] = (
        ("backing page", q[VMCB_AVIC_BACKING_PAGE >> 3], True), ("physical table", physical_id, False))
    if not x2:
        ptrs += (("logical table", q[VMCB_AVIC_LOGICAL_ID >> 3], True),
                 ("APIC_BAR", q[VMCB_AVIC_VAPIC_BAR >> 3], True))
    for name, value, low12 in ptrs:
        if low12 and value & 0xFFF:
            return f"AVIC {name} pointer {value:#x} is not 4 KiB aligned"
        if value >> 52:
            return f"AVIC {name} pointer {value:#x} exceeds the physical-address limit"
    return None
