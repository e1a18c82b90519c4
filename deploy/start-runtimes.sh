#!/usr/bin/env bash
# Start the installed container runtimes that are not running: dockerd, and Podman's
# Docker-compatible API service. Through systemd where systemd is PID 1, directly otherwise.
# Idempotent: a runtime that already answers is left alone.
set -euo pipefail
log_dir=${NSTAP_RUNTIME_LOG_DIR:-/var/log/nstap}
docker_sock=/var/run/docker.sock
podman_sock=/run/podman/podman.sock

answers() { curl -fsS --max-time 3 --unix-socket "$1" http://localhost/_ping >/dev/null 2>&1; }
with_systemd() { [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }
wait_for() {  # socket, name, seconds
  for _ in $(seq $(( $3 * 4 ))); do answers "$1" && return 0; sleep 0.25; done
  echo "nstap: $2 did not come up on $1 (see $log_dir)" >&2
  return 1
}

if command -v dockerd >/dev/null && ! answers "$docker_sock"; then
  echo "nstap: starting dockerd"
  if with_systemd; then
    systemctl start docker
  else
    mkdir -p "$log_dir"
    # The pid file of the containerd a killed dockerd started: dockerd reuses a containerd still
    # running, and one whose pid now belongs to another process kept it waiting for good
    # ("containerd is still running", then "timeout waiting for containerd to start").
    pidfile=/var/run/docker/containerd/containerd.pid
    if [ -f "$pidfile" ] && [ "$(cat "/proc/$(cat "$pidfile")/comm" 2>/dev/null)" != containerd ]; then
      rm -f "$pidfile"
    fi
    setsid dockerd >>"$log_dir/dockerd.log" 2>&1 < /dev/null &
  fi
  wait_for "$docker_sock" dockerd 60
fi

if command -v podman >/dev/null && ! answers "$podman_sock"; then
  echo "nstap: starting the Podman API service"
  if with_systemd && systemctl list-unit-files podman.socket >/dev/null 2>&1; then
    systemctl start podman.socket
  else
    mkdir -p "$log_dir" /run/podman
    setsid podman system service --time=0 "unix://$podman_sock" >>"$log_dir/podman-service.log" 2>&1 < /dev/null &
  fi
  wait_for "$podman_sock" "podman system service" 30
fi
exit 0
