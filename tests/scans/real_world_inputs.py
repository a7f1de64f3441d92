"""Files like the ones phones, copiers and scanning apps produce, each built here (Pillow, raw bytes; no
downloads), modelled on public bug reports against OCRmyPDF, Pillow, pypdfium2, pdf.js, paperless and
olmOCR. Every page a viewer shows carries its page marker (tests/fakes/pages.py) 1, 2, 3 ... in order;
images a viewer does not show as pages (previews, masks, later animation frames) carry markers from 900
on, so a test can tell exactly which picture each page of the output came from.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tests.fakes.pages import BAND_X, BAND_Y, CELLS, marker_bits, page_image

SMALL = (425, 550)  # half a letter page at 100 dpi: enough for the marker, small to build and decode
PAGE = (1700, 2200)  # a letter page at 200 dpi, as copiers scan them


@dataclass(frozen=True)
class Accepted:
    """An input that must be accepted: the markers of its pages in order, the scan's warning codes and
    each page's warning codes."""

    name: str
    build: Callable[[Path], bytes]
    markers: list[int]
    scan_warnings: list[str] = field(default_factory=list)
    page_warnings: dict[int, list[str]] = field(default_factory=dict)  # page number -> codes

    def write(self, directory: Path) -> Path:
        path = directory / self.name
        path.write_bytes(self.build(directory))
        return path


@dataclass(frozen=True)
class Rejected:
    name: str
    build: Callable[[Path], bytes]
    message: str  # a regular expression the rejection must match


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def page(number: int, size: tuple[int, int] = SMALL, mode: str = "L") -> Image.Image:
    return page_image(number, size).convert(mode)


# --- 1. frames that are not pages ---------------------------------------------------------------


def mpo_with_preview(_: Path) -> bytes:
    """A phone photo as MPO: the photo, then a small preview image (a second JPEG in the same file)."""
    return _save(page(1, PAGE, "RGB"), "MPO", save_all=True, append_images=[page(900, (320, 414), "RGB")])


def mpo_stereo(_: Path) -> bytes:
    """A stereo camera's MPO: two full-size views."""
    return _save(page(1, SMALL, "RGB"), "MPO", save_all=True, append_images=[page(901, SMALL, "RGB")])


def tiff(frames: list[tuple[Image.Image, dict]], compression: str = "tiff_deflate") -> bytes:
    """A TIFF of `frames`, each (image, extra tags such as {254: NewSubfileType})."""
    images = []
    for image, tags in frames:
        image = image.copy()
        image.encoderinfo = {"tiffinfo": tags, "compression": compression}
        images.append(image)
    first = images[0]
    return _save(first, "TIFF", save_all=True, append_images=images[1:], tiffinfo=frames[0][1], compression=compression)


def tiff_with_thumbnails(_: Path) -> bytes:
    """Pages each followed by a reduced-resolution copy (NewSubfileType bit 0), as some scanners write."""
    return tiff([(page(1), {254: 0}), (page(901, (85, 110)), {254: 1}), (page(2), {254: 0}), (page(902, (85, 110)), {254: 1})])


def tiff_with_mask(_: Path) -> bytes:
    """A page, its transparency mask (NewSubfileType bit 2), another page."""
    mask = Image.new("1", SMALL, 1)
    return tiff([(page(1), {}), (mask, {254: 4}), (page(2), {})])


def tiff_old_subfile_type(_: Path) -> bytes:
    """The TIFF 5 SubfileType tag: 1 full-resolution image, 2 reduced-resolution, 3 a page (libtiff does
    not write it, Pillow's own writer does)."""
    return tiff([(page(1), {255: 1}), (page(901, (85, 110)), {255: 2}), (page(2), {255: 3})], compression="raw")


def tiff_page_flags(_: Path) -> bytes:
    """NewSubfileType bit 1 ("one page of a multi-page image") on every page: they are all pages."""
    return tiff([(page(n), {254: 2}) for n in (1, 2, 3)])


def tiff_only_reduced(_: Path) -> bytes:
    """A lone image flagged reduced-resolution: it is still what a viewer shows."""
    return tiff([(page(1), {254: 1})])


