"""The container image: built here from a local Debian base (no registry), run with the README's
line against this host's real dockerd and podman.

The base is a minbase rootfs made with mmdebstrap from the host's apt sources and imported into
dockerd once (cached under /var/cache/nstap-test); the image is built from the checkout with the
Python packages as wheels made on the host from deploy/requirements.lock, checked against its
hashes (the build has no route to the registries' TLS proxy; cached under /var/cache/nstap-test,
keyed by the lock).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, Containers, free_port, sh, wait_until

pytestmark = pytest.mark.docker

CACHE = Path("/var/cache/nstap-test")
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
HTTPD = ("httpd", "-f", "-p", "80", "-h", "/")
# The README's run line (the capabilities of systemd/nstap.service that this Docker knows and this
# host grants: Docker 20.10 has no CAP_BPF/CAP_PERFMON names, and CAP_SYS_RESOURCE is not in this
# sandbox's bounding set).
RUN_LINE = (
    "--pid=host", "--network=host", "--cap-drop", "ALL",
    *(x for cap in ("SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH", "NET_ADMIN", "NET_RAW", "SYS_NICE", "SETUID", "SETGID") for x in ("--cap-add", cap)),
    "--security-opt", "apparmor=unconfined",
    "-v", "/var/run/docker.sock:/var/run/docker.sock:ro", "-v", "/run/podman/podman.sock:/run/podman/podman.sock:ro",
)


def base_image() -> str:
    key = hashlib.sha256(SOURCES.read_bytes() if SOURCES.exists() else b"").hexdigest()[:16]
    image = f"nstap-base:{key}"
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0:
        return image
    CACHE.mkdir(parents=True, exist_ok=True)
    tar = CACHE / f"base-minbase-{key}.tar"
    if not tar.exists():
        partial = tar.with_name(tar.stem + ".partial.tar")
        with open(SOURCES) as sources:
            subprocess.run(["mmdebstrap", "--variant=minbase", "bookworm", str(partial), "-"], stdin=sources, check=True, capture_output=True, timeout=900)
        partial.rename(tar)
    sh("docker", "import", str(tar), image, timeout=600)
    return image


def lock_wheels() -> Path:
    """The wheels of deploy/requirements.lock, checked against its hashes; made once per lock and
    Python (the image's is Debian's, as the host's)."""
    lock = ROOT / "deploy/requirements.lock"
    key = hashlib.sha256(lock.read_bytes() + sys.implementation.cache_tag.encode()).hexdigest()[:16]
    wheels = CACHE / f"wheels-{key}"
    if not wheels.exists():
        partial = wheels.with_name(wheels.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--require-hashes", "--no-deps",
                        "-r", str(lock), "--wheel-dir", str(partial)], check=True, capture_output=True, timeout=600)
        partial.rename(wheels)
    return wheels


@pytest.fixture(scope="module")
def image(runtimes: None, tmp_path_factory) -> str:
    context = tmp_path_factory.mktemp("context")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, names):
        src = ROOT / name.decode()
        if src.is_file():
            dst = context / name.decode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    # Kept in the context by .dockerignore's !build/wheels (the build has no other way to them).
    shutil.copytree(lock_wheels(), context / "build/wheels")
    tag = "nstap:test"
    sh("docker", "build", "-q", "--build-arg", f"BASE={base_image()}", "-t", tag, str(context), timeout=900)
    return tag


