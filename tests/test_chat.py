"""Every event of the protocol over real sockets against one real server process."""

from __future__ import annotations

import itertools
import json

from .support import (
    CONVERSATION_KEYS,
    MESSAGE_KEYS,
    RFC3339_UTC,
    Client,
    Server,
    client,
    customer,
    staff,
    token,
)

_apps = itertools.count(1000)


def new_app() -> int:
    """Each test uses applications of its own: the server is shared by the module."""
    return next(_apps)


def check_message(m: dict[str, object], app: int, sender: int, content: str) -> None:
    assert set(m) >= MESSAGE_KEYS
    assert m["session_channel"] == str(app)
    assert m["sender_id"] == sender and m["content"] == content
    assert isinstance(m["id"], int)
    assert RFC3339_UTC.match(str(m["create_at"])) and RFC3339_UTC.match(str(m["update_at"]))


async def test_add_conversation_once_per_application(server: Server) -> None:
    app = new_app()
    async with staff(server) as s, customer(server, app, 500) as c:
        first = await c.ok("Event.AddConversation", {"user_id": 500, "application_id": app})
        assert set(first) == CONVERSATION_KEYS  # the seed's keys and the desk's
        assert first["status"] == "open" and first["assignee_id"] is None
        assert first["session_channel"] == str(app) and first["application_id"] == app
        assert RFC3339_UTC.match(first["create_at"])
        again = await s.ok("Event.AddConversation", {"user_id": 1, "application_id": app})
        assert again == first
        # staff may add any user; the added user then lists it
        await s.ok("Event.AddConversation", {"user_id": 42, "application_id": app})
    async with staff(server, 42) as other:
        listed = await other.ok("Event.GetConversationList", {"user_id": 42})
        assert [c["application_id"] for c in listed["conversations"]] == [app]


async def test_conversation_list_newest_activity_first(server: Server) -> None:
    a, b = new_app(), new_app()
    async with staff(server, 3) as s:
        await s.ok("Event.AddConversation", {"user_id": 3, "application_id": a})
        await s.ok("Event.AddConversation", {"user_id": 3, "application_id": b})
        await s.ok("Event.SendMessage", {"session_channel": str(a), "sender_id": 3, "content": "x"})
        listed = await s.ok("Event.GetConversationList", {"user_id": 3})
        assert [c["application_id"] for c in listed["conversations"]][:2] == [a, b]
        await s.ok("Event.SendMessage", {"session_channel": str(b), "content": "y"})
        listed = await s.ok("Event.GetConversationList", {})
        assert [c["application_id"] for c in listed["conversations"]][:2] == [b, a]
        inbox = await s.ok("Event.GetConversationList", {"all": True})
        apps = [c["application_id"] for c in inbox["conversations"]]
        assert apps.index(b) < apps.index(a)


async def test_send_receive_and_devices(server: Server) -> None:
    app = new_app()
    async with (
        staff(server) as s,
        customer(server, app, 600) as phone,
        customer(server, app, 600) as laptop,
    ):
        await phone.ok("Event.AddConversation", {"user_id": 600, "application_id": app})
        await s.ok("Event.AddConversation", {"user_id": 1, "application_id": app})
        sent = await phone.ok(
            "Event.SendMessage", {"session_channel": str(app), "sender_id": 600, "content": "Hey"}
        )
        msg = sent["message"]
        check_message(msg, app, 600, "Hey")
        assert msg["status"] == 0 and msg["content_type"] == 1
        for other in (s, laptop):
            pushed = await other.push("Event.ReceiveMessage")
            assert pushed["result"] == {"message": msg}
        await phone.no_push()


