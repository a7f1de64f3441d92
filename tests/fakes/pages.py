"""Test inputs whose every page carries a machine-readable marker of its page number.

The marker is a row of black/white cells along the top edge of the page:
    [1 0] start guard, 14 data bits (MSB first), 8 CRC-8 bits, [0 1] end guard.
Cell positions are fractions of the page's width and height, so the marker survives any resize (down to
a longest side of about 400 px), JPEG compression and conversion to grayscale. The CRC and the guards make
a false read of ordinary page content (or of a page seen sideways) very unlikely.

`read_marker` reads an image as a vision model served by vLLM would see it: vLLM converts images to RGB,
which drops the alpha channel. So pages built with `alpha=True` keep black pixels under transparency and
only read correctly once flattened onto white, the way the OCR pipeline must do it.
"""

from __future__ import annotations

import base64
import io
import random
import zlib
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps, ImageStat

MAX_NUMBER = (1 << 14) - 1
DATA_BITS = 14
CHECK_BITS = 8
CELLS = 2 + DATA_BITS + CHECK_BITS + 2
BAND_X = (0.06, 0.94)
BAND_Y = (0.015, 0.045)
CONTENT_TOP = 0.09  # nothing but white between the marker band and this line
DARK_MAX = 110
LIGHT_MIN = 145

DEFAULT_IMAGE_SIZE = (850, 1100)  # US Letter at 100 dpi
# Pillow's Image.transpose operation that undoes each EXIF orientation (what ImageOps.exif_transpose applies).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# ... and the one that produces the stored pixels from the upright page.
_EXIF_INVERSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _crc8(value: int) -> int:
    crc = 0
    for byte in value.to_bytes(2, "big"):
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def marker_bits(number: int) -> list[int]:
    if not 0 <= number <= MAX_NUMBER:
        raise ValueError(f"page marker must be within 0..{MAX_NUMBER}, got {number}")
    data = [(number >> i) & 1 for i in reversed(range(DATA_BITS))]
    check = [(_crc8(number) >> i) & 1 for i in reversed(range(CHECK_BITS))]
    return [1, 0, *data, *check, 0, 1]


def _cell_box(index: int, width: int, height: int, inset: float = 0.0) -> tuple[float, float, float, float]:
    x0, x1 = BAND_X[0] * width, BAND_X[1] * width
    y0, y1 = BAND_Y[0] * height, BAND_Y[1] * height
    cell = (x1 - x0) / CELLS
    left = x0 + index * cell
    dx, dy = cell * inset, (y1 - y0) * inset
    return left + dx, y0 + dy, left + cell - dx, y1 - dy


def draw_marker(draw: ImageDraw.ImageDraw, number: int, width: int, height: int, black=0, white=255) -> None:
    for index, bit in enumerate(marker_bits(number)):
        x0, y0, x1, y1 = _cell_box(index, width, height)
        draw.rectangle((round(x0), round(y0), round(x1) - 1, round(y1) - 1), fill=black if bit else white)


