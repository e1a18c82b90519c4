"""The DNS program: C source for bcc, its maps' layouts, and the names its numbers stand for.

One ``sched_cls`` program in two entry points, attached with TCX links (:mod:`.tcx`) inside each
watched namespace: ``dns_egress`` on every interface's egress (lo included: a lookup to Docker's
embedded resolver at 127.0.0.11 never leaves the namespace, and its answer crosses lo's egress
too) and ``dns_ingress`` on every other interface's ingress (answers from outside). A packet is
DNS when either port is 53, or when it goes to or comes from 127.0.0.11 (Docker's rules in the
container's own ``nat`` table send the embedded resolver's queries to a random port).

Everything is aggregated **in the kernel**, keyed by the namespace's cookie (``bpf_get_netns_cookie``:
unique for the namespace's life and never reused, unlike its inode):

* a query (egress) is remembered in ``dns_inflight`` (LRU) by (client address, port, id);
* its answer (ingress, or lo's egress) is matched there: answered lookups by (rcode, qtype) in
  ``dns_counts``, their latency in a log2 histogram in ``dns_latency``, the server's queries,
  answers, failures and time in ``dns_servers``, a failing name in ``dns_names``;
* a query the embedded resolver forwards upstream (from the container's namespace) is marked
  ``forwarded``: the server list shows it, the container's lookups do not count it twice;
* a query left unanswered is found by the daemon's read of ``dns_inflight`` after ``dns.timeout``.
"""

from __future__ import annotations

import struct

NAME_BYTES = 64  # bytes of a question's name kept (wire format); longer names are cut
LO_IFINDEX = 1  # the loopback device's index, the same in every namespace
SUM_BUCKET = 0xFFFF  # dns_latency's key holding the answered lookups' total nanoseconds
MAX_COUNT_KEYS = 16384  # (namespace, rcode, qtype): 15 per namespace at most
MAX_LATENCY_KEYS = 16384  # (namespace, log2 bucket): about 25 per namespace
MAX_INFLIGHT = 65536  # lookups awaiting their answer, host-wide (maps allocate as entries come)
MAX_SERVERS = 16384  # (namespace, server)
MAX_NAMES = 32768  # (namespace, rcode, qtype, failing name)
MAX_BUDGETS = 16384  # namespaces
MAX_PENDING = 8192  # lookups at Docker's embedded resolver not answered yet (to tell its forwards from the container's own)
# What one namespace may hold (a flood of distinct lookups, names or servers stops there, counted):
MAX_FLIGHTS_PER_NS = 1024  # lookups awaiting an answer
MAX_NAMES_PER_NS = 128  # failing names (the daemon prunes those not seen for a minute)
MAX_SERVERS_PER_NS = 32  # servers (the daemon prunes those not asked for SERVER_IDLE seconds)
BPF_FUNC_GET_NETNS_COOKIE = 122  # declared here: the headers bcc compiles against may predate it
FUNCTIONS = ("dns_egress", "dns_ingress")