async def test_an_original_client_sends_images_of_its_own(server: Server) -> None:
    """A client written for the original server: frames without ids, ``args`` double
    encoded, ``sender_id`` given, an image as the URL its own backend hosts or a file name.
    Both are stored as sent, answered and pushed (the original's behaviour)."""
    app = new_app()
    async with staff(server) as s, customer(server, app, 602) as c:
        await s.ok("Event.AddConversation", {"application_id": app})
        await c.ok("Event.AddConversation", {"user_id": 602, "application_id": app})
        for content in ("https://cdn.example.com/app/42/photo.jpg", "photo_2020-03-06.png"):
            args = {"session_channel": str(app), "sender_id": 602, "content": content}
            frame = {"name": "Event.SendMessage", "args": json.dumps({**args, "content_type": 2})}
            await c.send_raw(json.dumps(frame))
            # Without an id the reply is told from pushes by its name, as the original's.
            reply = await c.push("Event.SendMessage")
            message = reply["result"]["message"]
            check_message(message, app, 602, content)
            assert message["content_type"] == 2
            pushed = await s.push("Event.ReceiveMessage")
            assert pushed["result"] == {"message": message}
        page = await s.ok("Event.GetMessageList", {"session_channel": str(app)})
        assert [(m["content"], m["content_type"]) for m in page["Messages"]] == [
            ("https://cdn.example.com/app/42/photo.jpg", 2),
            ("photo_2020-03-06.png", 2),
        ]


async def test_display_names_from_the_token_show_beside_messages(server: Server) -> None:
    app = new_app()
    anna = token(request_id=app, sid=603, name="Анна")
    async with (
        client(server, 2, token(admin_id=2, name="Bob (support)")) as bob,
        client(server, 603, anna) as c,
        staff(server, 3) as unnamed,
    ):
        await bob.ok("Event.AddConversation", {"application_id": app})
        await unnamed.ok("Event.AddConversation", {"application_id": app})
        await c.ok("Event.AddConversation", {"application_id": app})
        sent = await c.ok("Event.SendMessage", {"session_channel": str(app), "content": "hi"})
        assert sent["message"]["sender_name"] == "Анна"
        assert (await bob.push("Event.ReceiveMessage"))["result"] == sent
        await unnamed.push("Event.ReceiveMessage")
        await bob.ok("Event.SendMessage", {"session_channel": str(app), "content": "hello"})
        await unnamed.ok("Event.SendMessage", {"session_channel": str(app), "content": "hey"})
        page = await c.ok("Event.GetMessageList", {"session_channel": str(app)})
        names = [(m["sender_id"], m.get("sender_name")) for m in page["Messages"]]
        assert names == [(603, "Анна"), (2, "Bob (support)"), (3, None)]
        assert "sender_name" not in page["Messages"][2]  # no name: the original's fields
    # A newer token's name is the one shown from then on, for earlier messages too.
    async with client(server, 603, token(request_id=app, sid=603, name="Anna K.")) as c:
        await c.ok(
            "Event.ReadMessage", {"session_channel": str(app), "message_id": sent["message"]["id"]}
        )
        page = await c.ok("Event.GetMessageList", {"session_channel": str(app)})
        assert page["Messages"][0]["sender_name"] == "Anna K."
    # A name that is no short line of text counts as none: the token still connects.
    async with client(server, 604, token(request_id=app, sid=604, name="x" * 101)) as odd:
        await odd.ok("Event.AddConversation", {"application_id": app})
        sent = await odd.ok("Event.SendMessage", {"session_channel": str(app), "content": "?"})
        assert "sender_name" not in sent["message"]


async def test_content_type_and_client_msg_id(server: Server) -> None:
    app = new_app()
    async with staff(server) as s, customer(server, app, 601) as c:
        await c.ok("Event.AddConversation", {"application_id": app})
        await s.ok("Event.AddConversation", {"application_id": app})
        odd = await c.ok(
            "Event.SendMessage", {"session_channel": str(app), "content": "t", "content_type": 7}
        )
        assert odd["message"]["content_type"] == 1
        await s.push("Event.ReceiveMessage")
        args = {"session_channel": str(app), "content": "once", "client_msg_id": "abc-1"}
        first = await c.ok("Event.SendMessage", args)
        await s.push("Event.ReceiveMessage")
        retry = await c.ok("Event.SendMessage", args)
        assert retry["message"] == first["message"]
        assert first["message"]["client_msg_id"] == "abc-1"
        await s.no_push()
        page = await s.ok("Event.GetMessageList", {"session_channel": str(app)})
        assert [m["content"] for m in page["Messages"]].count("once") == 1


