"""Host physical memory (4 KiB frames) and nested page tables (guest-physical → host-physical).

Everything the silicon reads or writes "in memory" lives here: AVIC backing pages (which *are* the
register files of the vCPUs' :class:`~navic.apic.lapic.LocalApic`), physical/logical APIC ID tables,
VMCBs (an L1 hypervisor's vmcb12 lives in L1 memory and L0 reads it through memory), posted-interrupt
descriptors and PID-pointer tables.

* :class:`HostMemory` — frames are ``bytearray(4096)`` objects kept in a dict keyed by frame number;
  ``page(hpa)`` hands out the frame itself (no copy), so a ``LocalApic(page=mem.page(hpa))`` and the
  hardware see the same bytes.
* Write observers (:meth:`HostMemory.watch`) see every write made through this class's accessors
  (``write32``/``write64``/``write``/``set_bit``/``clear_bit``): the erratum-1235 model watches the
  physical APIC ID table this way, and L0 can watch L1's tables.  Writes made by poking the
  ``bytearray`` returned by :meth:`page` directly are NOT observed (that is how LocalApic updates
  its own registers, and nobody needs to watch those).
* Word views: aligned 1/2/4/8-byte accesses go through cached ``memoryview`` casts of the frame
  (:meth:`HostMemory.views`, created on a frame's first word access, dropped when it is freed)
  instead of ``int.from_bytes`` on a slice; same bytes, same little-endian values (the model, like
  ``LocalApic``'s register view, assumes a little-endian host).  Unaligned or odd-sized accesses
  take the general byte path.
* :class:`Npt` — per-VM 4 KiB-granular GPA → HPA map with present/writable permission and a separate
  write-protect overlay (for L0's write tracking), raising :class:`NptFault`.
"""

from __future__ import annotations

from collections.abc import Callable

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
MAXPHYADDR = 52
PHYS_ADDR_LIMIT = 1 << MAXPHYADDR

# callback(addr, size, old, new): ``addr``/``size`` describe the written little-endian unit,
# ``old``/``new`` its value before and after the write.  Called after the write has landed.
WriteObserver = Callable[[int, int, int, int], None]

# views tuple index for an access size 0..8 (log2 of the size; -1: no view): (frame, u16, u32, u64, pfn)
_SIZE_K = (-1, 0, 1, -1, 2, -1, -1, -1, 3)

Views = tuple  # (bytearray frame, memoryview 'H', memoryview 'I', memoryview 'Q', pfn)

__all__ = [
    "PAGE_SHIFT", "PAGE_SIZE", "PAGE_MASK", "MAXPHYADDR", "BadAddress", "HostMemory", "WriteObserver",
    "NptFault", "Npt",
]


class BadAddress(LookupError):
    """A host-physical access to a frame that is not allocated (a model bug, or a deliberately
    invalid pointer that the hardware model turns into an architectural failure)."""


