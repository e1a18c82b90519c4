#!/usr/bin/env bash
# make demo / make demo-clean: a few containers with traffic, two of which go wrong on schedule,
# so that a running nstap (make run) shows metrics, anomalies and a capture within a minute.
#
#   demo-web + demo-client        a healthy web server and a client fetching from it twice a second
#   demo-flaky + demo-flaky-client a ticker whose client's ACKs are dropped after BREAK_AFTER seconds
#                                 (an iptables DROP in its namespace): retransmissions, and a
#                                 flight-recorder capture that starts before the trouble
#   demo-stuck + demo-stuck-client a web server that stops accepting (docker pause) BREAK_AFTER+10 s
#                                 in: its accept queue fills and listen overflows count
#
# Usage: deploy/demo.sh up|down     (NSTAP_DEMO_BREAK_AFTER=seconds, default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-up}
break_after=${NSTAP_DEMO_BREAK_AFTER:-20}
net=nstap-demo
label=nstap.demo=1
state=/run/nstap-demo
mkdir -p "$state"

down() {
  if [ -f "$state/breaker.pid" ]; then
    kill -- "-$(cat "$state/breaker.pid")" 2>/dev/null || true
    rm -f "$state/breaker.pid"
  fi
  ids=$(docker ps -aq --filter "label=$label")
  if [ -n "$ids" ]; then
    docker unpause $ids >/dev/null 2>&1 || true
    docker rm -f $ids >/dev/null
  fi
  docker network rm "$net" >/dev/null 2>&1 || true
  echo "nstap demo: removed"
}

if [ "$action" = down ]; then
  down
  exit 0
fi
[ "$action" = up ] || { echo "usage: $0 up|down" >&2; exit 2; }

down >/dev/null
image=$(PYTHONPATH=tests .venv/bin/python -c 'from images import ensure_image; print(ensure_image("docker"))')
docker network create "$net" >/dev/null
run() { docker run -d --network "$net" --label "$label" "$@" >/dev/null; }

run --name demo-web "$image" httpd -f -p 80 -h /www
run --name demo-client "$image" sh -c 'while true; do wget -q -O /dev/null http://demo-web/; sleep 0.5; done'
run --name demo-flaky --label nstap.capture=ring "$image" \
  nc -ll -p 9000 -e sh -c 'while true; do echo tick; sleep 0.1; done'
run --name demo-flaky-client "$image" sh -c 'while true; do nc demo-flaky 9000 > /dev/null; sleep 1; done'
run --name demo-stuck "$image" httpd -f -p 80 -h /www
run --name demo-stuck-client "$image" sh -c 'while true; do for i in 1 2 3 4 5; do nc -w 2 demo-stuck 80 < /dev/null > /dev/null 2>&1 & done; sleep 0.5; done'

flaky_pid=$(docker inspect -f '{{.State.Pid}}' demo-flaky)
# The breaker: after a while, break the two on schedule (in its own session: demo-clean stops it).
setsid bash -c "
  sleep $break_after
  nsenter -t $flaky_pid -n iptables -I INPUT -p tcp --dport 9000 -j DROP
  sleep 10
  docker pause demo-stuck >/dev/null
" >/dev/null 2>&1 < /dev/null &
echo $! > "$state/breaker.pid"

cat <<EOF
nstap demo: 6 containers started on network $net.
  in ${break_after}s   demo-flaky's client ACKs are dropped  -> tcp_retransmits (with a capture from before)
  in $((break_after + 10))s   demo-stuck stops accepting          -> tcp_listen_overflows
Watch (with 'make run' going in another terminal):
  curl -s localhost:9880/metrics | grep -E 'nstap_anomal|nstap_captures_total'
  .venv/bin/nstap anomalies
  .venv/bin/nstap captures list
  .venv/bin/nstap captures get <ID>          # then: tcpdump -nn -r <file>
Remove it all with: make demo-clean
EOF
