"""The containerd source against a real containerd: a private instance (its own socket, root and
state directories) run by the tests, containers made with ``ctr``, pods simulated by namespace
sharing with Kubernetes labels, several containerd namespaces, containerd restarted."""

from __future__ import annotations

import asyncio
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, sh, wait_until
from nstap.registry import ContainerRegistry, group_namespaces
from nstap.runtime.containerd import ContainerdSource, record_from_containerd
from nstap.runtime.containerd_api.services.containers.v1 import containers_pb2
from nstap.runtime.containerd_api.types.task import task_pb2
from nstap.runtime.exits import ProcessExits

pytestmark = pytest.mark.docker  # the image comes from dockerd (docker save)

CACHE = Path("/var/cache/nstap-test")
IMAGE = "docker.io/library/nstap-test-busybox:latest"
NAMESPACES = ("default", "other")


class PrivateContainerd:
    """A containerd of the tests' own: socket, root and state in one temporary directory."""

    def __init__(self, image_tar: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nstap-ctrd-"))
        self.socket = self.dir / "c.sock"
        self.image_tar = image_tar
        self.proc: subprocess.Popen | None = None
        config = self.dir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
            '[debug]\n  address = ""\n[metrics]\n  address = ""\n'
        )
        self.config = config

    def start(self) -> None:
        """Start containerd and wait until ``ctr`` gets an answer."""
        log = open(self.dir / "containerd.log", "ab")
        self.proc = subprocess.Popen(["containerd", "--config", str(self.config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_until(lambda: self.ctr("version", check=False).returncode == 0, 10, message="containerd answers")

    def stop(self) -> None:
        """SIGTERM containerd (its shims and tasks live on, as on a real node)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def ctr(self, *args: str, namespace: str = "default", check: bool = True) -> subprocess.CompletedProcess:
        return sh("ctr", "--address", str(self.socket), "--namespace", namespace, *args, check=check, timeout=60)

    def import_image(self, namespace: str) -> None:
        self.ctr("images", "import", str(self.image_tar), namespace=namespace)

    def run(self, cid: str, *options: str, namespace: str = "default") -> int:
        """``ctr run -d`` a busybox sleeping; returns its pid."""
        # runc's state of our own (its default, /run/containerd/runc, is shared with any other containerd)
        self.ctr("run", "-d", "--null-io", "--runc-root", str(self.dir / "runc"), *options, IMAGE, cid, "sleep", "600", namespace=namespace)
        return self.pid(cid, namespace)

    def pid(self, cid: str, namespace: str = "default") -> int:
        """The pid of a task, from ``ctr tasks ls``."""
        rows = [line.split() for line in self.ctr("tasks", "ls", namespace=namespace).stdout.splitlines()[1:]]
        return next(int(row[1]) for row in rows if row[0] == cid)

    def kill(self, cid: str, namespace: str = "default") -> None:
        self.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=namespace)

    def shims(self) -> list[int]:
        """Pids of shims started by this containerd (their command line names its socket)."""
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if b"containerd-shim" in cmdline and str(self.socket).encode() in cmdline:
                    out.append(int(entry.name))
        return out

    def mounts(self) -> list[str]:
        return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines() if line.split()[4].startswith(str(self.dir))]

    def cleanup(self) -> None:
        """Every task killed and deleted, every container removed, containerd stopped, its directory gone."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        for ns in NAMESPACES:
            for line in self.ctr("tasks", "ls", "-q", namespace=ns, check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", line, namespace=ns, check=False)
                wait_until(lambda: self.ctr("tasks", "rm", line, namespace=ns, check=False).returncode == 0, 10, message="task deleted")
            for line in self.ctr("containers", "ls", "-q", namespace=ns, check=False).stdout.split():
                self.ctr("containers", "rm", line, namespace=ns, check=False)
        self.stop()
        leftovers = self.shims()
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        mounts = self.mounts()
        for mount in reversed(mounts):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        assert not leftovers and not mounts, f"left behind: shims {leftovers}, mounts {mounts}"


@pytest.fixture(scope="module")
def image_tar(docker_image: str) -> Path:
    """``docker save`` of the busybox test image, cached by image id."""
    image_id = sh("docker", "image", "inspect", "--format", "{{.Id}}", docker_image).stdout.strip().removeprefix("sha256:")
    path = CACHE / f"containerd-busybox-{image_id[:16]}.tar"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        sh("docker", "save", "-o", str(tmp), docker_image)
        tmp.rename(path)
    return path


@pytest.fixture
def containerd(image_tar: Path) -> Iterator[PrivateContainerd]:
    """A private containerd with the test image in both test namespaces; torn down after the test."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.fail("containerd and ctr are missing: deploy/install-deps.sh test installs them")
    c = PrivateContainerd(image_tar)
    try:
        c.start()
        for ns in NAMESPACES:
            c.import_image(ns)
        yield c
    finally:
        c.cleanup()


async def until(predicate, timeout: float, message: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout}s: {message}")
        await asyncio.sleep(0.05)


def inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


# -- without containerd ----------------------------------------------------------------------------


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    """make containerd-api would change nothing: the stubs are what the .proto files make."""
    out = tmp_path / "api"
    sh(str(ROOT / "deploy/gen-containerd-api.sh"), sys.executable, env={**os.environ, "OUT": str(out)})
    committed = ROOT / "daemon/nstap/runtime/containerd_api"
    made = sorted(p.relative_to(out) for p in out.rglob("*_pb2*.py"))
    assert made == sorted(p.relative_to(committed) for p in committed.rglob("*_pb2*.py"))
    assert all(filecmp.cmp(out / p, committed / p, shallow=False) for p in made)


def _container(cid: str, labels: dict[str, str], namespaces: list[dict] | None) -> containers_pb2.Container:
    c = containers_pb2.Container(id=cid, labels=labels, image="img")
    if namespaces is not None:
        c.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
        c.spec.value = json.dumps({"linux": {"namespaces": namespaces}}).encode()
    return c


@pytest.mark.parametrize(
    ("labels", "namespaces", "name", "mode"),
    [
        ({}, [{"type": "network"}], "c", ""),
        ({"nerdctl/name": "web"}, [{"type": "pid"}], "web", "host"),
        ({}, [{"type": "network", "path": "/proc/9/ns/net"}], "c", "container:/proc/9/ns/net"),
        ({"io.cri-containerd.kind": "sandbox", "io.kubernetes.pod.name": "p"}, [{"type": "network", "path": "/var/run/netns/cni-1"}], "p", ""),
        (
            {"io.cri-containerd.kind": "container", "io.kubernetes.pod.name": "p", "io.kubernetes.container.name": "app"},
            [{"type": "network", "path": "/proc/9/ns/net"}],
            "p_app",
            "container:p",
        ),
        ({}, None, "c", ""),  # no spec: a namespace of its own
    ],
)
def test_record_names_and_network_modes(labels, namespaces, name, mode) -> None:
    record = record_from_containerd(_container("c", labels, namespaces), task_pb2.Process(pid=7, status=task_pb2.RUNNING), "k8s.io", "ctrd")
    assert (record.id, record.name, record.network_mode, record.status) == ("c@k8s.io", name, mode, "running")
    assert record_from_containerd(_container("c", labels, namespaces), task_pb2.Process(pid=7, status=task_pb2.STOPPED), "k8s.io", "ctrd") is None


# -- against a private containerd ------------------------------------------------------------------


async def test_source_follows_tasks_namespaces_and_pods(containerd: PrivateContainerd) -> None:
    registry = ContainerRegistry()
    exits = ProcessExits(asyncio.get_running_loop())
    source = ContainerdSource(
        "ctrd", containerd.socket, registry, exits, proc_root=Path("/proc"), host_netns=inode(os.getpid()),
        reconcile_interval=60.0, max_backoff=0.5, namespaces=NAMESPACES,  # events, not reconciles, must do the work
    )
    task = asyncio.create_task(source.run())
    try:
        await until(lambda: source.up, 10, "source up")
        assert source.kind == "containerd" and source.version
        # The same id in two namespaces: two containers.
        pid = await asyncio.to_thread(containerd.run, "c1", "--label", "nerdctl/name=web")
        other = await asyncio.to_thread(containerd.run, "c1", namespace="other")
        await until(lambda: registry.get("c1@default") and registry.get("c1@other"), 3, "started containers listed")
        record = registry.get("c1@default")
        assert (record.name, record.pid, record.netns, record.runtime) == ("web", pid, inode(pid), "ctrd")
        assert registry.get("c1@other").netns == inode(other) != record.netns
        # A stop (the task exits): gone.
        await asyncio.to_thread(containerd.kill, "c1", "other")
        await until(lambda: registry.get("c1@other") is None, 3, "stopped container gone")
        # A pod: a sandbox holding the namespace and a container joining it, Kubernetes labels.
        pod = ("--label", "io.kubernetes.pod.name=shop", "--label", "io.kubernetes.pod.namespace=prod")
        sandbox = await asyncio.to_thread(containerd.run, "shop", *pod, "--label", "io.cri-containerd.kind=sandbox")
        await asyncio.to_thread(
            containerd.run, "shop-app", *pod, "--label", "io.cri-containerd.kind=container", "--label", "io.kubernetes.container.name=app",
            "--with-ns", f"network:/proc/{sandbox}/ns/net",
        )
        await until(lambda: registry.get("shop-app@default") is not None, 3, "pod member listed")
        watched = group_namespaces(registry.containers())[inode(sandbox)]
        assert watched.owner.id == "shop@default" and {m.name for m in watched.members} == {"shop", "shop_app"}
        assert {(m.pod, m.k8s_namespace) for m in watched.members} == {("shop", "prod")}
        # A process that dies without an event reaching us (containerd stopped): its pidfd tells.
        containerd.stop()
        await until(lambda: not source.up, 5, "source down")
        os.kill(pid, signal.SIGKILL)
        await until(lambda: registry.get("c1@default") is None, 2, "exit seen without containerd")
        await asyncio.to_thread(containerd.start)
        await until(lambda: source.up, 5, "source reconnected")
        assert source.reconnects_total == 1
        assert registry.get("shop@default") is not None and registry.get("c1@default") is None
        late = await asyncio.to_thread(containerd.run, "c2")
        await until(lambda: registry.get("c2@default") is not None, 3, "container started after the reconnect listed")
        assert registry.get("c2@default").pid == late
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        exits.forget_all()


def test_daemon_watches_a_pod_once_and_labels_it(nstap, containerd: PrivateContainerd) -> None:
    for ns in NAMESPACES:
        containerd.run(f"solo-{ns}", namespace=ns)
    pod = ("--label", "io.kubernetes.pod.name=shop", "--label", "io.kubernetes.pod.namespace=prod")
    sandbox = containerd.run("shop", *pod, "--label", "io.cri-containerd.kind=sandbox")
    containerd.run(
        "shop-app", *pod, "--label", "io.cri-containerd.kind=container", "--label", "io.kubernetes.container.name=app",
        "--with-ns", f"network:/proc/{sandbox}/ns/net",
    )
    d = nstap({"runtimes": [{"name": "ctrd", "kind": "containerd", "socket": str(containerd.socket), "namespaces": list(NAMESPACES)}]})
    m = d.wait_metric(lambda m: len(m.find("nstap_container_info", runtime="ctrd")) == 4 and m.value("nstap_namespaces_watched") == 3 and m, 10, "listed")
    members = {s.labels["container"]: s.labels for s in m.find("nstap_container_info", pod="shop")}
    assert set(members) == {"shop", "shop_app"}
    assert {(l["k8s_namespace"], l["netns"]) for l in members.values()} == {("prod", str(inode(sandbox)))}
    assert {s.labels["k8s_namespace"] for s in m.find("nstap_container_info", container="solo-other")} == {""}
    # One watcher for the pod, under its sandbox: only the sandbox's id carries samples.
    sampled = {s.labels["container_id"] for s in m.samples if s.name != "nstap_container_info" and "container_id" in s.labels}
    assert "shop@default" in sampled and "shop-app@def" not in sampled
    assert m.value("nstap_runtime_up", runtime="ctrd") == 1 and m.value("nstap_runtime_info", runtime="ctrd", kind="containerd") == 1
    # containerd restarted: down, then up again with the same containers.
    containerd.stop()
    d.wait_metric(lambda m: m.value("nstap_runtime_up", runtime="ctrd") == 0, 5, "runtime down")
    containerd.start()
    d.wait_metric(lambda m: m.value("nstap_runtime_up", runtime="ctrd") == 1 and len(m.find("nstap_container_info", runtime="ctrd")) == 4, 10, "up again")
    assert d.scrape().value("nstap_runtime_reconnects_total", runtime="ctrd") == 1
