"""The benchmarks' containers: the busybox test image, httpd containers labelled as the bench's,
their addresses, and steady HTTP traffic to them from the host."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from images import ensure_image  # noqa: E402

LABEL = "nstap.bench=1"

__all__ = ["LABEL", "Traffic", "container_ips", "ensure_image", "sh", "start_container"]


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def start_container(image: str, name: str, *extra: str) -> str:
    """A busybox httpd container serving /www, labelled as the bench's; its id."""
    return sh("docker", "run", "-d", "--label", LABEL, *extra, "--name", name, image, "httpd", "-f", "-p", "80", "-h", "/www")


def container_ips(ids: list[str]) -> list[str]:
    out = sh("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", *ids)
    return out.split()


class Traffic(threading.Thread):
    """One HTTP request per container per second from the host, until stopped."""

    def __init__(self, ips: list[str]) -> None:
        super().__init__(daemon=True)
        self.ips = ips
        self.stop = threading.Event()
        self.requests = 0

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            for ip in self.ips:
                try:
                    with urllib.request.urlopen(f"http://{ip}/index.html", timeout=2) as r:
                        r.read()
                    self.requests += 1
                except OSError:
                    pass
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))
