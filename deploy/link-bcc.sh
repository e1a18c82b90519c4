#!/usr/bin/env bash
# Make the system's bcc (Debian's python3-bpfcc, built for the system Python) importable from
# nstap's venv, without the rest of the system's packages: a directory holding only a link to
# the bcc package, named in a .pth file. Idempotent; does nothing where bcc is not installed.
set -euo pipefail
venv=${1:?usage: $0 VENV}
system=/usr/lib/python3/dist-packages/bcc
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -d "$system" ]; then
  rm -f "$site/nstap-system-bcc.pth"
  exit 0
fi
links="$(cd "$venv" && pwd)/system-bcc"
mkdir -p "$links"
ln -sfn "$system" "$links/bcc"
echo "$links" > "$site/nstap-system-bcc.pth"
