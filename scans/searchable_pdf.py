"""A searchable PDF: the original pages with an invisible text layer over them.

- A PDF keeps its own pages, untouched: its content is wrapped in `q ... Q` and a text-layer content
  stream is appended (the OCRmyPDF approach); nothing is re-rendered, so the page looks exactly the same.
- An image (PNG, JPEG, TIFF with all its frames, WebP) becomes one page per frame, wrapped losslessly:
  a JPEG's own bytes (`DCTDecode`, its EXIF orientation applied by the drawing matrix), anything else as
  PNG-predicted Flate (the exact decoded pixels, alpha as a soft mask, 16-bit grey kept at 16 bits),
  the page sized from the image's DPI (without one: the size that fits A4, at least 72 dpi).

Where the text goes on each page (`Placement`, reported per page so the UI can say it):
- `words`: the engine's word boxes (`PageLayout` with words); each word is stretched over its box,
  so selecting and searching highlight the word. Corrected text is aligned to the boxes.
- `lines`: line boxes without words (a text-detection pass, `scans.text_lines`); the text is spread
  over them in reading order, so a hit lands on the right line, roughly at the right place in it.
- `page`: no boxes (VLM output): the text is spread over rows filling the page's text area (the
  bounding box of its ink). Search finds the text; highlights show only roughly where it is.
- `existing`: the PDF page already has a text layer at least half as long as the OCR text (a
  born-digital page, or one OCR'd before): it is kept and nothing is added, so searches and copies do
  not find everything twice (OCRmyPDF's `--skip-text`).
- `none`: no text for the page (failed, or blank).

Boxes are pixels of the image the engine read (`layout["width"]` x `layout["height"]`), which is the
page as shown (its CropBox, its /Rotate applied) turned `rotation` degrees further clockwise.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import pikepdf
import pypdfium2 as pdfium
from PIL import Image, ImageOps

from scans.pipeline.render import PdfPages, is_pdf
from scans.text_layer import (
    ADVANCE,
    UNITS_PER_EM,
    Box,
    InvisibleFont,
    Run,
    runs_over_lines,
    runs_over_words,
    split_box,
    spread,
    text_layer_stream,
)

if TYPE_CHECKING:
    from scans.pipeline.types import PageLayout

Placement = Literal["words", "lines", "page", "existing", "none"]

A4_INCHES = (8.27, 11.69)
MIN_DPI = 72.0
DPI_RANGE = (36.0, 4800.0)  # a recorded resolution outside this is treated as missing
EXISTING_TEXT_SHARE = 0.5
INK_SIDE = 256  # px: the rendering used to find a page's text area
INK_THRESHOLD = 160  # grey level below which a pixel is ink
ROW_FONT_SIZE = 10.0  # points: the row pitch assumed when spreading unplaced text over a text area
JPEG_MODES = {"L": "/DeviceGray", "RGB": "/DeviceRGB", "CMYK": "/DeviceCMYK"}


class SearchablePdfError(ValueError):
    """The source cannot be made into a searchable PDF (unreadable, or pages do not match)."""


@dataclass(frozen=True)
class PageText:
    """One page's text for the layer: plain text (not Markdown), optional boxes, and how the image the
    boxes refer to was turned (degrees clockwise from the page as shown)."""

    text: str
    layout: PageLayout | None = None
    rotation: int = 0


@dataclass(frozen=True)
class _Frame:
    """The page as the engine saw it: its size in points and the matrix from it to user space."""

    width: float
    height: float
    matrix: tuple[float, float, float, float, float, float]


def _frame_for(box: Sequence[float], rotation: int) -> _Frame:
    """The frame of a page whose visible area is `box` (x0, y0, x1, y1 in user space) shown turned
    `rotation` degrees clockwise (its /Rotate plus any turn the engine's image had)."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    rotation %= 360
    if rotation == 0:
        return _Frame(width, height, (1, 0, 0, 1, x0, y0))
    if rotation == 90:
        return _Frame(height, width, (0, 1, -1, 0, x1, y0))
    if rotation == 180:
        return _Frame(width, height, (-1, 0, 0, -1, x1, y1))
    if rotation == 270:
        return _Frame(height, width, (0, -1, 1, 0, x0, y1))
    raise SearchablePdfError(f"rotation must be a multiple of 90 degrees, not {rotation}")


def _text_lines(text: str) -> list[list[str]]:
    return [words for line in text.splitlines() if (words := line.split())]


def _layout_lines(layout: PageLayout, frame: _Frame) -> tuple[list[Box], list[list[Box]]]:
    """The layout's line and word boxes in frame points (y up), clamped to the frame."""
    sx = frame.width / max(1, layout["width"])
    sy = frame.height / max(1, layout["height"])

    def box(text: str, bbox: Sequence[float]) -> Box:
        left, top, right, bottom = (float(v) for v in bbox)
        return Box(
            text,
            min(max(0.0, left * sx), frame.width),
            min(max(0.0, frame.height - bottom * sy), frame.height),
            min(max(0.0, right * sx), frame.width),
            min(max(0.0, frame.height - top * sy), frame.height),
        )

    lines = [box("", line["bbox"]) for line in layout.get("lines", [])]
    words = [
        [part for word in line.get("words", []) for part in split_box(box(word["text"], word["bbox"]))]
        for line in layout.get("lines", [])
    ]
    return lines, words


Area = tuple[float, float, float, float]  # x0, y0, x1, y1 in frame points


def _text_area_rows(text_lines: list[list[str]], area: Area) -> tuple[list[list[str]], list[Box]]:
    """The text's lines, long ones wrapped at about ROW_FONT_SIZE, as rows down a text area (rows of
    equal pitch, at most one per 2 points: a page with more text than that has its words spread)."""
    x0, y0, x1, y1 = area
    per_row = max(1, int((x1 - x0) / (ROW_FONT_SIZE * ADVANCE / UNITS_PER_EM)))
    rows: list[list[str]] = []
    for words in text_lines:
        row: list[str] = []
        for word in words:
            if row and sum(len(w) + 1 for w in row) + len(word) > per_row:
                rows.append(row)
                row = []
            row.append(word)
        rows.append(row)
    most = max(1, int((y1 - y0) / 2))
    if len(rows) > most:
        rows = spread([word for row in rows for word in row], [1.0] * most)
    pitch = (y1 - y0) / len(rows)
    height = min(pitch, ROW_FONT_SIZE * 1.2)
    boxes = [Box("", x0, y1 - i * pitch - height, x1, y1 - i * pitch) for i in range(len(rows))]
    return rows, boxes


def placement_of(page: PageText) -> Placement:
    """Where the page's text will go, known before the PDF is written (except `existing`, which
    depends on the PDF page's own text layer)."""
    if not page.text.strip():
        return "none"
    lines = (page.layout or {}).get("lines") or []
    if any(word["text"].strip() for line in lines for word in line.get("words", [])):
        return "words"
    return "lines" if lines else "page"


def _place(page: PageText, frame: _Frame, text_area: Area | None) -> tuple[list[list[Run]], Placement]:
    placement = placement_of(page)
    text_lines = _text_lines(page.text)
    if placement == "none":
        return [], placement
    if placement == "page":
        area = text_area or (frame.width * 0.08, frame.height * 0.08, frame.width * 0.92, frame.height * 0.92)
        rows, boxes = _text_area_rows(text_lines, area)
        return runs_over_lines(rows, boxes), placement
    line_boxes, word_boxes = _layout_lines(page.layout, frame)  # type: ignore[arg-type]
    if placement == "words":
        return runs_over_words([word for line in text_lines for word in line], word_boxes, line_boxes), placement
    return runs_over_lines(text_lines, line_boxes), placement


def _ink_area(image: Image.Image, frame: _Frame) -> Area | None:
    """The bounding box of the ink of an image of the frame, in frame points (None for a blank page)."""
    gray = image.convert("L")
    gray.thumbnail((INK_SIDE, INK_SIDE))
    bbox = gray.point(lambda v: 255 if v < INK_THRESHOLD else 0).getbbox()
    if bbox is None:
        return None
    left, top, right, bottom = bbox
    sx, sy = frame.width / gray.width, frame.height / gray.height
    return left * sx, frame.height - bottom * sy, right * sx, frame.height - top * sy


def _needs_ink(page: PageText) -> bool:
    return placement_of(page) == "page"


def _free_name(pdf_page: pikepdf.Page, kind: str, stem: str) -> pikepdf.Name:
    taken = pdf_page.obj.get("/Resources", pikepdf.Dictionary()).get(kind, pikepdf.Dictionary())
    name, index = pikepdf.Name("/" + stem), 0
    while name in taken:
        index += 1
        name = pikepdf.Name(f"/{stem}{index}")
    return name


def _draw_layer(pdf_page: pikepdf.Page, font: InvisibleFont, lines: list[list[Run]], frame: _Frame) -> None:
    name = pdf_page.add_resource(font.font, pikepdf.Name.Font, _free_name(pdf_page, "/Font", "FOcr"))
    pdf_page.contents_add(text_layer_stream(font, str(name)[1:], lines, frame.matrix))


# --- PDF input -------------------------------------------------------------------------------------


def _visible_box(pdf_page: pikepdf.Page) -> tuple[float, float, float, float]:
    """The CropBox (default: MediaBox) within the MediaBox, corners normalized: what viewers show."""

    def corners(box: Sequence[float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = (float(v) for v in box)
        return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)

    media = corners(pdf_page.mediabox)
    crop = corners(pdf_page.cropbox)
    box = max(media[0], crop[0]), max(media[1], crop[1]), min(media[2], crop[2]), min(media[3], crop[3])
    return box if box[2] > box[0] and box[3] > box[1] else media


def _overlay_pdf(source: Path, pages: Sequence[PageText], output: Path | BinaryIO) -> list[Placement]:
    try:
        pdf = pikepdf.open(source)
    except pikepdf.PdfError as error:
        raise SearchablePdfError(f"The PDF could not be read: {error}") from error
    try:
        rendered = PdfPages(source)
    except pdfium.PdfiumError as error:
        pdf.close()
        raise SearchablePdfError(f"The PDF could not be read: {error}") from error
    placements: list[Placement] = []
    with pdf, rendered:
        if len(pdf.pages) != len(pages):
            raise SearchablePdfError(f"The PDF has {len(pdf.pages)} pages, but text was given for {len(pages)}.")
        font = InvisibleFont(pdf)
        for number, (pdf_page, page) in enumerate(zip(pdf.pages, pages), start=1):
            ocr_chars = len("".join(page.text.split()))
            existing = rendered.count_chars(number)
            if existing and existing >= EXISTING_TEXT_SHARE * ocr_chars:
                placements.append("existing")
                continue
            rotation = pdf_page.rotation if pdf_page.rotation % 90 == 0 else 0  # as viewers treat a bad /Rotate
            frame = _frame_for(_visible_box(pdf_page), rotation + page.rotation)
            area = None
            if _needs_ink(page):
                area = _ink_area(rendered.render(number, longest_side=INK_SIDE, rotation=page.rotation % 360), frame)
            lines, placement = _place(page, frame, area)
            placements.append(placement)
            if lines:
                # The page's own drawing is isolated so a graphics state it leaves set cannot move the text.
                pdf_page.contents_add(b"q\n", prepend=True)
                pdf_page.contents_add(b"Q\n")
                _draw_layer(pdf_page, font, lines, frame)
        font.finish()
        pdf.save(output, object_stream_mode=pikepdf.ObjectStreamMode.generate)
    return placements


# --- image input -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Png:
    """What a PDF image needs from a PNG stream: its header fields, palette and compressed data."""

    width: int
    height: int
    depth: int
    color_type: int  # 0 grey, 2 RGB, 3 palette (4 and 6 carry alpha)
    interlaced: bool
    transparency: bool  # a tRNS chunk
    palette: bytes
    idat: bytes


def _read_png(data: bytes) -> _Png:
    position, header, palette, transparency, idat = 8, b"", b"", False, []
    while position + 8 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"PLTE":
            palette = body
        elif kind == b"tRNS":
            transparency = True
        elif kind == b"IDAT":
            idat.append(body)
        position += 12 + length
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", header[:13])
    return _Png(width, height, depth, color_type, interlace != 0, transparency, palette, b"".join(idat))


def _encode_png(image: Image.Image) -> _Png:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return _read_png(buffer.getvalue())


def _flate_image(pdf: pikepdf.Pdf, png: _Png) -> pikepdf.Stream:
    """An image XObject holding exactly the PNG's pixels: its compressed data as a Flate stream with
    PNG predictors, which PDF decodes the way PNG does (no re-encoding)."""
    colors = {0: 1, 2: 3, 3: 1}[png.color_type]
    if png.color_type == 3:
        last = len(png.palette) // 3 - 1
        color_space: object = [pikepdf.Name.Indexed, pikepdf.Name.DeviceRGB, last, pikepdf.String(png.palette)]
    else:
        color_space = pikepdf.Name.DeviceGray if colors == 1 else pikepdf.Name.DeviceRGB
    return pikepdf.Stream(
        pdf,
        png.idat,
        Type=pikepdf.Name.XObject,
        Subtype=pikepdf.Name.Image,
        Width=png.width,
        Height=png.height,
        ColorSpace=color_space,
        BitsPerComponent=png.depth,
        Filter=pikepdf.Name.FlateDecode,
        DecodeParms=pikepdf.Dictionary(Predictor=15, Colors=colors, BitsPerComponent=png.depth, Columns=png.width),
    )


def _lossless_parts(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """The colour and alpha of a decoded frame, in modes PDF images hold as they are."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("1", "L", "RGB", "P", "I", "I;16", "I;16B"):  # "I": 16-bit grey PNGs (PNG keeps 16 bits)
        return image, None
    if image.mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        color = image.convert("L" if image.mode in ("LA", "La") else "RGB")
        return color, image.getchannel("A")
    if image.mode.startswith("I;16"):
        return image.convert("I"), None
    return image.convert("RGB"), None  # CMYK, YCbCr, LAB, F ...: as the renderer reads them


def _orientation_matrix(orientation: int, width: float, height: float) -> tuple[float, ...]:
    """`cm` operands drawing a stored image (the unit square) so it appears as EXIF `orientation` says,
    filling `width` x `height` points."""
    # (X, Y) of the shown image, as fractions from its top-left, for stored column c and row r.
    mappings = {
        1: lambda c, r: (c, r), 2: lambda c, r: (1 - c, r), 3: lambda c, r: (1 - c, 1 - r),
        4: lambda c, r: (c, 1 - r), 5: lambda c, r: (r, c), 6: lambda c, r: (1 - r, c),
        7: lambda c, r: (1 - r, 1 - c), 8: lambda c, r: (r, 1 - c),
    }
    shown = mappings.get(orientation, mappings[1])

    def point(u: float, v: float) -> tuple[float, float]:  # unit square: u right, v up (row 0 at v = 1)
        x, y = shown(u, 1 - v)
        return x * width, (1 - y) * height

    (e, f), (ax, ay), (cx, cy) = point(0, 0), point(1, 0), point(0, 1)
    return ax - e, ay - f, cx - e, cy - f, e, f


def _dpi(image: Image.Image, shown_size: tuple[int, int], swapped: bool) -> tuple[float, float]:
    dpi = image.info.get("dpi")
    try:
        x, y = (float(dpi[0]), float(dpi[1])) if dpi else (0.0, 0.0)
    except (TypeError, ValueError, IndexError):
        x = y = 0.0
    if DPI_RANGE[0] <= x <= DPI_RANGE[1] and DPI_RANGE[0] <= y <= DPI_RANGE[1]:
        # PNG records pixels per metre, so 300 dpi reads back as 299.9994: snap to the whole number.
        x, y = (round(v) if abs(v - round(v)) < 0.05 else v for v in (x, y))
        return (y, x) if swapped else (x, y)
    long_side, short_side = max(shown_size), min(shown_size)
    fit = max(long_side / A4_INCHES[1], short_side / A4_INCHES[0], MIN_DPI)
    return fit, fit


def _image_page(
    pdf: pikepdf.Pdf, image: Image.Image, raw: bytes
) -> tuple[pikepdf.Stream, tuple[float, float], tuple[float, ...]]:
    """(image XObject, page size in points, its drawing matrix). `raw`: the file's bytes when it is a
    one-frame JPEG or PNG, whose compressed data is embedded as it is."""
    orientation = image.getexif().get(0x0112, 1) if image.format in ("JPEG", "TIFF", "PNG", "WEBP") else 1
    swapped = orientation in (5, 6, 7, 8)
    stored = image.size
    shown_size = (stored[1], stored[0]) if swapped else stored
    dpi_x, dpi_y = _dpi(image, shown_size, swapped)
    size = (shown_size[0] * 72 / dpi_x, shown_size[1] * 72 / dpi_y)
    if image.format == "JPEG" and image.mode in JPEG_MODES and raw:
        xobject = pikepdf.Stream(
            pdf,
            raw,
            Type=pikepdf.Name.XObject,
            Subtype=pikepdf.Name.Image,
            Width=stored[0],
            Height=stored[1],
            ColorSpace=pikepdf.Name(JPEG_MODES[image.mode]),
            BitsPerComponent=8,
            Filter=pikepdf.Name.DCTDecode,
        )
        if image.mode == "CMYK" and "adobe" in image.info:
            xobject.Decode = [1, 0, 1, 0, 1, 0, 1, 0]  # Adobe writes CMYK JPEGs inverted
        return xobject, size, _orientation_matrix(orientation, *size)
    matrix = (size[0], 0, 0, size[1], 0, 0)
    if image.format == "PNG" and raw and orientation == 1:
        png = _read_png(raw)
        if not png.interlaced and not png.transparency and png.color_type in (0, 2, 3):
            return _flate_image(pdf, png), size, matrix
    color, alpha = _lossless_parts(ImageOps.exif_transpose(image))
    xobject = _flate_image(pdf, _encode_png(color))
    if alpha is not None:
        xobject.SMask = _flate_image(pdf, _encode_png(alpha))
    return xobject, size, matrix


def _shown_small(image: Image.Image, rotation: int) -> Image.Image:
    """The frame as shown (EXIF orientation, then `rotation` clockwise), decoded small where the
    format allows it (JPEG decodes at 1/2 to 1/8 scale): enough to find the ink."""
    image.draft("L", (INK_SIDE, INK_SIDE))
    shown = ImageOps.exif_transpose(image)
    return shown.rotate(-rotation, expand=True) if rotation else shown


def _wrap_images(source: Path, pages: Sequence[PageText], output: Path | BinaryIO) -> list[Placement]:
    placements: list[Placement] = []
    pdf = pikepdf.new()
    with pdf:
        font = InvisibleFont(pdf)
        try:
            image = Image.open(source)
        except (OSError, Image.UnidentifiedImageError) as error:
            raise SearchablePdfError(f"The image could not be read: {error}") from error
        with image:
            frames = getattr(image, "n_frames", 1)
            if frames < len(pages):  # fewer is fine: an animation whose first frame is its one page
                raise SearchablePdfError(f"The image has {frames} pages, but text was given for {len(pages)}.")
            raw = Path(source).read_bytes() if image.format in ("JPEG", "PNG") and frames == 1 else b""
            for index, page in enumerate(pages):
                image.seek(index)
                xobject, (width, height), matrix = _image_page(pdf, image, raw)
                pdf_page = pdf.add_blank_page(page_size=(width, height))
                name = pdf_page.add_resource(xobject, pikepdf.Name.XObject, pikepdf.Name("/Im0"))
                pdf_page.contents_add(f"q {' '.join(f'{v:.6f}' for v in matrix)} cm {name} Do Q\n".encode("ascii"))
                frame = _frame_for((0.0, 0.0, width, height), page.rotation)
                area = None
                if _needs_ink(page):
                    area = _ink_area(_shown_small(image, page.rotation % 360), frame)
                lines, placement = _place(page, frame, area)
                placements.append(placement)
                if lines:
                    _draw_layer(pdf_page, font, lines, frame)
        font.finish()
        pdf.save(output, object_stream_mode=pikepdf.ObjectStreamMode.generate)
    return placements


def write_searchable_pdf(
    source: Path | str, content_type: str, pages: Sequence[PageText], output: Path | str | BinaryIO
) -> list[Placement]:
    """Write `source` (a PDF or an image file) with an invisible text layer to `output`; `pages[i]` is
    the text of page i + 1 (every page of a PDF, in order; the first len(pages) frames of an image).
    Returns where each page's text was placed.

    Raises SearchablePdfError when the source cannot be read or its page count differs from `pages`.
    Blocking and CPU-bound (PDFium and qpdf): call it off the event loop."""
    source = Path(source)
    output = Path(output) if isinstance(output, str) else output
    for page in pages:
        if page.rotation % 90:
            raise SearchablePdfError(f"rotation must be a multiple of 90 degrees, not {page.rotation}")
    if is_pdf(content_type):
        return _overlay_pdf(source, pages, output)
    return _wrap_images(source, pages, output)
