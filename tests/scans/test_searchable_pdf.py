"""The searchable PDF (scans.searchable_pdf): the text layer reads back as the page text in every script,
words land on their boxes (checked through PDFium's own page-to-device mapping, not ours), pages look
exactly as before, and every input kind (PDF with /Rotate and CropBox, PNG modes, JPEG with EXIF
orientation, multi-page TIFF, WebP, born-digital PDF) is handled."""

from __future__ import annotations

import ctypes
import io
import shutil
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pikepdf
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
import pytest
from bidi import get_display
from PIL import Image, ImageDraw, ImageOps

from scans.pipeline.render import render_page_sync
from scans.searchable_pdf import PageText, SearchablePdfError, placement_of, write_searchable_pdf

PDF = "application/pdf"
RENDER_SIDE = 1000


# --- inputs ----------------------------------------------------------------------------------------


def grid_rects(columns: int, rows: int, area: tuple[float, float, float, float]) -> list[tuple[float, float, float, float]]:
    """Rectangles in a grid over `area` (x0, y0, x1, y1), a gap around each, widths varying by column."""
    x0, y0, x1, y1 = area
    cell_w, cell_h = (x1 - x0) / columns, (y1 - y0) / rows
    rects = []
    for row in range(rows):
        for column in range(columns):
            left = x0 + column * cell_w + 0.1 * cell_w
            width = (0.5 + 0.3 * ((row + column) % 3) / 2) * cell_w
            bottom = y0 + row * cell_h + 0.3 * cell_h
            rects.append((left, bottom, left + width, bottom + 0.4 * cell_h))
    return rects


def make_pdf(path: Path, pages: list[dict]) -> Path:
    """Pages with `size`, optional `rotate`, `cropbox`, `rects` (black, user space) and `text` (a real
    text layer, Helvetica)."""
    pdf = pikepdf.new()
    helvetica = pdf.make_indirect(
        pikepdf.Dictionary(Type=pikepdf.Name.Font, Subtype=pikepdf.Name.Type1, BaseFont=pikepdf.Name.Helvetica)
    )
    for spec in pages:
        page = pdf.add_blank_page(page_size=spec.get("size", (612, 792)))
        ops = ["0.2 0.4 0.6 rg 20 20 60 60 re f", "0 g"]  # a coloured mark so rotations are visible
        ops += [f"{x0:.2f} {y0:.2f} {x1 - x0:.2f} {y1 - y0:.2f} re f" for x0, y0, x1, y1 in spec.get("rects", [])]
        if spec.get("text"):
            page.Resources = pikepdf.Dictionary(Font=pikepdf.Dictionary(F1=helvetica))
            ops.append(f"BT /F1 12 Tf 72 700 Td ({spec['text']}) Tj ET")
        page.Contents = pdf.make_stream("\n".join(ops).encode())
        if spec.get("rotate"):
            page.Rotate = spec["rotate"]
        if spec.get("cropbox"):
            page.CropBox = spec["cropbox"]
        if spec.get("mediabox"):
            page.MediaBox = spec["mediabox"]
    pdf.save(path)
    return path


def ink_boxes(image: Image.Image) -> list[list[tuple[int, int, int, int]]]:
    """Dark rectangles of an image as bands (rows with ink) of runs (columns with ink): pixel boxes."""
    dark = np.asarray(image.convert("L")) < 128
    dark[:, :] &= ~_mark_mask(image)
    bands = []
    for top, bottom in _runs(dark.any(axis=1)):
        band = dark[top:bottom]
        bands.append([(left, top, right, bottom) for left, right in _runs(band.any(axis=0))])
    return bands


