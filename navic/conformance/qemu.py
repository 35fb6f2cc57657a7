"""Run a compiled case on QEMU (TCG, never KVM) and parse what the guest reported.

QEMU runs with one TCG thread (``-accel tcg,thread=single``): the vCPUs are executed round-robin
and a vCPU that receives an interrupt is scheduled as soon as the sender's translation block
ends, so a case's outcome does not depend on host scheduling. ``-enable-kvm`` is never used:
the in-kernel APIC of this host's KVM clears ISR on delivery and is not a reference.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from navic.conformance import image
from navic.conformance.case import DUMP_FIELDS, Case

QEMU_BINARIES = ("qemu-system-x86_64", "qemu-system-i386")
TOOLS = ("as", "ld", "objcopy")


class EmulatorError(RuntimeError):
    """The emulator did not produce a result (crash, timeout, guest exception)."""


def find_qemu() -> str | None:
    for b in QEMU_BINARIES:
        p = shutil.which(b)
        if p:
            return p
    return None


def missing_tools() -> list[str]:
    """What is missing to run QEMU cases (empty list: ready)."""
    out = [t for t in TOOLS if shutil.which(t) is None]
    if find_qemu() is None:
        out.append("qemu-system-x86")
    return out


@dataclass
class Outcome:
    """What one run reported, in the same shape as the navic side's result."""

    apic: dict[int, dict[str, int]]                 # cpu -> DUMP_FIELDS name -> value
    deliveries: dict[int, list[int]]                # cpu -> vectors in delivery order
    reads: dict[str, int]                           # var name -> last value read
    reads_all: list[tuple[str, int]] = field(default_factory=list)
    wall: float = 0.0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"apic": {str(k): v for k, v in self.apic.items()},
                "deliveries": {str(k): v for k, v in self.deliveries.items()},
                "reads": self.reads, "errors": self.errors}


def parse_output(data: bytes, var_names: list[str]) -> Outcome:
    if data[:4] == b"EXC!":
        vec, a, b = struct.unpack_from("<III", data, 4)
        raise EmulatorError(f"guest exception vector {vec} (stack: {a:#x} {b:#x})")
    if data[:4] != b"NVC1":
        raise EmulatorError(f"bad debug-port output ({len(data)} bytes: {data[:16]!r})")
    ncpus, nreads = struct.unpack_from("<II", data, 4)
    pos = 12
    apic: dict[int, dict[str, int]] = {}
    dels: dict[int, list[int]] = {}
    nf = len(DUMP_FIELDS)
    for c in range(ncpus):
        words = struct.unpack_from(f"<{nf}I", data, pos)
        pos += 4 * nf
        apic[c] = {name: w for (name, _), w in zip(DUMP_FIELDS, words, strict=True)}
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        dels[c] = list(struct.unpack_from(f"<{n}I", data, pos))
        pos += 4 * n
    reads: dict[str, int] = {}
    reads_all = []
    for _ in range(nreads):
        vid, lo, hi = struct.unpack_from("<III", data, pos)
        pos += 12
        name = var_names[vid]
        reads[name] = (hi << 32) | lo
        reads_all.append((name, (hi << 32) | lo))
    return Outcome(apic, dels, reads, reads_all)


def qemu_command(qemu: str, img: Path, out: Path, cpus: int) -> list[str]:
    return [qemu, "-nodefaults", "-machine", "pc", "-accel", "tcg,thread=single", "-cpu", "qemu64",
            "-smp", str(cpus), "-m", "32", "-display", "none", "-no-reboot",
            "-drive", f"file={img},format=raw,if=ide",
            "-debugcon", f"file:{out}", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]


def run_case(case: Case, *, workdir: str | Path | None = None, timeout: float = 30.0,
             qemu: str | None = None) -> Outcome:
    qemu = qemu or find_qemu()
    if qemu is None:
        raise EmulatorError("qemu-system-x86_64 not found")
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="navic-qemu-")
        workdir = tmp.name
    try:
        wd = Path(workdir)
        img, prog = image.build_case(case, wd)
        out = wd / "debugcon.bin"
        out.unlink(missing_ok=True)
        t0 = time.monotonic()
        try:
            r = subprocess.run(qemu_command(qemu, img, out, case.cpus), capture_output=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise EmulatorError(f"QEMU timed out after {timeout:.0f} s (interrupt storm or hang?)") from exc
        wall = time.monotonic() - t0
        data = out.read_bytes() if out.exists() else b""
        status = r.returncode
        if status != (image.EXIT_OK << 1) | 1:
            if data[:4] == b"EXC!":
                parse_output(data, prog.var_names)
            why = {(image.EXIT_TIMEOUT << 1) | 1: "APs did not start or dump",
                   (image.EXIT_STORM << 1) | 1: "interrupt storm (delivery log full)"}.get(status, "")
            err = r.stderr.decode(errors="replace")[-2000:]
            raise EmulatorError(f"QEMU exit status {status} {why}: {err}")
        res = parse_output(data, prog.var_names)
        res.wall = wall
        return res
    finally:
        if tmp is not None:
            tmp.cleanup()
