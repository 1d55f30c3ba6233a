"""What hostile uploads cost one server process: each case on a fresh ``appchat serve``.

Cases (the files are made by ``tests/hostile_images.py``):

* ``gzip``: a multipart body sent with ``Content-Encoding: gzip``, 62 KiB that inflate to
  64 MB of preamble; a client probes ``GET /healthz`` every 10 ms meanwhile: the worst
  answer time is how long the event loop stood still.
* ``scans``: a progressive JPEG of 7000x7000 pixels and 1000 scans (190 KB).
* ``webp``: an animated WebP of 140 bytes on a 7000x7000 canvas; ``webp x2``: two at once.
* ``30 at once``: 30 uploads of an 8 MB JPEG at once from one token.

Printed per case: the answers, the server's CPU seconds, its resident memory before,
at its peak (VmHWM) and after (MiB), the worst ``/healthz`` time. Run from the project
folder (``PYTHONPATH=<other checkout>/src`` measures another version)::

    .venv/bin/python bench/uploads.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import multiprocessing as mp
import os
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from common import Server, source_version
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from appchat.auth.tokens import mint
from tests.hostile_images import animated_webp, gzip_preamble, many_scans_jpeg

SECRET = "bench-uploads-secret-" + "x" * 32
APP = 100


def memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (the peak) of ``pid``, in MiB."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
    return out


def form(data: bytes, *, boundary: str = "b0undary") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="application_id"\r\n\r\n'
            f"{APP}\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


def photo(size: int) -> bytes:
    """A JPEG of noise, about ``size`` bytes."""
    side = int((size / 1.57) ** 0.5)  # noise at quality 100: 1.57 bytes a pixel
    out = io.BytesIO()
    Image.effect_noise((side, side), 80).convert("RGB").save(out, "JPEG", quality=100)
    return out.getvalue()


Headers = Callable[[int], dict[str, str]]  # the headers of the n-th request of a case
Case = Callable[[aiohttp.ClientSession, str, Headers], Awaitable[list[int]]]


async def post(http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> int:
    try:
        async with http.post(url + "/upload", data=body, headers=headers) as r:
            await r.read()
            return r.status
    except aiohttp.ClientError:
        return 0  # the server closed the connection before answering


def case_gzip() -> Case:
    body = gzip_preamble("b0undary", 64_000_000)

    async def run(http: aiohttp.ClientSession, url: str, headers: Headers) -> list[int]:
        return [await post(http, url, body, {**headers(0), "Content-Encoding": "gzip"})]

    return run


def case_files(data: bytes, count: int, *, identities: int = 1) -> Case:
    """``count`` uploads of ``data`` at once, from ``identities`` staff members in turn."""
    body = form(data)

    async def run(http: aiohttp.ClientSession, url: str, headers: Headers) -> list[int]:
        sends = (post(http, url, body, headers(n % identities)) for n in range(count))
        return list(await asyncio.gather(*sends))

    return run


async def measure(name: str, case: Case, args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(
            ["--database", f"sqlite:///{tmp}/bench.db", "--upload-dir", f"{tmp}/files"],
            SECRET,
            name=name,
        ).start()
        try:
            url = f"http://127.0.0.1:{server.port}"
            tokens = [mint(SECRET.encode(), admin_id=n + 1, ttl=3600) for n in range(30)]

            def headers(n: int) -> dict[str, str]:
                return {
                    "Authorization": f"Bearer {tokens[n]}",
                    "Content-Type": "multipart/form-data; boundary=b0undary",
                }

            async with aiohttp.ClientSession() as http:
                await conversation(server.port, tokens[0])
                before = memory(server.pid)
                cpu = server.cpu_seconds()
                # The probe runs in a process of its own: this one is busy sending.
                stop, worst = mp.Event(), mp.Value("d", 0.0)
                prober = mp.Process(target=probe, args=(url + "/healthz", stop, worst))
                prober.start()
                await asyncio.sleep(0.2)
                statuses = await case(http, url, headers)
                await asyncio.sleep(0.2)
                stop.set()
                prober.join()
                cpu = server.cpu_seconds() - cpu
                await asyncio.sleep(args.settle)
                after = memory(server.pid)
        finally:
            server.stop()
    answers = ", ".join(f"{n}x {s}" for s, n in sorted(Counter(statuses).items()))
    return (
        f"| {name} | {answers} | {cpu:.2f} | {before['VmRSS']:.0f} | {after['VmHWM']:.0f} "
        f"| {after['VmRSS']:.0f} | {worst.value * 1000:.0f} |"
    )


def probe(url: str, stop: Any, worst: Any) -> None:
    """In a process of its own: ``GET url`` every 10 ms until ``stop``; the longest wait."""
    while not stop.is_set():
        start = time.perf_counter()
        # A refused or dropped probe (the guard ends connections the loop left waiting past
        # --handshake-timeout) counts with the time it waited.
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=600) as r:
            r.read()
        worst.value = max(worst.value, time.perf_counter() - start)
        time.sleep(0.01)


async def conversation(port: int, tok: str) -> None:
    """Application APP's conversation, made by a staff member over the WebSocket."""
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"ws://127.0.0.1:{port}/ws?sid=1", protocols=["access_token", tok]) as ws,
    ):
        await ws.send_json(
            {"name": "Event.AddConversation", "id": "1", "args": f'{{"application_id": {APP}}}'}
        )
        await ws.receive(timeout=10)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before 'after'")
    args = parser.parse_args()
    print(source_version(), "-", "PYTHONPATH=" + os.environ.get("PYTHONPATH", ""))
    big = photo(8_000_000)
    cases: list[tuple[str, Case]] = [
        ("gzip: 62 KiB -> 64 MB of preamble", case_gzip()),
        ("JPEG 7000x7000, 1000 scans", case_files(many_scans_jpeg(7000, 7000, 1000), 1)),
        ("animated WebP 7000x7000, 140 B", case_files(animated_webp(7000, 7000, 2), 1)),
        ("two such WebPs at once", case_files(animated_webp(7000, 7000, 2), 2)),
        ("30 uploads of an 8 MB JPEG at once, one token", case_files(big, 30)),
        ("the same from 30 staff tokens", case_files(big, 30, identities=30)),
    ]
    print("| case | answers | server CPU s | RSS before | peak | after (MiB) | worst /healthz ms |")
    print("|---|---|---|---|---|---|---|")
    for name, case in cases:
        print(await measure(name, case, args), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
