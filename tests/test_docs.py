"""The documentation against the code: the reference pages are what the code generates now, and
every metric, key, detector, endpoint and command in the code is in them (and nothing else is).
No runtime, daemon or root needed."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT

from nstap import docs

REFERENCE = ROOT / "docs" / "reference"
DAEMON = ROOT / "daemon" / "nstap"


def page(name: str) -> str:
    """A committed reference page."""
    return (REFERENCE / name).read_text()


def table_column(text: str, section: str | None = None, column: int = 0) -> list[str]:
    """The code spans of one column of the Markdown tables in ``text`` (under heading ``section``,
    up to the next heading)."""
    if section is not None:
        text = text.split(section + "\n", 1)[1].split("\n#", 1)[0]
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) > column and cells[column].startswith("`"):
            out.append(cells[column].strip("` "))
    return out


# -- generated, and current -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(docs.PAGES))
def test_reference_page_is_what_the_code_generates(name: str) -> None:
    """A reference page that differs from what the code generates now fails: run make docs."""
    assert (REFERENCE / name).exists(), f"docs/reference/{name} is missing: run make docs"
    assert page(name) == docs.PAGES[name](), f"docs/reference/{name} is not what the code generates now: run make docs"


def test_the_generator_checks_what_it_wrote(tmp_path: Path) -> None:
    """``python -m nstap.docs --check`` passes on what it wrote and fails on a page changed by hand."""
    assert docs.main(["--out", str(tmp_path)]) == 0
    assert docs.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "metrics.md").write_text(page("metrics.md").replace("Bytes received by the interface.", "Bytes received."))
    assert docs.main(["--check", "--out", str(tmp_path)]) == 1


# -- metrics --------------------------------------------------------------------------------------------

METRIC_MAKERS = {
    "Family", "_single", "CounterMetricFamily", "GaugeMetricFamily", "HistogramMetricFamily", "SummaryMetricFamily",
    "InfoMetricFamily", "Counter", "Gauge", "Histogram", "Summary", "Info", "Enum", "LoopHistogram",
}


def metric_names_in_source() -> set[str]:
    """Every metric name written as a literal in the daemon's source: the first argument of a call
    that makes a family or a metric, and the names of INTERFACE_COUNTERS-like tables."""
    found = set()
    for path in DAEMON.rglob("*.py"):
        if "containerd_api" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args:
                name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr if isinstance(node.func, ast.Attribute) else ""
                first = node.args[0]
                if name in METRIC_MAKERS and isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value.startswith("nstap_"):
                    found.add(first.value)
            if isinstance(node, ast.Tuple) and node.elts and isinstance(node.elts[0], ast.Constant):
                value = node.elts[0].value
                if isinstance(value, str) and re.fullmatch(r"nstap_[a-z0-9_]+_total", value):
                    found.add(value)
    return found


def test_every_metric_family_in_the_code_is_in_the_reference() -> None:
    """A metric named anywhere in the daemon's source is listed (counters under their _total name)."""
    listed = set(table_column(page("metrics.md")))
    in_source = metric_names_in_source()
    assert len(in_source) > 60
    missing = sorted(n for n in in_source if n not in listed and n + "_total" not in listed)
    assert not missing, f"metrics in the code but not in docs/reference/metrics.md (add their collector to nstap.docs): {missing}"


def test_the_metrics_reference_lists_what_the_daemon_exports_and_nothing_else() -> None:
    """Every family the exporter can export (what metrics.disabled may name) is listed with its labels,
    and every listed nstap_ family is one the exporter or a collector of the daemon makes."""
    from nstap.exporter import family_names

    text = page("metrics.md")
    listed = table_column(text)
    assert len(listed) == len(set(listed)), "a family listed twice"
    exported = set(family_names())
    assert exported <= set(listed)
    made = {m.name for _, _, families in docs.metric_sources() for m in families}
    assert set(listed) == made
    # A per-container family carries the three identity labels.
    for row in text.split("## Per container", 1)[1].split("\n## ", 1)[0].splitlines()[4:]:
        if row.startswith("| `"):
            assert "`container`, `container_id`, `runtime`" in row, row