def test_image_watches_this_hosts_runtimes_and_captures(image: str, containers: Containers, docker_image: str, podman_image: str) -> None:
    metrics, api = free_port(), free_port()
    name = f"nstap-image-{int(time.time())}"
    cid = sh("docker", "run", "-d", "--name", name, *RUN_LINE, "--health-interval", "2s", "--health-start-period", "1s",
             "-v", f"{name}-data:/var/lib/nstap", "-e", f"NSTAP_HEALTH_URL=http://127.0.0.1:{metrics}/healthz", image, "run", "--data-dir", "/var/lib/nstap",
             "--metrics-listen", f"127.0.0.1:{metrics}", "--api-listen", f"127.0.0.1:{api}").stdout.strip()
    try:
        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                return r.read().decode()

        wait_until(lambda: _safe(scrape) and 'nstap_runtime_up{runtime="docker"} 1' in _safe(scrape) and 'nstap_runtime_up{runtime="podman"} 1' in _safe(scrape),
                   60, 0.5, "the image's daemon follows both runtimes")
        text = scrape()
        assert not [line for line in text.splitlines() if line.startswith("nstap_interface_up") and cid[:12] in line]
        # A container started now is in its /metrics within 2 s.
        web = containers.docker(docker_image, *HTTPD, name="imgweb")
        started = time.monotonic()
        wait_until(lambda: 'nstap_interface_up{container="imgweb' in scrape() and web[:12] in scrape(), 2.0, 0.05, "sampled within 2 s")
        assert time.monotonic() - started <= 2.0
        pod = containers.podman(podman_image, *HTTPD, name="imgpod")
        wait_until(lambda: pod[:12] in scrape(), 5, 0.1, "the podman container too")
        # A capture through its API holds the test's packets.
        token = sh("docker", "exec", name, "cat", "/var/lib/nstap/api-token").stdout.strip()

        def call(path: str, body: bytes | None = None) -> dict:
            req = urllib.request.Request(f"http://127.0.0.1:{api}{path}", data=body, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())

        # Its own container is listed (by the API), not watched.
        own = [c for c in call("/api/v1/containers")["containers"] if c["id"].startswith(cid[:12])]
        assert own and not own[0]["enabled"] and not own[0]["watched"], own
        capture = call("/api/v1/captures", json.dumps({"container": web[:12], "duration": 2}).encode())
        ip = containers.inspect("docker", web)["NetworkSettings"]["IPAddress"]
        time.sleep(0.3)
        for _ in range(3):
            try:
                urllib.request.urlopen(f"http://{ip}/", timeout=5).read()
            except urllib.error.HTTPError:
                pass  # busybox httpd answers 404 for a directory: the packets are what count
        done = wait_until(lambda: (lambda c: c if c["state"] != "running" else None)(call(f"/api/v1/captures/{capture['id']}")), 20, 0.3)
        assert done["state"] == "complete" and done["packets"] >= 6, done
        req = urllib.request.Request(f"http://127.0.0.1:{api}/api/v1/captures/{capture['id']}/pcap", headers={"Authorization": f"Bearer {token}"})
        pcap = urllib.request.urlopen(req, timeout=10).read()
        out = subprocess.run(["tcpdump", "-nr", "-"], input=pcap, capture_output=True, timeout=30).stdout.decode()
        assert f"{ip}.80" in out
        # The capture page's templates and stylesheet are in the installed package.
        req = urllib.request.Request(f"http://127.0.0.1:{api}/ui/captures/{capture['id']}", headers={"Authorization": f"Bearer {token}"})
        assert 'id="download-pcap"' in urllib.request.urlopen(req, timeout=10).read().decode()
        assert b"--accent" in urllib.request.urlopen(f"http://127.0.0.1:{api}/ui/static/nstap.css", timeout=10).read()
        # HEALTHCHECK: healthy.
        wait_until(lambda: sh("docker", "inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip() == "healthy", 20, 0.5, "healthy")
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "volume", "rm", f"{name}-data"], capture_output=True)


def test_image_is_the_runtime_stage_only(image: str) -> None:
    """No source layer, compiler or Python headers in the image; the venv is the lock's and
    consistent, nstap's C scanner and line formatter compiled in it, Debian's bcc linked into it."""
    history = sh("docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "/src" not in history, history  # the build stage's layers are not the image's
    script = (
        "set -e; test ! -e /src; "
        "for tool in gcc cc x86_64-linux-gnu-gcc-12; do if command -v $tool; then echo found $tool; exit 1; fi; done; "
        "test -z \"$(ls -d /usr/include/python3* 2>/dev/null)\"; "
        "/opt/nstap/venv/bin/pip check --disable-pip-version-check; "
        "/opt/nstap/venv/bin/python -c 'from nstap.netns import scan; from nstap import exporter; import bcc; print(\"compiled\", scan.COMPILED, exporter.COMPILED)'; "
        "nstap --version"
    )
    out = sh("docker", "run", "--rm", "--entrypoint", "/bin/sh", image, "-c", script, timeout=60).stdout
    assert "No broken requirements found." in out and "compiled True True" in out, out
    # Every Python package in the venv is the lock's version, and nothing else is there but pip and
    # nstap (bcc is Debian's, linked by a .pth: not a distribution pip lists; setuptools, in the
    # lock to build nstap, is removed after).
    lock = dict(line.split(" ", 1)[0].split("==") for line in (ROOT / "deploy/requirements.lock").read_text().splitlines() if "==" in line and line[0].isalpha())
    frozen = sh("docker", "run", "--rm", "--entrypoint", "/opt/nstap/venv/bin/pip", image, "list", "--format", "json", "--disable-pip-version-check").stdout
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(frozen)}
    del lock["setuptools"]
    assert {name: installed.get(name) for name in lock} == lock
    assert set(installed) - set(lock) == {"pip", "nstap"}, installed


def _safe(fn):
    try:
        return fn()
    except OSError:
        return ""
