"""BPF maps read through the bpf(2) system call: no bcc, no libbpf, no LLVM in the daemon.

The loader child (:mod:`nstap.ebpf.loader`) creates the maps and hands their descriptors over; a
:class:`BpfMap` reads a whole map with ``BPF_MAP_LOOKUP_BATCH`` (one system call, once it knows the size
of the map) or, on kernels without it (before 5.6), key by key with ``BPF_MAP_GET_NEXT_KEY`` and
``BPF_MAP_LOOKUP_ELEM``, and deletes entries with ``BPF_MAP_DELETE_ELEM``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass, field

# bpf(2) has no libc wrapper: the syscall number, by architecture.
SYSCALL_BPF = {
    "x86_64": 321, "amd64": 321,
    "aarch64": 280, "arm64": 280, "riscv64": 280, "loongarch64": 280,
    "ppc64le": 361, "ppc64": 361, "s390x": 351, "i686": 357, "i386": 357, "armv7l": 386,
}

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24

ENOTSUPP = 524  # the kernel's internal "not supported", which bpf(2) lets through
NO_BATCH = {errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP}
# Entries asked for by the first BPF_MAP_LOOKUP_BATCH call of a read (grown if a hash bucket holds
# more); the next reads ask for twice what the last one found, so that a whole map is one call:
# each call lets the GIL go and waits for it back, a switch interval (5 ms) whenever another thread
# runs Python. A map of 4,000 entries read 256 at a time took 1.1 ms alone and 85 ms beside such a
# thread (16 calls); in one call, 1 ms and 6.5 ms (bench/bench_map_read.py).
BATCH = 256

_u32, _u64 = ctypes.c_uint32, ctypes.c_uint64


class ElemAttr(ctypes.Structure):
    """``union bpf_attr`` for the element commands."""

    _fields_ = [("map_fd", _u32), ("_pad", _u32), ("key", _u64), ("value", _u64), ("flags", _u64)]


class BatchAttr(ctypes.Structure):
    """``union bpf_attr`` for the batch commands."""

    _fields_ = [("in_batch", _u64), ("out_batch", _u64), ("keys", _u64), ("values", _u64), ("count", _u32), ("map_fd", _u32),
                ("elem_flags", _u64), ("flags", _u64)]


class InfoAttr(ctypes.Structure):
    """``union bpf_attr`` for BPF_OBJ_GET_INFO_BY_FD."""

    _fields_ = [("bpf_fd", _u32), ("info_len", _u32), ("info", _u64)]


class MapInfo(ctypes.Structure):
    """The head of ``struct bpf_map_info`` (the kernel fills what fits)."""

    _fields_ = [("type", _u32), ("id", _u32), ("key_size", _u32), ("value_size", _u32), ("max_entries", _u32), ("map_flags", _u32),
                ("name", ctypes.c_char * 16)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_ulong)


def syscall_number(machine: str | None = None) -> int:
    """The number of bpf(2) on this machine's architecture."""
    machine = machine or platform.machine()
    try:
        return SYSCALL_BPF[machine]
    except KeyError:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown for {machine}") from None


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """bpf(cmd, &attr, sizeof attr); OSError with the errno on failure."""
    ret = _syscall(syscall_number(), cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return ret


def map_info(fd: int) -> MapInfo:
    """What the kernel says about the map behind ``fd``."""
    info = MapInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)))
    return info


