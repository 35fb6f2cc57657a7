"""Local APIC register map (Intel SDM vol. 3 §11.4.1 Table 11-1, §11.12.1.2 Table 11-6).

Offsets are byte offsets inside the 4 KiB xAPIC MMIO page, which is also the layout of the AMD
AVIC backing page and of KVM's ``apic->regs``.  In x2APIC mode register ``off`` is MSR
``0x800 + (off >> 4)``.
"""

from __future__ import annotations

# --- register offsets ---------------------------------------------------------------------------
APIC_ID = 0x20
APIC_LVR = 0x30
APIC_TPR = 0x80
APIC_APR = 0x90
APIC_PPR = 0xA0
APIC_EOI = 0xB0
APIC_RRR = 0xC0
APIC_LDR = 0xD0
APIC_DFR = 0xE0
APIC_SVR = 0xF0
APIC_ISR = 0x100
APIC_TMR = 0x180
APIC_IRR = 0x200
APIC_ESR = 0x280
APIC_LVTCMCI = 0x2F0  # not implemented by this model (6 LVT entries, no CMCI): reserved
APIC_ICR = 0x300
APIC_ICR2 = 0x310
APIC_LVTT = 0x320
APIC_LVTTHMR = 0x330
APIC_LVTPC = 0x340
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_LVTERR = 0x370
APIC_TMICT = 0x380
APIC_TMCCT = 0x390
APIC_TDCR = 0x3E0
APIC_SELF_IPI = 0x3F0

PAGE_SIZE = 4096
LVT_OFFSETS: tuple[int, ...] = (APIC_LVTT, APIC_LVTTHMR, APIC_LVTPC, APIC_LVT0, APIC_LVT1, APIC_LVTERR)

# --- register values -----------------------------------------------------------------------------
# Version register: bits 7:0 version 0x14 (integrated APIC, Pentium 4/Xeon and later), bits 23:16
# "max LVT entry" = 5 (six LVT entries: timer, thermal, perf, LINT0, LINT1, error), bit 24
# (EOI-broadcast suppression) clear.  Same value KVM exposes without CMCI and without directed EOI.
APIC_VERSION = 0x14
APIC_LVR_VALUE = APIC_VERSION | (5 << 16)  # 0x00050014
APIC_LVR_DIRECTED_EOI = 1 << 24

SVR_VECTOR_MASK = 0xFF
SVR_APIC_ENABLED = 1 << 8
SVR_FOCUS_DISABLED = 1 << 9
SVR_EOI_BCAST_SUPPRESS = 1 << 12
SVR_RESET = 0xFF

LVT_MASKED = 1 << 16
LVT_DELIVERY_STATUS = 1 << 12
LVT_INPUT_POLARITY = 1 << 13
LVT_REMOTE_IRR = 1 << 14
LVT_LEVEL_TRIGGER = 1 << 15
LVT_VECTOR_MASK = 0xFF
LVT_DM_SHIFT = 8
LVT_DM_MASK = 0x7 << LVT_DM_SHIFT
LVT_TIMER_MODE_SHIFT = 17
LVT_TIMER_MODE_MASK = 0x3 << LVT_TIMER_MODE_SHIFT
TIMER_ONESHOT = 0
TIMER_PERIODIC = 1
TIMER_TSC_DEADLINE = 2
TIMER_MODE_RESERVED = 3

# Software-writable bits per LVT (read-only status bits 12 and 14 excluded).
LVT_WRITE_MASK: dict[int, int] = {
    APIC_LVTT: LVT_VECTOR_MASK | LVT_MASKED | LVT_TIMER_MODE_MASK,
    APIC_LVTTHMR: LVT_VECTOR_MASK | LVT_DM_MASK | LVT_MASKED,
    APIC_LVTPC: LVT_VECTOR_MASK | LVT_DM_MASK | LVT_MASKED,
    APIC_LVT0: LVT_VECTOR_MASK | LVT_DM_MASK | LVT_INPUT_POLARITY | LVT_LEVEL_TRIGGER | LVT_MASKED,
    APIC_LVT1: LVT_VECTOR_MASK | LVT_DM_MASK | LVT_INPUT_POLARITY | LVT_LEVEL_TRIGGER | LVT_MASKED,
    APIC_LVTERR: LVT_VECTOR_MASK | LVT_MASKED,
}
# Bits that are architecturally defined (writable or read-only) per LVT: in x2APIC mode a WRMSR
# that sets any other bit raises #GP (SDM §11.12.1.3 "reserved bit checking").
LVT_DEFINED_MASK: dict[int, int] = {
    APIC_LVTT: LVT_WRITE_MASK[APIC_LVTT] | LVT_DELIVERY_STATUS,
    APIC_LVTTHMR: LVT_WRITE_MASK[APIC_LVTTHMR] | LVT_DELIVERY_STATUS,
    APIC_LVTPC: LVT_WRITE_MASK[APIC_LVTPC] | LVT_DELIVERY_STATUS,
    APIC_LVT0: LVT_WRITE_MASK[APIC_LVT0] | LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
    APIC_LVT1: LVT_WRITE_MASK[APIC_LVT1] | LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
    APIC_LVTERR: LVT_WRITE_MASK[APIC_LVTERR] | LVT_DELIVERY_STATUS,
}

TDCR_MASK = 0xB
DFR_FLAT = 0xFFFFFFFF
DFR_CLUSTER = 0x0FFFFFFF
DFR_MODEL_FLAT = 0xF
DFR_MODEL_CLUSTER = 0x0

# ICR low word: vector 7:0, delivery mode 10:8, destination mode 11, delivery status 12 (xAPIC,
# read-only), level 14, trigger 15, shorthand 19:18.  Everything else is reserved.
ICR_LOW_MASK = 0x000CCFFF
ICR_BUSY = 1 << 12

