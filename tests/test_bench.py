"""`make bench` runs end to end (on a tiny load: the figures themselves live in docs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_make_bench_runs_end_to_end_on_a_tiny_load(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.fail("make is required (it runs the two commands of a fresh clone)")
    out = subprocess.run(
        ["make", "-s", "bench", f"BENCH_ARGS=--tiny --out {tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "benchmarks.md").read_text()
    for server in ("appchat", "relay", "socketio"):
        assert f"| {server} |" in report
    assert "ratio to the bare relay" in report and "GetUnreadInfo" in report
    for plot in ("bench-throughput.png", "bench-latency.png", "bench-memory.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bench:" in out.stderr  # the progress bar
