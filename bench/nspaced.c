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
// usage: nspaced ROUNDS INTERVAL_S PID...   prints "paced_us X (n=.. rounds=..)": CPU µs per namespace-sample
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

static long dump(int fd, unsigned states) {  // as nslimit's
    struct { struct nlmsghdr h; struct inet_diag_req_v2 r; } q;
    memset(&q, 0, sizeof q);
    q.h.nlmsg_len = sizeof q;
    q.h.nlmsg_type = SOCK_DIAG_BY_FAMILY;
    q.h.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    q.r.sdiag_family = AF_INET6;
    q.r.sdiag_protocol = IPPROTO_TCP;
    q.r.idiag_states = states;
    if (send(fd, &q, sizeof q, 0) < 0) return 0;
    long n = 0;
    for (;;) {
        ssize_t len = recv(fd, buf, sizeof buf, 0);
        if (len <= 0) return n;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
            if (h->nlmsg_type == NLMSG_DONE || h->nlmsg_type == NLMSG_ERROR) return n;
            n++;
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: nspaced ROUNDS INTERVAL_S PID...\n");
        return 2;
    }
    int rounds = atoi(argv[1]), n = argc - 3;
    double interval = atof(argv[2]);
    const char *files[] = {"dev", "snmp", "netstat", "sockstat"};
    struct rlimit lim;
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {  // 5 descriptors per namespace
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
    int (*fds)[4] = calloc(n, sizeof *fds);
    int *nl = calloc(n, sizeof *nl);
    int self = open("/proc/self/ns/net", O_RDONLY);
    int opened = 0;
    for (int i = 0; i < n; i++) {
        char p[128];
        int ok = 1;
        for (int f = 0; f < 4; f++) {
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
            for (int f = 0; f < 4; f++) {
                ssize_t len = pread(fds[i][f], buf, sizeof buf, 0);
                for (ssize_t k = 0; k < len; k++) lines += buf[k] == '\n';
            }
            lines += dump(nl[i], 1 << 10);
        }
        spent += cpu_us() - a;
    }
    printf("paced_us %.1f (n=%d rounds=%d interval=%g lines=%ld)\n", spent / ((double)rounds * opened), opened, rounds, interval, lines);
    return 0;
}
