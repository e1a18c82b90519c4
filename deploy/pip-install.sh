#!/usr/bin/env bash
# pip install into the project's venv, tried again when the package registry cannot be reached
# (a resolver or network that is not up yet on a machine that has just booted): 5 attempts,
# 10 s, 20 s, 40 s, 80 s apart. Any other failure ends at the first attempt's error, as pip said it.
#   deploy/pip-install.sh VENV ARGS...
set -uo pipefail
venv=$1; shift
log=$(mktemp)
trap 'rm -f "$log"' EXIT
delay=10
for attempt in 1 2 3 4 5; do
  if "$venv/bin/pip" install --quiet --disable-pip-version-check "$@" 2>&1 | tee "$log"; then
    exit 0
  fi
  if ! grep -qE 'name resolution|Failed to establish a new connection|Connection (reset|refused|aborted)|Read timed out|No matching distribution found' "$log" || [ "$attempt" = 5 ]; then
    exit 1
  fi
  echo "nstap: the package registry did not answer (attempt $attempt of 5): trying again in ${delay}s" >&2
  sleep "$delay"
  delay=$((delay * 2))
done
