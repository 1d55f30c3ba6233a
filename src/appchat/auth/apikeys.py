"""API keys of the server API: several, named, revocable by editing a file.

Keys come from ``--api-key`` (``[NAME:]KEY``, repeatable) and from ``--api-keys-file``
(one ``KEY`` or ``NAME KEY`` a line). The file is checked on every request with one
``stat``: when it changed it is read again, so deleting a line revokes that key at once,
without a restart. A key is compared in constant time; callers learn only its name.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..protocol.errors import ConfigError

log = logging.getLogger(__name__)

MIN_KEY_LEN = 32  # characters: `python -c 'import secrets; print(secrets.token_urlsafe(32))'`
MAX_KEY_LEN = 512
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
KEY = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: fits an HTTP header
# A file changed less than this long before it was read may change again within the same
# mtime tick (coarse file systems): such a reading is not trusted, the file is read again.
RACY_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str  # what logs show; never the key
    digest: bytes  # SHA-256 of the key: compared in constant time, whatever its length


def key_name(key: str) -> str:
    """The name of a key given without one: a short fingerprint, never the key itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def make_key(name: str | None, key: str, where: str) -> ApiKey:
    if not KEY.match(key) or not MIN_KEY_LEN <= len(key) <= MAX_KEY_LEN:
        raise ConfigError(
            f"{where}: an API key is {MIN_KEY_LEN} to {MAX_KEY_LEN} printable ASCII characters "
            "without spaces (make one with `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`)"
        )
    if name is not None and not NAME.match(name):
        raise ConfigError(f"{where}: a key name is 1 to 64 of A-Z a-z 0-9 _ . -")
    return ApiKey(name or key_name(key), hashlib.sha256(key.encode()).digest())


def parse_key_spec(spec: str) -> ApiKey:
    """``--api-key [NAME:]KEY``: a key containing ``:`` needs a name before it."""
    name, sep, key = spec.partition(":")
    if not sep or not NAME.match(name):
        name, key = "", spec
    return make_key(name or None, key.strip(), "--api-key")


def parse_keys_file(text: str, path: str) -> tuple[list[ApiKey], list[str]]:
    """The keys of a keys file and the problems of the lines that were skipped.

    ``#`` starts a comment line; blank lines are ignored."""
    keys: list[ApiKey] = []
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{path}, line {number}"
        try:
            if len(parts) == 1:
                keys.append(make_key(None, parts[0], where))
            elif len(parts) == 2:
                keys.append(make_key(parts[0], parts[1], where))
            else:
                raise ConfigError(f"{where}: expected `KEY` or `NAME KEY`")
        except ConfigError as exc:
            problems.append(str(exc))
    return keys, problems


class ApiKeys:
    """The keys in force; ``check`` names the key presented, or returns ``None``."""

    def __init__(
        self,
        static: Iterable[ApiKey] = (),
        path: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._static = list(static)
        self._path = path
        self._clock = clock
        self._from_file: list[ApiKey] = []
        self._seen: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) last read
        self._trusted = False  # that reading was not racy
        if path is not None:
            self._load(first=True)

    @property
    def configured(self) -> bool:
        """Any key source given: without one the server API is off."""
        return bool(self._static) or self._path is not None

    def check(self, presented: str) -> str | None:
        """The name of the key ``presented`` is, else ``None`` (constant time per key)."""
        if self._path is not None:
            self._refresh()
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for key in (*self._static, *self._from_file):
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key.name
        return found

    def _refresh(self) -> None:
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except OSError:
            if self._seen is not None or self._from_file:
                log.warning("API keys file %s is gone: its keys are refused", self._path)
            self._from_file, self._seen = [], None
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._seen or not self._trusted:
            self._load(first=False)

    def _load(self, *, first: bool) -> None:
        assert self._path is not None
        try:
            with open(self._path, encoding="utf-8") as f:
                st = os.fstat(f.fileno())
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            if first:
                raise ConfigError(f"cannot read --api-keys-file: {exc}") from exc
            log.warning("cannot read the API keys file %s: its keys are refused", self._path)
            self._from_file, self._seen = [], None
            return
        keys, problems = parse_keys_file(text, self._path)
        if problems and first:
            raise ConfigError(problems[0])
        for problem in problems:
            log.warning("API key skipped: %s", problem)
        names = [k.name for k in keys]
        if not first and names != [k.name for k in self._from_file]:
            log.info("API keys file read again: %d keys (%s)", len(keys), ", ".join(names))
        self._from_file = keys
        self._seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        self._trusted = self._clock() - st.st_mtime_ns / 1e9 >= RACY_SECONDS