# -- configuration --------------------------------------------------------------------------------------


def example_keys() -> list[str]:
    """The keys ``nstap config-example`` prints, dotted ("# key", "#   key", "#     key": nesting)."""
    from nstap.config import example_yaml

    keys: list[str] = []
    stack: list[str] = []
    for line in example_yaml().splitlines():
        m = re.match(r"^#( +)([a-z_0-9]+):", line)
        assert m, line
        depth = (len(m.group(1)) - 1) // 2
        stack[depth:] = [m.group(2)]
        keys.append(".".join(stack))
    return keys


def test_every_config_key_is_in_the_reference_with_a_description() -> None:
    """The keys of the configuration model, those nstap config-example prints, and those of the
    reference are the same; each has a description."""
    text = page("configuration.md").split("## Samplers")[0]
    listed = table_column(text)
    assert listed == docs.config_keys()
    sections = {s for s, _, _ in docs.config_sections()}
    for key in example_keys():
        assert key in listed or key in sections, f"nstap config-example prints {key!r}, which the reference does not list"
    for line in text.splitlines():
        if line.startswith("| `"):
            assert line.rstrip().rsplit("|", 2)[1].strip(), f"a key without a description: {line}"
    for key in ("sample_budget_ms", "max_interfaces", "capture.store_max_age", "nat.probe.rate", "storage.s3.bucket", "runtimes[].socket"):
        assert key in listed


# -- detectors -------------------------------------------------------------------------------------------


def test_every_detector_kind_parameter_and_cause_is_in_the_reference() -> None:
    """Every anomaly kind (sample detectors, NAT monitor, probes) with every parameter, and every cause."""
    from nstap.detect import DETECTORS
    from nstap.detect.cause import KINDS

    text = page("detectors.md")
    assert table_column(text, "## Sample detectors") == list(DETECTORS)
    for kind, spec in DETECTORS.items():
        assert table_column(text, f"### `{kind}`") == list(spec.params), kind
    assert table_column(text, "## Other kinds") == docs.detector_kinds()[len(DETECTORS):]
    causes = table_column(text, "## Causes")
    assert set(causes) == set(KINDS) | {"kernel_drop:<REASON>"}


# -- API ------------------------------------------------------------------------------------------------


def served_routes() -> set[tuple[str, str, str]]:
    """(listener, method, path) of every route the daemon's two listeners serve (HEAD left out),
    from the real ApiServer with the routes app.py adds to it."""
    from nstap.api.routes import CaptureApi
    from nstap.api.server import ApiServer
    from nstap.api.ui import CapturePage
    from nstap.registry import ContainerRegistry

    server = ApiServer("127.0.0.1:1", "127.0.0.1:2", None, None, ContainerRegistry(), set, "token")  # type: ignore[arg-type]
    store = SimpleNamespace(index=SimpleNamespace(alerts=None))
    api = CaptureApi(ContainerRegistry(), SimpleNamespace(), store, 10)  # type: ignore[arg-type]
    try:
        server.add_routes(api.routes())
        server.add_routes(CapturePage(api, store, "token").routes())  # type: ignore[arg-type]
    finally:
        api.close()
    out = set()
    for listener, app in (("metrics", server.metrics_app), ("api", server.api_app)):
        for route in app.router.routes():
            if route.method != "HEAD":
                out.add((listener, route.method, route.resource.canonical))
    return out


def test_every_endpoint_served_is_in_the_reference_and_nothing_else() -> None:
    """The endpoints listed per listener are exactly those the daemon serves."""
    text = page("api.md")
    listed = set()
    for listener, heading in (("metrics", "## On `metrics_listen`"), ("api", "## On `api_listen`")):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        for line in section.splitlines():
            m = re.match(r"^\| (GET|POST|PUT|DELETE|PATCH) \| `([^`]+)` \|", line)
            if m:
                listed.add((listener, m.group(1), m.group(2)))
    assert listed == served_routes()


QUERY_READERS = {"_text_param", "_time_param"}


