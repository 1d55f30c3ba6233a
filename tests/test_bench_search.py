"""bench/search.py runs end to end on a tiny load (its figures live in docs/benchmarks.md)."""

from __future__ import annotations

import sys

import pytest

from .backends import PG_ADMIN, require
from .support import run_checked


@pytest.mark.timeout(240)
def test_search_bench_runs_on_a_tiny_load_on_both_engines() -> None:
    require("PostgreSQL", "127.0.0.1", 5432)
    out = run_checked([sys.executable, "bench/search.py", "--tiny", "--pg-admin", PG_ADMIN], 220)
    for engine in ("sqlite", "postgresql"):
        assert f"### {engine}" in out.stdout
    # Every planted word is found: the rare ones in each of their messages.
    assert out.stdout.count("| zanzibar | whole desk (staff) |") == 2
    for line in out.stdout.splitlines():
        if line.startswith(("| zanzibar |", "| щавель |")):
            assert line.endswith("| 3 |"), line
        if line.startswith(("| invoice | whole desk", "| счёт | whole desk")):
            assert line.endswith("| 20 |"), line
    assert out.stdout.count("| with the index |") == 2
    assert out.stdout.count("| index dropped |") == 2
