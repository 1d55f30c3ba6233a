"""images.py with plain values: what an upload must be, references, the message check."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from appchat import defaults
from appchat.blobs.local import LocalBlobStore
from appchat.cli import build_parser
from appchat.config import Settings, check_limits, settings_from, upload_directory
from appchat.errors import BadRequest, ConfigError, TooLarge, UnsupportedType
from appchat.images import ImageReferences, Upload, inspect, parse_reference, sniff


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
