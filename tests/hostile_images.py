"""Hostile uploads, made byte by byte: files small on the wire that cost a decoder much.

Used by the tests of ``POST /upload`` and by ``bench/uploads.py`` (which measures them).
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib

from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels; a few dozen bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\0" * (width + 1))  # one row: the rest is missing
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_segment(marker: int, data: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(data) + 2) + data


class _Bits:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def add(self, value: int, count: int) -> None:
        self.bits.extend((value >> i) & 1 for i in range(count - 1, -1, -1))

    def bytes(self) -> bytes:
        bits = self.bits + [1] * (-len(self.bits) % 8)  # padded with ones
        out = bytearray()
        for i in range(0, len(bits), 8):
            byte = int("".join(map(str, bits[i : i + 8])), 2)
            out.append(byte)
            if byte == 0xFF:
                out.append(0)  # stuffed
        return bytes(out)


def many_scans_jpeg(width: int = 4096, height: int = 4096, scans: int = 500) -> bytes:
    """A progressive greyscale JPEG of ``scans`` + 1 scans, each over the whole image: one
    DC scan, then AC scans that say "nothing here" in runs of 32767 blocks (a few bytes
    each). Every scan costs the decoder a pass over every block."""
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    out = bytearray(b"\xff\xd8")
    out += _jpeg_segment(0xDB, b"\x00" + b"\x01" * 64)  # quantisation table 0, all ones
    out += _jpeg_segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    # DC table 0: one code ("0") for category 0. AC table 0: EOB0 … EOB14, 4 bits each
    # (code r for EOBr, a run of 2^r blocks plus r bits).
    out += _jpeg_segment(0xC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00")
    counts = b"\x00\x00\x00\x0f" + b"\x00" * 12
    out += _jpeg_segment(0xC4, b"\x10" + counts + bytes(r << 4 for r in range(15)))
    dc = _Bits()
    dc.add(0, blocks)  # every block: DC difference 0
    out += _jpeg_segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + dc.bytes()
    ac = _Bits()
    left = blocks
    while left:
        r = min(14, left.bit_length() - 1)
        run = min(left, 2 ** (r + 1) - 1)
        ac.add(r, 4)
        ac.add(run - 2**r, r)
        left -= run
    ac_scan = _jpeg_segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + ac.bytes()
    for _ in range(scans):
        out += ac_scan
    return bytes(out + b"\xff\xd9")


def _riff_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + b"\0" * (len(data) & 1)


def animated_webp(width: int = 7000, height: int = 7000, frames: int = 2) -> bytes:
    """An animated WebP of ``frames`` 1x1 frames on a ``width`` x ``height`` canvas: a few
    hundred bytes that make the decoder allocate the whole canvas, several times."""
    one = io.BytesIO()
    Image.new("RGBA", (1, 1), (255, 0, 0, 255)).save(one, "WEBP", lossless=True)
    raw = one.getvalue()
    vp8l = raw[12:]  # the still image's one chunk (VP8L)
    vp8x = struct.pack("<B3x", 0x12) + (width - 1).to_bytes(3, "little")
    vp8x += (height - 1).to_bytes(3, "little")  # flags: animation (0x02), alpha (0x10)
    body = b"WEBP" + _riff_chunk(b"VP8X", vp8x)
    body += _riff_chunk(b"ANIM", struct.pack("<IH", 0xFFFFFFFF, 0))
    for n in range(frames):
        x = (n * 2) % width
        anmf = struct.pack(
            "<3s3s3s3s3sB", *(v.to_bytes(3, "little") for v in (x // 2, 0, 0, 0, 100)), 0
        )
        body += _riff_chunk(b"ANMF", anmf + vp8l)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def animated_gif(width: int = 64, height: int = 64, frames: int = 3) -> bytes:
    images = [Image.new("P", (width, height), i) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:])
    return out.getvalue()


def gzip_preamble(boundary: str, inflated: int) -> bytes:
    """A gzip body whose inflated multipart starts with ``inflated`` bytes of preamble (empty
    lines) before its first boundary: a few KiB on the wire."""
    line = b"\r\n"
    preamble = line * (inflated // len(line))
    form = f"--{boundary}--\r\n".encode()
    return gzip.compress(preamble + form, compresslevel=9)
