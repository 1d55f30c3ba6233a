"""The support desk on two nodes (PostgreSQL and Redis): inbox pushes and assignment
across nodes, a snooze that falls due while the node that set it is dead, and a client
that applies every Event.ConversationUpdated ending with exactly what
Event.GetConversationList returns, over random sequences of sends, assignments and status
changes on both nodes (and across a reconnect)."""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from .backends import REDIS_URL, postgres_database, require, unique_prefix
from .support import Client, InProcessServer, Server, ServerProcess, customer, eventually, staff
from .test_cluster import start_nodes

UPDATED = "Event.ConversationUpdated"
ASSIGNEES = [41, 42, None]


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    require("Redis", "127.0.0.1", 6379)
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def prefix() -> str:
    return unique_prefix()


@pytest.fixture(scope="module")
def cluster(database: str, prefix: str) -> Iterator[list[InProcessServer]]:
    nodes = start_nodes(2, database, REDIS_URL, prefix)
    try:
        yield nodes
    finally:
        for n in nodes:
            n.stop()


class Mirror:
    """A client's copy of the inbox: every ConversationUpdated applied, the highest
    ``rev`` of each conversation kept (pushes of two nodes may arrive in either order)."""

    def __init__(self) -> None:
        self.conversations: dict[int, dict[str, Any]] = {}

    def apply(self, conversation: dict[str, Any]) -> None:
        held = self.conversations.get(conversation["id"])
        if held is None or conversation["rev"] >= held["rev"]:
            self.conversations[conversation["id"]] = conversation

    def drain(self, agent: Client) -> None:
        """Apply what has arrived; other pushes (presence, messages) are not the inbox's."""
        while not agent.pushes.empty():
            frame = agent.pushes.get_nowait()
            if frame["name"] == UPDATED:
                self.apply(frame["result"]["conversation"])

    def listed(self, apps: set[int]) -> list[dict[str, Any]]:
        mine = [c for c in self.conversations.values() if c["application_id"] in apps]
        return sorted(mine, key=lambda c: (c["update_at"], c["id"]), reverse=True)


async def listed(agent: Client, apps: set[int]) -> list[dict[str, Any]]:
    page = await agent.ok("Event.GetConversationList", {"all": True, "limit": 1000})
    return [c for c in page["conversations"] if c["application_id"] in apps]


async def converges(mirror: Mirror, agent: Client, apps: set[int]) -> None:
    async def same() -> bool:
        mirror.drain(agent)
        return mirror.listed(apps) == await listed(agent, apps)

    await eventually(same, what="the applied updates equal GetConversationList")


async def test_inbox_and_assignment_across_nodes(cluster: list[Server]) -> None:
    a, b = cluster
    app = 7001
    async with (
        staff(b, 30) as watcher,
        staff(b, 31) as assignee,
        staff(a, 32) as lead,
        customer(a, app, 7901) as c,
    ):
        await watcher.ok("Event.SubscribeInbox", {"filter": "all"})
        await assignee.ok("Event.SubscribeInbox", {"filter": "mine"})
        await c.ok("Event.AddConversation", {"application_id": app})
        new = await watcher.push(UPDATED)
        assert new["result"]["conversation"]["application_id"] == app
        sent = await c.ok("Event.SendMessage", {"session_channel": str(app), "content": "help"})
        got = await watcher.push(UPDATED)
        assert got["result"]["conversation"]["last_message"] == sent["message"]
        await assignee.no_push(0.2)  # not theirs (yet)

        assigned = await lead.ok(
            "Event.AssignConversation", {"session_channel": str(app), "assignee_id": 31}
        )
        for agent in (watcher, assignee):
            pushed = await agent.push(UPDATED)
            assert pushed["result"] == assigned
        # The assignee is a participant now: the customer's messages reach them on node B.
        again = await c.ok("Event.SendMessage", {"session_channel": str(app), "content": "hi?"})
        assert (await assignee.push("Event.ReceiveMessage"))["result"] == again
        assert (await assignee.push(UPDATED))["result"]["conversation"]["last_message"] == (
            again["message"]
        )


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_applied_updates_equal_the_list(cluster: list[Server], seed: int) -> None:
    rnd = random.Random(seed)
    a, b = cluster
    apps = {7100 + 10 * seed + i for i in range(4)}
    mirror = Mirror()
    async with staff(b, 40) as agent, staff(a, 41) as lead_a, staff(b, 42) as lead_b:
        await agent.ok("Event.SubscribeInbox", {"filter": "all"})
        customers: dict[int, Client] = {}
        async with (
            customer(a, min(apps), 7200 + seed) as c0,
            customer(b, min(apps) + 1, 7300 + seed) as c1,
            customer(a, min(apps) + 2, 7400 + seed) as c2,
            customer(b, min(apps) + 3, 7500 + seed) as c3,
        ):
            for n, cust in enumerate((c0, c1, c2, c3)):
                customers[min(apps) + n] = cust
                await cust.ok("Event.AddConversation", {"application_id": min(apps) + n})

            async def act(steps: int) -> None:
                pending = []
                for _ in range(steps):
                    app = rnd.choice(sorted(apps))
                    lead = rnd.choice((lead_a, lead_b))
                    kind = rnd.random()
                    if kind < 0.45:
                        call = customers[app].ok(
                            "Event.SendMessage", {"session_channel": str(app), "content": "m"}
                        )
                    elif kind < 0.55:
                        call = lead.ok(
                            "Event.SendMessage", {"session_channel": str(app), "content": "r"}
                        )
                    elif kind < 0.8:
                        call = lead.ok(
                            "Event.AssignConversation",
                            {
                                "session_channel": str(app),
                                "assignee_id": rnd.choice([41, 42, None]),
                            },
                        )
                    else:
                        status = rnd.choice(["open", "pending", "resolved", "snoozed"])
                        args: dict[str, Any] = {"session_channel": str(app), "status": status}
                        if status == "snoozed":
                            args["snooze_until"] = "2040-01-01T00:00:00Z"
                        call = lead.ok("Event.SetConversationStatus", args)
                    pending.append(call)
                    if len(pending) >= rnd.randint(1, 4):  # some at once, racing
                        await asyncio.gather(*pending)
                        pending = []
                await asyncio.gather(*pending)

            await act(40)
            await converges(mirror, agent, apps)

            # Away and back: subscribe first, then read the list (nothing falls between),
            # apply pushes; after the reconnect the same again.
            back = Mirror()
            async with staff(a, 43) as first:
                await first.ok("Event.SubscribeInbox", {})
                for conversation in await listed(first, apps):
                    back.apply(conversation)
                await act(10)
                back.drain(first)
            await act(15)  # while it is away
            async with staff(a, 43) as returned:
                await returned.ok("Event.SubscribeInbox", {})
                for conversation in await listed(returned, apps):
                    back.apply(conversation)
                await act(15)
                await converges(back, returned, apps)
            await converges(mirror, agent, apps)


