"""Blob storage for uploads: one small interface, local disk by default, S3 when asked."""

from __future__ import annotations

import re
from typing import Protocol

from ..protocol.errors import ConfigError

KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}){0,7}")


class BlobStore(Protocol):
    """Immutable byte strings by key (``[A-Za-z0-9._-]`` segments joined by ``/``, no
    segment starting with a dot).

    ``put`` is atomic: a reader sees the whole blob or none of it. Faults of the storage
    are raised as :class:`appchat.protocol.errors.Unavailable`; a key that is not well formed as
    ``ValueError`` (a programming error: keys are made by the server).
    """

    async def open(self) -> None:
        """Check the storage can be used (create the directory, reach the bucket)."""

    async def close(self) -> None: ...

    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes | None:
        """The blob, or ``None`` if there is none under ``key``."""

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None:
        """Remove the blob; nothing happens if there is none."""

    async def listing(self, prefix: str) -> list[tuple[str, float]]:
        """Every blob whose key starts with ``prefix`` (a whole first segment and its
        ``/``, or ``""`` for all), with when it was written (seconds since the epoch)."""


def check_key(key: str) -> str:
    if not KEY.fullmatch(key):
        raise ValueError(f"not a blob key: {key[:200]!r}")
    return key


def open_blob_store(
    directory: str, *, s3_url: str | None = None, s3_endpoint: str | None = None
) -> BlobStore:
    """The local directory ``directory``, or the bucket of ``s3_url`` (``s3://BUCKET[/PREFIX]``)
    when it is given; ``s3_endpoint`` points at an S3-compatible server instead of AWS."""
    if s3_url:
        bucket, prefix = parse_s3_url(s3_url)
        try:
            from .s3 import S3BlobStore
        except ImportError as exc:
            raise ConfigError("--upload-s3 needs boto3: pip install 'appchat[s3]'") from exc
        return S3BlobStore(bucket, prefix=prefix, endpoint_url=s3_endpoint or None)
    from .local import LocalBlobStore

    return LocalBlobStore(directory)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``."""
    scheme, sep, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme != "s3" or not sep or not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ConfigError(f"bad --upload-s3 {url!r}: expected s3://BUCKET or s3://BUCKET/PREFIX")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""