def query_names(handler) -> set[str]:
    """The query parameters a JSON API handler reads (its own source)."""
    names = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(handler)))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name in QUERY_READERS and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
            names.add(node.args[1].value)
        elif name == "_limit":
            names.add("limit")
        elif name == "get" and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute) and func.value.attr == "query":
            names.add(node.args[0].value)
    return names


def test_declared_parameters_are_the_ones_the_handlers_read() -> None:
    """Each API endpoint's declared path parameters are its path's, its query parameters the ones
    its handler reads, and POST /api/v1/captures's body fields the ones it accepts."""
    from nstap.api.endpoints import endpoints
    from nstap.api.routes import CaptureApi

    for cls in docs.api_classes():
        for name, e in endpoints(cls):
            declared_path = {p.name for p in e.params if p.where == "path"}
            assert declared_path == set(re.findall(r"{(\w+)}", e.path)), e.path
    for name, e in endpoints(CaptureApi):
        if e.method == "GET":
            assert {p.name for p in e.params if p.where == "query"} == query_names(getattr(CaptureApi, name)), e.path
    start = next(e for _, e in endpoints(CaptureApi) if e.method == "POST" and e.path == "/api/v1/captures")
    accepted = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(CaptureApi.start)))):
        if isinstance(node, ast.Set):
            accepted |= {elt.value for elt in node.elts if isinstance(elt, ast.Constant)}
    assert {p.name for p in start.params} == accepted


# -- CLI ------------------------------------------------------------------------------------------------


def test_every_command_and_argument_is_in_the_reference() -> None:
    """Every command of the parser has its section, with every one of its arguments."""
    text = page("cli.md")
    for command, arguments in docs.cli_commands():
        assert f"## `{command}`" in text, command
        section = text.split(f"## `{command}`\n", 1)[1].split("\n## ", 1)[0]
        listed = {a for cell in table_column(section) for a in cell.split(", ")}
        assert set(arguments) - {"-h", "--help"} <= listed, command
    headings = re.findall(r"^## `(nstap[^`]*)`", text, re.M)
    assert headings == [c for c, _ in docs.cli_commands()]


# -- the hand-written pages: links, metric names, quoted constants -------------------------------------

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
HAND_WRITTEN = [p for p in PAGES if "reference" not in p.parts]
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)


def prose(path: Path) -> str:
    """A page without its code blocks and inline code (links and names in them are not checked)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", path.read_text()))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a page (GitHub numbers repeated ones: -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6} (.+)$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path: Path) -> None:
    """Every relative link of the README and docs/ names a file that exists, and a heading of it."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", path.read_text()))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: links that lead nowhere: {broken}"


NOT_METRICS = {"nstap_ui", "nstap_host", "nstap_started"}  # a Grafana variable, a label of one's own, a log event


def metric_mentions(text: str) -> set[str]:
    """Metric names and patterns a page mentions; ``a_{b,c}_d`` expanded, label sets
    (``name{label,...}``) left off."""
    out = set()
    for token in re.findall(r"nstap_(?:[a-z0-9_*]|\{[a-z0-9_,]+\})*", text):
        names = [""]
        for part in re.split(r"(\{[^}]*\})", token):
            if part.startswith("{"):
                if names[0].endswith("_"):
                    names = [n + alt for n in names for alt in part[1:-1].split(",")]
                else:
                    break  # a label set
            else:
                names = [n + part for n in names]
        out.update(n for n in names if not n.endswith("_"))  # a bare prefix is a regex's, not a name
    return out


@pytest.mark.parametrize("path", HAND_WRITTEN, ids=lambda p: str(p.relative_to(ROOT)))
def test_hand_written_pages_name_only_metrics_that_exist(path: Path) -> None:
    """A metric named in the README or docs/ (prose, tables, examples) is one nstap exports: a
    renamed or removed family cannot linger in the text."""
    import fnmatch

    listed = set(table_column(page("metrics.md")))
    listed |= {name + suffix for name in listed for suffix in ("_bucket", "_count", "_sum")}  # a histogram's series
    unknown = sorted(
        name for name in metric_mentions(path.read_text()) - NOT_METRICS
        if not (fnmatch.filter(listed, name) if "*" in name else name in listed or name + "_total" in listed)
    )
    assert not unknown, f"{path.relative_to(ROOT)} names metrics the reference does not list: {unknown}"


