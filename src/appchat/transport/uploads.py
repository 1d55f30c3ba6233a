"""Images over HTTP: ``POST /upload`` and ``GET /files/<application_id>/<id>[/thumb]``.

Both take the WebSocket's JWT as ``Authorization: Bearer <token>``; the participant is the
one the token names, or ``?sid=`` checked exactly as the WebSocket checks its query.
A download is served to those who may read the conversation the image was uploaded for;
to everyone else, and for a file that does not exist, the answer is the same 404.

An upload costs the node little whoever sends it: its body is never inflated (the server
does not decode ``Content-Encoding``; an encoded upload is refused), at most a few KiB
come before the first boundary, the body is read within ``--upload-timeout`` seconds in
all and spooled to a temporary file while it waits for one of the few decode slots, and
each identity (quota.py's) has a number of uploads at once and a rate. What decoding an
image may cost is ``images.ImageLimits``.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable
from typing import IO

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from ..auth.tokens import NO_IDS, IdRanges, TokenVerifier, parse_id
from ..blobs import BlobStore
from ..blobs.images import EXTENSIONS, ImageInfo, ImageLimits, Upload, inspect, sniff
from ..chat.service import ChatService
from ..common.metrics import Metrics
from ..common.ratelimit import TokenBucket
from ..common.ratelog import RateLimitedLog
from ..protocol import defaults
from ..protocol.errors import (
    AppError,
    BadRequest,
    NotFound,
    RateLimited,
    TooLarge,
)
from ..protocol.models import Principal
from .quota import ConnectionQuota, quota_key
from .rest import error_response, refuse_encoded, request_principal, status_of

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
READ_IDLE = 30.0  # seconds an upload may send nothing before it is refused
FORM_OVERHEAD = 16 * 1024  # bytes of a request beyond the file: boundaries, small fields
MAX_FIELD = 64  # bytes of a text field
MAX_PARTS = 8
DECODING_AT_ONCE = 2  # images decoded at once per node
PREAMBLE = 4 * 1024  # bytes before the first boundary (browsers and curl send none)
SPOOL_IN_MEMORY = 256 * 1024  # bytes of a file kept in memory; more go to a temporary file
MAX_RATE_KEYS = 100_000  # identities whose upload rate is remembered
# A stored image is never a page: no script, no plugin, no frame runs from it, even if a
# browser were to open it directly.
FILE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; sandbox",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Referrer-Policy": "no-referrer",
    # Private (it needs a token), and the bytes behind a path never change.
    "Cache-Control": "private, max-age=31536000, immutable",
    "Vary": "Authorization",
}
JSON_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


class UploadEndpoints:
    def __init__(
        self,
        service: ChatService,
        verifier: TokenVerifier,
        blobs: BlobStore,
        *,
        max_upload: int = defaults.MAX_UPLOAD,
        trust_query_sid: bool = False,
        reserved: IdRanges = NO_IDS,
        thumbnail_size: int = defaults.THUMBNAIL_SIZE,
        image_limits: ImageLimits | None = None,
        max_uploads_per_user: int = defaults.MAX_UPLOADS_PER_USER,
        upload_rate: float = defaults.UPLOAD_RATE,
        upload_timeout: float = defaults.UPLOAD_TIMEOUT,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self._service = service
        self._metrics = metrics or Metrics()
        self._verifier = verifier
        self._blobs = blobs
        self._max_upload = max_upload
        self._trust_query_sid = trust_query_sid
        self._reserved = reserved  # ids no customer may act as (--api-sender-ids)
        self._thumbnail_size = thumbnail_size
        self._limits = image_limits or ImageLimits()
        # Decoding an image takes a core and up to --max-decode-memory: two at a time,
        # whatever the cores, so uploads cannot exhaust memory.
        self._decoding = asyncio.Semaphore(DECODING_AT_ONCE)
        self._in_flight = ConnectionQuota(max_uploads_per_user)
        self._rate = upload_rate  # uploads a minute per identity (0: no limit)
        self._buckets: dict[str, TokenBucket] = {}
        self._timeout = upload_timeout
        self._monotonic = monotonic
        self._aborted = RateLimitedLog(log)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/files/{application_id}/{id}", self.download)
        app.router.add_get("/files/{application_id}/{id}/thumb", self.download_thumbnail)

    # --- who is asking ---------------------------------------------------------------------------

    def _principal(self, request: web.Request) -> Principal:
        """The token of ``Authorization: Bearer``, bound to its participant."""
        return request_principal(
            request, self._verifier, trust_query_sid=self._trust_query_sid, reserved=self._reserved
        )

    # --- POST /upload ----------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        response = await self._answer_upload(request)
        self._metrics.uploads.labels(str(response.status)).inc()
        return response

    async def _answer_upload(self, request: web.Request) -> web.Response:
        try:
            return await self._upload(request)
        except AppError as exc:
            return _error(exc)
        except (ConnectionError, BadHttpMessage) as exc:
            # The client went away mid-body (or its framing broke): nobody reads an answer.
            remote = request.remote or "?"
            self._aborted.info(
                remote,
                "upload from %s aborted: %s",
                remote,
                type(exc).__name__,
                extra={"remote": remote},
            )
            return _error(BadRequest("the upload was cut short"))

    async def _upload(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        refuse_encoded(request, "the upload")  # images are compressed already
        length = request.content_length
        if length is not None and length > self._max_upload + FORM_OVERHEAD:
            raise self._too_large()
        if request.content_type != "multipart/form-data":
            raise BadRequest("send multipart/form-data with the fields application_id and file")
        key = quota_key(principal)
        if not self._allow(key):
            raise RateLimited(
                f"more than {self._rate:g} uploads a minute for this participant, try again later"
            )
        if not self._in_flight.take(key):
            raise RateLimited(
                f"at most {self._in_flight.limit} uploads at once for this participant"
            )
        try:
            # In memory up to SPOOL_IN_MEMORY, then in a temporary file (no descriptor before).
            with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY) as spooled:
                try:
                    async with asyncio.timeout(self._timeout):
                        application_id = await self._receive(request, principal, spooled)
                except TimeoutError:
                    raise BadRequest(
                        f"the upload took longer than {self._timeout:g} s in all"
                    ) from None
                return await self._store(principal, application_id, spooled)
        finally:
            self._in_flight.give_back(key)

    def _allow(self, key: str) -> bool:
        """One upload more in ``key``'s bucket: ``--upload-rate`` a minute, as many at once."""
        if self._rate <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_RATE_KEYS:
                self._buckets.clear()  # a flood of identities: start everyone afresh
            # At least one upload at once, or a rate under 1 a minute would allow none.
            bucket = TokenBucket(self._rate / 60, max(1.0, self._rate), clock=self._monotonic)
            self._buckets[key] = bucket
        return bucket.allow()

    async def _receive(self, request: web.Request, principal: Principal, spool: IO[bytes]) -> int:
        """Read the form: its conversation (checked as soon as it is known) and the file,
        written to ``spool``."""
        try:
            reader = _Form(request.headers, request.content)
        except ValueError as exc:  # aiohttp: no boundary, or one too long
            raise BadRequest(f"malformed multipart body: {exc}") from None
        application_id: int | None = None
        has_file = False
        for _ in range(MAX_PARTS + 1):
            part = await _next_part(reader)
            if part is None:
                break
            if part.name in ("application_id", "session_channel"):
                application_id = _application_id(await self._field(part))
                # Known before the file (as browsers send it): refuse before reading it.
                await self._service.conversation_for(principal, application_id)
            elif part.name == "file":
                if has_file:
                    raise BadRequest("send one file per upload")
                has_file = True
                await self._read_file(part, spool)
            else:
                await self._field(part)  # read and ignored
        else:
            raise BadRequest(f"at most {MAX_PARTS} form fields")
        if application_id is None:
            raise BadRequest("the form field application_id is missing")
        if not spool.tell():
            raise BadRequest("the form field file is missing or empty")
        await self._service.conversation_for(principal, application_id)
        return application_id

    async def _store(
        self, principal: Principal, application_id: int, spooled: IO[bytes]
    ) -> web.Response:
        async with self._decoding:
            data, info = await asyncio.to_thread(self._inspect, spooled)
            upload = Upload.new(application_id)
            # The thumbnail first: an image that exists always has one.
            await self._blobs.put(upload.thumbnail_key, info.thumbnail)
            await self._blobs.put(upload.key, data)
        self._metrics.upload_bytes.inc(len(data))
        log.info(  # not the id: it is what messages carry, and logs hold no content
            "upload (%s, %d bytes) for application %d by %s",
            info.content_type,
            len(data),
            application_id,
            principal.sid,
            extra={"sid": principal.sid},
        )
        body = {
            "reference": upload.reference,
            "content_type": info.content_type,
            "size": len(data),
            "width": info.width,
            "height": info.height,
            "url": upload.reference,
            "thumbnail_url": upload.thumbnail_path,
            "session_channel": str(application_id),
        }
        return web.json_response(
            body, status=201, headers={**JSON_HEADERS, "Location": upload.reference}
        )

    def _inspect(self, spooled: IO[bytes]) -> tuple[bytes, ImageInfo]:
        """In a worker thread: the file back from its spool, checked, with its thumbnail."""
        spooled.seek(0)
        data = spooled.read()
        info = inspect(data, thumbnail_size=self._thumbnail_size, limits=self._limits)
        return data, info

    def _too_large(self) -> TooLarge:
        return TooLarge(f"the file is larger than {self._max_upload} bytes")

    async def _read_file(self, part: BodyPartReader, out: IO[bytes]) -> None:
        size = 0
        while chunk := await _read_chunk(part):
            size += len(chunk)
            if size > self._max_upload:
                raise self._too_large()
            out.write(chunk)

    async def _field(self, part: BodyPartReader) -> str:
        value = b""
        while chunk := await _read_chunk(part):
            value += chunk
            if len(value) > MAX_FIELD:
                raise BadRequest(f"form field {part.name} is longer than {MAX_FIELD} bytes")
        return value.decode("utf-8", "replace").strip()

    # --- GET /files/... --------------------------------------------------------------------------

    async def download(self, request: web.Request) -> web.Response:
        return await self._download(request, thumbnail=False)

    async def download_thumbnail(self, request: web.Request) -> web.Response:
        return await self._download(request, thumbnail=True)

    async def _download(self, request: web.Request, *, thumbnail: bool) -> web.Response:
        try:
            principal = self._principal(request)
            upload = _upload_of(request)
            if upload is None or not principal.may_read_application(upload.application_id):
                raise NotFound("no such file")
            etag = f'"{upload.id}{".thumb" if thumbnail else ""}"'
            if etag in request.headers.get("If-None-Match", ""):
                # Only an existing file has been seen before: look it up all the same.
                if not await self._blobs.exists(upload.key):
                    raise NotFound("no such file")
                return web.Response(status=304, headers={**FILE_HEADERS, "ETag": etag})
            data = await self._blobs.get(upload.thumbnail_key if thumbnail else upload.key)
            kind = None if data is None else sniff(data)
            if data is None or kind is None:
                raise NotFound("no such file")
        except AppError as exc:
            return _error(exc)
        name = f"{upload.id}{'-thumb' if thumbnail else ''}.{EXTENSIONS[kind]}"
        headers = {
            **FILE_HEADERS,
            "Content-Type": kind,
            "Content-Disposition": f'inline; filename="{name}"',
            "ETag": etag,
        }
        return web.Response(body=data, headers=headers)