def page_image(number: int, size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """An upright grayscale page: the marker on top, then a heading and gray text-like bars."""
    width, height = size
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    draw_marker(draw, number, width, height)
    _draw_body(draw, number, width, height, ink=90)
    return image


def chat_request(number: int, model: str) -> dict:
    """An OpenAI chat-completions request body whose only content is page `number` as a PNG data URI."""
    buffer = io.BytesIO()
    page_image(number).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}]
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def _draw_body(draw: ImageDraw.ImageDraw, number: int, width: int, height: int, ink) -> None:
    rng = random.Random(number)
    margin = int(width * 0.08)
    top = int(height * CONTENT_TOP) + int(height * 0.02)
    draw.text((margin, top), f"Page {number}", fill=ink if isinstance(ink, int) else ink)
    line = max(4, height // 60)
    y = top + 3 * line
    while y < height * 0.92:
        length = rng.uniform(0.55, 1.0) if rng.random() > 0.15 else rng.uniform(0.1, 0.4)
        draw.rectangle((margin, y, margin + int((width - 2 * margin) * length), y + line // 2), fill=ink)
        y += line + (line if rng.random() < 0.12 else 0)


def make_image(
    path: str | Path,
    number: int,
    fmt: str = "PNG",
    *,
    size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    exif_orientation: int | None = None,
    alpha: bool = False,
    quality: int = 90,
) -> Path:
    """One page as an image file (PNG, JPEG or WEBP).

    `exif_orientation` (2..8) stores the pixels transformed so that applying the EXIF tag restores the
    upright page. `alpha=True` (PNG/WEBP) makes the background and the marker's white cells transparent
    (RGB black underneath), so only a correct flatten onto white keeps the page readable.
    """
    path = Path(path)
    fmt = fmt.upper()
    image = page_image(number, size)
    if alpha:
        if fmt == "JPEG":
            raise ValueError("JPEG has no alpha channel")
        opaque = ImageOps.invert(image).point(lambda v: 255 if v > 0 else 0)
        rgba = Image.new("RGBA", size, (0, 0, 0, 0))
        rgba.paste(image.convert("RGB"), mask=opaque)
        image = rgba
    else:
        image = image.convert("RGB")
    if exif_orientation not in (None, 1):
        image = image.transpose(_EXIF_INVERSE[exif_orientation])
    params: dict = {}
    if fmt in ("JPEG", "WEBP"):
        params["quality"] = quality
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        params["exif"] = exif
    image.save(path, format=fmt, **params)
    return path


def make_tiff(path: str | Path, pages: int, *, size: tuple[int, int] = DEFAULT_IMAGE_SIZE) -> Path:
    """A multi-page TIFF whose page i (1-based) carries marker i."""
    path = Path(path)
    frames = [page_image(number, size) for number in range(1, pages + 1)]
    frames[0].save(path, format="TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    return path


def make_pdf(
    path: str | Path,
    pages: int,
    *,
    size: tuple[float, float] = (612, 792),
    text_layer: bool = False,
    dpi: int = 100,
    numbers: Sequence[int] | None = None,
) -> Path:
    """A scanned-like PDF: each page is a grayscale image (marker + text-like bars) filling the page.

    `size` is the page size in points; the image has `dpi` pixels per inch. With `text_layer=True` each
    page also carries an invisible text layer (as OCRed scans do) reading "Text layer of page N".
    `numbers` overrides the markers (default 1..pages).
    """
    path = Path(path)
    numbers = list(numbers) if numbers is not None else list(range(1, pages + 1))
    if len(numbers) != pages:
        raise ValueError("numbers must have one entry per page")
    width_pt, height_pt = size
    pixels = (max(1, round(width_pt * dpi / 72)), max(1, round(height_pt * dpi / 72)))
    writer = _PdfWriter()
    font = writer.add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    pages_ref = writer.reserve()
    kids = []
    for number in numbers:
        image = page_image(number, pixels)
        xobject = writer.add_stream(
            f"<< /Type /XObject /Subtype /Image /Width {pixels[0]} /Height {pixels[1]} "
            f"/ColorSpace /DeviceGray /BitsPerComponent 8 /Filter /FlateDecode".encode(),
            zlib.compress(image.tobytes(), 6),
        )
        content = f"q {width_pt:g} 0 0 {height_pt:g} 0 0 cm /Im0 Do Q\n"
        if text_layer:
            content += f"BT 3 Tr /F1 12 Tf 72 {height_pt * 0.8:.2f} Td (Text layer of page {number}) Tj ET\n"
        contents = writer.add_stream(b"<<", content.encode())
        kids.append(
            writer.add(
                f"<< /Type /Page /Parent {pages_ref} 0 R /MediaBox [0 0 {width_pt:g} {height_pt:g}] "
                f"/Resources << /XObject << /Im0 {xobject} 0 R >> /Font << /F1 {font} 0 R >> >> "
                f"/Contents {contents} 0 R >>".encode()
            )
        )
    writer.set(pages_ref, f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>".encode())
    catalog = writer.add(f"<< /Type /Catalog /Pages {pages_ref} 0 R >>".encode())
    path.write_bytes(writer.render(catalog))
    return path


class _PdfWriter:
    """The smallest PDF 1.4 writer that is enough for the pages above."""

    def __init__(self) -> None:
        self._objects: list[bytes | None] = []

    def reserve(self) -> int:
        self._objects.append(None)
        return len(self._objects)

    def set(self, ref: int, body: bytes) -> None:
        self._objects[ref - 1] = body

    def add(self, body: bytes) -> int:
        self._objects.append(body)
        return len(self._objects)

    def add_stream(self, dict_head: bytes, data: bytes) -> int:
        return self.add(dict_head + f" /Length {len(data)} >>\nstream\n".encode() + data + b"\nendstream")

    def render(self, root: int) -> bytes:
        out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        offsets = []
        for index, body in enumerate(self._objects, start=1):
            if body is None:
                raise ValueError(f"object {index} reserved but never set")
            offsets.append(len(out))
            out += f"{index} 0 obj\n".encode() + body + b"\nendobj\n"
        xref = len(out)
        out += f"xref\n0 {len(offsets) + 1}\n0000000000 65535 f \n".encode()
        out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
        out += f"trailer\n<< /Size {len(offsets) + 1} /Root {root} 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
        return bytes(out)


def read_marker(image: Image.Image) -> int | None:
    """The page number encoded on top of `image` as it is (no rotation tried), or None."""
    gray = image.convert("L") if image.mode != "L" else image
    width, height = gray.size
    if width < 50 or height < 50:
        return None
    bits = []
    for index in range(CELLS):
        x0, y0, x1, y1 = _cell_box(index, width, height, inset=0.25)
        box = (int(x0), int(y0), max(int(x0) + 1, int(round(x1))), max(int(y0) + 1, int(round(y1))))
        mean = ImageStat.Stat(gray.crop(box)).mean[0]
        if mean <= DARK_MAX:
            bits.append(1)
        elif mean >= LIGHT_MIN:
            bits.append(0)
        else:
            return None
    if bits[:2] != [1, 0] or bits[-2:] != [0, 1]:
        return None
    data = bits[2 : 2 + DATA_BITS]
    check = bits[2 + DATA_BITS : 2 + DATA_BITS + CHECK_BITS]
    number = int("".join(map(str, data)), 2)
    if int("".join(map(str, check)), 2) != _crc8(number):
        return None
    return number


# Rotations tried, as Image.rotate angles (counter-clockwise degrees), in order.
ROTATIONS = (0, 90, 180, 270)


def read_marker_any_rotation(image: Image.Image) -> tuple[int, int] | None:
    """(number, rotation) where rotating `image` counter-clockwise by `rotation` degrees made it readable."""
    gray = image.convert("L") if image.mode != "L" else image
    for rotation in ROTATIONS:
        candidate = gray if rotation == 0 else gray.rotate(rotation, expand=True)
        number = read_marker(candidate)
        if number is not None:
            return number, rotation
    return None
