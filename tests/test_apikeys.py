"""API keys: their formats, names, and the keys file read again when it changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appchat.auth.apikeys import ApiKeys, key_name, parse_key_spec, parse_keys_file
from appchat.protocol.errors import ConfigError

from .support import SECRET, new_api_key
from .test_cli import appchat


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_key_specs_and_names() -> None:
    key = new_api_key()
    named = parse_key_spec(f"crm:{key}")
    unnamed = parse_key_spec(key)
    assert named.name == "crm"
    assert unnamed.name == key_name(key) and unnamed.name.startswith("key-")
    assert key not in unnamed.name
    assert named.digest == unnamed.digest
    with pytest.raises(ConfigError, match="32 to 512"):
        parse_key_spec("short")
    with pytest.raises(ConfigError, match="32 to 512"):
        parse_key_spec("crm:" + "x" * 10)
    with pytest.raises(ConfigError, match="32 to 512"):
        parse_key_spec("a key with spaces " + "x" * 32)


def test_keys_file_lines() -> None:
    a, b = new_api_key(), new_api_key()
    keys, problems = parse_keys_file(
        f"# comment\n\n{a}\n  backend {b}  \nbad name with spaces\nx short\n", "keys"
    )
    assert [k.name for k in keys] == [key_name(a), "backend"]
    assert len(problems) == 2
    assert problems[0].startswith("keys, line 5:")
    assert problems[1].startswith("keys, line 6:")


def test_check_names_the_key_and_refuses_others(tmp_path: Path) -> None:
    static, filed = new_api_key(), new_api_key()
    path = tmp_path / "keys"
    path.write_text(f"backend {filed}\n")
    keys = ApiKeys([parse_key_spec(f"ops:{static}")], str(path))
    assert keys.configured
    assert keys.check(static) == "ops"
    assert keys.check(filed) == "backend"
    for wrong in ("", filed + "x", filed[:-1], new_api_key(), "\udcff" + filed):
        assert keys.check(wrong) is None
    assert not ApiKeys().configured


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    a, b = new_api_key(), new_api_key()
    path = tmp_path / "keys"
    path.write_text(f"a {a}\nb {b}\n")
    old = 1_000_000_000
    os.utime(path, ns=(old * 10**9, old * 10**9))
    clock = Clock(old + 100.0)  # read long after it was written: the reading is trusted
    keys = ApiKeys([], str(path), clock=clock)
    assert keys.check(b) == "b"
    path.write_text(f"a {a}\n")  # b revoked
    assert keys.check(b) is None
    assert keys.check(a) == "a"
    path.write_text(f"a {a}\nthis line is broken\n")  # a bad line is skipped, not fatal
    assert keys.check(a) == "a"
    path.unlink()  # no file: no keys from it
    assert keys.check(a) is None
    path.write_text(f"b {b}\n")
    assert keys.check(b) == "b"


def test_a_file_changed_within_its_mtime_tick_is_not_missed(tmp_path: Path) -> None:
    """Same size, same mtime (a coarse file system): a reading made soon after the file's
    mtime is not trusted, so the next check reads it again."""
    a, b = new_api_key(), new_api_key()
    assert len(a) == len(b)
    path = tmp_path / "keys"
    stamp = 1_000_000_000 * 10**9
    path.write_text(f"k {a}\n")
    os.utime(path, ns=(stamp, stamp))
    clock = Clock(stamp / 1e9 + 0.5)
    keys = ApiKeys([], str(path), clock=clock)
    assert keys.check(a) == "k"
    path.write_text(f"k {b}\n")  # same size...
    os.utime(path, ns=(stamp, stamp))  # ...and the same mtime
    assert keys.check(a) is None
    assert keys.check(b) == "k"


def test_unreadable_or_bad_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read --api-keys-file"):
        ApiKeys([], str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_text("name short\n")
    with pytest.raises(ConfigError, match="line 1"):
        ApiKeys([], str(bad))


def test_serve_refuses_a_short_key_before_listening(tmp_path: Path) -> None:
    for env in ({"APPCHAT_API_KEY": f"ok:{new_api_key()},too-short"}, {}):
        args = () if env else ("--api-keys-file", str(tmp_path / "missing"))
        out = appchat(
            "serve", "--port", "0", *args, cwd=tmp_path, env={"APPCHAT_JWT_SECRET": SECRET, **env}
        )
        assert out.returncode == 2, out.stderr
        assert ("API key is 32 to 512" if env else "cannot read --api-keys-file") in out.stderr
        assert "listening" not in out.stdout
