#!/usr/bin/env bash
# make install: nstap in /opt/nstap (its own venv), its unit, an example /etc/nstap/config.yaml,
# and the service enabled and started where systemd runs. Idempotent; run as root.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/nstap
unit=/etc/systemd/system/nstap.service

python=/usr/bin/python3
test -x "$prefix/venv/bin/python" || "$python" -m venv "$prefix/venv"
if [ -n "${NSTAP_WHEELS:-}" ]; then
  # A host without PyPI: wheels made elsewhere with `pip wheel --wheel-dir DIR .` (nstap and
  # every dependency), installed from that directory only.
  "$prefix/venv/bin/pip" install --quiet --no-index --find-links "$NSTAP_WHEELS" --upgrade nstap
else
  "$src/deploy/pip-install.sh" "$prefix/venv" --upgrade pip
  "$src/deploy/pip-install.sh" "$prefix/venv" --upgrade "$src"
fi
"$src/deploy/link-bcc.sh" "$prefix/venv"
install -m 0644 "$src/README.md" "$prefix/README.md"
if [ -d "$src/docs" ]; then  # the pages the README links to (the unit's Documentation=)
  rm -rf "$prefix/docs"
  cp -r "$src/docs" "$prefix/docs"
  chmod -R u=rwX,go=rX "$prefix/docs"
fi
ln -sfn "$prefix/venv/bin/nstap" /usr/local/bin/nstap

install -d -m 0755 /etc/nstap
if [ ! -e /etc/nstap/config.yaml ]; then
  { echo "# nstap's configuration: every key with its default, commented out. See $prefix/docs/configuration.md."
    echo "# Reload after a change: systemctl reload nstap (what needs a restart is logged)."
    "$prefix/venv/bin/nstap" config-example; } > /etc/nstap/config.yaml
  chmod 0644 /etc/nstap/config.yaml
fi
install -m 0644 "$src/systemd/nstap.service" "$unit"

if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable nstap.service
  systemctl restart nstap.service
  echo "nstap: installed in $prefix and started: systemctl status nstap, journalctl -u nstap"
else
  echo "nstap: installed in $prefix; systemd is not running here: start it with $prefix/venv/bin/nstap run --config /etc/nstap/config.yaml"
fi
