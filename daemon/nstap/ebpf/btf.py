"""Kernel struct offsets from the running kernel's BTF (``/sys/kernel/btf/vmlinux``).

bcc compiles against the installed kernel headers, which need not match the running kernel (on a
Debian 12 host running a newer kernel they do not): a program that reads ``skb->dev`` at the
headers' offset reads garbage. The offsets the probes need are taken from BTF instead, with
``bpftool btf dump ... format raw`` (0.2 s), and passed to the program as constants.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
_TYPE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER = re.compile(r"^\s+'([^']*)' type_id=(\d+) bits_offset=(\d+)")
_REF = re.compile(r"type_id=(\d+)")
_ENUMERATOR = re.compile(r"^\s+'([^']*)' val=(-?\d+)")
_NR_ELEMS = re.compile(r"nr_elems=(\d+)")
_FORWARDING = {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}


class BtfError(Exception):
    """BTF is missing or does not describe what the probes need; the message says what."""


@dataclass(frozen=True)
class Offsets:
    """Byte offsets the probes use."""

    skb_dev: int  # sk_buff.dev
    skb_sk: int  # sk_buff.sk
    dev_net: int  # net_device.nd_net.net
    sk_net: int  # sock.__sk_common.skc_net.net
    net_inum: int  # net.ns.inum


class Btf:
    """The types of a raw BTF dump, enough to resolve member offsets through anonymous members."""

    def __init__(self, text: str) -> None:
        self.types: dict[int, tuple[str, str, str]] = {}
        self.members: dict[int, list[tuple[str, int, int]]] = {}
        self.by_name: dict[tuple[str, str], int] = {}
        self.enums: dict[str, int] = {}  # every enumerator of every enum, by name
        current = -1
        for line in text.splitlines():
            m = _TYPE.match(line)
            if m:
                current = int(m.group(1))
                kind, name, rest = m.group(2), m.group(3), m.group(4)
                self.types[current] = (kind, name, rest)
                if name != "(anon)":
                    self.by_name.setdefault((kind, name), current)
                continue
            m = _MEMBER.match(line)
            if m and current >= 0:
                self.members.setdefault(current, []).append((m.group(1), int(m.group(2)), int(m.group(3))))
                continue
            m = _ENUMERATOR.match(line)
            if m:
                self.enums.setdefault(m.group(1), int(m.group(2)))

    def _resolve(self, type_id: int) -> int:
        while type_id in self.types and self.types[type_id][0] in _FORWARDING:
            ref = _REF.search(self.types[type_id][2])
            if ref is None:
                break
            type_id = int(ref.group(1))
        return type_id

    def member(self, struct_id: int, name: str) -> tuple[int, int]:
        """(byte offset, type id) of member ``name`` of ``struct_id``, looking into anonymous
        structs and unions."""
        found = self._find(self._resolve(struct_id), name, 0)
        if found is None:
            raise BtfError(f"{self.types.get(struct_id, ('', '?', ''))[1]} has no member {name!r}")
        bits, type_id = found
        if bits % 8:
            raise BtfError(f"member {name!r} is a bit field")
        return bits // 8, type_id

    def _find(self, struct_id: int, name: str, base: int) -> tuple[int, int] | None:
        for member, type_id, bits in self.members.get(struct_id, []):
            if member == name:
                return base + bits, type_id
            if member == "(anon)":
                inner = self._find(self._resolve(type_id), name, base + bits)
                if inner is not None:
                    return inner
        return None

    def struct(self, name: str) -> int:
        """The id of ``struct name``."""
        type_id = self.by_name.get(("STRUCT", name))
        if type_id is None:
            raise BtfError(f"no struct {name} in BTF")
        return type_id

    def path(self, struct: str, *names: str) -> int:
        """Byte offset of ``struct.a.b.c`` (members embedded, not pointed to)."""
        type_id = self.struct(struct)
        total = 0
        for name in names:
            offset, type_id = self.member(type_id, name)
            total += offset
            type_id = self._resolve(type_id)
        return total

    def array_length(self, struct: str, name: str) -> int:
        """How many elements member ``name`` of ``struct`` (an array) holds."""
        _offset, type_id = self.member(self.struct(struct), name)
        kind, _name, rest = self.types.get(self._resolve(type_id), ("", "", ""))
        m = _NR_ELEMS.search(rest)
        if kind != "ARRAY" or m is None:
            raise BtfError(f"{struct}.{name} is not an array")
        return int(m.group(1))


def load(path: Path = VMLINUX) -> Btf:
    """Dump and parse the kernel's BTF."""
    if not path.exists():
        raise BtfError(f"{path} does not exist: the kernel was built without CONFIG_DEBUG_INFO_BTF")
    bpftool = shutil.which("bpftool") or shutil.which("bpftool", path="/usr/sbin:/sbin")
    if bpftool is None:
        raise BtfError("bpftool is not installed (apt-get install bpftool)")
    try:
        out = subprocess.run([bpftool, "btf", "dump", "file", str(path), "format", "raw"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BtfError(f"bpftool cannot read {path}: {exc}") from None
    return Btf(out.stdout)


def offsets(btf: Btf) -> Offsets:
    """The offsets the drop and retransmit probes need."""
    return Offsets(
        skb_dev=btf.path("sk_buff", "dev"),
        skb_sk=btf.path("sk_buff", "sk"),
        dev_net=btf.path("net_device", "nd_net", "net"),
        sk_net=btf.path("sock", "__sk_common", "skc_net", "net"),
        net_inum=btf.path("net", "ns", "inum"),
    )
