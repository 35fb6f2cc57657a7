"""Host memory frames, atomic bit ops, write observers, and the nested page table."""

from __future__ import annotations

import pytest

from navic.hw.memory import PAGE_SIZE, BadAddress, HostMemory, Npt, NptFault


def test_alloc_is_contiguous_zeroed_and_never_zero():
    mem = HostMemory()
    a = mem.alloc(3)
    assert a != 0 and a % PAGE_SIZE == 0
    assert [mem.page(a + i * PAGE_SIZE) for i in range(3)] == [bytearray(PAGE_SIZE)] * 3
    b = mem.alloc()
    assert b == a + 3 * PAGE_SIZE


def test_page_is_the_live_frame_shared_with_accessors():
    mem = HostMemory()
    a = mem.alloc()
    p = mem.page(a + 0x123)
    mem.write32(a + 0x200, 0xDEADBEEF)
    assert p[0x200:0x204] == bytes.fromhex("efbeadde")
    p[0x300] = 0x5A
    assert mem.read32(a + 0x300) == 0x5A
    mem.write64(a + 8, 0x1122334455667788)
    assert mem.read64(a + 8) == 0x1122334455667788
    assert mem.read32(a + 12) == 0x11223344


def test_bad_addresses():
    mem = HostMemory()
    a = mem.alloc()
    with pytest.raises(BadAddress):
        mem.read64(a + PAGE_SIZE)
    with pytest.raises(BadAddress):
        mem.read64(a + PAGE_SIZE - 4)  # crosses the frame
    mem.free(a)
    with pytest.raises(BadAddress):
        mem.page(a)
    assert not mem.is_valid(a)


def test_set_bit_is_test_and_set_relative_to_address():
    mem = HostMemory()
    a = mem.alloc()
    assert mem.set_bit(a + 0x200, 37) is False
    assert mem.read32(a + 0x204) == 1 << 5
    assert mem.set_bit(a + 0x200, 37) is True
    assert mem.test_bit(a + 0x200, 37)
    assert mem.clear_bit(a + 0x200, 37) is True
    assert mem.read32(a + 0x204) == 0


def test_watchers_see_writes_with_old_and_new_values():
    mem = HostMemory()
    a = mem.alloc()
    other = mem.alloc()
    seen = []
    mem.watch(a, lambda addr, size, old, new: seen.append((addr - a, size, old, new)))
    mem.write64(a + 8, 5)
    mem.write32(a + 16, 7)
    mem.set_bit(a + 8, 63)
    mem.set_bit(a + 8, 63)  # no change: no notification
    mem.write64(other, 1)  # other frame: not watched
    assert seen == [(8, 8, 0, 5), (16, 4, 0, 7), (8, 8, 5, 5 | 1 << 63)]
    assert mem.watched(a) and not mem.watched(other)


def test_npt_translate_permissions_and_write_protect():
    npt = Npt()
    npt.map(0x1000, 0x55000)
    npt.map(0x2000, 0x66000, writable=False)
    assert npt.translate(0x1234) == 0x55234
    assert npt.translate(0x1234, write=True) == 0x55234
    assert npt.translate(0x2010) == 0x66010
    with pytest.raises(NptFault) as e:
        npt.translate(0x2010, write=True)
    assert (e.value.gpa, e.value.write, e.value.reason) == (0x2010, True, "read_only")
    with pytest.raises(NptFault) as e:
        npt.translate(0x3000)
    assert e.value.reason == "not_present"
    npt.write_protect(1)
    assert npt.translate(0x1008) == 0x55008  # reads still fine
    with pytest.raises(NptFault) as e:
        npt.translate(0x1008, write=True)
    assert e.value.reason == "write_protected"
    npt.unprotect(1)
    assert npt.translate(0x1008, write=True) == 0x55008
    assert npt.lookup(0x2fff) == 0x66fff and npt.lookup(0x9000) is None
    npt.unmap(0x1000)
    assert npt.lookup(0x1000) is None
    with pytest.raises(ValueError):
        npt.map(0x1001, 0x2000)
