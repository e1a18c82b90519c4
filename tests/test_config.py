"""Configuration: defaults, the YAML file, flags, and how bad input is refused (exit 2, key named)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from nstap.config import Config, ConfigError, load_config, parse_listen


def run_nstap(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nstap", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("interval: 1\nintervall: 2\n", "intervall"),
        ("interval: -1\n", "interval"),
        ("interval: .nan\n", "interval"),
        ("interval: fast\n", "interval"),
        ("metrics_listen: 9880\n", "metrics_listen"),
        ("metrics_listen: 'localhost:99999'\n", "metrics_listen"),
        ("log_format: xml\n", "log_format"),
        ("samplers: {interfaces: true, wifi: true}\n", "samplers"),
        ("runtimes: [{name: docker, socket: relative.sock}]\n", "runtimes.0.socket"),
        ("runtimes: [{name: Docker!, socket: /x.sock}]\n", "runtimes.0.name"),
        ("runtimes: [{name: d, socket: /a.sock, tls: true}]\n", "runtimes.0.tls"),
        ("socket_walk: {budget_ms: -1}\n", "socket_walk.budget_ms"),
        ("tcp_child_ehash_entries: 99999999999\n", "tcp_child_ehash_entries"),
        ("detect: {detectors: {tcp_listen_overflows: {min_increase: 0}}}\n", "detect.detectors"),
        ("detect: {detectors: {tcp_retransmits: {threshold: .nan}}}\n", "detect.detectors"),
        ("detect: {detectors: {tcp_retransmits: {threshold: true}}}\n", "detect.detectors"),
        ("capture: {max_per_container_per_hour: 0}\n", "capture.max_per_container_per_hour"),
        ("max_interfaces: 0\n", "max_interfaces"),
        ("sample_budget_ms: .inf\n", "sample_budget_ms"),
        ("metrics: {disabled: [nstap_no_such_family]}\n", "metrics.disabled"),
        ("metrics: {disabled: nstap_udp_*}\n", "metrics.disabled"),
        ("alertmanager: {urls: ['ftp://am:9093']}\n", "alertmanager.urls"),
        ("alertmanager: {urls: ['http://u:p@am:9093']}\n", "alertmanager.urls"),
        ("alertmanager: {urls: ['http://am:9093', 'http://am:9093']}\n", "alertmanager.urls"),
        ("alertmanager: {host_label: 'not a label'}\n", "alertmanager.host_label"),
        ("alertmanager: {authorization: {credentials_file: /nonexistent/token}}\n", "alertmanager.authorization.credentials_file"),
        ("alertmanager: {basic_auth: {username: u, password_file: /nonexistent/pw}}\n", "alertmanager.basic_auth.password_file"),
        ("alertmanager: {tls_config: {cert_file: /etc/hostname}}\n", "alertmanager.tls_config"),
        ("alertmanager: {tls_config: {ca_file: /nonexistent/ca.pem}}\n", "alertmanager.tls_config.ca_file"),
    ],
)
def test_bad_config_file_exits_2_naming_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    config = tmp_path / "nstap.yaml"
    config.write_text(yaml_text)
    proc = run_nstap("run", "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"'{key}'" in lines[0], lines


@pytest.mark.parametrize(
    "text, fragment",
    [("interval: [1\n", "not valid YAML"), ("- a\n- b\n", "mapping"), ("\tx: 1\n", "not valid YAML")],
)
def test_unreadable_config_file_exits_2(tmp_path: Path, text: str, fragment: str) -> None:
    config = tmp_path / "nstap.yaml"
    config.write_text(text)
    proc = run_nstap("run", "--config", str(config))
    assert proc.returncode == 2 and fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    proc = run_nstap("run", "--config", str(tmp_path / "absent.yaml"))
    assert proc.returncode == 2 and "cannot read config file" in proc.stderr


@pytest.mark.parametrize(
    "args, key",
    [
        (["--interval", "0"], "interval"),
        (["--metrics-listen", "nowhere"], "metrics_listen"),
        (["--api-listen", "127.0.0.1:0"], "api_listen"),
    ],
)
def test_bad_flags_exit_2_naming_the_key(args: list[str], key: str) -> None:
    proc = run_nstap("run", *args)
    assert proc.returncode == 2 and f"'{key}'" in proc.stderr


def test_flag_of_the_wrong_type_exits_2() -> None:
    proc = run_nstap("run", "--interval", "soon")
    assert proc.returncode == 2 and "--interval" in proc.stderr


def test_port_taken_is_a_clear_failure(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_nstap("run", "--data-dir", str(tmp_path), "--metrics-listen", f"127.0.0.1:{port}", "--api-listen", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 1 and "cannot listen" in proc.stderr


def test_defaults_file_and_flags_layer(tmp_path: Path) -> None:
    default = Config()
    assert default.interval == 1.0 and default.metrics_listen == "0.0.0.0:9880" and default.api_listen == "127.0.0.1:9881"
    assert [r.name for r in default.runtimes] == ["docker", "podman"]
    config = tmp_path / "c.yaml"
    config.write_text("interval: 2\ndata_dir: /srv/nstap\nsamplers: {sockets: false}\n")
    loaded = load_config(config, {"interval": 0.5, "log_format": None})
    assert loaded.interval == 0.5 and str(loaded.data_dir) == "/srv/nstap" and loaded.samplers == {"sockets": False}


@pytest.mark.parametrize("value", ["0.0.0.0:9880", "[::]:9880", "[::1]:1", "localhost:80", "nstap-host.example:9"])
def test_listen_addresses(value: str) -> None:
    parse_listen(value)


def test_same_listener_twice_refused() -> None:
    with pytest.raises(ConfigError, match="'api_listen'.*differ"):
        load_config(None, {"metrics_listen": "127.0.0.1:9999", "api_listen": "127.0.0.1:9999"})


def test_the_example_config_names_every_key_with_its_default(tmp_path) -> None:
    """``nstap config-example`` (the installed /etc/nstap/config.yaml): uncommented, it is a valid
    configuration equal to the defaults, and it names every key of every section."""
    from nstap.config import Config, example_yaml, load_config

    text = example_yaml()
    assert all(line.startswith("#") for line in text.splitlines())
    uncommented = "\n".join(line[2:] if line.startswith("# ") else line.replace("#   ", "  ", 1) for line in text.splitlines())
    uncommented = "\n".join(line.replace("#   ", "  ") for line in uncommented.splitlines())
    path = tmp_path / "config.yaml"
    path.write_text(uncommented)
    assert load_config(path, {}) == Config()
    for name, field in Config.model_fields.items():
        assert f"# {name}:" in text
        sub = field.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            for key in sub.model_fields:
                assert f"#   {key}:" in text, (name, key)


def test_alertmanager_ca_that_is_no_certificate_exits_2(tmp_path: Path) -> None:
    """A readable tls_config file that TLS cannot load stops the start with exit 2, naming it."""
    config = tmp_path / "nstap.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\nmetrics_listen: 127.0.0.1:{free_port()}\napi_listen: 127.0.0.1:{free_port()}\nebpf: 'off'\n"
        "alertmanager: {urls: ['https://am:9093'], tls_config: {ca_file: /etc/hostname}}\n"
    )
    proc = run_nstap("run", "--config", str(config))
    assert proc.returncode == 2 and "alertmanager.tls_config" in proc.stderr, proc.stderr
