#!/usr/bin/env bash
# Install the OS packages nstap needs on a Debian/Ubuntu host, only those missing. Idempotent.
#   deploy/install-deps.sh run    what the daemon needs (and a container runtime if there is none)
#   deploy/install-deps.sh test   that, plus everything the test suite drives for real
#   deploy/install-deps.sh demo   that of run, plus what make demo uses (Docker, busybox, iptables)
set -euo pipefail
profile=${1:-run}

# iptables and nftables: the NAT monitor reads the rules with iptables-save and nft.
# python3-bpfcc and bpftool: the eBPF drop-reason collector (bcc compiles against kernel headers,
# which deploy/kernel-headers.sh provides).
# gcc and python3-dev: the /proc/net scanner (daemon/nstap/netns/_scan.c) and the /metrics line
# formatter (daemon/nstap/_exposition.c) are built with the package; without them nstap installs
# anyway and does both in Python, at several times the CPU.
run_pkgs=(python3 python3-venv python3-pip python3-dev gcc tcpdump iproute2 util-linux curl ca-certificates iptables nftables
          python3-bpfcc bpftool)
# chromium and chromium-driver: the end-to-end test drives the capture page in a headless browser.
# victoria-metrics: the fleet test (tests/test_fleet.py) remote-writes to it as to Prometheus.
test_pkgs=(docker.io podman catatonit busybox-static prometheus prometheus-alertmanager victoria-metrics
           conntrack iputils-ping iperf3 mmdebstrap chromium chromium-driver)
# containerd (also a dependency of docker.io): the containerd tests run a private instance with ctr;
# its API's .proto files and gogoproto's: make containerd-api and the test that the stubs match them.
test_pkgs+=(containerd golang-github-containerd-containerd-dev golang-github-gogo-protobuf-dev)
demo_pkgs=(busybox-static iptables)

case "$profile" in
  run) want=("${run_pkgs[@]}") ;;
  test) want=("${run_pkgs[@]}" "${test_pkgs[@]}") ;;
  demo) want=("${run_pkgs[@]}" "${demo_pkgs[@]}") ;;
  *) echo "usage: $0 run|test|demo" >&2; exit 2 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
  echo "nstap: installing packages needs root (run as root or with sudo)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "nstap: this installer knows Debian/Ubuntu (apt-get) only; install: ${want[*]}" >&2
  exit 1
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

# A container runtime: keep what the host has; install Docker only when there is neither.
if [ "$profile" = run ] && ! command -v dockerd >/dev/null && ! command -v podman >/dev/null; then
  echo "nstap: neither Docker nor Podman is installed: installing Docker (docker.io)"
  want+=(docker.io)
fi
# The demo drives the docker CLI.
if [ "$profile" = demo ] && ! command -v docker >/dev/null; then
  echo "nstap: the demo runs on Docker: installing Docker (docker.io)"
  want+=(docker.io)
fi

missing=()
for p in "${want[@]}"; do installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "nstap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
"$(dirname "$0")/kernel-headers.sh"
