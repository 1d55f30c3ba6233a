"""The connection quota and the handshake guard with plain values: no sockets. The
transport the guard sees is a small double recording what the guard does to it; the
guard against real sockets is tested in tests/test_handshake_deadline.py, the quota in
tests/test_connection_limits.py."""

from __future__ import annotations

import asyncio
from typing import Any

from appchat.protocol.models import Principal, Role
from appchat.transport.guard import HandshakeGuard
from appchat.transport.quota import ConnectionQuota, quota_key


def principal(role: Role, subject_id: int, sid: int, *, bound: bool) -> Principal:
    kind = "admin" if role is Role.STAFF else "request"
    return Principal(
        sid=sid,
        role=role,
        application_id=None if role is Role.STAFF else subject_id,
        bound=bound,
        exp=0.0,
        subject=f"{kind}:{subject_id}",
    )


def test_the_quota_key_is_what_the_token_proves() -> None:
    assert quota_key(principal(Role.STAFF, 1, 1, bound=True)) == "admin:1/sid:1"
    assert quota_key(principal(Role.CUSTOMER, 100, 7, bound=True)) == "request:100/sid:7"
    # A customer token naming no participant: every such token of the application shares
    # one allowance, whatever sid the query claims.
    unbound = {quota_key(principal(Role.CUSTOMER, 100, sid, bound=False)) for sid in (1, 2)}
    assert unbound == {"request:100"}


def test_the_quota_counts_per_key_and_refuses_beyond_the_limit() -> None:
    quota = ConnectionQuota(2)
    assert quota.take("a") and quota.take("a")
    assert not quota.take("a")  # refused, and not counted
    assert quota.count("a") == 2
    assert quota.take("b") and quota.count("b") == 1  # another identity is untouched
    quota.give_back("a")
    assert quota.count("a") == 1 and quota.take("a") and not quota.take("a")
    for _ in range(2):
        quota.give_back("a")
    assert quota.count("a") == 0
    assert quota.take("a") and quota.take("a")  # a key given back whole starts afresh


class Transport:
    """What the guard calls on a transport, recorded; ``aborted`` is awaitable."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.aborted = asyncio.Event()
        self.protocol: Any = None

    def get_extra_info(self, name: str) -> Any:
        return (self.host, 40000) if name == "peername" else None

    def abort(self) -> None:
        self.aborted.set()

    def is_closing(self) -> bool:
        return self.aborted.is_set()

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


class Inner(asyncio.Protocol):
    """aiohttp's protocol as the guard sees it: what reached it."""

    def __init__(self) -> None:
        self.made = False
        self.data = b""
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def guarded(timeout: float = 60.0, max_pending: int = 10) -> tuple[HandshakeGuard, list[str]]:
    drops: list[str] = []
    guard = HandshakeGuard(timeout=timeout, max_pending=max_pending, on_drop=drops.append)
    guard.serve(Inner)
    return guard, drops


def connect(guard: HandshakeGuard, host: str = "10.0.0.1") -> tuple[Any, Transport]:
    protocol: Any = guard()
    transport = Transport(host)
    protocol.connection_made(transport)
    return protocol, transport


async def test_the_guard_forwards_and_steps_aside_once_a_request_arrives() -> None:
    guard, drops = guarded()
    protocol, transport = connect(guard)
    assert protocol.inner.made and guard.pending == 1
    protocol.data_received(b"GET / HTTP/1.1\r\n")
    assert protocol.inner.data == b"GET / HTTP/1.1\r\n"
    guard.passed(transport)  # type: ignore[arg-type]
    assert guard.pending == 0 and transport.protocol is protocol.inner
    assert protocol._deadline is None  # no deadline left to fire
    guard.close()  # a connection through the guard is the app's to end, not the guard's
    assert not transport.aborted.is_set() and drops == []


async def test_one_more_waiting_connection_than_the_cap_ends_the_oldest() -> None:
    guard, drops = guarded(max_pending=2)
    (_, first), (_, second), (_, third) = (connect(guard, f"10.0.0.{n}") for n in (1, 2, 3))
    assert first.aborted.is_set()
    assert not second.aborted.is_set() and not third.aborted.is_set()
    assert guard.pending == 2
    assert drops == ["more than 2 connections without a request"]


async def test_a_connection_without_a_request_is_ended_at_its_deadline() -> None:
    guard, drops = guarded(timeout=0.01)
    protocol, transport = connect(guard)
    await asyncio.wait_for(transport.aborted.wait(), 10)
    assert guard.pending == 0 and drops == ["no complete request within 0.01 s"]
    protocol.connection_lost(None)  # the transport reports the abort: forgotten, passed on
    assert protocol.inner.lost and guard.pending == 0


async def test_a_connection_that_goes_away_by_itself_is_forgotten() -> None:
    guard, drops = guarded()
    protocol, transport = connect(guard)
    protocol.connection_lost(None)
    assert guard.pending == 0 and protocol._deadline is None and protocol.inner.lost
    assert not transport.aborted.is_set() and drops == []


async def test_shutdown_ends_the_waiting_and_every_later_connection() -> None:
    guard, drops = guarded()
    (_, early), (_, other) = connect(guard), connect(guard, "10.0.0.2")
    guard.close()
    assert early.aborted.is_set() and other.aborted.is_set() and guard.pending == 0
    late_protocol, late = connect(guard)  # accepted just before the listener closed
    assert late.aborted.is_set() and late_protocol.inner.made and guard.pending == 0
    assert drops == []  # shutdown is no drop: nothing counted or logged as one
