"""The numbers nstap exports from /proc/net text files, read by a plan learnt once per file shape.

``/proc/net/snmp``, ``netstat``, ``dev`` and ``sockstat`` are tokens separated by whitespace and
colons. Which token holds each wanted number, and which tokens must still read what they read
(field names, interface names), is worked out once from the file's text (a :class:`Plan`), and
every sample after that is one pass over the bytes that checks those tokens and the token count
and converts the wanted numbers. When the file's shape changes (an interface came, a kernel with
other fields) the pass answers None and the plan is learnt again from that text.

The pass is C (``_scan.c``, built with the package by Debian's compiler; see docs/performance.md for why):
per sample of every namespace it replaces tens of microseconds of ``split``/``int`` in Python,
which were most of nstap's own cost. :func:`scan_py` is the same in Python, used when the
extension is not built, and the tests hold both to the same answers.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

try:
    from ._scan import scan as _scan_c
except ImportError:  # not built (no compiler at install): the Python pass below does the same
    _scan_c = None

COMPILED = _scan_c is not None


def tokens(data: bytes) -> list[bytes]:
    """The file's tokens: separated by ASCII whitespace and ':' (the rule of the C pass)."""
    return data.replace(b":", b" ").split()


def scan_py(data: bytes, steps: Sequence[tuple[int, int]], expected: tuple[bytes, ...], ntokens: int, nvalues: int) -> tuple[int, ...] | None:
    """What the C pass does, in Python: the wanted numbers, or None if the shape changed."""
    toks = tokens(data)
    if len(toks) != ntokens:
        return None
    out: list[int | None] = [None] * nvalues
    for pos, slot in steps:
        token = toks[pos]
        if slot < 0:
            if token != expected[-slot - 1]:
                return None
        else:
            digits = token[1:] if token[:1] == b"-" else token
            if not digits.isdigit() or len(token) > 20:
                return None
            value = int(token)
            if not -(1 << 63) <= value < 1 << 64:  # what the C pass holds (u64, or s64 when negative)
                return None
            out[slot] = value
    if None in out:
        return None
    return tuple(out)  # type: ignore[arg-type]


class Plan:
    """Where the wanted numbers of one file shape are, and what must be where for it to hold."""

    __slots__ = ("steps", "packed", "expected", "ntokens", "nvalues")

    def __init__(self, numbers: Sequence[int], checks: Sequence[tuple[int, bytes]], ntokens: int) -> None:
        # Number i of the result is the token at numbers[i]; each check is (position, token).
        expected = []
        steps = [(pos, slot) for slot, pos in enumerate(numbers)]
        for pos, text in checks:
            expected.append(text)
            steps.append((pos, -len(expected)))
        self.steps = tuple(sorted(steps))
        self.packed = struct.pack(f"={2 * len(self.steps)}i", *(n for step in self.steps for n in step))
        self.expected = tuple(expected)
        self.ntokens = ntokens
        self.nvalues = len(numbers)

    def scan(self, data: bytes) -> tuple[int, ...] | None:
        """The numbers in ``data``, in plan order; None if ``data`` no longer has this shape."""
        if _scan_c is not None:
            return _scan_c(data, self.packed, self.expected, self.ntokens, self.nvalues)
        return scan_py(data, self.steps, self.expected, self.ntokens, self.nvalues)


def _line_offsets(lines: list[bytes]) -> list[int]:
    """The position of each line's first token in the whole file's token list."""
    offsets = []
    total = 0
    for line in lines:
        offsets.append(total)
        total += len(tokens(line))
    offsets.append(total)
    return offsets


def table_plan(data: bytes, wanted: Sequence[tuple[str, str]]) -> tuple[Plan, list[int]]:
    """A plan for a file of header/value line pairs (snmp, netstat): ``wanted`` is (section,
    field) pairs; returns the plan and, for each of its numbers, the index in ``wanted`` it is
    (a field this kernel does not have is left out)."""
    lines = data.split(b"\n")
    offsets = _line_offsets(lines)
    numbers: list[int] = []
    checks: list[tuple[int, bytes]] = []
    found: list[int] = []
    for index, (section, field) in enumerate(wanted):
        name, key = section.encode(), field.encode()
        for i in range(0, len(lines) - 1, 2):
            head, values = tokens(lines[i]), tokens(lines[i + 1])
            if not head or head[0] != name or not values or values[0] != name:
                continue
            if key in head:
                col = head.index(key)
                if col < len(values):
                    numbers.append(offsets[i + 1] + col)
                    checks += [(offsets[i], name), (offsets[i] + col, key), (offsets[i + 1], name)]
                    found.append(index)
            break
    return Plan(numbers, sorted(set(checks)), offsets[-1]), found


DEV_COLUMNS = (0, 1, 2, 3, 8, 9, 10, 11)  # rx bytes, packets, errs, drop; tx bytes, packets, errs, drop


def dev_plan(data: bytes) -> tuple[Plan, list[str]]:
    """A plan for /proc/net/dev: 8 numbers per interface (:data:`DEV_COLUMNS`), interface names
    in file order."""
    lines = data.split(b"\n")
    offsets = _line_offsets(lines)
    numbers: list[int] = []
    checks: list[tuple[int, bytes]] = []
    names: list[str] = []
    for i, line in enumerate(lines[2:], 2):
        name, sep, rest = line.partition(b":")
        name = name.strip()
        if not sep or not name or b" " in name or len(rest.split()) < 12:
            continue
        start = offsets[i]
        checks.append((start, name))
        numbers += [start + 1 + col for col in DEV_COLUMNS]
        names.append(name.decode("utf-8", "replace"))
    return Plan(numbers, checks, offsets[-1]), names


def pairs_plan(data: bytes, wanted: Sequence[tuple[str, str]]) -> tuple[Plan, list[int]]:
    """A plan for "SECTION: key value key value" lines (sockstat): ``wanted`` is (section, key)
    pairs; returns the plan and the index in ``wanted`` of each of its numbers."""
    toks = tokens(data)
    numbers: list[int] = []
    checks: list[tuple[int, bytes]] = []
    found: list[int] = []
    lines = data.split(b"\n")
    offsets = _line_offsets(lines)
    for index, (section, key) in enumerate(wanted):
        name, k = section.encode(), key.encode()
        for i, line in enumerate(lines):
            words = tokens(line)
            if not words or words[0] != name:
                continue
            for j in range(1, len(words) - 1):
                if words[j] == k:
                    numbers.append(offsets[i] + j + 1)
                    checks += [(offsets[i], name), (offsets[i] + j, k)]
                    found.append(index)
                    break
            break
    assert offsets[-1] == len(toks)
    return Plan(numbers, sorted(set(checks)), offsets[-1]), found


__all__ = ["COMPILED", "DEV_COLUMNS", "Plan", "dev_plan", "pairs_plan", "scan_py", "table_plan", "tokens"]
