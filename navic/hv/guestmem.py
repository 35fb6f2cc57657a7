"""A VM's guest-physical memory as its own hypervisor (L1) sees it: :class:`HostMemory`'s API over
guest-physical addresses, backed by host frames through L0's nested page table.

L1's KVM keeps its VMCBs (vmcb12), physical/logical APIC ID tables and its L2 vCPUs' backing pages
here. ``page(gpa)`` hands out the host frame itself, so L1's ``LocalApic`` of an L2 vCPU and the
silicon (which reaches the same page through vmcb02's HPA) share one register file.

Writes to a frame that L0 write-protects in its NPT (the shadow design tracks L1's physical APIC ID
table) do not land directly: they are handed to ``on_tracked_write`` — the L1 vCPU then executes
a real store that takes a nested page fault at L0, which emulates it (KVM's write tracking).
"""

from __future__ import annotations

from collections.abc import Callable

from navic.hw.memory import _SIZE_K, PAGE_MASK, PAGE_SHIFT, HostMemory, Npt, NptFault, Views


class _FrameView:
    """``HostMemory.frames``-like read-only view keyed by guest frame number (for hardware
    algorithms that L0 re-runs in software against a guest's tables)."""

    __slots__ = ("gm",)

    def __init__(self, gm: GuestMemory) -> None:
        self.gm = gm

    def get(self, gfn: int, default: bytearray | None = None) -> bytearray | None:
        hpa = self.gm.npt.lookup(gfn << PAGE_SHIFT)
        return default if hpa is None else self.gm.host.page(hpa)

    def __contains__(self, gfn: object) -> bool:
        # == npt.lookup(gfn << PAGE_SHIFT) is not None (map values are never None)
        return isinstance(gfn, int) and gfn in self.gm.npt._map