def normalized(path: Path) -> str:
    return " ".join(path.read_text().split())


def test_quoted_constants_are_the_codes() -> None:
    """Numbers the pages quote from the code are the code's."""
    from nstap.app import RETENTION_INTERVAL
    from nstap.capture.fleet import PUMP_BUDGET, PUMP_INTERVAL, PUMP_READS
    from nstap.capture.store import PRUNE_EVERY
    from nstap.watcher import Ticker

    docs_dir = ROOT / "docs"
    claims = [
        (docs_dir / "captures-and-evidence.md", f"and every {RETENTION_INTERVAL:g} s."),
        (docs_dir / "architecture.md", f"after every capture and every {RETENTION_INTERVAL:g} s"),
        (docs_dir / "captures-and-evidence.md", "pruned every minute" if PRUNE_EVERY == 60 else f"pruned every {PRUNE_EVERY:g} s"),
        (docs_dir / "performance.md", f"at most {PUMP_BUDGET * 1000:g} ms per wake-up"),
        (docs_dir / "performance.md", {0.25: "four times a second"}.get(PUMP_INTERVAL, f"every {PUMP_INTERVAL:g} s")),
        (docs_dir / "performance.md", f"{PUMP_READS} MiB per recorder"),
        (docs_dir / "performance.md", f"in slices of at most {Ticker.SLICE * 1000:g} ms"),
        (docs_dir / "metrics.md", f"no published port has {series_of_a_plain_container()} series"),
        (docs_dir / "metrics.md", f"a container has {series_of_a_plain_container()} series"),
        (ROOT / "README.md", f"{series_of_a_plain_container()} series per container"),
    ]
    wrong = [(p.name, phrase) for p, phrase in claims if phrase not in normalized(p)]
    assert not wrong, f"pages that do not say what the code does: {wrong}"


def series_of_a_plain_container() -> int:
    """Series of a busybox container with one listener on eth0, no published port, no eBPF: its
    three interfaces (lo, eth0, the host end of its veth) and the families every sample makes,
    plus its firewall's change counter."""
    from nstap.exporter import ContainerCollector
    from nstap.registry import ContainerRegistry
    from nstap.runtime.records import ContainerRecord
    from nstap.samplers.protocols import PROTOCOL_COUNTERS
    from nstap.samplers.sockets import STATE_NAMES
    from nstap.samples import InterfaceCounters, ListenQueue, NamespaceSample, SampleStore, SocketSample

    registry, store = ContainerRegistry(), SampleStore()
    registry.upsert(ContainerRecord("ab" * 32, "web", "docker", 1, "running", "busybox", netns=5))
    interfaces = tuple(
        InterfaceCounters(name, side, peer, True, 1500, *([0] * 8)) for name, side, peer in (("lo", "container", ""), ("eth0", "container", ""), ("veth1", "host", "eth0"))
    )
    sockets = SocketSample({"tcp": 1}, dict.fromkeys(STATE_NAMES, 0), 1.0, 0, (ListenQueue("80", 0, 128, 1),), 1.0)
    store.put(NamespaceSample(5, 1.0, 0.001, interfaces, {c.key: 0 for c in PROTOCOL_COUNTERS}, sockets, interval=1.0))
    lines = [line for line in ContainerCollector(registry, store, []).render().splitlines() if 'container_id="abababababab"' in line]
    return len(lines) + 1  # nstap_firewall_changes_total: one per watched namespace with the NAT monitor on


def test_every_module_is_in_the_architecture_layout() -> None:
    """The architecture page's layout names every module (the generated modules page lists them all)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for module, _ in docs.modules():
        name = Path(module).name
        if name in ("__init__.py", "__main__.py"):
            continue
        if name not in text and Path(module).stem not in text:
            missing.append(module)
    assert not missing, f"modules the architecture page does not mention: {missing}"


# -- commands shown in the README and docs/, run ----------------------------------------------------------

BLOCK = re.compile(r"^```console (doctest(?:-demo|-containers|-causes|-shop)?)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def command_blocks(kind: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(where, [(command, expected output), ...]) of every ```console <kind> block."""
    out = []
    for path in HAND_WRITTEN:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            if m.group(1) != kind:
                continue
            commands: list[tuple[str, list[str]]] = []
            for line in m.group(2).splitlines():
                if line.startswith("$ "):
                    commands.append((line[2:], []))
                else:
                    assert commands, f"{path.name}: output before any command"
                    commands[-1][1].append(line)
            where = f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
            out.append((where, [(cmd, "\n".join(expected)) for cmd, expected in commands]))
    return out


