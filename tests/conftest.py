from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real ``appchat serve`` process per test module, on a fresh SQLite file."""
    db: Path = tmp_path_factory.mktemp("db") / "appchat.db"
    proc = ServerProcess(db, "--rate", "0").start()
    yield proc
    proc.stop()
