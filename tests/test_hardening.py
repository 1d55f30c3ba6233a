"""Keys and rotation, TLS, Origin allow-list, connection limits, slow consumers, liveness."""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import signal
import socket
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import ClientConnection, connect

from .support import (
    SECRET,
    InProcessServer,
    Server,
    ServerProcess,
    client,
    eventually,
    status,
    subprotocols,
    token,
)


def pem_private(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def signed(key: bytes, algorithm: str, kid: str | None = None, **claims: object) -> str:
    payload = {"admin_id": 1, "exp": int(time.time()) + 600, **claims}
    headers = {"kid": kid} if kid else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


async def status_of(srv: Server, tok: str, sid: int = 1, **kw: object) -> int:
    return await status(srv, sid, tok, **kw)


async def test_public_keys_and_rotation_by_kid(tmp_path: Path) -> None:
    old, new = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in "ab")
    es = ec.generate_private_key(ec.SECP256R1())
    for name, key in (("old", old), ("new", new), ("es", es)):
        (tmp_path / f"{name}.pem").write_bytes(pem_public(key))
    srv = InProcessServer(
        tmp_path / "k.db",
        "--jwt-public-key",
        f"old={tmp_path / 'old.pem'}",
        "--jwt-public-key",
        f"new={tmp_path / 'new.pem'}",
        env={"APPCHAT_JWT_PUBLIC_KEY": str(tmp_path / "es.pem")},
    ).start()
    try:
        old_pem, new_pem, es_pem = pem_private(old), pem_private(new), pem_private(es)
        assert await status_of(srv, signed(old_pem, "RS256", "old")) == 101
        assert await status_of(srv, signed(new_pem, "RS256", "new")) == 101
        assert await status_of(srv, signed(es_pem, "ES256")) == 101
        assert await status_of(srv, token(admin_id=1)) == 101  # the HS256 secret too
        assert await status_of(srv, signed(old_pem, "RS256", "new")) == 401  # wrong key
        assert await status_of(srv, signed(old_pem, "RS256", "gone")) == 401  # unknown kid
        assert await status_of(srv, signed(old_pem, "RS256")) == 401  # no kid: not tried
        hs_as_old = signed(SECRET.encode(), "HS256", "old")
        assert await status_of(srv, hs_as_old) == 401  # alg must match the key
        assert await status_of(srv, signed(old_pem, "RS256", "old", exp=1)) == 401
    finally:
        srv.stop()


async def test_public_keys_alone_need_no_secret(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "es.pem").write_bytes(pem_public(key))
    srv = InProcessServer(
        tmp_path / "p.db", "--jwt-public-key", str(tmp_path / "es.pem"), secret=None
    )
    srv.env.pop("APPCHAT_JWT_SECRET", None)
    srv.start()
    try:
        assert await status_of(srv, signed(pem_private(key), "ES256")) == 101
        assert await status_of(srv, token(admin_id=1)) == 401
    finally:
        srv.stop()


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(pem_private(key))
    return cert_path, key_path


