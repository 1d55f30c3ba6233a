"""images.py with plain values: what an upload must be, references, the message check."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from appchat.app.cli import build_parser
from appchat.app.config import Settings, check_limits, settings_from, upload_directory
from appchat.blobs.images import (
    ImageLimits,
    ImageReferences,
    Upload,
    decode_memory,
    inspect,
    parse_reference,
    sniff,
)
from appchat.blobs.local import LocalBlobStore
from appchat.protocol import defaults
from appchat.protocol.errors import BadRequest, ConfigError, TooLarge, UnsupportedType

from .hostile_images import animated_gif, animated_webp, huge_png, many_scans_jpeg


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def test_size_type_and_thumbnail_of_each_format() -> None:
    for fmt, kind in (
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
    ):
        data = encode(Image.new("RGB", (1000, 250), (0, 90, 200)), fmt)
        info = inspect(data)
        assert (info.content_type, info.width, info.height) == (kind, 1000, 250)
        assert sniff(data) == kind
        with Image.open(io.BytesIO(info.thumbnail)) as thumb:
            assert thumb.size == (320, 80)
            assert Image.MIME[str(thumb.format)] == info.thumbnail_type


def test_a_small_image_keeps_its_size_in_the_thumbnail() -> None:
    info = inspect(encode(Image.new("RGB", (40, 30)), "PNG"))
    with Image.open(io.BytesIO(info.thumbnail)) as thumb:
        assert thumb.size == (40, 30)


def test_transparency_survives_in_the_thumbnail() -> None:
    info = inspect(encode(Image.new("RGBA", (400, 400), (255, 0, 0, 0)), "PNG"))
    with Image.open(io.BytesIO(info.thumbnail)) as thumb:
        assert thumb.mode == "RGBA"
        assert thumb.getpixel((10, 10))[3] == 0  # type: ignore[index]


def test_exif_orientation_turns_the_reported_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # turned by 90 degrees when shown
    data = encode(Image.new("RGB", (600, 200)), "JPEG", exif=exif.tobytes())
    info = inspect(data)
    assert (info.width, info.height) == (200, 600)
    with Image.open(io.BytesIO(info.thumbnail)) as thumb:
        assert thumb.size == (107, 320)


def test_an_animated_gif_is_accepted() -> None:
    frames = [Image.new("P", (64, 64), i) for i in range(3)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert inspect(data).content_type == "image/gif"


def test_too_many_pixels_are_refused_before_decoding() -> None:
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(TooLarge):
        inspect(data, max_pixels=3000 * 3000 - 1)
    assert inspect(data, max_pixels=3000 * 3000).width == 3000


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x89PNG\r\n\x1a\n",
        b"\x89PNG\r\n\x1a\n<script>alert(1)</script>",
        b"\xff\xd8\xff\xe0 not really a JPEG",
        b"RIFF\x10\x00\x00\x00WEBPVP8 junk",
        b'<svg xmlns="http://www.w3.org/2000/svg"/>',
        encode(Image.new("RGB", (20, 20)), "BMP"),
        encode(Image.new("RGB", (20, 20)), "TIFF"),
        encode(Image.new("RGB", (200, 200)), "PNG")[:-30],  # the end cut off
        encode(Image.effect_noise((200, 200), 50).convert("RGB"), "JPEG")[:2000],
    ],
)
def test_anything_else_is_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedType):
        inspect(data)


def test_references() -> None:
    upload = Upload.new(100)
    assert len(upload.id) == 32 and upload.id != Upload.new(100).id
    assert parse_reference(upload.reference) == upload
    assert upload.key == f"100/{upload.id}" and upload.thumbnail_key == upload.key + ".thumb"
    assert upload.thumbnail_path == upload.reference + "/thumb"
    for bad in (
        "/files/0/" + "a" * 32,
        "/files/0100/" + "a" * 32,
        "/files/9223372036854775808/" + "a" * 32,  # above 2^63 - 1
        "/files/100/" + "a" * 31,
        "/files/100/" + "A" * 32,
        "files/100/" + "a" * 32,
        "/files/100/" + "a" * 32 + "\n",
        "https://example.com/files/100/" + "a" * 32,
    ):
        assert parse_reference(bad) is None, bad


async def test_the_message_check_wants_an_upload_of_the_same_conversation(
    tmp_path: Path,
) -> None:
    blobs = LocalBlobStore(tmp_path)
    await blobs.open()
    uploaded = Upload.new(100)
    await blobs.put(uploaded.key, b"bytes")
    check = ImageReferences(blobs).check
    await check(uploaded.reference, 100)
    strict = ImageReferences(blobs, policy="uploads-only").check
    await strict(uploaded.reference, 100)
    for content, app in (
        (uploaded.reference, 101),
        (Upload.new(100).reference, 100),
    ):
        for each in (check, strict):
            with pytest.raises(BadRequest):
                await each(content, app)
    # Anything that is no reference is stored as sent, as the original server did, unless
    # the deployment takes uploads only.
    for content in ("hello", "https://example.com/a.png", uploaded.reference + "/thumb"):
        await check(content, 100)
        with pytest.raises(BadRequest):
            await strict(content, 100)
    await ImageReferences().check(Upload.new(100).reference, 100)  # form only
    with pytest.raises(ValueError):
        ImageReferences(policy="some")


def test_the_image_policy_option() -> None:
    assert settings_from(build_parser({}).parse_args(["serve"])).images == "any"
    ns = build_parser({"APPCHAT_IMAGES": "uploads-only"}).parse_args(["serve"])
    assert settings_from(ns).images == "uploads-only"
    ns = build_parser({}).parse_args(["serve", "--images", "all"])
    with pytest.raises(ConfigError, match="--images 'all'"):
        check_limits(settings_from(ns))


def test_upload_settings() -> None:
    assert Settings().max_upload == defaults.MAX_UPLOAD == 10 * 1024 * 1024
    ns = build_parser({"APPCHAT_MAX_UPLOAD": "12345"}).parse_args(["serve"])
    assert settings_from(ns).max_upload == 12345
    ns = build_parser({}).parse_args(["serve", "--max-upload", "99", "--upload-dir", "/srv/x"])
    assert (settings_from(ns).max_upload, settings_from(ns).upload_dir) == (99, "/srv/x")
    with pytest.raises(ConfigError):
        check_limits(Settings(max_upload=0))
    assert upload_directory(Settings(database="sqlite:////var/lib/a/chat.db")) == Path(
        "/var/lib/a/appchat-uploads"
    )
    assert upload_directory(Settings(database="postgresql://x@h/db")) == Path("appchat-uploads")
    assert upload_directory(Settings(upload_dir="/srv/u")) == Path("/srv/u")


# --- what decoding may cost (issue 17) -------------------------------------------------------


def test_decode_memory_follows_the_decoder() -> None:
    assert decode_memory("image/png", 1000, 1000, "L") == 1_000_000
    assert decode_memory("image/gif", 1000, 1000, "P") == 1_000_000
    assert decode_memory("image/png", 1000, 1000, "RGB") == 4_000_000
    assert decode_memory("image/png", 1000, 1000, "RGBA") == 8_000_000
    assert decode_memory("image/webp", 1000, 1000, None) == 18_000_000
    # 4000x4000 WebP: 275 MiB, over the default; 3800x3800: 248 MiB, under it
    assert decode_memory("image/webp", 4000, 4000, None) > defaults.MAX_DECODE_MEMORY
    assert decode_memory("image/webp", 3800, 3800, None) < defaults.MAX_DECODE_MEMORY


def test_a_webp_is_refused_before_its_decoder_allocates() -> None:
    with pytest.raises(TooLarge, match="275 MiB"):
        inspect(animated_webp(4000, 4000, frames=2))
    small = ImageLimits(max_decode_memory=18 * 200 * 200)
    assert inspect(animated_webp(200, 200, frames=2), limits=small).width == 200
    with pytest.raises(TooLarge):
        inspect(animated_webp(201, 200, frames=2), limits=small)


def test_an_alpha_png_counts_twice_its_pixels() -> None:
    data = encode(Image.new("RGBA", (100, 100)), "PNG")
    assert inspect(data, limits=ImageLimits(max_decode_memory=80_000)).width == 100
    with pytest.raises(TooLarge):
        inspect(data, limits=ImageLimits(max_decode_memory=79_999))


def test_jpeg_scans_are_counted_before_decoding() -> None:
    limits = ImageLimits(max_jpeg_scans=10)
    assert inspect(many_scans_jpeg(64, 64, 9), limits=limits).width == 64  # 10 scans
    with pytest.raises(TooLarge, match="11 scans"):
        inspect(many_scans_jpeg(64, 64, 10), limits=limits)
    exif = Image.Exif()
    exif[0x010E] = "\xff\xda" * 50  # markers' bytes inside a segment are no scans
    progressive = encode(Image.new("RGB", (64, 64)), "JPEG", progressive=True, exif=exif)
    assert inspect(progressive, limits=limits).width == 64


def test_a_gif_cut_short_is_refused_even_with_a_whole_first_frame() -> None:
    gif = animated_gif(64, 64, frames=3)
    assert inspect(gif).width == 64
    for cut in range(1, 40):
        with pytest.raises(UnsupportedType, match="truncated"):
            inspect(gif[:-cut])


def test_a_gif_frame_beyond_its_screen_counts_its_extent() -> None:
    gif = bytearray(encode(Image.new("P", (10, 10)), "GIF"))
    at = gif.index(b"\x2c\x00\x00\x00\x00")  # the image descriptor, at (0, 0)
    gif[at + 5 : at + 9] = (60000).to_bytes(2, "little") * 2  # a 60000x60000 frame
    with pytest.raises(TooLarge, match="60000x60000"):
        inspect(bytes(gif))


def test_a_signature_then_something_else_is_no_image_not_a_damaged_one() -> None:
    for data in (b"\x89PNG\r\n\x1a\n<html>", b"GIF89a<svg>", b"RIFF\0\0\0\0WEBPVP8Z"):
        with pytest.raises(UnsupportedType, match="not a PNG, JPEG, WebP or GIF"):
            inspect(data)


def test_a_huge_png_is_too_large_not_unsupported() -> None:
    with pytest.raises(TooLarge, match="100000x100000"):
        inspect(huge_png(100_000, 100_000))
    # Above Pillow's own bomb limit too, whatever max_pixels says.
    with pytest.raises(TooLarge):
        inspect(huge_png(20_000, 20_000), limits=ImageLimits(max_pixels=10**9))


def test_upload_limits_settings() -> None:
    ns = build_parser({"APPCHAT_MAX_DECODE_MEMORY": "1000", "APPCHAT_UPLOAD_RATE": "0"}).parse_args(
        ["serve", "--max-jpeg-scans", "7", "--upload-timeout", "5"]
    )
    settings = settings_from(ns)
    assert (settings.max_decode_memory, settings.upload_rate) == (1000, 0)
    assert (settings.max_jpeg_scans, settings.upload_timeout) == (7, 5)
    assert settings.max_uploads_per_user == defaults.MAX_UPLOADS_PER_USER == 4
    for bad in (
        Settings(max_decode_memory=0),
        Settings(max_jpeg_scans=0),
        Settings(max_uploads_per_user=0),
        Settings(upload_rate=-1),
        Settings(upload_rate=float("nan")),
        Settings(upload_timeout=float("nan")),
        Settings(upload_timeout=0),
    ):
        with pytest.raises(ConfigError):
            check_limits(bad)