def _upload_of(request: web.Request) -> Upload | None:
    application_id = parse_id(request.match_info["application_id"])
    upload_id = request.match_info["id"]
    if application_id is None or len(upload_id) != 32:
        return None
    if any(c not in "0123456789abcdef" for c in upload_id):
        return None
    return Upload(application_id, upload_id)


def _application_id(raw: str) -> int:
    application_id = parse_id(raw)
    if application_id is None or str(application_id) != raw:
        raise NotFound("no such conversation")  # as for a channel naming no conversation
    return application_id


if not hasattr(MultipartReader, "_readline"):  # pragma: no cover - the preamble bound needs it
    raise ImportError("aiohttp's multipart reader has no _readline: the preamble cannot be bounded")


class _Form(MultipartReader):
    """aiohttp's multipart reader, with at most ``PREAMBLE`` bytes before the first boundary
    (aiohttp reads lines until it finds one, for ever and without a pause)."""

    _preamble = PREAMBLE

    async def _readline(self) -> bytes:
        line = await super()._readline()
        if self._at_bof:
            self._preamble -= len(line)
            if self._preamble < 0:
                raise ValueError(f"more than {PREAMBLE} bytes before the first boundary")
        return line


async def _next_part(reader: MultipartReader) -> BodyPartReader | None:
    try:
        async with asyncio.timeout(READ_IDLE):
            part = await reader.next()
    except TimeoutError:
        raise BadRequest("the upload stalled") from None
    except ValueError as exc:  # aiohttp: a malformed multipart body
        raise BadRequest(f"malformed multipart body: {exc}") from None
    except BadHttpMessage as exc:  # a part's headers: no colon, too long, too many
        raise BadRequest(f"malformed multipart part headers: {exc.message}") from None
    except RuntimeError as exc:  # aiohttp: e.g. a _charset_ part it cannot use
        raise BadRequest(f"malformed multipart body: {exc}") from None
    if part is None:
        return None
    if not isinstance(part, BodyPartReader):
        raise BadRequest("nested multipart bodies are not accepted")
    return part


async def _read_chunk(part: BodyPartReader) -> bytes:
    try:
        async with asyncio.timeout(READ_IDLE):
            return await part.read_chunk(CHUNK)
    except TimeoutError:
        raise BadRequest("the upload stalled") from None
    except ValueError as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None


def _error(exc: AppError) -> web.Response:
    headers = dict(JSON_HEADERS)
    status = status_of(exc)
    if status == 413:
        headers["Connection"] = "close"  # the rest of the body is not read
    if status == 429:
        headers["Retry-After"] = "60"
    return error_response(exc, status, headers=headers)