def shape_matches(expected: str, actual: str) -> bool:
    """``actual`` has the shape ``expected`` shows: line by line, runs of spaces compared as one,
    ``...`` in a line matching anything in it and a line of ``...`` any number of lines; blank lines
    are not compared."""

    def lines(text: str) -> list[str]:
        return [" ".join(line.split()) for line in text.splitlines() if line.strip()]

    pattern = ""
    for line in lines(expected):
        if line == "...":
            pattern += r"(?:[^\n]*\n)*?"
        else:
            pattern += r"[^\n]*".join(re.escape(part.strip()) for part in line.split("...")) + r"\n"
    return re.fullmatch(pattern, "".join(line + "\n" for line in lines(actual))) is not None


def test_shape_matching() -> None:
    """The doc tests' matcher: spacing, ... within a line and ... for lines."""
    assert shape_matches("a  b ... d\n...\nlast", "a b c d\nx\ny\nlast\n")
    assert shape_matches("a\n...", "a\n")
    assert not shape_matches("a\nb", "a\nc\n")
    assert not shape_matches("x ... y", "x y z\n")


def shell(tmp: Path, wrapper: str) -> dict[str, str]:
    """The environment a documented command runs in: ``nstap`` on PATH is this checkout's."""
    import os
    import sys

    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nstap").write_text(wrapper.replace("PYTHON", sys.executable))
    (bin_dir / "nstap").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "daemon"), "COLUMNS": "80"}


def run_documented(command: str, env: dict[str, str], cwd: Path, replace: dict[str, str] | None = None) -> str:
    """Run a command as the page shows it (``.venv/bin/`` is this checkout's ``nstap`` and Python)."""
    import subprocess
    import sys

    command = command.replace(".venv/bin/nstap", "nstap").replace(".venv/bin/python", sys.executable)
    for old, new in (replace or {}).items():
        command = command.replace(old, new)
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


DOCTESTS = command_blocks("doctest")


@pytest.mark.parametrize("where,commands", DOCTESTS, ids=[w for w, _ in DOCTESTS])
def test_documented_command(where: str, commands: list[tuple[str, str]], tmp_path: Path) -> None:
    """Each ```console doctest block: its commands run here (no runtime or daemon needed) and print
    what the page shows."""
    env = shell(tmp_path, '#!/bin/sh\nexec PYTHON -m nstap "$@"\n')
    for command, expected in commands:
        output = run_documented(command, env, ROOT)
        assert shape_matches(expected, output), f"{where}: {command}\n--- shown:\n{expected}\n--- printed:\n{output}"


def test_the_pages_have_doctests() -> None:
    """The blocks this file runs are there (a renamed info string would silently run nothing)."""
    places = {where.split(":")[0] for where, _ in DOCTESTS}
    assert {"docs/troubleshooting.md", "docs/configuration.md", "docs/api-and-cli.md", "docs/operations.md", "docs/alerting-and-dashboards.md"} <= places
    assert [where for where, _ in command_blocks("doctest-demo")] and command_blocks("doctest-demo")[0][0].startswith("README.md")


CLIENT_COMMANDS = "containers|anomalies|nat|exposure|talkers|captures|capture"