class HostMemory:
    """Host physical memory in 4 KiB frames with a bump allocator.

    Frame numbers start at ``base_pfn`` (default 0x100, i.e. 1 MiB) so that HPA 0 is never a valid
    allocation and can serve as "null".  Allocation is always physically contiguous (a bump
    allocator); ``contiguous`` is accepted for API clarity and has no other effect.
    """

    __slots__ = ("frames", "_next_pfn", "_watch", "_vw", "_caches")

    def __init__(self, base_pfn: int = 0x100) -> None:
        self.frames: dict[int, bytearray] = {}
        self._next_pfn = base_pfn
        self._watch: dict[int, list[WriteObserver]] = {}
        # pfn -> word views of the frame (see views()); filled on first access, dropped on free
        self._vw: dict[int, Views] = {}
        # translation caches of guest memories over this memory (cleared when a frame is freed)
        self._caches: list[dict] = []

    # -- allocation ---------------------------------------------------------------------------
    def alloc(self, npages: int = 1, contiguous: bool = True) -> int:
        """Allocate ``npages`` zeroed, physically contiguous frames; returns the HPA of the first."""
        if npages < 1:
            raise ValueError("npages must be >= 1")
        pfn = self._next_pfn
        self._next_pfn += npages
        if self._next_pfn > PHYS_ADDR_LIMIT >> PAGE_SHIFT:  # pragma: no cover - 4 PiB of frames
            raise MemoryError("host physical address space exhausted")
        frames = self.frames
        for i in range(npages):
            frames[pfn + i] = bytearray(PAGE_SIZE)
        return pfn << PAGE_SHIFT

    def free(self, hpa: int, npages: int = 1) -> None:
        """Release frames (their HPAs become invalid; accesses raise :class:`BadAddress`)."""
        pfn = hpa >> PAGE_SHIFT
        for i in range(npages):
            self.frames.pop(pfn + i, None)
            self._watch.pop(pfn + i, None)
            self._vw.pop(pfn + i, None)
        for c in self._caches:
            c.clear()

    def is_valid(self, hpa: int) -> bool:
        return (hpa >> PAGE_SHIFT) in self.frames

    def page(self, hpa: int) -> bytearray:
        """The frame (a live 4 KiB ``bytearray``) that holds ``hpa``."""
        try:
            return self.frames[hpa >> PAGE_SHIFT]
        except KeyError:
            raise BadAddress(f"HPA {hpa:#x} is not backed by an allocated frame") from None

    def views(self, hpa: int) -> Views:
        """``(frame, u16 view, u32 view, u64 view, pfn)`` of the frame holding ``hpa``: the frame
        itself and ``memoryview`` casts of it, so that an aligned unit of size ``1 << k`` at page
        offset ``o`` is ``views[k][o >> k]`` (read and assignable).  Cached per frame; hot callers
        index ``mem._vw[hpa >> PAGE_SHIFT]`` and call this on a KeyError (first access).  Writes
        through the views are not seen by observers: writers must go through the accessors (or
        use :meth:`direct_views`)."""
        pfn = hpa >> PAGE_SHIFT
        v = self._vw.get(pfn)
        if v is None:
            f = self.frames.get(pfn)
            if f is None:
                raise BadAddress(f"HPA {hpa:#x} is not backed by an allocated frame")
            m = memoryview(f)
            v = self._vw[pfn] = (f, m.cast("H"), m.cast("I"), m.cast("Q"), pfn)
        return v

    def direct_views(self, hpa: int) -> Views | None:
        """:meth:`views` of the frame holding ``hpa`` if storing through them is equivalent to
        writing through the accessors (nobody observes the frame), else None."""
        pfn = hpa >> PAGE_SHIFT
        if pfn in self._watch:
            return None
        try:
            return self._vw[pfn]
        except KeyError:
            return self.views(hpa)

    # -- observers ----------------------------------------------------------------------------
    def watch(self, hpa: int, callback: WriteObserver) -> None:
        """Call ``callback(addr, size, old, new)`` after every write (through this class) to the
        frame holding ``hpa``."""
        self.page(hpa)  # must exist
        lst = self._watch.setdefault(hpa >> PAGE_SHIFT, [])
        if callback not in lst:
            lst.append(callback)

    def unwatch(self, hpa: int, callback: WriteObserver) -> None:
        lst = self._watch.get(hpa >> PAGE_SHIFT)
        if lst and callback in lst:
            lst.remove(callback)
            if not lst:
                del self._watch[hpa >> PAGE_SHIFT]

    def watched(self, hpa: int) -> bool:
        return (hpa >> PAGE_SHIFT) in self._watch

    def _notify(self, pfn: int, addr: int, size: int, old: int, new: int) -> None:
        for cb in tuple(self._watch[pfn]):
            cb(addr, size, old, new)

    # -- accessors (naturally aligned units; never cross a frame) ------------------------------
    def _frame(self, hpa: int, size: int) -> tuple[bytearray, int]:
        off = hpa & PAGE_MASK
        if off + size > PAGE_SIZE:
            raise BadAddress(f"{size}-byte access at {hpa:#x} crosses a frame boundary")
        try:
            return self.frames[hpa >> PAGE_SHIFT], off
        except KeyError:
            raise BadAddress(f"HPA {hpa:#x} is not backed by an allocated frame") from None

    def read(self, hpa: int, size: int) -> int:
        o = hpa & PAGE_MASK
        k = _SIZE_K[size] if 0 < size <= 8 else -1
        if k >= 0 and not o & (size - 1):
            # aligned 1/2/4/8 bytes: one element of a cached view (== the little-endian bytes)
            try:
                return self._vw[hpa >> PAGE_SHIFT][k][o >> k]
            except KeyError:
                return self.views(hpa)[k][o >> k]
        f, o = self._frame(hpa, size)
        return int.from_bytes(f[o : o + size], "little")

    def write(self, hpa: int, size: int, value: int) -> None:
        pfn = hpa >> PAGE_SHIFT
        o = hpa & PAGE_MASK
        k = _SIZE_K[size] if 0 < size <= 8 else -1
        if k >= 0 and not o & (size - 1):
            # aligned 1/2/4/8 bytes: store one element of a cached view (== the little-endian bytes)
            try:
                w = self._vw[pfn][k]
            except KeyError:
                w = self.views(hpa)[k]
            value &= (1 << (8 * size)) - 1
            i = o >> k
            if pfn in self._watch:
                old = w[i]
                w[i] = value
                self._notify(pfn, hpa, size, old, value)
            else:
                w[i] = value
            return
        f, o = self._frame(hpa, size)
        value &= (1 << (8 * size)) - 1
        if pfn in self._watch:
            old = int.from_bytes(f[o : o + size], "little")
            f[o : o + size] = value.to_bytes(size, "little")
            self._notify(pfn, hpa, size, old, value)
        else:
            f[o : o + size] = value.to_bytes(size, "little")

    def read32(self, hpa: int) -> int:
        if hpa & 3:
            return self.read(hpa, 4)
        try:
            return self._vw[hpa >> PAGE_SHIFT][2][(hpa & PAGE_MASK) >> 2]
        except KeyError:
            return self.views(hpa)[2][(hpa & PAGE_MASK) >> 2]

    def read64(self, hpa: int) -> int:
        if hpa & 7:
            return self.read(hpa, 8)
        try:
            return self._vw[hpa >> PAGE_SHIFT][3][(hpa & PAGE_MASK) >> 3]
        except KeyError:
            return self.views(hpa)[3][(hpa & PAGE_MASK) >> 3]

    def write32(self, hpa: int, value: int) -> None:
        self.write(hpa, 4, value)

    def write64(self, hpa: int, value: int) -> None:
        self.write(hpa, 8, value)

    # -- atomic bit operations (a locked RMW; one atomic step in the model) ---------------------
    def set_bit(self, hpa: int, bit: int) -> bool:
        """Atomically set bit ``bit`` counted from ``hpa`` (byte ``hpa + bit // 8``); returns the
        old value of the bit.  Observers see the aligned qword that contains the bit."""
        a = hpa + (bit >> 3)
        pfn = a >> PAGE_SHIFT
        f = self.frames.get(pfn)
        if f is None or pfn in self._watch:
            return self._bitop(a, bit & 7, True)
        # unwatched frame: _bitop's set path inline
        o = a & PAGE_MASK
        m = 1 << (bit & 7)
        old_byte = f[o]
        if old_byte & m:
            return True
        f[o] = old_byte | m
        return False

    def clear_bit(self, hpa: int, bit: int) -> bool:
        """Atomically clear bit ``bit`` counted from ``hpa``; returns the old value."""
        return self._bitop(hpa + (bit >> 3), bit & 7, False)

    def test_bit(self, hpa: int, bit: int) -> bool:
        f, o = self._frame(hpa + (bit >> 3), 1)
        return bool(f[o] >> (bit & 7) & 1)

    def _bitop(self, byte_addr: int, b: int, setting: bool) -> bool:
        f, o = self._frame(byte_addr, 1)
        old_byte = f[o]
        was = bool(old_byte >> b & 1)
        if setting == was:
            return was
        pfn = byte_addr >> PAGE_SHIFT
        if pfn in self._watch:
            q = o & ~7
            old = int.from_bytes(f[q : q + 8], "little")
            f[o] = old_byte | (1 << b) if setting else old_byte & ~(1 << b)
            new = int.from_bytes(f[q : q + 8], "little")
            self._notify(pfn, (byte_addr & ~PAGE_MASK) | q, 8, old, new)
        else:
            f[o] = old_byte | (1 << b) if setting else old_byte & ~(1 << b)
        return was


