"""The architectural local APIC (Intel SDM vol. 3 ch. 11), bit-accurate on a 4 KiB register page.

Every architectural register lives *only* in ``page`` (little-endian u32 at ``page[off:off+4]``),
because the same page later serves as the AMD AVIC backing page / Intel virtual-APIC page, and the
hardware model sets IRR bits (and, for accelerated accesses, TPR/ISR/PPR) directly in it.  Nothing
that is readable in the page is cached here.  The only Python-side state is what the SDM keeps
outside the register file:

* IA32_APIC_BASE (an MSR) and the mode derived from it,
* latched NMI / INIT / SIPI / SMI / ExtINT events (they never touch IRR),
* the internal error bits of the ESR (write-before-read rule, SDM §11.5.3) and the error-interrupt
  arming latch,
* the timer's running deadline and the IA32_TSC_DEADLINE MSR, plus the cached timer mode / divisor
  used to detect *changes* when the hypervisor replays a trapped write (the page already holds the
  new value in that case, see :meth:`LocalApic.write_reg`),
* ``arb_prio``: count of accepted lowest-priority interrupts (KVM's ``apic_arb_prio``), used by the
  "round_robin" arbitration in :mod:`navic.apic.dest`.

Modelling choices where the SDM is silent or KVM differs are listed in docs/model.md, "Local APIC".
"""

from __future__ import annotations

from navic.apic import registers as R
from navic.apic.icr import _DECODE_CACHE as _ICR_DECODED
from navic.apic.icr import (
    DM_EXTINT,
    DM_FIXED,
    DM_INIT,
    DM_LOWEST,
    DM_NMI,
    DM_SIPI,
    DM_SMI,
    SH_SELF,
    Icr,
)
from navic.apic.timer import divide_value

__all__ = ["GPFault", "ApicHooks", "LocalApic", "ARBITRATIONS", "MODES"]

MODES = ("disabled", "xapic", "x2apic")
ARBITRATIONS = ("vector_hashing", "lowest_priority", "round_robin")

# u32 word indices into ``regs`` (offset >> 2)
_W_ID = R.APIC_ID >> 2
_W_LVR = R.APIC_LVR >> 2
_W_TPR = R.APIC_TPR >> 2
_W_PPR = R.APIC_PPR >> 2
_W_LDR = R.APIC_LDR >> 2
_W_DFR = R.APIC_DFR >> 2
_W_SVR = R.APIC_SVR >> 2
_W_ISR = R.APIC_ISR >> 2
_W_TMR = R.APIC_TMR >> 2
_W_IRR = R.APIC_IRR >> 2
_W_ESR = R.APIC_ESR >> 2
_W_ICR = R.APIC_ICR >> 2
_W_ICR2 = R.APIC_ICR2 >> 2
_W_LVTT = R.APIC_LVTT >> 2
_W_LVTERR = R.APIC_LVTERR >> 2
_W_TMICT = R.APIC_TMICT >> 2
_W_TDCR = R.APIC_TDCR >> 2
_W_LVTS = tuple(off >> 2 for off in R.LVT_OFFSETS)
_TMR_FROM_IRR = _W_IRR - _W_TMR  # word distance between an IRR word and its TMR word
_ISR_FROM_IRR = _W_IRR - _W_ISR
_SCAN = (28, 24, 20, 16, 12, 8, 4, 0)  # word offsets of the 8 bitmap words, highest first

# Names the per-IPI paths (wrmsr, write_reg) test, bound once as module globals.
_OFF_ICR, _OFF_EOI, _OFF_TPR = R.APIC_ICR, R.APIC_EOI, R.APIC_TPR
_ICR_LOW_MASK = R.ICR_LOW_MASK
_X2_FIRST, _X2_LAST = R.X2APIC_MSR_BASE, R.X2APIC_MSR_LAST
_X2_WRITABLE = R.X2APIC_WRITABLE

_ZERO_PAGE = bytes(R.PAGE_SIZE)
# Byte ranges of the IRR and ISR bitmaps in the page (8 words, one per 16 bytes, with the reserved
# bytes between them).  ``page[_IRR_LO:_IRR_HI] == _NO_BITS`` is a one-comparison test that no IRR
# bit is set: equivalent to ``_highest(regs, _W_IRR) < 0`` whenever it holds (if a reserved byte
# were ever non-zero the test fails and the caller falls back to the word scan).
_IRR_LO, _IRR_HI = R.APIC_IRR, R.APIC_IRR + 0x80
_ISR_LO, _ISR_HI = R.APIC_ISR, R.APIC_ISR + 0x80
_NO_BITS = bytes(0x80)
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
_MASKED = R.LVT_MASKED
_SVR_EN = R.SVR_APIC_ENABLED