@pytest.mark.docker
def test_quick_start(nstap, docker_image: str, tmp_path: Path) -> None:
    """The README's quick start, for real: ``make demo``'s containers (broken 4 s after they start
    instead of 20) next to a daemon, then every command of its ```console doctest-demo block, with
    ``localhost:9880`` the test daemon's /metrics, ``nstap`` asking the test daemon (its config
    appended) and ``<ID>`` demo-flaky's capture; each output must have the shape shown."""
    import os
    import subprocess

    from conftest import sh, wait_until

    (where, commands), = command_blocks("doctest-demo")
    d = nstap()
    env = shell(tmp_path, f'#!/bin/bash\ncase "$1" in {CLIENT_COMMANDS}) exec PYTHON -m nstap "$@" --config {d.config_path};; esac\n'
                          'exec PYTHON -m nstap "$@"\n')
    demo_env = {**os.environ, "NSTAP_DEMO_BREAK_AFTER": "4"}
    try:
        subprocess.run([str(ROOT / "deploy/demo.sh"), "up"], check=True, env=demo_env, capture_output=True, cwd=ROOT, timeout=120)

        def demo_flaky_capture() -> str | None:
            _, body = d.api("/api/v1/anomalies?container=demo-flaky&kind=tcp_retransmits")
            ids = {a["capture_id"] for a in body["anomalies"] if a["capture_id"]}
            _, body = d.api("/api/v1/captures?container=demo-flaky")
            done = [c["id"] for c in body["captures"] if c["state"] == "complete" and c["id"] in ids]
            return done[0] if done else None

        capture_id = wait_until(demo_flaky_capture, 90, 0.5, "demo-flaky's tcp_retransmits anomaly with a finished capture")
        replace = {"localhost:9880": f"127.0.0.1:{d.metrics_port}", "<ID>": capture_id}
        for command, expected in commands:
            output = run_documented(command, env, tmp_path, replace)
            assert shape_matches(expected, output), f"{where}: {command}\n--- shown:\n{expected}\n--- printed:\n{output}"
    finally:
        subprocess.run([str(ROOT / "deploy/demo.sh"), "down"], check=True, capture_output=True, cwd=ROOT, timeout=120)
    assert sh("docker", "ps", "-aq", "--filter", "label=nstap.demo=1").stdout.strip() == ""


@pytest.mark.docker
def test_readme_containers(nstap, containers, docker_image: str, podman_image: str, tmp_path: Path) -> None:
    """The README's first look, for real: a web server publishing a port, a sidecar in its
    namespace, a container on the host's network and a Podman pod with a member publishing a port,
    then the ```console doctest-containers block's commands; their output must have the shape
    shown (its names are the test's containers; pids, namespace inodes, addresses, ids, ports and
    veth names are whatever this run gave)."""
    from conftest import RUN_ID, free_port, wait_until

    (where, commands), = command_blocks("doctest-containers")
    d = nstap()
    web_port, pod_port = free_port(), free_port()
    web = containers.docker("-p", f"127.0.0.1:{web_port}:80", docker_image, "httpd", "-f", "-p", "80", "-h", "/", name="web")
    containers.docker("--network", f"container:{web}", docker_image, "sleep", "600", name="sidecar")
    containers.docker("--network", "host", docker_image, "sleep", "600", name="ci-runner")
    pod = containers.pod("pm", "-p", f"{pod_port}:80")
    containers.podman("--pod", pod, podman_image, "httpd", "-f", "-p", "80", "-h", "/", name="pm1")
    infra = infra_name(pod)
    d.wait_metric(lambda m: m.find("nstap_interface_receive_drops_total", container_id=web[:12], side="host"), 10, "web's host-side veth sampled")
    listed = lambda: [c for c in d.api("/api/v1/containers")[1]["containers"] if RUN_ID in c["name"] or c["name"] == infra]  # noqa: E731
    wait_until(lambda: len(listed()) == 5 and all(c["watched"] or c["netns"] == "host" for c in listed()), 15, 0.2, "the five listed and watched")
    names = {"web": f"web-{RUN_ID}", "sidecar": f"sidecar-{RUN_ID}", "ci-runner": f"ci-runner-{RUN_ID}", "pm1": f"pm1-{RUN_ID}",
             "112738293f62-infra": infra}
    env = shell(tmp_path, f'#!/bin/bash\ncase "$1" in {CLIENT_COMMANDS}) exec PYTHON -m nstap "$@" --config {d.config_path};; esac\n'
                          'exec PYTHON -m nstap "$@"\n')
    for command, expected in commands:
        command = command.replace('container="web"', f'container="{names["web"]}"')
        output = run_documented(command, env, tmp_path, {"localhost:9880": f"127.0.0.1:{d.metrics_port}"})
        if "nstap containers" in command:  # the rows of other tests' containers are not this block's
            output = "\n".join(line for line in output.splitlines() if line.startswith("CONTAINER") or RUN_ID in line or line.startswith(infra))
        assert shape_matches(varying(expected, names), output), f"{where}: {command}\n--- shown:\n{expected}\n--- printed:\n{output}"


