"""nstap's Grafana dashboards, generated from code with grafana-foundation-sdk (Grafana 11.6 schema).

    python grafana/dashboards.py            write grafana/dashboards/*.json (make dashboards)
    python grafana/dashboards.py --check    exit 1 if the committed JSON differs from the code

Two dashboards:

* *nstap / host overview* (uid ``nstap-host``): containers ranked by drops on both veth ends,
  retransmission ratio, resets, listen overflows, failed DNS lookups and kernel drop reasons; NAT
  state of every published port; conntrack use; anomalies of the time range; nstap's own health.
* *nstap / container* (uid ``nstap-container``, variables ``host``, ``instance`` and ``container``): the
  drill-down the alert rules link to, with every capture a link to nstap's capture page.

The capture page is on nstap's API listener, which Grafana does not know: the text variable
``nstap_ui`` (default ``http://127.0.0.1:9881``) holds its base URL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DataTransformerConfig,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).resolve().parent / "dashboards"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
# host is the external label each host's Prometheus agent adds (deploy/prometheus/prometheus-agent.yml);
# "All" is .*, which also matches series without it (one Prometheus scraping nstap directly).
HOST = 'host=~"$host", instance=~"$instance"'  # the host overview may show one host or several
ONE = 'host=~"$host", instance="$instance", container="$container"'  # the drill-down: one container
NSTAP_UI = "${nstap_ui}"


# -- building blocks ---------------------------------------------------------------------------


def query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    """A range query, as a time series panel runs it."""
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS).range()
    return q.legend_format(legend) if legend else q


def table_query(expr: str, ref: str = "A") -> prometheus.Dataquery:
    """An instant query formatted as a table (one row per series, a column per label)."""
    return prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS).instant().format(PromQueryFormat.TABLE)


def graph(title: str, description: str, unit: str, *targets: prometheus.Dataquery, width: int = 12, height: int = 8) -> timeseries.Panel:
    """A time series panel."""
    panel = (
        timeseries.Panel().title(title).description(description).datasource(DS).unit(unit).min(0)
        .span(width).height(height).fill_opacity(10).line_width(1)
    )
    for t in targets:
        panel = panel.with_target(t)
    return panel


def listing(title: str, description: str, target: prometheus.Dataquery, hide: tuple[str, ...] = (), width: int = 24, height: int = 8,
            links: list[dash.DashboardLink] | None = None) -> table.Panel:
    """A table of the series an instant query returns, without the columns nobody reads."""
    excluded = {name: True for name in ("Time", "__name__", "job", *hide)}
    panel = (
        table.Panel().title(title).description(description).datasource(DS).span(width).height(height).with_target(target)
        .with_transformation(DataTransformerConfig(id_val="organize", options={"excludeByName": excluded}))
        .filterable(True)
    )
    return panel.data_links(links) if links else panel


def drill_down_link() -> dash.DashboardLink:
    """A data link from a container's series to its drill-down dashboard."""
    return (
        dash.DashboardLink("Open ${__field.labels.container}")
        .url("/d/nstap-container/nstap-container?var-host=${__field.labels.host}&var-instance=${__field.labels.instance}&var-container=${__field.labels.container}&${__url_time_range}")
    )


def host_variable(multi: bool) -> dash.QueryVariable:
    """The hosts whose Prometheus agents remote-write nstap's series (their external label host);
    with none (one Prometheus scraping nstap directly) only All, which matches every series."""
    return (
        dash.QueryVariable("host").label("host").datasource(DS).query("label_values(nstap_build_info, host)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC).multi(multi).include_all(True).all_value(".*")
    )


def instance_variable(multi: bool) -> dash.QueryVariable:
    """The nstap instances of the selected hosts."""
    return (
        dash.QueryVariable("instance").label("instance").datasource(DS).query('label_values(nstap_build_info{host=~"$host"}, instance)')
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC).multi(multi).include_all(multi)
    )


def datasource_variable() -> dash.DatasourceVariable:
    return dash.DatasourceVariable("datasource").label("Prometheus").type("prometheus")


def ui_variable() -> dash.TextBoxVariable:
    return (
        dash.TextBoxVariable("nstap_ui").label("nstap capture page").default_value("http://127.0.0.1:9881")
        .description("Base URL of nstap's API listener (api_listen), where the capture page /ui/ is served.")
        .current(VariableOption(text="http://127.0.0.1:9881", value="http://127.0.0.1:9881"))
    )


# -- the host overview --------------------------------------------------------------------------


