"""Native nftables rules (``nft -j list ruleset``): the NAT chains of tables iptables did not make.

Docker and Podman write their rules through ``iptables``: on the nf_tables back end those land in
the ``ip``/``ip6`` tables named like iptables' (nat, filter, mangle, raw, security) as opaque
``xt`` expressions, and are read from ``iptables-save`` instead. Every other table is native (a
firewalld or hand-written nftables configuration): its NAT base chains run at the same hooks as
iptables' nat chains, before them when their priority is lower, and can shadow a published port.
This module turns those chains into :mod:`nstap.nat.rules` objects so that the same path
evaluator follows them. Untrusted JSON: what cannot be used is skipped and noted.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..gate import ROUND
from ..heap import collector_paused
from .rules import Chain, Cond, Dnat, Rule

IPTABLES_TABLES = frozenset({"nat", "filter", "mangle", "raw", "security"})
IPTABLES_NAT_PRIORITY = {"prerouting": -100, "output": -100, "postrouting": 100, "input": 100}
MAX_RULES = 100_000
MAX_ERRORS = 20
_FAMILIES = {"ip": (4,), "ip6": (6,), "inet": (4, 6)}


@dataclass(frozen=True, slots=True)
class BaseChain:
    """A native chain attached to a hook: where it runs relative to iptables' nat chain."""

    key: str  # "family table chain"
    families: tuple[int, ...]
    hook: str
    priority: int
    kind: str  # nat, filter, route


@dataclass(slots=True)
class NativeRuleset:
    """The native tables' chains (keyed "family table chain") and their base chains."""

    chains: dict[str, Chain] = field(default_factory=dict)
    bases: list[BaseChain] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        """Note something that could not be used."""
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)

    def nat_bases(self, family: int, hook: str) -> tuple[list[BaseChain], list[BaseChain]]:
        """The nat base chains of ``hook`` for ``family`` that run before iptables' and after it.

        A native chain at the very priority of iptables' (dstnat, srcnat) is taken to run first:
        the kernel's order between equal priorities is not defined, and "first" is the case that
        can shadow a forward."""
        ours = sorted((b for b in self.bases if b.kind == "nat" and b.hook == hook and family in b.families), key=lambda b: b.priority)
        pivot = IPTABLES_NAT_PRIORITY.get(hook, 0)
        return [b for b in ours if b.priority <= pivot], [b for b in ours if b.priority > pivot]


def _ranges(value: Any) -> tuple[tuple[int, int], ...] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return ((value, value),)
    if isinstance(value, dict):
        if "range" in value and isinstance(value["range"], list) and len(value["range"]) == 2:
            low, high = value["range"]
            if isinstance(low, int) and isinstance(high, int):
                return ((low, high),)
        if "set" in value and isinstance(value["set"], list):
            out = []
            for item in value["set"]:
                part = _ranges(item)
                if part is None:
                    return None
                out.extend(part)
            return tuple(out)
    return None


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        if isinstance(value, str):
            return ipaddress.ip_network(value, strict=False)
        if isinstance(value, dict) and isinstance(value.get("prefix"), dict):
            prefix = value["prefix"]
            return ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}", strict=False)
    except (ValueError, KeyError, TypeError):
        return None
    return None


def _match(expr: dict[str, Any]) -> list[Cond]:
    """The conditions of one ``match`` expression (``?`` when nstap does not model it)."""
    op = expr.get("op", "==")
    if op not in ("==", "!=", "in"):
        return [Cond(False, "?", f"match {op}")]
    negated = op == "!="
    left = expr.get("left")
    right = expr.get("right")
    if not isinstance(left, dict):
        return [Cond(False, "?", "match")]
    if "payload" in left and isinstance(left["payload"], dict):
        proto = left["payload"].get("protocol")
        fld = left["payload"].get("field")
        if fld in ("dport", "sport"):
            ports = _ranges(right)
            if ports is None:
                return [Cond(False, "?", f"{proto} {fld}")]
            conds = [Cond(False, "proto", proto)] if proto in ("tcp", "udp", "sctp") else []
            return conds + [Cond(negated, fld, ports)]
        if proto in ("ip", "ip6") and fld in ("daddr", "saddr"):
            net = _network(right)
            if net is None:
                return [Cond(False, "?", f"{proto} {fld}")]
            return [Cond(negated, "dst" if fld == "daddr" else "src", net)]
        return [Cond(False, "?", f"{proto} {fld}")]
    if "meta" in left and isinstance(left["meta"], dict):
        key = left["meta"].get("key")
        if key == "l4proto" and isinstance(right, str):
            return [Cond(negated, "proto", right)]
        if key in ("iifname", "oifname") and isinstance(right, str):
            return [Cond(negated, "in" if key == "iifname" else "out", right.replace("*", "+"))]
        return [Cond(False, "?", f"meta {key}")]
    if "fib" in left and isinstance(left["fib"], dict):
        flags = left["fib"].get("flags") or []
        if left["fib"].get("result") == "type" and "daddr" in flags and isinstance(right, str):
            return [Cond(negated, "dst_type", right.upper())]
    return [Cond(False, "?", next(iter(left), "match"))]


