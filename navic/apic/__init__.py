"""The architectural local APIC: register page, xAPIC/x2APIC interfaces, delivery and the timer."""

from navic.apic.dest import arbitrate, lowest_priority_candidates, match_dest, resolve
from navic.apic.icr import Icr
from navic.apic.lapic import ApicHooks, GPFault, LocalApic

__all__ = [
    "ApicHooks",
    "GPFault",
    "Icr",
    "LocalApic",
    "arbitrate",
    "lowest_priority_candidates",
    "match_dest",
    "resolve",
]
