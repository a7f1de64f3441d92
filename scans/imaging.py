"""Decoding scanned images: the one decoder behind upload validation, rendering and thumbnails.

What an image viewer shows is what gets read, once:
- Only real pages count: the primary image of an MPO (its other images are previews or a second
  view), the full-resolution images of a TIFF (TIFF 6.0 NewSubfileType bits 0 and 2 and the old
  SubfileType 2 mark reduced-resolution copies and transparency masks), the first frame of an
  animated GIF, WebP or PNG (noted on the scan).
- Broken optional metadata is ignored: JPEG APPn segments other than JFIF, Exif and Adobe, and PNG
  ancillary chunks other than tRNS and eXIf, never reach Pillow's parsers (so a colour profile with a
  bad checksum, an XMP packet beyond PngImagePlugin.MAX_TEXT_CHUNK or an ICC profile Pillow cannot
  parse costs nothing); an Exif block that cannot be parsed only loses the orientation.
- Pixel data that ends early is decoded as far as it goes, the rest left white, and the page carries
  a "decoded_partially" warning; a page is unreadable only when none of its pixels decode.
- One size limit, OCRSITE_MAX_IMAGE_PIXELS, checked from the header before any pixel buffer exists.
  Large images are decoded reduced: JPEG through libjpeg's DCT scaling (`draft`), PNG in row strips
  that are reduced as they arrive; other formats are decoded whole, at most one large one at a time
  in the process.

Pillow's process-wide switches (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES,
PngImagePlugin.MAX_TEXT_CHUNK) are deliberately left at their defaults: files are opened through
their format's plugin class rather than `Image.open` (whose bomb check uses the process-wide limit),
and what those switches are for is handled per call here.
"""

from __future__ import annotations

