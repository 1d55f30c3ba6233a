"""The BlobStore contract, run on every implementation: local disk and S3 (moto_server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from appchat.blobs import BlobStore, open_blob_store, parse_s3_url
from appchat.blobs.local import LocalBlobStore
from appchat.protocol.errors import ConfigError, Unavailable

from .backends import free_port
from .motoserver import CREDENTIALS, moto_server, new_bucket

Factory = Callable[[Path], BlobStore]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


def s3_store(endpoint: str, bucket: str, prefix: str = "") -> BlobStore:
    from appchat.blobs.s3 import S3BlobStore

    return S3BlobStore(bucket, prefix=prefix, endpoint_url=endpoint, client_options=CREDENTIALS)


@pytest.fixture(params=["local", "s3"])
async def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    store: BlobStore
    if request.param == "local":
        store = LocalBlobStore(tmp_path / "uploads")
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        store = s3_store(endpoint, new_bucket(endpoint), prefix="chat/")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_put_then_get_returns_the_same_bytes(blobs: BlobStore) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    await blobs.put("100/abc", data)
    assert await blobs.get("100/abc") == data
    assert await blobs.exists("100/abc")


async def test_a_missing_blob_is_none_and_does_not_exist(blobs: BlobStore) -> None:
    assert await blobs.get("100/missing") is None
    assert not await blobs.exists("100/missing")
    await blobs.put("100/present", b"x")
    assert not await blobs.exists("100")  # a prefix is no blob
    assert not await blobs.exists("100/present.thumb")


async def test_put_replaces_and_delete_removes(blobs: BlobStore) -> None:
    await blobs.put("7/a", b"first")
    await blobs.put("7/a", b"second")
    assert await blobs.get("7/a") == b"second"
    await blobs.delete("7/a")
    assert await blobs.get("7/a") is None
    assert not await blobs.exists("7/a")
    await blobs.delete("7/a")  # deleting nothing is fine


async def test_listing_names_every_blob_under_a_prefix_with_its_time(blobs: BlobStore) -> None:
    for key in ("10/a", "10/a.thumb", "100/b", "11/c"):
        await blobs.put(key, b"x")
    assert sorted(k for k, _t in await blobs.listing("10/")) == ["10/a", "10/a.thumb"]
    everything = await blobs.listing("")
    assert sorted(k for k, _t in everything) == ["10/a", "10/a.thumb", "100/b", "11/c"]
    assert all(abs(t - time.time()) < 600 for _k, t in everything)  # written just now
    assert await blobs.listing("12/") == []
    await blobs.delete("100/b")
    assert "100/b" not in [k for k, _t in await blobs.listing("")]


async def test_an_empty_blob_is_a_blob(blobs: BlobStore) -> None:
    await blobs.put("1/empty", b"")
    assert await blobs.exists("1/empty")
    assert await blobs.get("1/empty") == b""


async def test_concurrent_puts_keep_every_blob(blobs: BlobStore) -> None:
    await asyncio.gather(*(blobs.put(f"5/{i}", f"blob {i}".encode() * 100) for i in range(20)))
    got = await asyncio.gather(*(blobs.get(f"5/{i}") for i in range(20)))
    assert got == [f"blob {i}".encode() * 100 for i in range(20)]


@pytest.mark.parametrize(
    "key", ["", "../x", "a/../b", ".hidden", "a//b", "/abs", "a/", "sp ace", "a\\b", "é"]
)
async def test_keys_that_are_not_well_formed_are_refused(blobs: BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        await blobs.put(key, b"x")
    with pytest.raises(ValueError):
        await blobs.get(key)
    with pytest.raises(ValueError):
        await blobs.exists(key)


async def test_local_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "u")
    await store.open()
    for i in range(5):
        await store.put(f"9/{i}", b"data")
    assert sorted(p.name for p in (tmp_path / "u" / "9").iterdir()) == [str(i) for i in range(5)]


async def test_local_store_faults_are_unavailable(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "u")
    await store.open()
    (tmp_path / "u" / "3").write_text("a file where a directory must be")
    with pytest.raises(Unavailable):
        await store.put("3/x", b"data")


async def test_an_unreachable_s3_server_is_unavailable() -> None:
    store = s3_store(f"http://127.0.0.1:{free_port()}", "appchat-nowhere")
    with pytest.raises(Unavailable):
        await store.open()


async def test_s3_prefix_keeps_stores_apart(s3_endpoint: str) -> None:
    bucket = new_bucket(s3_endpoint)
    one, two = s3_store(s3_endpoint, bucket, "one/"), s3_store(s3_endpoint, bucket, "two/")
    await one.open()
    await two.open()
    try:
        await one.put("1/a", b"one")
        assert await two.get("1/a") is None
        assert await one.get("1/a") == b"one"
    finally:
        await one.close()
        await two.close()


def test_s3_urls() -> None:
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://my.bucket/a/b/") == ("my.bucket", "a/b/")
    for bad in ("bucket", "http://bucket", "s3://", "s3://UPPER", "s3://a"):
        with pytest.raises(ConfigError):
            parse_s3_url(bad)
    assert isinstance(open_blob_store("/tmp/x"), LocalBlobStore)
