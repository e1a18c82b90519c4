#!/usr/bin/env bash
# Kernel headers for bcc, and tracefs, for the eBPF drop-reason collector. Idempotent.
#
# bcc compiles its programs against /lib/modules/$(uname -r)/build. When the running kernel has
# its own headers package, that is installed. Otherwise (a kernel the distribution does not ship,
# e.g. a cloud or VM kernel), the distribution's generic headers are installed and linked there:
# nstap reads every kernel struct offset from the running kernel's BTF, not from these headers,
# so they only have to be good enough for bcc's compiler to run.
set -euo pipefail
release=$(uname -r)
dir=/lib/modules/$release

if [ ! -e "$dir/build" ]; then
  export DEBIAN_FRONTEND=noninteractive
  if apt-get install -y -qq --no-install-recommends "linux-headers-$release" >/dev/null 2>&1; then
    echo "nstap: installed linux-headers-$release"
  else
    arch=$(dpkg --print-architecture)
    if ! apt-get install -y -qq --no-install-recommends "linux-headers-$arch" >/dev/null 2>&1; then
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "linux-headers-$arch" >/dev/null || {
        echo "nstap: cannot install linux-headers-$arch (eBPF drop reasons will be off)" >&2
        exit 0
      }
    fi
    tree=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -1 || true)
    common=${tree%-"$arch"}-common
    if [ -z "$tree" ] || [ ! -d "$common" ]; then
      echo "nstap: no kernel headers to link for $release (eBPF drop reasons will be off)" >&2
      exit 0
    fi
    mkdir -p "$dir"
    ln -sfn "$tree" "$dir/build"
    ln -sfn "$common" "$dir/source"
    echo "nstap: no headers package for kernel $release: linked $tree (offsets come from BTF)"
  fi
fi

if [ -d /sys/kernel/tracing ] && [ ! -d /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || echo "nstap: cannot mount tracefs (eBPF drop reasons will be off)" >&2
fi