async def test_message_list_paging(server: Server) -> None:
    app = new_app()
    async with staff(server, 4) as s:
        await s.ok("Event.AddConversation", {"application_id": app})
        ids = []
        for i in range(60):
            r = await s.ok("Event.SendMessage", {"session_channel": str(app), "content": f"m{i}"})
            ids.append(r["message"]["id"])
        assert ids == sorted(ids)
        page = await s.ok("Event.GetMessageList", {"session_channel": str(app), "executor_id": 4})
        assert [m["id"] for m in page["Messages"]] == ids[-50:]
        assert page["has_more"] is True
        older = await s.ok(
            "Event.GetMessageList", {"session_channel": str(app), "before_id": ids[10], "limit": 5}
        )
        assert [m["id"] for m in older["Messages"]] == ids[5:10] and older["has_more"] is True
        first = await s.ok(
            "Event.GetMessageList", {"session_channel": str(app), "before_id": ids[3]}
        )
        assert [m["id"] for m in first["Messages"]] == ids[:3] and first["has_more"] is False
        newer = await s.ok(
            "Event.GetMessageList", {"session_channel": str(app), "after_id": ids[50], "limit": 500}
        )
        assert [m["id"] for m in newer["Messages"]] == ids[51:] and newer["has_more"] is False
        resume = await s.ok(
            "Event.GetMessageList", {"session_channel": str(app), "after_id": 0, "limit": 20}
        )
        assert [m["id"] for m in resume["Messages"]] == ids[:20] and resume["has_more"] is True
        for bad in ({"limit": 0}, {"limit": 501}, {"before_id": 5, "after_id": 1}, {"limit": "5"}):
            code = await s.error("Event.GetMessageList", {"session_channel": str(app), **bad})
            assert code == "bad_request"


async def test_read_message_status_unread_and_push(server: Server) -> None:
    app = new_app()
    async with (
        staff(server, 5) as s,
        customer(server, app, 602) as c,
        customer(server, app, 602) as c2,
    ):
        await c.ok("Event.AddConversation", {"application_id": app})
        await s.ok("Event.AddConversation", {"application_id": app})
        ids = []
        for text in ("a", "b", "c"):
            r = await c.ok("Event.SendMessage", {"session_channel": str(app), "content": text})
            ids.append(r["message"]["id"])
        mine = await s.ok("Event.SendMessage", {"session_channel": str(app), "content": "staff"})
        for _ in range(4):
            await c2.push("Event.ReceiveMessage")
        await c.push("Event.ReceiveMessage")  # the staff message
        info = await s.ok("Event.GetUnreadInfo", {"user_id": 5})
        entry = next(x for x in info["conversations"] if x["application_id"] == app)
        assert entry == {"session_channel": str(app), "application_id": app, "unread": 3}
        cust = await c.ok("Event.GetUnreadInfo", {})
        assert cust["total"] == 1 and cust["conversations"][0]["unread"] == 1

        assert (
            await s.ok(
                "Event.ReadMessage",
                {"session_channel": str(app), "executor_id": 5, "message_id": ids[1]},
            )
            is None
        )
        read = await c.push("Event.MessageRead")
        assert read["result"] == {"session_channel": str(app), "reader_id": 5, "message_id": ids[1]}
        await c2.push("Event.MessageRead")
        page = await c.ok("Event.GetMessageList", {"session_channel": str(app)})
        status = {m["id"]: m["status"] for m in page["Messages"]}
        assert status == {ids[0]: 1, ids[1]: 1, ids[2]: 0, mine["message"]["id"]: 0}
        info = await s.ok("Event.GetUnreadInfo", {})
        assert next(x for x in info["conversations"] if x["application_id"] == app)["unread"] == 1

        # a repeat or older read is ok and pushes nothing
        await s.ok("Event.ReadMessage", {"session_channel": str(app), "message_id": ids[0]})
        await c.no_push()
        # the reader's own message never counts or changes by their own read
        await s.ok(
            "Event.ReadMessage", {"session_channel": str(app), "message_id": mine["message"]["id"]}
        )
        page = await c.ok("Event.GetMessageList", {"session_channel": str(app)})
        assert [m["status"] for m in page["Messages"]] == [1, 1, 1, 0]
        total = (await s.ok("Event.GetUnreadInfo", {}))["conversations"]
        assert next(x for x in total if x["application_id"] == app)["unread"] == 0
        assert (
            await c.error("Event.ReadMessage", {"session_channel": str(app), "message_id": 10**12})
            == "not_found"
        )