def _mark_mask(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB")).astype(int)
    return (np.abs(rgb[..., 2] - rgb[..., 0]) > 40)  # the blue-ish orientation mark is not a word


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    padded = np.concatenate([[False], flags, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(changes[::2].tolist(), changes[1::2].tolist()))


def layout_for(boxes: list[list[tuple[int, int, int, int]]], words: list[str], size: tuple[int, int]) -> dict:
    iterator = iter(words)
    lines = []
    for band in boxes:
        line_words = [{"text": next(iterator), "bbox": box, "conf": 90.0} for box in band]
        left = min(box[0] for box in band)
        lines.append({"bbox": (left, band[0][1], max(b[2] for b in band), band[0][3]), "conf": 90.0, "words": line_words})
    return {"width": size[0], "height": size[1], "lines": lines}


def words_for(count: int) -> list[str]:
    vocabulary = ["alpha", "Beta", "gamma", "café", "naïve", "Straße", "x", "déjà-vu", "ŁÓDŹ", "12.5%"]
    return [vocabulary[i % len(vocabulary)] + str(i) for i in range(count)]


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --- reading the output back -----------------------------------------------------------------------


def pdfium_text(path: Path, index: int = 0) -> str:
    pdf = pdfium.PdfDocument(str(path))
    try:
        page = pdf[index]
        textpage = page.get_textpage()
        return textpage.get_text_range()
    finally:
        pdf.close()


def normalized(text: str) -> str:
    text = "".join(char for char in text if unicodedata.category(char) != "Cf")  # bidi embedding marks
    return " ".join(text.split())


PixelBox = tuple[int, int, int, int]


def device_word_boxes(path: Path, index: int, size: tuple[int, int], rotate: int = 0) -> list[tuple[str, PixelBox]]:
    """Each word of the page's text layer with the union of its characters' loose boxes, mapped to
    device pixels of a `size` rendering turned `rotate` degrees by PDFium itself."""
    pdf = pdfium.PdfDocument(str(path))
    try:
        page = pdf[index]
        textpage = page.get_textpage()
        words: list[tuple[str, tuple[int, int, int, int]]] = []
        current: list[tuple[str, list[int]]] = []

        def flush() -> None:
            if current:
                xs = [x for _, box in current for x in box[0::2]]
                ys = [y for _, box in current for y in box[1::2]]
                words.append(("".join(char for char, _ in current), (min(xs), min(ys), max(xs), max(ys))))
                current.clear()

        for i in range(textpage.count_chars()):
            char = textpage.get_text_range(i, 1)
            if not char.strip() or pdfium_c.FPDFText_IsGenerated(textpage.raw, i) == 1:
                flush()
                continue
            left, bottom, right, top = textpage.get_charbox(i, loose=True)
            corners = []
            for x, y in ((left, bottom), (right, top)):
                dx, dy = ctypes.c_int(), ctypes.c_int()
                pdfium_c.FPDF_PageToDevice(page.raw, 0, 0, size[0], size[1], rotate // 90, x, y, dx, dy)
                corners += [dx.value, dy.value]
            current.append((char, corners))
        flush()
        return words
    finally:
        pdf.close()


def assert_on_boxes(found: list[tuple[str, PixelBox]], expected: dict[str, PixelBox]) -> None:
    """Within 2 px, plus 1.5 % of the box's height: PDFium's character boxes reach 1.2 % of the font size
    above the ascent the font declares (measured; other viewers use the declared ascent)."""
    assert sorted(text for text, _ in found) == sorted(expected), (found, expected)
    for text, box in found:
        want = expected[text]
        tolerance = 2 + 0.015 * (want[3] - want[1])
        assert all(abs(a - b) <= tolerance for a, b in zip(box, want)), (text, box, want)


def render_all(path: Path, scale: float = 0.5) -> list[bytes]:
    pdf = pdfium.PdfDocument(str(path))
    try:
        return [page.render(scale=scale, may_draw_forms=True).to_pil().tobytes() for page in pdf]
    finally:
        pdf.close()


# --- PDF input -------------------------------------------------------------------------------------

PAGE_SPECS = {
    "plain": {"size": (612, 792)},
    "rotate 90": {"size": (612, 792), "rotate": 90},
    "rotate 180": {"size": (612, 792), "rotate": 180},
    "rotate 270 landscape": {"size": (792, 612), "rotate": 270},
    "cropbox offset": {"size": (612, 792), "cropbox": [100, 150, 550, 700]},
    "mediabox not at the origin": {"size": (612, 792), "mediabox": [-50, 30, 562, 822]},
    "rotate 90 and cropbox": {"size": (612, 792), "rotate": 90, "cropbox": [40, 60, 580, 760]},
}


@pytest.mark.parametrize("spec", PAGE_SPECS.values(), ids=PAGE_SPECS.keys())
@pytest.mark.parametrize("engine_rotation", [0, 90])
def test_words_land_on_their_boxes_in_a_pdf(tmp_path: Path, spec: dict, engine_rotation: int) -> None:
    crop = spec.get("cropbox", spec.get("mediabox", [0, 0, *spec["size"]]))
    area = (crop[0] + 60, crop[1] + 90, crop[2] - 60, crop[3] - 90)
    source = make_pdf(tmp_path / "in.pdf", [{**spec, "rects": grid_rects(3, 6, area)}])
    seen = render_page_sync(source, PDF, 1, longest_side=RENDER_SIDE, image_format="png", rotation=engine_rotation)
    boxes = ink_boxes(decode(seen.data))
    assert sum(map(len, boxes)) == 18
    words = words_for(18)
    layout = layout_for(boxes, words, (seen.width, seen.height))
    text = "\n".join(" ".join(word["text"] for word in line["words"]) for line in layout["lines"])
    out = tmp_path / "out.pdf"

    placements = write_searchable_pdf(source, PDF, [PageText(text, layout, engine_rotation)], out)

    assert placements == ["words"]
    assert normalized(pdfium_text(out)) == normalized(text)
    expected = {word["text"]: word["bbox"] for line in layout["lines"] for word in line["words"]}
    assert_on_boxes(device_word_boxes(out, 0, (seen.width, seen.height), engine_rotation), expected)
    assert render_all(out) == render_all(source)


def test_pages_render_pixel_identical_and_the_rest_of_the_pdf_is_kept(tmp_path: Path) -> None:
    specs = [{**spec, "rects": grid_rects(2, 3, (100, 100, 400, 400))} for spec in PAGE_SPECS.values()]
    source = make_pdf(tmp_path / "in.pdf", specs)
    with pikepdf.open(source, allow_overwriting_input=True) as pdf:
        pdf.docinfo["/Title"] = "Quarterly report"
        pdf.Root.PageLabels = pikepdf.Dictionary(Nums=[0, pikepdf.Dictionary(S=pikepdf.Name.r)])
        pdf.save(source)
    out = tmp_path / "out.pdf"
    texts = [PageText(f"page {n} text") for n in range(1, len(specs) + 1)]

    assert write_searchable_pdf(source, PDF, texts, out) == ["page"] * len(specs)

    assert render_all(out, scale=1.0) == render_all(source, scale=1.0)
    with pikepdf.open(out) as pdf:
        assert pdf.check_pdf_syntax() == []
        assert str(pdf.docinfo["/Title"]) == "Quarterly report" and "/PageLabels" in pdf.Root
        for page, spec in zip(pdf.pages, specs):
            assert page.rotation == spec.get("rotate", 0)
    for index in range(len(specs)):
        assert normalized(pdfium_text(out, index)) == f"page {index + 1} text"


def test_a_page_content_that_leaves_its_graphics_state_changed_does_not_move_the_text(tmp_path: Path) -> None:
    pdf = pikepdf.new()
    page = pdf.add_blank_page(page_size=(600, 800))
    page.Contents = pdf.make_stream(b"2 0 0 2 300 400 cm 0 g 0 0 10 10 re f")  # never restored
    source = tmp_path / "in.pdf"
    pdf.save(source)
    layout = {"width": 600, "height": 800, "lines": [
        {"bbox": (100, 100, 300, 130), "conf": 90.0,
         "words": [{"text": "Placed", "bbox": (100, 100, 300, 130), "conf": 90.0}]}
    ]}
    out = tmp_path / "out.pdf"
    write_searchable_pdf(source, PDF, [PageText("Placed", layout)], out)
    assert_on_boxes(device_word_boxes(out, 0, (600, 800)), {"Placed": (100, 100, 300, 130)})


SCRIPTS = {
    "ascii": "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs, 1234.",
    "accented latin": "Ça coûte 12,50 € — déjà vu à l'hôtel.\nŻółć gęślą jaźń; Ærøskøbing; naïve Straße.",
    "cjk": "東京都の人口は約一千四百万人です。\n北京 上海 广州\n한국어 텍스트",
    "hebrew": "שלום עולם\nזהו טקסט בעברית 2024",
    "arabic": "مرحبا بالعالم\nهذا نص عربي ١٢٣",
    "beyond the bmp": "Math 𝒜𝒷𝒸 and emoji 😀 text",
}


def realistic_layout(text: str, size: tuple[int, int] = (1000, 1294)) -> dict:
    """Word boxes as a page of text would have them: 28 px lines, an advance of ~0.55 em, 0.3 em gaps,
    words in the order the Unicode bidi algorithm shows them (python-bidi, as a viewer would)."""
    height, lines = 28, []
    for index, line in enumerate(text.splitlines()):
        top = 100 + index * 2 * height
        logical = line.split()
        shown = get_display(line).split()
        x = 80.0
        boxes = {}
        for token in shown:
            word = next(w for w in logical if w not in boxes and token in (w, w[::-1]))
            width = 0.55 * height * len(word) * (2 if any(unicodedata.east_asian_width(c) == "W" for c in word) else 1)
            boxes[word] = (round(x), top, round(x + width), top + height)
            x += width + 0.3 * height
        words = [{"text": word, "bbox": boxes[word], "conf": 95.0} for word in logical]
        left, right = min(w["bbox"][0] for w in words), max(w["bbox"][2] for w in words)
        lines.append({"bbox": (left, top, right, top + height), "conf": 95.0, "words": words})
    return {"width": size[0], "height": size[1], "lines": lines}


@pytest.fixture
def blank_pdf(tmp_path: Path) -> Path:
    return make_pdf(tmp_path / "blank.pdf", [{"size": (612, 792)}])


NO_POPPLER = pytest.mark.skipif(shutil.which("pdftotext") is None, reason="poppler-utils (pdftotext) is not installed")
EXTRACTORS = [pytest.param("pdfium"), pytest.param("poppler", marks=NO_POPPLER)]


def extracted(path: Path, extractor: str) -> str:
    if extractor == "pdfium":
        return pdfium_text(path)
    return subprocess.run(["pdftotext", "-enc", "UTF-8", str(path), "-"], capture_output=True, check=True, text=True).stdout


@pytest.mark.parametrize("extractor", EXTRACTORS)
@pytest.mark.parametrize("text", SCRIPTS.values(), ids=SCRIPTS.keys())
@pytest.mark.parametrize("with_boxes", [True, False], ids=["words", "page"])
def test_the_layer_reads_back_as_the_page_text(
    tmp_path: Path, blank_pdf: Path, text: str, with_boxes: bool, extractor: str
) -> None:
    out = tmp_path / "out.pdf"
    layout = realistic_layout(text) if with_boxes else None
    assert write_searchable_pdf(blank_pdf, PDF, [PageText(text, layout)], out) == ["words" if with_boxes else "page"]
    assert normalized(extracted(out, extractor)) == normalized(text)


@pytest.mark.parametrize("extractor", EXTRACTORS)
@pytest.mark.parametrize("with_boxes", [True, False], ids=["words", "page"])
def test_mixed_direction_lines_keep_their_words(tmp_path: Path, blank_pdf: Path, with_boxes: bool, extractor: str) -> None:
    """A line mixing right-to-left and left-to-right words comes back in an order each extractor picks
    by its own heuristic (PDFium: the majority direction; Poppler: its own, which also runs "שלום def"
    together), as for any PDF; PDFium returns every word, Poppler the words between direction changes."""
    text = "Version 2 של המערכת\nabc שלום def\nשלום abc"
    out = tmp_path / "out.pdf"
    write_searchable_pdf(blank_pdf, PDF, [PageText(text, realistic_layout(text) if with_boxes else None)], out)
    words = normalized(extracted(out, extractor)).split()
    if extractor == "pdfium":
        assert sorted(words) == sorted(text.split())
    else:
        assert set(words) >= {"Version", "2", "של", "המערכת", "abc"}


def test_a_corrected_text_is_aligned_to_the_engine_s_boxes(tmp_path: Path, blank_pdf: Path) -> None:
    layout = realistic_layout("Tne quick brown fox\njumps ovr the lazy dog")
    corrected = "The quick brown fox\njumps over the very lazy dog"
    out = tmp_path / "out.pdf"
    assert write_searchable_pdf(blank_pdf, PDF, [PageText(corrected, layout)], out) == ["words"]
    assert normalized(pdfium_text(out)) == normalized(corrected)
    scale = 612 / 1000  # layout pixels to points: the page is 612 points wide
    found = dict(device_word_boxes(out, 0, (612, 792)))
    old = {w["text"]: tuple(v * scale for v in w["bbox"]) for line in layout["lines"] for w in line["words"]}

    def near(box, want):
        return all(abs(a - b) <= 2 for a, b in zip(box, want))

    for unchanged in ("quick", "brown", "fox", "jumps", "lazy", "dog"):
        assert near(found[unchanged], old[unchanged]), unchanged
    assert near(found["The"], old["Tne"]) and near(found["over"], old["ovr"])  # replacements take the old boxes
    # An inserted word shares the box of the word before it.
    joined = (found["the"][0], found["the"][1], found["very"][2], found["very"][3])
    assert near(joined, old["the"])


def test_line_boxes_without_words_take_the_text_in_order(tmp_path: Path, blank_pdf: Path) -> None:
    text = "First line of text that is long\nsecond one\nand a third line here"
    lines = [{"bbox": (80, 100 + 60 * i, 900, 128 + 60 * i), "conf": 0.0, "words": []} for i in range(3)]
    out = tmp_path / "out.pdf"
    placements = write_searchable_pdf(blank_pdf, PDF, [PageText(text, {"width": 1000, "height": 1294, "lines": lines})], out)
    assert placements == ["lines"]
    assert normalized(pdfium_text(out)) == normalized(text)
    scale = 612 / 1000
    for _, (x0, y0, x1, y1) in device_word_boxes(out, 0, (612, 792)):
        assert any(abs(y0 - line["bbox"][1] * scale) <= 2 and abs(y1 - line["bbox"][3] * scale) <= 2 for line in lines)
        assert 80 * scale - 2 <= x0 and x1 <= 900 * scale + 2


def test_text_without_boxes_lies_within_the_ink(tmp_path: Path) -> None:
    source = make_pdf(tmp_path / "in.pdf", [{"size": (612, 792), "rects": grid_rects(2, 5, (150, 300, 450, 600))}])
    out = tmp_path / "out.pdf"
    text = "A model's answer " * 30
    assert write_searchable_pdf(source, PDF, [PageText(text)], out) == ["page"]
    ink = decode(render_page_sync(source, PDF, 1, longest_side=792, image_format="png").data)
    left, top, right, bottom = ImageOps.invert(ink.convert("L")).point(lambda v: 255 if v > 127 else 0).getbbox()
    for _, (x0, y0, x1, y1) in device_word_boxes(out, 0, ink.size):
        assert left - 4 <= x0 and x1 <= right + 4 and top - 4 <= y0 and y1 <= bottom + 4


def test_a_born_digital_page_keeps_its_own_text_and_gets_no_second_layer(tmp_path: Path) -> None:
    scanned = {"rects": grid_rects(1, 1, (100, 100, 300, 300))}
    source = make_pdf(tmp_path / "in.pdf", [{"text": "Already searchable text"}, scanned])
    out = tmp_path / "out.pdf"
    placements = write_searchable_pdf(source, PDF, [PageText("Already searchable text"), PageText("scanned words")], out)
    assert placements == ["existing", "page"]
    assert normalized(pdfium_text(out, 0)) == "Already searchable text"  # found once, not twice
    assert normalized(pdfium_text(out, 1)) == "scanned words"
    with pikepdf.open(source) as before, pikepdf.open(out) as after:
        assert after.pages[0].Contents.read_bytes() == before.pages[0].Contents.read_bytes()


def test_a_page_with_a_little_existing_text_still_gets_the_ocr_text(tmp_path: Path) -> None:
    source = make_pdf(tmp_path / "in.pdf", [{"text": "Scanner stamp"}])
    out = tmp_path / "out.pdf"
    text = "A scanned page whose real text is much longer than the stamp the scanner printed on it."
    assert write_searchable_pdf(source, PDF, [PageText(text)], out) == ["page"]
    words = normalized(pdfium_text(out)).split()
    for stamp_word in ("Scanner", "stamp"):  # PDFium reads the stamp into whichever line it sits on
        words.remove(stamp_word)
    assert " ".join(words) == normalized(text)


def test_pages_without_text_get_no_layer(tmp_path: Path) -> None:
    source = make_pdf(tmp_path / "in.pdf", [{}, {}, {}])
    out = tmp_path / "out.pdf"
    placements = write_searchable_pdf(source, PDF, [PageText(""), PageText("middle"), PageText("  \n")], out)
    assert placements == ["none", "page", "none"]
    assert [normalized(pdfium_text(out, i)) for i in range(3)] == ["", "middle", ""]


def test_the_placement_is_known_before_the_pdf_is_written() -> None:
    word = {"text": "a", "bbox": (0, 0, 1, 1), "conf": 1.0}
    lines = {"width": 10, "height": 10, "lines": [{"bbox": (0, 0, 1, 1), "conf": 0.0, "words": []}]}
    words = {"width": 10, "height": 10, "lines": [{"bbox": (0, 0, 1, 1), "conf": 1.0, "words": [word]}]}
    assert [placement_of(PageText(t, l)) for t, l in [("", words), (" ", None), ("a", words), ("a", lines), ("a", None),
                                                       ("a", {"width": 1, "height": 1, "lines": []})]] == [
        "none", "none", "words", "lines", "page", "page"]


def test_page_count_mismatch_and_unreadable_input_are_clear_errors(tmp_path: Path, blank_pdf: Path) -> None:
    with pytest.raises(SearchablePdfError, match="1 pages, but text was given for 2"):
        write_searchable_pdf(blank_pdf, PDF, [PageText("a"), PageText("b")], tmp_path / "out.pdf")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nnot really a pdf")
    with pytest.raises(SearchablePdfError):
        write_searchable_pdf(broken, PDF, [PageText("a")], tmp_path / "out2.pdf")
    with pytest.raises(SearchablePdfError):
        write_searchable_pdf(tmp_path / "in.png", "image/png", [PageText("a")], tmp_path / "out3.pdf")


def test_writes_to_a_file_object(tmp_path: Path, blank_pdf: Path) -> None:
    buffer = io.BytesIO()
    assert write_searchable_pdf(blank_pdf, PDF, [PageText("into memory")], buffer) == ["page"]
    path = tmp_path / "from-memory.pdf"
    path.write_bytes(buffer.getvalue())
    assert normalized(pdfium_text(path)) == "into memory"


# --- image input -----------------------------------------------------------------------------------


def page_image(mode: str = "RGB", size: tuple[int, int] = (600, 800), seed: int = 1) -> Image.Image:
    """A page-like image: paper with noise, dark word blocks in a grid, a coloured corner mark."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(200, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((5, 5, 40, 40), fill=(30, 90, 200))
    for x0, y0, x1, y1 in grid_rects(3, 5, (60, 80, size[0] - 60, size[1] - 80)):
        draw.rectangle((round(x0), round(y0), round(x1), round(y1)), fill=(10, 10, 10))
    if mode == "RGB":
        return image
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), "L")
        image.putalpha(alpha)
        return image
    if mode == "I;16":
        return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
    if mode == "P":
        return image.quantize(64)
    return image.convert(mode)


def shown_pixels(path: Path, index: int = 0) -> Image.Image:
    """What a person sees of an image page: EXIF orientation applied, transparency over white."""
    with Image.open(path) as image:
        image.seek(index)
        shown = ImageOps.exif_transpose(image)
        if shown.mode in ("RGBA", "LA", "PA") or (shown.mode == "P" and "transparency" in shown.info):
            rgba = shown.convert("RGBA")
            white = Image.new("RGB", rgba.size, (255, 255, 255))
            white.paste(rgba, mask=rgba.getchannel("A"))
            return white
        if shown.mode.startswith("I"):
            return Image.fromarray((np.asarray(shown).astype(np.uint32) >> 8).astype(np.uint8), "L")
        return shown.convert("RGB" if shown.mode not in ("L", "1") else "L")


def rendered_page(path: Path, index: int, size: tuple[int, int]) -> Image.Image:
    pdf = pdfium.PdfDocument(str(path))
    try:
        page = pdf[index]
        width, height = page.get_size()
        image = page.render(scale=size[0] / width).to_pil()
        assert image.size == size
        return image
    finally:
        pdf.close()


def assert_same_pixels(a: Image.Image, b: Image.Image, tolerance: int = 0) -> None:
    mode = "L" if a.mode == "L" and b.mode == "L" else "RGB"
    left = np.asarray(a.convert(mode)).astype(int)
    right = np.asarray(b.convert(mode)).astype(int)
    assert left.shape == right.shape
    assert int(np.abs(left - right).max()) <= tolerance


A4_FIT_WIDTH = 8.27 * 72  # points: a 600 x 800 image without a resolution is fitted to A4's width

IMAGE_CASES = {
    "png rgb": ("PNG", "RGB", {}, 150),
    "png grey": ("PNG", "L", {}, 150),
    "png bilevel": ("PNG", "1", {}, 150),
    "png palette": ("PNG", "P", {}, 150),
    "png rgba": ("PNG", "RGBA", {}, 150),
    "png palette with a transparent colour": ("PNG", "P", {"transparency": 0}, 150),
    "png 16-bit grey": ("PNG", "I;16", {}, 150),
    "webp lossless": ("WEBP", "RGB", {"lossless": True}, None),  # WebP records no resolution
    "webp lossy": ("WEBP", "RGB", {"quality": 60}, None),
    "tiff lzw": ("TIFF", "RGB", {"compression": "tiff_lzw"}, 150),
    "tiff group4": ("TIFF", "1", {"compression": "group4"}, 150),
    "tiff cmyk": ("TIFF", "CMYK", {}, 150),
}


@pytest.mark.parametrize("case", IMAGE_CASES.values(), ids=IMAGE_CASES.keys())
def test_image_pages_are_wrapped_losslessly(tmp_path: Path, case: tuple) -> None:
    image_format, mode, options, dpi = case
    source = tmp_path / f"in.{image_format.lower()}"
    page_image(mode).save(source, format=image_format, dpi=(150, 150), **options)
    out = tmp_path / "out.pdf"
    text = "words on an image page"
    assert write_searchable_pdf(source, f"image/{image_format.lower()}", [PageText(text)], out) == ["page"]
    with pikepdf.open(out) as pdf:
        width = 600 * 72 / dpi if dpi else A4_FIT_WIDTH
        assert [float(v) for v in pdf.pages[0].mediabox] == pytest.approx([0, 0, width, width * 800 / 600], abs=0.01)
        assert pdf.check_pdf_syntax() == []
    # The decoded pixels exactly; with an alpha channel, composited over white by PDFium and by
    # Pillow, whose rounding differs by one level.
    alpha = mode == "RGBA" or "transparency" in options
    assert_same_pixels(rendered_page(out, 0, (600, 800)), shown_pixels(source), tolerance=1 if alpha else 0)
    assert normalized(pdfium_text(out)) == normalized(text)


def test_a_png_s_compressed_data_is_embedded_as_it_is(tmp_path: Path) -> None:
    source = tmp_path / "page.png"
    page_image("L").save(source, format="PNG", dpi=(300, 300), optimize=True)
    out = tmp_path / "out.pdf"
    write_searchable_pdf(source, "image/png", [PageText("x")], out)
    data = source.read_bytes()
    idat, position = b"", 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        if data[position + 4 : position + 8] == b"IDAT":
            idat += data[position + 8 : position + 8 + length]
        position += 12 + length
    with pikepdf.open(out) as pdf:
        (image,) = pdf.pages[0].get_images().values()
        assert image.read_raw_bytes() == idat and image.DecodeParms.Predictor == 15


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_a_jpeg_is_embedded_as_it_is_and_shown_upright(tmp_path: Path, orientation: int) -> None:
    source = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    page_image("RGB", (480, 640)).save(source, format="JPEG", quality=85, dpi=(96, 96), exif=exif)
    shown = shown_pixels(source)
    boxes = ink_boxes(shown)
    words = words_for(sum(map(len, boxes)))
    layout = layout_for(boxes, words, shown.size)
    out = tmp_path / "out.pdf"

    assert write_searchable_pdf(source, "image/jpeg", [PageText(" ".join(words), layout)], out) == ["words"]

    with pikepdf.open(out) as pdf:
        (image,) = pdf.pages[0].get_images().values()
        assert image.read_raw_bytes() == source.read_bytes()  # the JPEG itself, not a re-encoding
        assert [float(v) for v in pdf.pages[0].mediabox] == [0, 0, shown.width * 0.75, shown.height * 0.75]
    assert_same_pixels(rendered_page(out, 0, shown.size), shown)  # PDFium and Pillow both use libjpeg-turbo
    expected = {word["text"]: word["bbox"] for line in layout["lines"] for word in line["words"]}
    assert_on_boxes(device_word_boxes(out, 0, shown.size), expected)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grey_and_cmyk_jpegs_pass_through(tmp_path: Path, mode: str) -> None:
    source = tmp_path / "scan.jpg"
    page_image(mode).save(source, format="JPEG", quality=90)
    out = tmp_path / "out.pdf"
    write_searchable_pdf(source, "image/jpeg", [PageText("grey")], out)
    with pikepdf.open(out) as pdf:
        (image,) = pdf.pages[0].get_images().values()
        assert image.read_raw_bytes() == source.read_bytes()
    rendered, expected = rendered_page(out, 0, (600, 800)), shown_pixels(source)
    if mode == "L":
        assert_same_pixels(rendered, expected)
    else:  # CMYK to RGB differs between PDFium and Pillow (about 14 levels on average here); an
        # inverted Adobe CMYK image would be off by about 200.
        difference = np.abs(np.asarray(rendered.convert("L")).astype(int) - np.asarray(expected.convert("L")).astype(int))
        assert difference.mean() < 30


def test_multi_page_tiff_becomes_one_page_per_frame(tmp_path: Path) -> None:
    source = tmp_path / "scan.tiff"
    frames = [page_image("1", seed=1), page_image("L", seed=2), page_image("RGB", (800, 600), seed=3)]
    frames[0].save(
        source, format="TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate", dpi=(200, 200)
    )
    out = tmp_path / "out.pdf"
    texts = ["first frame", "", "third frame"]
    assert write_searchable_pdf(source, "image/tiff", [PageText(t) for t in texts], out) == ["page", "none", "page"]
    for index, frame in enumerate(frames):
        assert_same_pixels(rendered_page(out, index, frame.size), shown_pixels(source, index))
        assert normalized(pdfium_text(out, index)) == texts[index]
    # A scan that reads only the first frame (an animation) gets a one-page PDF.
    assert write_searchable_pdf(source, "image/tiff", [PageText("first")], out) == ["page"]
    with pikepdf.open(out) as pdf:
        assert len(pdf.pages) == 1
    with pytest.raises(SearchablePdfError, match="3 pages, but text was given for 4"):
        write_searchable_pdf(source, "image/tiff", [PageText("x")] * 4, out)


def test_an_image_without_a_resolution_fits_a4(tmp_path: Path) -> None:
    source = tmp_path / "screenshot.png"
    page_image("RGB", (1654, 2339)).save(source, format="PNG")  # no pHYs chunk
    out = tmp_path / "out.pdf"
    write_searchable_pdf(source, "image/png", [PageText("x")], out)
    with pikepdf.open(out) as pdf:
        width, height = (float(v) for v in pdf.pages[0].mediabox[2:])
    assert abs(width - 8.27 * 72) < 1.5 and height <= 11.69 * 72 + 0.5