def infra_name(pod: str) -> str:
    """The name Podman gave the pod's infra container."""
    from conftest import PODMAN_ENV, sh

    infra_id = sh("podman", "pod", "inspect", "--format", "{{.InfraContainerID}}", pod, env=PODMAN_ENV).stdout.strip()
    return sh("podman", "inspect", "--format", "{{.Name}}", infra_id, env=PODMAN_ENV).stdout.strip()


def varying(expected: str, names: dict[str, str]) -> str:
    """``expected`` with the README's names made the test's, and what differs from run to run
    (pids, namespace inodes, addresses, container ids, published ports, veth names) made ``...``."""
    out = []
    for line in expected.splitlines():
        line = re.sub(r"\b\d+\.\d+\.\d+\.\d+\b", "...", line)
        line = re.sub(r'container_id="[0-9a-f]{12}"', 'container_id="..."', line)
        line = re.sub(r"\bveth[0-9a-f]+\b", "...", line)
        line = re.sub(r"(?<![\w.])\d{3,}(?![\w.])", "...", line)  # pids, inodes, host ports (not 80/tcp, not a value of 0)
        for readme, test in sorted(names.items(), key=lambda kv: -len(kv[0])):
            line = re.sub(rf"(?<![\w-]){re.escape(readme)}(?![\w-])", test, line)
        out.append(line)
    return "\n".join(out)


def test_the_cli_page_lists_every_command_with_options_it_has() -> None:
    """docs/api-and-cli.md's list of commands: every command of the parser (``captures`` by its
    own commands), and only options that command takes (it had lost ``nstap dns``)."""
    import argparse

    from nstap.cli import _parser

    def commands(parser: argparse.ArgumentParser, prefix: str) -> dict[str, set[str]]:
        out = {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.update(commands(sub, f"{prefix} {name}"))
                return out
        return {prefix: {o for a in parser._actions for o in a.option_strings}}

    parser_commands = commands(_parser(), "nstap")
    page = (ROOT / "docs/api-and-cli.md").read_text()
    block = page[page.index("## The CLI"):]
    block = block[block.index("```sh\n") + 6:]
    listed = {}
    for line in block[:block.index("```")].splitlines():
        words = line.split()
        name = " ".join(words[:3]) if words[1] == "captures" else " ".join(words[:2])
        listed[name] = set(re.findall(r"(?<![\w-])(--?[a-z][\w.-]*)", line))
    assert set(listed) == set(parser_commands), set(parser_commands) ^ set(listed)
    for name, options in listed.items():
        assert options <= parser_commands[name], (name, options - parser_commands[name])


def test_the_readme_is_a_newcomer_s_page() -> None:
    """At most 300 lines, and its first screenful (24 lines) says how to set it up, try it and run
    it in production, linking to each."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, len(lines)
    first = "\n".join(lines[:24])
    for needed in ("`make run`", "`make test`", "`make demo`", "systemd", "Kubernetes", "](#running-it-in-production)", "](#quick-start-"):
        assert needed in first, needed


def test_the_configuration_page_points_every_top_level_key_somewhere() -> None:
    """docs/configuration.md's table of which page explains which keys: every top-level key of the
    config model is in it (``dns.*`` had been left out)."""
    from nstap.config import Config

    page = (ROOT / "docs/configuration.md").read_text()
    table = page[page.index("| keys | page |"):]
    table = table[:table.index("\n\n")]
    named = {m.split(".")[0] for m in re.findall(r"`([a-z_0-9.*]+)`", table)}
    assert set(Config.model_fields) <= named, set(Config.model_fields) - named
