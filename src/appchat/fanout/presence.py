"""Who is there, on any node: each user's effective availability.

Presence lives in each node's memory and is shared by gossip over the broker, on one
channel (``<prefix>:presence``); no database. A node publishes

* a *delta* at once when a user's connections on it go from none to one (or the user's
  name or staff flag there changes), from one to none, or an availability is set;
* a *snapshot* of every user connected to it each ``heartbeat`` seconds, and when it
  hears a node it did not know (so a node that just started learns everything in one
  round trip instead of a heartbeat);
* *leave* when it stops gracefully.

Every node keeps, per other node, the users connected there and when it last heard from
it. A node silent for ``3 * heartbeat`` is dead: its users count as having disconnected
when it was last heard. A user is *there* while connected on this node or a live one, and
for ``grace`` seconds after their last connection anywhere closed; while there, their
availability is the one they chose (``online`` until they choose), else ``offline``.

The chosen availability and the display name are last-writer-wins registers stamped with
a Lamport clock and the node id, so every node settles on the same value whatever order
the messages arrived in. A user is staff once any of their connections was staff (kept
until the user is forgotten, ``grace`` after their last connection closed). Choices are
forgotten with the user: a staff member who comes back after being offline is ``online``.

Messages are ``P1\\t<node>\\t<kind>\\n`` and a JSON body:

* ``snap``  ``{"users": [entry, ...], "hb": seconds}``: every user connected on the node,
  and its heartbeat (the others count it dead after three heartbeats of its own);
* ``delta`` ``{"up": [entry, ...], "down": [user_id, ...], "avail": [[user_id, reg], ...]}``;
* ``leave`` ``{}``;

where ``entry`` is ``[user_id, staff, name_reg | null, availability_reg | null]`` and a
register is ``[value, lamport, node]``. A message of another version or malformed is
logged (rate-limited) and dropped; a node's own messages are ignored by its id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..broker import Broker
from ..common.ratelog import RateLimitedLog
from ..protocol import defaults
from ..protocol.errors import AppError

log = logging.getLogger(__name__)

ONLINE, BUSY, OFFLINE = "online", "busy", "offline"
AVAILABILITIES = frozenset({ONLINE, BUSY, OFFLINE})

VERSION = b"P1"
SNAPSHOT, DELTA, LEAVE = b"snap", b"delta", b"leave"
MISSED_HEARTBEATS = 3  # a node not heard from for this many heartbeats is dead
MAX_HEARTBEAT = 600.0  # a peer's heartbeat is believed up to this (its users do go)
TICK = 1.0  # seconds between ticks when nothing falls due sooner
PUBLISH_TIMEOUT = 2.0  # seconds a batch may take to publish (and stop() to say leave)
MAX_OUTBOX = 1000  # deltas waiting beyond this are replaced by one snapshot


@dataclass(frozen=True, slots=True)
class _Reg:
    """A last-writer-wins register: the higher (lamport, node) wins."""

    value: str
    lamport: int
    node: str

    def beats(self, other: _Reg | None) -> bool:
        return other is None or (self.lamport, self.node) > (other.lamport, other.node)

    def dump(self) -> list[object]:
        return [self.value, self.lamport, self.node]


@dataclass(slots=True)
class _User:
    staff: bool = False
    name: _Reg | None = None
    availability: _Reg | None = None
    left_at: float | None = None  # the latest time one of their connections closed
    told: str = OFFLINE  # what on_change said of them last


@dataclass(slots=True)
class _Local:
    customers: int = 0
    staff: int = 0


@dataclass(slots=True)
class _Peer:
    heard: float
    users: dict[int, bool] = field(default_factory=dict)  # connected there -> staff there
    heartbeat: float | None = None  # the node's own, from its snapshots


@dataclass(frozen=True, slots=True)
class _Entry:
    user_id: int
    staff: bool
    name: _Reg | None
    availability: _Reg | None


class Presence:
    """This node's view of who is there, on every node (see the module's docstring)."""

    def __init__(
        self,
        broker: Broker,
        node_id: str,
        *,
        prefix: str = defaults.CHANNEL_PREFIX,
        grace: float = 30.0,
        heartbeat: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_publish_failure: Callable[[str, int], None] | None = None,
    ) -> None:
        if not node_id or any(c in node_id for c in "\t\n"):
            raise ValueError(f"a node id is a word without tabs or newlines: {node_id!r}")
        if grace < 0:
            raise ValueError("grace must not be negative")
        if heartbeat is None:
            heartbeat = min(10.0, grace / 3) or 10.0
        if heartbeat <= 0:
            raise ValueError("heartbeat must be positive")
        self.node_id = node_id
        self.channel = f"{prefix}:presence"
        self.on_change: Callable[[int, str], None] | None = None
        self._broker = broker
        self._grace = grace
        self._heartbeat = heartbeat
        self._clock = clock
        self._users: dict[int, _User] = {}  # every user there now, or within the grace
        self._local: dict[int, _Local] = {}  # this node's connections per user
        self._peers: dict[str, _Peer] = {}  # the other live nodes
        self._gone: set[int] = set()  # known users connected nowhere: in their grace
        self._staff: set[int] = set()  # known users with the staff flag
        self._lamport = 0
        self._next_heartbeat = 0.0
        self._due = 0.0  # when tick() next has something to do
        self._head = b"\t".join((VERSION, node_id.encode())) + b"\t"
        self._outbox: deque[bytes] = deque()
        self._snapshot_wanted = False
        self._publisher: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._stopped = False
        self._ratelog = RateLimitedLog(log)
        self._publish_failed = on_publish_failure

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Listen to the presence channel, announce this node, and keep ticking."""
        await self._broker.subscribe(self.channel)
        self._stopped = False
        self._next_heartbeat = self._clock() + self._heartbeat
        self._want_snapshot()
        self._ticker = asyncio.get_running_loop().create_task(
            self._tick_loop(), name="appchat-presence"
        )

    async def stop(self) -> None:
        """Tell the other nodes this one leaves (its users disconnected now), then stop."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            await asyncio.wait([ticker])
        if not self._stopped and self._broker.shared:
            self._outbox.clear()  # leave says all they would
            self._snapshot_wanted = False
            self._outbox.append(self._head + LEAVE + b"\n{}")
            self._kick()
        self._stopped = True
        publisher = self._publisher
        if publisher is not None:
            await asyncio.wait([publisher], timeout=PUBLISH_TIMEOUT)
            publisher.cancel()
            await asyncio.wait([publisher])

    async def resync(self) -> None:
        """The broker connection came back: what this node published meanwhile may be
        lost, so it publishes a snapshot."""
        self._want_snapshot()

    # -- this node's connections ---------------------------------------------------------

    def connected(self, user_id: int, *, staff: bool, name: str | None = None) -> None:
        """A connection of ``user_id`` opened on this node."""
        local = self._local.get(user_id)
        first = local is None
        if local is None:
            local = self._local[user_id] = _Local()
        became_staff = staff and not local.staff
        if staff:
            local.staff += 1
        else:
            local.customers += 1
        user = self._place_added(user_id, staff)
        renamed = name is not None and (user.name is None or user.name.value != name)
        if name is not None and renamed:
            user.name = _Reg(name, self._stamp(), self.node_id)
        if first or renamed or became_staff:
            self._queue_delta(up=[self._entry(user_id, local, user)])
        self._settle((user_id,), self._clock())

    def disconnected(self, user_id: int, *, staff: bool) -> None:
        """A connection of ``user_id`` (opened with ``connected``) closed on this node.
        With no connection of that kind left, one of the other kind closes: presence
        never stays on for a connection that is gone."""
        local = self._local.get(user_id)
        if local is None:
            self._ratelog.warning(
                "unpaired", "presence: user %d disconnected more often than connected", user_id
            )
            return
        if local.staff and (staff or not local.customers):
            local.staff -= 1
        else:
            local.customers -= 1
        if local.staff or local.customers:
            return
        del self._local[user_id]
        now = self._clock()
        self._drop([user_id], now)
        self._queue_delta(down=[user_id])
        self._settle((user_id,), now)

    def set_availability(self, user_id: int, availability: str) -> None:
        """``user_id`` chose ``availability`` (a user nobody knows is left alone)."""
        if availability not in AVAILABILITIES:
            raise ValueError(f"unknown availability {availability!r}")
        user = self._users.get(user_id)
        if user is None:
            return
        user.availability = _Reg(availability, self._stamp(), self.node_id)
        self._queue_delta(avail=[[user_id, user.availability.dump()]])
        self._settle((user_id,), self._clock())

    # -- what this node knows ------------------------------------------------------------

    def availability(self, user_id: int) -> str:
        """``online``, ``busy`` or ``offline``."""
        user = self._users.get(user_id)
        return OFFLINE if user is None else self._shown(user_id, user, self._clock())

    def is_staff(self, user_id: int) -> bool | None:
        """Whether a known user is staff; ``None`` for a user this node does not know."""
        user = self._users.get(user_id)
        return None if user is None else user.staff

    def name(self, user_id: int) -> str | None:
        user = self._users.get(user_id)
        return None if user is None or user.name is None else user.name.value

    def staff(self) -> list[tuple[int, str, str | None]]:
        """(user_id, availability, name) of every staff member there now or within the
        grace, by user_id."""
        now = self._clock()
        found = []
        for user_id in sorted(self._staff):
            user = self._users[user_id]
            if self._there(user_id, user, now):
                name = None if user.name is None else user.name.value
                found.append((user_id, self._shown(user_id, user, now), name))
        return found

    def staff_available(self) -> bool:
        """Whether some staff member is ``online``."""
        now = self._clock()
        return any(self._shown(u, self._users[u], now) == ONLINE for u in self._staff)

    # -- time ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Do what is due by the clock: a heartbeat snapshot (once started), nodes that
        fell silent, users whose grace ran out (``on_change`` for each staff member that
        went offline). The task started by ``start`` calls it about every second."""
        now = self._clock()
        if self._ticker is not None and now >= self._next_heartbeat:
            self._next_heartbeat = now + self._heartbeat
            self._want_snapshot()
        changed: set[int] = set()
        for node, peer in list(self._peers.items()):
            silence = self._silence(peer)
            if now - peer.heard >= silence:
                log.info("presence: node %s silent for %.1f s, counted as gone", node, silence)
                del self._peers[node]
                changed |= self._drop(peer.users, peer.heard)
        changed |= {u for u in self._gone if not self._there(u, self._users[u], now)}
        self._settle(changed, now)
        dues = [self._next_heartbeat]
        dues += [peer.heard + self._silence(peer) for peer in self._peers.values()]
        for user_id in self._gone:
            left_at = self._users[user_id].left_at
            dues.append((now if left_at is None else left_at) + self._grace)
        self._due = min(dues)

    def _silence(self, peer: _Peer) -> float:
        """How long ``peer`` may stay silent: by its own heartbeat (nodes may be set up
        with different grace periods), this node's until a snapshot said it."""
        return MISSED_HEARTBEATS * (peer.heartbeat or self._heartbeat)

    async def _tick_loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("presence: tick failed")
            await asyncio.sleep(min(TICK, max(self._due - self._clock(), 0.01)))

    # -- messages from the other nodes ---------------------------------------------------

    def handle(self, data: bytes) -> None:
        """A message of the presence channel (this node's own included); never raises."""
        try:
            head, _, body = data.partition(b"\n")
            version, node_raw, kind = head.split(b"\t")
            if version != VERSION and version[:1] == b"P" and version[1:].isdigit():
                self._ratelog.warning(
                    ("version", version[:8]),
                    "presence: dropping a message of version %r (this node reads %r)",
                    version[:8],
                    VERSION,
                )
                return
            if version != VERSION:
                raise ValueError("not a presence message")
            node = node_raw.decode()
            if node == self.node_id:
                return
            if not node:
                raise ValueError("no node id")
            apply = self._read(kind, orjson.loads(body))
        except (ValueError, TypeError) as exc:  # (JSON and UTF-8 errors are ValueErrors)
            self._ratelog.warning(
                "malformed", "presence: dropping a malformed message (%s): %r", exc, data[:80]
            )
            return
        try:
            apply(node, self._clock())
        except Exception:
            log.exception("presence: a message could not be applied")

    def _read(self, kind: bytes, body: Any) -> Callable[[str, float], None]:
        """What applying the message does; raises ValueError before changing anything."""
        if not isinstance(body, dict):
            raise ValueError("the body is not an object")
        if kind == SNAPSHOT:
            entries = [_entry(raw) for raw in _list(body.get("users"))]
            beat = body.get("hb")  # (absent: a node of an earlier release, same settings)
            if beat is not None and (
                isinstance(beat, bool) or not isinstance(beat, int | float) or not beat > 0
            ):
                raise ValueError("hb is not a positive number")
            beat = None if beat is None else min(float(beat), MAX_HEARTBEAT)
            return lambda node, now: self._apply_snapshot(node, now, entries, beat)
        if kind == DELTA:
            up = [_entry(raw) for raw in _list(body.get("up", []))]
            down = [_user_id(raw) for raw in _list(body.get("down", []))]
            avail = [_availability(raw) for raw in _list(body.get("avail", []))]
            return lambda node, now: self._apply_delta(node, now, up, down, avail)
        if kind == LEAVE:
            return self._apply_leave
        raise ValueError(f"unknown kind {kind[:16]!r}")

    def _peer(self, node: str, now: float) -> _Peer:
        peer = self._peers.get(node)
        if peer is None:
            log.info("presence: node %s heard", node)
            peer = self._peers[node] = _Peer(now)
            self._want_snapshot()  # it may have just started: tell it what this node has
        peer.heard = now
        return peer

    def _apply_snapshot(
        self, node: str, now: float, entries: list[_Entry], heartbeat: float | None = None
    ) -> None:
        peer = self._peer(node, now)
        peer.heartbeat = heartbeat
        before, peer.users = peer.users, {e.user_id: e.staff for e in entries}
        changed = self._drop(before.keys() - peer.users.keys(), now)
        for e in entries:
            self._merge(e)
            changed.add(e.user_id)
        self._settle(changed, now)

    def _apply_delta(
        self,
        node: str,
        now: float,
        up: list[_Entry],
        down: list[int],
        avail: list[tuple[int, _Reg]],
    ) -> None:
        peer = self._peer(node, now)
        changed = set()
        for e in up:
            peer.users[e.user_id] = e.staff
            self._merge(e)
            changed.add(e.user_id)
        gone = [user_id for user_id in down if peer.users.pop(user_id, None) is not None]
        changed |= self._drop(gone, now)
        for user_id, reg in avail:
            self._lamport = max(self._lamport, reg.lamport)
            user = self._users.get(user_id)
            if user is not None and reg.beats(user.availability):
                user.availability = reg
                changed.add(user_id)
        self._settle(changed, now)

    def _apply_leave(self, node: str, now: float) -> None:
        peer = self._peers.pop(node, None)
        if peer is not None:
            log.info("presence: node %s left", node)
            self._settle(self._drop(peer.users, now), now)

    def _merge(self, e: _Entry) -> None:
        user = self._place_added(e.user_id, e.staff)
        for reg in (e.name, e.availability):
            if reg is not None:
                self._lamport = max(self._lamport, reg.lamport)
        if e.name is not None and e.name.beats(user.name):
            user.name = e.name
        if e.availability is not None and e.availability.beats(user.availability):
            user.availability = e.availability

    # -- the state -----------------------------------------------------------------------

    def _connected(self, user_id: int) -> bool:
        return user_id in self._local or any(user_id in p.users for p in self._peers.values())

    def _there(self, user_id: int, user: _User, now: float) -> bool:
        if user_id not in self._gone:
            return True
        return user.left_at is not None and now - user.left_at < self._grace

    def _shown(self, user_id: int, user: _User, now: float) -> str:
        if not self._there(user_id, user, now):
            return OFFLINE
        return ONLINE if user.availability is None else user.availability.value

    def _place_added(self, user_id: int, staff: bool) -> _User:
        """A connection of ``user_id`` (on this node or another) is there."""
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = _User()
        if staff and not user.staff:
            user.staff = True
            self._staff.add(user_id)
        self._gone.discard(user_id)
        return user

    def _drop(self, user_ids: Iterable[int], at: float) -> set[int]:
        """The connections of ``user_ids`` at one place closed at ``at`` (the place no
        longer lists them); returns the users."""
        dropped = set(user_ids)
        for user_id in dropped:
            user = self._users.get(user_id)
            if user is None:
                continue
            user.left_at = at if user.left_at is None else max(user.left_at, at)
            if not self._connected(user_id):
                self._gone.add(user_id)
        return dropped

    def _settle(self, user_ids: Iterable[int], now: float) -> None:
        """Tell ``on_change`` what changed for these users; forget those no longer there."""
        for user_id in user_ids:
            user = self._users.get(user_id)
            if user is None:
                continue
            shown = self._shown(user_id, user, now)
            if user.staff and shown != user.told:
                user.told = shown
                self._tell(user_id, shown)
            if not self._there(user_id, user, now):
                del self._users[user_id]
                self._gone.discard(user_id)
                self._staff.discard(user_id)

    def _tell(self, user_id: int, availability: str) -> None:
        callback = self.on_change
        if callback is None:
            return
        try:
            callback(user_id, availability)
        except Exception:
            log.exception("presence: on_change failed")

    def _stamp(self) -> int:
        self._lamport += 1
        return self._lamport

    # -- publishing ----------------------------------------------------------------------

    def _entry(self, user_id: int, local: _Local, user: _User) -> list[object]:
        name = None if user.name is None else user.name.dump()
        availability = None if user.availability is None else user.availability.dump()
        return [user_id, local.staff > 0, name, availability]

    def _snapshot(self) -> bytes:
        users = [self._entry(u, local, self._users[u]) for u, local in self._local.items()]
        body = {"users": users, "hb": self._heartbeat}
        return self._head + SNAPSHOT + b"\n" + orjson.dumps(body)

    def _queue_delta(
        self,
        *,
        up: list[list[object]] | None = None,
        down: list[int] | None = None,
        avail: list[list[object]] | None = None,
    ) -> None:
        if self._stopped or not self._broker.shared:
            return
        body = {"up": up or [], "down": down or [], "avail": avail or []}
        self._outbox.append(self._head + DELTA + b"\n" + orjson.dumps(body))
        if len(self._outbox) > MAX_OUTBOX:
            self._outbox.clear()  # one snapshot says what they would
            self._snapshot_wanted = True
        self._kick()

    def _want_snapshot(self) -> None:
        if self._stopped or not self._broker.shared:
            return
        self._snapshot_wanted = True
        self._kick()

    def _kick(self) -> None:
        """Make sure the publisher runs: the callers never wait for the broker."""
        if self._publisher is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (yet): the next snapshot says it
                return
            self._publisher = loop.create_task(self._publish_loop())

    async def _publish_loop(self) -> None:
        try:
            while self._outbox or self._snapshot_wanted:
                batch = list(self._outbox)
                self._outbox.clear()
                if self._snapshot_wanted:
                    self._snapshot_wanted = False
                    batch.append(self._snapshot())  # built now: it says the latest
                try:
                    async with asyncio.timeout(PUBLISH_TIMEOUT):
                        await self._broker.publish_many([(self.channel, m) for m in batch])
                except (AppError, TimeoutError) as exc:
                    # The next heartbeat's snapshot repairs the other nodes' view.
                    reason = exc.message if isinstance(exc, AppError) else "timed out"
                    self._ratelog.warning(
                        "publish",
                        "presence: %d messages not published: %s",
                        len(batch),
                        reason,
                    )
                    if self._publish_failed is not None:
                        self._publish_failed("presence", len(batch))
        finally:
            self._publisher = None


