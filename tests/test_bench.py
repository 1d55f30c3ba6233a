"""`make bench` runs end to end (on a tiny load: the figures themselves live in docs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .support import run_checked


def run_script(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a bench script (``python bench/NAME.py …``), checked."""
    return run_checked([sys.executable, *argv])


@pytest.mark.timeout(300)
def test_make_bench_runs_end_to_end_on_a_tiny_load(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.fail("make is required (it runs the two commands of a fresh clone)")
    out = run_checked(["make", "-s", "bench", f"BENCH_ARGS=--tiny --out {tmp_path}"])
    report = (tmp_path / "benchmarks.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    for server in ("appchat", "durable", "relay", "socketio"):
        # a throughput row, latency rows after saturation and on a fresh server, memory
        assert sum(row.startswith(f"| {server} |") for row in rows) == 4, server
        assert f"| {server} | after saturation | 100 |" in report
        assert f"| {server} | fresh server | 100 |" in report
    assert "| appchat+inbox10 |" in report  # the desk on: 10 inbox subscribers, throughput only
    assert "every subscriber read one per stored message" in report
    assert report.count("stored): yes.") == 1
    assert "ratio to the bare relay" in report and "ratio to the durable relay" in report
    assert "GetUnreadInfo" in report
    for plot in ("bench-throughput.png", "bench-latency.png", "bench-memory.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bench:" in out.stderr  # the progress bar


@pytest.mark.timeout(300)
def test_desk_bench_runs_end_to_end_on_a_tiny_load() -> None:
    """bench/desk.py --tiny: the baseline checked out and served, then inbox subscribers
    that must each read one ConversationUpdated per stored message (else it exits 1)."""
    out = run_script("bench/desk.py", "--tiny")
    rows = {line.split(" | ")[0]: line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert "| appchat@110e219" in rows and "| appchat, 0 subscribers" in rows
    for n in (3, 10):
        assert rows[f"| appchat, {n} subscribers"].endswith(" yes |")  # delivery checked
    assert "With no subscriber, a message costs" in out.stdout
    assert "desk:" in out.stderr  # the progress bar


def test_retention_bench_purges_exactly_the_old_messages_on_a_tiny_load(tmp_path: Path) -> None:
    """bench/retention.py --tiny: a server with --retention-days purges the seeded old
    messages under SendMessage load, leaves the recent ones and exact counters, and the
    figures come out for both servers and every phase."""
    out = run_script("bench/retention.py", "--tiny", "--json", str(tmp_path / "retention.json"))
    result = json.loads((tmp_path / "retention.json").read_text())
    (run,) = result["runs"]
    check = run["check"]
    assert check["old_left"] == 0
    assert check["seeded_left"] == check["recent_seeded"] > 0  # the recent ones only
    assert check["conversations_left"] == check["conversations_kept"] > 0
    assert check["orphan_participants"] == 0
    assert check["wrong_message_counts"] == check["wrong_read_counters"] == 0
    assert run["purge_s"] > 0 and run["errors"] == 0
    for server in ("retention", "reference"):
        assert run[server]["during"]["n"] > 0 and run[server]["after"]["n"] > 0
    assert (
        "| --retention-days 30 | during |" in out.stdout and "| reference | during |" in out.stdout
    )


@pytest.mark.timeout(300)
def test_threads_bench_splits_the_cpu_by_thread_on_a_tiny_load() -> None:
    """bench/threads.py: a row per server, the event loop and the writer thread both
    spending CPU on the messages (and adding up to no more than the whole process)."""
    out = run_script("bench/threads.py", "--rate", "200", "--duration", "2", "--rounds", "1")
    rows = {line.split(" | ")[0]: line for line in out.stdout.splitlines() if line.startswith("| ")}
    for server in ("| appchat", "| durable"):
        cells = rows[server].strip("| ").split(" | ")
        whole = float(cells[2].removesuffix(" µs"))
        loop, writer, rest = (float(cell.split(" ")[0]) for cell in cells[3:])
        assert loop > 0 and writer > 0, rows[server]
        assert loop + writer + rest <= whole * 1.05 + 1, rows[server]


@pytest.mark.timeout(300)
def test_hops_bench_notes_every_hop_of_every_message_on_a_tiny_load() -> None:
    """bench/hops.py patches the server's internals to time each hop: every message sent
    must come back with all of them noted (a rename inside appchat would break it)."""
    out = run_script("bench/hops.py", "--rate", "100", "--duration", "2", "--pairs", "10")
    first = out.stdout.splitlines()[0]  # "N messages at 100/s: ..."
    sent = int(first.split()[0])
    assert sent > 100, first
    assert f"{sent} with every hop noted" in out.stdout
    for hop in ("sent -> read", "batch -> commit", "pushed -> arrived"):
        assert hop in out.stdout
    commits = next(line for line in out.stdout.splitlines() if line.startswith("commit: "))
    assert int(commits.split()[1].rstrip(",").replace(",", "")) > 0, commits


@pytest.mark.timeout(300)
def test_idle_memory_bench_splits_what_a_connection_holds_by_file() -> None:
    """bench/idle_memory.py: the traced server's allocations per idle connection, by file;
    the WebSocket library and appchat's transport both hold some."""
    out = run_script("bench/idle_memory.py", "--connections", "100", "--base", "20")
    head = next(line for line in out.stdout.splitlines() if "KiB per connection traced" in line)
    assert float(head.split(": ")[1].split()[0]) > 1, head
    files = [line.split(" | ")[0] for line in out.stdout.splitlines() if line.startswith("| ")]
    assert any("aiohttp/" in f for f in files), files
    assert any("appchat/transport/ws.py" in f for f in files), files


@pytest.mark.timeout(300)
def test_writer_bench_measures_the_store_with_and_without_an_index() -> None:
    """bench/writer.py: the writer thread's CPU per message, with every index and
    without the one named, each from messages really stored."""
    out = run_script(
        "bench/writer.py",
        *("--duration", "0.5", "--warmup", "0.2", "--rounds", "1"),
        *("--without", "messages_client_msg_id"),
    )
    rows = {line.split(" | ")[0]: line for line in out.stdout.splitlines() if line.startswith("| ")}
    for variant in ("| all indexes", "| without messages_client_msg_id"):
        cells = rows[variant].strip("| ").split(" | ")
        assert float(cells[1].replace(",", "")) > 0, rows[variant]  # msg/s
        assert float(cells[2].removesuffix(" µs")) > 0, rows[variant]  # CPU per message


def test_a_reference_that_delivered_nothing_in_a_run_gives_that_run_no_ratio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A smoke run on a busy machine can see a reference server deliver nothing in its
    short window: that run has no ratio (the table says "-"), where the report used to end
    in a division by zero."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import suite

    args = suite.parse_args(["--parts", "throughput", "--servers", "appchat", "durable"])
    run = {"msg_s": 900.0, "cpu_us": 50.0, "errors": 0, "srv_cpu": 90.0, "gen_cpu": 30.0}
    results: dict[str, Any] = {
        "throughput": {"appchat": [run, run], "durable": [{**run, "msg_s": 0.0}, run]},
        "latency": {},
        "fresh": {},
        "memory": {},
        "unread": [],
        "cluster": {suite.ONE_NODE: []},
        "workers": {1: [], 2: []},
    }
    s = suite.summarise(args, results)
    assert s["throughput"]["appchat"]["ratio_durable"] == 1.0  # the run that had one
    results["throughput"]["durable"] = [{**run, "msg_s": 0.0}] * 2
    s = suite.summarise(args, results)
    assert suite.ratio_cell("appchat", s["throughput"]["appchat"], "durable") == "-"
    # the same for two nodes against one, and --workers 2 against 1
    nothing = {"msg_s": 0.0, "cpu_us": 0.0, "db_cpu_us": 0.0, "redis_cpu_us": 0.0}
    some = {"msg_s": 800.0, "cpu_us": 60.0, "db_cpu_us": 20.0, "redis_cpu_us": 5.0}
    results["cluster"] = {suite.ONE_NODE: [nothing], suite.two_nodes(None): [some]}
    results["workers"] = {1: [nothing], 2: [some]}
    text = suite.report(args, suite.summarise(args, results))
    assert "Ratio two nodes / one node: **-**" in text, text
    assert "Ratio 2 workers / 1 worker: **-**" in text, text
    assert "nan" not in text, text


def test_each_appchat_of_a_run_gets_its_row_with_inbox_subscribers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--inbox N`` measures this checkout and each ``--baseline`` with N subscribers (a
    before/after of the desk's cost), none of the reference servers; 0 measures none."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import suite

    args = suite.parse_args(["--servers", "appchat", "durable", "--inbox", "10"])
    args.servers.insert(0, "appchat@abc123")  # as main() adds a --baseline
    assert suite.inbox_kinds(args) == {
        "appchat@abc123": "appchat@abc123+inbox10",
        "appchat": "appchat+inbox10",
    }
    assert suite.inbox_kinds(suite.parse_args(["--inbox", "0"])) == {}
    assert suite.inbox_kinds(suite.parse_args(["--parts", "latency"])) == {}


@pytest.mark.timeout(300)
def test_changes_bench_times_the_reads_of_changes_on_a_tiny_history() -> None:
    """bench/changes.py: the time of a page of changes since a revision, for each
    position of the revision, each from reads that returned what changed after it."""
    out = run_script("bench/changes.py", *("--messages", "300", "--calls", "3", "--rounds", "1"))
    (row,) = [line for line in out.stdout.splitlines() if line.startswith("| this checkout |")]
    cells = row.strip("| ").split(" | ")[1:]
    assert len(cells) == 4 and all(float(c.removesuffix(" ms")) > 0 for c in cells), row
