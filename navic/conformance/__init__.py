"""Differential testing of navic's architectural local APIC against independent emulators.

The same op sequence (:class:`navic.conformance.case.Case`) runs twice:

* on QEMU (TCG) as a generated bare-metal guest image (:mod:`navic.conformance.image`,
  :mod:`navic.conformance.qemu`) that reports APIC registers, register reads and the interrupt
  delivery log on the debug port;
* on navic in bare-metal mode (:mod:`navic.conformance.navic_side`).

:mod:`navic.conformance.compare` diffs the two register by register and delivery by delivery,
:mod:`navic.conformance.shrink` delta-debugs a diverging op list down to a minimal one and
:mod:`navic.conformance.gen` produces seeded random cases. See docs/conformance.md.
"""