def host_overview() -> dash.Dashboard:
    """Which container is in trouble, and whether nstap is well."""
    d = (
        dash.Dashboard("nstap / host overview").uid("nstap-host").tags(["nstap"]).refresh("30s").time("now-1h", "now")
        .tooltip(DashboardCursorSync.CROSSHAIR).timezone("browser").editable()
        .description("Containers ranked by what goes wrong in their network; click a series for the container's drill-down.")
        .with_variable(datasource_variable()).with_variable(host_variable(multi=True)).with_variable(instance_variable(multi=True)).with_variable(ui_variable())
        .link(dash.DashboardLink("nstap dashboards").type("dashboards").tags(["nstap"]).as_dropdown(True).include_vars(True).keep_time(True))
    )
    link = [drill_down_link()]
    d = d.with_row(dash.Row("Containers ranked"))
    d = d.with_panel(graph(
        "Drops by container and veth end", "Packets dropped per second on the container's interfaces (side=container) and on the host end of "
        "its veths (side=host), receive and transmit; top 10.", "pps",
        query(f'topk(10, sum by (host, instance, container, side) (rate(nstap_interface_receive_drops_total{{{HOST}, interface!="lo"}}[{RATE}]) '
              f'+ rate(nstap_interface_transmit_drops_total{{{HOST}, interface!="lo"}}[{RATE}])))', "{{container}} ({{side}})"),
    ).data_links(link))
    d = d.with_panel(graph(
        "TCP retransmission ratio", "Share of the TCP segments each container sent that were retransmissions; top 10.", "percentunit",
        query(f"topk(10, sum by (host, instance, container) (rate(nstap_tcp_retransmitted_segments_total{{{HOST}}}[{RATE}])) "
              f"/ sum by (host, instance, container) (rate(nstap_tcp_segments_sent_total{{{HOST}}}[{RATE}])))", "{{container}}"),
    ).data_links(link))
    d = d.with_panel(graph(
        "TCP resets", "Resets sent plus established connections reset, per second; top 10.", "ops",
        query(f"topk(10, sum by (host, instance, container) (rate(nstap_tcp_resets_sent_total{{{HOST}}}[{RATE}]) "
              f"+ rate(nstap_tcp_established_resets_total{{{HOST}}}[{RATE}])))", "{{container}}"),
    ).data_links(link))
    d = d.with_panel(graph(
        "Listen queue overflows", "Connections dropped because a listener's accept queue was full, per second; top 10.", "ops",
        query(f"topk(10, sum by (host, instance, container) (rate(nstap_tcp_listen_overflows_total{{{HOST}}}[{RATE}])))", "{{container}}"),
    ).data_links(link))
    d = d.with_panel(graph(
        "Failed DNS lookups by container", "DNS lookups per second that failed: every answer but NOERROR (NXDOMAIN, SERVFAIL, REFUSED, other) "
        "and the lookups no answer came to (timeout); top 10.", "ops",
        query(f'topk(10, sum by (host, instance, container) (rate(nstap_dns_requests_total{{{HOST}, rcode!="NOERROR"}}[{RATE}])))', "{{container}}"),
    ).data_links(link))
    d = d.with_panel(graph(
        "Kernel drop reasons by container", "Packets the kernel dropped in each container's namespace, by the kernel's reason (eBPF); top 10.", "pps",
        query(f"topk(10, sum by (host, instance, container, reason) (rate(nstap_kernel_drops_total{{{HOST}}}[{RATE}])))", "{{container}}: {{reason}}"),
    ).data_links(link))
    d = d.with_panel(graph(
        "Kernel drop reasons outside containers", "Drops the kernel counted in the host's namespaces, by reason.", "pps",
        query(f"topk(10, sum by (host, instance, reason) (rate(nstap_host_kernel_drops_total{{{HOST}}}[{RATE}])))", "{{instance}}: {{reason}}"),
    ))
    d = d.with_row(dash.Row("NAT and conntrack"))
    d = d.with_panel(listing(
        "Published ports", "Every published port of every container, verified against the NAT rules: ok, missing, stale or shadowed.",
        table_query(f"nstap_nat_port_forward_info{{{HOST}}} == 1"), hide=("Value",), width=24,
        links=[dash.DashboardLink("Open ${__data.fields.container}").url(
            "/d/nstap-container/nstap-container?var-host=${__data.fields.host}&var-instance=${__data.fields.instance}&var-container=${__data.fields.container}")],
    ))
    d = d.with_panel(graph(
        "Conntrack table use", "Entries in the host's conntrack table as a share of nf_conntrack_max.", "percentunit",
        query(f"nstap_conntrack_entries{{{HOST}}} / nstap_conntrack_limit{{{HOST}}}", "{{host}} {{instance}}"),
    ))
    d = d.with_panel(graph(
        "Conntrack entries by container", "Flows of each container in the host's conntrack table; top 10.", "short",
        query(f"topk(10, sum by (host, instance, container) (nstap_container_conntrack_entries{{{HOST}}}))", "{{container}}"),
    ).data_links(link))
    d = d.with_row(dash.Row("Anomalies"))
    d = d.with_panel(listing(
        "Anomalies in the time range", "Every container, kind and cause with an anomaly at some point of the time range (Value: 1 if it was active).",
        table_query(f"max by (host, instance, container, container_id, runtime, kind, cause) (max_over_time(nstap_anomaly_active{{{HOST}}}[$__range]))"),
        links=[dash.DashboardLink("Open ${__data.fields.container}").url(
            "/d/nstap-container/nstap-container?var-host=${__data.fields.host}&var-instance=${__data.fields.instance}&var-container=${__data.fields.container}"),
            dash.DashboardLink("Its captures").url(NSTAP_UI + "/ui/containers/${__data.fields.container_id}")],
    ))
    d = d.with_row(dash.Row("nstap itself"))
    d = d.with_panel(graph(
        "Sample duration", "How long one namespace's sample takes (p50, p99).", "s",
        query(f"histogram_quantile(0.99, sum by (host, instance, le) (rate(nstap_sample_duration_seconds_bucket{{{HOST}}}[{RATE}])))", "p99 {{host}} {{instance}}"),
        query(f"histogram_quantile(0.5, sum by (host, instance, le) (rate(nstap_sample_duration_seconds_bucket{{{HOST}}}[{RATE}])))", "p50 {{host}} {{instance}}", "B"),
        width=8,
    ))
    d = d.with_panel(graph(
        "Errors", "Sampler errors (containers that vanish mid-sample make a few) and supervised tasks that failed, per second.", "ops",
        query(f"sum by (host, instance, sampler) (rate(nstap_sampler_errors_total{{{HOST}}}[{RATE}]))", "{{sampler}}"),
        query(f"sum by (host, instance, task) (rate(nstap_task_failures_total{{{HOST}}}[{RATE}]))", "task {{task}}", "B"),
        width=8,
    ))
    d = d.with_panel(graph(
        "Scrape size and time", "Series in one scrape of nstap, and how long it took.", "short",
        query(f'scrape_samples_scraped{{{HOST}, job="nstap"}}', "series {{host}} {{instance}}"),
        query(f'scrape_duration_seconds{{{HOST}, job="nstap"}}', "seconds {{host}} {{instance}}", "B"),
        width=8,
    ))
    d = d.with_panel(graph(
        "Runtimes and collectors", "1 while nstap reaches the runtime's API / the collector works.", "short",
        query(f"nstap_runtime_up{{{HOST}}}", "runtime {{runtime}}"),
        query(f"nstap_collector_up{{{HOST}}}", "collector {{collector}}", "B"),
        width=12,
    ))
    d = d.with_panel(graph(
        "Capture store", "Bytes of captures kept, against the store's budget.", "bytes",
        query(f"nstap_capture_store_bytes{{{HOST}}}", "kept {{host}} {{instance}}"),
        query(f"nstap_capture_store_max_bytes{{{HOST}}}", "budget {{host}} {{instance}}", "B"),
        width=12,
    ))
    return d