class GPFault(Exception):
    """A guest-visible #GP(0).  Raised only by rdmsr / wrmsr / set_apic_base."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ApicHooks:
    """Callbacks from the APIC to its owner (CPU / hypervisor model).  Defaults are no-ops."""

    def send_ipi(self, apic: LocalApic, icr: Icr) -> None:
        """An ICR (or SELF_IPI) write asks to send ``icr``; routing is the owner's job."""

    def interrupt_pending(self, apic: LocalApic) -> None:
        """An IRR bit was set, an event was latched, or PPR dropped below a pending IRR."""

    def eoi_level(self, apic: LocalApic, vector: int) -> None:
        """EOI of a level-triggered vector (TMR bit set): broadcast to the IOAPIC(s)."""

    def arm_timer(self, apic: LocalApic, deadline: int | None) -> None:
        """Absolute time (cycles) of the next timer expiry; None disarms."""

    def now(self) -> int:
        """Current time in CPU cycles (TSC)."""
        return 0


def _highest(regs: memoryview, base: int) -> int:
    # The 8 bitmap words highest first, unrolled (this runs at every instruction boundary):
    # word i (at base + 4*i) holds vectors 32*i .. 32*i + 31.
    w = regs[base + 28]
    if w:
        return 223 + w.bit_length()
    w = regs[base + 24]
    if w:
        return 191 + w.bit_length()
    w = regs[base + 20]
    if w:
        return 159 + w.bit_length()
    w = regs[base + 16]
    if w:
        return 127 + w.bit_length()
    w = regs[base + 12]
    if w:
        return 95 + w.bit_length()
    w = regs[base + 8]
    if w:
        return 63 + w.bit_length()
    w = regs[base + 4]
    if w:
        return 31 + w.bit_length()
    w = regs[base]
    if w:
        return w.bit_length() - 1
    return -1


