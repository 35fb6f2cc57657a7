"""Compile a :class:`~navic.conformance.case.Case` into a bootable x86 disk image.

The image is GNU assembler source generated here and built at run time with binutils
(``as``/``ld``/``objcopy``); nothing prebuilt is shipped. Layout (physical addresses):

* ``0x7C00`` boot sector: loads the rest of the image with INT 13h AH=42h, enters 32-bit
  protected mode with flat segments (the xAPIC page at ``0xFEE00000`` is then plain memory
  access), installs a 256-entry IDT;
* ``0x9000`` AP trampoline (SIPI vector 09h): real mode -> protected mode, configures its APIC
  from the case's :class:`~navic.conformance.case.CpuSetup`, counts itself ready, ``STI; HLT``
  forever;
* BSP: masks the 8259s and the LVTs, applies its set-up, starts the APs (INIT, SIPI), runs the
  case's ops (each followed by a settle delay), then ``CLI`` and dumps: its own APIC, then asks
  every AP to dump itself (an NMI with the "dump" flag set), then writes the result block to the
  debug port (0xE9) with ``rep outsb`` and leaves through ``isa-debug-exit`` (port 0xF4).

Result block (little-endian u32 words; see :func:`navic.conformance.qemu.parse_output`)::

    "NVC1" ncpus nreads
    per CPU: len(DUMP_FIELDS) words, ndeliveries, then that many vectors
    nreads x (var_id, lo, hi)

Every interrupt (vectors 16..255 and NMI) enters a common stub that logs the vector in the CPU's
delivery log, then runs the BSP's custom handler for that vector or EOIs (the default handler;
NMI: no EOI). Vectors 0..15 other than NMI are CPU exceptions: the image reports ``"EXC!"``
with the vector and exits with status 3.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from navic.conformance.case import DUMP_FIELDS, REG_OFFSETS, Case, read_var
from navic.guest import ops as O

APIC = 0xFEE00000
RES = 0x20000          # result area
DUMP = RES + 0x100     # per CPU 0x100 bytes
DLOG = RES + 0x1000    # per CPU 0x1000 bytes: count, vectors
DLOG_MAX = 1000
RLOG = RES + 0x10000   # count, then (var, lo, hi) triples
RLOG_MAX = 4000
FLAGS = RES + 0x20     # ready_count, dump_req, done_count
READY, DUMPREQ, DONE = FLAGS, FLAGS + 4, FLAGS + 8
STACK_TOP = 0x80000    # CPU i: STACK_TOP - i*0x2000
MAX_CPUS = 8
SETTLE_LOOPS = 64      # iterations of the delay after every op (TCG takes interrupts at TB ends)
EXIT_OK = 0x10         # isa-debug-exit: QEMU exits with (value << 1) | 1
EXIT_EXC = 0x03
EXIT_TIMEOUT = 0x05
EXIT_STORM = 0x06

MODES = O.DELIVERY_MODES
SHORTHANDS = O.SHORTHANDS


class BuildError(RuntimeError):
    pass


@dataclass
class Program:
    """Assembly source plus the mapping of read-variable ids to names."""

    source: str
    var_names: list[str]


def icr_low(op: O.Ipi) -> int:
    return ((op.vector & 0xFF) | (MODES[op.mode] << 8) | (O.DEST_MODES[op.dest_mode] << 11)
            | ((op.level & 1) << 14) | (O.TRIGGERS[op.trigger] << 15) | (SHORTHANDS[op.shorthand] << 18))


def icr_dest(op: O.Ipi) -> int:
    dest = op.to if op.to is not None else (op.dest or 0)  # vCPU i has APIC ID i on both sides
    return (dest & 0xFF) << 24


class _Emitter:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.vars: list[str] = []
        self.label = 0

    def emit(self, *lines: str) -> None:
        self.lines.extend(lines)

    def fresh(self) -> str:
        self.label += 1
        return f".L{self.label}"

    def var(self, name: str) -> int:
        self.vars.append(name)
        return len(self.vars) - 1

    def mmio_w(self, off: int, value: int) -> None:
        self.emit(f"    mov dword ptr [{APIC + off:#x}], {value & 0xFFFFFFFF:#x}")

    def settle(self) -> None:
        self.emit("    call settle")

    def ops(self, ops: tuple[O.Op, ...], where: str) -> None:
        for op in ops:
            self.op(op, where)

    def op(self, op: O.Op, where: str) -> None:  # noqa: C901 - one branch per op kind
        t = type(op)
        self.emit(f"    # {where}[{op.index}] {t.__name__}")
        if t is O.Sti:
            self.emit("    sti")
        elif t is O.Cli:
            self.emit("    cli")
        elif t is O.Hlt:
            self.emit("    hlt")
        elif t is O.Eoi:
            self.mmio_w(0xB0, 0)
        elif t is O.Write:
            self.mmio_w(REG_OFFSETS[op.reg], op.value)  # type: ignore[attr-defined]
        elif t is O.MmioWrite:
            self.mmio_w(op.offset, op.value)  # type: ignore[attr-defined]
        elif t is O.Read or t is O.MmioRead:
            off = REG_OFFSETS[op.reg] if t is O.Read else op.offset  # type: ignore[attr-defined]
            vid = self.var(op.into or read_var(where, op.index))  # type: ignore[attr-defined]
            self.emit(f"    mov eax, dword ptr [{APIC + off:#x}]", "    xor edx, edx",
                      f"    mov ebx, {vid}", "    call log_read")
        elif t is O.Rdmsr:
            vid = self.var(op.into or read_var(where, op.index))  # type: ignore[attr-defined]
            self.emit(f"    mov ecx, {op.msr:#x}", "    rdmsr",  # type: ignore[attr-defined]
                      f"    mov ebx, {vid}", "    call log_read")
        elif t is O.Wrmsr:
            v = op.value  # type: ignore[attr-defined]
            msr = op.msr  # type: ignore[attr-defined]
            self.emit(f"    mov ecx, {msr:#x}", f"    mov eax, {v & 0xFFFFFFFF:#x}",
                      f"    mov edx, {(v >> 32) & 0xFFFFFFFF:#x}", "    wrmsr")
        elif t is O.Ipi:
            assert isinstance(op, O.Ipi)
            self.mmio_w(0x310, icr_dest(op))
            self.mmio_w(0x300, icr_low(op))
        elif t is O.Compute:
            n = max(1, op.cycles // 20)  # type: ignore[attr-defined]
            lab = self.fresh()
            self.emit(f"    mov ecx, {n}", f"{lab}:", "    dec ecx", f"    jnz {lab}")
        elif t is O.Repeat:
            for _ in range(op.times):  # type: ignore[attr-defined]
                self.ops(op.ops, where)  # type: ignore[attr-defined]
            return
        else:
            raise BuildError(f"op {t.__name__} is not supported by the conformance image")
        self.settle()


def _setup_apic(e: _Emitter, cfg_reg: str) -> None:
    """Mask every LVT, then DFR, LDR, TPR, SVR from the 16-byte config at [cfg_reg]; clear ESR."""
    for off in (0x320, 0x330, 0x340, 0x350, 0x360, 0x370):
        e.mmio_w(off, 0x10000)
    for k, off in enumerate((0xE0, 0xD0, 0x80, 0xF0)):
        e.emit(f"    mov eax, dword ptr [{cfg_reg}+{4 * k}]", f"    mov dword ptr [{APIC + off:#x}], eax")
    e.mmio_w(0x280, 0)
    e.mmio_w(0x280, 0)


def generate(case: Case) -> Program:
    if not 1 <= case.cpus <= MAX_CPUS:
        raise BuildError(f"cpus must be 1..{MAX_CPUS}")
    e = _Emitter()
    E = e.emit
    E(".intel_syntax noprefix",
      ".section .text",
      ".globl _start",
      ".code16",
      "_start:",
      "    cli",
      "    xor ax, ax",
      "    mov ds, ax",
      "    mov es, ax",
      "    mov ss, ax",
      "    mov sp, 0x7C00",
      "    mov si, offset dap",
      "    mov ah, 0x42",
      "    int 0x13",
      "    jc boot_fail",
      "    jmp stage2",
      "boot_fail:",
      "    mov al, 'F'",
      "    out 0xE9, al",
      "    mov al, 1",
      "    out 0xF4, al",
      "1:  hlt",
      "    jmp 1b",
      "    .p2align 2",
      "dap:",
      "    .byte 0x10, 0",
      "    .word (image_end - stage2 + 511) / 512",
      "    .word 0x7E00, 0",
      "    .long 1, 0",
      "    .p2align 3",
      "gdt:",
      "    .quad 0",
      "    .quad 0x00CF9A000000FFFF",
      "    .quad 0x00CF92000000FFFF",
      "gdt_desc:",
      "    .word 23",
      "    .long gdt",
      "    .org 510",
      "    .word 0xAA55",
      "stage2:",
      "    lgdt [gdt_desc]",
      "    mov eax, cr0",
      "    or eax, 1",
      "    mov cr0, eax",
      "    .byte 0x66, 0xEA",
      "    .long pm32",
      "    .word 0x08",
      ".code32",
      "pm32:",
      "    mov ax, 0x10",
      "    mov ds, ax",
      "    mov es, ax",
      "    mov ss, ax",
      "    mov fs, ax",
      "    mov gs, ax",
      f"    mov esp, {STACK_TOP:#x}",
      "    jmp bsp_main",
      # ---- AP trampoline at 0x9000 ----
      "    .org 0x9000 - 0x7C00",
      ".code16",
      "ap_entry:",
      "    cli",
      "    xor ax, ax",
      "    mov ds, ax",
      "    lgdt [gdt_desc]",
      "    mov eax, cr0",
      "    or eax, 1",
      "    mov cr0, eax",
      "    .byte 0x66, 0xEA",
      "    .long ap_pm32",
      "    .word 0x08",
      ".code32",
      "ap_pm32:",
      "    mov ax, 0x10",
      "    mov ds, ax",
      "    mov es, ax",
      "    mov ss, ax",
      "    mov fs, ax",
      "    mov gs, ax",
      f"    mov eax, dword ptr [{APIC + 0x20:#x}]",
      "    shr eax, 24",
      "    mov ebp, eax",
      "    shl eax, 13",
      f"    mov esp, {STACK_TOP:#x}",
      "    sub esp, eax",
      "    lidt [idt_desc]",
      "    mov esi, ebp",
      "    shl esi, 4",
      "    add esi, offset cpu_cfg",
      )
    _setup_apic(e, "esi")
    E(f"    lock inc dword ptr [{READY:#x}]",
      "    sti",
      "ap_idle:",
      "    hlt",
      "    jmp ap_idle",
      # ---- helpers ----
      "settle:",
      "    pause",  # QEMU TCG: PAUSE ends the time slice, the other vCPUs run (round robin)
      f"    mov ecx, {SETTLE_LOOPS}",
      "1:  dec ecx",
      "    jnz 1b",
      "    ret",
      # log_read: ebx = var id, edx:eax = value
      "log_read:",
      f"    mov ecx, dword ptr [{RLOG:#x}]",
      f"    cmp ecx, {RLOG_MAX}",
      "    jae 1f",
      "    lea ecx, [ecx+ecx*2]",
      f"    mov dword ptr [{RLOG + 4:#x}+ecx*4], ebx",
      f"    mov dword ptr [{RLOG + 8:#x}+ecx*4], eax",
      f"    mov dword ptr [{RLOG + 12:#x}+ecx*4], edx",
      f"    inc dword ptr [{RLOG:#x}]",
      "1:  ret",
      # cpu_index -> eax (from the stack pointer: each CPU has its own 8 KiB stack)
      "cpu_index:",
      f"    mov eax, {STACK_TOP - 1:#x}",
      "    sub eax, esp",
      "    shr eax, 13",
      "    ret",
      # dump_self: eax = cpu index; reads this CPU's APIC into DUMP + idx*0x100
      "dump_self:",
      "    mov edi, eax",
      "    shl edi, 8",
      f"    add edi, {DUMP:#x}",
      )
    for k, (_name, off) in enumerate(DUMP_FIELDS):
        E(f"    mov eax, dword ptr [{APIC + off:#x}]", f"    mov dword ptr [edi+{4 * k}], eax")
    E("    ret",
      # common interrupt entry: [esp] = vector
      "int_common:",
      "    pushad",
      "    mov ebx, dword ptr [esp+32]",
      "    call cpu_index",
      "    mov ebp, eax",
      "    cmp ebx, 2",
      "    jne 2f",
      "    test ebp, ebp",
      "    jz 3f",
      f"    cmp dword ptr [{DUMPREQ:#x}], 0",
      "    je 3f",
      # AP asked to dump itself: never returns
      "    mov eax, ebp",
      "    call dump_self",
      f"    lock inc dword ptr [{DONE:#x}]",
      "9:  cli",
      "    hlt",
      "    jmp 9b",
      "2:  cmp ebx, 16",
      "    jb exception",
      "3:  mov edi, ebp",
      "    shl edi, 12",
      f"    add edi, {DLOG:#x}",
      "    mov ecx, dword ptr [edi]",
      f"    cmp ecx, {DLOG_MAX}",
      "    jae storm",
      "    mov dword ptr [edi+4+ecx*4], ebx",
      "    inc dword ptr [edi]",
      "    test ebp, ebp",
      "    jnz 4f",
      "    mov eax, dword ptr [handler_table+ebx*4]",
      "    test eax, eax",
      "    jz 4f",
      "    call eax",
      "    jmp 5f",
      "4:  cmp ebx, 2",
      "    je 5f",
      f"    mov dword ptr [{APIC + 0xB0:#x}], 0",
      "5:  popad",
      "    add esp, 4",
      "    iretd",
      "exception:",
      "    mov dword ptr [exc_info], 0x21435845",  # "EXC!"
      "    mov dword ptr [exc_info+4], ebx",
      "    mov eax, dword ptr [esp+36]",  # error code or EIP
      "    mov dword ptr [exc_info+8], eax",
      "    mov eax, dword ptr [esp+40]",
      "    mov dword ptr [exc_info+12], eax",
      "    mov dx, 0xE9",
      "    mov esi, offset exc_info",
      "    mov ecx, 16",
      "    rep outsb",
      f"    mov al, {EXIT_EXC}",
      "    out 0xF4, al",
      "    cli",
      "    hlt",
      "storm:",
      f"    mov al, {EXIT_STORM}",
      "    out 0xF4, al",
      "    cli",
      "    hlt",
      "timeout:",
      f"    mov al, {EXIT_TIMEOUT}",
      "    out 0xF4, al",
      "    cli",
      "    hlt",
      )
    # interrupt stubs, 16 bytes each
    E("    .p2align 4", "stubs:")
    for v in range(256):
        E(f"    push {v}", "    jmp int_common", "    .p2align 4")
    # ---- BSP main ----
    E("bsp_main:",
      # IDT
      "    mov ecx, 0",
      "1:  mov eax, ecx",
      "    shl eax, 4",
      "    add eax, offset stubs",
      "    mov word ptr [idt+ecx*8], ax",
      "    mov word ptr [idt+ecx*8+2], 0x08",
      "    mov word ptr [idt+ecx*8+4], 0x8E00",
      "    shr eax, 16",
      "    mov word ptr [idt+ecx*8+6], ax",
      "    inc ecx",
      "    cmp ecx, 256",
      "    jb 1b",
      "    lidt [idt_desc]",
      "    mov al, 0xFF",
      "    out 0x21, al",
      "    out 0xA1, al",
      "    mov esi, offset cpu_cfg",
      )
    _setup_apic(e, "esi")
    if case.cpus > 1:
        E(f"    mov dword ptr [{APIC + 0x310:#x}], 0",
          f"    mov dword ptr [{APIC + 0x300:#x}], 0x000C4500",   # INIT, all excluding self
          "    mov ecx, 100000",
          "1:  dec ecx",
          "    jnz 1b",
          f"    mov dword ptr [{APIC + 0x300:#x}], 0x000C4609",   # SIPI vector 09h
          "    mov ecx, 50000000",
          f"1:  cmp dword ptr [{READY:#x}], {case.cpus - 1}",
          "    je 2f",
          "    pause",
          "    dec ecx",
          "    jnz 1b",
          "    jmp timeout",
          "2:",
          )
        e.mmio_w(0x280, 0)
        e.mmio_w(0x280, 0)
    E("    # ---- program ----")
    e.ops(case.ops, "m")
    E("    # ---- final dump ----",
      "    cli",
      "    mov eax, 0",
      "    call dump_self",
      )
    if case.cpus > 1:
        E(f"    mov dword ptr [{DUMPREQ:#x}], 1",
          f"    mov dword ptr [{APIC + 0x310:#x}], 0",
          f"    mov dword ptr [{APIC + 0x300:#x}], 0x000C0400",   # NMI, all excluding self
          "    mov ecx, 50000000",
          f"1:  cmp dword ptr [{DONE:#x}], {case.cpus - 1}",
          "    je 2f",
          "    pause",
          "    dec ecx",
          "    jnz 1b",
          "    jmp timeout",
          "2:",
          )
    # output
    E("    mov dx, 0xE9",
      f"    mov dword ptr [{RES:#x}], 0x3143564E",  # "NVC1"
      f"    mov dword ptr [{RES + 4:#x}], {case.cpus}",
      f"    mov eax, dword ptr [{RLOG:#x}]",
      f"    mov dword ptr [{RES + 8:#x}], eax",
      f"    mov esi, {RES:#x}",
      "    mov ecx, 12",
      "    rep outsb",
      )
    for i in range(case.cpus):
        E(f"    mov esi, {DUMP + 0x100 * i:#x}",
          f"    mov ecx, {4 * len(DUMP_FIELDS)}",
          "    rep outsb",
          f"    mov esi, {DLOG + 0x1000 * i:#x}",
          "    mov ecx, dword ptr [esi]",
          "    lea ecx, [ecx*4+4]",
          "    rep outsb")
    E(f"    mov esi, {RLOG + 4:#x}",
      f"    mov ecx, dword ptr [{RLOG:#x}]",
      "    lea ecx, [ecx+ecx*2]",
      "    shl ecx, 2",
      "    rep outsb",
      f"    mov al, {EXIT_OK}",
      "    out 0xF4, al",
      "    cli",
      "8:  hlt",
      "    jmp 8b",
      )
    # ---- custom handlers (BSP): called with interrupts still disabled, registers saved ----
    hmap = case.handler_map
    for vec, hops in sorted(hmap.items()):
        E(f"handler_{vec:02x}:")
        e.ops(hops, f"h{vec:02x}")
        E("    ret")
    # ---- data ----
    E("    .p2align 3", "handler_table:")
    for v in range(256):
        E(f"    .long handler_{v:02x}" if v in hmap else "    .long 0")
    E("    .p2align 4", "cpu_cfg:")
    for i in range(case.cpus):
        s = case.cpu_setup(i)
        E(f"    .long {s.dfr & 0xFFFFFFFF:#x}, {s.ldr & 0xFFFFFFFF:#x}, {s.tpr & 0xFF:#x}, "
          f"{s.svr & 0xFFFFFFFF:#x}")
    E("exc_info:", "    .long 0, 0, 0, 0")
    E("idt_desc:", "    .word 256*8-1", "    .long idt",
      "    .p2align 3", "idt:", "    .fill 256*8, 1, 0",
      "    .p2align 9", "image_end:")
    return Program("\n".join(e.lines) + "\n", e.vars)


def build(prog: Program, workdir: Path) -> Path:
    """Assemble and link ``prog`` in ``workdir``; returns the raw disk image path."""
    src = workdir / "case.S"
    obj = workdir / "case.o"
    elf = workdir / "case.elf"
    img = workdir / "case.img"
    src.write_text(prog.source)
    for cmd in (["as", "--32", "-o", str(obj), str(src)],
                ["ld", "-m", "elf_i386", "-Ttext", "0x7C00", "-e", "_start", "-o", str(elf), str(obj)],
                ["objcopy", "-O", "binary", "-j", ".text", str(elf), str(img)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"{cmd[0]} failed:\n{r.stderr[-4000:]}")
    size = img.stat().st_size
    if size > 0x7C00 + 127 * 512 - 0x7C00:
        raise BuildError(f"image too large ({size} bytes)")
    pad = (-size) % 512
    if pad:
        with img.open("ab") as f:
            f.write(b"\0" * pad)
    return img


def build_case(case: Case, workdir: str | os.PathLike[str] | None = None) -> tuple[Path, Program]:
    d = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="navic-conf-"))
    d.mkdir(parents=True, exist_ok=True)
    prog = generate(case)
    return build(prog, d), prog