async def test_tls_serves_wss(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    srv = InProcessServer(tmp_path / "t.db", "--tls-cert", str(cert), "--tls-key", str(key)).start()
    try:
        assert srv.scheme == "wss"
        ctx = ssl.create_default_context(cafile=str(cert))
        async with client(srv, 1, token(admin_id=1), ssl=ctx) as c:
            await c.ok("Event.AddConversation", {"application_id": 1})
        untrusted = ssl.create_default_context()
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(
                srv.url(1),
                subprotocols=subprotocols(token(admin_id=1)),
                ssl=untrusted,
            )
        https = srv.http("/healthz").replace("http:", "https:")
        assert (
            await asyncio.to_thread(lambda: urllib.request.urlopen(https, context=ctx).status)
            == 200
        )
    finally:
        srv.stop()


async def test_origin_allow_list(tmp_path: Path) -> None:
    srv = InProcessServer(
        tmp_path / "o.db",
        "--allowed-origins",
        "https://app.example",
        "--allowed-origins",
        "http://127.0.0.1:3000",
    ).start()
    try:
        tok = token(admin_id=1)
        assert await status_of(srv, tok, origin="https://app.example") == 101
        assert await status_of(srv, tok, origin="http://127.0.0.1:3000") == 101
        assert await status_of(srv, tok, origin="https://evil.example") == 403
        assert await status_of(srv, tok) == 101  # no Origin: not a browser
    finally:
        srv.stop()


async def test_connection_limits(tmp_path: Path) -> None:
    srv = InProcessServer(
        tmp_path / "l.db", "--max-connections", "3", "--max-connections-per-user", "2"
    ).start()
    try:
        async with client(srv, 1, token(admin_id=1)), client(srv, 1, token(admin_id=1)):
            assert await status_of(srv, token(admin_id=1)) == 429
            async with client(srv, 2, token(admin_id=2)):
                assert await status_of(srv, token(admin_id=3), sid=3) == 503
        assert await status_of(srv, token(admin_id=1)) == 101  # freed again
    finally:
        srv.stop()


def metric(srv: Server, name: str) -> float:
    with urllib.request.urlopen(srv.http("/metrics"), timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def incompressible() -> str:
    """About 3.9 KB that permessage-deflate cannot shrink."""
    return base64.b64encode(os.urandom(2900)).decode()


async def store_messages(srv: Server, app: int, count: int) -> None:
    async with client(srv, 1, token(admin_id=1)) as s:
        await s.ok("Event.AddConversation", {"application_id": app})
        for _ in range(count):
            await s.ok(
                "Event.SendMessage", {"session_channel": str(app), "content": incompressible()}
            )


async def non_reader(srv: Server, sid: int, **kwargs: Any) -> ClientConnection:
    """A client that stops reading: a tiny receive buffer and nobody calling recv."""
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return await connect(
        srv.url(sid),
        subprotocols=subprotocols(token(admin_id=sid)),
        sock=sock,
        max_queue=1,
        ping_interval=None,
        **kwargs,
    )


async def test_slow_consumer_is_dropped_and_never_delays_others(tmp_path: Path) -> None:
    srv = InProcessServer(
        tmp_path / "s.db", "--send-queue", "16", "--rate", "0", "--sqlite-synchronous", "NORMAL"
    ).start()
    try:
        slow = await non_reader(srv, 7)
        async with (
            client(srv, 1, token(admin_id=1)) as sender,
            client(srv, 8, token(admin_id=8)) as fast,
        ):
            await sender.ok("Event.AddConversation", {"application_id": 42})
            for sid in (7, 8):
                await sender.ok("Event.AddConversation", {"application_id": 42, "user_id": sid})
            count = 1500
            for _ in range(count):
                await sender.ok(
                    "Event.SendMessage", {"session_channel": "42", "content": incompressible()}
                )
            for _ in range(count):
                await fast.push("Event.ReceiveMessage")
            await eventually(
                lambda: metric(srv, 'appchat_disconnects_total{reason="slow consumer"}') >= 1,
                timeout=20,
                interval=0.2,
                what="the slow consumer dropped",
            )
            # the server let go of it (sender and fast remain), and serves the others on
            await eventually(
                lambda: metric(srv, "appchat_connections") == 2,
                timeout=15,
                interval=0.2,
                what="the slow consumer's connection gone",
            )
            sent = await sender.ok("Event.SendMessage", {"session_channel": "42", "content": "on"})
            assert (await fast.push("Event.ReceiveMessage"))["result"] == sent
        slow.transport.abort()
    finally:
        srv.stop()


def raw_handshake(port: int, sid: int, tok: str) -> socket.socket:
    """A WebSocket client that upgrades and then never answers anything (a dead phone)."""
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws?sid={sid} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: access_token, {tok}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"access_token" in head
    return sock


async def test_dead_connections_are_reaped_other_devices_unaffected(tmp_path: Path) -> None:
    srv = InProcessServer(tmp_path / "h.db", "--heartbeat", "1").start()
    try:
        async with (
            client(srv, 5, token(admin_id=5)) as alive,
            client(srv, 1, token(admin_id=1)) as sender,
        ):
            dead = raw_handshake(srv.port, 5, token(admin_id=5))
            try:
                await alive.ok("Event.AddConversation", {"application_id": 9})
                assert metric(srv, "appchat_connections") == 3
                await eventually(
                    lambda: metric(srv, "appchat_connections") == 2,
                    timeout=10,
                    interval=0.2,
                    what="the dead connection reaped",
                )
                await asyncio.sleep(2.5)  # several heartbeats: the live ones answer pongs
                await sender.ok("Event.SendMessage", {"session_channel": "9", "content": "hi"})
                assert (await alive.push("Event.ReceiveMessage"))["result"]["message"][
                    "content"
                ] == "hi"
                assert metric(srv, "appchat_connections") == 2
            finally:
                dead.close()
    finally:
        srv.stop()


def events_served(srv: Server, event: str) -> float:
    return metric(srv, f'appchat_events_total{{event="{event}",outcome="ok"}}')


async def test_a_client_that_reads_no_replies_is_not_read_either(tmp_path: Path) -> None:
    """Replies wait in a bounded buffer; while it is full the server takes no new request,
    so a client pipelining big requests without reading cannot grow the server's memory."""
    srv = InProcessServer(
        tmp_path / "b.db",
        "--rate",
        "0",
        "--send-buffer",
        "262144",
        "--sqlite-synchronous",
        "NORMAL",
    ).start()
    try:
        await store_messages(srv, 3, 100)
        greedy = await non_reader(srv, 2, compression=None)
        try:
            request = '{"name":"Event.GetMessageList","args":{"session_channel":"3","limit":100}}'
            for _ in range(200):  # about 80 MB of replies if all were produced
                await greedy.send(request)
            await asyncio.sleep(3)
            served = await asyncio.to_thread(events_served, srv, "Event.GetMessageList")
            assert served < 60, served  # what the socket buffers took, then no more
            async with client(srv, 1, token(admin_id=1)) as other:  # others are served
                await other.ok("Event.GetUnreadInfo", {})
        finally:
            greedy.transport.abort()
    finally:
        await asyncio.to_thread(srv.stop)  # this loop ends greedy's socket meanwhile


async def test_sigterm_finishes_although_a_client_reads_nothing(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "q.db", "--rate", "0").start()
    try:
        await store_messages(srv, 4, 50)
        stuck = await non_reader(srv, 2, compression=None)
        request = '{"name":"Event.GetMessageList","args":{"session_channel":"4","limit":50}}'
        for _ in range(60):
            await stuck.send(request)
        await asyncio.sleep(1)
        assert srv.proc is not None
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(srv.proc.wait, 30)
        assert code == 0
        assert time.monotonic() - started < 15
        stuck.transport.abort()
    finally:
        srv.stop()
