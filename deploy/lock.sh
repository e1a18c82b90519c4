#!/usr/bin/env bash
# make lock: deploy/requirements.lock, nstap's runtime dependencies (pyproject.toml's
# [project] dependencies, not the test or bench extras) and its build requirement (setuptools),
# every one pinned with the sha256 of each of its files on PyPI, made by pip-tools' pip-compile
# in a venv of its own (pip-tools is needed for this and nothing else: not by make test).
#   deploy/lock.sh [PIP-COMPILE ARGS...]     e.g. --upgrade, or --upgrade-package aiohttp
# Without --upgrade the versions already in the lock are kept where pyproject.toml allows them.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-/usr/bin/python3}
lockenv=${LOCKENV:-/tmp/nstap-lockenv}
lock=deploy/requirements.lock
test -x "$lockenv/bin/pip-compile" || { "$python" -m venv "$lockenv" && deploy/pip-install.sh "$lockenv" pip-tools; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
test ! -e "$lock" || cp "$lock" "$out"
CUSTOM_COMPILE_COMMAND="make lock" "$lockenv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras \
  --all-build-deps --no-emit-index-url --no-emit-find-links --no-emit-trusted-host --output-file "$out" "$@" pyproject.toml
{ cat <<'HEADER'
# nstap's Python dependencies, pinned with their hashes: installed with
#   pip install --require-hashes --no-deps -r deploy/requirements.lock
# (the Dockerfile's build stage; tests/test_image.py makes the wheels from it). Regenerate with
# `make lock` (deploy/lock.sh: pip-tools' pip-compile --generate-hashes, from pyproject.toml's
# runtime dependencies and its build requirement setuptools; `make lock ARGS=--upgrade` to move
# to the newest versions pyproject.toml allows). Not here: bcc, which is not on PyPI (Debian's
# python3-bpfcc, linked into the venv by deploy/link-bcc.sh), and nstap itself (installed
# after these with --no-deps, compiling its C scanner).
HEADER
  cat "$out"; } > "$lock"
echo "nstap: $lock: $(grep -c '^[a-z]' "$lock") packages"
