"""Every benchmark docs/performance.md quotes still starts: its imports resolve and it prints its usage.
(A bench's figures come from running it for real: ``make bench*``; this only keeps them runnable.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

BENCHES = sorted(p.name for p in (ROOT / "bench").glob("bench_*.py"))


def test_the_benches_are_listed() -> None:
    assert {"bench_sampling.py", "bench_detect.py", "bench_cause.py", "bench_capture.py", "bench_nat.py"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_a_bench_starts(name: str) -> None:
    if name == "bench_containers.py":  # the benches' shared module, not a bench
        proc = subprocess.run([sys.executable, "-c", "import bench_containers"], cwd=ROOT / "bench", capture_output=True, text=True, timeout=60)
    else:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / name), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert name == "bench_containers.py" or "usage" in proc.stdout.lower()


@pytest.mark.parametrize("name", [b for b in BENCHES if b != "bench_containers.py"])
def test_the_performance_page_says_what_each_bench_measured(name: str) -> None:
    """Every benchmark is on docs/performance.md, which quotes its figures with its command."""
    assert name in (ROOT / "docs" / "performance.md").read_text(), f"{name} is not on docs/performance.md"