def _rule(data: dict[str, Any], key: str, position: int, chain_keys: set[str], family: str, table: str) -> Rule:
    conds: list[Cond] = []
    target = ""
    goto = False
    dnat: Dnat | None = None
    packets = byte_count = 0
    comment = str(data.get("comment", ""))[:200]
    for expr in data.get("expr") or []:
        if not isinstance(expr, dict) or not expr:
            continue
        name, value = next(iter(expr.items()))
        if name == "match" and isinstance(value, dict):
            conds.extend(_match(value))
        elif name == "counter" and isinstance(value, dict):
            packets = int(value.get("packets", 0) or 0)
            byte_count = int(value.get("bytes", 0) or 0)
        elif name in ("dnat", "redirect", "snat", "masquerade"):
            value = value if isinstance(value, dict) else {}
            port = value.get("port", 0)
            low, high = (port, port) if isinstance(port, int) else (_ranges(port) or ((0, 0),))[0]
            addr = value.get("addr")
            if name == "dnat":
                if not isinstance(addr, str):
                    conds.append(Cond(False, "?", "dnat to a map"))
                    addr = None
                dnat = Dnat(addr, low, high)
            elif name == "redirect":
                dnat = Dnat(None, low, high)
            target = name.upper() if name != "redirect" else "REDIRECT"
        elif name in ("accept", "drop", "reject", "return"):
            # An accept ends this base chain only: the next chains at the hook still see the
            # packet, as after iptables' RETURN from a chain.
            target = {"accept": "RETURN", "drop": "DROP", "reject": "REJECT", "return": "RETURN"}[name]
        elif name in ("jump", "goto") and isinstance(value, dict):
            callee = f"{family} {table} {value.get('target')}"
            if callee in chain_keys:
                target = callee
                goto = name == "goto"
        elif name in ("counter", "log", "comment", "limit", "meta", "mangle"):
            continue
        else:
            conds.append(Cond(False, "?", name))  # an xt match, a lookup, a ct state...
    text = f"nft {family} {table} {key.split(' ', 2)[2]} handle {data.get('handle')}: {describe(conds, target, dnat)}"
    return Rule("nat", key, position, text[:400], packets, byte_count, tuple(conds), target, goto, dnat, comment)


def describe(conds: list[Cond], target: str, dnat: Dnat | None) -> str:
    """A rule in words close to nft's own syntax (its JSON form has no text)."""
    words = []
    for negated, key, value in conds:
        bang = "!= " if negated else ""
        if key in ("dport", "sport"):
            ports = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in value)  # type: ignore[union-attr]
            words.append(f"{key} {bang}{{ {ports} }}" if "," in ports else f"{key} {bang}{ports}")
        elif key in ("dst", "src"):
            words.append(f"{'daddr' if key == 'dst' else 'saddr'} {bang}{value}")
        elif key in ("in", "out"):
            words.append(f"{'iifname' if key == 'in' else 'oifname'} {bang}{value}")
        elif key == "proto":
            words.append(f"l4proto {bang}{value}")
        elif key == "dst_type":
            words.append(f"fib daddr type {bang}{str(value).lower()}")
        else:
            words.append(str(value))
    if dnat is not None:
        to = f"{dnat.address or ''}" + (f":{dnat.port_low}" if dnat.port_low else "")
        words.append(f"{target.lower()} to {to}")
    elif target:
        words.append(target.lower() if " " not in target else f"jump {target.rsplit(' ', 1)[1]}")
    return " ".join(words)


