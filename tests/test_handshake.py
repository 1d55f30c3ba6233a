"""The handshake against a real server: 101 with ``access_token``, or 400/401 before upgrade."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from .support import (
    SECRET,
    Client,
    InProcessServer,
    Server,
    client,
    module_server,
    raw_token,
    status,
    token,
)

ORIGINAL_SHAPE = {"iss": "", "iat": None, "aud": "", "sub": "", "admin_id": "1"}

# A server in a child process, for the tests that read its log.
process = module_server("--rate", "0", process=True)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def refused(server: Server, query: str, protocols: list[str] | None) -> InvalidStatus:
    url = f"ws://127.0.0.1:{server.port}/ws{query}"
    with pytest.raises(InvalidStatus) as info:
        await connect(
            url, subprotocols=None if protocols is None else [Subprotocol(p) for p in protocols]
        )
    return info.value


def reason(exc: InvalidStatus) -> str:
    body = exc.response.body or b""
    text = body.decode()
    assert text.count("\n") <= 1, "the reason is one line"
    return text.strip()


async def test_accepts_and_selects_access_token(server: Server) -> None:
    async with client(server, 1, token(admin_id=1)) as c:
        assert c.ws.subprotocol == "access_token"
        result = await c.ok("Event.GetConversationList", {"user_id": 1})
        assert result == {"conversations": [], "has_more": False, "next_cursor": None}


async def test_accepts_the_originals_claim_shape(server: Server) -> None:
    claims = {**ORIGINAL_SHAPE, "exp": int(time.time()) + 600}
    tok = raw_token(claims)
    header = json.loads(base64.urlsafe_b64decode(tok.split(".")[0] + "=="))
    assert header["alg"] == "HS256"
    async with client(server, 1, tok) as c:
        assert c.ws.subprotocol == "access_token"
        assert (await c.ok("Event.GetUnreadInfo", {"user_id": 1}))["total"] == 0


async def test_originals_sid_beside_admin_id_is_refused_without_trust(
    server: Server,
) -> None:
    claims = {**ORIGINAL_SHAPE, "exp": int(time.time()) + 600}
    exc = await refused(server, "?sid=2", ["access_token", raw_token(claims)])
    assert exc.response.status_code == 401
    assert "does not match" in reason(exc)


@pytest.mark.parametrize(
    "sid", ["", "abc", "0", "-1", "1.5", "18446744073709551616", "9223372036854775808", "\uff11"]
)
async def test_bad_sid_is_400(server: Server, sid: str) -> None:
    exc = await refused(server, f"?sid={sid}", ["access_token", token(admin_id=1)])
    assert exc.response.status_code == 400
    assert "sid" in reason(exc)


async def test_missing_sid_is_400(server: Server) -> None:
    exc = await refused(server, "", ["access_token", token(admin_id=1)])
    assert exc.response.status_code == 400


def _rsa_pem() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def _bad_tokens() -> dict[str, list[str] | None]:
    exp = int(time.time()) + 600
    payload = b64(json.dumps({"admin_id": 1, "exp": exp}).encode())
    none_header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    private, public = _rsa_pem()
    return {
        "no subprotocols": None,
        "access_token alone": ["access_token"],
        "token without access_token": [token(admin_id=1)],
        "bad signature": ["access_token", raw_token({"admin_id": 1, "exp": exp}, "x" * 40)],
        "alg none": ["access_token", f"{none_header}.{payload}."],
        "HS512": ["access_token", raw_token({"admin_id": 1, "exp": exp}, algorithm="HS512")],
        "RS256": [
            "access_token",
            jwt_encode_rs256({"admin_id": 1, "exp": exp}, private),
        ],
        "HS256 keyed with an RSA public key": [
            "access_token",
            hs256_with_key({"admin_id": 1, "exp": exp}, public),
        ],
        "expired": ["access_token", raw_token({"admin_id": 1, "exp": int(time.time()) - 5})],
        "no exp": ["access_token", raw_token({"admin_id": 1})],
        "neither claim": ["access_token", raw_token({"exp": exp})],
        "both claims": ["access_token", raw_token({"admin_id": 1, "request_id": 5, "exp": exp})],
        "admin_id not an id": ["access_token", raw_token({"admin_id": "x", "exp": exp})],
        "garbage": ["access_token", "not.a.jwt"],
        "sid claim differs": ["access_token", token(request_id=100, sid=9)],
    }


def jwt_encode_rs256(payload: dict[str, object], private_pem: bytes) -> str:
    import jwt

    return jwt.encode(payload, private_pem, algorithm="RS256")


def hs256_with_key(payload: dict[str, object], key: bytes) -> str:
    import hashlib
    import hmac

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    signing_input = f"{header}.{body}".encode()
    signature = b64(hmac.new(key, signing_input, hashlib.sha256).digest())
    return f"{header}.{body}.{signature}"


BAD_TOKENS = _bad_tokens()


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_credentials_are_401(server: Server, case: str) -> None:
    sid = 2 if case == "sid claim differs" else 1
    exc = await refused(server, f"?sid={sid}", BAD_TOKENS[case])
    assert exc.response.status_code == 401, case
    assert reason(exc)


def test_plain_http_get_is_refused_with_a_reason(server: Server) -> None:
    request = urllib.request.Request(
        server.http("/ws?sid=1"),
        headers={"Sec-WebSocket-Protocol": f"access_token, {token(admin_id=1)}"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 400
    assert "WebSocket" in info.value.read().decode()


async def test_customer_without_participant_claim_takes_query_sid(server: Server) -> None:
    async with client(server, 77, token(request_id=300)) as c:
        conv = await c.ok("Event.AddConversation", {"user_id": 77, "application_id": 300})
        assert conv["session_channel"] == "300"


async def test_numeric_sub_claim_names_the_participant(server: Server) -> None:
    exp = int(time.time()) + 600
    tok = raw_token({"admin_id": 1, "sub": "5", "exp": exp})
    async with client(server, 5, tok) as c:
        assert (await c.ok("Event.GetConversationList", {}))["conversations"] == []
    exc = await refused(server, "?sid=1", ["access_token", tok])
    assert exc.response.status_code == 401


async def test_trust_query_sid_takes_the_sid_for_staff(tmp_path: object) -> None:
    from pathlib import Path

    srv = InProcessServer(Path(str(tmp_path)) / "t.db", "--trust-query-sid").start()
    try:
        claims = {**ORIGINAL_SHAPE, "exp": int(time.time()) + 600}
        async with client(srv, 2, raw_token(claims)) as c:
            me: Client = c
            conv = await me.ok("Event.AddConversation", {"application_id": 100})
            assert conv["application_id"] == 100
            listed = await me.ok("Event.GetConversationList", {"user_id": 2})
            assert [x["application_id"] for x in listed["conversations"]] == [100]
    finally:
        assert srv.stop() == 0


def test_secret_constant_is_long_enough() -> None:
    assert len(SECRET.encode()) >= 32


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_a_huge_time_claim_is_401_not_500(process: Server, claim: str) -> None:
    claims: dict[str, Any] = {"admin_id": 36, "exp": int(time.time()) + 600}
    claims[claim] = 10**400
    assert await status(process, 36, raw_token(claims)) == 401
    async with client(process, 36, token(admin_id=36)) as c:
        reply = await c.call("Event.RefreshToken", {"token": raw_token(claims)})
        assert reply["ok"] is False and reply["error"]["code"] == "unauthorized", reply
        await c.ok("Event.GetUnreadInfo", {})  # the connection stays up
    assert "OverflowError" not in process.output


@pytest.mark.parametrize("aud", [0, False, {}, [], "api", ["api"]])
async def test_only_an_absent_or_empty_audience_is_accepted(server: Server, aud: Any) -> None:
    exp = int(time.time()) + 600
    assert await status(server, 37, raw_token({"admin_id": 37, "exp": exp, "aud": aud})) == 401
    assert await status(server, 37, raw_token({"admin_id": 37, "exp": exp, "aud": ""})) == 101
    assert await status(server, 37, raw_token({"admin_id": 37, "exp": exp, "aud": None})) == 101