class GuestMemory:
    """Guest-physical memory of one VM (allocation, access, write tracking hooks).

    ``_vw`` caches, per guest frame number, the host frame's word views (:meth:`HostMemory.views`)
    as reached through the NPT (a read translation); it is registered with the NPT and the host
    memory, which clear it on every mapping change and every freed frame."""

    _watch: dict[int, list] = {}   # no software write observers at this level (HostMemory API)

    def __init__(self, host_mem: HostMemory, npt: Npt, base_gpa: int = 0x10_0000) -> None:
        self.host = host_mem
        self.npt = npt
        self._next_gfn = base_gpa >> PAGE_SHIFT
        # Called instead of the write when the target frame is write-protected by L0:
        # on_tracked_write(gpa, size, value). None = write through (no tracking in force).
        self.on_tracked_write: Callable[[int, int, int], None] | None = None
        self.frames = _FrameView(self)
        self._vw: dict[int, Views] = {}
        npt._caches.append(self._vw)
        host_mem._caches.append(self._vw)

    # -- allocation ---------------------------------------------------------------------------
    def alloc(self, npages: int = 1, contiguous: bool = True) -> int:
        """Allocate guest-physical pages (backed by fresh host frames); returns the first GPA."""
        gpa = self._next_gfn << PAGE_SHIFT
        for i in range(npages):
            hpa = self.host.alloc(1)
            self.npt.map(gpa + (i << PAGE_SHIFT), hpa, writable=True)
        self._next_gfn += npages
        return gpa

    def hpa(self, gpa: int) -> int:
        """The host-physical address backing ``gpa`` (L0's NPT walk; ``npt.translate(gpa)``
        inline: a read ignores permissions)."""
        e = self.npt._map.get(gpa >> PAGE_SHIFT)
        if e is None:
            raise NptFault(gpa, False, "not_present")
        return ((e >> 1) << PAGE_SHIFT) | (gpa & PAGE_MASK)

    def views(self, gpa: int) -> Views:
        """The host frame's word views (:meth:`HostMemory.views`) for ``gpa``: L0's NPT walk
        (read; NptFault if not present), then the host frame (BadAddress if not backed).  Cached."""
        gfn = gpa >> PAGE_SHIFT
        v = self._vw.get(gfn)
        if v is None:
            v = self._vw[gfn] = self.host.views(self.npt.translate(gpa, write=False))
        return v

    def direct_views(self, gpa: int) -> Views | None:
        """:meth:`views` for ``gpa`` if storing through them is equivalent to :meth:`write` (no
        write tracking of the frame in force, no observer on the host frame), else None."""
        if self.on_tracked_write is not None and (gpa >> PAGE_SHIFT) in self.npt._wp:
            return None
        try:
            v = self._vw[gpa >> PAGE_SHIFT]
        except KeyError:
            v = self.views(gpa)
        return None if v[4] in self.host._watch else v

    def page(self, gpa: int) -> bytearray:
        return (self._vw.get(gpa >> PAGE_SHIFT) or self.views(gpa))[0]

    def is_valid(self, gpa: int) -> bool:
        return self.npt.lookup(gpa) is not None

    # -- access -------------------------------------------------------------------------------
    def read(self, gpa: int, size: int) -> int:
        o = gpa & PAGE_MASK
        k = _SIZE_K[size] if 0 < size <= 8 else -1
        if k >= 0 and not o & (size - 1):
            # == host.read(hpa(gpa), size) for an aligned unit, through the cached views
            try:
                return self._vw[gpa >> PAGE_SHIFT][k][o >> k]
            except KeyError:
                return self.views(gpa)[k][o >> k]
        return self.host.read(self.hpa(gpa), size)

    def read32(self, gpa: int) -> int:
        if gpa & 3:
            return self.read(gpa, 4)
        try:
            return self._vw[gpa >> PAGE_SHIFT][2][(gpa & PAGE_MASK) >> 2]
        except KeyError:
            return self.views(gpa)[2][(gpa & PAGE_MASK) >> 2]

    def read64(self, gpa: int) -> int:
        if gpa & 7:
            return self.read(gpa, 8)
        try:
            return self._vw[gpa >> PAGE_SHIFT][3][(gpa & PAGE_MASK) >> 3]
        except KeyError:
            return self.views(gpa)[3][(gpa & PAGE_MASK) >> 3]

    def write(self, gpa: int, size: int, value: int) -> None:
        npt = self.npt
        if self.on_tracked_write is not None and (gpa >> PAGE_SHIFT) in npt._wp:   # is_write_protected
            self.on_tracked_write(gpa, size, value)
            return
        e = npt._map.get(gpa >> PAGE_SHIFT)   # hpa(gpa) inline
        if e is None:
            raise NptFault(gpa, False, "not_present")
        self.host.write(((e >> 1) << PAGE_SHIFT) | (gpa & PAGE_MASK), size, value)

    def write32(self, gpa: int, value: int) -> None:
        self.write(gpa, 4, value)

    def write64(self, gpa: int, value: int) -> None:
        self.write(gpa, 8, value)

    def set_bit(self, gpa: int, bit: int) -> bool:
        e = self.npt._map.get(gpa >> PAGE_SHIFT)   # hpa(gpa) inline
        if e is None:
            raise NptFault(gpa, False, "not_present")
        return self.host.set_bit(((e >> 1) << PAGE_SHIFT) | (gpa & PAGE_MASK), bit)

    def clear_bit(self, gpa: int, bit: int) -> bool:
        return self.host.clear_bit(self.hpa(gpa), bit)

    def test_bit(self, gpa: int, bit: int) -> bool:
        return self.host.test_bit(self.hpa(gpa), bit)

    def watch(self, gpa: int, callback: Callable[[int, int, int, int], None]) -> None:
        """Observe writes to the frame holding ``gpa`` (observer sees host-physical addresses)."""
        self.host.watch(self.hpa(gpa) & ~PAGE_MASK, callback)
