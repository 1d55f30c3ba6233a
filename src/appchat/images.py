"""Images (``content_type`` 2): what an upload must be, the reference a message carries,
and the check SendMessage makes on it.

A reference is the image's download path, ``/files/<application_id>/<id>``: it names the
conversation it was uploaded for and an unguessable id (128 random bits), so SendMessage
checks the binding from the text alone and the existence with one look-up.

The original server stored whatever ``content`` an image message carried (an image URL of
the client's own backend, a file name), so by default any other content is stored as sent
(``--images any``); ``--images uploads-only`` refuses it. A reference is always checked:
pages show only references inline, so one must name an upload of its own conversation.
"""

from __future__ import annotations

import io
import re
import secrets
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError, features

from . import defaults
from .blobs import BlobStore
from .errors import BadRequest, TooLarge, UnsupportedType

IMAGE = 2  # content_type
# --images: what the content of an image message may be besides a reference.
ANY = "any"  # anything, stored as sent (as the original server did)
UPLOADS_ONLY = "uploads-only"  # only references of uploads to the same conversation
POLICIES = (ANY, UPLOADS_ONLY)
# Pillow format -> Content-Type; no other decoder is ever tried on an upload.
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
REFERENCE = re.compile(r"/files/([1-9][0-9]{0,18})/([0-9a-f]{32})")
NOT_A_REFERENCE = (
    "content of an image message (content_type 2) must be the reference of an image "
    "uploaded for this conversation (POST /upload)"
)
THUMBNAIL_SUFFIX = ".thumb"


@dataclass(frozen=True, slots=True)
class Upload:
    """Where an upload lives: the conversation's application and the image's id."""

    application_id: int
    id: str

    @classmethod
    def new(cls, application_id: int) -> Upload:
        return cls(application_id, secrets.token_hex(16))

    @property
    def reference(self) -> str:
        return f"/files/{self.application_id}/{self.id}"

    @property
    def thumbnail_path(self) -> str:
        return self.reference + "/thumb"

    @property
    def key(self) -> str:
        return f"{self.application_id}/{self.id}"

    @property
    def thumbnail_key(self) -> str:
        return self.key + THUMBNAIL_SUFFIX


def parse_reference(text: str) -> Upload | None:
    match = REFERENCE.fullmatch(text)
    if match is None:
        return None
    application_id = int(match.group(1))
    if application_id > 2**63 - 1:
        return None
    return Upload(application_id, match.group(2))


@dataclass(frozen=True, slots=True)
class ImageInfo:
    content_type: str
    width: int
    height: int
    thumbnail: bytes
    thumbnail_type: str


def inspect(
    data: bytes,
    *,
    thumbnail_size: int = defaults.THUMBNAIL_SIZE,
    max_pixels: int = defaults.MAX_IMAGE_PIXELS,
) -> ImageInfo:
    """Check ``data`` is a whole PNG, JPEG, WebP or GIF image by its content (never by a
    name or a declared type) and make its thumbnail. CPU-bound: run it in a thread.

    Raises ``UnsupportedType`` for anything else (a truncated or corrupt image too) and
    ``TooLarge`` for more than ``max_pixels`` pixels."""
    try:
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as im:
            kind = FORMATS[str(im.format)]
            if im.width * im.height > max_pixels:
                raise TooLarge(
                    f"the image has {im.width}x{im.height} pixels; at most {max_pixels} are taken"
                )
            width, height = im.size
            im.verify()  # structure and checksums, without decoding
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as im:
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # shown turned by 90 degrees
                width, height = height, width
            im.draft("RGB", (thumbnail_size, thumbnail_size))  # JPEG: decode at a lower scale
            # Decoded once, made small in place (a corrupt image fails here); only the small
            # image is turned upright and copied: memory is one decoded image at most.
            im.thumbnail((thumbnail_size, thumbnail_size))
            thumbnail, thumbnail_type = _encode_thumbnail(ImageOps.exif_transpose(im))
    except (TooLarge, UnsupportedType):
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise UnsupportedType() from None
    except (OSError, SyntaxError, ValueError, EOFError, KeyError, IndexError, TypeError):
        # Pillow reports a damaged file in many ways.
        raise UnsupportedType("the image is damaged or truncated") from None
    return ImageInfo(kind, width, height, thumbnail, thumbnail_type)


def _encode_thumbnail(im: Image.Image) -> tuple[bytes, str]:
    """The thumbnail's bytes and type: WebP (with alpha) where Pillow has it."""
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    im = im.convert("RGBA" if has_alpha else "RGB")
    out = io.BytesIO()
    if features.check("webp"):
        im.save(out, "WEBP", quality=80)
        return out.getvalue(), "image/webp"
    if has_alpha:
        im.save(out, "PNG", optimize=True)
        return out.getvalue(), "image/png"
    im.save(out, "JPEG", quality=80)
    return out.getvalue(), "image/jpeg"


def sniff(data: bytes) -> str | None:
    """The Content-Type of a stored blob (only checked images are ever stored) by its first
    bytes."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


class ImageReferences:
    """The check SendMessage makes on the content of an image message. A reference must
    name this conversation (no I/O) and, with ``blobs``, an upload that exists (one
    existence check); other content is stored as sent unless ``policy`` is
    ``uploads-only``."""

    def __init__(self, blobs: BlobStore | None = None, *, policy: str = ANY) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown image policy {policy!r}")
        self._blobs = blobs
        self._uploads_only = policy == UPLOADS_ONLY

    async def check(self, content: str, application_id: int) -> None:
        upload = parse_reference(content)
        if upload is None:
            if self._uploads_only:
                raise BadRequest(NOT_A_REFERENCE)
            return
        if upload.application_id != application_id:
            raise BadRequest(NOT_A_REFERENCE)
        if self._blobs is not None and not await self._blobs.exists(upload.key):
            raise BadRequest(NOT_A_REFERENCE)
