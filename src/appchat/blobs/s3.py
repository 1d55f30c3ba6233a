"""Blobs in an S3 bucket (AWS, or any S3-compatible server such as MinIO), through boto3.

boto3 is synchronous: every call runs in a worker thread. Credentials and region come from
boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``~/.aws``, an instance role …).
"""

from __future__ import annotations

import asyncio
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import HTTPError

from ..protocol.errors import Unavailable
from . import check_key

CLIENT_CONFIG = Config(
    connect_timeout=5,
    read_timeout=30,
    retries={"max_attempts": 3, "mode": "standard"},
)
MISSING = {"404", "NoSuchKey", "NotFound"}


class S3BlobStore:
    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        """``client_options`` go to ``boto3.client`` (credentials in tests, for example)."""
        self.bucket = bucket
        self.prefix = prefix
        options: dict[str, Any] = {"config": CLIENT_CONFIG, **(client_options or {})}
        if endpoint_url:
            options["endpoint_url"] = endpoint_url
        if "region_name" not in options and boto3.session.Session().region_name is None:
            options["region_name"] = "us-east-1"  # boto3 refuses to start without one
        self._options = options
        self._client: Any = None

    async def open(self) -> None:
        self._client = await asyncio.to_thread(boto3.client, "s3", **self._options)
        await self._call("reach the bucket", self._client.head_bucket, Bucket=self.bucket)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def _call(self, what: str, method: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(method, **kwargs)
        except ClientError as exc:
            if _code(exc) in MISSING:
                raise
            raise Unavailable(f"cannot {what} in S3: {_code(exc)}") from exc
        except BotoCoreError as exc:
            raise Unavailable(f"cannot {what} in S3: {type(exc).__name__}") from exc

    async def put(self, key: str, data: bytes) -> None:
        # A PUT is atomic in S3: readers see the old state or the whole new object.
        await self._call(
            "store the upload",
            self._client.put_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
        )

    async def get(self, key: str) -> bytes | None:
        try:
            reply = await self._call(
                "read the upload", self._client.get_object, Bucket=self.bucket, Key=self._key(key)
            )
        except ClientError:
            return None
        try:
            data: bytes = await asyncio.to_thread(reply["Body"].read)
        except (BotoCoreError, HTTPError, OSError) as exc:  # botocore streams raise urllib3's
            raise Unavailable(f"cannot read the upload from S3: {type(exc).__name__}") from exc
        return data

    async def exists(self, key: str) -> bool:
        try:
            await self._call(
                "look up the upload",
                self._client.head_object,
                Bucket=self.bucket,
                Key=self._key(key),
            )
        except ClientError:
            return False
        return True

    async def delete(self, key: str) -> None:
        await self._call(
            "delete the upload", self._client.delete_object, Bucket=self.bucket, Key=self._key(key)
        )

    async def listing(self, prefix: str) -> list[tuple[str, float]]:
        def walk() -> list[tuple[str, float]]:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            return [
                (item["Key"][len(self.prefix) :], item["LastModified"].timestamp())
                for page in pages
                for item in page.get("Contents", ())
            ]

        try:
            return await asyncio.to_thread(walk)
        except (ClientError, BotoCoreError) as exc:
            raise Unavailable(f"cannot list the uploads in S3: {type(exc).__name__}") from exc


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "error"))
