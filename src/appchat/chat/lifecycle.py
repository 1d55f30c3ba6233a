"""The data's lifecycle: a conversation exported whole (streamed), erased with its files,
a participant's messages erased, messages past the retention period deleted, and uploads
that no message shows removed. The server API's routes call the first three; the last two
run on every node by the clock (retention one node at a time)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import orjson

from ..blobs import BlobStore
from ..blobs.images import THUMBNAIL_SUFFIX, parse_reference
from ..common.ratelog import RateLimitedLog
from ..protocol import events as ev
from ..protocol.errors import AppError, NotFound
from ..protocol.models import format_ts, now_us
from ..store import Store
from .service import ChatService

log = logging.getLogger(__name__)
_failures = RateLimitedLog(log)

EXPORT_CHUNK = 500  # messages read (and written out) at once
PURGE_BATCH = 500  # messages deleted in one transaction by retention
DAY = 86_400.0
FIRST_ROUND = 5.0  # seconds after start: a node started to purge does not wait a round


class Lifecycle:
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        chat: ChatService,
        *,
        retention_days: float = 0,
        orphan_ttl: float = DAY,
        clock_us: Callable[[], int] = now_us,
        interval: float = 60.0,
    ) -> None:
        """``retention_days``: 0 keeps messages for ever; ``orphan_ttl``: seconds an
        upload may go without a message showing it; ``interval``: seconds between rounds."""
        self._store = store
        self._blobs = blobs
        self._chat = chat
        self._retention_us = int(retention_days * DAY * 1_000_000)
        self._orphan_ttl = orphan_ttl
        self._now = clock_us
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    # --- export ----------------------------------------------------------------------------

    async def export(self, application_id: int, *, public: bool = False) -> AsyncIterator[bytes]:
        """The conversation as one JSON document, written a chunk of messages at a time:
        ``{"conversation", "participants", "messages", "uploads"}`` (every message, private
        notes and deleted stubs included; ``public``: as the customer may see it, without
        the notes). ``NotFound`` before anything is written."""
        conversation = await self._store.view_conversation(application_id, public=public)
        if conversation is None:
            raise NotFound("no such conversation")
        people = await self._store.export_participants(conversation.id)
        return self._export(conversation.id, ev.conversation_obj(conversation), people, public)

    async def _export(
        self,
        conversation_id: int,
        conversation: dict[str, Any],
        people: Iterable[Any],
        public: bool,
    ) -> AsyncIterator[bytes]:
        participants = [
            {
                "user_id": p.participant.user_id,
                "staff": p.participant.staff,
                "name": p.participant.name,
                "read_position": p.read_position,
                "joined_at": format_ts(p.joined_at),
            }
            for p in people
        ]
        yield b'{"conversation":' + orjson.dumps(conversation)
        yield b',"participants":' + orjson.dumps(participants) + b',"messages":['
        application_id = conversation["application_id"]
        stub = await self._chat.conversation(application_id)
        assert stub is not None and stub.id == conversation_id
        uploads: list[str] = []
        after, first = 0, True
        while True:
            page = await self._store.list_messages(
                stub, after_id=after, limit=EXPORT_CHUNK, public=public
            )
            if not page.messages:
                break
            for m in page.messages:
                if m.content_type == 2 and parse_reference(m.content) is not None:
                    uploads.append(m.content)
            objects = b",".join(orjson.dumps(ev.message_obj(m)) for m in page.messages)
            yield (b"" if first else b",") + objects
            first = False
            after = page.messages[-1].id
            if not page.has_more:
                break
        yield b'],"uploads":' + orjson.dumps(uploads) + b"}"

    # --- erasure -----------------------------------------------------------------------------

    async def erase_conversation(self, application_id: int) -> bool:
        """Erase the conversation with its messages, participants, read positions,
        counters, search index, outbox rows and files; tell its live connections
        (Event.ConversationDeleted) and the inbox. Whether there was one."""
        erased = await self._store.erase_conversation(application_id, now=self._now())
        if erased is None:
            return False
        self._chat.forget(application_id)
        # Every file of the application's, used or not, thumbnails too.
        keys = [key for key, _when in await self._blobs.listing(f"{application_id}/")]
        await self._delete_files(keys)
        self._chat.announce_deletion(erased.conversation, erased.participants)
        return True

    async def erase_participant(self, user_id: int) -> int:
        """Every message ``user_id`` sent becomes a deleted stub and its upload goes; their
        read positions go. How many messages were erased."""
        erased = await self._store.erase_participant(user_id, now=self._now())
        await self._delete_files(_keys_of(erased.uploads))
        return erased.messages

    async def _delete_files(self, keys: Iterable[str]) -> None:
        for key in keys:
            try:
                await self._blobs.delete(key)
            except AppError as exc:  # the sweep of orphans takes it later
                _failures.warning(exc.code, "an upload was not deleted: %s", exc.message)

    # --- by the clock ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    async def _run(self) -> None:
        await asyncio.sleep(min(self._interval, FIRST_ROUND))
        while True:
            try:
                await self.expire()
                await self.sweep_orphans()
            except AppError as exc:
                _failures.warning(exc.code, "retention round failed: %s", exc.message)
            await asyncio.sleep(self._interval)

    async def expire(self) -> int:
        """Delete what is past the retention period, a small batch per transaction (each
        on its own, so requests take turns with them); uploads only those messages showed
        go too. How many messages this node deleted."""
        if not self._retention_us:
            return 0
        deleted = 0
        while True:
            expired = await self._store.expire(
                before=self._now() - self._retention_us, limit=PURGE_BATCH
            )
            if expired is None:  # another node is at it
                return deleted
            deleted += expired.messages
            for app in expired.application_ids:
                self._chat.forget(app)
            await self._delete_files(await self._unused(expired.uploads))
            if expired.messages < PURGE_BATCH:
                return deleted
            await asyncio.sleep(0)  # let the requests waiting meanwhile go first

    async def _unused(self, contents: list[str]) -> list[str]:
        keys = []
        for content in set(contents):
            upload = parse_reference(content)
            if upload is not None and not await self._store.upload_used(
                upload.application_id, content
            ):
                keys += [upload.key, upload.thumbnail_key]
        return keys

    async def sweep_orphans(self) -> int:
        """Remove uploads that no message shows, made longer than the TTL ago (and
        thumbnails whose image is gone). How many files went."""
        now = time.time()
        listed = await self._blobs.listing("")
        present = {key for key, _when in listed}
        doomed = []
        for key, written in listed:
            if key.endswith(THUMBNAIL_SUFFIX):
                if (
                    key[: -len(THUMBNAIL_SUFFIX)] not in present
                    and now - written > self._orphan_ttl
                ):
                    doomed.append(key)
                continue
            if now - written <= self._orphan_ttl:
                continue
            upload = parse_reference("/files/" + key)
            if upload is None:
                continue
            if not await self._store.upload_used(upload.application_id, upload.reference):
                doomed += [key, upload.thumbnail_key]
        await self._delete_files(doomed)
        return len(doomed)


def _keys_of(contents: Iterable[str]) -> list[str]:
    keys = []
    for content in contents:
        upload = parse_reference(content)
        if upload is not None:
            keys += [upload.key, upload.thumbnail_key]
    return keys
