#!/usr/bin/env python3
"""Benchmark: how often the daemon's event loop sleeps and wakes, and what that costs, as an A/B.

On a VM a thread that wakes from a sleep pays CPU for it, more the longer it slept (the CPU's
caches hold other work by then). This bench runs the daemon from this tree and, with ``--base
REV``, from a git worktree of REV, in turns (A, B, A, B, ...), beside the same N busybox httpd
containers that each get one HTTP request a second, and reports for each run over its window:

* the daemon's CPU (its threads' schedstat) per container-sample it took
  (``nstap_sample_duration_seconds_count``);
* the event loop's wake-ups per second: the voluntary context switches of the daemon's main
  thread (each sleep in ``epoll_wait`` ends in one; a wait for the GIL is one too);

then the medians, and the paired ratios B/A of the CPU (the runs of a pair are next to each
other in time: a VM whose speed drifts during the bench moves both).

    .venv/bin/python bench/bench_wakeups.py --base HEAD~3             # 50 containers, 5 pairs
    .venv/bin/python bench/bench_wakeups.py --containers 200 --rounds 3

The containers, the worktree and the daemons' data are removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_containers import ROOT, Traffic, container_ips, ensure_image, sh, start_container  # noqa: E402

PORT = 19980


def cpu_seconds(pid: int) -> float:
    """The CPU time of the process's threads now, in nanoseconds' precision: each thread's
    schedstat (utime+stime in /proc/PID/stat counts in 10 ms steps, 3 % of a 40 s window beside 50
    containers). The daemon's threads are all started with it and live as long (nstap.threads), so
    none is lost between two reads."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            continue
    return total / 1e9


def main_thread_switches(pid: int) -> int:
    for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise RuntimeError("no voluntary_ctxt_switches")


def samples_taken(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("nstap_sample_duration_seconds_count"))


def worktree(rev: str, where: Path) -> Path:
    """A checkout of ``rev`` with its compiled parts built from its own sources (by this tree's
    venv: Debian's gcc and Python headers, as ``make`` builds them)."""
    sh("git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(where), rev)
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=where, check=True, capture_output=True)
    return where / "daemon"


def one_run(daemon_path: Path, workdir: Path, warmup: float, window: float) -> dict:
    shutil.rmtree(workdir / "data", ignore_errors=True)
    config = workdir / "nstap.yaml"
    config.write_text(
        f"interval: 1\nmetrics_listen: 127.0.0.1:{PORT}\napi_listen: 127.0.0.1:{PORT + 1}\n"
        f"data_dir: {workdir}/data\nlog_format: json\nlog_level: warning\n"
    )
    env = dict(os.environ, PYTHONPATH=str(daemon_path))
    with open(workdir / "nstap.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "nstap", "run", "--config", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(warmup)
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited ({proc.returncode}): see {workdir / 'nstap.log'}")
        cpu0, switches0, samples0, t0 = cpu_seconds(proc.pid), main_thread_switches(proc.pid), samples_taken(PORT), time.monotonic()
        time.sleep(window)
        cpu1, switches1, samples1, t1 = cpu_seconds(proc.pid), main_thread_switches(proc.pid), samples_taken(PORT), time.monotonic()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    samples = samples1 - samples0
    return {
        "us_per_container_sample": (cpu1 - cpu0) / samples * 1e6 if samples else float("nan"),
        "wakeups_per_s": (switches1 - switches0) / (t1 - t0),
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each variant, in turns")
    parser.add_argument("--warmup", type=float, default=40.0, help="seconds from the daemon's start to its window")
    parser.add_argument("--window", type=float, default=45.0)
    parser.add_argument("--base", help="a git revision to compare this tree with (A: it, B: this tree)")
    args = parser.parse_args()

    image = ensure_image("docker")
    workdir = Path(tempfile.mkdtemp(prefix="nstap-wakeups-"))
    ids: list[str] = []
    traffic = None
    variants: list[tuple[str, Path]] = []
    try:
        if args.base:
            variants.append((args.base, worktree(args.base, workdir / "base")))
        variants.append(("this tree", ROOT / "daemon"))
        for i in range(args.containers):
            ids.append(start_container(image, f"nstap-wakeups-{os.getpid()}-{i}"))
        traffic = Traffic(container_ips(ids))
        traffic.start()
        runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
        for r in range(args.rounds):
            for name, path in variants:
                result = one_run(path, workdir, args.warmup, args.window)
                runs[name].append(result)
                print(f"[bench] round {r + 1} {name}: {result['us_per_container_sample']:.1f} µs per container-sample, "
                      f"{result['wakeups_per_s']:.1f} wake-ups/s ({result['samples']:.0f} samples)", flush=True)
        print()
        print(f"{args.containers} containers, {args.rounds} runs each, {args.window:g} s windows {args.warmup:g} s after start")
        print("| variant | CPU per container-sample (median, runs) | event-loop wake-ups per second (median) |")
        print("|---|---|---|")
        for name, results in runs.items():
            cpu = [x["us_per_container_sample"] for x in results]
            wakeups = statistics.median(x["wakeups_per_s"] for x in results)
            print(f"| {name} | {statistics.median(cpu):.1f} µs ({', '.join(f'{c:.0f}' for c in cpu)}) | {wakeups:.1f} |")
        if args.base:
            a, b = (runs[name] for name, _ in variants)
            ratios = [y["us_per_container_sample"] / x["us_per_container_sample"] for x, y in zip(a, b)]
            print(f"\nthis tree / {args.base}, paired: {', '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}")
        return 0
    finally:
        if traffic is not None:
            traffic.stop.set()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        if args.base:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(workdir / "base")], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