class LocalApic:
    """One local APIC.  See the module docstring for where state lives."""

    def __init__(
        self,
        apic_id: int,
        *,
        page: bytearray | None = None,
        hooks: ApicHooks | None = None,
        mode: str = "xapic",
        bsp: bool = False,
        lowest_priority: str = "vector_hashing",
        cycles_per_timer_tick: int = 1,
    ) -> None:
        if not 0 <= apic_id <= _U32:
            raise ValueError(f"APIC ID {apic_id:#x} out of range")
        if page is None:
            page = bytearray(R.PAGE_SIZE)
        if not isinstance(page, bytearray) or len(page) != R.PAGE_SIZE:
            raise ValueError("page must be a bytearray of exactly 4096 bytes")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if lowest_priority not in ARBITRATIONS:
            raise ValueError(f"lowest_priority must be one of {ARBITRATIONS}, not {lowest_priority!r}")
        if cycles_per_timer_tick < 1:
            raise ValueError("cycles_per_timer_tick must be >= 1")
        self.page: bytearray = page
        self.regs: memoryview = memoryview(page).cast("I")
        self.hooks: ApicHooks = hooks if hooks is not None else ApicHooks()
        self.initial_apic_id: int = apic_id  # hardware-assigned (x2APIC) ID; xAPIC ID = low 8 bits
        self.bsp: bool = bsp
        self.lowest_priority: str = lowest_priority
        self.cycles_per_timer_tick: int = cycles_per_timer_tick
        self.maxphyaddr: int = 52
        # xAPIC ICR writes keep their reserved bits (KVM's lapic.c does; set by the hypervisor model).
        self.icr_stores_reserved: bool = False
        # latched events
        self.nmi_pending = False
        self.init_pending = False
        self.smi_pending = False
        self.extint_pending = False
        self.sipi_vector: int | None = None
        self.arb_prio = 0
        # ESR internals
        self._esr_pending = 0
        self._esr_armed = True
        # timer internals
        self._timer_mode = R.TIMER_ONESHOT
        self._divide = 2
        self._tmr_tick = cycles_per_timer_tick * 2
        self._tmr_period = 0
        self._tmr_deadline: int | None = None
        self._tsc_deadline = 0
        # IA32_APIC_BASE
        self._apic_base = 0
        self._hw_enabled = False
        self._x2apic = False
        self.cleared_at = -1   # time (hooks.now) IRR/ISR were last cleared by a reset, INIT or disable
        self.refusing_at = -1  # ... and it last began to refuse fixed interrupts (reset or SVR EN 1 -> 0)
        self.reset()
        if mode == "x2apic":
            self.set_apic_base(self._apic_base | R.APIC_BASE_EXTD)
        elif mode == "disabled":
            self.set_apic_base(self._apic_base & ~R.APIC_BASE_EN)

    # ------------------------------------------------------------------ identity / mode
    @property
    def apic_base(self) -> int:
        return self._apic_base

    @property
    def mode(self) -> str:
        if not self._hw_enabled:
            return "disabled"
        return "x2apic" if self._x2apic else "xapic"

    @property
    def x2apic(self) -> bool:
        return self._x2apic

    @property
    def hw_enabled(self) -> bool:
        return self._hw_enabled

    @property
    def sw_enabled(self) -> bool:
        return bool(self.regs[_W_SVR] & _SVR_EN)

    @property
    def apic_id(self) -> int:
        """xAPIC: ID register bits 31:24; x2APIC: the 32-bit ID register; disabled: initial ID."""
        if not self._hw_enabled:
            return self.initial_apic_id
        v = self.regs[_W_ID]
        return v if self._x2apic else v >> 24

    @property
    def tpr(self) -> int:
        return self.regs[_W_TPR]

    @property
    def ppr(self) -> int:
        self.update_ppr()
        return self.regs[_W_PPR]

    def get_cr8(self) -> int:
        """MOV from CR8 (64-bit mode): TPR[7:4] (SDM §11.8.6)."""
        return (self.regs[_W_TPR] >> 4) & 0xF

    def set_cr8(self, value: int) -> None:
        """MOV to CR8: TPR[7:4] = value[3:0], TPR[3:0] = 0; PPR follows."""
        self.write_reg(R.APIC_TPR, (value & 0xF) << 4)

    def __repr__(self) -> str:
        return f"LocalApic(id={self.apic_id:#x}, mode={self.mode})"

    # ------------------------------------------------------------------ reset / INIT / APIC base
    def reset(self) -> None:
        """Power-up RESET (SDM §11.4.7.1 / §11.12.5.1): xAPIC mode, EN=1, all registers initialised."""
        self._apic_base = R.APIC_DEFAULT_BASE | R.APIC_BASE_EN | (R.APIC_BASE_BSP if self.bsp else 0)
        self._hw_enabled = True
        self._x2apic = False
        self._reset_state(xapic_id=True)
        self.sipi_vector = None

    def init_reset(self) -> None:
        """INIT (SDM §11.4.7.3): registers to their INIT state; APIC ID (and in x2APIC mode the derived
        LDR) and IA32_APIC_BASE are kept.  Clears latched NMI/INIT/SMI/ExtINT; a latched SIPI is kept
        (it may legitimately follow the INIT)."""
        saved_id = self.regs[_W_ID]
        self._reset_state(xapic_id=False)
        self.regs[_W_ID] = saved_id
        if self._x2apic:
            self.regs[_W_LDR] = R.x2apic_ldr(saved_id)

    def _reset_state(self, *, xapic_id: bool) -> None:
        self.cleared_at = self.refusing_at = self.hooks.now()   # pending interrupts are discarded
        self._stop_timer()
        self.page[0 : R.PAGE_SIZE] = _ZERO_PAGE
        regs = self.regs
        if xapic_id:
            regs[_W_ID] = (self.initial_apic_id & 0xFF) << 24
        regs[_W_LVR] = R.APIC_LVR_VALUE
        regs[_W_DFR] = R.DFR_FLAT
        regs[_W_SVR] = R.SVR_RESET
        for w in _W_LVTS:
            regs[w] = _MASKED
        self._timer_mode = R.TIMER_ONESHOT
        self._set_divide(0)
        self._tmr_period = 0
        self._tsc_deadline = 0
        self._esr_pending = 0
        self._esr_armed = True
        self.arb_prio = 0
        self.nmi_pending = False
        self.init_pending = False
        self.smi_pending = False
        self.extint_pending = False

    def set_apic_base(self, value: int) -> None:
        """WRMSR IA32_APIC_BASE (SDM §11.4.4, §11.12.5).  Raises GPFault for reserved bits and the
        illegal transitions: EN=0/EXTD=1, x2APIC -> xAPIC, disabled -> x2APIC."""
        old = self._apic_base
        if value == old:
            return
        reserved = R.APIC_BASE_RESERVED | ((_U64 >> self.maxphyaddr) << self.maxphyaddr)
        if value < 0 or value & reserved:
            raise GPFault(f"IA32_APIC_BASE: reserved bits set in {value:#x}")
        en = bool(value & R.APIC_BASE_EN)
        extd = bool(value & R.APIC_BASE_EXTD)
        if extd and not en:
            raise GPFault("IA32_APIC_BASE: EN=0 with EXTD=1 is an invalid state")
        if self._x2apic and en and not extd:
            raise GPFault("IA32_APIC_BASE: x2APIC -> xAPIC transition is illegal")
        if not self._hw_enabled and extd:
            raise GPFault("IA32_APIC_BASE: disabled -> x2APIC transition is illegal")
        was_enabled = self._hw_enabled
        was_x2 = self._x2apic
        self._apic_base = value
        self._hw_enabled = en
        self._x2apic = extd
        regs = self.regs
        if was_enabled and not en:
            # Hardware disable: nothing but the hardware-assigned ID survives (SDM §11.12.5.1:
            # "all the APIC register states ... except for the x2APIC ID are not preserved").
            self._reset_state(xapic_id=True)
            self.sipi_vector = None
        elif not was_enabled and en:
            regs[_W_ID] = (self.initial_apic_id & 0xFF) << 24
        if extd and not was_x2:
            # xAPIC -> x2APIC: the x2APIC ID is the hardware-assigned 32-bit ID (its low 8 bits are
            # the xAPIC ID); the logical ID is derived and read-only (SDM §11.12.5.1, §11.12.10.2).
            regs[_W_ID] = self.initial_apic_id
            regs[_W_LDR] = R.x2apic_ldr(self.initial_apic_id)

    # ------------------------------------------------------------------ bitmaps
    def highest_irr(self) -> int:
        return _highest(self.regs, _W_IRR)

    def highest_isr(self) -> int:
        return _highest(self.regs, _W_ISR)

    # Bit v of a bitmap: word base + 4 * (v >> 5) (one word per 16 bytes), bit v & 31.
    def set_irr(self, v: int) -> None:
        self.regs[_W_IRR + ((v >> 5) << 2)] |= 1 << (v & 31)

    def clear_irr(self, v: int) -> None:
        self.regs[_W_IRR + ((v >> 5) << 2)] &= ~(1 << (v & 31))

    def test_irr(self, v: int) -> bool:
        return bool(self.regs[_W_IRR + ((v >> 5) << 2)] & (1 << (v & 31)))

    def set_isr(self, v: int) -> None:
        self.regs[_W_ISR + ((v >> 5) << 2)] |= 1 << (v & 31)

    def clear_isr(self, v: int) -> None:
        self.regs[_W_ISR + ((v >> 5) << 2)] &= ~(1 << (v & 31))

    def test_isr(self, v: int) -> bool:
        return bool(self.regs[_W_ISR + ((v >> 5) << 2)] & (1 << (v & 31)))

    def set_tmr(self, v: int) -> None:
        self.regs[_W_TMR + ((v >> 5) << 2)] |= 1 << (v & 31)

    def clear_tmr(self, v: int) -> None:
        self.regs[_W_TMR + ((v >> 5) << 2)] &= ~(1 << (v & 31))

    def test_tmr(self, v: int) -> bool:
        return bool(self.regs[_W_TMR + ((v >> 5) << 2)] & (1 << (v & 31)))

    # ------------------------------------------------------------------ priority
    def _compute_ppr(self) -> int:
        regs = self.regs
        tpr = regs[_W_TPR]
        if self.page[_ISR_LO:_ISR_HI] == _NO_BITS:   # no ISR bit set (fast form of isrv < 0)
            return tpr & 0xFF
        isrv = _highest(regs, _W_ISR)
        if isrv < 0 or (tpr & 0xF0) >= (isrv & 0xF0):
            return tpr & 0xFF
        return isrv & 0xF0

    def update_ppr(self) -> None:
        """Recompute PPR from TPR and ISR into the page (SDM §11.8.3.1)."""
        self.regs[_W_PPR] = self._compute_ppr()

    def _update_ppr_notify(self) -> None:
        regs = self.regs
        old = regs[_W_PPR]
        new = self._compute_ppr()
        regs[_W_PPR] = new
        if new < old and self._hw_enabled and self.page[_IRR_LO:_IRR_HI] != _NO_BITS:
            irr = _highest(regs, _W_IRR)
            if irr >= 0 and (irr & 0xF0) > new:
                self.hooks.interrupt_pending(self)

    def has_interrupt(self) -> int:
        """Vector the APIC would present to the CPU now (highest IRR whose class is above the PPR
        class), else -1.  Ignores RFLAGS.IF.  A software-disabled APIC still presents IRR bits that
        are already pending (SDM §11.4.7.2: they "are held and require masking or handling")."""
        if not self._hw_enabled or self.page[_IRR_LO:_IRR_HI] == _NO_BITS:
            return -1   # (the empty-IRR test is the fast form of irr < 0 below)
        regs = self.regs
        irr = _highest(regs, _W_IRR)
        if irr < 0:
            return -1
        ppr = self._compute_ppr()
        regs[_W_PPR] = ppr
        return irr if (irr & 0xF0) > ppr else -1

    def ack_interrupt(self) -> int:
        """INTA cycle: move the deliverable vector from IRR to ISR and raise PPR; return it.  With
        nothing deliverable return the spurious vector (SVR[7:0]) and change nothing."""
        v = self.has_interrupt()
        if v < 0:
            return self.regs[_W_SVR] & 0xFF
        return self.ack_vector(v)

    def ack_vector(self, v: int) -> int:
        """:meth:`ack_interrupt` for a caller that has just evaluated ``v = has_interrupt()`` (>= 0)
        with nothing changed since: the INTA cycle without evaluating the IRR a second time."""
        regs = self.regs
        w = _W_IRR + ((v >> 5) << 2)
        bit = 1 << (v & 31)
        regs[w] &= ~bit
        regs[w - _ISR_FROM_IRR] |= bit
        # v is now the highest ISR vector and its class is above TPR's class.
        regs[_W_PPR] = v & 0xF0
        return v

    def eoi(self) -> None:
        """EOI: clear the highest ISR bit, update PPR; level-triggered (TMR set) -> hooks.eoi_level."""
        regs = self.regs
        v = _highest(regs, _W_ISR)
        if v < 0:
            return
        w = _W_ISR + ((v >> 5) << 2)
        bit = 1 << (v & 31)
        regs[w] &= ~bit
        self._update_ppr_notify()
        if regs[w - _W_ISR + _W_TMR] & bit:
            self.hooks.eoi_level(self, v)

    # ------------------------------------------------------------------ acceptance
    def accept_irq(self, delivery_mode: int, vector: int, trigger: int = 0, level: int = 1) -> bool:
        """Accept an interrupt message (KVM ``__apic_accept_irq``).  Returns True if accepted."""
        if not self._hw_enabled:
            return False
        if delivery_mode <= DM_LOWEST:
            if trigger and not level:
                return False  # level-triggered de-assert message: no effect
            regs = self.regs
            if not regs[_W_SVR] & _SVR_EN:
                return False
            if vector < 16:
                self._error(R.ESR_RECV_ILLEGAL_VECTOR)
                return False
            w = _W_IRR + ((vector >> 5) << 2)
            bit = 1 << (vector & 31)
            regs[w] |= bit
            if trigger:
                regs[w - _TMR_FROM_IRR] |= bit
            else:
                regs[w - _TMR_FROM_IRR] &= ~bit
            if delivery_mode:
                self.arb_prio += 1
            self.hooks.interrupt_pending(self)
            return True
        if delivery_mode == DM_NMI:
            self.nmi_pending = True
        elif delivery_mode == DM_INIT:
            if trigger and not level:
                return False  # INIT level de-assert
            self.init_pending = True
            self.sipi_vector = None  # a new INIT supersedes an earlier, unconsumed SIPI
        elif delivery_mode == DM_SIPI:
            self.sipi_vector = vector & 0xFF
        elif delivery_mode == DM_SMI:
            self.smi_pending = True
        elif delivery_mode == DM_EXTINT:
            self.extint_pending = True
        else:
            return False  # 011b is reserved
        self.hooks.interrupt_pending(self)
        return True

    def take_nmi(self) -> bool:
        r = self.nmi_pending
        self.nmi_pending = False
        return r

    def take_init(self) -> bool:
        r = self.init_pending
        self.init_pending = False
        return r

    def take_sipi(self) -> int | None:
        r = self.sipi_vector
        self.sipi_vector = None
        return r

    def take_smi(self) -> bool:
        r = self.smi_pending
        self.smi_pending = False
        return r

    def take_extint(self) -> bool:
        r = self.extint_pending
        self.extint_pending = False
        return r

    def deliver_lvt(self, off: int) -> bool:
        """A local interrupt source fired (LINT0/1 pin, thermal, perf counter, error, timer): deliver
        through its LVT entry unless masked.  Timer and error entries are always fixed/edge."""
        regs = self.regs
        lvt = regs[off >> 2]
        if not self._hw_enabled or lvt & _MASKED:
            return False
        if off == R.APIC_LVTT or off == R.APIC_LVTERR:
            return self.accept_irq(DM_FIXED, lvt & 0xFF, 0, 1)
        dm = (lvt >> 8) & 7
        trigger = (lvt >> 15) & 1 if off in (R.APIC_LVT0, R.APIC_LVT1) else 0
        return self.accept_irq(dm, lvt & 0xFF, trigger, 1)

    # ------------------------------------------------------------------ ESR
    def _error(self, bit: int) -> None:
        """Record an internal error; the first error after an ESR write raises the LVT Error
        interrupt (SDM §11.5.3: the ESR write "rearms the APIC error interrupt triggering")."""
        self._esr_pending |= bit
        if self._esr_armed and self._hw_enabled:
            lvt = self.regs[_W_LVTERR]
            if not lvt & _MASKED:
                self._esr_armed = False
                self.accept_irq(DM_FIXED, lvt & 0xFF, 0, 1)

    @property
    def esr_pending(self) -> int:
        """Errors detected since the last ESR write (not yet visible in the ESR register)."""
        return self._esr_pending

    # ------------------------------------------------------------------ register level
    def read_reg(self, off: int) -> int:
        """Register-level read (KVM ``kvm_lapic_reg_read``): the page value, except TMCCT (derived
        from the running timer), PPR (recomputed), write-only EOI/SELF_IPI (0), and the 64-bit ICR
        in x2APIC mode.  No access checks: see rdmsr / mmio_read."""
        if off == R.APIC_TMCCT:
            return self._current_count()
        if off == R.APIC_PPR:
            self.update_ppr()
        elif off == R.APIC_ICR and self._x2apic:
            return self.regs[_W_ICR2] << 32 | self.regs[_W_ICR]
        elif off == R.APIC_EOI or off == R.APIC_SELF_IPI:
            return 0
        return self.regs[off >> 2]

    def write_reg(self, off: int, value: int) -> bool:
        """Register-level write (KVM ``kvm_lapic_reg_write``) with the side effects of the register.

        Used by both interfaces and by a hypervisor replaying a trapped write (it passes the value
        already in the page; nothing here depends on the old page value of ``off``).  Returns False,
        with no effect, when the write is illegal in the current mode -- in x2APIC mode that is every
        case the SDM turns into #GP (read-only/absent register, reserved bits, non-zero EOI/ESR);
        wrmsr converts it to GPFault.  In xAPIC mode reserved bits are dropped and writes to
        read-only registers are ignored (returns True).  In x2APIC mode ``value`` of APIC_ICR is the
        64-bit MSR value."""
        regs = self.regs
        x2 = self._x2apic
        if off == _OFF_ICR:
            if x2:
                low = value & _U32
                high = value >> 32
                if low & ~_ICR_LOW_MASK or high > _U32:
                    return False
                regs[_W_ICR] = low
                regs[_W_ICR2] = high
            else:
                low = value & _ICR_LOW_MASK
                # KVM's kvm_lapic_reg_write(APIC_ICR) stores the value with only BUSY cleared; the
                # architectural model drops the reserved bits (SDM: undefined; docs/model.md).
                regs[_W_ICR] = (value & _U32 & ~R.ICR_BUSY) if self.icr_stores_reserved else low
                high = regs[_W_ICR2]
            # Icr.decode(low, high, x2) through its cache, then self._send(icr), inlined (one
            # frame less per IPI): (low, high, x2) is already decode's cache key (both masked).
            icr = _ICR_DECODED.get((low, high, x2)) or Icr.decode(low, high, x2)
            if icr.delivery_mode <= DM_LOWEST and icr.vector < 16:
                self._error(R.ESR_SEND_ILLEGAL_VECTOR)
            self.hooks.send_ipi(self, icr)
            return True
        if x2:
            if value >> 32:
                return False
        else:
            value &= _U32
        if off == _OFF_EOI:
            if x2 and value:
                return False
            self.eoi()
        elif off == _OFF_TPR:
            if x2 and value & ~0xFF:
                return False
            regs[_W_TPR] = value & 0xFF
            self._update_ppr_notify()
        elif off == R.APIC_SELF_IPI:
            if not x2 or value & ~0xFF:
                return False
            self._send(Icr.decode(value | (SH_SELF << 18), 0, True))
        elif off in R.LVT_WRITE_MASK:
            if x2 and value & ~R.LVT_DEFINED_MASK[off]:
                return False
            val = value & R.LVT_WRITE_MASK[off]
            if not regs[_W_SVR] & _SVR_EN:
                val |= _MASKED
            regs[off >> 2] = val
            if off == R.APIC_LVTT:
                self._lvtt_written(val)
        elif off == R.APIC_SVR:
            if x2 and value & ~0x3FF:
                return False
            val = value & 0x3FF
            if regs[_W_SVR] & _SVR_EN and not val & _SVR_EN:
                self.refusing_at = self.hooks.now()
            regs[_W_SVR] = val
            if not val & _SVR_EN:
                for w in _W_LVTS:
                    regs[w] |= _MASKED
        elif off == R.APIC_ESR:
            if x2 and value:
                return False
            regs[_W_ESR] = self._esr_pending
            self._esr_pending = 0
            self._esr_armed = True
        elif off == R.APIC_TMICT:
            if self._timer_mode != R.TIMER_TSC_DEADLINE:
                regs[_W_TMICT] = value
                self._start_count_timer()
        elif off == R.APIC_TDCR:
            if x2 and value & ~R.TDCR_MASK:
                return False
            regs[_W_TDCR] = value & R.TDCR_MASK
            self._tdcr_written()
        elif off == R.APIC_ID:
            if x2:
                return False
            regs[_W_ID] = value & 0xFF000000
        elif off == R.APIC_LDR:
            if x2:
                return False
            regs[_W_LDR] = value & 0xFF000000
        elif off == R.APIC_DFR:
            if x2:
                return False
            regs[_W_DFR] = value | 0x0FFFFFFF
        elif off == R.APIC_ICR2:
            if x2:
                return False
            regs[_W_ICR2] = value & 0xFF000000
        elif off in R.XAPIC_REGISTERS:
            # read-only registers (LVR, APR, PPR, RRD, ISR, TMR, IRR, TMCCT): ignored in xAPIC
            return not x2
        else:
            return False
        return True

    def _send(self, icr: Icr) -> None:
        if icr.delivery_mode <= DM_LOWEST and icr.vector < 16:
            self._error(R.ESR_SEND_ILLEGAL_VECTOR)
        self.hooks.send_ipi(self, icr)

    # ------------------------------------------------------------------ xAPIC MMIO
    def mmio_read(self, offset: int) -> int:
        """32-bit read at ``offset`` in the APIC page.  Not in xAPIC mode: the page is not decoded and
        reads return all ones.  Reserved offsets read 0 and log "illegal register address" (ESR bit
        7); offsets that are not 16-byte aligned read 0."""
        if not 0 <= offset < R.PAGE_SIZE:
            raise ValueError(f"offset {offset:#x} outside the APIC page")
        if not self._hw_enabled or self._x2apic:
            return _U32
        if offset & 0xF:
            return 0
        if offset not in R.XAPIC_REGISTERS:
            self._error(R.ESR_ILLEGAL_REGISTER)
            return 0
        return self.read_reg(offset)

    def mmio_write(self, offset: int, value: int) -> None:
        """32-bit write at ``offset``.  Ignored unless in xAPIC mode; reserved offsets log ESR bit 7;
        non-16-byte-aligned writes are dropped."""
        if not 0 <= offset < R.PAGE_SIZE:
            raise ValueError(f"offset {offset:#x} outside the APIC page")
        if not self._hw_enabled or self._x2apic or offset & 0xF:
            return
        if offset not in R.XAPIC_REGISTERS:
            self._error(R.ESR_ILLEGAL_REGISTER)
            return
        self.write_reg(offset, value & _U32)

    # ------------------------------------------------------------------ MSR interface
    def rdmsr(self, msr: int) -> int:
        if msr == R.MSR_IA32_APICBASE:
            return self._apic_base
        if msr == R.MSR_IA32_TSC_DEADLINE:
            if not self._hw_enabled or self._timer_mode != R.TIMER_TSC_DEADLINE:
                return 0
            return self._tsc_deadline
        if R.X2APIC_MSR_BASE <= msr <= R.X2APIC_MSR_LAST:
            if not self._x2apic:
                raise GPFault(f"RDMSR {msr:#x}: x2APIC MSR while not in x2APIC mode")
            off = (msr - R.X2APIC_MSR_BASE) << 4
            if off not in R.X2APIC_READABLE:
                what = "write-only" if off in R.X2APIC_WRITABLE else "reserved"
                raise GPFault(f"RDMSR {msr:#x}: {what} x2APIC register")
            return self.read_reg(off)
        raise GPFault(f"RDMSR {msr:#x}: not an APIC MSR")

    def wrmsr(self, msr: int, value: int) -> None:
        if not 0 <= value <= _U64:
            raise ValueError(f"MSR value {value:#x} is not a 64-bit quantity")
        # The x2APIC register MSRs first (the common case; the three cases do not overlap).
        if _X2_FIRST <= msr <= _X2_LAST:
            if not self._x2apic:
                raise GPFault(f"WRMSR {msr:#x}: x2APIC MSR while not in x2APIC mode")
            off = (msr - _X2_FIRST) << 4
            if off not in _X2_WRITABLE:
                what = "read-only" if off in R.X2APIC_READABLE else "reserved"
                raise GPFault(f"WRMSR {msr:#x}: {what} x2APIC register")
            if not self.write_reg(off, value):
                raise GPFault(f"WRMSR {msr:#x} value {value:#x}: reserved bits / illegal value")
            return
        if msr == R.MSR_IA32_APICBASE:
            self.set_apic_base(value)
            return
        if msr == R.MSR_IA32_TSC_DEADLINE:
            self._write_tsc_deadline(value)
            return
        raise GPFault(f"WRMSR {msr:#x}: not an APIC MSR")

    # ------------------------------------------------------------------ timer (SDM §11.5.4)
    # One APIC timer count = cycles_per_timer_tick core cycles x the divide value.
    def _set_divide(self, tdcr: int) -> None:
        self._divide = divide_value(tdcr)
        self._tmr_tick = self.cycles_per_timer_tick * self._divide

    @property
    def timer_mode(self) -> int:
        return self._timer_mode

    @property
    def timer_deadline(self) -> int | None:
        """Absolute cycle time of the armed expiry (what was last passed to hooks.arm_timer)."""
        return self._tmr_deadline

    @property
    def tsc_deadline(self) -> int:
        return self._tsc_deadline

    def _stop_timer(self) -> None:
        if self._tmr_deadline is not None:
            self._tmr_deadline = None
            self.hooks.arm_timer(self, None)

    def _start_count_timer(self) -> None:
        tmict = self.regs[_W_TMICT]
        if not tmict or self._timer_mode > R.TIMER_PERIODIC:
            self._tmr_period = 0
            self._stop_timer()
            return
        self._tmr_period = tmict * self._tmr_tick
        self._tmr_deadline = self.hooks.now() + self._tmr_period
        self.hooks.arm_timer(self, self._tmr_deadline)

    def _current_count(self) -> int:
        d = self._tmr_deadline
        if d is None or self._timer_mode == R.TIMER_TSC_DEADLINE:
            return 0
        now = self.hooks.now()
        rem = d - now
        if rem <= 0:
            if self._timer_mode != R.TIMER_PERIODIC or not self._tmr_period:
                return 0
            rem = self._tmr_period - (now - d) % self._tmr_period
        return -(-rem // self._tmr_tick)

    def _lvtt_written(self, val: int) -> None:
        new = (val >> R.LVT_TIMER_MODE_SHIFT) & 3
        old = self._timer_mode
        if new == old:
            return
        self._timer_mode = new
        if (old == R.TIMER_TSC_DEADLINE) != (new == R.TIMER_TSC_DEADLINE):
            # switching to/from TSC-deadline mode disarms the timer (SDM §11.5.4.1)
            self._stop_timer()
            self.regs[_W_TMICT] = 0
            self._tmr_period = 0
            self._tsc_deadline = 0
        elif new == R.TIMER_MODE_RESERVED:
            self._stop_timer()

    def _tdcr_written(self) -> None:
        old_tick = self._tmr_tick
        self._set_divide(self.regs[_W_TDCR])
        if self._tmr_tick == old_tick or self._tmr_deadline is None:
            return
        if self._timer_mode == R.TIMER_TSC_DEADLINE:
            return
        # Keep the current count; the remaining counts run at the new rate.
        tick = self._tmr_tick
        self._tmr_tick = old_tick
        count = self._current_count()
        self._tmr_tick = tick
        self._tmr_period = self.regs[_W_TMICT] * tick
        if count:
            self._tmr_deadline = self.hooks.now() + count * tick
            self.hooks.arm_timer(self, self._tmr_deadline)

    def _write_tsc_deadline(self, value: int) -> None:
        if not self._hw_enabled or self._timer_mode != R.TIMER_TSC_DEADLINE:
            return  # writes are ignored outside TSC-deadline mode (SDM §11.5.4.1)
        self._tsc_deadline = value
        if value == 0:
            self._stop_timer()
            return
        if value <= self.hooks.now():
            self._stop_timer()
            self._tsc_deadline = 0
            self.deliver_lvt(R.APIC_LVTT)
            return
        self._tmr_deadline = value
        self.hooks.arm_timer(self, value)

    def timer_expired(self) -> None:
        """Owner callback when the armed deadline has passed.  Stale calls (timer re-armed to a later
        time, or disarmed) are ignored.  One-shot/TSC-deadline: deliver and disarm (the deadline MSR
        reads 0 afterwards).  Periodic: deliver and re-arm one period after the previous deadline
        (missed periods are coalesced, the IRR bit can only be set once)."""
        d = self._tmr_deadline
        if d is None:
            return
        now = self.hooks.now()
        if now < d:
            return
        if self._timer_mode == R.TIMER_PERIODIC and self._tmr_period:
            period = self._tmr_period
            self._tmr_deadline = d + ((now - d) // period + 1) * period
            self.deliver_lvt(R.APIC_LVTT)
            self.hooks.arm_timer(self, self._tmr_deadline)
            return
        self._tmr_deadline = None
        if self._timer_mode == R.TIMER_TSC_DEADLINE:
            self._tsc_deadline = 0
        self.deliver_lvt(R.APIC_LVTT)