class NptFault(Exception):
    """A nested-page-table fault (becomes ``#VMEXIT(NPF)`` / EPT violation in the models above).

    ``reason`` is one of ``"not_present"``, ``"read_only"`` (mapping not writable) or
    ``"write_protected"`` (L0's write-tracking overlay)."""

    def __init__(self, gpa: int, write: bool, reason: str) -> None:
        super().__init__(f"NPT fault at GPA {gpa:#x} ({'write' if write else 'read'}): {reason}")
        self.gpa = gpa
        self.write = write
        self.reason = reason


class Npt:
    """Per-VM guest-physical → host-physical map at 4 KiB granularity.

    ``_map[gfn] = (pfn << 1) | writable``; ``_wp`` is the set of write-protected gfns (a
    separate overlay so that unprotecting restores the mapping's own permission).  ``_caches`` are
    the translation caches built on this map (a guest memory's gfn -> frame views): every change
    of a mapping clears them."""

    __slots__ = ("_map", "_wp", "_caches")

    def __init__(self) -> None:
        self._map: dict[int, int] = {}
        self._wp: set[int] = set()
        self._caches: list[dict] = []

    def map(self, gpa: int, hpa: int, writable: bool = True) -> None:
        if gpa & PAGE_MASK or hpa & PAGE_MASK:
            raise ValueError("NPT mappings are 4 KiB aligned")
        self._map[gpa >> PAGE_SHIFT] = ((hpa >> PAGE_SHIFT) << 1) | (1 if writable else 0)
        for c in self._caches:
            c.clear()

    def unmap(self, gpa: int) -> None:
        self._map.pop(gpa >> PAGE_SHIFT, None)
        for c in self._caches:
            c.clear()

    def write_protect(self, gfn: int) -> None:
        self._wp.add(gfn)

    def unprotect(self, gfn: int) -> None:
        self._wp.discard(gfn)

    def is_write_protected(self, gfn: int) -> bool:
        return gfn in self._wp

    def lookup(self, gpa: int) -> int | None:
        """HPA for ``gpa`` ignoring permissions, or None if not present."""
        e = self._map.get(gpa >> PAGE_SHIFT)
        return None if e is None else ((e >> 1) << PAGE_SHIFT) | (gpa & PAGE_MASK)

    def translate(self, gpa: int, write: bool = False) -> int:
        gfn = gpa >> PAGE_SHIFT
        e = self._map.get(gfn)
        if e is None:
            raise NptFault(gpa, write, "not_present")
        if write:
            if not e & 1:
                raise NptFault(gpa, write, "read_only")
            if gfn in self._wp:
                raise NptFault(gpa, write, "write_protected")
        return ((e >> 1) << PAGE_SHIFT) | (gpa & PAGE_MASK)

    def mappings(self) -> dict[int, tuple[int, bool]]:
        """{gfn: (pfn, writable)} — a snapshot, for inspection and tests."""
        return {g: (e >> 1, bool(e & 1)) for g, e in self._map.items()}