# The maps' keys and values as the program lays them out (native byte order, no padding).
COUNT_KEY = struct.Struct("=QBB6x")  # cookie, rcode, qtype
COUNT = struct.Struct("=Q")
LATENCY_KEY = struct.Struct("=QII")  # cookie, bucket, pad
FLIGHT_KEY = struct.Struct("=Q16sHHHH")  # cookie (lo only, else 0), client, client port, id, family, pad
FLIGHT_VALUE = struct.Struct(f"=QQ16sHHBB2x{NAME_BYTES}s")  # sent_ns, cookie, server, server port, qtype, forwarded, len, name
PENDING_KEY = struct.Struct(f"=QH6x{NAME_BYTES}s")  # cookie, qtype, name
SERVER_KEY = struct.Struct("=Q16sHHI")  # cookie, address, family, port, pad
SERVER_VALUE = struct.Struct("=6Q")  # queries, answers, failures, latency_ns, forwarded, last_ns
BUDGET = struct.Struct("=5Q")  # flights, names, servers, answered, refused (dns_budget: the kernel's; dns_released: the daemon's)
NAME_KEY = struct.Struct(f"=QBB6x{NAME_BYTES}s")  # cookie, rcode, qtype, name
NAME_VALUE = struct.Struct("=QQ")  # count, last_ns
MAPS = {
    "dns_counts": (COUNT_KEY.size, COUNT.size),
    "dns_latency": (LATENCY_KEY.size, COUNT.size),
    "dns_inflight": (FLIGHT_KEY.size, FLIGHT_VALUE.size),
    "dns_embedded": (PENDING_KEY.size, COUNT.size),
    "dns_servers": (SERVER_KEY.size, SERVER_VALUE.size),
    "dns_names": (NAME_KEY.size, NAME_VALUE.size),
    "dns_budget": (8, BUDGET.size),
    "dns_released": (8, BUDGET.size),
    "dns_lost": (4, 8),
    "dns_changes": (4, 8),
}

def cookie_of(map_name: str, key: bytes, value: bytes) -> int:
    """The namespace cookie of a map entry: its key's first 8 bytes, but for a lookup in flight
    (whose key holds it on lo only) its value's second 8."""
    raw = value[8:16] if map_name == "dns_inflight" else key[:8]
    return int.from_bytes(raw, "little")


