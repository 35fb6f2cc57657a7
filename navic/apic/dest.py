"""Interrupt destination matching and lowest-priority arbitration (Intel SDM vol. 3 §11.6.2, §11.12.9,
§11.12.10; KVM ``kvm_apic_match_dest`` / ``kvm_irq_delivery_to_apic``).

``match_dest`` is the per-APIC acceptance test of a message; ``resolve`` is the reference
(brute-force, O(number of APICs)) router that owners can use or check a faster map against.
"""

from __future__ import annotations

from collections.abc import Sequence

from navic.apic import registers as R
from navic.apic.icr import DEST_PHYSICAL, DM_LOWEST, SH_ALL, SH_NONE, SH_OTHERS, SH_SELF, Icr
from navic.apic.lapic import ARBITRATIONS, LocalApic

__all__ = ["match_dest", "resolve", "lowest_priority_candidates", "arbitrate", "ARBITRATIONS"]

_W_ID = R.APIC_ID >> 2
_W_LDR = R.APIC_LDR >> 2
_W_DFR = R.APIC_DFR >> 2
_W_SVR = R.APIC_SVR >> 2


def match_dest(target: LocalApic, source: LocalApic | None, icr: Icr) -> bool:
    """Does ``target`` accept a message with this destination?  A hardware-disabled APIC accepts
    nothing.  ``source`` is None for messages that do not come from an APIC (IOAPIC/MSI): then the
    "self" shorthand matches nothing and "all excluding self" matches everyone.

    The destination is interpreted in the *target's* mode (as KVM does): in x2APIC mode broadcast is
    0xFFFFFFFF and logical IDs are cluster<<16 | bit; in xAPIC mode broadcast is 0xFF and logical
    matching uses DFR (flat 0xF / cluster 0x0, any other model matches nothing) against LDR[31:24].
    """
    if not target._hw_enabled:
        return False
    sh = icr.shorthand
    if sh == SH_NONE:
        dest = icr.dest
        regs = target.regs
        if target._x2apic:
            if dest == 0xFFFFFFFF:
                return True
            if icr.dest_mode == DEST_PHYSICAL:
                return dest == regs[_W_ID]
            ldr = regs[_W_LDR]
            return (ldr >> 16) == (dest >> 16) and (ldr & dest & 0xFFFF) != 0
        if dest == 0xFF:
            return True
        if icr.dest_mode == DEST_PHYSICAL:
            return dest == regs[_W_ID] >> 24
        if dest > 0xFF:
            return False
        lid = regs[_W_LDR] >> 24
        model = regs[_W_DFR] >> 28
        if model == R.DFR_MODEL_FLAT:
            return (lid & dest) != 0
        if model == R.DFR_MODEL_CLUSTER:
            return (lid >> 4) == (dest >> 4) and (lid & dest & 0xF) != 0
        return False
    if sh == SH_SELF:
        return target is source
    if sh == SH_ALL:
        return True
    return target is not source


def lowest_priority_candidates(
    apics: Sequence[LocalApic], source: LocalApic | None, icr: Icr
) -> list[LocalApic]:
    """The legal receivers of a lowest-priority message: the matching APICs that are hardware- and
    software-enabled (a software-disabled APIC refuses fixed/lowest interrupts), in ``apics`` order."""
    return [a for a in apics if match_dest(a, source, icr) and a.regs[_W_SVR] & R.SVR_APIC_ENABLED]


def arbitrate(candidates: Sequence[LocalApic], icr: Icr, rule: str) -> LocalApic:
    """Pick one of ``candidates`` (non-empty) for a lowest-priority message.

    * ``vector_hashing`` (KVM default, ``kvm_vector_to_index``): candidate number vector % count.
    * ``lowest_priority`` (SDM §11.6.2.4): lowest PPR; ties go to the lowest APIC ID.  No focus
      processor check.
    * ``round_robin``: the candidate that has accepted the fewest lowest-priority interrupts so far
      (KVM's ``apic_arb_prio``, used when vector hashing is off); ties go to the first in order.
    """
    if rule == "vector_hashing":
        return candidates[icr.vector % len(candidates)]
    if rule == "lowest_priority":
        best = candidates[0]
        best_key = (best.ppr, best.apic_id)
        for a in candidates[1:]:
            key = (a.ppr, a.apic_id)
            if key < best_key:
                best, best_key = a, key
        return best
    if rule == "round_robin":
        best = candidates[0]
        for a in candidates[1:]:
            if a.arb_prio < best.arb_prio:
                best = a
        return best
    raise ValueError(f"unknown lowest-priority arbitration {rule!r}; expected one of {ARBITRATIONS}")


def resolve(
    apics: Sequence[LocalApic],
    source: LocalApic | None,
    icr: Icr,
    arbitration: str | None = None,
) -> list[LocalApic]:
    """The APICs that must receive ``icr`` (call ``accept_irq`` on each).  For lowest priority with
    no shorthand or "all excluding self", exactly one legal candidate (or none); the rule is
    ``arbitration``, else ``source.lowest_priority``, else "vector_hashing".  The "self" shorthand
    always yields just the source (for any delivery mode, like KVM)."""
    if icr.shorthand == SH_SELF:
        return [source] if source is not None and source._hw_enabled else []
    if icr.delivery_mode != DM_LOWEST:
        if icr.shorthand == SH_NONE and icr.dest_mode == DEST_PHYSICAL:
            # Physical destination (the common unicast): match_dest's physical branch, inlined
            # (a plain loop: no list-comprehension frame per message).
            dest = icr.dest
            out = []
            for a in apics:
                if a._hw_enabled and ((dest == 0xFFFFFFFF or dest == a.regs[_W_ID]) if a._x2apic
                                      else (dest == 0xFF or dest == a.regs[_W_ID] >> 24)):
                    out.append(a)
            return out
        # The broadcast shorthands: match_dest is "hardware-enabled" (and, for all-excluding-self,
        # "not the source"), inlined -- no call per APIC on a broadcast.
        if icr.shorthand == SH_ALL:
            return [a for a in apics if a._hw_enabled]
        if icr.shorthand == SH_OTHERS:
            return [a for a in apics if a._hw_enabled and a is not source]
        return [a for a in apics if match_dest(a, source, icr)]
    candidates = lowest_priority_candidates(apics, source, icr)
    if len(candidates) <= 1:
        return candidates
    rule = arbitration or (source.lowest_priority if source is not None else "vector_hashing")
    return [arbitrate(candidates, icr, rule)]
