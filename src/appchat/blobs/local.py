"""Blobs as files under one directory; each written to a temporary file, then renamed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path

from ..protocol.errors import ConfigError, Unavailable
from . import check_key


class LocalBlobStore:
    """Files under ``root`` (created if need be). Every node that serves downloads must see
    the same directory: fine for ``--workers`` on one machine, a shared volume otherwise."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    async def open(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create --upload-dir {self.root}: {exc}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ConfigError(f"--upload-dir {self.root} is not writable")

    async def close(self) -> None:
        pass

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(_write_atomically, path, data)
        except OSError as exc:
            raise Unavailable(f"cannot store the upload: {exc.strerror or exc}") from exc

    async def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Unavailable(f"cannot read the upload: {exc.strerror or exc}") from exc

    async def exists(self, key: str) -> bool:
        # One stat: cheap enough to run on the event loop (SendMessage calls it).
        try:
            return self._path(key).is_file()
        except OSError as exc:
            raise Unavailable(f"cannot read the upload: {exc.strerror or exc}") from exc

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise Unavailable(f"cannot delete the upload: {exc.strerror or exc}") from exc

    async def listing(self, prefix: str) -> list[tuple[str, float]]:
        try:
            return await asyncio.to_thread(_walk, self.root, prefix)
        except OSError as exc:
            raise Unavailable(f"cannot list the uploads: {exc.strerror or exc}") from exc


def _walk(root: Path, prefix: str) -> list[tuple[str, float]]:
    """(key, mtime) of every file under ``root`` whose key starts with ``prefix``, leaving
    out files being written (their names start with a dot)."""
    top = root / prefix.rstrip("/") if prefix else root
    if not top.is_dir():
        return []
    found = []
    for folder, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            path = Path(folder) / name
            key = path.relative_to(root).as_posix()
            if key.startswith(prefix):
                found.append((key, path.stat().st_mtime))
    return found


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, rename it into place
    (readers never see half a file), then flush the directory (the name survives a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
