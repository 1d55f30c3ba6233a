"""The server API over real HTTP: every route, its pushes on live WebSocket connections,
idempotent retries, API keys (revoked while the server runs), disconnects on two nodes,
and schemathesis against the OpenAPI document the server serves."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import hypothesis
import orjson
import pytest
import schemathesis
from schemathesis.checks import CheckFunction
from schemathesis.generation.case import Case
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance
from websockets.exceptions import InvalidStatus

from appchat.blobs.images import parse_reference

from .backends import ENGINES, REDIS_URL, postgres_database, require, unique_prefix
from .support import (
    MESSAGE_KEYS,
    RFC3339_UTC,
    InProcessServer,
    Server,
    ServerProcess,
    client,
    customer,
    new_api_key,
    staff,
    token,
)

MAX_CONTENT = 200  # the server's --max-content: small, so the limit is cheap to reach


class Keys:
    """The server's keys file and the keys the tests use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.backend = new_api_key()
        self.other = new_api_key()
        self.static = new_api_key()  # given with --api-key
        self.write({"backend": self.backend, "other": self.other})

    def write(self, keys: dict[str, str]) -> None:
        text = "# name key\n" + "".join(f"{name} {key}\n" for name, key in keys.items())
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.path)  # as an operator's editor or a config tool would


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys") / "api-keys")


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("db") / "appchat.db"
    proc = ServerProcess(
        db,
        "--rate",
        "0",
        "--max-content",
        str(MAX_CONTENT),
        "--api-keys-file",
        str(keys.path),
        "--api-key",
        f"static:{keys.static}",
    ).start()
    yield proc
    proc.stop()


class Api:
    """Requests to one server with one key; answers as (status, JSON body)."""

    def __init__(self, session: aiohttp.ClientSession, server: Server, key: str) -> None:
        self.session = session
        self.server = server
        self.key = key

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        key: str | None = None,
    ) -> tuple[int, Any]:
        sent = {"Authorization": f"Bearer {key or self.key}", **(headers or {})}
        async with self.session.request(
            method, self.server.http(path), json=json, data=data, params=params, headers=sent
        ) as resp:
            assert resp.content_type == "application/json", await resp.text()
            return resp.status, await resp.json()

    async def post(
        self, app: int, body: Any, *, idempotency_key: str | None = None
    ) -> tuple[int, Any]:
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        return await self.request(
            "POST", f"/api/conversations/{app}/messages", json=body, headers=headers
        )

    async def messages(self, app: int | str, **params: Any) -> tuple[int, Any]:
        return await self.request("GET", f"/api/conversations/{app}/messages", params=params)

    async def conversations(self, key: str | None = None, **params: Any) -> tuple[int, Any]:
        return await self.request("GET", "/api/conversations", params=params, key=key)

    async def disconnect(self, sid: int | str, **params: Any) -> tuple[int, Any]:
        return await self.request(
            "POST", f"/api/connections/{sid}/disconnect", params=params or None
        )


@pytest.fixture
def api(http: aiohttp.ClientSession, api_server: Server, keys: Keys) -> Api:
    return Api(http, api_server, keys.backend)


def error_code(status: int, body: Any, expected_status: int) -> str:
    assert status == expected_status, body
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    code: str = body["error"]["code"]
    return code


# --- POST /api/conversations/{application_id}/messages --------------------------------------


async def test_posted_message_is_pushed_to_customer_and_staff(api: Api, api_server: Server) -> None:
    app = 1001
    async with customer(api_server, app, 2001) as c, staff(api_server, 11) as s:
        await c.ok("Event.AddConversation", {"application_id": app})
        await s.ok("Event.AddConversation", {"application_id": app})
        first = await c.ok("Event.SendMessage", {"session_channel": str(app), "content": "help"})
        assert (await s.push("Event.ReceiveMessage"))["result"] == first

        status, body = await api.post(
            app, {"sender_id": 90, "content": "Your request is approved", "content_type": 1}
        )
        assert status == 201, body
        message = body["message"]
        assert set(MESSAGE_KEYS) <= set(message)
        assert message["id"] > first["message"]["id"]  # ordered after what came before
        assert message["sender_id"] == 90
        assert message["session_channel"] == str(app)
        assert message["content"] == "Your request is approved"
        assert RFC3339_UTC.match(message["create_at"])
        for conn in (c, s):
            assert (await conn.push("Event.ReceiveMessage"))["result"] == body

        # durable: answered after the commit, so a read at once sees it
        page = await c.ok("Event.GetMessageList", {"session_channel": str(app)})
        assert page["Messages"][-1] == message
        # the sender is now a staff participant: the customer has one unread message
        unread = await c.ok("Event.GetUnreadInfo")
        assert unread["total"] == 1


