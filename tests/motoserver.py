"""A local S3-compatible server for tests: moto's ``moto_server`` in a child process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .backends import free_port, reachable
from .support import wait_until

CREDENTIALS = {
    "aws_access_key_id": "appchat-test",
    "aws_secret_access_key": "appchat-test-secret",
    "region_name": "us-east-1",
}
ENV = {
    "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
    "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
    "AWS_DEFAULT_REGION": CREDENTIALS["region_name"],
}


def moto_server_command() -> str:
    beside = Path(sys.executable).parent / "moto_server"
    found = str(beside) if beside.exists() else shutil.which("moto_server")
    if found is None:
        message = "moto_server is not installed (pip install 'moto[server]')"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI requires it")
        pytest.skip(f"SKIPPED LOUDLY: {message}")
    return found


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto_server on a free loopback port; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [moto_server_command(), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: reachable("127.0.0.1", port) or proc.poll() is not None, timeout=30)
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"appchat-test-{uuid.uuid4().hex[:12]}"
    client: Any = boto3.client("s3", endpoint_url=endpoint, **CREDENTIALS)
    try:
        client.create_bucket(Bucket=name)
    finally:
        client.close()
    return name
