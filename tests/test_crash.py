"""Crash safety: kill -9 or SIGTERM mid-load; every acknowledged message is stored once."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from websockets.exceptions import ConnectionClosed

from .support import Client, ServerProcess, client, token

CLIENTS, PER_CLIENT, WINDOW = 4, 150, 8


async def _send_all(c: Client, app: int, prefix: str, acked: dict[str, int]) -> None:
    """Pipeline SendMessage with client_msg_ids until done or the connection dies."""
    pending: set[asyncio.Task[dict[str, object]]] = set()

    async def send(i: int) -> dict[str, object]:
        cmid = f"{prefix}-{i}"
        reply = await c.call(
            "Event.SendMessage",
            {"session_channel": str(app), "content": cmid, "client_msg_id": cmid},
        )
        if reply["ok"]:
            acked[cmid] = reply["result"]["message"]["id"]
        return reply

    def reap(tasks: set[asyncio.Task[dict[str, object]]]) -> None:
        failures = [e for e in (t.exception() for t in tasks) if e is not None]
        if failures:
            raise failures[0]

    try:
        for i in range(PER_CLIENT):
            pending.add(asyncio.create_task(send(i)))
            if len(pending) >= WINDOW:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                reap(done)
        await asyncio.gather(*pending)
    except (ConnectionError, ConnectionClosed, TimeoutError):
        for t in pending:
            t.cancel()
        # the connection died: the rest fail the same way; collect them quietly
        await asyncio.gather(*pending, return_exceptions=True)


async def _load_then(srv: ServerProcess, app: int, sig: int, after: int) -> dict[str, int]:
    acked: dict[str, int] = {}
    async with client(srv, 1, token(admin_id=1)) as s:
        await s.ok("Event.AddConversation", {"application_id": app})

    async def stop_when_loaded() -> None:
        while len(acked) < after:  # noqa: ASYNC110 - polling a plain dict the senders fill
            await asyncio.sleep(0.005)
        assert srv.proc is not None
        srv.proc.send_signal(sig)

    async def one(k: int) -> None:
        try:
            async with client(srv, 10 + k, token(admin_id=10 + k)) as c:
                await _send_all(c, app, f"c{k}", acked)
        except (ConnectionError, ConnectionClosed, OSError):
            pass

    stopper = asyncio.create_task(stop_when_loaded())
    await asyncio.gather(*(one(k) for k in range(CLIENTS)))
    await stopper
    return acked


async def _stored(c: Client, app: int) -> list[dict[str, object]]:
    stored: list[dict[str, object]] = []
    cursor = 0
    while True:
        page = await c.ok(
            "Event.GetMessageList", {"session_channel": str(app), "after_id": cursor, "limit": 500}
        )
        stored += page["Messages"]
        if not page["has_more"]:
            return stored
        cursor = stored[-1]["id"]  # type: ignore[assignment]  # an id: the page's items are typed as objects


async def _verify_after_restart(
    srv: ServerProcess, app: int, acked: dict[str, int], *, all_stored_acked: bool = False
) -> None:
    srv.start()
    try:
        if all_stored_acked:
            # a graceful stop finished what it was doing and sent every reply first
            async with client(srv, 1, token(admin_id=1)) as s:
                before = {str(m["content"]): m["id"] for m in await _stored(s, app)}
            assert before == acked
        # every client reconnects and retries everything it sent, same client_msg_id
        for k in range(CLIENTS):
            async with client(srv, 10 + k, token(admin_id=10 + k)) as c:
                for i in range(PER_CLIENT):
                    cmid = f"c{k}-{i}"
                    retry = await c.ok(
                        "Event.SendMessage",
                        {"session_channel": str(app), "content": cmid, "client_msg_id": cmid},
                    )
                    if cmid in acked:
                        assert retry["message"]["id"] == acked[cmid], cmid
        async with client(srv, 1, token(admin_id=1)) as s:
            stored = await _stored(s, app)
            contents = [m["content"] for m in stored]
            assert len(contents) == len(set(contents)) == CLIENTS * PER_CLIENT
            by_content = {m["content"]: m["id"] for m in stored}
            for cmid, message_id in acked.items():
                assert by_content[cmid] == message_id
    finally:
        assert srv.stop() == 0


async def test_kill_9_mid_load_loses_no_acknowledged_message(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "k.db", "--rate", "0").start()
    acked = await _load_then(srv, 1, signal.SIGKILL, after=200)
    assert srv.stop() == -signal.SIGKILL
    assert 200 <= len(acked) < CLIENTS * PER_CLIENT, "the kill came mid-load"
    await _verify_after_restart(srv, 1, acked)


async def test_sigterm_mid_load_drains_and_exits_0(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "t.db", "--rate", "0").start()
    acked = await _load_then(srv, 2, signal.SIGTERM, after=200)
    assert srv.stop() == 0
    assert len(acked) >= 200
    await _verify_after_restart(srv, 2, acked, all_stored_acked=True)