RCODES = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED", 15: "other"}  # the program's rcode buckets
TIMEOUT = "timeout"
OUTCOMES = ("NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "other", TIMEOUT)  # the label rcode's values
QTYPES = {1: "A", 28: "AAAA", 0: "other"}


def rcode_name(bucket: int) -> str:
    """The label value of a program's rcode bucket."""
    return RCODES.get(bucket, "other")


def qtype_name(qtype: int) -> str:
    """The label value of a question type (A, AAAA or other)."""
    return QTYPES.get(qtype, "other")


def decode_name(wire: bytes) -> str:
    """A question's name from its wire format as the program kept it (labels; cut at NAME_BYTES):
    dotted, with non-printable bytes escaped as dig does (a container chooses its names) and
    "..." where it was cut."""
    out: list[str] = []
    pos = 0
    while pos < len(wire):
        length = wire[pos]
        if length == 0:
            return ".".join(out) + "." if out else "."
        label = wire[pos + 1 : pos + 1 + length]
        out.append("".join(chr(b) if 0x21 <= b < 0x7F and b not in (0x2E, 0x5C) else f"\\{b:03d}" for b in label))
        if pos + 1 + length > len(wire):
            break
        pos += 1 + length
    return ".".join(out) + "..."


def program_text() -> str:
    """The program's C source with its constants defined in front."""
    defines = {
        "NAME_BYTES": NAME_BYTES, "LO_IFINDEX": LO_IFINDEX, "TCX_NEXT": -1, "SUM_BUCKET": SUM_BUCKET,
        "MAX_COUNT_KEYS": MAX_COUNT_KEYS, "MAX_LATENCY_KEYS": MAX_LATENCY_KEYS, "MAX_INFLIGHT": MAX_INFLIGHT,
        "MAX_SERVERS": MAX_SERVERS, "MAX_NAMES": MAX_NAMES, "MAX_BUDGETS": MAX_BUDGETS, "MAX_PENDING": MAX_PENDING, "MAX_FLIGHTS_PER_NS": MAX_FLIGHTS_PER_NS,
        "MAX_NAMES_PER_NS": MAX_NAMES_PER_NS, "MAX_SERVERS_PER_NS": MAX_SERVERS_PER_NS, "EEXIST": 17, "BPF_FUNC_get_netns_cookie_NR": BPF_FUNC_GET_NETNS_COOKIE,
    }
    return "".join(f"#define {k} ({v})\n" for k, v in defines.items()) + PROGRAM


PROGRAM = r"""
#include <uapi/linux/bpf.h>

static u64 (*netns_cookie)(void *ctx) = (void *)BPF_FUNC_get_netns_cookie_NR;

struct count_key { u64 cookie; u8 rcode; u8 qtype; u8 pad[6]; };
BPF_F_TABLE("hash", struct count_key, u64, dns_counts, MAX_COUNT_KEYS, BPF_F_NO_PREALLOC);
struct latency_key { u64 cookie; u32 bucket; u32 pad; };
BPF_F_TABLE("hash", struct latency_key, u64, dns_latency, MAX_LATENCY_KEYS, BPF_F_NO_PREALLOC);

/* What one namespace holds in the maps all share: a container chooses its lookups, and a flood of
   distinct ids, names or servers must not push the others' out (none of these maps is LRU). The
   kernel counts what it added (and the answered lookups it deleted) in dns_budget, the daemon
   what it released (lookups that timed out, names and servers it pruned) in dns_released: each
   side writes its own map only. A lookup past the namespace's room is not tracked, and counted. */
struct budget { u64 flights; u64 names; u64 servers; u64 answered; u64 refused; };
BPF_F_TABLE("hash", u64, struct budget, dns_budget, MAX_BUDGETS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", u64, struct budget, dns_released, MAX_BUDGETS, BPF_F_NO_PREALLOC);
BPF_ARRAY(dns_lost, u64, 1);  /* entries not made because a map was full */
BPF_ARRAY(dns_changes, u64, 1);  /* DNS packets handled: the daemon reads the other maps when it moved */

/* A lookup awaiting its answer. The namespace's cookie is the query's (on egress the packet's
   socket, or device, is the namespace's), kept in the value: on a veth's ingress the kernel's
   bpf_get_netns_cookie answers with the sending socket's namespace (the server's, measured), so
   an answer from outside is matched by (client address, port, id, family) alone. On lo both
   directions are this namespace's, and the cookie is in the key too (127.0.0.1 is in every one). */
struct flight_key { u64 cookie; u8 client[16]; u16 client_port; u16 id; u16 family; u16 pad; };
struct flight_val { u64 sent_ns; u64 cookie; u8 server[16]; u16 server_port; u16 qtype; u8 forwarded; u8 len; u8 pad[2]; u8 name[NAME_BYTES]; };
BPF_F_TABLE("hash", struct flight_key, struct flight_val, dns_inflight, MAX_INFLIGHT, BPF_F_NO_PREALLOC);

struct pending_key { u64 cookie; u16 qtype; u8 pad[6]; u8 name[NAME_BYTES]; };
BPF_TABLE("lru_hash", struct pending_key, u64, dns_embedded, MAX_PENDING);  /* a hint only: LRU (preallocated) and small */

struct server_key { u64 cookie; u8 addr[16]; u16 family; u16 port; u32 pad; };
struct server_val { u64 queries; u64 answers; u64 failures; u64 latency_ns; u64 forwarded; u64 last_ns; };
BPF_F_TABLE("hash", struct server_key, struct server_val, dns_servers, MAX_SERVERS, BPF_F_NO_PREALLOC);

struct name_key { u64 cookie; u8 rcode; u8 qtype; u8 pad[6]; u8 name[NAME_BYTES]; };
struct name_val { u64 count; u64 last_ns; };
BPF_F_TABLE("hash", struct name_key, struct name_val, dns_names, MAX_NAMES, BPF_F_NO_PREALLOC);

BPF_PERCPU_ARRAY(scratch, struct flight_val, 2);

#define FLIGHTS 0
#define NAMES 1
#define SERVERS 2

static __always_inline void lost_one(void) {
    int first = 0;
    u64 *lost = dns_lost.lookup(&first);
    if (lost)
        __sync_fetch_and_add(lost, 1);
}

static __always_inline struct budget *budget_of(u64 cookie) {
    struct budget zero = {};
    struct budget *b = dns_budget.lookup_or_try_init(&cookie, &zero);
    if (!b)
        lost_one();
    return b;
}

/* Takes a place for one more entry of a kind in the namespace: added to what it holds first, then
   checked, so that two CPUs can never both take its last place (each sees the other's; at worst
   both give theirs back and the next lookup takes it). 1 when taken (given back with give_back
   when the entry is not made after all), else 0, counted as refused. */
static __always_inline int reserve(u64 cookie, struct budget *b, int what) {
    struct budget *r = dns_released.lookup(&cookie);
    u64 *count, held, limit;
    if (what == FLIGHTS) {
        count = &b->flights;
        limit = MAX_FLIGHTS_PER_NS;
    } else if (what == NAMES) {
        count = &b->names;
        limit = MAX_NAMES_PER_NS;
    } else {
        count = &b->servers;
        limit = MAX_SERVERS_PER_NS;
    }
    __sync_fetch_and_add(count, 1);
    held = *(volatile u64 *)count;
    if (what == FLIGHTS)
        held -= *(volatile u64 *)&b->answered + (r ? r->flights : 0);
    else if (what == NAMES)
        held -= r ? r->names : 0;
    else
        held -= r ? r->servers : 0;
    if ((s64)held > (s64)limit) {
        __sync_fetch_and_add(count, -1);
        __sync_fetch_and_add(&b->refused, 1);
        return 0;
    }
    return 1;
}

static __always_inline void give_back(u64 *count) {
    __sync_fetch_and_add(count, -1);
}


struct packet {
    u64 cookie;
    u8 src[16];
    u8 dst[16];
    u16 family;
    u16 sport;
    u16 dport;
    u32 dns;      /* offset of the DNS header */
};

static __always_inline int parse(struct __sk_buff *skb, struct packet *p) {
    u32 off = 0;
    u16 l2proto = 0;
    u8 l4 = 0;
    if (bpf_skb_load_bytes(skb, 12, &l2proto, 2) == 0 && l2proto == skb->protocol)
        off = 14;
    if (skb->protocol == bpf_htons(0x0800)) {
        u8 vihl = 0;
        u16 frag = 0;
        if (bpf_skb_load_bytes(skb, off, &vihl, 1) || (vihl >> 4) != 4)
            return 0;
        if (bpf_skb_load_bytes(skb, off + 6, &frag, 2) || (bpf_ntohs(frag) & 0x1fff))
            return 0;   /* a later fragment: no header */
        if (bpf_skb_load_bytes(skb, off + 9, &l4, 1))
            return 0;
        if (bpf_skb_load_bytes(skb, off + 12, p->src, 4) || bpf_skb_load_bytes(skb, off + 16, p->dst, 4))
            return 0;
        p->family = 2;
        off += (vihl & 0xf) * 4;
    } else if (skb->protocol == bpf_htons(0x86DD)) {
        u8 v = 0;
        if (bpf_skb_load_bytes(skb, off, &v, 1) || (v >> 4) != 6)
            return 0;
        if (bpf_skb_load_bytes(skb, off + 6, &l4, 1))
            return 0;
        if (bpf_skb_load_bytes(skb, off + 8, p->src, 16) || bpf_skb_load_bytes(skb, off + 24, p->dst, 16))
            return 0;
        p->family = 10;
        off += 40;
    } else {
        return 0;
    }
    u16 ports[2];
    if (l4 != 17 && l4 != 6)
        return 0;
    if (bpf_skb_load_bytes(skb, off, ports, 4))
        return 0;
    p->sport = bpf_ntohs(ports[0]);
    p->dport = bpf_ntohs(ports[1]);
    int embedded = p->family == 2 && p->dst[0] == 127 && p->dst[1] == 0 && p->dst[2] == 0 && p->dst[3] == 11;
    embedded |= p->family == 2 && p->src[0] == 127 && p->src[1] == 0 && p->src[2] == 0 && p->src[3] == 11;
    if (p->sport != 53 && p->dport != 53 && !embedded)
        return 0;
    if (l4 == 17) {
        p->dns = off + 8;
    } else {
        u8 doff = 0;
        if (bpf_skb_load_bytes(skb, off + 12, &doff, 1))
            return 0;
        p->dns = off + (doff >> 4) * 4 + 2;   /* after the message's length */
    }
    if (skb->len < p->dns + 12 + 5)
        return 0;
    return 1;
}

static __always_inline u8 rcode_bucket(u8 rcode) {
    return (rcode == 0 || rcode == 2 || rcode == 3 || rcode == 5) ? rcode : 15;
}

static __always_inline u16 qtype_bucket(u16 qtype) {
    return (qtype == 1 || qtype == 28) ? qtype : 0;
}

/* The question's name (wire format, zeroed after its end) into name; its type, 0 if the name is
   longer than NAME_BYTES (then name holds its first NAME_BYTES bytes). */
static __always_inline u16 read_question(struct __sk_buff *skb, u32 at, u8 *name, u8 *len) {
    u32 avail = skb->len - at;
    if (avail > NAME_BYTES)
        avail = NAME_BYTES;
    if (avail < 1)
        return 0;
    avail = ((avail - 1) & (NAME_BYTES - 1)) + 1;  /* 1..NAME_BYTES, as the verifier sees it too */
    if (bpf_skb_load_bytes(skb, at, name, avail))
        return 0;
    u32 pos = 0;
    int end = 0;
#pragma unroll
    for (int i = 0; i < 40; i++) {
        if (pos >= avail)
            break;
        u8 l = name[pos & (NAME_BYTES - 1)];
        if (l == 0) {
            end = 1;
            break;
        }
        if (l >= 0x40)
            break;
        pos += l + 1;
    }
#pragma unroll
    for (int i = 0; i < NAME_BYTES; i++) {
        if (i > pos || i >= avail)
            name[i] = 0;
    }
    if (!end) {
        *len = NAME_BYTES;
        return 0;
    }
    *len = pos + 1;
    u16 qtype = 0;
    if (bpf_skb_load_bytes(skb, at + pos + 1, &qtype, 2))
        return 0;
    return bpf_ntohs(qtype);
}

static __always_inline int is_embedded(u8 *addr, u16 family) {
    return family == 2 && addr[0] == 127 && addr[1] == 0 && addr[2] == 0 && addr[3] == 11;
}

/* The key of a lookup: its client's address and port (the query's source, the answer's
   destination), its id; the cookie on lo only (see flight_key). */
static __always_inline void flight_of(struct flight_key *fk, struct __sk_buff *skb, struct packet *p, u8 *client, u16 port, u16 id) {
    fk->cookie = skb->ifindex == LO_IFINDEX ? p->cookie : 0;
    __builtin_memcpy(fk->client, client, 16);
    fk->client_port = port;
    fk->id = id;
    fk->family = p->family;
}

static __always_inline void on_query(struct __sk_buff *skb, struct packet *p, u16 id) {
    int zero = 0;
    struct flight_val *v = scratch.lookup(&zero);
    if (!v)
        return;
    __builtin_memset(v, 0, sizeof(*v));
    v->qtype = read_question(skb, p->dns + 12, v->name, &v->len);
    v->sent_ns = bpf_ktime_get_ns();
    v->cookie = p->cookie;
    __builtin_memcpy(v->server, p->dst, 16);
    int embedded = is_embedded(p->dst, p->family);
    v->server_port = embedded ? 53 : p->dport;

    int one = 1;
    struct pending_key *pk = (struct pending_key *)scratch.lookup(&one);
    if (!pk)
        return;
    __builtin_memset(pk, 0, sizeof(*pk));
    pk->cookie = p->cookie;
    pk->qtype = v->qtype;
    __builtin_memcpy(pk->name, v->name, NAME_BYTES);
    if (embedded) {
        dns_embedded.update(pk, &v->sent_ns);
    } else {
        u64 *since = dns_embedded.lookup(pk);
        if (since && v->sent_ns - *since < 10000000000ULL)
            v->forwarded = 1;
    }

    struct budget *b = budget_of(p->cookie);
    if (!b)
        return;
    struct flight_key fk = {};
    flight_of(&fk, skb, p, p->src, p->sport, id);
    if (dns_inflight.lookup(&fk)) {
        dns_inflight.update(&fk, v);  /* the same query again (a retry): its time starts again */
    } else {
        if (!reserve(p->cookie, b, FLIGHTS))
            return;
        int err = dns_inflight.insert(&fk, v);
        if (err) {
            give_back(&b->flights);
            if (err == -EEXIST)
                dns_inflight.update(&fk, v);
            else
                lost_one();
        }
    }

    struct server_key sk = {};
    sk.cookie = p->cookie;
    __builtin_memcpy(sk.addr, p->dst, 16);
    sk.family = p->family;
    sk.port = v->server_port;
    struct server_val *s = dns_servers.lookup(&sk);
    if (!s && reserve(p->cookie, b, SERVERS)) {
        struct server_val none = {};
        int err = dns_servers.insert(&sk, &none);
        if (err) {
            give_back(&b->servers);
            if (err != -EEXIST)
                lost_one();
        }
        s = dns_servers.lookup(&sk);
    }
    if (s) {
        __sync_fetch_and_add(&s->queries, 1);
        if (v->forwarded)
            __sync_fetch_and_add(&s->forwarded, 1);
        s->last_ns = v->sent_ns;
    }
}

static __always_inline void on_answer(struct __sk_buff *skb, struct packet *p, u16 id, u8 rcode) {
    struct flight_key fk = {};
    flight_of(&fk, skb, p, p->dst, p->dport, id);
    struct flight_val *v = dns_inflight.lookup(&fk);
    if (!v)
        return;
    u64 now = bpf_ktime_get_ns();
    u64 took = now - v->sent_ns;
    u8 rc = rcode_bucket(rcode);

    struct server_key sk = {};
    sk.cookie = v->cookie;
    __builtin_memcpy(sk.addr, v->server, 16);
    sk.family = p->family;
    sk.port = v->server_port;
    struct server_val *s = dns_servers.lookup(&sk);
    if (s) {
        __sync_fetch_and_add(&s->answers, 1);
        __sync_fetch_and_add(&s->latency_ns, took);
        if (rc)
            __sync_fetch_and_add(&s->failures, 1);
    }
    if (!v->forwarded) {
        struct count_key ck = {};
        ck.cookie = v->cookie;
        ck.rcode = rc;
        ck.qtype = (u8)qtype_bucket(v->qtype);
        u64 zero = 0;
        u64 *c = dns_counts.lookup_or_try_init(&ck, &zero);
        if (c)
            __sync_fetch_and_add(c, 1);
        else
            lost_one();
        struct latency_key lk = {};
        lk.cookie = v->cookie;
        lk.bucket = bpf_log2l(took / 1000);
        u64 *l = dns_latency.lookup_or_try_init(&lk, &zero);
        if (l)
            __sync_fetch_and_add(l, 1);
        else
            lost_one();
        lk.bucket = SUM_BUCKET;  /* the answered lookups' total time, in nanoseconds */
        l = dns_latency.lookup_or_try_init(&lk, &zero);
        if (l)
            __sync_fetch_and_add(l, took);
    }
    if (is_embedded(v->server, p->family)) {  /* the embedded resolver answered: no longer pending */
        int one = 1;
        struct pending_key *pk = (struct pending_key *)scratch.lookup(&one);
        if (pk) {
            __builtin_memset(pk, 0, sizeof(*pk));
            pk->cookie = v->cookie;
            pk->qtype = v->qtype;
            __builtin_memcpy(pk->name, v->name, NAME_BYTES);
            dns_embedded.delete(pk);
        }
    }
    if (rc && !v->forwarded) {
        int one = 1;
        struct name_key *nk = (struct name_key *)scratch.lookup(&one);
        if (nk) {
            __builtin_memset(nk, 0, sizeof(*nk));
            nk->cookie = v->cookie;
            nk->rcode = rc;
            nk->qtype = (u8)qtype_bucket(v->qtype);
            __builtin_memcpy(nk->name, v->name, NAME_BYTES);
            struct name_val *n = dns_names.lookup(nk);
            struct budget *b = n ? NULL : budget_of(v->cookie);
            if (b && reserve(v->cookie, b, NAMES)) {
                struct name_val nv = {};
                int err = dns_names.insert(nk, &nv);
                if (err) {
                    give_back(&b->names);
                    if (err != -EEXIST)
                        lost_one();
                }
                n = dns_names.lookup(nk);
            }
            if (n) {
                __sync_fetch_and_add(&n->count, 1);
                n->last_ns = now;
            }
        }
    }
    u64 cookie = v->cookie;
    if (dns_inflight.delete(&fk) == 0) {
        struct budget *b = dns_budget.lookup(&cookie);
        if (b)
            __sync_fetch_and_add(&b->answered, 1);
    }
}

/* Whether the packet may be DNS, read straight from its headers (no helper call): every packet of
   the namespace comes here, and all but a few leave at once. 1 when it cannot tell (headers not
   in the linear part): the full parse decides. */
static __always_inline int maybe_dns(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    u32 off = 0;
    if (data + 14 > end)
        return 1;
    if (*(u16 *)(data + 12) == skb->protocol)
        off = 14;
    u8 *l3 = data + off;
    u8 *l4;
    if (skb->protocol == bpf_htons(0x0800)) {
        if ((void *)(l3 + 20) > end)
            return 1;
        if (l3[9] != 17 && l3[9] != 6)
            return 0;
        if ((l3[12] == 127 && l3[13] == 0 && l3[14] == 0 && l3[15] == 11) || (l3[16] == 127 && l3[17] == 0 && l3[18] == 0 && l3[19] == 11))
            return 1;
        l4 = l3 + (l3[0] & 0xf) * 4;
    } else if (skb->protocol == bpf_htons(0x86DD)) {
        if ((void *)(l3 + 40) > end)
            return 1;
        if (l3[6] != 17 && l3[6] != 6)
            return 0;
        l4 = l3 + 40;
    } else {
        return 0;
    }
    if ((void *)(l4 + 4) > end)
        return 1;
    return *(u16 *)l4 == bpf_htons(53) || *(u16 *)(l4 + 2) == bpf_htons(53);
}

static __always_inline int handle(struct __sk_buff *skb, int egress) {
    if (!maybe_dns(skb))
        return TCX_NEXT;
    struct packet p = {};
    if (!parse(skb, &p))
        return TCX_NEXT;
    struct { u16 id; u16 flags; } h;
    if (bpf_skb_load_bytes(skb, p.dns, &h, 4))
        return TCX_NEXT;
    u16 flags = bpf_ntohs(h.flags);
    int answer = flags >> 15;
    if ((flags >> 11) & 0xf)   /* not a standard query */
        return TCX_NEXT;
    p.cookie = netns_cookie(skb);
    int first = 0;
    u64 *changes = dns_changes.lookup(&first);
    if (changes)
        __sync_fetch_and_add(changes, 1);
    if (!answer && egress)
        on_query(skb, &p, h.id);
    else if (answer && (!egress || skb->ifindex == LO_IFINDEX))
        on_answer(skb, &p, h.id, flags & 0xf);
    return TCX_NEXT;
}

int dns_egress(struct __sk_buff *skb) { return handle(skb, 1); }
int dns_ingress(struct __sk_buff *skb) { return handle(skb, 0); }
"""
