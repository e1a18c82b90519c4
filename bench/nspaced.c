// The lower bound of ../shared/tools/nslimit.c, taken at the daemon's cadence.
//
// nslimit reads the same namespaces' files back to back, thousands of times: everything the
// kernel touches stays in the CPU's caches, and its figure is the cost of a warm read. The daemon
// reads each namespace once per interval; by then the caches hold other work, and the same reads
// cost more. This does exactly nslimit's reads (pread of /proc/<pid>/net/{dev,snmp,netstat,sockstat}
// on descriptors kept open, and a LISTEN-only sock_diag dump on a netlink socket kept in each
// namespace), one round over every namespace per interval, and counts only the CPU of the rounds
// (getrusage around each; the sleep between them is not counted): what no sampler that reads
// these files once per interval can go below on this machine.
//
// With --daemon-reads it does instead what the daemon reads per sample: dev, sockstat and
// sockstat6, and each listener asked for by its id (one send per family, one hash probe each) in
// place of the LISTEN dump (the listeners are found by one dump per family before the rounds): the
// floor of the daemon's own reads at its cadence, below which no sampler of its design can go.
// snmp and netstat too with --protocol-files: the daemon reads them where the eBPF pass over every
// namespace's counters (nstap/ebpf/mibs.py) is not loaded; that pass is measured by the bench.
// sockstat and sockstat6 only with --socket-files: the daemon reads them where that pass does
// not read the sockets in use (the loader could not learn the protocols' slots).
//
// usage: nspaced [--daemon-reads [--protocol-files] [--socket-files]] ROUNDS INTERVAL_S PID...
// prints "paced_us X (n=.. rounds=..)": CPU µs per namespace-sample
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double cpu_us(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1e6 + r.ru_utime.tv_usec + r.ru_stime.tv_usec;
}

static char buf[1 << 16];

struct diag_req {
    struct nlmsghdr h;
    struct inet_diag_req_v2 r;
};

#define MAX_LISTENERS 8  // the daemon asks for up to 8 known listeners by id (sockets.py MAX_LOOKUPS)

struct lookups {  // one family's listeners of one namespace, asked for by id in one send
    int n;
    struct diag_req q[MAX_LISTENERS];
};

// A LISTEN dump of one family (nslimit's, for AF_INET6); with `found`, each listener's id is kept
// as an exact request for the rounds.
static long dump_family(int fd, int family, unsigned states, struct lookups *found) {
    struct diag_req q;
    memset(&q, 0, sizeof q);
    q.h.nlmsg_len = sizeof q;
    q.h.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    q.h.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    q.r.sdiag_family = family;
    q.r.sdiag_protocol = IPPROTO_TCP;
    q.r.idiag_states = states;
    if (send(fd, &q, sizeof q, 0) < 0) return 0;
    long n = 0;
    for (;;) {
        ssize_t len = recv(fd, buf, sizeof buf, 0);
        if (len <= 0) return n;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
            if (h->nlmsg_type == NLMSG_DONE || h->nlmsg_type == NLMSG_ERROR) return n;
            if (found != NULL && found->n < MAX_LISTENERS) {
                struct inet_diag_msg *m = NLMSG_DATA(h);
                struct diag_req *r = &found->q[found->n];
                memset(r, 0, sizeof *r);
                r->h.nlmsg_len = sizeof *r;
                r->h.nlmsg_type = SOCK_DIAG_BY_FAMILY;
                r->h.nlmsg_flags = NLM_F_REQUEST;
                r->h.nlmsg_seq = found->n + 1;
                r->r.sdiag_family = family;
                r->r.sdiag_protocol = IPPROTO_TCP;
                r->r.idiag_states = states;
                r->r.id = m->id;
                found->n++;
            }
            n++;
        }
    }
}

static long dump(int fd, unsigned states) { return dump_family(fd, AF_INET6, states, NULL); }  // as nslimit's

static long lookup(int fd, const struct lookups *l) {  // as netlink.lookup_inet: one send, every answer read
    if (l->n == 0) return 0;
    if (send(fd, l->q, l->n * sizeof l->q[0], 0) < 0) return 0;
    long n = 0;
    while (n < l->n) {
        ssize_t len = recv(fd, buf, sizeof buf, 0);
        if (len <= 0) return n;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) n++;
    }
    return n;
}

