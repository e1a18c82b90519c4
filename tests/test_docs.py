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
