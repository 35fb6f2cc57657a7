"""Nested APIC virtualisation at L0: the nested-SVM core (KVM's nested.c) and the designs of the
"Nested AVIC design" thread, one small strategy class each (docs/nested-design.md):

* :mod:`.none`   — the status quo: no AVIC for L1; L1 emulates L2's APIC;
* :mod:`.dummy`  — every L2 on one dummy physical ID table; L0 emulates the IPIs against L1's tables;
* :mod:`.shadow` — L0 shadows L1's physical ID tables, tracking writes to them (the RFC v3 series);
* :mod:`.shadow_x2avic` — the same, extended to x2AVIC for L2 as the RFC's author described it.
* :mod:`.runcache` — the dummy table plus L0's own IsRunning for the L2 vCPUs that run (navic's).
"""

from __future__ import annotations

from typing import Any

DESIGNS = ("none", "shadow", "dummy", "shadow-x2avic", "runcache")


def make_design(name: str, core: Any) -> Any:
    if name == "none":
        from navic.hv.nested.none import NoneDesign

        return NoneDesign(core)
    if name == "dummy":
        from navic.hv.nested.dummy import DummyDesign

        return DummyDesign(core)
    if name == "shadow":
        from navic.hv.nested.shadow import ShadowDesign

        return ShadowDesign(core)
    if name == "shadow-x2avic":
        from navic.hv.nested.shadow_x2avic import ShadowX2avicDesign

        return ShadowX2avicDesign(core)

    if name == "runcache":
        from navic.hv.nested.runcache import RunCacheDesign

        return RunCacheDesign(core)
    raise ValueError(f"unknown nested design {name!r}; expected one of {', '.join(DESIGNS)}")