# ESR bits (SDM §11.5.3, Figure 11-9).
ESR_SEND_CS = 1 << 0
ESR_RECV_CS = 1 << 1
ESR_SEND_ACCEPT = 1 << 2
ESR_RECV_ACCEPT = 1 << 3
ESR_REDIRECTABLE_IPI = 1 << 4
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECV_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

# --- MSRs and IA32_APIC_BASE ---------------------------------------------------------------------
X2APIC_MSR_BASE = 0x800
X2APIC_MSR_LAST = 0x8FF
MSR_IA32_APICBASE = 0x1B
MSR_IA32_TSC_DEADLINE = 0x6E0

APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10
APIC_BASE_EN = 1 << 11
APIC_BASE_ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12 (MAXPHYADDR = 52)
APIC_DEFAULT_BASE = 0xFEE00000
APIC_BASE_RESERVED = ~(APIC_BASE_ADDR_MASK | APIC_BASE_BSP | APIC_BASE_EXTD | APIC_BASE_EN) & (2**64 - 1)

X2APIC_BROADCAST = 0xFFFFFFFF
XAPIC_BROADCAST = 0xFF


def msr_to_offset(msr: int) -> int:
    """x2APIC MSR number (0x800-0x8FF) -> register offset."""
    if not X2APIC_MSR_BASE <= msr <= X2APIC_MSR_LAST:
        raise ValueError(f"MSR {msr:#x} is not an x2APIC register MSR")
    return (msr - X2APIC_MSR_BASE) << 4


def offset_to_msr(off: int) -> int:
    """Register offset (16-byte aligned, < 0x1000) -> x2APIC MSR number."""
    if off & 0xF or not 0 <= off < PAGE_SIZE:
        raise ValueError(f"offset {off:#x} is not a 16-byte aligned APIC register offset")
    return X2APIC_MSR_BASE + (off >> 4)


def x2apic_ldr(x2apic_id: int) -> int:
    """The read-only x2APIC logical ID derived from the x2APIC ID (SDM §11.12.10.2): cluster =
    x2APIC ID[19:4] in bits 31:16, member bit x2APIC ID[3:0] (higher ID bits do not take part)."""
    return (((x2apic_id >> 4) & 0xFFFF) << 16) | (1 << (x2apic_id & 0xF))


# --- names used by scenarios ---------------------------------------------------------------------
REG_BY_NAME: dict[str, int] = {
    "ID": APIC_ID,
    "VER": APIC_LVR,
    "TPR": APIC_TPR,
    "APR": APIC_APR,
    "PPR": APIC_PPR,
    "EOI": APIC_EOI,
    "RRD": APIC_RRR,
    "LDR": APIC_LDR,
    "DFR": APIC_DFR,
    "SVR": APIC_SVR,
    "SPIV": APIC_SVR,
    "ESR": APIC_ESR,
    "ICR": APIC_ICR,
    "ICR_LO": APIC_ICR,
    "ICR2": APIC_ICR2,
    "ICR_HI": APIC_ICR2,
    "LVT_TIMER": APIC_LVTT,
    "LVT_THERMAL": APIC_LVTTHMR,
    "LVT_PERF": APIC_LVTPC,
    "LVT_LINT0": APIC_LVT0,
    "LVT_LINT1": APIC_LVT1,
    "LVT_ERROR": APIC_LVTERR,
    "TIMER_INITIAL": APIC_TMICT,
    "TIMER_CURRENT": APIC_TMCCT,
    "TIMER_DIVIDE": APIC_TDCR,
    "SELF_IPI": APIC_SELF_IPI,
}
for _i in range(8):
    REG_BY_NAME[f"ISR{_i}"] = APIC_ISR + 0x10 * _i
    REG_BY_NAME[f"TMR{_i}"] = APIC_TMR + 0x10 * _i
    REG_BY_NAME[f"IRR{_i}"] = APIC_IRR + 0x10 * _i
del _i

NAME_BY_REG: dict[int, str] = {}
for _name, _off in REG_BY_NAME.items():
    NAME_BY_REG.setdefault(_off, _name)
del _name, _off

# --- access rules --------------------------------------------------------------------------------
_ARRAYS = tuple(base + 0x10 * i for base in (APIC_ISR, APIC_TMR, APIC_IRR) for i in range(8))

# xAPIC MMIO: offsets that are registers (anything else is reserved -> ESR "illegal register").
XAPIC_REGISTERS: frozenset[int] = frozenset(
    (APIC_ID, APIC_LVR, APIC_TPR, APIC_APR, APIC_PPR, APIC_EOI, APIC_RRR, APIC_LDR, APIC_DFR, APIC_SVR,
     APIC_ESR, APIC_ICR, APIC_ICR2, *LVT_OFFSETS, APIC_TMICT, APIC_TMCCT, APIC_TDCR, *_ARRAYS)
)
# x2APIC MSR interface (SDM Table 11-6).
X2APIC_READABLE: frozenset[int] = frozenset(
    (APIC_ID, APIC_LVR, APIC_TPR, APIC_PPR, APIC_LDR, APIC_SVR, APIC_ESR, APIC_ICR, *LVT_OFFSETS,
     APIC_TMICT, APIC_TMCCT, APIC_TDCR, *_ARRAYS)
)
X2APIC_WRITABLE: frozenset[int] = frozenset(
    (APIC_TPR, APIC_EOI, APIC_SVR, APIC_ESR, APIC_ICR, *LVT_OFFSETS, APIC_TMICT, APIC_TDCR, APIC_SELF_IPI)
)
X2APIC_REGISTERS: frozenset[int] = X2APIC_READABLE | X2APIC_WRITABLE