@dataclass
class BpfMap:
    """A map the daemon holds a descriptor of (it owns the descriptor: :meth:`close` closes it)."""

    fd: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    batch: bool = True  # BPF_MAP_LOOKUP_BATCH works on this kernel (cleared at its first refusal)
    found: int = 0  # entries the last read returned (the next one asks for twice as many at once)
    # A batch read's buffers, kept from one read to the next (see _batch_buffers).
    _room: int = field(default=0, repr=False)
    _keys: ctypes.Array | None = field(default=None, repr=False)
    _values: ctypes.Array | None = field(default=None, repr=False)
    _tokens: tuple[ctypes.Array, ctypes.Array] | None = field(default=None, repr=False)
    _scratch: tuple[ctypes.Array, ctypes.Array, ctypes.Array] | None = field(default=None, repr=False)  # key, next key, value

    @classmethod
    def from_fd(cls, fd: int, name: str) -> BpfMap:
        """The map behind ``fd``, its sizes asked from the kernel."""
        info = map_info(fd)
        return cls(fd, name, info.key_size, info.value_size, info.max_entries)

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every (key, value) now: batched, or key by key on kernels without batch lookups."""
        keys, values = self.raw()
        ks, vs = self.key_size, self.value_size
        return [(keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs]) for i in range(len(keys) // ks)] if ks else []

    def raw(self) -> tuple[bytes, bytes]:
        """Every key now, end to end, and every value in the same order: what :meth:`items` cuts
        up, for a reader that compares a whole read with the one before before it parses."""
        if self.batch:
            try:
                return self._raw_batch()
            except OSError as exc:
                if exc.errno not in NO_BATCH:
                    raise
                self.batch = False
        found = self._items_one_by_one()
        return b"".join(k for k, _ in found), b"".join(v for _, v in found)

    def keys(self) -> list[bytes]:
        """Every key now."""
        return [key for key, _ in self.items()]

    def _batch_buffers(self, size: int) -> tuple[ctypes.Array, ctypes.Array]:
        """Key and value buffers for ``size`` entries at least: those of the last read, unless it
        needs more (then for the next power of two of entries, at most the map's size).

        A ctypes buffer of a length no live buffer has makes a new array *type* (ctypes keeps only
        a weak reference to it), and the type with its descriptors is cyclic garbage once the
        buffer goes: each read left 2-6 of them for the interpreter's young collections. So the
        buffers of every call (:meth:`_scratch_buffers` too) are kept with the map; a map is used
        by one thread at a time (its service's)."""
        if size > self._room or self._keys is None or self._values is None:
            room = min(1 << max(size - 1, 1).bit_length(), max(self.max_entries, size))
            self._keys = (ctypes.c_char * (room * self.key_size))()
            self._values = (ctypes.c_char * (room * self.value_size))()
            self._room = room
        return self._keys, self._values

    def _scratch_buffers(self) -> tuple[ctypes.Array, ctypes.Array, ctypes.Array]:
        """A key, a next key and a value buffer, kept with the map (see _batch_buffers)."""
        if self._scratch is None:
            self._scratch = ((ctypes.c_char * self.key_size)(), (ctypes.c_char * self.key_size)(), (ctypes.c_char * self.value_size)())
        return self._scratch

    def _raw_batch(self) -> tuple[bytes, bytes]:
        key_parts: list[bytes] = []
        value_parts: list[bytes] = []
        found = 0
        size = min(max(BATCH, 2 * self.found), max(self.max_entries, 1))
        keys, values = self._batch_buffers(size)
        size = self._room
        # The batch token: a bucket number for hash maps, a key for others; as large as either.
        if self._tokens is None:
            self._tokens = ((ctypes.c_char * max(8, self.key_size))(), (ctypes.c_char * max(8, self.key_size))())
        token_in, token_out = self._tokens
        first = True
        while True:
            attr = BatchAttr(in_batch=0 if first else ctypes.addressof(token_in), out_batch=ctypes.addressof(token_out),
                             keys=ctypes.addressof(keys), values=ctypes.addressof(values), count=size, map_fd=self.fd)
            try:
                bpf(BPF_MAP_LOOKUP_BATCH, attr)
                done = False
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # the end (entries may still have been returned)
                    done = True
                elif exc.errno == errno.ENOSPC and size < self.max_entries:  # a bucket larger than the buffer
                    keys, values = self._batch_buffers(min(size * 4, self.max_entries))
                    size = self._room
                    continue
                else:
                    raise
            key_parts.append(ctypes.string_at(keys, attr.count * self.key_size))
            value_parts.append(ctypes.string_at(values, attr.count * self.value_size))
            found += attr.count
            if done:
                self.found = found
                if len(key_parts) == 1:
                    return key_parts[0], value_parts[0]
                return b"".join(key_parts), b"".join(value_parts)
            ctypes.memmove(token_in, token_out, len(token_out))
            first = False

    def _items_one_by_one(self) -> list[tuple[bytes, bytes]]:
        found: dict[bytes, bytes] = {}
        key, next_key, value = self._scratch_buffers()
        first = True
        # An entry deleted under the walk sends GET_NEXT_KEY back to the first key: bounded, and
        # the dict takes the repeats.
        for _ in range(2 * self.max_entries + 1):
            try:
                bpf(BPF_MAP_GET_NEXT_KEY, ElemAttr(map_fd=self.fd, key=0 if first else ctypes.addressof(key), value=ctypes.addressof(next_key)))
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    break
                raise
            first = False
            ctypes.memmove(key, next_key, self.key_size)
            try:
                bpf(BPF_MAP_LOOKUP_ELEM, ElemAttr(map_fd=self.fd, key=ctypes.addressof(key), value=ctypes.addressof(value)))
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # deleted (or evicted) meanwhile
                    continue
                raise
            found[key.raw] = value.raw
        return list(found.items())

    def lookup(self, key: bytes) -> bytes | None:
        """The value of ``key``, or None."""
        kbuf, _, value = self._scratch_buffers()
        kbuf.raw = self._key(key)
        try:
            bpf(BPF_MAP_LOOKUP_ELEM, ElemAttr(map_fd=self.fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(value)))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return value.raw

    def update(self, key: bytes, value: bytes) -> None:
        """Set ``key`` to ``value`` (BPF_ANY)."""
        if len(value) != self.value_size:
            raise ValueError(f"{self.name}: a value is {self.value_size} bytes, not {len(value)}")
        kbuf, _, vbuf = self._scratch_buffers()
        kbuf.raw = self._key(key)
        vbuf.raw = value
        bpf(BPF_MAP_UPDATE_ELEM, ElemAttr(map_fd=self.fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf)))

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was not there (an LRU map may have evicted it)."""
        kbuf = self._scratch_buffers()[0]
        kbuf.raw = self._key(key)
        try:
            bpf(BPF_MAP_DELETE_ELEM, ElemAttr(map_fd=self.fd, key=ctypes.addressof(kbuf)))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: a key is {self.key_size} bytes, not {len(key)}")
        return key

    def close(self) -> None:
        """Close the descriptor (the map goes when nothing else holds it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
