"""Who may do what (SPEC "Who may do what"), over real sockets."""

from __future__ import annotations

import itertools

import pytest

from .support import Server, client, staff, token

_apps = itertools.count(2000)


@pytest.fixture
def app() -> int:
    return next(_apps)


async def test_acting_ids_must_be_the_connections_sid(server: Server, app: int) -> None:
    async with staff(server, 11) as s:
        await s.ok("Event.AddConversation", {"application_id": app})
        ch = str(app)
        cases = [
            ("Event.GetConversationList", {"user_id": 12}),
            ("Event.GetUnreadInfo", {"user_id": 12}),
            ("Event.GetMessageList", {"session_channel": ch, "executor_id": 12}),
            ("Event.SendMessage", {"session_channel": ch, "sender_id": 12, "content": "x"}),
            ("Event.ReadMessage", {"session_channel": ch, "executor_id": 12, "message_id": 1}),
        ]
        for name, args in cases:
            assert await s.error(name, args) == "forbidden", name


async def test_staff_reads_and_writes_any_conversation(server: Server, app: int) -> None:
    async with client(server, 700, token(request_id=app, sid=700)) as c, staff(server, 13) as s:
        await c.ok("Event.AddConversation", {"application_id": app})
        sent = await c.ok("Event.SendMessage", {"session_channel": str(app), "content": "help"})
        # staff 13 never joined, yet may read, write and mark read
        page = await s.ok("Event.GetMessageList", {"session_channel": str(app)})
        assert page["Messages"][0]["id"] == sent["message"]["id"]
        await s.ok("Event.SendMessage", {"session_channel": str(app), "content": "on it"})
        await s.ok(
            "Event.ReadMessage", {"session_channel": str(app), "message_id": sent["message"]["id"]}
        )
        # having acted, staff 13 now takes part
        mine = await s.ok("Event.GetConversationList", {})
        assert app in [x["application_id"] for x in mine["conversations"]]


async def test_staff_gets_not_found_for_missing_conversation(server: Server) -> None:
    async with staff(server, 14) as s:
        for channel in ("999999", "abc", "0100"):
            args = {"session_channel": channel}
            assert await s.error("Event.GetMessageList", args) == "not_found"
            assert await s.error("Event.SendMessage", {**args, "content": "x"}) == "not_found"
            assert await s.error("Event.ReadMessage", {**args, "message_id": 1}) == "not_found"


async def test_customer_is_confined_to_their_application(server: Server, app: int) -> None:
    other = next(_apps)
    async with staff(server, 15) as s:
        await s.ok("Event.AddConversation", {"application_id": other})
        await s.ok("Event.SendMessage", {"session_channel": str(other), "content": "secret"})
    async with client(server, 701, token(request_id=app, sid=701)) as c:
        missing = str(next(_apps))
        for channel in (str(other), missing, "abc"):
            # the same reply whether the other conversation exists or not
            for name, args in (
                ("Event.GetMessageList", {"session_channel": channel}),
                ("Event.SendMessage", {"session_channel": channel, "content": "x"}),
                ("Event.ReadMessage", {"session_channel": channel, "message_id": 1}),
            ):
                reply = await c.call(name, args)
                assert reply["error"] == {
                    "code": "forbidden",
                    "message": "you may not access this conversation",
                }, (name, channel)
        assert await c.error("Event.AddConversation", {"application_id": other}) == "forbidden"
        assert (
            await c.error("Event.AddConversation", {"application_id": app, "user_id": 702})
            == "forbidden"
        )
        # their own application, not yet created: not_found until they add it
        assert await c.error("Event.GetMessageList", {"session_channel": str(app)}) == "not_found"
        await c.ok("Event.AddConversation", {"application_id": app, "user_id": 701})
        # the staff inbox flag changes nothing for a customer
        listed = await c.ok("Event.GetConversationList", {"all": True})
        assert [x["application_id"] for x in listed["conversations"]] == [app]


async def test_customer_sees_only_their_applications_conversations(
    server: Server, app: int
) -> None:
    other = next(_apps)
    # participant 703 takes part in two applications, through staff adding them
    async with staff(server, 16) as s:
        await s.ok("Event.AddConversation", {"application_id": app, "user_id": 703})
        await s.ok("Event.AddConversation", {"application_id": other, "user_id": 703})
        async with client(server, 703, token(request_id=app, sid=703)) as c:
            listed = await c.ok("Event.GetConversationList", {})
            assert [x["application_id"] for x in listed["conversations"]] == [app]
            unread = await c.ok("Event.GetUnreadInfo", {})
            assert [x["application_id"] for x in unread["conversations"]] == [app]
            # pushes of the other application never reach this connection
            await s.ok("Event.SendMessage", {"session_channel": str(other), "content": "no"})
            await s.ok("Event.SendMessage", {"session_channel": str(app), "content": "yes"})
            pushed = await c.push("Event.ReceiveMessage")
            assert pushed["result"]["message"]["content"] == "yes"
            await c.no_push()


async def test_unbound_customer_cannot_act_as_a_staff_participant(server: Server, app: int) -> None:
    async with staff(server, 17) as s:
        await s.ok("Event.AddConversation", {"application_id": app})
    # a customer token naming no participant, connecting as sid 17 (a staff participant)
    async with client(server, 17, token(request_id=app)) as c:
        ch = str(app)
        for name, args in (
            ("Event.GetMessageList", {"session_channel": ch}),
            ("Event.SendMessage", {"session_channel": ch, "content": "I am staff"}),
            ("Event.ReadMessage", {"session_channel": ch, "message_id": 1}),
            ("Event.AddConversation", {"application_id": app}),
            ("Event.GetConversationList", {}),
            ("Event.GetUnreadInfo", {}),
        ):
            assert await c.error(name, args) == "forbidden", name
    # while an id that is not staff in this conversation may act
    async with client(server, 704, token(request_id=app)) as c:
        await c.ok("Event.SendMessage", {"session_channel": str(app), "content": "hello"})
