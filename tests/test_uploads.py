"""Images over HTTP against a real server: upload, send as a message, download."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import resource
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from .hostile_images import (
    animated_gif,
    animated_webp,
    gzip_preamble,
    huge_png,
    many_scans_jpeg,
)
from .motoserver import ENV, moto_server, new_bucket
from .support import (
    Clock,
    InProcessServer,
    Server,
    ServerProcess,
    client,
    customer,
    eventually,
    raw_token,
    staff,
    token,
)

MAX_UPLOAD = 400_000  # bytes: small, so the oversize test sends little
_apps = itertools.count(7000)


def new_app() -> int:
    return next(_apps)


def png(width: int = 640, height: int = 400, color: tuple[int, int, int] = (30, 120, 200)) -> bytes:
    image = Image.new("RGB", (width, height), color)
    for x in range(0, width, 7):  # something to compress
        image.putpixel((x, x * height // width), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(out, "JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("uploads")
    proc = InProcessServer(root / "appchat.db", "--max-upload", str(MAX_UPLOAD)).start()
    yield proc
    proc.stop()


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def form(application: int | str, data: bytes, *, filename: str = "photo.png") -> aiohttp.FormData:
    body = aiohttp.FormData()
    body.add_field("application_id", str(application))
    body.add_field("file", data, filename=filename, content_type="image/png")
    return body


async def upload(
    http: aiohttp.ClientSession,
    server: Server,
    tok: str,
    body: Any,
    *,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        server.http("/upload" + query), data=body, headers={**bearer(tok), **(headers or {})}
    ) as r:
        doc: dict[str, Any] = await r.json()
        return r.status, doc


async def fetch(
    http: aiohttp.ClientSession, server: Server, path: str, tok: str | None
) -> tuple[int, bytes, Any]:
    headers = {} if tok is None else bearer(tok)
    async with http.get(server.http(path), headers=headers) as r:
        return r.status, await r.read(), r.headers


async def conversation(server: Server, app: int, customer_sid: int) -> None:
    """Application ``app`` has its conversation, with customer ``customer_sid`` in it."""
    async with customer(server, app, customer_sid) as c:
        await c.ok("Event.AddConversation", {"application_id": app})


async def test_a_png_is_uploaded_sent_pushed_and_fetched_by_participants_only(
    server: Server, http: aiohttp.ClientSession
) -> None:
    app, other_app = new_app(), new_app()
    await conversation(server, other_app, 21)
    image = png()
    async with staff(server) as s, customer(server, app, 20) as c:
        await c.ok("Event.AddConversation", {"application_id": app})
        await s.ok("Event.AddConversation", {"application_id": app})
        status, doc = await upload(http, server, token(request_id=app, sid=20), form(app, image))
        assert status == 201, doc
        ref = doc["reference"]
        assert ref.startswith(f"/files/{app}/") and len(ref.rsplit("/", 1)[1]) == 32
        assert doc == {
            "reference": ref,
            "content_type": "image/png",
            "size": len(image),
            "width": 640,
            "height": 400,
            "url": ref,
            "thumbnail_url": ref + "/thumb",
            "session_channel": str(app),
        }

        sent = await c.ok(
            "Event.SendMessage",
            {"session_channel": str(app), "content": ref, "content_type": 2},
        )
        assert sent["message"]["content"] == ref and sent["message"]["content_type"] == 2
        pushed = await s.push("Event.ReceiveMessage")
        assert pushed["result"] == sent

    # Participants of the conversation (staff, the customer) get the very bytes.
    for tok in (token(admin_id=1), token(request_id=app, sid=20), token(admin_id=9)):
        status, body, headers = await fetch(http, server, ref, tok)
        assert status == 200 and body == image
        assert headers["Content-Type"] == "image/png"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "sandbox" in headers["Content-Security-Policy"]
        assert headers["Content-Disposition"].startswith("inline; filename=")
        assert "immutable" in headers["Cache-Control"] and "private" in headers["Cache-Control"]

    status, thumb, headers = await fetch(http, server, ref + "/thumb", token(admin_id=1))
    assert status == 200
    with Image.open(io.BytesIO(thumb)) as t:
        assert (t.width, t.height) == (320, 200)
        assert Image.MIME[str(t.format)] == headers["Content-Type"]

    # An outsider: the customer of another application, with a valid token.
    outsider = token(request_id=other_app, sid=21)
    missing = f"/files/{app}/{'0' * 32}"
    for path in (ref, ref + "/thumb", missing, "/files/1/nothex", f"/files/{other_app}/{'1' * 32}"):
        status, body, _ = await fetch(http, server, path, outsider)
        assert status == 404, path
        assert body == (await fetch(http, server, missing, outsider))[1]
    # Without a token, or with a bad one: 401 before anything is looked up.
    assert (await fetch(http, server, ref, None))[0] == 401
    assert (await fetch(http, server, ref, "not-a-token"))[0] == 401


async def test_a_revalidation_is_answered_304(server: Server, http: aiohttp.ClientSession) -> None:
    app = new_app()
    await conversation(server, app, 22)
    tok = token(request_id=app, sid=22)
    status, doc = await upload(http, server, tok, form(app, png(50, 50)))
    assert status == 201
    async with http.get(server.http(doc["url"]), headers=bearer(tok)) as r:
        etag = r.headers["ETag"]
    headers = {**bearer(tok), "If-None-Match": etag}
    async with http.get(server.http(doc["url"]), headers=headers) as r:
        assert r.status == 304 and await r.read() == b""
    headers = {**bearer(token(request_id=app + 1, sid=5)), "If-None-Match": etag}
    async with http.get(server.http(doc["url"]), headers=headers) as r:
        assert r.status == 404


@pytest.mark.parametrize(
    "body",
    [
        b"<html><script>alert(document.cookie)</script></html>",
        b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>",  # PNG magic, then HTML
        b"GIF89a<svg onload=alert(1)>",
        b"%PDF-1.4 not an image",
        png()[:300],  # a real PNG cut short
    ],
)
async def test_a_file_that_only_pretends_to_be_a_png_is_refused_with_415(
    server: Server, http: aiohttp.ClientSession, body: bytes
) -> None:
    app = new_app()
    await conversation(server, app, 23)
    status, doc = await upload(http, server, token(request_id=app, sid=23), form(app, body))
    assert status == 415, doc
    assert doc["error"]["code"] == "unsupported_type" and doc["error"]["message"]


async def test_an_svg_or_bmp_is_refused_even_though_pillow_could_read_some(
    server: Server, http: aiohttp.ClientSession
) -> None:
    app = new_app()
    await conversation(server, app, 24)
    bmp = io.BytesIO()
    Image.new("RGB", (10, 10)).save(bmp, "BMP")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    for data in (bmp.getvalue(), svg):
        status, doc = await upload(http, server, token(request_id=app, sid=24), form(app, data))
        assert status == 415, doc


async def test_jpeg_webp_and_gif_are_accepted(server: Server, http: aiohttp.ClientSession) -> None:
    app = new_app()
    await conversation(server, app, 25)
    for fmt, kind in (("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")):
        out = io.BytesIO()
        Image.new("RGB", (90, 60), (200, 0, 0)).save(out, fmt)
        # The declared name and type say PNG: only the content counts.
        status, doc = await upload(
            http, server, token(request_id=app, sid=25), form(app, out.getvalue())
        )
        assert status == 201, doc
        assert (doc["content_type"], doc["width"], doc["height"]) == (kind, 90, 60)
        got = await fetch(http, server, doc["url"], token(admin_id=1))
        assert got[0] == 200 and got[1] == out.getvalue() and got[2]["Content-Type"] == kind


async def test_an_oversize_upload_is_refused_with_413(
    server: Server, http: aiohttp.ClientSession
) -> None:
    app = new_app()
    await conversation(server, app, 26)
    tok = token(request_id=app, sid=26)
    big = jpeg(10, 10) + b"\0" * MAX_UPLOAD  # over the limit by the JPEG's size
    status, doc = await upload(http, server, tok, form(app, big))
    assert status == 413, doc
    assert doc["error"]["code"] == "too_large"

    # Without Content-Length (chunked): counted while reading, refused all the same.
    async def stream() -> AsyncIterator[bytes]:
        boundary = b"--b0undary"
        yield boundary + b'\r\nContent-Disposition: form-data; name="application_id"\r\n\r\n'
        yield str(app).encode() + b"\r\n" + boundary + b"\r\n"
        yield b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(MAX_UPLOAD // 65536 + 2):
            yield b"\0" * 65536
        yield b"\r\n" + boundary + b"--\r\n"

    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    status, doc = await upload(http, server, tok, stream(), headers=headers)
    assert status == 413, doc

    # Just under the limit is taken.
    status, doc = await upload(http, server, tok, form(app, png()))
    assert status == 201


async def test_no_token_or_a_bad_one_is_refused_with_401(
    server: Server, http: aiohttp.ClientSession
) -> None:
    app = new_app()
    await conversation(server, app, 27)
    now = time.time()
    bad = [
        "",
        "garbage",
        token(request_id=app, sid=27, secret="another-secret-" + "x" * 40),
        raw_token({"request_id": app, "sid": 27, "exp": now - 10}),
        raw_token({"sid": 27, "exp": now + 60}),  # neither admin_id nor request_id
    ]
    for tok in bad:
        status, doc = await upload(http, server, tok, form(app, png(20, 20)))
        assert status == 401, (tok, doc)
        assert doc["error"]["code"] == "unauthorized"
    async with http.post(server.http("/upload"), data=form(app, png(20, 20))) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    # The sid named in the query must be the token's participant, as for the WebSocket.
    status, _ = await upload(
        http, server, token(request_id=app, sid=27), form(app, png(20, 20)), query="?sid=28"
    )
    assert status == 401


async def test_another_application_looks_exactly_like_a_missing_conversation(
    server: Server, http: aiohttp.ClientSession
) -> None:
    mine, theirs, nobody = new_app(), new_app(), new_app()
    await conversation(server, mine, 30)
    await conversation(server, theirs, 31)
    tok = token(request_id=mine, sid=30)
    answers = [await upload(http, server, tok, form(app, png(20, 20))) for app in (theirs, nobody)]
    assert answers[0] == answers[1]
    assert answers[0][0] == 404 and answers[0][1]["error"]["code"] == "not_found"
    # Staff may upload to any existing conversation, and get the same 404 for a missing one.
    assert (await upload(http, server, token(admin_id=1), form(theirs, png(20, 20))))[0] == 201
    assert await upload(http, server, token(admin_id=1), form(nobody, png(20, 20))) == answers[0]
    # A channel that is no canonical id names no conversation either.
    assert (await upload(http, server, tok, form(f"0{mine}", png(20, 20))))[0] == 404


async def test_malformed_forms_are_refused_with_400(
    server: Server, http: aiohttp.ClientSession
) -> None:
    app = new_app()
    await conversation(server, app, 32)
    tok = token(request_id=app, sid=32)
    no_file = aiohttp.FormData()
    no_file.add_field("application_id", str(app))
    no_app = aiohttp.FormData()
    no_app.add_field("file", png(20, 20), filename="a.png")
    for body in (no_file, no_app, b"raw bytes"):
        status, doc = await upload(http, server, tok, body)
        assert status == 400, doc
        assert doc["error"]["code"] == "bad_request"
    # multipart/form-data without a boundary, or with one longer than allowed
    for content_type in ("multipart/form-data", "multipart/form-data; boundary=" + "b" * 80):
        async with http.post(
            server.http("/upload"),
            data=b"--x\r\n",
            headers={**bearer(tok), "Content-Type": content_type},
        ) as response:
            doc = await response.json()
            assert response.status == 400, doc
            assert doc["error"]["code"] == "bad_request"
    # exactly 8 form fields are taken (the file among them), a 9th is refused
    eight = aiohttp.FormData()
    eight.add_field("application_id", str(app))
    for n in range(6):
        eight.add_field(f"note{n}", "x")
    eight.add_field("file", png(20, 20), filename="a.png")
    status, doc = await upload(http, server, tok, eight)
    assert status == 201, doc
    eight.add_field("one_more", "x")
    status, doc = await upload(http, server, tok, eight)
    assert status == 400 and "at most 8" in doc["error"]["message"], doc


# Content a reference must not be: uploaded for another conversation (filled in by the
# test), well formed but never uploaded. Always refused: pages show references inline.
NOT_AN_UPLOAD = (f"/files/{{app}}/{'a' * 32}",)
# Content that is no reference at all: stored as sent by default, as the original did.
NOT_A_REFERENCE = (
    "https://example.com/1.png",
    "photo_2020.jpg",
    f"/files/{{app}}/{'A' * 32}",
    f"/files/{{app}}/{'a' * 32}/thumb",
)


async def _send_images(
    server: Server, http: aiohttp.ClientSession, app: int, sid: int
) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """Send every kind of image content to ``app``; the references of other uploads and the
    replies, per content, in order."""
    other = new_app()
    await conversation(server, other, sid + 1)
    status, doc = await upload(http, server, token(admin_id=1), form(other, png(20, 20)))
    assert status == 201
    refused_always = [doc["reference"]] + [c.format(app=app) for c in NOT_AN_UPLOAD]
    contents = refused_always + [c.format(app=app) for c in NOT_A_REFERENCE]
    replies = []
    async with customer(server, app, sid) as c:
        await c.ok("Event.AddConversation", {"application_id": app})
        for content in contents:
            reply = await c.call(
                "Event.SendMessage",
                {"session_channel": str(app), "content": content, "content_type": 2},
            )
            replies.append((content, reply))
        # The same text as a text message is fine in every mode.
        await c.ok("Event.SendMessage", {"session_channel": str(app), "content": doc["reference"]})
    return refused_always, replies


def _refused(reply: dict[str, Any]) -> bool:
    if reply["ok"]:
        return False
    assert reply["error"]["code"] == "bad_request" and "POST /upload" in reply["error"]["message"]
    return True


async def test_an_image_reference_must_name_an_upload_of_its_conversation(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """By default (``--images any``) a reference is checked and anything else is stored as
    sent (the original server's behaviour)."""
    app = new_app()
    refused_always, replies = await _send_images(server, http, app, 33)
    for content, reply in replies:
        assert _refused(reply) == (content in refused_always), (content, reply)
        if reply["ok"]:
            message = reply["result"]["message"]
            assert (message["content"], message["content_type"]) == (content, 2)
    async with staff(server) as s:
        page = await s.ok("Event.GetMessageList", {"session_channel": str(app)})
    stored = [(m["content"], m["content_type"]) for m in page["Messages"]]
    assert stored == [(c.format(app=app), 2) for c in NOT_A_REFERENCE] + [(refused_always[0], 1)]


async def test_uploads_only_refuses_every_image_that_is_not_an_upload(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    strict = InProcessServer(tmp_path / "appchat.db", "--images", "uploads-only").start()
    try:
        app = new_app()
        _, replies = await _send_images(strict, http, app, 35)
        assert all(_refused(reply) for _, reply in replies), replies
        async with staff(strict) as s:
            page = await s.ok("Event.GetMessageList", {"session_channel": str(app)})
        assert [m["content_type"] for m in page["Messages"]] == [1]
    finally:
        strict.stop()


async def test_uploads_land_in_the_upload_dir(tmp_path: Path) -> None:
    """``--upload-dir`` is where the files go; the thumbnail sits beside the original."""
    uploads = tmp_path / "files"
    proc = InProcessServer(tmp_path / "db" / "appchat.db", "--upload-dir", str(uploads)).start()
    try:
        app = new_app()
        await conversation(proc, app, 40)
        image = png(30, 30)
        async with aiohttp.ClientSession() as http:
            status, doc = await upload(http, proc, token(request_id=app, sid=40), form(app, image))
        assert status == 201
        upload_id = doc["reference"].rsplit("/", 1)[1]
        assert (uploads / str(app) / upload_id).read_bytes() == image
        assert (uploads / str(app) / f"{upload_id}.thumb").is_file()
        assert not (tmp_path / "db" / "appchat-uploads").exists()
    finally:
        proc.stop()


async def test_images_in_s3_end_to_end(tmp_path: Path) -> None:
    """The server with ``--upload-s3`` against a local S3-compatible server."""
    with moto_server() as endpoint:
        bucket = new_bucket(endpoint)
        proc = ServerProcess(
            tmp_path / "appchat.db",
            "--upload-s3",
            f"s3://{bucket}/chat",
            "--upload-s3-endpoint",
            endpoint,
            env=ENV,
        ).start()
        try:
            app = new_app()
            image = png(100, 80)
            async with (
                aiohttp.ClientSession() as http,
                client(proc, 41, token(request_id=app, sid=41)) as c,
            ):
                await c.ok("Event.AddConversation", {"application_id": app})
                status, doc = await upload(
                    http, proc, token(request_id=app, sid=41), form(app, image)
                )
                assert status == 201, doc
                await c.ok(
                    "Event.SendMessage",
                    {"session_channel": str(app), "content": doc["reference"], "content_type": 2},
                )
                got = await fetch(http, proc, doc["url"], token(admin_id=1))
                assert got[0] == 200 and got[1] == image
                outsider = await fetch(http, proc, doc["url"], token(request_id=app + 1, sid=2))
                assert outsider[0] == 404
            assert not (tmp_path / "appchat-uploads").exists()
        finally:
            proc.stop()


# --- uploads an attacker controls (one customer token is enough) ----------------------------


def multipart(boundary: str, *parts: tuple[bytes, bytes]) -> bytes:
    """A multipart body written by hand: (part headers, part content) each."""
    out = b""
    for head, content in parts:
        out += f"--{boundary}\r\n".encode() + head + b"\r\n\r\n" + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def field(name: str) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"'.encode()


FILE = b'Content-Disposition: form-data; name="file"; filename="a.png"'


async def post_raw(
    http: aiohttp.ClientSession, server: Server, tok: str, body: Any, **headers: str
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary", **headers}
    return await upload(http, server, tok, body, headers=headers)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZip, identity"])
async def test_an_encoded_body_is_refused_before_it_is_inflated(
    server: Server, http: aiohttp.ClientSession, encoding: str
) -> None:
    """8 KiB of gzip inflating to 8 MB of preamble used to hold the event loop for
    seconds (bench/uploads.py measures it): the body is refused unread, whatever it is."""
    app = new_app()
    await conversation(server, app, 50)
    body = gzip_preamble("b0undary", 8_000_000)
    status, doc = await post_raw(
        http, server, token(request_id=app, sid=50), body, **{"Content-Encoding": encoding}
    )
    assert status == 415, doc
    assert doc["error"]["code"] == "unsupported_type"
    assert "Content-Encoding" in doc["error"]["message"]
    # identity is no encoding
    image = png(20, 20)
    plain = multipart("b0undary", (field("application_id"), str(app).encode()), (FILE, image))
    tok = token(request_id=app, sid=50)
    status, doc = await post_raw(http, server, tok, plain, **{"Content-Encoding": "identity"})
    assert status == 201, doc


async def test_a_preamble_is_bounded(server: Server, http: aiohttp.ClientSession) -> None:
    """Lines before the first boundary are read a few KiB at most, never until the body
    ends (aiohttp's reader reads them all, without a pause)."""
    app = new_app()
    await conversation(server, app, 51)
    form_ = multipart("b0undary", (field("application_id"), str(app).encode()), (FILE, png()))
    status, doc = await post_raw(
        http, server, token(request_id=app, sid=51), b"\r\n" * 100_000 + form_
    )
    assert status == 400, doc
    assert "before the first boundary" in doc["error"]["message"]
    # A short preamble (which RFC 2046 allows) is still read over.
    status, doc = await post_raw(
        http, server, token(request_id=app, sid=51), b"a preamble\r\n" + form_
    )
    assert status == 201, doc


@pytest.mark.parametrize(
    "head",
    [
        b"no colon in this header line",
        b"X-Long: " + b"x" * 9000,
        b"\r\n".join(b"X-H%d: v" % n for n in range(200)),
    ],
    ids=["no-colon", "9000-byte-line", "200-headers"],
)
async def test_malformed_part_headers_are_400_json(
    server: Server, http: aiohttp.ClientSession, head: bytes
) -> None:
    app = new_app()
    await conversation(server, app, 52)
    body = multipart("b0undary", (field("application_id"), str(app).encode()), (head, b"x"))
    async with http.post(
        server.http("/upload"),
        data=body,
        headers={
            **bearer(token(request_id=app, sid=52)),
            "Content-Type": "multipart/form-data; boundary=b0undary",
        },
    ) as r:
        assert r.status == 400, await r.text()
        assert r.content_type == "application/json"
        doc = await r.json()
    assert doc["error"]["code"] == "bad_request" and "header" in doc["error"]["message"]


async def test_a_charset_part_aiohttp_cannot_use_is_400_json(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """A first part named _charset_ longer than aiohttp takes made its reader raise
    RuntimeError: a plain-text 500 and a traceback for any token."""
    app = new_app()
    await conversation(server, app, 58)
    body = multipart("b0undary", (field("_charset_"), b"x" * 64), (FILE, png(20, 20)))
    status, doc = await post_raw(http, server, token(request_id=app, sid=58), body)
    assert status == 400, doc
    assert doc["error"]["code"] == "bad_request" and "multipart" in doc["error"]["message"]


async def test_a_jpeg_of_too_many_scans_is_refused_before_decoding(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """Every scan of a progressive JPEG is a pass over the whole image: hundreds of them
    in a few KiB cost seconds of a decode slot. Over --max-jpeg-scans (100) is 413."""
    app = new_app()
    await conversation(server, app, 53)
    tok = token(request_id=app, sid=53)
    status, doc = await upload(http, server, tok, form(app, many_scans_jpeg(1024, 1024, 300)))
    assert status == 413, doc
    assert doc["error"]["code"] == "too_large" and "301 scans" in doc["error"]["message"]
    # An ordinary progressive JPEG (a handful of scans) is taken, and so is the limit.
    progressive = io.BytesIO()
    Image.new("RGB", (300, 200), (9, 9, 9)).save(progressive, "JPEG", progressive=True)
    for data in (progressive.getvalue(), many_scans_jpeg(256, 256, 99)):
        status, doc = await upload(http, server, tok, form(app, data))
        assert status == 201, doc


async def test_an_animated_webp_is_refused_by_what_its_decoder_takes(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """A few hundred bytes, a 4200x4200 canvas (under the 50-megapixel limit): libwebp's
    decoder takes ~18 bytes a pixel, 300 MiB, over --max-decode-memory (256 MiB)."""
    app = new_app()
    await conversation(server, app, 54)
    tok = token(request_id=app, sid=54)
    hostile = animated_webp(4200, 4200, frames=3)
    assert len(hostile) < 300
    status, doc = await upload(http, server, tok, form(app, hostile))
    assert status == 413, doc
    assert doc["error"]["code"] == "too_large" and "MiB" in doc["error"]["message"]
    status, doc = await upload(http, server, tok, form(app, animated_webp(300, 200, frames=3)))
    assert status == 201, doc
    assert (doc["content_type"], doc["width"], doc["height"]) == ("image/webp", 300, 200)


async def test_a_truncated_animated_gif_is_415_and_a_huge_png_413(
    server: Server, http: aiohttp.ClientSession
) -> None:
    app = new_app()
    await conversation(server, app, 55)
    tok = token(request_id=app, sid=55)
    gif = animated_gif(64, 64, frames=3)
    status, doc = await upload(http, server, tok, form(app, gif))
    assert status == 201, doc
    for cut in (1, 10):  # the trailer gone; the last frame cut short (the first is whole)
        status, doc = await upload(http, server, tok, form(app, gif[:-cut]))
        assert status == 415, (cut, doc)
        assert "truncated" in doc["error"]["message"]
    status, doc = await upload(http, server, tok, form(app, huge_png(100_000, 100_000)))
    assert status == 413, doc
    assert "100000x100000" in doc["error"]["message"]


class SlowUpload:
    """An upload whose file arrives when ``release`` is set: the form's conversation and
    the first part of the file at once, the rest later."""

    def __init__(self, app: int, image: bytes) -> None:
        self.app, self.image = app, image
        self.release = asyncio.Event()

    async def body(self) -> AsyncIterator[bytes]:
        head, tail = self.image[:100], self.image[100:]
        yield b'--b0undary\r\nContent-Disposition: form-data; name="application_id"\r\n\r\n'
        yield str(self.app).encode() + b"\r\n--b0undary\r\n" + FILE + b"\r\n\r\n" + head
        await self.release.wait()
        yield tail + b"\r\n--b0undary--\r\n"


def in_flight(server: InProcessServer, key: str) -> int:
    assert server.node is not None
    return server.node.uploads._in_flight.count(key)


async def test_uploads_at_once_are_limited_per_identity(
    server: InProcessServer, http: aiohttp.ClientSession
) -> None:
    app = new_app()
    await conversation(server, app, 56)
    tok = token(request_id=app, sid=56)
    slow = [SlowUpload(app, png(40, 40)) for _ in range(4)]
    tasks = [asyncio.ensure_future(post_raw(http, server, tok, s.body())) for s in slow]
    await eventually(lambda: in_flight(server, f"request:{app}/sid:56") == 4)
    # The fifth at once is refused at once; another participant is not held up.
    status, doc = await upload(http, server, tok, form(app, png(20, 20)))
    assert status == 429, doc
    assert doc["error"]["code"] == "rate_limited" and "at once" in doc["error"]["message"]
    status, doc = await upload(http, server, token(admin_id=1), form(app, png(20, 20)))
    assert status == 201, doc
    for s in slow:
        s.release.set()
    assert [status for status, _ in await asyncio.gather(*tasks)] == [201] * 4
    status, doc = await upload(http, server, tok, form(app, png(20, 20)))
    assert status == 201, doc


async def test_uploads_a_minute_are_limited_per_identity(tmp_path: Path) -> None:
    monotonic = Clock(time.monotonic)
    proc = InProcessServer(tmp_path / "a.db", "--upload-rate", "2", monotonic=monotonic).start()
    try:
        app = new_app()
        await conversation(proc, app, 57)
        tok = token(request_id=app, sid=57)
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                assert (await upload(http, proc, tok, form(app, png(20, 20))))[0] == 201
            async with http.post(
                proc.http("/upload"), data=form(app, png(20, 20)), headers=bearer(tok)
            ) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "60"
                doc = await r.json()
            assert "2 uploads a minute" in doc["error"]["message"]
            # Another identity has its own allowance; this one gets one back in 30 s.
            assert (await upload(http, proc, token(admin_id=3), form(app, png(9, 9))))[0] == 201
            monotonic.advance(30)
            assert (await upload(http, proc, tok, form(app, png(20, 20))))[0] == 201
            assert (await upload(http, proc, tok, form(app, png(20, 20))))[0] == 429
    finally:
        proc.stop()


async def test_an_upload_rate_under_one_a_minute_still_allows_one(tmp_path: Path) -> None:
    """--upload-rate 0.5: one upload, then one every two minutes (a bucket smaller than one
    upload used to refuse every upload for good)."""
    monotonic = Clock(time.monotonic)
    proc = InProcessServer(tmp_path / "a.db", "--upload-rate", "0.5", monotonic=monotonic)
    proc.start()
    try:
        app = new_app()
        await conversation(proc, app, 59)
        tok = token(request_id=app, sid=59)
        async with aiohttp.ClientSession() as http:
            assert (await upload(http, proc, tok, form(app, png(20, 20))))[0] == 201
            assert (await upload(http, proc, tok, form(app, png(20, 20))))[0] == 429
            monotonic.advance(120)
            assert (await upload(http, proc, tok, form(app, png(20, 20))))[0] == 201
    finally:
        proc.stop()


async def test_a_slow_body_times_out_as_a_whole(tmp_path: Path) -> None:
    """A byte every 50 ms never stalls for the 30 s of READ_IDLE; --upload-timeout ends
    it all the same."""
    proc = InProcessServer(tmp_path / "t.db", "--upload-timeout", "1").start()
    try:
        app = new_app()
        await conversation(proc, app, 58)
        image = png(20, 20)

        async def trickle() -> AsyncIterator[bytes]:
            yield b'--b0undary\r\nContent-Disposition: form-data; name="application_id"\r\n\r\n'
            yield str(app).encode() + b"\r\n--b0undary\r\n" + FILE + b"\r\n\r\n"
            for byte in image:
                yield bytes([byte])
                await asyncio.sleep(0.05)
            yield b"\r\n--b0undary--\r\n"

        async with aiohttp.ClientSession() as http:
            status, doc = await post_raw(http, proc, token(request_id=app, sid=58), trickle())
        assert status == 400, doc
        assert "longer than 1 s in all" in doc["error"]["message"]
    finally:
        proc.stop()


async def test_a_waiting_body_is_spooled_to_disk(tmp_path: Path) -> None:
    """Past 256 KiB an upload's file is in a temporary file (under TMPDIR), not in memory."""
    spool = tmp_path / "spool"
    spool.mkdir()
    proc = ServerProcess(tmp_path / "s.db", env={"TMPDIR": str(spool)}).start()
    assert proc.proc is not None
    fds = Path(f"/proc/{proc.proc.pid}/fd")

    def spooled() -> bool:
        for fd in fds.iterdir():
            try:
                if os.readlink(fd).startswith(str(spool)):
                    return True
            except OSError:  # closed while we looked
                continue
        return False

    try:
        app = new_app()
        await conversation(proc, app, 59)
        big = jpeg(10, 10) + os.urandom(1_000_000)  # a JPEG with a tail
        release = asyncio.Event()
        assert not spooled()

        async def body() -> AsyncIterator[bytes]:
            yield b'--b0undary\r\nContent-Disposition: form-data; name="application_id"\r\n\r\n'
            yield str(app).encode() + b"\r\n--b0undary\r\n" + FILE + b"\r\n\r\n"
            yield big[:600_000]
            await release.wait()
            yield big[600_000:] + b"\r\n--b0undary--\r\n"

        async with aiohttp.ClientSession() as http:
            tok = token(request_id=app, sid=59)
            task = asyncio.ensure_future(post_raw(http, proc, tok, body()))
            await eventually(spooled)
            release.set()
            status, doc = await task
        assert status == 201, doc
        await eventually(lambda: not spooled())  # and gone once the upload is stored
    finally:
        proc.stop()


async def test_a_database_out_of_descriptors_is_503_not_500(tmp_path: Path) -> None:
    """SQLite cannot open its file for a new reader thread (no descriptor left): the upload
    is answered 503 ``unavailable`` in JSON, not a 500 from the reader thread."""
    proc = InProcessServer(tmp_path / "fd.db").start()  # no reader has opened the file yet
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        app = new_app()
        body = multipart("b0undary", (field("application_id"), str(app).encode()), (FILE, b"x"))
        async with aiohttp.ClientSession() as http:
            async with http.get(proc.http("/healthz")) as r:  # the connection to reuse
                assert r.status == 200
            lowest_free = os.open(os.devnull, os.O_RDONLY)
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # none left
            try:
                status, doc = await post_raw(http, proc, token(admin_id=1), body)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert status == 503, doc
        assert doc["error"]["code"] == "unavailable"
        # With descriptors again, the same reader opens the file.
        async with aiohttp.ClientSession() as http:
            status, doc = await post_raw(http, proc, token(admin_id=1), body)
        assert status == 404, doc  # no such conversation: the store answered
    finally:
        proc.stop()