import io
import math
import random
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from PIL import (
    GifImagePlugin,
    Image,
    ImageChops,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from scans.pipeline.types import DocumentClosed, PageWarning, ScanWarning

JPEG, PNG, TIFF, WEBP, GIF = "JPEG", "PNG", "TIFF", "WEBP", "GIF"

# More images than this per allowed page and a TIFF is refused without walking further: a file of
# 40,000 tiny frames must not cost seconds of CPU before it is rejected.
TIFF_FRAMES_PER_PAGE = 4
# PNG rows are inflated, unfiltered, flattened and reduced in strips of about this many bytes.
PNG_STRIP_BYTES = 4 * 1024 * 1024
# A whole-image decode bigger than this waits for any other such decode in the process to finish.
LARGE_DECODE_BYTES = 64 * 1024 * 1024
# Pillow's `reducing_gap` when resizing to the page: reduce by a whole factor (a box filter, cheap) to at
# most this many times the target, then resample with Lanczos.
REDUCING_GAP = 3.0
# ... and for the PNG strips, reduced as they arrive: what Pillow's documentation calls fair quality; the
# reduced canvas is then at most 4x the page's pixels.
PNG_REDUCING_GAP = 2.0

_large_decodes = threading.BoundedSemaphore(1)

_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class UnreadableImage(ValueError):
    """An image (or one page of it) that cannot be read; the message is meant for a person. A ValueError:
    bad data, like Pillow's own errors for it."""


@dataclass(frozen=True)
class DecodedPage:
    image: Image.Image  # mode "L" or "RGB", upright (Exif orientation applied), longest side as asked
    warnings: tuple[PageWarning, ...] = ()


def sniff_image(head: bytes) -> str | None:
    """The image format from a file's first bytes (its magic number), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return TIFF
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if head.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    return None


def check_pixel_limit(width: int, height: int) -> None:
    """Raise UnreadableImage when width x height is over OCRSITE_MAX_IMAGE_PIXELS (from the header,
    before anything is decoded)."""
    limit = settings.OCRSITE_MAX_IMAGE_PIXELS
    if width * height > limit:
        raise UnreadableImage(
            f"This image is {width} × {height} pixels ({width * height / 1e6:.0f} megapixels), more than the "
            f"{limit / 1e6:.0f} megapixel limit (OCRSITE_MAX_IMAGE_PIXELS={limit})."
        )


# --- the pieces of a file Pillow is allowed to see ----------------------------------------------


class _Splice:
    """A read-only, seekable file made of byte ranges of another file and literal bytes.

    `tail` is handed out once, and only to a read that starts at the end: a decoder gets it only when it
    asks for more than the file holds (Pillow's JPEG loader does the same, process-wide, under
    LOAD_TRUNCATED_IMAGES). `tail_read` then says the data ended early."""

    def __init__(self, handle: BinaryIO, pieces: list[bytes | tuple[int, int]], tail: bytes = b"") -> None:
        self._handle = handle
        self._pieces: list[tuple[int, bytes | tuple[int, int]]] = []
        start = 0
        for piece in pieces:
            length = len(piece) if isinstance(piece, bytes) else piece[1]
            if length > 0:
                self._pieces.append((start, piece))
                start += length
        self._size = start
        self._pos = 0
        self._tail = tail
        self.tail_read = False

    def read(self, size: int = -1) -> bytes:
        if self._pos >= self._size:
            if self._tail and not self.tail_read and self._pos == self._size:
                self.tail_read = True
                return self._tail
            return b""
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        out = bytearray()
        for start, piece in self._pieces:
            length = len(piece) if isinstance(piece, bytes) else piece[1]
            if start + length <= self._pos or start >= end:
                continue
            lo, hi = max(self._pos, start) - start, min(end, start + length) - start
            if isinstance(piece, bytes):
                out += piece[lo:hi]
            else:
                self._handle.seek(piece[0] + lo)
                data = self._handle.read(hi - lo)
                out += data
                if len(data) < hi - lo:  # the file shrank under us: stop here
                    end = self._pos + len(out)
                    break
        self._pos = end
        return bytes(out)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:  # the document owns the handle
        pass


def _jpeg_pieces(handle: BinaryIO, size: int, *, keep_exif: bool) -> list[bytes | tuple[int, int]]:
    """The file up to its first scan without the APPn/COM segments nothing here needs (ICC profiles, XMP,
    Photoshop blocks, comments, and the MPF index that makes a phone's MPO look like several images);
    JFIF (APP0), Exif (APP1, for the orientation) and Adobe (APP14, for CMYK/YCCK colour) stay."""
    pieces: list[bytes | tuple[int, int]] = [(0, 2)]
    pos = 2
    handle.seek(pos)
    while True:
        head = handle.read(4)
        if len(head) < 2 or head[0] != 0xFF:
            break  # not a marker where one belongs: let the decoder judge the rest
        marker = head[1]
        if marker == 0xFF:  # fill byte
            pieces.append((pos, 1))
            pos += 1
            handle.seek(pos)
            continue
        if marker == 0xDA or 0xD0 <= marker <= 0xD9 or marker == 0x01 or len(head) < 4:
            break  # start of scan (or a standalone marker): everything from here on is kept
        length = struct.unpack(">H", head[2:4])[0]
        if length < 2:
            break
        keep = True
        if (0xE1 <= marker <= 0xEF and marker != 0xEE) or marker == 0xFE:
            keep = marker == 0xE1 and keep_exif and handle.read(6) == b"Exif\x00\x00"
        if keep:
            pieces.append((pos, 2 + length))
        pos += 2 + length
        handle.seek(pos)
    pieces.append((pos, max(0, size - pos)))
    return pieces


@dataclass
class _PngLayout:
    width: int
    height: int
    bit_depth: int
    color_type: int
    interlaced: bool
    header: list[bytes]  # IHDR, PLTE, tRNS, eXIf as chunks (critical ones with their CRC recomputed)
    idat: list[tuple[int, int]]  # (offset of the data, length) of each IDAT chunk, in order
    frames: int  # images in the file: 1, or the APNG animation's frames (and its default image)

    @property
    def bits_per_pixel(self) -> int:
        return self.bit_depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[self.color_type]


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_layout(handle: BinaryIO, size: int) -> _PngLayout:
    """Walk the chunks (reading only the small ones). Ancillary chunks whose CRC is wrong are dropped,
    critical ones are used as they are (the pixel data is checked by zlib's own checksum)."""
    handle.seek(0)
    if handle.read(8) != _PNG_SIGNATURE:
        raise UnreadableImage("This PNG is damaged and cannot be read.")
    header: list[bytes] = []
    idat: list[tuple[int, int]] = []
    ihdr: tuple | None = None
    animation_frames, default_in_animation = 0, False
    pos = 8
    while pos + 8 <= size:
        handle.seek(pos)
        length, kind = struct.unpack(">I4s", handle.read(8))
        data_at, available = pos + 8, min(length, max(0, size - pos - 8))
        if kind == b"IDAT":
            idat.append((data_at, available))
        elif kind == b"IEND" or (idat and kind in (b"fdAT", b"fcTL")):
            break
        elif kind in (b"IHDR", b"PLTE", b"tRNS", b"eXIf", b"acTL", b"fcTL") and available == length and length < 1 << 20:
            data = handle.read(length)
            crc_ok = handle.read(4) == struct.pack(">I", zlib.crc32(kind + data))
            if kind == b"IHDR" and len(data) == 13:
                ihdr = struct.unpack(">IIBBBBB", data)
                header.append(_png_chunk(kind, data))
            elif kind == b"PLTE":
                header.append(_png_chunk(kind, data))
            elif kind == b"acTL" and crc_ok and len(data) == 8:
                animation_frames = struct.unpack(">I", data[:4])[0]
            elif kind == b"fcTL":
                default_in_animation = True  # an fcTL before the first IDAT: IDAT is frame 1
            elif crc_ok and kind in (b"tRNS", b"eXIf"):
                header.append(_png_chunk(kind, data))
        if ihdr is None:
            break  # IHDR must come first
        pos = data_at + length + 4
    if ihdr is None:
        raise UnreadableImage("This PNG is damaged and cannot be read.")
    width, height, depth, color_type, _compression, _filter, interlace = ihdr
    if width == 0 or height == 0 or depth not in _PNG_DEPTHS.get(color_type, ()):
        raise UnreadableImage("This PNG is damaged and cannot be read.")
    # APNG: IDAT is the first frame when an fcTL precedes it; otherwise it is a default image shown only
    # by viewers without animation support (the one read here) and the animation comes on top of it.
    frames = max(1, animation_frames + (0 if default_in_animation or not animation_frames else 1))
    return _PngLayout(width, height, depth, color_type, interlace == 1, header, idat, frames)


# --- from decoded pixels to the page ------------------------------------------------------------


def flatten(image: Image.Image) -> Image.Image:
    """"L" or "RGB" on a white background, whatever the mode (RGBA, LA, P with transparency, CMYK,
    16-bit grey, bilevel ...)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return image.point(lambda v: v / 256).convert("L")  # 16-bit grey to 8-bit
    if image.mode == "1":
        return image.convert("L")  # bilevel scans: grey, so resizing can anti-alias
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def target_size(width: int, height: int, longest_side: int) -> tuple[int, int]:
    if width >= height:
        return longest_side, max(1, round(height * longest_side / width))
    return max(1, round(width * longest_side / height)), longest_side


def _reduce_factor(width: int, height: int, longest_side: int) -> int:
    target_w, target_h = target_size(width, height, longest_side)
    return max(1, min(int(width / target_w / PNG_REDUCING_GAP), int(height / target_h / PNG_REDUCING_GAP)))


def _resize(image: Image.Image, longest_side: int) -> Image.Image:
    image = flatten(image)
    size = target_size(image.width, image.height, longest_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    return image


def _orientation(image: Image.Image) -> int:
    """The Exif orientation (1-8); 1 when the Exif block is missing or cannot be parsed."""
    if isinstance(image, PngImagePlugin.PngImageFile) and "exif" not in image.info:
        return 1  # (Pillow would decode all pixels looking for an eXIf chunk; ours come before them)
    try:
        with warnings.catch_warnings():  # Pillow warns about damaged Exif it then skips: expected here
            warnings.simplefilter("ignore", UserWarning)
            value = image.getexif().get(0x0112)
    except Exception:  # Pillow raises many types for damaged Exif: only the orientation is lost
        return 1
    return value if isinstance(value, int) and value in _EXIF_TRANSPOSE else 1


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    return image.transpose(_EXIF_TRANSPOSE[orientation]) if orientation in _EXIF_TRANSPOSE else image


def _partial(rows: int, height: int) -> PageWarning:
    share = max(1, min(99, math.floor(100 * rows / height)))
    return PageWarning(
        code="decoded_partially",
        message=f"The image data ends early: only the top {share} % of the page could be decoded; the rest is left blank.",
    )


def _whiten_below(image: Image.Image, rows: int, height: int) -> Image.Image:
    """`image` (an "L"/"RGB" copy, any size, of a `height`-row original) white below original row `rows`."""
    top = math.ceil(rows * image.height / height)
    if top < image.height:
        image = image.copy()
        image.paste(255 if image.mode == "L" else (255, 255, 255), (0, top, image.width, image.height))
    return image


_NOTHING_DECODED = "The image data is damaged; no part of it could be decoded."
_ENDS_EARLY = PageWarning(code="decoded_partially", message="The image data ends early: the page was read as far as it goes.")
# What Pillow raises for data it cannot parse (a damaged file), as opposed to a bug or no memory.
_DAMAGED = (SyntaxError, OSError, ValueError, TypeError, IndexError, KeyError, struct.error, EOFError, Image.DecompressionBombError)


def _load_whole(image: ImageFile.ImageFile) -> int | None:
    """Load all of `image`'s pixels; None when complete, else how many rows, from the top, hold decoded
    pixels (the rest are zero). Raises UnreadableImage when none do."""
    bands = len(image.getbands())
    large = image.width * image.height * (4 if bands > 2 else bands) > LARGE_DECODE_BYTES
    if large:
        _large_decodes.acquire()
    try:
        image.load()
        return None
    except OSError:  # truncated or damaged: Pillow keeps what it decoded before the error
        image.tile = []  # so that using the image does not start decoding again
        try:
            box = image.getbbox()
        except (OSError, ValueError):  # no pixel buffer was ever allocated
            box = None
        if box is None:
            raise UnreadableImage(_NOTHING_DECODED) from None
        return box[3]
    finally:
        if large:
            _large_decodes.release()


def _inflate(handle: BinaryIO, segments: list[tuple[int, int]]) -> Iterator[bytes]:
    """The inflated bytes of a zlib stream stored in `segments` (offset, length) of `handle`, in pieces of
    at most PNG_STRIP_BYTES. On damaged data, everything before the first bad byte is yielded, then
    zlib.error is raised."""
    inflater = zlib.decompressobj()
    for offset, length in segments:
        handle.seek(offset)
        while length > 0 and not inflater.eof:
            data = handle.read(min(length, 1 << 20))
            if not data:
                return
            length -= len(data)
            while data and not inflater.eof:
                before = inflater.copy()
                try:
                    out = inflater.decompress(data, PNG_STRIP_BYTES)
                except zlib.error:
                    yield from _inflate_until_error(before, data)
                    raise
                data = inflater.unconsumed_tail
                if out:
                    yield out


def _inflate_until_error(inflater, data: bytes) -> Iterator[bytes]:
    """What `inflater` gives for `data` before the byte zlib rejects (fed one byte at a time: only
    damaged files take this path)."""
    for index in range(len(data)):
        try:
            out = inflater.decompress(data[index : index + 1])
        except zlib.error:
            return
        if out:
            yield out


def _zlib_stored(pieces: list[bytes | memoryview]) -> bytes:
    """The concatenation of `pieces` as a zlib stream of stored (uncompressed) deflate blocks (RFC 1950,
    1951): one copy, 5x faster than zlib.compress(data, 0)."""
    parts: list[bytes | memoryview] = [b"\x78\x01"]
    checksum = 1
    blocks = [memoryview(piece)[start : start + 0xFFFF] for piece in pieces for start in range(0, len(piece), 0xFFFF)]
    for index, block in enumerate(blocks):
        parts += [struct.pack("<BHH", index == len(blocks) - 1, len(block), len(block) ^ 0xFFFF), block]
        checksum = zlib.adler32(block, checksum)
    parts.append(struct.pack(">I", checksum))
    return b"".join(parts)


def _png_strips(
    handle: BinaryIO, layout: _PngLayout, png: PngImagePlugin.PngImageFile, factor: int, *, probe: bool = False
) -> tuple[Image.Image, int]:
    """Decode a non-interlaced PNG of up to 32 bits per pixel strip by strip, each flattened and reduced by
    `factor` as it arrives, so memory stays at a few strips whatever the image's size. Returns the reduced
    image ("L"/"RGB", white where nothing was decoded) and how many rows were decoded (fewer than the
    height when the data ends early or is damaged). With `probe`, it stops after the first strip.

    Each strip goes through Pillow's own PNG row decoder ("zip") as an image whose pixels are the raw
    bytes (1 to 4 per pixel, as the PNG filters see them), then through Pillow's unpacker for the real
    bit depth and colour type (`png`'s tile). Its first row is the previous strip's last row stored
    unfiltered, so the filters that look at the row above work across strips."""
    width, height = layout.width, layout.height
    row_bytes = (width * layout.bits_per_pixel + 7) // 8
    unit = max(1, layout.bits_per_pixel // 8)
    carrier = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[unit]
    stride = row_bytes + 1  # each row starts with its filter type
    strip_rows = max(factor, PNG_STRIP_BYTES // stride // factor * factor)
    rawmode = png.tile[0].args
    canvas = Image.new("RGB", (math.ceil(width / factor), math.ceil(height / factor)), "white")
    previous = bytes(row_bytes)
    rows = 0
    pending = bytearray()

    def emit(count: int) -> None:
        nonlocal canvas, previous, rows
        filtered = memoryview(pending)[: count * stride]
        data = _zlib_stored([b"\x00" + previous, filtered])
        filtered.release()
        del pending[: count * stride]
        decoded = Image.frombytes(carrier, (row_bytes // unit, count + 1), data, "zip", carrier)
        previous = decoded.crop((0, count, decoded.width, count + 1)).tobytes()
        if png.mode == carrier and rawmode == carrier:  # 8-bit grey, grey+alpha, RGB, RGBA: bytes are pixels
            strip, box = decoded, (0, 1, width, count + 1)
        else:
            strip, box = Image.frombytes(png.mode, (width, count), decoded.tobytes()[row_bytes:], "raw", rawmode), None
            if png.mode == "P" and png.palette is not None:
                strip.putpalette(png.palette)
        if "transparency" in png.info:
            strip.info["transparency"] = png.info["transparency"]
        strip = flatten(strip)
        if rows == 0 and strip.mode != canvas.mode:
            canvas = canvas.convert(strip.mode)
        if factor > 1:
            strip = strip.reduce(factor, box)
        elif box is not None:
            strip = strip.crop(box)
        canvas.paste(strip, (0, rows // factor))
        rows += count

    try:
        for data in _inflate(handle, layout.idat):
            pending += data
            while len(pending) >= strip_rows * stride and rows + strip_rows <= height:
                emit(strip_rows)
            if rows + len(pending) // stride >= height or (probe and rows):
                break
    except zlib.error:
        pass  # damaged data: decoded as far as it goes
    tail = min(len(pending) // stride, height - rows)
    if tail and not (probe and rows):
        emit(tail)
    if rows == 0:
        raise UnreadableImage(_NOTHING_DECODED)
    return canvas, rows


# --- documents ----------------------------------------------------------------------------------

_EOI = b"\xff\xd9"
_FILLER = bytes(random.Random(0).randrange(0x00, 0xFF) for _ in range(1024))  # no 0xFF: never a marker


class ImageDocument:
    """One image file, opened once: which of its frames are pages, and decoding one page at a time.

    Safe to share between threads (decodes take turns). `warnings` holds the notes about the whole file
    (an animation of which only the first frame is read). Raises UnreadableImage when the file is not
    an image this module can open; OSError when it cannot be read at all."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._handle: BinaryIO = self.path.open("rb")
        try:
            self._size = self.path.stat().st_size
            self.format = sniff_image(self._handle.read(16))
            self.warnings: list[ScanWarning] = []
            self._png: _PngLayout | None = None
            self._tiff: TiffImagePlugin.TiffImageFile | None = None
            self._tiff_pages: list[int] = []  # frame index of each page found so far
            self._tiff_next = 0  # the next frame to look at
            self._tiff_walked = False
            self._open()
        except BaseException:
            self._handle.close()
            raise

    def _open(self) -> None:
        frames = 1
        if self.format == PNG:
            self._png = _png_layout(self._handle, self._size)
            frames = self._png.frames
        elif self.format == TIFF:
            self._handle.seek(0)  # the handle itself (libtiff decodes through its file descriptor)
            self._tiff = self._pillow(TiffImagePlugin.TiffImageFile, self._handle)
        elif self.format in (WEBP, GIF):
            frames = 2 if self._open_single().is_animated else 1
        elif self.format == JPEG:
            self._open_single()
        else:
            raise UnreadableImage("This is not an image that can be read.")
        if frames > 1:
            self.warnings.append(
                ScanWarning(code="first_frame_only", message="This is an animated image: only its first frame is read.")
            )

    @staticmethod
    def _pillow(plugin: type[ImageFile.ImageFile], source) -> ImageFile.ImageFile:
        """Open through the format's plugin (not Image.open: the size limit is checked here, per call)."""
        try:
            with warnings.catch_warnings():  # Pillow warns about the damaged Exif it skips (read for DPI)
                warnings.simplefilter("ignore", UserWarning)
                return plugin(source)
        except _DAMAGED:
            raise UnreadableImage("This image is damaged and cannot be read.") from None

    def _open_single(self, tail: bytes = b"", keep_exif: bool = True) -> ImageFile.ImageFile:
        """A JPEG, WebP or GIF file as Pillow sees it. Never closed by Pillow: its source is ours."""
        if self.format == JPEG:
            splice = _Splice(self._handle, _jpeg_pieces(self._handle, self._size, keep_exif=keep_exif), tail)
            try:
                return self._pillow(JpegImagePlugin.JpegImageFile, splice)
            except UnreadableImage:
                if not keep_exif:
                    raise
                return self._open_single(tail, keep_exif=False)  # a broken Exif block only loses the orientation
        self._handle.seek(0)
        return self._pillow(WebPImagePlugin.WebPImageFile if self.format == WEBP else GifImagePlugin.GifImageFile, self._handle)

    # --- pages -------------------------------------------------------------------------------

    def page_count(self, limit: int | None = None) -> int:
        """How many pages the file holds. With `limit`, counting stops once it is passed (the result is
        then limit + 1) and a TIFF holding more than TIFF_FRAMES_PER_PAGE images per allowed page is
        refused (UnreadableImage) without walking the rest."""
        if self._tiff is None:
            return 1
        with self._lock:
            self._walk_tiff(None if limit is None else limit + 1, limit)
            return max(1, len(self._tiff_pages))

    def _walk_tiff(self, pages_wanted: int | None, limit: int | None) -> None:
        """Classify frames until `pages_wanted` pages are known (None: all). A frame is a page unless its
        NewSubfileType says reduced-resolution (bit 0) or transparency mask (bit 2), or its old-style
        SubfileType says reduced-resolution (2) (TIFF 6.0, section 8)."""
        tiff = self._tiff
        assert tiff is not None
        max_frames = None if limit is None else TIFF_FRAMES_PER_PAGE * (limit + 1)
        while not self._tiff_walked and (pages_wanted is None or len(self._tiff_pages) < pages_wanted):
            frame = self._tiff_next
            if max_frames is not None and frame >= max_frames:
                raise UnreadableImage(
                    f"This TIFF holds more than {max_frames} images; a file may have at most {limit} pages "
                    f"(OCRSITE_MAX_PAGES={limit})."
                )
            try:
                tiff.seek(frame)
            except EOFError:
                self._tiff_walked = True
                return
            except _DAMAGED:
                if tiff.tell() != frame:  # its directory could not be read: the chain ends here
                    self._tiff_walked = True
                    return
                # Pillow cannot set this frame up, but its tags are known: a page fails alone later.
            new_type, old_type = tiff.tag_v2.get(254, 0), tiff.tag_v2.get(255, 1)
            if not (isinstance(new_type, int) and new_type & 0b101) and old_type != 2:
                self._tiff_pages.append(frame)
            self._tiff_next = frame + 1

    def _tiff_frame(self, number: int) -> int:
        self._walk_tiff(number, None)
        if not self._tiff_pages and number == 1:
            return 0  # only reduced-resolution images: the first one is what a viewer shows
        if number > len(self._tiff_pages):
            raise ValueError(f"{self.path.name} has no page {number}.")
        return self._tiff_pages[number - 1]

    # --- decoding ----------------------------------------------------------------------------

    def decode(self, number: int, *, longest_side: int, probe: bool = False) -> DecodedPage:
        """Page `number` (1-based): flattened onto white, upright (Exif orientation), resized so its
        longest side is `longest_side` px. Raises UnreadableImage for a page over OCRSITE_MAX_IMAGE_PIXELS
        or one of whose pixels none can be decoded.

        `probe` (upload validation) may stop once some pixels are known to decode, which is all that
        acceptance asks: a large PNG is then not inflated to the end (the result is not a whole page)."""
        if number < 1 or (self._tiff is None and number != 1):
            raise ValueError(f"{self.path.name} has no page {number}.")
        with self._lock:
            if self._handle.closed:
                raise DocumentClosed(f"{self.path.name} was closed.")
            if self.format == PNG:
                return self._decode_png(longest_side, probe)
            if self.format == JPEG:
                return self._decode_jpeg(longest_side)
            if self._tiff is None:
                return self._decode_whole(self._open_single(), longest_side)
            frame = self._tiff_frame(number)
            try:
                # Not seek(): it does nothing for the frame it is on, even when setting that frame up failed,
                # and would then decode the previous frame's data. _seek always reads the frame's tags.
                self._tiff._seek(frame)  # noqa: SLF001
            except _DAMAGED as exc:
                raise UnreadableImage(f"This page's image cannot be decoded ({type(exc).__name__}: {exc}).") from None
            self._tiff.im = None  # never the previous frame's pixels
            try:
                return self._decode_whole(self._tiff, longest_side)
            finally:
                self._tiff.im = None  # do not keep a full-size page between decodes

    def _decode_whole(self, image: ImageFile.ImageFile, longest_side: int) -> DecodedPage:
        check_pixel_limit(*image.size)
        orientation = _orientation(image)
        try:
            rows = _load_whole(image)
        except UnreadableImage:
            raise
        except _DAMAGED as exc:
            raise UnreadableImage(f"The image data is damaged and cannot be decoded ({exc}).") from None
        page = _resize(image, longest_side)
        if page is image:
            page = image.copy()  # a TIFF's frame buffer is dropped after the decode
        warnings: tuple[PageWarning, ...] = ()
        if rows is not None:
            page, warnings = _whiten_below(page, rows, image.height), (_partial(rows, image.height),)
        return DecodedPage(_upright(page, orientation), warnings)

    def _decode_png(self, longest_side: int, probe: bool) -> DecodedPage:
        layout = self._png
        assert layout is not None
        check_pixel_limit(layout.width, layout.height)
        # Pillow sees only the chunks needed for the pixels, the critical ones with a valid CRC.
        pieces: list[bytes | tuple[int, int]] = [_PNG_SIGNATURE, *layout.header]
        for offset, length in layout.idat:
            pieces += [struct.pack(">I", length) + b"IDAT", (offset, length), b"\0\0\0\0"]
        pieces.append(_png_chunk(b"IEND", b""))
        png = self._pillow(PngImagePlugin.PngImageFile, _Splice(self._handle, pieces))
        if layout.interlaced or layout.bits_per_pixel > 32:  # Adam7, 16-bit colour: decoded whole
            return self._decode_whole(png, longest_side)
        orientation = _orientation(png)
        factor = _reduce_factor(layout.width, layout.height, longest_side)
        reduced, rows = _png_strips(self._handle, layout, png, factor, probe=probe)
        warnings = (_partial(rows, layout.height),) if rows < layout.height else ()
        return DecodedPage(_upright(_resize(reduced, longest_side), orientation), warnings)

    def _decode_jpeg(self, longest_side: int) -> DecodedPage:
        """libjpeg decodes at 1/2, 1/4 or 1/8 scale for free (`draft`): a 250-megapixel photo costs a few
        megabytes. When the data ends before the end-of-image marker, one is supplied (as browsers do);
        decoding again with filler bytes before it shows which rows really came from the file."""
        decoded, source, ended_early = self._jpeg_pixels(_EOI, longest_side)
        height = source.height
        page, warnings = _resize(decoded, longest_side), ()
        if ended_early:
            try:
                filled = self._jpeg_pixels(_FILLER + _EOI, longest_side)[0]
                box = ImageChops.difference(decoded, filled).getbbox()
            except UnreadableImage:  # the filler upset the decoder: which rows are real is unknown
                return DecodedPage(_upright(page, source.orientation), (_ENDS_EARLY,))
            if box is not None and source.progressive:  # every row has some data, later scans are missing
                warnings = (_ENDS_EARLY,)
            elif box is not None:
                rows = box[1] * height // decoded.height
                if rows == 0:
                    raise UnreadableImage(_NOTHING_DECODED)
                page, warnings = _whiten_below(page, rows, height), (_partial(rows, height),)
        return DecodedPage(_upright(page, source.orientation), warnings)

    def _jpeg_pixels(self, tail: bytes, longest_side: int) -> tuple[Image.Image, _JpegSource, bool]:
        """The JPEG decoded at the smallest DCT scale that is at least `longest_side` px, what it was before
        scaling, and whether the data ended before the decoder was done."""
        image = self._open_single(tail)
        check_pixel_limit(*image.size)
        source = _JpegSource(image.width, image.height, _orientation(image), "progressive" in image.info)
        splice = image.fp
        image.draft(None, target_size(*image.size, longest_side))
        try:
            image.load()
        except OSError as exc:
            raise UnreadableImage(f"The image data is damaged and cannot be decoded ({exc}).") from None
        return image, source, isinstance(splice, _Splice) and splice.tail_read

    def close(self) -> None:
        with self._lock:
            self._handle.close()

    def __enter__(self) -> ImageDocument:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass(frozen=True)
class _JpegSource:
    width: int
    height: int
    orientation: int
    progressive: bool
