"""``navic conformance``: differential testing of the APIC model against QEMU (navic/conformance)."""

from navic.cli import main
from navic.conformance.cli import conformance

main.add_command(conformance)