def _list(raw: Any) -> list[Any]:
    if not isinstance(raw, list):
        raise ValueError("a list was expected")
    return raw


def _user_id(raw: Any) -> int:
    if type(raw) is not int:
        raise ValueError(f"a user id is an integer, not {raw!r}")
    return raw


def _reg(raw: Any, allowed: frozenset[str] | None = None) -> _Reg | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 3:
        raise ValueError("a register is [value, lamport, node]")
    value, lamport, node = raw
    if type(value) is not str or (allowed is not None and value not in allowed):
        raise ValueError(f"a register's value {value!r} is not allowed")
    if type(lamport) is not int or lamport < 0 or type(node) is not str or not node:
        raise ValueError("a register's stamp is a natural number and a node id")
    return _Reg(value, lamport, node)


def _entry(raw: Any) -> _Entry:
    if not isinstance(raw, list) or len(raw) != 4 or type(raw[1]) is not bool:
        raise ValueError("an entry is [user_id, staff, name, availability]")
    user_id, staff, name, availability = raw
    return _Entry(_user_id(user_id), staff, _reg(name), _reg(availability, AVAILABILITIES))


def _availability(raw: Any) -> tuple[int, _Reg]:
    if not isinstance(raw, list) or len(raw) != 2 or raw[1] is None:
        raise ValueError("an availability is [user_id, register]")
    reg = _reg(raw[1], AVAILABILITIES)
    assert reg is not None
    return _user_id(raw[0]), reg