# -- the container drill-down ---------------------------------------------------------------------


def container_drill_down() -> dash.Dashboard:
    """Everything nstap knows about one container's network."""
    d = (
        dash.Dashboard("nstap / container").uid("nstap-container").tags(["nstap"]).refresh("30s").time("now-1h", "now")
        .tooltip(DashboardCursorSync.CROSSHAIR).timezone("browser").editable()
        .description("One container: both ends of its veths, its TCP/UDP/IP counters, sockets, queues, drops, NAT, anomalies and captures.")
        .with_variable(datasource_variable()).with_variable(host_variable(multi=False)).with_variable(instance_variable(multi=False))
        .with_variable(
            dash.QueryVariable("container").datasource(DS).query('label_values(nstap_container_info{host=~"$host", instance="$instance"}, container)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
        )
        .with_variable(ui_variable())
        .annotation(
            dash.AnnotationQuery().name("Anomalies").datasource(DS).enable(True).icon_color("red")
            .expr(f'max by (host, kind, cause) (nstap_anomaly_active{{{ONE}}}) == 1')
        )
        .link(dash.DashboardLink("Captures of this container").type("link").url(NSTAP_UI + "/ui/containers/$container").target_blank(True))
        .link(dash.DashboardLink("nstap dashboards").type("dashboards").tags(["nstap"]).as_dropdown(True).include_vars(True).keep_time(True))
    )
    d = d.with_row(dash.Row("Interfaces (both veth ends)"))
    d = d.with_panel(graph(
        "Traffic", "Bytes per second received (+) and sent by each interface: side=container inside, side=host the host end of the veth.", "Bps",
        query(f"sum by (host, interface, side) (rate(nstap_interface_receive_bytes_total{{{ONE}}}[{RATE}]))", "rx {{interface}} ({{side}})"),
        query(f"sum by (host, interface, side) (rate(nstap_interface_transmit_bytes_total{{{ONE}}}[{RATE}]))", "tx {{interface}} ({{side}})", "B"),
    ))
    d = d.with_panel(graph(
        "Drops and errors", "Packets dropped or in error per second, on either end of the veth.", "pps",
        query(f"sum by (host, interface, side) (rate(nstap_interface_receive_drops_total{{{ONE}}}[{RATE}]))", "rx drops {{interface}} ({{side}})"),
        query(f"sum by (host, interface, side) (rate(nstap_interface_transmit_drops_total{{{ONE}}}[{RATE}]))", "tx drops {{interface}} ({{side}})", "B"),
        query(f"sum by (host, interface, side) (rate(nstap_interface_receive_errors_total{{{ONE}}}[{RATE}]) "
              f"+ rate(nstap_interface_transmit_errors_total{{{ONE}}}[{RATE}]))", "errors {{interface}} ({{side}})", "C"),
    ))
    d = d.with_row(dash.Row("Protocols"))
    d = d.with_panel(graph(
        "TCP segments", "Segments per second received, sent and retransmitted.", "ops",
        query(f"rate(nstap_tcp_segments_received_total{{{ONE}}}[{RATE}])", "received"),
        query(f"rate(nstap_tcp_segments_sent_total{{{ONE}}}[{RATE}])", "sent", "B"),
        query(f"rate(nstap_tcp_retransmitted_segments_total{{{ONE}}}[{RATE}])", "retransmitted", "C"),
        width=8,
    ))
    d = d.with_panel(graph(
        "TCP connections and resets", "Connections opened, failed, reset, and resets sent, per second.", "ops",
        query(f"rate(nstap_tcp_active_opens_total{{{ONE}}}[{RATE}])", "active opens"),
        query(f"rate(nstap_tcp_passive_opens_total{{{ONE}}}[{RATE}])", "passive opens", "B"),
        query(f"rate(nstap_tcp_attempt_fails_total{{{ONE}}}[{RATE}])", "attempts failed", "C"),
        query(f"rate(nstap_tcp_resets_sent_total{{{ONE}}}[{RATE}])", "resets sent", "D"),
        query(f"rate(nstap_tcp_established_resets_total{{{ONE}}}[{RATE}])", "established reset", "E"),
        width=8,
    ))
    d = d.with_panel(graph(
        "UDP and IP", "Datagrams per second, UDP errors and IP discards.", "ops",
        query(f"rate(nstap_udp_received_datagrams_total{{{ONE}}}[{RATE}])", "udp received"),
        query(f"rate(nstap_udp_sent_datagrams_total{{{ONE}}}[{RATE}])", "udp sent", "B"),
        query(f"rate(nstap_udp_receive_buffer_errors_total{{{ONE}}}[{RATE}]) + rate(nstap_udp_no_port_datagrams_total{{{ONE}}}[{RATE}])",
              "udp buffer errors + no port", "C"),
        query(f"rate(nstap_ip_receive_discards_total{{{ONE}}}[{RATE}]) + rate(nstap_ip_send_discards_total{{{ONE}}}[{RATE}])", "ip discards", "D"),
        width=8,
    ))
    d = d.with_panel(graph(
        "Sockets by state", "The container's sockets, by protocol and state.", "short",
        query(f"sum by (host, protocol, state) (nstap_sockets{{{ONE}}})", "{{protocol}} {{state}}"),
    ))
    d = d.with_panel(graph(
        "Accept queues", "Connections waiting to be accepted per listening port, against the queue's limit; overflows per second.", "short",
        query(f"nstap_tcp_listen_queue_length{{{ONE}}}", "queued :{{port}}"),
        query(f"nstap_tcp_listen_queue_limit{{{ONE}}}", "limit :{{port}}", "B"),
        query(f"rate(nstap_tcp_listen_overflows_total{{{ONE}}}[{RATE}])", "overflows/s", "C"),
    ))
    d = d.with_row(dash.Row("Drops, NAT and firewall"))
    d = d.with_panel(graph(
        "Kernel drop reasons", "Packets the kernel dropped in the container's namespace per second, by the kernel's reason (eBPF).", "pps",
        query(f"sum by (host, reason) (rate(nstap_kernel_drops_total{{{ONE}}}[{RATE}]))", "{{reason}}"),
    ))
    d = d.with_panel(graph(
        "Firewall drops", "Packets per second matched by the DROP/REJECT rules of the container's own firewall.", "pps",
        query(f"sum by (host, table, chain, target, rule) (rate(nstap_firewall_rule_packets_total{{{ONE}}}[{RATE}]))", "{{chain}}: {{rule}}"),
    ))
    d = d.with_panel(listing(
        "Published ports", "The container's published ports and whether the NAT rules reach it (ok, missing, stale, shadowed).",
        table_query(f"nstap_nat_port_forward_info{{{ONE}}} == 1"), hide=("Value", "instance", "container", "container_id", "runtime"), width=12,
    ))
    d = d.with_panel(graph(
        "New connections through NAT, and conntrack", "New connections per second through each published port; the container's conntrack entries.", "short",
        query(f"sum by (host, protocol, host_ip, host_port) (rate(nstap_nat_port_forward_new_connections_total{{{ONE}}}[{RATE}]))", "new/s {{host_ip}}:{{host_port}}"),
        query(f"sum by (host, protocol, state) (nstap_container_conntrack_entries{{{ONE}}})", "conntrack {{protocol}} {{state}}", "B"),
        width=12,
    ))
    d = d.with_row(dash.Row("DNS"))
    d = d.with_panel(graph(
        "DNS lookups by outcome", "DNS lookups the container made per second, by the answer's rcode (timeout: no answer came).", "ops",
        query(f"sum by (host, rcode) (rate(nstap_dns_requests_total{{{ONE}}}[{RATE}]))", "{{rcode}}"),
        width=8,
    ))
    d = d.with_panel(graph(
        "DNS failure ratio", "Share of the container's DNS lookups that failed: every answer but NOERROR (NXDOMAIN, SERVFAIL, REFUSED, other) "
        "and the lookups no answer came to (timeout).", "percentunit",
        query(f'(sum by (host) (rate(nstap_dns_requests_total{{{ONE}, rcode!="NOERROR"}}[{RATE}])) '
              f"or 0 * sum by (host) (rate(nstap_dns_requests_total{{{ONE}}}[{RATE}]))) "
              f"/ sum by (host) (rate(nstap_dns_requests_total{{{ONE}}}[{RATE}]))", "failed"),
        width=8,
    ))
    d = d.with_panel(graph(
        "DNS lookup latency", "How long the container's answered DNS lookups waited for their answer (p50, p95, p99); timeouts are not in it.", "s",
        query(f"histogram_quantile(0.5, sum by (host, le) (rate(nstap_dns_request_duration_seconds_bucket{{{ONE}}}[{RATE}])))", "p50"),
        query(f"histogram_quantile(0.95, sum by (host, le) (rate(nstap_dns_request_duration_seconds_bucket{{{ONE}}}[{RATE}])))", "p95", "B"),
        query(f"histogram_quantile(0.99, sum by (host, le) (rate(nstap_dns_request_duration_seconds_bucket{{{ONE}}}[{RATE}])))", "p99", "C"),
        width=8,
    ))
    d = d.with_row(dash.Row("Anomalies and captures"))
    d = d.with_panel(graph(
        "Anomalies", "1 while an anomaly of a kind is going on (also drawn as annotations on every panel).", "short",
        query(f"max by (host, kind, cause) (nstap_anomaly_active{{{ONE}}})", "{{kind}} (cause: {{cause}})"),
        width=8,
    ))
    d = d.with_panel(listing(
        "Captures", "The container's latest captures (why, how they ended, when each started); click one for its capture page.",
        table_query(f"nstap_capture_info{{{ONE}}} * 1000"), hide=("instance", "container", "container_id", "runtime"), width=16,
        links=[dash.DashboardLink("Open capture ${__data.fields.capture_id}").url(NSTAP_UI + "/ui/captures/${__data.fields.capture_id}")],
    ).unit("dateTimeAsIso"))
    return d


DASHBOARDS = {"nstap-host.json": host_overview, "nstap-container.json": container_drill_down}


def render() -> dict[str, str]:
    """Every dashboard's JSON text, by file name."""
    out = {}
    for name, build in DASHBOARDS.items():
        model = build().build()
        out[name] = json.dumps(model, cls=JSONEncoder, sort_keys=True, indent=2) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing them")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date (run make dashboards): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
