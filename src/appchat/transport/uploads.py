"""Images over HTTP: ``POST /upload`` and ``GET /files/<application_id>/<id>[/thumb]``.

Both take the WebSocket's JWT as ``Authorization: Bearer <token>``; the participant is the
one the token names, or ``?sid=`` checked exactly as the WebSocket checks its query.
A download is served to those who may read the conversation the image was uploaded for;
to everyone else, and for a file that does not exist, the answer is the same 404.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web

from .. import defaults
from ..auth import TokenVerifier, bind, named_participant, parse_id
from ..blobs import BlobStore
from ..errors import (
    AppError,
    BadRequest,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedType,
)
from ..images import EXTENSIONS, Upload, inspect, sniff
from ..models import Principal
from ..service import ChatService

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
READ_IDLE = 30.0  # seconds an upload may send nothing before it is refused
FORM_OVERHEAD = 16 * 1024  # bytes of a request beyond the file: boundaries, small fields
MAX_FIELD = 64  # bytes of a text field
MAX_PARTS = 8
DECODING_AT_ONCE = 2  # images decoded at once per node
STATUS = {
    BadRequest.code: 400,
    Unauthorized.code: 401,
    NotFound.code: 404,
    TooLarge.code: 413,
    UnsupportedType.code: 415,
    Unavailable.code: 503,
}
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
        thumbnail_size: int = defaults.THUMBNAIL_SIZE,
        max_pixels: int = defaults.MAX_IMAGE_PIXELS,
    ) -> None:
        self._service = service
        self._verifier = verifier
        self._blobs = blobs
        self._max_upload = max_upload
        self._trust_query_sid = trust_query_sid
        self._thumbnail_size = thumbnail_size
        self._max_pixels = max_pixels
        # Decoding an image takes a core and up to ~4 bytes a pixel (200 MB at the pixel
        # limit): two at a time, whatever the cores, so uploads cannot exhaust memory.
        self._decoding = asyncio.Semaphore(DECODING_AT_ONCE)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/files/{application_id}/{id}", self.download)
        app.router.add_get("/files/{application_id}/{id}/thumb", self.download_thumbnail)

    # --- who is asking ---------------------------------------------------------------------------

    def _principal(self, request: web.Request) -> Principal:
        """The token of ``Authorization: Bearer``, bound to its participant."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send the token as Authorization: Bearer <token>")
        claims = self._verifier.verify(token.strip())
        raw = request.query.get("sid")
        if raw:
            sid = parse_id(raw)
            if sid is None:
                raise BadRequest("sid must be a positive 64-bit integer")
        else:
            sid = named_participant(claims, trust_query_sid=self._trust_query_sid)
            if sid is None:
                raise Unauthorized("this token names no participant: add ?sid=<your id>")
        return bind(claims, sid, trust_query_sid=self._trust_query_sid)

    # --- POST /upload ----------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        try:
            return await self._upload(request)
        except AppError as exc:
            return _error(exc)

    async def _upload(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        length = request.content_length
        if length is not None and length > self._max_upload + FORM_OVERHEAD:
            raise self._too_large()
        if request.content_type != "multipart/form-data":
            raise BadRequest("send multipart/form-data with the fields application_id and file")
        try:
            reader = await request.multipart()
        except ValueError as exc:  # aiohttp: no boundary, or one too long
            raise BadRequest(f"malformed multipart body: {exc}") from None
        application_id: int | None = None
        data: bytes | None = None
        for _ in range(MAX_PARTS + 1):
            part = await _next_part(reader)
            if part is None:
                break
            if part.name in ("application_id", "session_channel"):
                application_id = _application_id(await self._field(part))
                # Known before the file (as browsers send it): refuse before reading it.
                await self._service.conversation_for(principal, application_id)
            elif part.name == "file":
                if data is not None:
                    raise BadRequest("send one file per upload")
                data = await self._read_file(part)
            else:
                await self._field(part)  # read and ignored
        else:
            raise BadRequest(f"at most {MAX_PARTS} form fields")
        if application_id is None:
            raise BadRequest("the form field application_id is missing")
        if data is None or not data:
            raise BadRequest("the form field file is missing or empty")
        await self._service.conversation_for(principal, application_id)
        async with self._decoding:
            info = await asyncio.to_thread(
                inspect, data, thumbnail_size=self._thumbnail_size, max_pixels=self._max_pixels
            )
        upload = Upload.new(application_id)
        # The thumbnail first: an image that exists always has one.
        await self._blobs.put(upload.thumbnail_key, info.thumbnail)
        await self._blobs.put(upload.key, data)
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

    def _too_large(self) -> TooLarge:
        return TooLarge(f"the file is larger than {self._max_upload} bytes")

    async def _read_file(self, part: BodyPartReader) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await _read_chunk(part)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self._max_upload:
                raise self._too_large()
            chunks.append(chunk)

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


async def _next_part(reader: MultipartReader) -> BodyPartReader | None:
    try:
        async with asyncio.timeout(READ_IDLE):
            part = await reader.next()
    except TimeoutError:
        raise BadRequest("the upload stalled") from None
    except ValueError as exc:  # aiohttp: a malformed multipart body
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
    status = STATUS.get(exc.code, 500)
    headers: dict[str, Any] = dict(JSON_HEADERS)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="appchat"'
    if status == 413:
        headers["Connection"] = "close"  # the rest of the body is not read
    return web.json_response(
        {"error": {"code": exc.code, "message": exc.message}}, status=status, headers=headers
    )