def gif_animated(_: Path) -> bytes:
    return _save(page(1), "GIF", save_all=True, append_images=[page(902), page(903)], duration=500, loop=0)


def gif_still(_: Path) -> bytes:
    return _save(page(1), "GIF")


def webp_animated(_: Path) -> bytes:
    return _save(page(1, SMALL, "RGB"), "WEBP", save_all=True, append_images=[page(902, SMALL, "RGB")], duration=500, lossless=True)


def webp_still(_: Path) -> bytes:
    return _save(page(1, SMALL, "RGB"), "WEBP", quality=90)


def apng(_: Path) -> bytes:
    return _save(page(1), "PNG", save_all=True, append_images=[page(902), page(903)], duration=500)


def apng_with_default_image(_: Path) -> bytes:
    """IDAT holds a default image that is not part of the animation (for viewers without APNG support)."""
    return _save(page(1), "PNG", save_all=True, append_images=[page(902), page(903)], default_image=True, duration=500)


# --- 2. slightly damaged images -----------------------------------------------------------------


def jpeg(number: int = 1, size: tuple[int, int] = PAGE, **params) -> bytes:
    return _save(page(number, size, "RGB"), "JPEG", quality=90, **params)


def with_app_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """`data` (a JPEG) with an APPn/COM segment right after SOI."""
    return data[:2] + struct.pack(">HH", marker, len(payload) + 2) + payload + data[2:]


def tiff_header(entries: list[tuple[int, int, int, bytes]], offset: int = 8) -> bytes:
    """A little-endian TIFF header and one IFD of (tag, type, count, 4-byte value) entries."""
    body = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *entry[:3]) + entry[3] for entry in entries)
    return b"II*\x00" + struct.pack("<I", offset) + b"\0" * (offset - 8) + body + struct.pack("<I", 0)


BAD_EXIF = {
    "exif_offset_outside": b"Exif\0\0" + b"II*\x00" + struct.pack("<I", 99999),
    "exif_truncated": b"Exif\0\0II*",
    "exif_garbage": b"Exif\0\0" + b"\xde\xad\xbe\xef" * 10,
    "exif_huge_count": b"Exif\0\0" + tiff_header([(0x112, 3, 0x7FFFFFFF, struct.pack("<I", 8))]),
    "exif_ifd_loop": b"Exif\0\0" + tiff_header([(0x8769, 4, 1, struct.pack("<I", 8))]),
    "exif_orientation_text": b"Exif\0\0" + tiff_header([(0x112, 2, 4, b"abc\0")]),
    "exif_orientation_9": b"Exif\0\0" + tiff_header([(0x112, 3, 1, struct.pack("<HH", 9, 0))]),
}


def jpeg_missing_eoi(_: Path) -> bytes:
    data = jpeg()
    assert data.endswith(b"\xff\xd9")
    return data[:-2]


def jpeg_progressive_missing_eoi(_: Path) -> bytes:
    return jpeg(progressive=True)[:-2]


