#!/usr/bin/env bash
# make uninstall: everything make install put in place, except the data dir (/var/lib/nstap:
# captures and the API token), which is left for you to keep or remove.
set -euo pipefail
if [ -d /run/systemd/system ]; then
  systemctl disable --now nstap.service 2>/dev/null || true
fi
rm -f /etc/systemd/system/nstap.service
rm -rf /etc/systemd/system/nstap.service.d
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl reset-failed nstap.service 2>/dev/null || true
fi
rm -rf /opt/nstap /etc/nstap
if [ "$(readlink /usr/local/bin/nstap 2>/dev/null)" = /opt/nstap/venv/bin/nstap ]; then
  rm -f /usr/local/bin/nstap
fi
echo "nstap: uninstalled; the data dir /var/lib/nstap is kept (rm -rf /var/lib/nstap to remove it)"
