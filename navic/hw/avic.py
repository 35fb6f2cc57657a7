"""AMD AVIC / x2AVIC silicon: table encodings, register-access classification, exit encodings and the
ICR-write → IPI delivery algorithm of APM 15.29.6.1 (digest §3–§4).

Table entries are plain ints (read straight out of host memory); helpers encode/decode them with the
KVM mask names given in comments.  :class:`AvicEngine` runs the ICR-write algorithm as a generator
process: ``yield 0`` marks every atomic-step boundary (after each IRR set, after each IsRunning
read) so an explorer can interleave software (e.g. KVM clearing IsRunning) between them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from navic.apic.registers import (
    APIC_DFR,
    APIC_EOI,
    APIC_ESR,
    APIC_ICR,
    APIC_ICR2,
    APIC_ID,
    APIC_IRR,
    APIC_ISR,
    APIC_LDR,
    APIC_LVR,
    APIC_LVT0,
    APIC_LVT1,
    APIC_LVTERR,
    APIC_LVTPC,
    APIC_LVTT,
    APIC_LVTTHMR,
    APIC_PPR,
    APIC_RRR,
    APIC_SELF_IPI,
    APIC_SVR,
    APIC_TDCR,
    APIC_TMCCT,
    APIC_TMICT,
    APIC_TMR,
    APIC_TPR,
    ICR_BUSY,
)
from navic.hw.memory import PAGE_SHIFT, HostMemory
from navic.hw.vmcb import (
    AVIC_HPA_MASK,
    AVIC_PHYSICAL_MAX_INDEX_MASK,
    SVM_EXIT_AVIC_INCOMPLETE_IPI,
    SVM_EXIT_AVIC_UNACCELERATED_ACCESS,
    VMCB_AVIC_BACKING_PAGE,
    VMCB_AVIC_LOGICAL_ID,
    VMCB_AVIC_PHYSICAL_ID,
    VMCB_INT_CTL,
    X2APIC_MODE_MASK,
    Vmcb,
    exit_name,
)

if TYPE_CHECKING:
    from navic.hw.errata import Erratum1235
    from navic.hw.features import CpuFeatures

U64_MASK = (1 << 64) - 1

# =====================================================================================================
# Physical APIC ID table entry (64-bit, APM Table 15-23)
# =====================================================================================================
PHYS_VALID = 1 << 63  # AVIC_PHYSICAL_ID_ENTRY_VALID_MASK
PHYS_IS_RUNNING = 1 << 62  # AVIC_PHYSICAL_ID_ENTRY_IS_RUNNING_MASK
PHYS_GA_LOG_INTR = 1 << 61  # AVIC_PHYSICAL_ID_ENTRY_GA_LOG_INTR (software-only; never in the HW table)
PHYS_BACKING_MASK = ((1 << 52) - 1) & ~0xFFF  # AVIC_PHYSICAL_ID_ENTRY_BACKING_PAGE_MASK = GENMASK(51, 12)
PHYS_HOST_ID_MASK = 0xFFF  # AVIC_PHYSICAL_ID_ENTRY_HOST_PHYSICAL_ID_MASK = GENMASK(11, 0)
PHYS_RESERVED_MASK = ((1 << 62) - 1) & ~((1 << 52) - 1)  # 61:52 SBZ in the hardware table
AVIC_MAX_PHYSICAL_ID = 0xFE
X2AVIC_MAX_PHYSICAL_ID = 0x1FF
X2AVIC_4K_MAX_PHYSICAL_ID = 0xFFF
PHYS_ENTRIES_PER_PAGE = 512

# =====================================================================================================
# Logical APIC ID table entry (32-bit, xAVIC only)
# =====================================================================================================
LOG_VALID_BIT = 31  # AVIC_LOGICAL_ID_ENTRY_VALID_BIT
LOG_VALID = 1 << 31  # AVIC_LOGICAL_ID_ENTRY_VALID_MASK
LOG_GUEST_PHYS_ID_MASK = 0xFF  # AVIC_LOGICAL_ID_ENTRY_GUEST_PHYSICAL_ID_MASK
LOG_CLUSTER_RESERVED = 0xF

# =====================================================================================================
# Doorbell, exit-info encodings, failure causes
# =====================================================================================================
MSR_AMD64_SVM_AVIC_DOORBELL = 0xC001011B
AVIC_DOORBELL_PHYSICAL_ID_MASK = 0xFFF

AVIC_UNACCEL_ACCESS_WRITE_MASK = 1  # applied to EXITINFO1 >> 32
AVIC_UNACCEL_ACCESS_OFFSET_MASK = 0xFF0
AVIC_UNACCEL_ACCESS_VECTOR_MASK = 0xFFFFFFFF

AVIC_IPI_FAILURE_INVALID_INT_TYPE = 0
AVIC_IPI_FAILURE_TARGET_NOT_RUNNING = 1
AVIC_IPI_FAILURE_INVALID_TARGET = 2
AVIC_IPI_FAILURE_INVALID_BACKING_PAGE = 3
AVIC_IPI_FAILURE_INVALID_IPI_VECTOR = 4
IPI_FAILURE_NAMES: dict[int, str] = {
    0: "AVIC_IPI_FAILURE_INVALID_INT_TYPE",
    1: "AVIC_IPI_FAILURE_TARGET_NOT_RUNNING",
    2: "AVIC_IPI_FAILURE_INVALID_TARGET",
    3: "AVIC_IPI_FAILURE_INVALID_BACKING_PAGE",
    4: "AVIC_IPI_FAILURE_INVALID_IPI_VECTOR",
}

# ICR fields used here (SDM 11.6.1)
_DM_FIXED = 0
_TRIG_LEVEL = 1
_SH_NONE, _SH_SELF, _SH_ALL, _SH_OTHERS = 0, 1, 2, 3


# --- physical entries -------------------------------------------------------------------------------
def phys_entry(backing_hpa: int, host_id: int = 0, running: bool = False, valid: bool = True) -> int:
    """Encode a physical APIC ID table entry."""
    e = (backing_hpa & PHYS_BACKING_MASK) | (host_id & PHYS_HOST_ID_MASK)
    if running:
        e |= PHYS_IS_RUNNING
    if valid:
        e |= PHYS_VALID
    return e


def phys_entry_decode(e: int) -> tuple[bool, bool, int, int]:
    """(valid, running, backing_hpa, host_id)."""
    return bool(e & PHYS_VALID), bool(e & PHYS_IS_RUNNING), e & PHYS_BACKING_MASK, e & PHYS_HOST_ID_MASK


def phys_entry_is_valid(e: int) -> bool:
    return bool(e & PHYS_VALID)


def phys_entry_is_running(e: int) -> bool:
    return bool(e & PHYS_IS_RUNNING)


def phys_entry_backing(e: int) -> int:
    return e & PHYS_BACKING_MASK


def phys_entry_host_id(e: int) -> int:
    return e & PHYS_HOST_ID_MASK


def phys_entry_with(e: int, *, running: bool | None = None, host_id: int | None = None) -> int:
    """Entry ``e`` with IsRunning and/or host ID replaced (KVM's load/put updates)."""
    if running is not None:
        e = e | PHYS_IS_RUNNING if running else e & ~PHYS_IS_RUNNING
    if host_id is not None:
        e = (e & ~PHYS_HOST_ID_MASK) | (host_id & PHYS_HOST_ID_MASK)
    return e


def phys_table_pages(max_index: int) -> int:
    """Number of 4 KiB pages the hardware uses for a table with this MAX_INDEX (MAX_INDEX[11:9] + 1)."""
    return ((max_index & AVIC_PHYSICAL_MAX_INDEX_MASK) >> 9) + 1


# --- logical entries --------------------------------------------------------------------------------
def log_entry(guest_phys_id: int, valid: bool = True) -> int:
    return (guest_phys_id & LOG_GUEST_PHYS_ID_MASK) | (LOG_VALID if valid else 0)


def log_entry_decode(e: int) -> tuple[bool, int]:
    """(valid, guest physical APIC ID)."""
    return bool(e & LOG_VALID), e & LOG_GUEST_PHYS_ID_MASK


def dfr_is_flat(dfr: int) -> bool:
    """DFR model bits 31:28: 1111b = flat, 0000b = cluster."""
    return (dfr >> 28) & 0xF == 0xF


def logical_index(dlid: int, flat: bool) -> int | None:
    """Logical-table index of an APIC whose 8-bit logical ID (LDR[31:24]) is ``dlid``.

    Flat: the position of the single set bit (entries 0–7).  Cluster: 4 * dlid[7:4] + position of the
    single set bit in dlid[3:0] (cluster 0xF reserved; max 59).  None if the ID has no usable entry
    (zero or several member bits, or the reserved cluster) — KVM's avic_get_logical_id_entry rejects
    these too.
    """
    dlid &= 0xFF
    if flat:
        bits = dlid
        base = 0
    else:
        cluster = dlid >> 4
        if cluster == LOG_CLUSTER_RESERVED:
            return None
        bits = dlid & 0xF
        base = cluster << 2
    if bits == 0 or bits & (bits - 1):
        return None
    return base + bits.bit_length() - 1


def logical_dest_indices(dest: int, flat: bool) -> list[int]:
    """Logical-table indices addressed by an 8-bit xAPIC logical destination (not 0xFF).

    Flat: one index per set bit 0–7.  Cluster: base 4 * dest[7:4], one index per set bit of dest[3:0]
    (for the reserved cluster 0xF these are 60–63, which the engine reports as invalid targets)."""
    dest &= 0xFF
    if flat:
        return [b for b in range(8) if dest >> b & 1]
    base = (dest >> 4) << 2
    return [base + b for b in range(4) if dest >> b & 1]


def x2apic_logical_id(x2apic_id: int) -> int:
    """x2APIC LDR derived from the x2APIC ID: (id[19:4] << 16) | (1 << id[3:0])."""
    return (((x2apic_id >> 4) & 0xFFFF) << 16) | (1 << (x2apic_id & 0xF))   # ID[19:4] (SDM §11.12.10.2)


def x2apic_logical_dest_ids(dest: int) -> list[int]:
    """x2APIC IDs addressed by a 32-bit x2APIC logical destination (not 0xFFFFFFFF): cluster
    dest[31:16], member bitmap dest[15:0], ID = (cluster << 4) + bit."""
    base = (dest >> 16) << 4
    bits = dest & 0xFFFF
    return [base + b for b in range(16) if bits >> b & 1]


# =====================================================================================================
# Register access classification (APM Table 15-22, digest §3.2)
# =====================================================================================================
ALLOWED = "allowed"
ACCELERATED = "accelerated"
TRAP = "trap"
FAULT = "fault"
GP = "gp"  # x2APIC architectural #GP (x2APIC access checks precede AVIC's; x2AVIC only)

_A, _X, _T, _F = ALLOWED, ACCELERATED, TRAP, FAULT
_ISR_BYTES_DESC = tuple(APIC_ISR + 0x10 * i + k for i in range(7, -1, -1) for k in (3, 2, 1, 0))
# offset -> (read, write) for the listed single registers
_ACCESS_TABLE: dict[int, tuple[str, str]] = {
    APIC_ID: (_A, _T),
    APIC_LVR: (_A, _F),
    APIC_TPR: (_A, _X),
    0x90: (_F, _F),  # APR
    APIC_PPR: (_A, _F),
    APIC_EOI: (_A, _X),  # edge; level (TMR of highest ISR set) -> trap, see classify_access(eoi_level=)
    APIC_RRR: (_A, _T),
    APIC_LDR: (_A, _T),
    APIC_DFR: (_A, _T),
    APIC_SVR: (_A, _T),
    APIC_ESR: (_A, _T),
    APIC_ICR: (_A, _X),
    APIC_ICR2: (_A, _A),
    APIC_LVTT: (_A, _T),
    APIC_LVTTHMR: (_A, _T),
    APIC_LVTPC: (_A, _T),
    APIC_LVT0: (_A, _T),
    APIC_LVT1: (_A, _T),
    APIC_LVTERR: (_A, _T),
    APIC_TMICT: (_A, _T),
    APIC_TMCCT: (_F, _F),
    APIC_TDCR: (_A, _T),
    0x400: (_F, _F),  # extended APIC feature
    0x410: (_F, _F),  # extended APIC control
    0x420: (_F, _F),  # specific EOI
}
for _i in range(8):
    _ACCESS_TABLE[APIC_ISR + 0x10 * _i] = (_A, _F)
    _ACCESS_TABLE[APIC_TMR + 0x10 * _i] = (_A, _F)
    _ACCESS_TABLE[APIC_IRR + 0x10 * _i] = (_A, _F)
    _ACCESS_TABLE[0x480 + 0x10 * _i] = (_F, _F)  # interrupt enable registers (IER)
del _i
EXT_LVT_OFFSETS = (0x500, 0x510, 0x520, 0x530)

# Offsets that have no x2APIC MSR in Table 15-22 ("–" rows) -> #GP in x2APIC mode.
_X2_NO_MSR = frozenset((APIC_RRR, APIC_DFR, APIC_ICR2))
# Architecturally read-only x2APIC registers (write -> #GP) and write-only ones (read -> #GP).
_X2_READ_ONLY = frozenset(
    (APIC_ID, APIC_LVR, APIC_PPR, APIC_LDR, APIC_TMCCT,
     *(base + 0x10 * i for base in (APIC_ISR, APIC_TMR, APIC_IRR) for i in range(8)))
)
_X2_WRITE_ONLY = frozenset((APIC_EOI, APIC_SELF_IPI))


def classify_access(offset: int, write: bool, x2apic: bool = False, ext_lvt_chg: bool = False,
                    eoi_level: bool = False) -> str:
    """How AVIC handles a guest access to APIC register ``offset`` (MMIO offset; for x2APIC the
    register offset (MSR - 800h) << 4).  Returns ``"allowed"``, ``"accelerated"``, ``"trap"``,
    ``"fault"`` or — x2APIC only — ``"gp"``.

    ``ext_lvt_chg`` = CPUID Fn8000_000A_EDX[27]; ``eoi_level`` = the highest in-service vector is
    level-triggered (its TMR bit is set), which turns an EOI write into a trap.
    Access to bytes reg+4..reg+15 is undefined; the register's 16-byte slot decides.
    """
    off = offset & ~0xF
    if x2apic:
        if off == APIC_SELF_IPI:
            return ACCELERATED if write else GP
        if off in _X2_NO_MSR or off >= 0x540 or off == 0x2F0:
            return GP
        if write and off in _X2_READ_ONLY:
            return GP
        if not write and off in _X2_WRITE_ONLY:
            return GP
    if off in EXT_LVT_OFFSETS:
        if ext_lvt_chg:
            return TRAP if write else ALLOWED
        return FAULT
    if off >= 0x540:
        return FAULT
    rw = _ACCESS_TABLE.get(off)
    if rw is None:
        return ALLOWED  # locations not listed: plain backing-page read/write
    if write and off == APIC_EOI and eoi_level:
        return TRAP
    return rw[1] if write else rw[0]


_MSB = [0] + [b.bit_length() - 1 for b in range(1, 256)]   # highest set bit of a byte


def eoi_is_level(page: bytearray) -> bool:
    """Whether an EOI written now would be the level case: the TMR bit of the highest set ISR bit."""
    # The ISR's bytes, highest first (ISR word i = bytes 100h + 10h*i .. +3; little-endian): the
    # first non-zero byte holds the highest in-service vector.
    for o in _ISR_BYTES_DESC:
        x = page[o]
        if x:
            b = _MSB[x]
            return bool(page[o + (APIC_TMR - APIC_ISR)] >> b & 1)   # the same bit of the TMR
    return False


# KVM's trap set (avic.c is_avic_unaccelerated_access_trap): everything else is handled as a fault.
KVM_AVIC_TRAP_OFFSETS: frozenset[int] = frozenset(
    (APIC_ID, APIC_EOI, APIC_RRR, APIC_LDR, APIC_DFR, APIC_SVR, APIC_ESR, APIC_ICR, APIC_LVTT, APIC_LVTTHMR,
     APIC_LVTPC, APIC_LVT0, APIC_LVT1, APIC_LVTERR, APIC_TMICT, APIC_TDCR)
)


def kvm_is_trap_offset(offset: int, ext_lvt_chg: bool = False) -> bool:
    """KVM's decision for an AVIC_NOACCEL exit: trap (True) or fault.  With ExtLvtAvicAccessChg the
    AMD EILVT patch adds 500h–530h."""
    off = offset & AVIC_UNACCEL_ACCESS_OFFSET_MASK
    return off in KVM_AVIC_TRAP_OFFSETS or (ext_lvt_chg and off in EXT_LVT_OFFSETS)


# =====================================================================================================
# Exit encodings
# =====================================================================================================
def noaccel_exit_info(offset: int, write: bool, vector: int = 0) -> tuple[int, int]:
    """(EXITINFO1, EXITINFO2) of AVIC_UNACCELERATED_ACCESS: EXITINFO1 bit 32 = write, 11:4 = offset;
    EXITINFO2[7:0] = vector of the highest in-service interrupt for a level EOI (else 0)."""
    return (1 << 32 if write else 0) | (offset & AVIC_UNACCEL_ACCESS_OFFSET_MASK), vector & 0xFF


def noaccel_decode(info1: int, info2: int = 0) -> tuple[int, bool, int]:
    """(offset, write, vector) the way KVM decodes them."""
    return (info1 & AVIC_UNACCEL_ACCESS_OFFSET_MASK, bool((info1 >> 32) & AVIC_UNACCEL_ACCESS_WRITE_MASK),
            info2 & AVIC_UNACCEL_ACCESS_VECTOR_MASK)


def incomplete_ipi_exit_info(icr_lo: int, icr_hi: int, failure: int, index: int = 0) -> tuple[int, int]:
    """(EXITINFO1, EXITINFO2) of AVIC_INCOMPLETE_IPI: EXITINFO1 = ICR high << 32 | ICR low;
    EXITINFO2 = failure ID << 32 | index[11:0]."""
    return (((icr_hi & 0xFFFFFFFF) << 32) | (icr_lo & 0xFFFFFFFF),
            ((failure & 0xFFFFFFFF) << 32) | (index & AVIC_PHYSICAL_MAX_INDEX_MASK))


def incomplete_ipi_decode(info1: int, info2: int) -> tuple[int, int, int, int]:
    """(icr_lo, icr_hi, failure ID, index) the way KVM decodes them."""
    return (info1 & 0xFFFFFFFF, info1 >> 32, info2 >> 32, info2 & AVIC_PHYSICAL_MAX_INDEX_MASK)


class AvicExit:
    """A #VMEXIT produced by the AVIC hardware (code, EXITINFO1, EXITINFO2)."""

    __slots__ = ("code", "info1", "info2")

    def __init__(self, code: int, info1: int, info2: int) -> None:
        self.code = code
        self.info1 = info1
        self.info2 = info2

    def __repr__(self) -> str:
        if self.code == SVM_EXIT_AVIC_INCOMPLETE_IPI:
            return f"AvicExit({self.name}, id={self.failure}, index={self.index})"
        return f"AvicExit({self.name}, {self.info1:#x}, {self.info2:#x})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AvicExit) and (self.code, self.info1, self.info2) == (
            other.code, other.info1, other.info2)

    def __hash__(self) -> int:
        return hash((self.code, self.info1, self.info2))

    @property
    def name(self) -> str:
        return exit_name(self.code)

    @property
    def failure(self) -> int:
        """Failure ID (INCOMPLETE_IPI only)."""
        return self.info2 >> 32

    @property
    def failure_name(self) -> str:
        return IPI_FAILURE_NAMES.get(self.failure, f"unknown_{self.failure}")

    @property
    def index(self) -> int:
        return self.info2 & AVIC_PHYSICAL_MAX_INDEX_MASK

    def write_to(self, vmcb: Vmcb) -> None:
        """Store code/EXITINFO1/EXITINFO2 in the VMCB (part of #VMEXIT)."""
        vmcb.set_exit(self.code, self.info1, self.info2)

    @staticmethod
    def incomplete_ipi(icr_lo: int, icr_hi: int, failure: int, index: int = 0) -> AvicExit:
        i1, i2 = incomplete_ipi_exit_info(icr_lo, icr_hi, failure, index)
        return AvicExit(SVM_EXIT_AVIC_INCOMPLETE_IPI, i1, i2)

    @staticmethod
    def noaccel(offset: int, write: bool, vector: int = 0) -> AvicExit:
        i1, i2 = noaccel_exit_info(offset, write, vector)
        return AvicExit(SVM_EXIT_AVIC_UNACCELERATED_ACCESS, i1, i2)