async def test_message_read_reaches_the_readers_other_device(server: Server) -> None:
    app = new_app()
    async with staff(server, 6) as s, customer(server, app, 603) as c, staff(server, 6) as s2:
        await c.ok("Event.AddConversation", {"application_id": app})
        r = await c.ok("Event.SendMessage", {"session_channel": str(app), "content": "hi"})
        await s.ok(
            "Event.ReadMessage", {"session_channel": str(app), "message_id": r["message"]["id"]}
        )
        pushed = await s2.push("Event.MessageRead")
        assert pushed["result"]["reader_id"] == 6
        await c.push("Event.MessageRead")
        await s.no_push()


async def test_unread_info_lists_every_conversation(server: Server) -> None:
    a, b = new_app(), new_app()
    async with staff(server, 7) as s:
        await s.ok("Event.AddConversation", {"application_id": a})
        await s.ok("Event.AddConversation", {"application_id": b})
        info = await s.ok("Event.GetUnreadInfo", {"user_id": 7})
        assert info["total"] == 0
        assert {x["application_id"]: x["unread"] for x in info["conversations"]} == {a: 0, b: 0}


async def test_refresh_token(server: Server) -> None:
    async with staff(server, 8) as s:
        new = token(admin_id=8, ttl=7200)
        result = await s.ok("Event.RefreshToken", {"token": new})
        assert isinstance(result["exp"], int | float) and result["exp"] > 0
        assert await s.error("Event.RefreshToken", {"token": token(admin_id=9)}) == "unauthorized"
        assert await s.error("Event.RefreshToken", {"token": "garbage"}) == "unauthorized"
        assert await s.error("Event.RefreshToken", {}) == "bad_request"


async def test_a_burst_of_sends_is_stored_pushed_and_answered_in_order(server: Server) -> None:
    """SendMessages sent without waiting are pipelined (stored together) yet keep every
    guarantee of one at a time: replies in request order, ids in send order, pushes in that
    order, an error in its place, and a request after them sees them all stored."""
    app = new_app()
    async with staff(server, 11) as s, customer(server, app, 700) as c:
        await c.ok("Event.AddConversation", {"user_id": 700, "application_id": app})
        await s.ok("Event.AddConversation", {"user_id": 11, "application_id": app})
        raw: Client = c

        def send(n: int, channel: int = app) -> str:
            args = json.dumps({"session_channel": str(channel), "content": f"m{n}"})
            return json.dumps({"name": "Event.SendMessage", "args": args, "id": n})

        frames = [send(n) for n in range(12)]
        frames.append('{"name":"Event.SendMessage","args":"{not json","id":12}')
        frames.append(send(13, channel=app + 1))  # not this customer's conversation
        frames += [send(n) for n in range(14, 24)]
        listing = {"session_channel": str(app), "limit": 50}
        frames.append(json.dumps({"name": "Event.GetMessageList", "args": listing, "id": 24}))
        frames += [send(n) for n in range(25, 30)]
        for f in frames:
            await raw.send_raw(f)
        got = [await raw.unmatched() for _ in frames]
        assert [g["id"] for g in got] == list(range(30))
        assert got[12]["error"]["code"] == "bad_request"
        assert got[13]["error"]["code"] == "forbidden"
        sent = [g for g in got if g["name"] == "Event.SendMessage" and g["ok"]]
        assert [g["result"]["message"]["content"] for g in sent] == [
            f"m{n}" for n in [*range(12), *range(14, 24), *range(25, 30)]
        ]
        ids = [g["result"]["message"]["id"] for g in sent]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        listed = [m["content"] for m in got[24]["result"]["Messages"]]
        assert sorted(listed, key=lambda t: int(t[1:])) == [
            f"m{n}" for n in [*range(12), *range(14, 24)]
        ]
        pushed = [(await s.push("Event.ReceiveMessage"))["result"]["message"] for _ in sent]
        assert [m["id"] for m in pushed] == ids


async def test_request_id_echo_and_pipelining(server: Server) -> None:
    async with staff(server, 9) as s:
        raw: Client = s
        frames = [
            '{"name":"Event.GetUnreadInfo","args":"{}","id":1}',
            '{"name":"Event.GetUnreadInfo","args":{},"id":"two"}',
            '{"name":"Event.GetUnreadInfo","id":3.5}',
        ]
        for f in frames:
            await raw.send_raw(f)
        got = [await raw.unmatched() for _ in frames]
        assert [g["id"] for g in got] == [1, "two", 3.5]
        assert all(g["ok"] for g in got)