_DECODER = json.JSONDecoder()
_HEAD = re.compile(r'\s*\{\s*"nftables"\s*:\s*\[\s*')
_SPACE = re.compile(r"\s*")


def nft_items(text: str) -> Iterator[Any]:
    """The objects of ``nft -j`` output's "nftables" array, decoded one at a time.

    ``json.loads`` of a whole ruleset holds the GIL until it is done (0.44 s for the 7.8 MB that
    20,000 rules print), stopping the event loop's thread for as long; decoded object by object,
    the thread that parses gives the GIL up between objects like any Python code.
    """
    head = _HEAD.match(text)
    if head is None:
        raise ValueError("no nftables array")
    at = head.end()
    if text.startswith("]", at):
        return
    pause = ROUND.pause  # a worker thread waits out each sampling round (see nstap.gate)
    while True:
        pause()
        item, at = _DECODER.raw_decode(text, at)
        yield item
        at = _SPACE.match(text, at).end()
        sep = text[at : at + 1]
        if sep == "]":
            return
        if sep != ",":
            raise ValueError(f"expected , or ] at {at}")
        at = _SPACE.match(text, at + 1).end()


def parse_nft_json(text: str) -> NativeRuleset:
    """The native tables of ``nft -j list ruleset`` output; a clear error in ``errors`` for what cannot be used."""
    out = NativeRuleset()
    with collector_paused():
        try:
            _native(nft_items(text), out)
        except ValueError as exc:  # the JSON itself is broken: nothing of it is used
            return NativeRuleset(errors=[f"not nft JSON: {exc}"])
    return out


def _native(items: Iterator[Any], out: NativeRuleset) -> None:
    """Add the native tables, chains and rules among ``items`` to ``out``; each object is dropped
    once used, so that no large structure is freed at once (which holds the GIL as long)."""
    rules: list[dict[str, Any] | None] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        try:
            if "table" in item:
                t = item["table"]
                if not _is_iptables(t.get("family"), t.get("name")):
                    out.tables.append(f"{t.get('family')} {t.get('name')}")
            elif "chain" in item:
                c = item["chain"]
                family, table = c.get("family"), c.get("table")
                if _is_iptables(family, table) or family not in _FAMILIES:
                    continue
                key = f"{family} {table} {c['name']}"
                out.chains[key] = Chain(key, str(c.get("policy", "-")))
                if "hook" in c:
                    out.bases.append(BaseChain(key, _FAMILIES[family], str(c["hook"]), int(c.get("prio", 0)), str(c.get("type", "filter"))))
            elif "rule" in item:
                r = item["rule"]
                if not _is_iptables(r.get("family"), r.get("table")) and r.get("family") in _FAMILIES:
                    if len(rules) >= MAX_RULES:
                        out.error(f"more than {MAX_RULES} native rules: the rest ignored")
                        break
                    rules.append(r)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            out.error(f"bad object {next(iter(item), '?')}: {exc}")
    keys = set(out.chains)
    pause = ROUND.pause
    for i, r in enumerate(rules):
        rules[i] = None
        pause()
        try:
            key = f"{r['family']} {r['table']} {r['chain']}"  # type: ignore[index]
            chain = out.chains.get(key)
            if chain is None:
                out.error(f"rule in unknown chain {key}")
                continue
            chain.rules.append(_rule(r, key, len(chain.rules) + 1, keys, r["family"], r["table"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            out.error(f"bad rule: {exc}")


def native_tables(text: str) -> list[tuple[str, str]]:
    """(family, name) of the native tables in ``nft -j list tables`` output: not iptables-nft's, and
    of a family that routes IP; [] for output that is not nft JSON."""
    out = []
    try:
        for item in nft_items(text):
            table = item.get("table") if isinstance(item, dict) else None
            if isinstance(table, dict):
                family, name = table.get("family"), table.get("name")
                if family in _FAMILIES and isinstance(name, str) and not _is_iptables(family, name):
                    out.append((family, name))
    except ValueError:
        return []
    return out


def _is_iptables(family: Any, table: Any) -> bool:
    return family in ("ip", "ip6") and table in IPTABLES_TABLES


__all__ = ["BaseChain", "IPTABLES_TABLES", "NativeRuleset", "native_tables", "nft_items", "parse_nft_json"]
