"""deploy/kubernetes/ validated offline: rendered with kubectl kustomize (or, without kubectl, a
Python render of the same kustomization), every object checked with kubernetes-validate --strict
against several Kubernetes versions, and the DaemonSet held to the systemd unit's privileges."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
VERSIONS = ("1.25.0", "1.29.0", "1.33.0", "1.37.0")
RUNTIMES = [{"name": "containerd", "kind": "containerd", "socket": "/run/containerd/containerd.sock", "namespaces": ["k8s.io"]}]


def python_render(directory: Path) -> list[dict]:
    """What kubectl kustomize makes of our kustomizations (resources, namespace, labels, a
    configMapGenerator without its hash suffix, images), for hosts without kubectl."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for r in k.get("resources", []):
        path = directory / r
        docs += python_render(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
    for gen in k.get("configMapGenerator", []):
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]},
                     "data": {f: (directory / f).read_text() for f in gen["files"]}})
    for doc in docs:
        if "namespace" in k and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = k["namespace"]
        for pairs in k.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(pairs["pairs"])
        for image in k.get("images", []):
            for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"] == image["name"]:
                    c["image"] = f'{image["newName"]}:{image["newTag"]}'
    return docs


def render(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return python_render(directory)
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(docs: list[dict], tmp_path: Path, version: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"manifests-{version}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    cli = Path(sys.executable).parent / "kubernetes-validate"
    return subprocess.run([str(cli), "--strict", "-k", version, str(path)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(K8S / "base")


def one(docs: list[dict], kind: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_strictly(base: list[dict], tmp_path: Path, version: str) -> None:
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    proc = validate([*base, example], tmp_path, version)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed for resource") == len(base) + 1, proc.stdout
    # and a field Kubernetes does not know is refused
    broken = yaml.safe_load(yaml.safe_dump(base))
    one(broken, "DaemonSet")["spec"]["template"]["spec"]["hostPIDs"] = True
    assert validate(broken, tmp_path, version).returncode != 0


def test_daemonset_has_the_units_privileges_and_no_more(base: list[dict]) -> None:
    unit = (ROOT / "systemd" / "nstap.service").read_text()
    bounding = next(line for line in unit.splitlines() if line.startswith("CapabilityBoundingSet="))
    caps = {c.removeprefix("CAP_") for c in bounding.split("=", 1)[1].split()}
    pod = one(base, "DaemonSet")["spec"]["template"]["spec"]
    [c] = pod["containers"]
    sc = c["securityContext"]
    assert set(sc["capabilities"]["add"]) == caps and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert pod["hostPID"] and pod["hostNetwork"] and pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/run/containerd/containerd.sock", "/sys/kernel/btf", "/sys/fs/bpf", "/lib/modules", "/host/proc"):
        assert mounts[path].get("readOnly") is True, path
        assert "hostPath" in volumes[mounts[path]["name"]], path
    assert volumes[mounts["/var/lib/nstap"]["name"]]["hostPath"]["path"] == "/var/lib/nstap"
    token = mounts["/var/lib/nstap/api-token"]
    assert volumes[token["name"]]["secret"]["secretName"] == "nstap-api-token" and token["subPath"] == "api-token"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["image"].startswith("nstap:")  # the project's own Dockerfile, tagged as the README builds it


def test_configmap_is_a_valid_nstap_config_with_the_containerd_runtime(base: list[dict]) -> None:
    from nstap.config import Config

    cm = one(base, "ConfigMap")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["runtimes"] == RUNTIMES  # the interface of issue 21 (kind containerd)
    pod = one(base, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    assert Config.model_validate({k: v for k, v in config.items() if k != "runtimes"})  # every other key as nstap reads it
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert config["data_dir"] in mounts and config["proc_root"] in mounts and config["metrics_listen"].endswith(":9880")


def test_podmonitor_overlay_scrapes_the_daemonset_with_a_host_label(base: list[dict]) -> None:
    docs = render(K8S / "prometheus-operator")
    monitor = one(docs, "PodMonitor")  # no schema for the CRD offline: its shape is checked here
    pod = one(docs, "DaemonSet")["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "host"} in endpoint["relabelings"]
    assert len(docs) == len(base) + 1


def test_python_render_matches_kubectl(base: list[dict]) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the Python render is what the other tests used")
    ours = python_render(K8S / "base")
    # kubectl names a generated ConfigMap NAME-<10 characters of its content's hash>; ours is NAME
    strip = lambda docs: sorted((d["kind"], re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"]) if d["kind"] == "ConfigMap" else d["metadata"]["name"]) for d in docs)  # noqa: E731
    assert strip(ours) == strip(base)