async def test_a_snooze_falls_due_while_the_node_that_set_it_is_dead(
    database: str, prefix: str, cluster: list[Server]
) -> None:
    _a, b = cluster
    app = 7601
    doomed = ServerProcess(
        database, "--broker", REDIS_URL, "--channel-prefix", prefix, "--rate", "0"
    ).start()
    try:
        async with staff(b, 50) as watcher:
            await watcher.ok("Event.SubscribeInbox", {})
            async with staff(doomed, 51) as setter:
                await setter.ok("Event.AddConversation", {"application_id": app})
                due = datetime.now(UTC) + timedelta(seconds=3)
                snoozed = await setter.ok(
                    "Event.SetConversationStatus",
                    {
                        "session_channel": str(app),
                        "status": "snoozed",
                        "snooze_until": due.isoformat(),
                    },
                )
                assert snoozed["conversation"]["status"] == "snoozed"
            doomed.stop(signal.SIGKILL)

            async def woken() -> bool:
                while not watcher.pushes.empty():
                    frame = watcher.pushes.get_nowait()
                    c = frame["result"]["conversation"] if frame["name"] == UPDATED else None
                    if (
                        c is not None
                        and c["application_id"] == app
                        and c["rev"] > snoozed["conversation"]["rev"]  # after the snooze
                    ):
                        assert c["status"] == "open" and c["snooze_until"] is None
                        return True
                return False

            await eventually(woken, timeout=30, what="the snoozed conversation reopened")
            assert datetime.now(UTC) >= due
            (listed_now,) = [
                c
                for c in (await watcher.ok("Event.GetConversationList", {"all": True}))[
                    "conversations"
                ]
                if c["application_id"] == app
            ]
            assert listed_now["status"] == "open" and listed_now["snooze_until"] is None
    finally:
        if doomed.proc is not None and doomed.proc.poll() is None:
            doomed.stop()


async def test_presence_across_nodes_and_a_node_killed(database: str) -> None:
    prefix = unique_prefix()  # nodes of their own, with a short grace
    grace = ("--presence-grace", "1")
    node = InProcessServer(
        database, "--broker", REDIS_URL, "--channel-prefix", prefix, "--rate", "0", *grace
    ).start()
    doomed = ServerProcess(
        database, "--broker", REDIS_URL, "--channel-prefix", prefix, "--rate", "0", *grace
    ).start()
    app = 7701
    try:
        async with staff(node, 60) as watcher, customer(node, app, 7960) as c:
            await watcher.ok("Event.SubscribeInbox", {})
            await c.ok("Event.AddConversation", {"application_id": app})
            async with staff(doomed, 61) as agent:
                assert await presence_push(watcher, 61) == "online"
                await agent.ok("Event.AddConversation", {"application_id": app})
                await agent.ok("Event.SetAvailability", {"availability": "busy"})
                assert await presence_push(watcher, 61) == "busy"
                seen = await c.ok("Event.GetPresence", {"session_channel": str(app)})
                assert seen["participants"] == [
                    {"user_id": 61, "staff": True, "availability": "busy"},
                    {"user_id": 7960, "staff": False, "availability": "online"},
                ]
                assert seen["staff_available"] is True  # the watcher, 60, is online
                desk = await watcher.ok("Event.GetPresence", {})
                assert {(p["user_id"], p["availability"]) for p in desk["participants"]} == {
                    (60, "online"),
                    (61, "busy"),
                }
                assert await c.error("Event.GetPresence", {}) == "forbidden"
                assert await c.error("Event.GetPresence", {"session_channel": "7702"}) == (
                    "forbidden"
                )
                doomed.stop(signal.SIGKILL)
                # Its connections are gone with it: offline once the node is found silent
                # and the grace has passed, never "online" for ever.
                assert await presence_push(watcher, 61, timeout=20) == "offline"
            after = await c.ok("Event.GetPresence", {"session_channel": str(app)})
            assert after["participants"][0] == {
                "user_id": 61,
                "staff": True,
                "availability": "offline",
            }
    finally:
        if doomed.proc is not None and doomed.proc.poll() is None:
            doomed.stop()
        node.stop()


async def presence_push(watcher: Client, user_id: int, timeout: float = 10) -> str:
    """The next availability of ``user_id`` that Event.ReceivePresence brought."""
    async with asyncio.timeout(timeout):
        while True:
            frame = await watcher.pushes.get()
            if frame["name"] == "Event.ReceivePresence" and frame["result"]["user_id"] == user_id:
                availability: str = frame["result"]["availability"]
                return availability
