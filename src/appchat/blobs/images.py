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
import struct
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError, features

from ..protocol import defaults
from ..protocol.errors import BadRequest, TooLarge, UnsupportedType
from . import BlobStore

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


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What one image may cost the node: pixels, memory while it is decoded, and (JPEG)
    the scans the decoder makes a pass over the whole image for."""

    max_pixels: int = defaults.MAX_IMAGE_PIXELS
    max_decode_memory: int = defaults.MAX_DECODE_MEMORY
    max_jpeg_scans: int = defaults.MAX_JPEG_SCANS


# Bytes the decoder holds per pixel of the canvas while an image is checked and made
# small, measured (bench/uploads.py): Pillow keeps 1-byte modes (L, P) at 1 byte a pixel
# and the others at 4; making an image with alpha small copies it once more (premultiplied
# alpha). libwebp's animation decoder, which Pillow uses for every WebP, keeps two canvases
# of 4 bytes a pixel, hands a third to Python, which copies it into the image: 16, and
# about 2 more for the still image's own decoding.
WEBP_BYTES_PER_PIXEL = 18
ONE_BYTE_MODES = frozenset({"1", "L", "P"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def decode_memory(kind: str, width: int, height: int, mode: str | None) -> int:
    """The bytes decoding an image of ``width`` x ``height`` (after a JPEG's reduction)
    in ``mode`` takes here (``mode`` None: not known yet, WebP only)."""
    pixels = width * height
    if kind == "image/webp":
        return pixels * WEBP_BYTES_PER_PIXEL
    per_pixel = 1 if mode in ONE_BYTE_MODES else 4
    return pixels * per_pixel * (2 if mode in ALPHA_MODES else 1)


def inspect(
    data: bytes,
    *,
    thumbnail_size: int = defaults.THUMBNAIL_SIZE,
    max_pixels: int = defaults.MAX_IMAGE_PIXELS,
    limits: ImageLimits | None = None,
) -> ImageInfo:
    """Check ``data`` is a whole PNG, JPEG, WebP or GIF image by its content (never by a
    name or a declared type) and make its thumbnail. CPU-bound: run it in a thread.

    Raises ``UnsupportedType`` for anything else (a truncated or corrupt image too) and
    ``TooLarge`` for an image over ``limits`` (``max_pixels`` pixels without them): its
    size and structure are read from its header before any decoder sees it."""
    limits = limits or ImageLimits(max_pixels=max_pixels)
    kind = sniff(data)
    if kind is None:
        raise UnsupportedType()
    width, height = _precheck(kind, data, limits)
    try:
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as im:
            if FORMATS.get(str(im.format)) != kind:
                raise UnsupportedType()
            _check_pixels(max(width, im.width), max(height, im.height), limits)
            width, height = im.size
            im.verify()  # structure and checksums, without decoding
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as im:
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # shown turned by 90 degrees
                width, height = height, width
            im.draft("RGB", (thumbnail_size, thumbnail_size))  # JPEG: decode at a lower scale
            _check_memory(decode_memory(kind, im.width, im.height, im.mode), limits)
            # Decoded once, made small in place (a corrupt image fails here); only the small
            # image is turned upright and copied: memory is one decoded image at most.
            im.thumbnail((thumbnail_size, thumbnail_size))
            thumbnail, thumbnail_type = _encode_thumbnail(ImageOps.exif_transpose(im))
    except (TooLarge, UnsupportedType):
        raise
    except Image.DecompressionBombError:
        raise TooLarge(f"the image has more than {limits.max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise UnsupportedType() from None
    except (OSError, SyntaxError, ValueError, EOFError, KeyError, IndexError, TypeError):
        # Pillow reports a damaged file in many ways.
        raise UnsupportedType(DAMAGED) from None
    return ImageInfo(kind, width, height, thumbnail, thumbnail_type)


DAMAGED = "the image is damaged or truncated"


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise TooLarge(
            f"the image has {width}x{height} pixels; at most {limits.max_pixels} are taken"
        )


def _check_memory(needed: int, limits: ImageLimits) -> None:
    if needed > limits.max_decode_memory:
        mib = 1024 * 1024
        raise TooLarge(
            f"decoding this image would take about {-(-needed // mib)} MiB; "
            f"at most {limits.max_decode_memory // mib} MiB are taken"
        )


def _precheck(kind: str, data: bytes, limits: ImageLimits) -> tuple[int, int]:
    """The canvas size from the header, refused (``TooLarge``) over the limits before any
    decoder allocates for it; a GIF's structure, a JPEG's scans. ``(0, 0)``: Pillow decides."""
    if kind == "image/png":
        if data[12:16] != b"IHDR" or len(data) < 24:
            raise UnsupportedType()  # the signature, then no PNG
        width, height = struct.unpack(">II", data[16:24])
    elif kind == "image/gif":
        width, height = _gif_canvas(data)
    elif kind == "image/webp":
        width, height = _webp_canvas(data)
        _check_pixels(width, height, limits)
        _check_memory(decode_memory(kind, width, height, None), limits)
    else:
        width, height, scans = _jpeg_layout(data)
        if scans > limits.max_jpeg_scans:
            raise TooLarge(
                f"the JPEG has {scans} scans; at most {limits.max_jpeg_scans} are taken "
                "(each is a pass over the whole image)"
            )
    _check_pixels(width, height, limits)
    return width, height


def _gif_canvas(data: bytes) -> tuple[int, int]:
    """The canvas a GIF's frames cover (Pillow grows the logical screen to hold a frame
    that overflows it), after checking every block is whole up to the trailer: a GIF cut
    short is refused even when its first frame is whole."""
    if len(data) < 13:
        raise UnsupportedType()
    width, height, flags = struct.unpack("<HHB", data[6:11])
    pos = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
    end = len(data)
    while pos < end:
        block = data[pos]
        if block == 0x3B:  # the trailer
            return width, height
        if block == 0x21:  # an extension: label, then sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # an image: descriptor, colour table, LZW size, sub-blocks
            if pos + 10 > end:
                break
            x, y, w, h, flags = struct.unpack("<HHHHB", data[pos + 1 : pos + 10])
            width, height = max(width, x + w), max(height, y + h)
            pos += 10 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
            pos = _skip_sub_blocks(data, pos + 1)
        else:
            break
    raise UnsupportedType(DAMAGED)


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    end = len(data)
    while pos < end:
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos
    return end + 1  # cut short: no trailer can follow


def _webp_canvas(data: bytes) -> tuple[int, int]:
    """The canvas of a WebP, from its first chunk (as libwebp reads it)."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return (
            int.from_bytes(data[24:27], "little") + 1,
            int.from_bytes(data[27:30], "little") + 1,
        )
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    raise UnsupportedType()


# In a JPEG's entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart
# marker; anything else starts the next marker (0xFF runs are fill).
_NEXT_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_layout(data: bytes) -> tuple[int, int, int]:
    """A JPEG's frame size and its number of scans, from its markers (no decoding)."""
    width = height = scans = 0
    pos, end = 2, len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length
            pos += 2
            continue
        after = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF and pos + 9 <= end:
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
        if marker == 0xDA:
            scans += 1
            found = _NEXT_MARKER.search(data, after)
            if found is None:
                break
            after = found.start()
        pos = after
    return width, height, scans


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

    async def remove(self, content: str) -> None:
        """Delete the upload (and its thumbnail) an image message's ``content`` refers to;
        other content names nothing of ours."""
        upload = parse_reference(content)
        if upload is not None and self._blobs is not None:
            await self._blobs.delete(upload.thumbnail_key)
            await self._blobs.delete(upload.key)
