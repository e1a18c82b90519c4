"""The test image: Debian's static busybox in a minimal rootfs, imported into Docker or Podman.

There is no registry to pull from, so the image is built here: /bin/busybox, a link per applet
(httpd, nc, wget, ping, sleep, ...), and a web root. Used by the tests, the benchmark and the demo.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

IMAGES = {"docker": "nstap-test-busybox:latest", "podman": "localhost/nstap-test-busybox:latest"}
BUSYBOX = Path("/bin/busybox")


def busybox_rootfs_tar() -> bytes:
    """A minimal root filesystem as a tar archive."""
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "etc", "tmp", "www", "proc", "sys", "dev"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(BUSYBOX), arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
        for name, text in (
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/group", "root:x:0:\n"),
            ("www/index.html", "nstap test page\n"),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def ensure_image(cli: str, env: dict | None = None) -> str:
    """Import the image into ``cli`` ("docker" or "podman") unless it is there; returns its name."""
    image = IMAGES[cli]
    probe = [cli, "image", "inspect", image]
    if subprocess.run(probe, capture_output=True, env=env).returncode != 0:
        subprocess.run([cli, "import", "-", image], input=busybox_rootfs_tar(), check=True, capture_output=True, env=env)
    return image
