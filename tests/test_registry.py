"""The registry's namespace grouping and owner election, as tables of containers."""

from __future__ import annotations


from nstap.registry import ContainerRegistry, group_namespaces
from nstap.runtime.records import ContainerRecord

HOST = 4026531840


def rec(cid: str, netns: int, *, mode: str = "bridge", started: str = "2026-01-01T00:00:00Z", runtime: str = "docker", labels=None) -> ContainerRecord:
    full = (cid * 64)[:64]
    return ContainerRecord(
        id=full, name=f"c-{cid}", runtime=runtime, pid=100, status="running", image="img", labels=labels or {},
        network_mode=mode, started_at=started,
    ).with_netns(netns, HOST)


def test_shared_namespace_is_watched_once_under_its_creator() -> None:
    owner = rec("a", 5, started="2026-01-01T00:00:02Z")
    joiner = rec("b", 5, mode="container:" + "a" * 64, started="2026-01-01T00:00:01Z")  # older, but joined
    other = rec("c", 6)
    ns = group_namespaces([joiner, owner, other])
    assert set(ns) == {5, 6}
    assert ns[5].owner.id == owner.id
    assert {m.id for m in ns[5].members} == {owner.id, joiner.id}


def test_pod_members_without_creator_elect_the_oldest() -> None:
    a = rec("a", 7, mode="container:" + "f" * 64, started="2026-01-01T00:00:05Z")
    b = rec("b", 7, mode="container:" + "f" * 64, started="2026-01-01T00:00:03Z")
    assert group_namespaces([a, b])[7].owner.id == b.id


def test_host_network_and_opted_out_containers_are_not_watched() -> None:
    host = rec("h", HOST, mode="host")
    opted = rec("o", 9, labels={"nstap.enable": "false"})
    unknown = rec("u", 0)  # its namespace could not be read
    assert group_namespaces([host, opted, unknown]) == {}


def test_opted_out_owner_leaves_the_namespace_to_a_member() -> None:
    owner = rec("a", 5, labels={"nstap.enable": "false"})
    joiner = rec("b", 5, mode="container:" + "a" * 64)
    ns = group_namespaces([owner, joiner])
    assert ns[5].owner.id == joiner.id and len(ns[5].members) == 1


def test_junk_labels_cannot_push_an_opt_out_out() -> None:
    """Defect (found in review): the first 64 labels were kept, and Docker sorts them by key."""
    from nstap import labels

    junk = {f"nstap.a{i:04d}": "x" for i in range(5000)}
    detect = {f"nstap.detect.k{i:04d}": "1" for i in range(5000)}
    hostile = {**junk, **detect, "nstap.capture": "OFF", "nstap.enable": "No", "other.label": "y" * 10, "nstap.z": "v" * 300}
    kept = labels.kept(dict(sorted(hostile.items())))
    assert labels.capture_opted_out(kept) and not labels.watch_enabled(kept)
    assert len(kept) <= 2 + 2 * labels.MAX_KEPT and "other.label" not in kept and "nstap.z" not in kept
    assert labels.switch("maybe") is None and labels.switch(" Enabled ") is True and labels.switch("0") is None


def test_registry_notifies_and_reconciles_per_runtime() -> None:
    registry = ContainerRegistry()
    changes = []
    registry.subscribe(lambda: changes.append(set(registry.namespaces())))
    d1, d2, p1 = rec("a", 5), rec("b", 6), rec("c", 7, runtime="podman")
    registry.upsert(d1)
    registry.upsert(d1)  # unchanged: no notification
    registry.upsert(p1)
    assert changes == [{5}, {5, 7}]
    registry.replace_runtime("docker", [d2])  # d1 stopped while we were not looking
    assert set(registry.namespaces()) == {6, 7}
    assert registry.runtime_ids("podman") == {p1.id}
    registry.replace_runtime("docker", [d2])  # same set: no notification
    assert len(changes) == 3
    assert registry.remove(d2.id) == d2 and registry.remove(d2.id) is None
    assert set(registry.namespaces()) == {7}


def test_own_container_is_listed_but_not_watched(tmp_path) -> None:
    from nstap.registry import ContainerRegistry, own_container_id
    from nstap.runtime.records import ContainerRecord

    cid = "ab" * 32
    (tmp_path / "self").mkdir()
    (tmp_path / "self/mountinfo").write_text(
        f"612 600 0:48 /docker/containers/{cid}/hostname /etc/hostname rw - ext4 /dev/vda1 rw\n"
        f"613 600 0:48 /docker/containers/{cid}/resolv.conf /etc/resolv.conf rw - ext4 /dev/vda1 rw\n"
    )
    assert own_container_id(tmp_path, {"NSTAP_IN_CONTAINER": "1"}) == cid
    marker = tmp_path / ".dockerenv"
    assert own_container_id(tmp_path, {}, (marker,)) == ""  # on a host: no marker, no id
    marker.touch()
    assert own_container_id(tmp_path, {}, (marker,)) == cid  # Docker's marker file says it is in a container
    registry = ContainerRegistry(own_id=cid)
    me = ContainerRecord(id=cid, name="nstap", runtime="docker", pid=10, status="running", image="nstap", netns=4026532999)
    other = ContainerRecord(id="cd" * 32, name="web", runtime="docker", pid=11, status="running", image="b", netns=4026533000)
    registry.replace_runtime("docker", [me, other])
    assert {r.name for r in registry.containers()} == {"nstap", "web"}
    assert [ns.owner.name for ns in registry.namespaces().values()] == ["web"]


def test_every_container_of_a_namespace_can_veto_its_captures_watched_or_not() -> None:
    """Defect: a container that said nstap.capture=off and nstap.enable=off was left out of the
    namespace's members, so its veto was never looked at when a sidecar's namespace was captured."""
    owner = ContainerRecord(id="aa" * 32, name="app", runtime="docker", pid=1, status="running", image="i", netns=5)
    hidden = ContainerRecord(id="bb" * 32, name="vault", runtime="docker", pid=2, status="running", image="i", netns=5,
                             network_mode="container:" + "aa" * 32, labels={"nstap.enable": "off", "nstap.capture": "off"})
    watched_veto = ContainerRecord(id="cc" * 32, name="quiet", runtime="docker", pid=3, status="running", image="i", netns=6,
                                   labels={"nstap.capture": "off"})
    free = ContainerRecord(id="dd" * 32, name="free", runtime="docker", pid=4, status="running", image="i", netns=7)
    namespaces = group_namespaces([owner, hidden, watched_veto, free])
    assert [m.name for m in namespaces[5].members] == ["app"] and namespaces[5].vetoes == ("vault",)
    assert namespaces[6].vetoes == ("quiet",) and namespaces[7].vetoes == ()