async def test_staff_sender_sees_its_own_posted_message_live(api: Api, api_server: Server) -> None:
    app = 1002
    async with staff(api_server, 12) as s:
        await s.ok("Event.AddConversation", {"application_id": app})
        status, body = await api.post(app, {"sender_id": 12, "content": "sent from the CRM"})
        assert status == 201, body
        # the posting backend is no connection of the sender: every one of them gets it
        assert (await s.push("Event.ReceiveMessage"))["result"] == body


async def test_idempotent_retry_returns_first_message_and_pushes_once(
    api: Api, api_server: Server
) -> None:
    app = 1003
    async with customer(api_server, app, 2003) as c:
        await c.ok("Event.AddConversation", {"application_id": app})
        status, first = await api.post(
            app, {"sender_id": 91, "content": "status: closed"}, idempotency_key="crm-7-closed"
        )
        assert status == 201, first
        assert first["message"]["client_msg_id"] == "crm-7-closed"
        assert (await c.push("Event.ReceiveMessage"))["result"] == first

        # the retry (even with another body) answers the first message, 200, and pushes nothing
        for body in (
            {"sender_id": 91, "content": "status: closed"},
            {"sender_id": 91, "content": "changed"},
        ):
            status, again = await api.post(app, body, idempotency_key="crm-7-closed")
            assert status == 200, again
            assert again == first
        # a new key is a new message; it is the very next push: the retries pushed nothing
        status, other = await api.post(
            app, {"sender_id": 91, "content": "reopened"}, idempotency_key="crm-7-reopened"
        )
        assert status == 201, other
        assert other["message"]["id"] > first["message"]["id"]
        assert (await c.push("Event.ReceiveMessage"))["result"] == other
        status, page = await api.messages(app)
        assert [m["content"] for m in page["messages"]] == ["status: closed", "reopened"]


async def test_post_creates_the_missing_conversation(api: Api, api_server: Server) -> None:
    app = 1004
    assert error_code(*await api.messages(app), 404) == "not_found"
    status, body = await api.post(app, {"sender_id": 92, "content": "We got your request"})
    assert status == 201, body
    status, listed = await api.conversations(user_id=92)
    assert status == 200
    assert [c["application_id"] for c in listed["conversations"]] == [app]
    # the customer who opens the chat later finds it
    async with customer(api_server, app, 2004) as c:
        await c.ok("Event.AddConversation", {"application_id": app})
        page = await c.ok("Event.GetMessageList", {"session_channel": str(app)})
        assert [m["content"] for m in page["Messages"]] == ["We got your request"]


ORIGINAL_IMAGES = ["https://cdn.example.com/a.png", "a.png"]  # what the original stored as sent


async def test_post_stores_an_image_of_the_backends_own_as_sent(api: Api) -> None:
    """As SendMessage: an image that is no upload reference is stored as sent by default."""
    app = 1101
    for content in ORIGINAL_IMAGES:
        status, body = await api.post(app, {"sender_id": 93, "content": content, "content_type": 2})
        assert status == 201, body
        assert (body["message"]["content"], body["message"]["content_type"]) == (content, 2)
    status, page = await api.messages(app)
    assert status == 200
    assert [m["content"] for m in page["messages"]] == ORIGINAL_IMAGES


