"""Images over HTTP against a real server: upload, send as a message, download."""

from __future__ import annotations

import io
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from .motoserver import ENV, moto_server, new_bucket
from .support import (
    InProcessServer,
    Server,
    ServerProcess,
    client,
    customer,
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