def jpeg_truncated(_: Path) -> bytes:
    """A baseline JPEG cut at 60 % (an interrupted download or copy)."""
    data = jpeg()
    return data[: len(data) * 6 // 10]


def jpeg_progressive_truncated(_: Path) -> bytes:
    data = jpeg(progressive=True)
    return data[: len(data) * 7 // 10]


def jpeg_trailing_garbage(_: Path) -> bytes:
    return jpeg(size=SMALL) + b"\0" * 4096 + b"garbage"


def jpeg_with_bad_exif(kind: str) -> Callable[[Path], bytes]:
    return lambda _: with_app_segment(jpeg(size=SMALL), 0xFFE1, BAD_EXIF[kind])


def jpeg_unparsable_icc(_: Path) -> bytes:
    """An APP2 ICC_PROFILE segment with no sequence bytes: Pillow cannot even identify the file."""
    return with_app_segment(jpeg(size=SMALL), 0xFFE2, b"ICC_PROFILE\0")


def jpeg_bad_icc_sequence(_: Path) -> bytes:
    return with_app_segment(jpeg(size=SMALL), 0xFFE2, b"ICC_PROFILE\0" + bytes([5, 2]) + b"junk" * 10)


def jpeg_big_metadata(_: Path) -> bytes:
    """XMP, Photoshop and comment segments of the maximum size (what editing apps leave behind)."""
    data = jpeg(size=SMALL)
    data = with_app_segment(data, 0xFFE1, b"http://ns.adobe.com/xap/1.0/\0" + b"<x>" * 21000)
    data = with_app_segment(data, 0xFFED, b"Photoshop 3.0\0" + b"8BIM" * 16000)
    return with_app_segment(data, 0xFFFE, b"c" * 65000)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(type, data, crc) of each chunk of a PNG."""
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks.append((kind, data[pos + 8 : pos + 8 + length], data[pos + 8 + length : pos + 12 + length]))
        pos += 12 + length
    return chunks


def chunk(kind: bytes, body: bytes, crc: bytes | None = None) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + (crc if crc is not None else struct.pack(">I", zlib.crc32(kind + body)))


def png_with(extra_before_idat: list[bytes] = (), extra_after_idat: list[bytes] = (), image: Image.Image | None = None, **params) -> bytes:
    """A PNG page (marker 1) with chunks inserted before its first IDAT and after its last."""
    chunks = png_chunks(_save(image if image is not None else page(1), "PNG", **params))
    out, inserted = bytearray(b"\x89PNG\r\n\x1a\n"), False
    for index, (kind, body, crc) in enumerate(chunks):
        if kind == b"IDAT" and not inserted:
            out += b"".join(extra_before_idat)
            inserted = True
        if kind == b"IEND":
            out += b"".join(extra_after_idat)
        out += chunk(kind, body, crc)
    return bytes(out)


def png_bad_iccp_crc(_: Path) -> bytes:
    profile = zlib.compress(b"not really an ICC profile" * 20)
    return png_with([chunk(b"iCCP", b"scanner RGB\0\0" + profile, crc=b"\0\0\0\0")])


def png_unparsable_iccp(_: Path) -> bytes:
    return png_with([chunk(b"iCCP", b"scanner RGB\0\0" + b"this is not zlib data")])


def png_bad_text_crc(_: Path) -> bytes:
    return png_with([chunk(b"tEXt", b"Software\0ScanApp", crc=b"\1\2\3\4")], [chunk(b"tEXt", b"Comment\0late", crc=b"\0\0\0\0")])


def png_oversized_xmp(_: Path) -> bytes:
    """A compressed iTXt XMP packet that inflates past PngImagePlugin.MAX_TEXT_CHUNK (1 MB)."""
    xmp = zlib.compress(b"<x:xmpmeta>" + b" " * (3 * 1024 * 1024) + b"</x:xmpmeta>")
    return png_with([chunk(b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0" + xmp)])


def png_too_much_text(_: Path) -> bytes:
    """70 zTXt chunks of 1 MB each once inflated: past PngImagePlugin.MAX_TEXT_MEMORY (64 MB) in all."""
    body = b"Comment\0\0" + zlib.compress(b"a" * (1024 * 1024 - 64))
    return png_with([], [chunk(b"zTXt", body)] * 70)


def png_bad_exif(_: Path) -> bytes:
    return png_with([chunk(b"eXIf", b"MM\x00*\xff\xff\xff\xff" + b"\0" * 20)])


def png_bad_idat_crc(_: Path) -> bytes:
    data = bytearray(png_with())
    pos = data.index(b"IDAT")
    length = struct.unpack(">I", data[pos - 4 : pos])[0]
    data[pos + 4 + length : pos + 8 + length] = b"\0\0\0\0"
    return bytes(data)


def png_missing_iend(_: Path) -> bytes:
    data = png_with()
    return data[: data.rindex(b"IEND") - 4]


def png_truncated(_: Path) -> bytes:
    """Cut at 60 % of the file."""
    data = png_with(image=page(1, PAGE))
    return data[: len(data) * 6 // 10]


def png_corrupt_deflate(_: Path) -> bytes:
    """Bytes overwritten in the middle of the compressed pixel data."""
    data = bytearray(png_with(image=page(1, PAGE)))
    middle = len(data) * 6 // 10
    data[middle : middle + 64] = b"\xff" * 64
    return bytes(data)


def png_interlaced(_: Path) -> bytes:
    # Pillow cannot write Adam7; encode it here: 7 passes of sub-images, each filtered (type 0).
    image = page(1)
    width, height = image.size
    pixels = image.tobytes()
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = bytearray()
    for x0, y0, dx, dy in passes:
        for y in range(y0, height, dy):
            row = pixels[y * width + x0 : (y + 1) * width : dx]
            if row:
                raw += b"\0" + row
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b"")


def png_16_bit_rgb(_: Path) -> bytes:
    """16 bits per channel, colour: Pillow's PNG plugin reads 48-bit pixels whole."""
    grey = page(1).tobytes()
    raw = b"".join(b"\0" + bytes(b for value in grey[y * SMALL[0] : (y + 1) * SMALL[0]] for b in (value, 0) * 3) for y in range(SMALL[1]))
    ihdr = struct.pack(">IIBBBBB", SMALL[0], SMALL[1], 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png_mode(mode: str, **params) -> Callable[[Path], bytes]:
    """The page in another PNG colour type / bit depth (1-bit, palette, 16-bit grey, grey+alpha ...)."""

    def build(_: Path) -> bytes:
        image = page(1)
        if mode == "I;16":
            image = image.convert("I").point(lambda v: v * 257).convert("I;16")
        elif mode == "P4":  # a 16-colour palette: 4 bits per pixel
            image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        elif mode == "PA":  # palette with per-entry alpha (tRNS): what pngquant writes
            image = image.convert("RGBA").quantize(colors=64)
            image.info["transparency"] = bytes([255] * 63 + [0])
        else:
            image = image.convert(mode)
        return _save(image, "PNG", **params)

    return build


def png_exif_rotated(_: Path) -> bytes:
    """A page stored sideways with Exif orientation 6 in an eXIf chunk (phones)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(page(1).transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)


def tiff_truncated(_: Path) -> bytes:
    data = tiff([(page(1, PAGE), {})], compression="raw")
    return data[: len(data) * 6 // 10]


def gif_truncated(_: Path) -> bytes:
    data = _save(page(1, PAGE), "GIF")
    return data[: len(data) * 6 // 10]


def tiff_with_broken_page(_: Path) -> bytes:
    """Three pages, the second one's pixel data replaced by a compression scheme nobody supports."""
    data = bytearray(tiff([(page(n), {}) for n in (1, 2, 3)], compression="raw"))
    ifd = struct.unpack("<I", data[4:8])[0]
    ifd = struct.unpack("<I", data[ifd + 2 + 12 * struct.unpack("<H", data[ifd : ifd + 2])[0] :][:4])[0]  # 2nd IFD
    for index in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * index
        if struct.unpack("<H", data[entry : entry + 2])[0] == 259:  # Compression
            data[entry + 8 : entry + 10] = struct.pack("<H", 60000)
    return bytes(data)


# --- 3. large scans and bombs -------------------------------------------------------------------


def png_bomb(_: Path) -> bytes:
    """A PNG header declaring 100000 x 100000 pixels (10 gigapixels) in a few hundred bytes."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def jpeg_bomb(_: Path) -> bytes:
    """A small JPEG whose frame header claims 60000 x 60000 pixels."""
    data = bytearray(jpeg(size=(64, 64)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def tiff_bomb(_: Path) -> bytes:
    entries = [(256, 4, 1, struct.pack("<I", 100_000)), (257, 4, 1, struct.pack("<I", 100_000)), (258, 3, 1, struct.pack("<HH", 8, 0)),
               (259, 3, 1, struct.pack("<HH", 1, 0)), (262, 3, 1, struct.pack("<HH", 1, 0)), (273, 4, 1, struct.pack("<I", 8)),
               (277, 3, 1, struct.pack("<HH", 1, 0)), (278, 4, 1, struct.pack("<I", 100_000)), (279, 4, 1, struct.pack("<I", 1))]
    return tiff_header(entries, offset=16)


def gif_bomb(_: Path) -> bytes:
    """A GIF whose logical screen and image are 65535 x 65535 (4.3 gigapixels)."""
    return (b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00\x3b")


def write_large_png(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    """A large scan (marker 1) written row by row, never whole in memory: the page drawn at a tenth of
    `size`, scaled up by repeating its rows and pixels; `mode` "RGB" or "L"."""
    width, height = size
    small = page_image(1, (max(50, width // 10), max(50, height // 10))).convert(mode)
    ratio = small.height / height
    compressor = zlib.compressobj(1)
    current: tuple[int, bytes] | None = None
    with path.open("wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2 if mode == "RGB" else 0, 0, 0, 0)))
        for y in range(height):
            source = min(int(y * ratio), small.height - 1)
            if current is None or current[0] != source:
                line = small.crop((0, source, small.width, source + 1)).resize((width, 1), Image.Resampling.NEAREST)
                current = (source, b"\0" + line.tobytes())
            data = compressor.compress(current[1])
            if data:
                out.write(chunk(b"IDAT", data))
        out.write(chunk(b"IDAT", compressor.flush()) + chunk(b"IEND", b""))
    return path


def write_large_jpeg(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    small = page_image(1, (max(50, size[0] // 10), max(50, size[1] // 10))).convert(mode)
    small.resize(size, Image.Resampling.NEAREST).save(path, format="JPEG", quality=85)
    return path


# --- 4. PDF forms, annotations and page trees ---------------------------------------------------

LETTER = (612, 792)


def marker_ops(number: int, width: float = LETTER[0], height: float = LETTER[1]) -> str:
    """PDF drawing operators for page `number`'s marker (black cells), in a space of width x height points."""
    ops = ["0 g"]
    x0, x1 = BAND_X[0] * width, BAND_X[1] * width
    cell = (x1 - x0) / CELLS
    top, bottom = height * (1 - BAND_Y[0]), height * (1 - BAND_Y[1])
    for index, bit in enumerate(marker_bits(number)):
        if bit:
            ops.append(f"{x0 + index * cell:.3f} {bottom:.3f} {cell:.3f} {top - bottom:.3f} re f")
    return "\n".join(ops)


def pdf(objects: dict[int, str | bytes], root: int = 1) -> bytes:
    """A PDF of the given numbered objects (dictionaries or `stream(...)` bodies) with a correct xref."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        body = objects[number]
        out += f"{number} 0 obj\n".encode() + (body.encode("latin-1") if isinstance(body, str) else body) + b"\nendobj\n"
    size = max(objects) + 1
    xref = len(out)
    out += f"xref\n0 {size}\n0000000000 65535 f \n".encode()
    for number in range(1, size):
        out += (f"{offsets[number]:010d} 00000 n \n" if number in offsets else "0000000000 65535 f \n").encode()
    out += f"trailer\n<< /Size {size} /Root {root} 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def stream(content: str, extra: str = "") -> str:
    return f"<< {extra} /Length {len(content.encode('latin-1'))} >>\nstream\n{content}\nendstream"


def page_tree(kids: list[int], count: int, extra: dict[int, str] | None = None, pages: int = 5) -> bytes:
    """Catalog 1, Pages 2 (/Kids `kids`, /Count `count`); page objects 11.. draw markers 1.. ."""
    objects: dict[int, str | bytes] = {
        1: "<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{' '.join(f'{kid} 0 R' for kid in kids)}] /Count {count} >>",
    }
    for n in range(1, pages + 1):
        objects[10 + n] = f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {LETTER[0]} {LETTER[1]}] /Contents {100 + n} 0 R >>"
        objects[100 + n] = stream(marker_ops(n))
    objects.update(extra or {})
    return pdf(objects)


def pdf_count_too_high(_: Path) -> bytes:
    """The reproducer: the page tree claims 3 pages and holds 2."""
    return page_tree([11, 12], 3)


def pdf_missing_kid(_: Path) -> bytes:
    """The middle entry of /Kids points at an object that does not exist; pages 1 and 3 remain."""
    return page_tree([11, 50, 13], 3)


def pdf_kid_not_a_page(_: Path) -> bytes:
    return page_tree([11, 60, 13], 3, {60: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"})


def pdf_kid_loops_to_root(_: Path) -> bytes:
    return page_tree([11, 2, 13], 3)


def pdf_inner_count_wrong(_: Path) -> bytes:
    objects: dict[int, str | bytes] = {
        1: "<< /Type /Catalog /Pages 2 0 R >>",
        2: "<< /Type /Pages /Kids [3 0 R 13 0 R] /Count 4 >>",
        3: "<< /Type /Pages /Parent 2 0 R /Kids [11 0 R] /Count 3 >>",
        11: f"<< /Type /Page /Parent 3 0 R /MediaBox [0 0 {LETTER[0]} {LETTER[1]}] /Contents 101 0 R >>",
        13: f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {LETTER[0]} {LETTER[1]}] /Contents 103 0 R >>",
        101: stream(marker_ops(1)),
        103: stream(marker_ops(2)),
    }
    return pdf(objects)


def pdf_filled_form(_: Path) -> bytes:
    """A page with a filled-in text field whose appearance the filling program left for the viewer to
    generate (/NeedAppearances, no /AP), as most form fillers do."""
    return pdf({
        1: "<< /Type /Catalog /Pages 2 0 R /AcroForm << /Fields [5 0 R] /NeedAppearances true /DR << /Font << /Helv 6 0 R >> >> /DA (/Helv 0 Tf 0 g) >> >>",
        2: "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        3: f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {LETTER[0]} {LETTER[1]}] /Contents 4 0 R /Annots [5 0 R] >>",
        4: stream(marker_ops(1)),
        5: "<< /Type /Annot /Subtype /Widget /FT /Tx /T (applicant) /V (FILLED IN BY HAND) /DA (/Helv 28 Tf 0 g) "
           "/Rect [60 400 560 460] /P 3 0 R /F 4 >>",
        6: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    })


FORM_FIELD_BOX = (60, 400, 560, 460)  # the filled field of pdf_filled_form, in PDF points (x0, y0, x1, y1)


def pdf_marker_in_annotations(_: Path) -> bytes:
    """Two pages whose markers exist only as annotation appearance streams: a stamp on page 1, a filled
    form field with its own appearance on page 2. A viewer shows both."""
    width, height = LETTER
    return pdf({
        1: "<< /Type /Catalog /Pages 2 0 R /AcroForm << /Fields [21 0 R] >> >>",
        2: "<< /Type /Pages /Kids [3 0 R 4 0 R] /Count 2 >>",
        3: f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {width} {height}] /Annots [10 0 R] >>",
        4: f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {width} {height}] /Annots [21 0 R] >>",
        10: f"<< /Type /Annot /Subtype /Stamp /Rect [0 0 {width} {height}] /F 4 /AP << /N 11 0 R >> >>",
        11: stream(marker_ops(1), f"/Type /XObject /Subtype /Form /BBox [0 0 {width} {height}]"),
        21: f"<< /Type /Annot /Subtype /Widget /FT /Btn /Ff 65536 /T (stamp) /Rect [0 0 {width} {height}] /P 4 0 R /F 4 "
            "/AP << /N 22 0 R >> >>",
        22: stream(marker_ops(2), f"/Type /XObject /Subtype /Form /BBox [0 0 {width} {height}]"),
    })


# --- the catalogue ------------------------------------------------------------------------------

FIRST_FRAME = ["first_frame_only"]
PARTIAL = ["decoded_partially"]
MISSING = ["missing_pages"]

ACCEPTED = [
    # 1. frames that are not pages
    Accepted("phone.mpo.jpg", mpo_with_preview, [1]),
    Accepted("stereo.mpo", mpo_stereo, [1]),
    Accepted("thumbnails.tif", tiff_with_thumbnails, [1, 2]),
    Accepted("mask.tif", tiff_with_mask, [1, 2]),
    Accepted("subfiletype.tif", tiff_old_subfile_type, [1, 2]),
    Accepted("page-flags.tif", tiff_page_flags, [1, 2, 3]),
    Accepted("only-reduced.tif", tiff_only_reduced, [1]),
    Accepted("animated.gif", gif_animated, [1], FIRST_FRAME),
    Accepted("still.gif", gif_still, [1]),
    Accepted("animated.webp", webp_animated, [1], FIRST_FRAME),
    Accepted("still.webp", webp_still, [1]),
    Accepted("animated.png", apng, [1], FIRST_FRAME),
    Accepted("animated-default.png", apng_with_default_image, [1], FIRST_FRAME),
    # 2. slightly damaged images
    Accepted("no-eoi.jpg", jpeg_missing_eoi, [1]),
    Accepted("no-eoi-progressive.jpg", jpeg_progressive_missing_eoi, [1]),
    Accepted("cut.jpg", jpeg_truncated, [1], page_warnings={1: PARTIAL}),
    Accepted("cut-progressive.jpg", jpeg_progressive_truncated, [1], page_warnings={1: PARTIAL}),
    Accepted("trailing-garbage.jpg", jpeg_trailing_garbage, [1]),
    *[Accepted(f"{kind}.jpg", jpeg_with_bad_exif(kind), [1]) for kind in BAD_EXIF],
    Accepted("icc-unparsable.jpg", jpeg_unparsable_icc, [1]),
    Accepted("icc-bad-sequence.jpg", jpeg_bad_icc_sequence, [1]),
    Accepted("big-metadata.jpg", jpeg_big_metadata, [1]),
    Accepted("iccp-bad-crc.png", png_bad_iccp_crc, [1]),
    Accepted("iccp-unparsable.png", png_unparsable_iccp, [1]),
    Accepted("text-bad-crc.png", png_bad_text_crc, [1]),
    Accepted("xmp-oversized.png", png_oversized_xmp, [1]),
    Accepted("text-too-much.png", png_too_much_text, [1]),
    Accepted("exif-bad.png", png_bad_exif, [1]),
    Accepted("idat-bad-crc.png", png_bad_idat_crc, [1]),
    Accepted("no-iend.png", png_missing_iend, [1]),
    Accepted("cut.png", png_truncated, [1], page_warnings={1: PARTIAL}),
    Accepted("corrupt-deflate.png", png_corrupt_deflate, [1], page_warnings={1: PARTIAL}),
    Accepted("interlaced.png", png_interlaced, [1]),
    Accepted("rgb16.png", png_16_bit_rgb, [1]),
    Accepted("bilevel.png", png_mode("1"), [1]),
    Accepted("palette4.png", png_mode("P4", bits=4), [1]),
    Accepted("palette-alpha.png", png_mode("PA"), [1]),
    Accepted("grey16.png", png_mode("I;16"), [1]),
    Accepted("grey-alpha.png", png_mode("LA"), [1]),
    Accepted("rgba.png", png_mode("RGBA"), [1]),
    Accepted("exif-rotated.png", png_exif_rotated, [1]),
    Accepted("cut.tif", tiff_truncated, [1], page_warnings={1: PARTIAL}),
    Accepted("cut.gif", gif_truncated, [1], page_warnings={1: PARTIAL}),
    # 4. forms and annotations, 5. broken page trees
    Accepted("annotations.pdf", pdf_marker_in_annotations, [1, 2]),
    Accepted("form.pdf", pdf_filled_form, [1]),
    Accepted("count-too-high.pdf", pdf_count_too_high, [1, 2], MISSING),
    Accepted("missing-kid.pdf", pdf_missing_kid, [1, 3], MISSING),
    Accepted("kid-not-a-page.pdf", pdf_kid_not_a_page, [1, 3], MISSING),
    Accepted("kid-loop.pdf", pdf_kid_loops_to_root, [1, 3], MISSING),
    Accepted("inner-count.pdf", pdf_inner_count_wrong, [1, 2], MISSING),
]

BOMB = r"pixels \(\d+ megapixels\), more than the 280 megapixel limit \(OCRSITE_MAX_IMAGE_PIXELS=280000000\)"

REJECTED = [
    Rejected("bomb.png", png_bomb, "100000 × 100000 " + BOMB),
    Rejected("bomb.jpg", jpeg_bomb, "60000 × 60000 " + BOMB),
    Rejected("bomb.tif", tiff_bomb, "100000 × 100000 " + BOMB),
    Rejected("bomb.gif", gif_bomb, "65535 × 65535 " + BOMB),
    Rejected("cut-in-header.jpg", lambda _: jpeg()[:300], "damaged"),
    Rejected("cut-before-pixels.png", lambda _: png_with()[:100], "damaged"),
    Rejected("cut.webp", lambda _: webp_still(_)[:2000], "damaged"),
    Rejected("no-pages.pdf", lambda _: page_tree([50], 1), "None of this PDF's 1 pages can be loaded"),
]