async def test_post_with_uploads_only_refuses_other_images(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    key = new_api_key()
    strict = InProcessServer(
        tmp_path / "appchat.db", "--images", "uploads-only", "--api-key", key
    ).start()
    try:
        api = Api(http, strict, key)
        for content in ORIGINAL_IMAGES:
            body = {"sender_id": 93, "content": content, "content_type": 2}
            assert error_code(*await api.post(1007, body), 400) == "bad_request"
        status, _ = await api.messages(1007)
        assert status == 404  # refused before a conversation was made for it
    finally:
        strict.stop()


async def test_post_refuses_bad_requests_and_stores_nothing(api: Api, api_server: Server) -> None:
    app = 1005
    status, _ = await api.post(app, {"sender_id": 93, "content": "first"})
    assert status == 201
    bad_bodies: list[Any] = [
        {"content": "no sender"},
        {"sender_id": 93},
        {"sender_id": 93, "content": ""},
        {"sender_id": 93, "content": "x" * (MAX_CONTENT + 1)},
        {"sender_id": 93, "content": "nul \x00 inside"},
        {"sender_id": 93, "content": "hi", "content_type": 3},
        # an image reference must name an upload to this conversation (as SendMessage)
        {"sender_id": 93, "content": "/files/9999/" + "a" * 32, "content_type": 2},
        {"sender_id": 93, "content": f"/files/{app}/" + "a" * 32, "content_type": 2},
        {"sender_id": "93", "content": "a string id"},
        {"sender_id": True, "content": "a boolean id"},
        {"sender_id": 0, "content": "id zero"},
        {"sender_id": 2**63, "content": "id too big"},
        {"sender_id": 93, "content": "hi", "extra": 1},
        {"sender_id": 93, "content": 5},
        [1, 2],
        "text",
    ]
    for body in bad_bodies:
        assert error_code(*await api.post(app, body), 400) == "bad_request", body
    status, body = await api.request(
        "POST", f"/api/conversations/{app}/messages", data=b"{not json"
    )
    assert error_code(status, body, 400) == "bad_request"
    # An encoded body is refused unread (the server inflates no request body), not
    # mistaken for a malformed one.
    packed = gzip.compress(orjson.dumps({"sender_id": 93, "content": "zipped"}))
    for encoding, data in (("gzip", packed), ("deflate", packed), ("GZIP", packed)):
        status, body = await api.request(
            "POST",
            f"/api/conversations/{app}/messages",
            data=data,
            headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
        )
        assert error_code(status, body, 415) == "unsupported_type", encoding
    for path_id in ("0", "abc", str(2**63), "-5"):
        status, body = await api.request(
            "POST",
            f"/api/conversations/{path_id}/messages",
            json={"sender_id": 93, "content": "hi"},
        )
        assert error_code(status, body, 400) == "bad_request", path_id
    for idem in ("k" * 65,):
        status, body = await api.post(app, {"sender_id": 93, "content": "hi"}, idempotency_key=idem)
        assert error_code(status, body, 400) == "bad_request"
    # bigger than a WebSocket frame may be (--max-frame, 64 KiB by default)
    huge = b'{"sender_id": 93, "content": "' + b"x" * 70_000 + b'"}'
    status, body = await api.request("POST", f"/api/conversations/{app}/messages", data=huge)
    assert error_code(status, body, 413) == "bad_request"
    # the customer's participant id cannot be used: the server API posts as staff
    async with customer(api_server, app, 2005) as c:
        await c.ok("Event.AddConversation", {"application_id": app})
    assert error_code(*await api.post(app, {"sender_id": 2005, "content": "x"}), 403) == (
        "forbidden"
    )
    # a content of exactly the limit is fine
    status, body = await api.post(app, {"sender_id": 93, "content": "y" * MAX_CONTENT})
    assert status == 201, body
    status, page = await api.messages(app)
    assert [m["content"][:5] for m in page["messages"]] == ["first", "yyyyy"]


async def test_a_body_the_network_delivers_in_pieces_is_read_whole(
    api_server: Server, keys: Keys
) -> None:
    """A post whose body arrives in two TCP segments (as over a real network) is read
    whole, not cut at the first segment."""
    body = orjson.dumps({"sender_id": 93, "content": "z" * MAX_CONTENT})
    head = (
        f"POST /api/conversations/1007/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {keys.static}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", api_server.port)
    writer.write(head + body[:40])
    await writer.drain()
    await asyncio.sleep(0.2)  # pacing of the probe: the rest comes as a later segment
    writer.write(body[40:])
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 201 " in status_line, answer[:300]
    doc = orjson.loads(rest.partition(b"\r\n\r\n")[2])
    assert doc["message"]["content"] == "z" * MAX_CONTENT


# --- GET /api/conversations/{application_id}/messages ---------------------------------------


async def test_message_list_pages_like_get_message_list(api: Api) -> None:
    app = 1006
    ids = []
    for i in range(5):
        status, body = await api.post(app, {"sender_id": 94, "content": f"m{i}"})
        assert status == 201
        ids.append(body["message"]["id"])
    assert ids == sorted(ids)

    def got(page: Any) -> list[int]:
        return [m["id"] for m in page["messages"]]

    status, page = await api.messages(app, limit=2)
    assert status == 200
    assert got(page) == ids[3:] and page["has_more"] is True
    status, page = await api.messages(app, limit=2, before_id=ids[3])
    assert got(page) == ids[1:3] and page["has_more"] is True
    status, page = await api.messages(app, limit=2, before_id=ids[1])
    assert got(page) == ids[:1] and page["has_more"] is False
    status, page = await api.messages(app, limit=3, after_id=0)
    assert got(page) == ids[:3] and page["has_more"] is True
    status, page = await api.messages(app, after_id=ids[2])
    assert got(page) == ids[3:] and page["has_more"] is False
    status, page = await api.messages(app)  # the default page: the newest 50
    assert [m["id"] for m in page["messages"]] == ids and page["has_more"] is False

    for params in (
        {"before_id": 3, "after_id": 1},
        {"limit": 0},
        {"limit": 501},
        {"limit": "x"},
        {"before_id": -1},
        {"after_id": str(2**63)},
        {"befor_id": 3},  # misspelt: refused, not ignored
    ):
        assert error_code(*await api.messages(app, **params), 400) == "bad_request", params
    assert error_code(*await api.messages(999_999), 404) == "not_found"
    assert error_code(*await api.messages("abc"), 400) == "bad_request"


# --- GET /api/search -------------------------------------------------------------------------


async def test_search_finds_words_in_every_conversation_newest_first(api: Api) -> None:
    first = (await api.post(1201, {"sender_id": 94, "content": "Shipment delayed"}))[1]
    second = (await api.post(1202, {"sender_id": 94, "content": "shipment ARRIVED"}))[1]
    await api.post(1202, {"sender_id": 94, "content": "nothing to see"})

    def got(page: Any) -> list[int]:
        return [r["message"]["id"] for r in page["results"]]

    status, page = await api.request("GET", "/api/search", params={"q": "SHIPMENT"})
    assert status == 200
    assert got(page) == [second["message"]["id"], first["message"]["id"]]
    assert page["has_more"] is False and page["next_cursor"] is None
    status, page = await api.request("GET", "/api/search", params={"q": "shipment", "limit": 1})
    assert got(page) == [second["message"]["id"]] and page["has_more"] is True
    params = {"q": "shipment", "limit": 1, "cursor": page["next_cursor"]}
    status, page = await api.request("GET", "/api/search", params=params)
    assert got(page) == [first["message"]["id"]] and page["has_more"] is False
    params = {"q": "shipment", "session_channel": "1201"}
    status, page = await api.request("GET", "/api/search", params=params)
    assert got(page) == [first["message"]["id"]]
    for bad in ({"q": "?!"}, {}, {"q": "x", "limit": 51}, {"q": "x", "cursor": "a_1"}):
        status, body = await api.request("GET", "/api/search", params=bad)
        assert error_code(status, body, 400) == "bad_request", bad
    status, body = await api.request(
        "GET", "/api/search", params={"q": "x", "session_channel": "999999"}
    )
    assert error_code(status, body, 404) == "not_found"


# --- GET /api/conversations -----------------------------------------------------------------


async def test_conversation_list_pages_with_a_cursor(api: Api) -> None:
    apps = [1101, 1102, 1103]
    for app in apps:  # in this order: the last one has the newest activity
        status, _ = await api.post(app, {"sender_id": 95, "content": f"to {app}"})
        assert status == 201
    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"user_id": 95, "limit": 1}
        if cursor is not None:
            params["cursor"] = cursor
        status, page = await api.conversations(**params)
        assert status == 200, page
        seen += [c["application_id"] for c in page["conversations"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
        assert isinstance(cursor, str)
    assert seen == apps[::-1]

    # every conversation (no user_id), paged without repeats
    everything: list[int] = []
    cursor = None
    while True:
        params = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        status, page = await api.conversations(**params)
        assert status == 200, page
        everything += [c["id"] for c in page["conversations"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert len(everything) == len(set(everything))
    assert set(apps) <= {
        c["application_id"] for c in (await api.conversations(limit=1000))[1]["conversations"]
    }

    for params in (
        {"cursor": "nonsense"},
        {"cursor": "1_0"},
        {"limit": 1001},
        {"limit": 0},
        {"user_id": 0},
    ):
        assert error_code(*await api.conversations(**params), 400) == "bad_request", params


# --- PATCH /api/conversations/{application_id} (the desk) ---------------------------------


async def test_patch_sets_status_and_assignee_and_reaches_the_inbox(
    api: Api, api_server: Server
) -> None:
    app = 1211  # (an application no other test of this module uses)
    async with staff(api_server, 12) as agent:
        await agent.ok("Event.SubscribeInbox", {"filter": "all"})
        status, _ = await api.post(app, {"sender_id": 95, "content": "from the backend"})
        assert status == 201
        created = await agent.desk_push("Event.ConversationUpdated")
        assert created["result"]["conversation"]["application_id"] == app
        posted = await agent.desk_push("Event.ConversationUpdated")
        assert posted["result"]["conversation"]["last_message"]["content"] == "from the backend"

        status, body = await api.request(
            "PATCH", f"/api/conversations/{app}", json={"assignee_id": 12, "status": "resolved"}
        )
        assert status == 200, body
        conversation = body["conversation"]
        assert conversation["status"] == "resolved" and conversation["assignee_id"] == 12
        assert conversation["last_message"]["content"] == "from the backend"
        resolved = await agent.desk_push("Event.ConversationUpdated")
        assigned = await agent.desk_push("Event.ConversationUpdated")
        assert resolved["result"]["conversation"]["status"] == "resolved"
        assert assigned["result"]["conversation"] == conversation  # the last change: as replied
        assert conversation["rev"] == resolved["result"]["conversation"]["rev"] + 1

        status, body = await api.request(
            "PATCH",
            f"/api/conversations/{app}",
            json={"status": "snoozed", "snooze_until": "2031-05-01T10:00:00+02:00"},
        )
        assert status == 200, body
        assert body["conversation"]["snooze_until"] == "2031-05-01T08:00:00.000000Z"
        assert body["conversation"]["assignee_id"] == 12  # left out: kept
        status, body = await api.request("PATCH", f"/api/conversations/{app}", json={})
        assert status == 200 and body["conversation"]["status"] == "snoozed"

    status, page = await api.conversations(status="snoozed,resolved", assignee="12")
    assert status == 200, page
    assert [c["application_id"] for c in page["conversations"]] == [app]
    status, page = await api.conversations(status="snoozed", assignee="none")
    assert status == 200 and app not in [c["application_id"] for c in page["conversations"]]


@pytest.mark.parametrize(
    "body",
    [
        {"status": "snoozed"},  # without its time
        {"status": "open", "snooze_until": "2031-05-01T10:00:00Z"},
        {"snooze_until": "2031-05-01T10:00:00Z"},
        {"status": "snoozed", "snooze_until": "soon"},
        {"status": "closed"},
        {"assignee_id": 0},
        {"assignee_id": "12"},
        {"owner": 12},
        [],
    ],
)
async def test_patch_refuses_bad_bodies_and_changes_nothing(api: Api, body: Any) -> None:
    app = 1202
    assert (await api.post(app, {"sender_id": 95, "content": "x"}))[0] in (200, 201)
    before = await api.conversations(user_id=95, limit=1000)
    status, reply = await api.request("PATCH", f"/api/conversations/{app}", json=body)
    assert error_code(status, reply, 400) == "bad_request", body
    assert await api.conversations(user_id=95, limit=1000) == before


async def test_patch_of_a_missing_conversation_is_404(api: Api) -> None:
    status, reply = await api.request("PATCH", "/api/conversations/987654", json={})
    assert error_code(status, reply, 404) == "not_found"
    for params in ({"status": "gone"}, {"assignee": "me"}, {"assignee": "0"}):
        assert error_code(*await api.conversations(**params), 400) == "bad_request", params


# --- API keys -------------------------------------------------------------------------------


async def test_requests_without_a_valid_key_are_refused(
    http: aiohttp.ClientSession, api_server: Server, api: Api, keys: Keys
) -> None:
    routes = [
        ("POST", "/api/conversations/1/messages"),
        ("GET", "/api/conversations/1/messages"),
        ("GET", "/api/conversations"),
        ("POST", "/api/connections/1/disconnect"),
    ]
    for method, path in routes:
        for headers in (
            {},
            {"Authorization": "Bearer"},
            {"Authorization": f"Basic {keys.backend}"},
            {"Authorization": f"Bearer {new_api_key()}"},
            {"Authorization": f"Bearer {keys.backend}x"},
            # a WebSocket token is no API key
            {"Authorization": f"Bearer {token(admin_id=1)}"},
        ):
            async with http.request(method, api_server.http(path), headers=headers) as resp:
                assert resp.status == 401, (method, path, headers)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                body = await resp.json()
                assert body["error"]["code"] == "unauthorized"
    # each configured key works: from the file and from --api-key
    for key in (keys.backend, keys.other, keys.static):
        status, _ = await api.conversations(key=key, limit=1)
        assert status == 200
    # and an API key is no WebSocket token
    with pytest.raises(InvalidStatus) as refused:
        async with client(api_server, 5, keys.backend):
            pass
    assert refused.value.response.status_code == 401


async def test_a_key_removed_from_the_file_is_refused_without_restart(
    api: Api, keys: Keys, api_server: Server
) -> None:
    status, _ = await api.conversations(key=keys.other, limit=1)
    assert status == 200
    added = new_api_key()
    keys.write({"backend": keys.backend, "added": added})  # "other" revoked, "added" new
    try:
        status, body = await api.conversations(key=keys.other, limit=1)
        assert error_code(status, body, 401) == "unauthorized"
        status, _ = await api.conversations(key=added, limit=1)
        assert status == 200
        status, _ = await api.conversations(key=keys.backend, limit=1)
        assert status == 200
    finally:
        keys.write({"backend": keys.backend, "other": keys.other})
    status, _ = await api.conversations(key=keys.other, limit=1)
    assert status == 200
    assert "key other" in api_server.output and keys.other not in api_server.output


async def test_api_is_off_without_keys(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    server = InProcessServer(tmp_path / "off.db")
    server.start()
    try:
        async with http.get(
            server.http("/api/conversations"), headers={"Authorization": f"Bearer {new_api_key()}"}
        ) as resp:
            assert resp.status == 404
            body = await resp.json()
            assert body["error"]["code"] == "not_found"
            assert "--api-keys-file" in body["error"]["message"]
        async with http.get(server.http("/api/openapi.json")) as resp:
            assert resp.status == 200  # the description stays readable
    finally:
        server.stop()


async def test_unknown_routes_and_methods_answer_json(
    http: aiohttp.ClientSession, api_server: Server
) -> None:
    async with http.get(api_server.http("/api/nothing")) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
    async with http.delete(api_server.http("/api/conversations")) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET"
        assert (await resp.json())["error"]["code"] == "bad_request"


# --- the API's senders and keys, apart from the clients' ----------------------------------

SENDERS = "9000-9009"  # the server's --api-sender-ids below


@pytest.fixture(scope="module", params=ENGINES)
def engine_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, keys: Keys
) -> Iterator[Server]:
    """A server reserving SENDERS for the API, on SQLite and on PostgreSQL."""
    args = ("--rate", "0", "--api-keys-file", str(keys.path), "--api-sender-ids", SENDERS)
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            database: Path | str = tmp_path_factory.mktemp("senders") / "appchat.db"
        else:
            database = stack.enter_context(postgres_database())
        srv = InProcessServer(database, *args).start()
        stack.callback(srv.stop)
        yield srv


async def test_an_idempotency_key_is_never_a_clients_client_msg_id(
    http: aiohttp.ClientSession, engine_server: Server, keys: Keys
) -> None:
    """A staff member using the backend's sender id sends the key the backend will use as
    its client_msg_id first: the backend's post is still its own message, not a retry."""
    api = Api(http, engine_server, keys.backend)
    app, sender, key = 1401, 9001, "crm-1401-closed"
    async with staff(engine_server, sender) as agent:
        await agent.ok("Event.AddConversation", {"application_id": app})
        args = {"session_channel": str(app), "content": "my own words", "client_msg_id": key}
        mine = await agent.ok("Event.SendMessage", args)
        status, posted = await api.post(
            app, {"sender_id": sender, "content": "Request closed."}, idempotency_key=key
        )
        assert status == 201, posted
        assert posted["message"]["content"] == "Request closed."
        assert posted["message"]["id"] > mine["message"]["id"]
        assert posted["message"]["client_msg_id"] == key  # shown as sent, without the prefix
        assert (await agent.push("Event.ReceiveMessage"))["result"] == posted
        # Each side's retry answers its own first message.
        assert await api.post(app, {"sender_id": sender, "content": "x"}, idempotency_key=key) == (
            200,
            posted,
        )
        assert await agent.ok("Event.SendMessage", {**args, "content": "again"}) == mine
        page = await agent.ok("Event.GetMessageList", {"session_channel": str(app)})
        assert page["Messages"] == [mine["message"], posted["message"]]
        # The longest key a client_msg_id may be is stored (twice its length) and retried.
        longest = "k" * 64
        status, first = await api.post(
            app, {"sender_id": sender, "content": "long"}, idempotency_key=longest
        )
        assert status == 201 and first["message"]["client_msg_id"] == longest
        assert await api.post(
            app, {"sender_id": sender, "content": "long"}, idempotency_key=longest
        ) == (200, first)
        status, page = await api.messages(app)
        assert [m["content"] for m in page["messages"]] == [
            "my own words",
            "Request closed.",
            "long",
        ]


async def test_api_sender_ids_are_no_customers_and_the_only_api_senders(
    http: aiohttp.ClientSession, engine_server: Server, api_server: Server, keys: Keys
) -> None:
    api = Api(http, engine_server, keys.backend)
    app = 1402
    for tok in (token(request_id=app), token(request_id=app, sid=9002)):
        with pytest.raises(InvalidStatus) as refused:
            async with client(engine_server, 9002, tok):
                pass
        assert refused.value.response.status_code == 401
        # Nor over HTTP: the token check and uploads take the handshake's rule.
        for path in ("/auth/check?sid=9002", "/upload?sid=9002"):
            async with http.post(
                engine_server.http(path), headers={"Authorization": f"Bearer {tok}"}
            ) as resp:
                assert resp.status == 401, path
                assert "9002" in (await resp.json())["error"]["message"]
    async with customer(engine_server, app, 2402) as c, staff(engine_server, 9003) as agent:
        await c.ok("Event.AddConversation", {"application_id": app})
        await agent.ok("Event.AddConversation", {"application_id": app})  # staff may use one
        status, body = await api.post(app, {"sender_id": 9002, "content": "from the CRM"})
        assert status == 201, body
        assert (await c.push("Event.ReceiveMessage"))["result"] == body
        assert error_code(*await api.post(app, {"sender_id": 42, "content": "no"}), 403) == (
            "forbidden"
        )
        status, page = await api.messages(app)
        assert [m["sender_id"] for m in page["messages"]] == [9002]
    # Without --api-sender-ids nothing is reserved: the original's customers connect as before.
    async with client(api_server, 9002, token(request_id=app)) as unbound:
        await unbound.ok("Event.AddConversation", {"application_id": app})


# --- POST /api/connections/{sid}/disconnect -------------------------------------------------


async def test_disconnect_closes_every_connection_of_the_participant(
    api: Api, api_server: Server
) -> None:
    app = 1201
    async with (
        customer(api_server, app, 2201) as phone,
        customer(api_server, app, 2201) as laptop,
        staff(api_server, 13) as other,
    ):
        await phone.ok("Event.AddConversation", {"application_id": app})
        status, body = await api.disconnect(2201)
        assert status == 202, body
        assert body == {"sid": 2201, "code": 4009, "closed_here": 2}
        assert await phone.close_code() == 4009
        assert await laptop.close_code() == 4009
        assert phone.ws.close_reason == "disconnected by the server"
        # others keep theirs
        await other.ok("Event.AddConversation", {"application_id": app})
    status, body = await api.disconnect(2201)  # nobody left: still accepted
    assert (status, body["closed_here"]) == (202, 0)
    for sid in ("0", "x", str(2**63)):
        assert error_code(*await api.disconnect(sid), 400) == "bad_request"


async def test_disconnect_names_whom_among_the_identities_using_an_id(
    api: Api, api_server: Server
) -> None:
    """Staff 2202, the customer 2202 of application 1202, of 1203, and a customer of 1204
    whose token names no participant (it took sid 2202 from the query) all use one id."""
    sid = 2202
    async with (
        staff(api_server, sid) as agent,
        customer(api_server, 1202, sid) as first,
        customer(api_server, 1203, sid) as second,
        client(api_server, sid, token(request_id=1204)) as unbound,
    ):
        for bad in (
            {"role": "admin"},
            {"role": "staff", "application_id": 1202},
            {"application_id": 0},
            {"app": 1202},
        ):
            assert error_code(*await api.disconnect(sid, **bad), 400) == "bad_request"
        status, body = await api.disconnect(sid, application_id=1202)
        assert (status, body) == (202, {"sid": sid, "code": 4009, "closed_here": 1})
        assert await first.close_code() == 4009
        for up in (agent, second, unbound):  # still served
            await up.ok("Event.GetUnreadInfo")

        status, body = await api.disconnect(sid, role="staff")
        assert (status, body["closed_here"]) == (202, 1)
        assert await agent.close_code() == 4009
        for up in (second, unbound):
            await up.ok("Event.GetUnreadInfo")

        async with staff(api_server, sid) as again:
            status, body = await api.disconnect(sid, role="customer")
            assert (status, body["closed_here"]) == (202, 2)
            assert await second.close_code() == 4009
            assert await unbound.close_code() == 4009
            await again.ok("Event.GetUnreadInfo")


@pytest.fixture(scope="module")
def two_nodes(keys: Keys) -> Iterator[list[InProcessServer]]:
    require("Redis", "127.0.0.1", 6379)
    prefix = unique_prefix()
    with postgres_database() as url:
        nodes = [
            InProcessServer(
                url,
                "--broker",
                REDIS_URL,
                "--channel-prefix",
                prefix,
                "--rate",
                "0",
                "--api-keys-file",
                str(keys.path),
            )
            for _ in range(2)
        ]
        nodes[0].start()  # the first migrates the database
        nodes[1].start()
        try:
            yield nodes
        finally:
            for n in nodes:
                n.stop()


async def test_post_and_disconnect_reach_the_other_node(
    http: aiohttp.ClientSession, two_nodes: list[Server], keys: Keys
) -> None:
    a, b = two_nodes
    app = 1301
    api_a = Api(http, a, keys.backend)
    async with customer(b, app, 2301) as far, customer(a, app, 2301) as near, staff(b, 14) as s:
        await far.ok("Event.AddConversation", {"application_id": app})
        await s.ok("Event.AddConversation", {"application_id": app})
        status, body = await api_a.post(app, {"sender_id": 96, "content": "across nodes"})
        assert status == 201, body
        for conn in (far, near, s):
            assert (await conn.push("Event.ReceiveMessage"))["result"] == body

        status, body = await api_a.disconnect(2301)
        assert status == 202, body
        assert body["closed_here"] == 1  # node A closed its own; node B closes the other
        assert await near.close_code() == 4009
        assert await far.close_code() == 4009
        await s.ok("Event.AddConversation", {"application_id": app})  # staff stays


async def test_a_named_disconnect_reaches_the_other_node(
    http: aiohttp.ClientSession, two_nodes: list[Server], keys: Keys
) -> None:
    a, b = two_nodes
    api_a = Api(http, a, keys.backend)
    sid = 2302
    async with staff(b, sid) as agent, customer(b, 1302, sid) as far:
        status, body = await api_a.disconnect(sid, role="customer", application_id=1302)
        assert (status, body["closed_here"]) == (202, 0)
        assert await far.close_code() == 4009
        await agent.ok("Event.GetUnreadInfo")  # the staff member using the id stays
        status, body = await api_a.disconnect(sid, role="staff")
        assert await agent.close_code() == 4009


# --- the OpenAPI document, and schemathesis against it ---------------------------------------


async def test_openapi_document_describes_every_route(
    http: aiohttp.ClientSession, api_server: Server
) -> None:
    async with http.get(api_server.http("/api/openapi.json")) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["apiKey"]["description"],
    }
    operations = {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }
    assert set(operations) == {
        ("POST", "/api/conversations/{application_id}/messages"),
        ("GET", "/api/conversations/{application_id}/messages"),
        ("GET", "/api/conversations"),
        ("PATCH", "/api/conversations/{application_id}"),
        ("DELETE", "/api/conversations/{application_id}"),
        ("GET", "/api/conversations/{application_id}/export"),
        ("POST", "/api/participants/{user_id}/erase"),
        ("POST", "/api/connections/{sid}/disconnect"),
        ("GET", "/api/search"),
        ("GET", "/api/openapi.json"),
    }
    post = operations[("POST", "/api/conversations/{application_id}/messages")]
    body = doc["components"]["schemas"]["PostMessage"]
    assert body["properties"]["content"]["maxLength"] == MAX_CONTENT  # the server's setting
    assert body["required"] == ["sender_id", "content"]
    assert {p["name"] for p in post["parameters"]} == {"application_id", "Idempotency-Key"}
    assert {"200", "201", "400", "401", "403", "413", "503"} <= set(post["responses"])
    assert post["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorReply"
    }


@pytest.fixture
def api_schema(api_server: Server, keys: Keys, request: pytest.FixtureRequest) -> BaseSchema:
    # schemathesis 4.32 renames the test node through ``_nodeid``, which pytest 9.2 no
    # longer has: give it one (only the reported name of the subtests depends on it).
    node: Any = request.node
    if not hasattr(node, "_nodeid"):
        node._nodeid = node.nodeid
    schema = schemathesis.openapi.from_url(api_server.http("/api/openapi.json"))
    # The key as configuration: schemathesis then generates no request without it that it
    # would expect to be refused (a key added per call would turn those into false alarms).
    schema.config.update(headers={"Authorization": f"Bearer {keys.static}"})
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hypothesis.settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,
)
def test_schemathesis_finds_no_errors(case: Case[Any]) -> None:
    """Generated requests (valid and invalid) get no 5xx and answers that fit the schema."""
    # ignored_auth probes without the key, but the configured key goes back in: refusals
    # without a key (or with a wrong or revoked one) are tested above, route by route.
    excluded: list[CheckFunction] = [ignored_auth]
    if case.query and case.query.get("before_id") is not None and "after_id" in case.query:
        # "at most one of before_id and after_id" (GetMessageList's rule, the same error
        # here) is beyond what OpenAPI can say of two parameters: the 400 is right.
        excluded.append(positive_data_acceptance)
    body = case.body
    if (
        case.method == "PATCH"
        and isinstance(body, dict)
        and ("snooze_until" in body or body.get("status") == "snoozed")
    ):
        # A snooze time goes with status snoozed, and only with it; its text must be
        # RFC 3339 with an offset: rules the schema's plain string does not say.
        excluded.append(positive_data_acceptance)
    if case.query and case.query.get("role") == "staff" and "application_id" in case.query:
        # "staff belong to no application": a rule between two parameters again.
        excluded.append(positive_data_acceptance)
    content = body.get("content") if isinstance(body, dict) else None
    if (
        isinstance(body, dict)
        and body.get("content_type") == 2
        and isinstance(content, str)
        and parse_reference(content) is not None
    ):
        # An image reference must name an upload to that conversation (the service checks
        # it, as it does for SendMessage): no schema can name the uploads that exist, so
        # the 400 for a reference of none is right. Other content is stored as sent.
        excluded.append(positive_data_acceptance)
    case.call_and_validate(excluded_checks=excluded)