# =====================================================================================================
# ICR write -> IPI delivery (APM 15.29.6.1, digest §4.1)
# =====================================================================================================
Doorbell = Callable[[int], None]  # doorbell(host_apic_id)
IrrSet = Callable[[int, int, int], None]  # irr_set(backing_hpa, vector, index), called after the bit is set

_IRR_BYTE = [APIC_IRR + ((v >> 5) << 4) + ((v & 31) >> 3) for v in range(256)]
# VMCB fields icr_write reads, as indices into the VMCB page's u32 / u64 views
_W_INT_CTL = VMCB_INT_CTL >> 2
_Q_BACKING = VMCB_AVIC_BACKING_PAGE >> 3
_Q_LOGICAL_ID = VMCB_AVIC_LOGICAL_ID >> 3
_Q_PHYSICAL_ID = VMCB_AVIC_PHYSICAL_ID >> 3


class AvicEngine:
    """The AVIC IPI-delivery hardware of one machine.

    ``doorbell(host_apic_id)`` is called for every doorbell the hardware sends (including the
    "doorbell to self" of a self-IPI, with the sender's host APIC ID); ``irr_set(backing_hpa,
    vector, index)`` is called right after the hardware has atomically set an IRR bit in a backing
    page (``index`` = target's guest physical APIC ID, or the sender's own ID for a self-IPI) so the
    run recorder can register the acceptance with its provenance.  Both can be overridden per call.

    ``erratum`` (an :class:`~navic.hw.errata.Erratum1235`) is consulted whenever the hardware reads
    IsRunning = 0; the engine makes it track every physical table it reads (idempotent).

    ``fine_grained``: True (default) yields 0 after each IRR set and after each IsRunning read/doorbell;
    False makes the whole ICR write a single atomic step (no yields) for fast, coarse runs.
    """

    __slots__ = ("mem", "features", "doorbell", "irr_set", "erratum", "fine_grained", "stats", "_hwatch")

    def __init__(self, mem: HostMemory, features: CpuFeatures, doorbell: Doorbell,
                 irr_set: IrrSet | None = None, erratum: Erratum1235 | None = None,
                 fine_grained: bool = True) -> None:
        self.mem = mem
        self.features = features
        self.doorbell = doorbell
        self.irr_set = irr_set
        self.erratum = erratum
        self.fine_grained = fine_grained
        self.stats = {"icr_writes": 0, "irr_sets": 0, "doorbells": 0, "exits": 0, "stale_reads": 0,
                      "dropped_low_vector": 0}
        # Write observers of the host frames behind ``mem``'s views (a guest memory's are its host's).
        host = getattr(mem, "host", None)
        self._hwatch = host._watch if isinstance(host, HostMemory) else mem._watch

    # -------------------------------------------------------------------------------------------
    def icr_write(self, vmcb: Vmcb, apic_id: int, host_id: int, icr_lo: int, icr_hi: int | None = None,
                  *, doorbell: Doorbell | None = None, irr_set: IrrSet | None = None,
                  ) -> Generator[int, Any, AvicExit | None]:
        """A guest write to ICR (xAVIC MMIO 300h, x2AVIC MSR 830h/83Fh) on the vCPU running on the
        core with host APIC ID ``host_id``, whose guest physical APIC ID is ``apic_id``.

        Context comes from ``vmcb``: backing page (0E0h), x2AVIC mode (int_ctl bit 30), physical
        table and MAX_INDEX (0F8h), logical table (0F0h).  The write first lands in the backing page
        (ICR low at 300h with BUSY clear; for x2AVIC ICR high at 310h; for xAVIC ``icr_hi`` defaults
        to the current 310h).  Returns (as the generator's value) None when fully accelerated, or
        the :class:`AvicExit` the vCPU must take (a trap: the ICR is already in the page).
        """
        mem = self.mem
        frames = mem.frames
        vw = mem._vw
        db = doorbell if doorbell is not None else self.doorbell
        irs = irr_set if irr_set is not None else self.irr_set
        fine = self.fine_grained
        stats = self.stats
        stats["icr_writes"] += 1

        # The VMCB's control fields, read from its page's word views (== the Vmcb field reads).
        # (vmcb.views(), mem.views(): the dict lookups inline; a KeyError = first access)
        try:
            cw = vmcb.mem._vw[vmcb.hpa >> PAGE_SHIFT]
        except KeyError:
            cw = vmcb.mem.views(vmcb.hpa)
        cq = cw[3]
        x2 = bool(cw[2][_W_INT_CTL] & X2APIC_MODE_MASK)
        own = cq[_Q_BACKING] & AVIC_HPA_MASK
        try:   # == mem.page(own), with its u32 words
            ow = vw[own >> PAGE_SHIFT]
        except KeyError:
            ow = mem.views(own)
        own_regs = ow[2]
        icr_lo &= 0xFFFFFFFF
        own_regs[APIC_ICR >> 2] = icr_lo & ~ICR_BUSY
        if x2:
            icr_hi = (icr_hi or 0) & 0xFFFFFFFF
            own_regs[APIC_ICR2 >> 2] = icr_hi
        elif icr_hi is None:
            icr_hi = own_regs[APIC_ICR2 >> 2]
        else:
            icr_hi &= 0xFFFFFFFF

        vector = icr_lo & 0xFF
        dm = (icr_lo >> 8) & 7
        logical = (icr_lo >> 11) & 1
        trig = (icr_lo >> 15) & 1
        sh = (icr_lo >> 18) & 3
        dest = icr_hi if x2 else icr_hi >> 24

        # Only Fixed + edge is accelerated (Lowest-priority, SMI, NMI, INIT, SIPI, ExtINT, level -> ID 0).
        if dm != _DM_FIXED or trig == _TRIG_LEVEL:
            return _fail(stats, icr_lo, icr_hi, AVIC_IPI_FAILURE_INVALID_INT_TYPE, 0)
        if vector < 16:
            if self.features.avic_drops_low_vector_ipi:
                stats["dropped_low_vector"] += 1
                return None
            return _fail(stats, icr_lo, icr_hi, AVIC_IPI_FAILURE_INVALID_IPI_VECTOR, 0)

        # Step 1: self shorthand - own backing page, doorbell to self; the table is not read.
        if sh == _SH_SELF:
            if ow[4] in self._hwatch:
                mem.set_bit(own + _IRR_BYTE[vector], vector & 7)
            else:   # mem.set_bit inline: nobody observes the frame
                ow[0][_IRR_BYTE[vector]] |= 1 << (vector & 7)
            stats["irr_sets"] += 1
            if irs is not None:
                irs(own, vector, apic_id)
            if fine:
                yield 0
            stats["doorbells"] += 1
            db(host_id)
            return None

        physical_id = cq[_Q_PHYSICAL_ID]
        max_index = physical_id & AVIC_PHYSICAL_MAX_INDEX_MASK
        table = physical_id & AVIC_HPA_MASK
        npages = (max_index >> 9) + 1   # phys_table_pages(max_index)
        # the table's pages as u64 entry arrays (entry i = tq[i >> 9][i & 511]); == mem.page per page
        if npages == 1:
            try:
                tq = [vw[table >> PAGE_SHIFT][3]]
            except KeyError:
                tq = [mem.views(table)[3]]
        else:
            tq = [mem.views(table + (k << PAGE_SHIFT))[3] for k in range(npages)]
        err = self.erratum
        if err is not None:
            if not err.is_tracking(table):
                err.track_table(table, npages)
            err.begin_ipi()

        # Step 2: broadcast - every valid entry 0..MAX_INDEX; invalid entries skipped silently.
        if sh != _SH_NONE or dest == (0xFFFFFFFF if x2 else 0xFF):
            skip = apic_id if sh == _SH_OTHERS else -1
            first_nr = -1
            b = _IRR_BYTE[vector]
            bit = 1 << (vector & 7)
            watched = mem._watch
            for i in range(max_index + 1):
                if i == skip:
                    continue
                tp = tq[i >> 9]
                j = i & 511
                e = tp[j]
                if not e & PHYS_VALID:
                    continue
                bpfn = (e & PHYS_BACKING_MASK) >> PAGE_SHIFT
                try:   # == frames.get(bpfn) (cached views => backed frame; views[0] is the frame)
                    bp = vw[bpfn][0]
                except KeyError:   # (no views created here: a broadcast touches every backing page)
                    bp = frames.get(bpfn)
                    if bp is None:
                        return _fail(stats, icr_lo, icr_hi, AVIC_IPI_FAILURE_INVALID_BACKING_PAGE, i)
                if bpfn in watched:
                    mem.set_bit((bpfn << PAGE_SHIFT) + b, vector & 7)
                else:
                    bp[b] |= bit
                stats["irr_sets"] += 1
                if irs is not None:
                    irs(bpfn << PAGE_SHIFT, vector, i)
                if fine:
                    yield 0
                # IsRunning read (a separate step): re-read the entry.
                e = tp[j]
                if e & PHYS_IS_RUNNING:
                    stats["doorbells"] += 1
                    db(e & PHYS_HOST_ID_MASK)
                else:
                    stale = err.stale_host_id(table + (i << 3)) if err is not None else None
                    if stale is not None:
                        stats["stale_reads"] += 1
                        stats["doorbells"] += 1
                        db(stale)
                    elif first_nr < 0:
                        first_nr = i
                if fine:
                    yield 0
            if first_nr >= 0:
                return _fail(stats, icr_lo, icr_hi, AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, first_nr)
            return None

        # Steps 3-4: resolve every destination first; any invalid one fails the whole IPI (ID 2/3,
        # nothing delivered).  targets = [(reported index, physical index)].
        targets: list[tuple[int, int]] | tuple[tuple[int, int], ...] = []
        if logical and not x2:
            ltable = cq[_Q_LOGICAL_ID] & AVIC_HPA_MASK
            lw = mem.views(ltable)[2]   # == mem.page(ltable), as u32 entries
            dfr = own_regs[APIC_DFR >> 2]
            flat = dfr_is_flat(dfr)
            for li in logical_dest_indices(dest, flat):
                if not flat and li >> 2 == LOG_CLUSTER_RESERVED:
                    return _fail(stats, icr_lo, icr_hi, AVIC_IPI_FAILURE_INVALID_TARGET, li)
                le = lw[li]
                if not le & LOG_VALID:
                    return _fail(stats, icr_lo, icr_hi, AVIC_IPI_FAILURE_INVALID_TARGET, li)
                pid = le & LOG_GUEST_PHYS_ID_MASK
                r = self._check_phys(tq, pid, max_index)
                if r:
                    return _fail(stats, icr_lo, icr_hi, r, li)
                targets.append((li, pid))
        else:
            ids = x2apic_logical_dest_ids(dest) if logical else (dest,)
            for pid in ids:
                # _check_phys inline: ID 2 beyond MAX_INDEX or invalid entry, ID 3 unbacked page
                if pid > max_index:
                    return _fail(stats, icr_lo, icr_hi, AVIC_IPI_FAILURE_INVALID_TARGET, pid)
                e = tq[pid >> 9][pid & 511]
                if not e & PHYS_VALID:
                    return _fail(stats, icr_lo, icr_hi, AVIC_IPI_FAILURE_INVALID_TARGET, pid)
                bpfn = (e & PHYS_BACKING_MASK) >> PAGE_SHIFT
                if bpfn not in vw and bpfn not in frames:   # (cached views => backed frame)
                    return _fail(stats, icr_lo, icr_hi, AVIC_IPI_FAILURE_INVALID_BACKING_PAGE, pid)
            targets = ((dest, dest),) if not logical else tuple(zip(ids, ids, strict=True))

        # Step 5: deliver to every destination; step 6: ID 1 if any was not running.
        first_nr = -1
        b = _IRR_BYTE[vector]
        vbit = vector & 7
        bit = 1 << vbit
        hwatch = self._hwatch
        for rep, pid in targets:
            tp = tq[pid >> 9]
            j = pid & 511
            backing = tp[j] & PHYS_BACKING_MASK
            # mem.set_bit(backing + b, vbit), inline when nobody observes the host frame (the IRR
            # byte, a locked OR); views() raises what set_bit would for an unbacked address
            try:
                bw = vw[backing >> PAGE_SHIFT]
            except KeyError:
                bw = mem.views(backing + b)
            if bw[4] in hwatch:
                mem.set_bit(backing + b, vbit)
            else:
                bw[0][b] |= bit
            stats["irr_sets"] += 1
            if irs is not None:
                irs(backing, vector, pid)
            if fine:
                yield 0
            e = tp[j]
            if e & PHYS_IS_RUNNING:
                stats["doorbells"] += 1
                db(e & PHYS_HOST_ID_MASK)
            else:
                stale = err.stale_host_id(table + (pid << 3)) if err is not None else None
                if stale is not None:
                    stats["stale_reads"] += 1
                    stats["doorbells"] += 1
                    db(stale)
                elif first_nr < 0:
                    first_nr = rep
            if fine:
                yield 0
        if first_nr >= 0:   # _fail(..., AVIC_IPI_FAILURE_TARGET_NOT_RUNNING, first_nr) inline
            stats["exits"] += 1
            return AvicExit(SVM_EXIT_AVIC_INCOMPLETE_IPI, (icr_hi << 32) | icr_lo,
                            (AVIC_IPI_FAILURE_TARGET_NOT_RUNNING << 32) | (first_nr & AVIC_PHYSICAL_MAX_INDEX_MASK))
        return None

    def _check_phys(self, tq: list[Any], pid: int, max_index: int) -> int:
        """0 if guest physical ID ``pid`` names a valid entry with a valid backing page, else the
        failure ID (2 invalid target, 3 invalid backing page).  ``tq``: the table's pages as u64
        entry arrays."""
        if pid > max_index:
            return AVIC_IPI_FAILURE_INVALID_TARGET
        e = tq[pid >> 9][pid & 511]
        if not e & PHYS_VALID:
            return AVIC_IPI_FAILURE_INVALID_TARGET
        if ((e & PHYS_BACKING_MASK) >> PAGE_SHIFT) not in self.mem.frames:
            return AVIC_IPI_FAILURE_INVALID_BACKING_PAGE
        return 0


def _fail(stats: dict[str, int], icr_lo: int, icr_hi: int, failure: int, index: int) -> AvicExit:
    """The AVIC_INCOMPLETE_IPI exit of a failed ICR write (counted in ``stats``);
    == AvicExit.incomplete_ipi(icr_lo, icr_hi, failure, index)."""
    stats["exits"] += 1
    return AvicExit(SVM_EXIT_AVIC_INCOMPLETE_IPI, ((icr_hi & 0xFFFFFFFF) << 32) | (icr_lo & 0xFFFFFFFF),
                    ((failure & 0xFFFFFFFF) << 32) | (index & AVIC_PHYSICAL_MAX_INDEX_MASK))


def run_to_completion(gen: Generator[Any, Any, Any]) -> Any:
    """Exhaust a hardware generator outside an engine (every yield is a no-op); returns its value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