int main(int argc, char **argv) {
    int daemon_reads = argc > 1 && strcmp(argv[1], "--daemon-reads") == 0;
    if (daemon_reads) {
        argv++;
        argc--;
    }
    int protocol_files = 0, socket_files = 0;
    while (daemon_reads && argc > 1 && strncmp(argv[1], "--", 2) == 0) {
        if (strcmp(argv[1], "--protocol-files") == 0)
            protocol_files = 1;
        else if (strcmp(argv[1], "--socket-files") == 0)
            socket_files = 1;
        else
            break;
        argv++;
        argc--;
    }
    if (argc < 4 || strncmp(argv[1], "--", 2) == 0) {
        fprintf(stderr, "usage: nspaced [--daemon-reads [--protocol-files] [--socket-files]] ROUNDS INTERVAL_S PID...\n");
        return 2;
    }
    int rounds = atoi(argv[1]), n = argc - 3;
    double interval = atof(argv[2]);
    const char *files[5];
    int nfiles = 0;
    files[nfiles++] = "dev";
    if (!daemon_reads || socket_files)
        files[nfiles++] = "sockstat";
    if (!daemon_reads || protocol_files) {
        files[nfiles++] = "snmp";
        files[nfiles++] = "netstat";
    }
    if (daemon_reads && socket_files)
        files[nfiles++] = "sockstat6";
    struct rlimit lim;
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {  // 5 descriptors per namespace
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
    int (*fds)[5] = calloc(n, sizeof *fds);
    int *nl = calloc(n, sizeof *nl);
    struct lookups (*listeners)[2] = calloc(n, sizeof *listeners);  // AF_INET, AF_INET6
    int self = open("/proc/self/ns/net", O_RDONLY);
    int opened = 0;
    for (int i = 0; i < n; i++) {
        char p[128];
        int ok = 1;
        for (int f = 0; f < nfiles; f++) {
            snprintf(p, sizeof p, "/proc/%s/net/%s", argv[i + 3], files[f]);
            fds[i][f] = open(p, O_RDONLY);
            ok = ok && fds[i][f] >= 0;
        }
        snprintf(p, sizeof p, "/proc/%s/ns/net", argv[i + 3]);
        int ns = open(p, O_RDONLY);
        nl[i] = -1;
        if (ns >= 0 && setns(ns, CLONE_NEWNET) == 0) {
            nl[i] = socket(AF_NETLINK, SOCK_RAW, NETLINK_SOCK_DIAG);
            setns(self, CLONE_NEWNET);
        }
        if (ns >= 0) close(ns);
        if (!ok || nl[i] < 0) {
            fprintf(stderr, "nspaced: cannot open the files or namespace of pid %s\n", argv[i + 3]);
            return 1;
        }
        if (daemon_reads) {
            dump_family(nl[i], AF_INET, 1 << 10, &listeners[i][0]);
            dump_family(nl[i], AF_INET6, 1 << 10, &listeners[i][1]);
        }
        opened++;
    }
    long lines = 0;
    double spent = 0;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double next = now.tv_sec + now.tv_nsec / 1e9;
    for (int r = 0; r < rounds; r++) {
        next += interval;
        struct timespec at = {(time_t)next, (long)((next - (time_t)next) * 1e9)};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL);
        double a = cpu_us();
        for (int i = 0; i < n; i++) {  // one namespace's reads, then the next, as the daemon does
            for (int f = 0; f < nfiles; f++) {
                ssize_t len = pread(fds[i][f], buf, sizeof buf, 0);
                for (ssize_t k = 0; k < len; k++) lines += buf[k] == '\n';
            }
            if (daemon_reads)
                lines += lookup(nl[i], &listeners[i][0]) + lookup(nl[i], &listeners[i][1]);
            else
                lines += dump(nl[i], 1 << 10);
        }
        spent += cpu_us() - a;
    }
    printf("paced_us %.1f (n=%d rounds=%d interval=%g lines=%ld)\n", spent / ((double)rounds * opened), opened, rounds, interval, lines);
    return 0;
}
