#!/usr/bin/env python3
"""Draws bench/sampling.png from bench_sampling.py's results: CPU per container-sample (the daemon
with its children, the daemon's process alone) next to the lower bound measured in the same runs,
and RSS against the memory goal, both against the number of containers.

bench_sampling.py calls it with its own run's results when it covers several sizes. Alone, it
takes the newest result of each size of one variant from the JSON lines file:

    .venv/bin/python bench/plot_sampling.py                       # bench/results/sampling.jsonl -> bench/sampling.png
    .venv/bin/python bench/plot_sampling.py --run 20250101T120000-1234
    .venv/bin/python bench/plot_sampling.py --variant child-ehash=1024 --out /tmp/ehash.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMORY_BASE_MIB, MEMORY_PER_CONTAINER_KIB = 100, 100  # as in bench_sampling.py


def newest_per_size(lines: list[dict], variant: str, run_id: str | None) -> list[dict]:
    """The newest result of each size (of one run, when given) among those of ``variant``."""
    chosen: dict[int, dict] = {}
    for result in lines:
        if result.get("variant", "default") != variant or (run_id and result.get("run_id") != run_id):
            continue
        if result["containers"] not in chosen or result["time"] >= chosen[result["containers"]]["time"]:
            chosen[result["containers"]] = result
    return [chosen[n] for n in sorted(chosen)]


def plot(results: list[dict], out: Path) -> None:
    """Two panels, against containers: CPU per container-sample with the lower bound, and RSS with the goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["containers"])
    n = [r["containers"] for r in results]
    fig, (cpu, mem) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)

    every = [r["cpu_ms_per_container_sample"] * 1000 for r in results]
    cpu.plot(n, every, "o-", color="C0", label="nstap: daemon + children (cgroup)")
    process = [r["cpu_ms_per_container_sample_process"] * 1000 for r in results]
    cpu.plot(n, process, "o--", color="C0", alpha=0.5, label="nstap: daemon process only")
    bounded = [(r["containers"], r["lower_bound_ms"] * 1000) for r in results if r.get("lower_bound_ms")]
    if bounded:
        cpu.plot([b[0] for b in bounded], [b[1] for b in bounded], "s-", color="C2", label="lower bound (nslimit), same run")
    paced = [(r["containers"], r["paced_bound_ms"] * 1000) for r in results if r.get("paced_bound_ms")]
    if paced:
        cpu.plot([b[0] for b in paced], [b[1] for b in paced], "s--", color="C2", alpha=0.6, label="the same reads once a second (nspaced)")
    floor = [(r["containers"], r["floor_ms"] * 1000) for r in results if r.get("floor_ms")]
    if floor:
        cpu.plot([b[0] for b in floor], [b[1] for b in floor], "^:", color="C4", label="floor: the daemon's reads in C + all outside its loop")
    goal = [(r["containers"], r["lower_bound_ms"] * 1000 * 1.6) for r in results if r.get("lower_bound_ms")]
    if goal:
        cpu.plot([b[0] for b in goal], [b[1] for b in goal], ":", color="C3", label="goal: 1.6 × nslimit")
    for r, y in zip(results, every, strict=True):
        if r.get("multiple_of_lower_bound"):
            label = f"×{r['multiple_of_lower_bound']:.1f}"
            cpu.annotate(label, (r["containers"], y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    cpu.set_title("CPU per container-sample (1 s interval)")
    cpu.set_xlabel("containers")
    cpu.set_ylabel("µs")
    cpu.set_ylim(bottom=0, top=max(every) * 1.3)

    mem.plot(n, [r["rss_total_mib"] for r in results], "o-", color="C1", label="nstap: daemon + children")
    mem.plot(n, [r["rss_mib"] for r in results], "o--", color="C1", alpha=0.5, label="nstap: daemon")
    span = [0, max(n) * 1.05]
    goal = [MEMORY_BASE_MIB + MEMORY_PER_CONTAINER_KIB * x / 1024 for x in span]
    mem.plot(span, goal, ":", color="C3", label="goal: 100 MiB + 100 KiB per container")
    mem.set_title("RSS at the end of the window")
    mem.set_xlabel("containers")
    mem.set_ylabel("MiB")
    goal_top = MEMORY_BASE_MIB + MEMORY_PER_CONTAINER_KIB * max(n) / 1024
    mem.set_ylim(bottom=0, top=max(goal_top, *(r["rss_total_mib"] for r in results)) * 1.2)

    for ax in (cpu, mem):
        ax.set_xlim(0, max(n) * 1.05)
        ax.set_xticks(n)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    first = results[0]
    fig.suptitle(
        f"nstap sampling cost, busybox httpd containers with 1 HTTP request/s each, scraped every {first.get('scrape_every_s', 15):g} s "
        f"({first.get('cpus')} CPUs, {first.get('kernel')}, {first.get('git')})",
        fontsize=9,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/sampling.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/sampling.png")
    parser.add_argument("--variant", default="default", help="the results of which variant (bench_sampling.py's options)")
    parser.add_argument("--run", help="the results of one run id only")
    args = parser.parse_args()
    lines = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    results = newest_per_size(lines, args.variant, args.run)
    if not results:
        raise SystemExit(f"no results of variant {args.variant!r} in {args.results}")
    plot(results, args.out)
    print(f"{args.out}: {', '.join(str(r['containers']) for r in results)} containers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
