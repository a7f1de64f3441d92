"""Known-text scans for OCR accuracy checks.

`make_born_digital_pdf` writes a PDF with a real text layer (plain PDF syntax, a standard font, no
dependency), `ground_truth` reads that text layer back with pdfium, and `image_only_pdf` turns the
rendered pages into a scan-like PDF with no text layer at all. `cer` is the character error rate on
whitespace-normalized text (a missing or extra word space counts), `cer_ignoring_whitespace` the rate
with all whitespace removed (only the characters count). `word_boxes` gives where each word of the
text layer is, in pixels of a rendered page, to check the word boxes an engine reports.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pypdfium2 as pdfium
from PIL import Image, ImageFilter

LETTER = (612, 792)  # points

PARAGRAPHS: tuple[str, ...] = (
    "The town library opened its doors in the spring of the year the railway reached the valley. "
    "For the first months it held little more than a few hundred books donated by families who had "
    "carried them across the mountains, and the reading room was heated by a single iron stove.",
    "Visitors were asked to sign a ledger at the front desk. The ledger survives, and it shows that "
    "farmers, clerks, teachers and children came in roughly equal numbers, most of them on Saturday "
    "afternoons when the market closed and the roads were still passable before dark.",
    "By the end of the decade the collection had grown to several thousand volumes. A committee of "
    "volunteers decided which new titles to order, and their minutes record long debates about the "
    "value of novels compared with practical manuals on farming, carpentry and household medicine.",
    "The building itself was modest: two rooms of local stone, a slate roof and tall windows facing "
    "south to catch the winter light. When the river flooded in the wet autumn, water reached the "
    "lowest shelves, and the staff spent a week drying pages one by one on lines strung across the hall.",
    "Today the original ledger is kept in a glass case near the entrance. Researchers use it to study "
    "how reading habits changed over time, while schoolchildren look for the names of their great "
    "grandparents written in careful, slightly faded ink on the yellowed paper.",
    "Weather records from the same period are less complete. The station on the hill measured rain "
    "and temperature each morning at eight, but several notebooks were lost when the observer moved "
    "away, and the gaps have been filled by comparing diaries kept by people in nearby villages.",
    "Those diaries describe late frosts that damaged the orchards, dry summers when the wells ran low "
    "and one memorable winter when the lake froze so hard that a horse and cart crossed it to deliver "
    "flour to the mill on the far shore, a journey that normally took most of a day by road.",
    "Modern historians treat such accounts with care. A diary tells us what one person noticed and "
    "thought worth writing down, which is not always what mattered most, yet taken together these "
    "small observations give a surprisingly detailed picture of ordinary life in the valley.",
    "The school opened a few years after the library and shared its reading room until a separate "
    "building was finished. Teachers borrowed maps and atlases for geography lessons, and the older "
    "pupils were allowed to stay after class to read newspapers that arrived by the evening train.",
    "Money was always short. The accounts list small sums raised from concerts, a summer fair and an "
    "annual dinner, together with a grant from the county that paid for coal, lamp oil and the wages "
    "of a caretaker who also repaired damaged bindings with glue, thread and patience.",
)


# German (Tesseract's `deu`): umlauts and sharp s, which English trained data does not read.
GERMAN_PARAGRAPHS: tuple[str, ...] = (
    "Die Stadtbibliothek öffnete ihre Türen im Frühjahr, als die Eisenbahn das Tal erreichte. In den "
    "ersten Monaten besaß sie kaum mehr als einige hundert Bücher, die Familien über die Berge getragen "
    "hatten, und der Lesesaal wurde von einem einzigen eisernen Ofen geheizt.",
    "Die Besucher wurden gebeten, sich am Eingang in ein großes Buch einzutragen. Dieses Buch ist "
    "erhalten geblieben und zeigt, dass Bauern, Schreiber, Lehrer und Kinder ungefähr gleich häufig "
    "kamen, meist am Samstagnachmittag, wenn der Markt geschlossen hatte und die Straßen noch "
    "befahrbar waren.",
    "Am Ende des Jahrzehnts war die Sammlung auf mehrere tausend Bände angewachsen. Ein Ausschuss von "
    "Freiwilligen entschied, welche Titel bestellt wurden, und seine Protokolle berichten von langen "
    "Debatten über den Wert von Romanen im Vergleich zu Handbüchern über Landwirtschaft und Hausmedizin.",
)

# Narrow letters (i, l, t, f) between wider ones: in a monospaced font the blank beside them is a third
# of a letter wide, which a fixed word-gap threshold took for a space ("mag i c", "ut i l i t i es").
NARROW_LETTERS = (
    "The magic of a simple user interface is that it hides the details. Every user will file little "
    "issues: the illusion of a billing limit, an illegible list of filled fields, a wizard that fails "
    "while it still looks quite official. Multiple utilities live in the lib folder; initial fill-in is "
    "implicit."
)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _column_lines(paragraphs: Sequence[str], width_chars: int) -> list[str | None]:
    """Wrapped lines; None marks the gap between two paragraphs."""
    lines: list[str | None] = []
    for index, paragraph in enumerate(paragraphs):
        if index:
            lines.append(None)
        lines.extend(textwrap.wrap(paragraph, width_chars))
    return lines


def _page_stream(
    pages_columns: Sequence[Sequence[str]], *, font: str, size: float, columns: int
) -> bytes:
    leading = size * 1.35
    margin = 72.0
    gutter = 24.0
    column_width = (LETTER[0] - 2 * margin - gutter * (columns - 1)) / columns
    # Standard fonts average about half an em per character of English text; stay a little under it.
    width_chars = int(column_width / (size * 0.52))
    ops = ["BT", f"/F1 {size} Tf"]
    for column, paragraphs in enumerate(pages_columns):
        x = margin + column * (column_width + gutter)
        y = LETTER[1] - margin - size
        for line in _column_lines(paragraphs, width_chars):
            if line is not None:
                ops.append(f"1 0 0 1 {x:.2f} {y:.2f} Tm ({_escape(line)}) Tj")
            y -= leading
    ops.append("ET")
    return "\n".join(ops).encode("latin-1")


def make_born_digital_pdf(
    path: Path,
    pages: Sequence[Sequence[Sequence[str]]],
    *,
    font: str = "Helvetica",
    size: float = 11,
) -> Path:
    """`pages[i]` is a list of columns, each a list of paragraphs (one column: an ordinary page)."""
    objects: list[bytes] = []
    n_pages = len(pages)
    # 1 catalog, 2 pages tree, 3 font, then (page, content) pairs.
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n_pages))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    objects.append(
        f"<< /Type /Font /Subtype /Type1 /BaseFont /{font} /Encoding /WinAnsiEncoding >>".encode()
    )
    for index, columns in enumerate(pages):
        content_ref = 5 + 2 * index
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {LETTER[0]} {LETTER[1]}] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {content_ref} 0 R >>".encode()
        )
        stream = _page_stream(columns, font=font, size=size, columns=len(columns))
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


def mixed_columns_pdf(path: Path, pages: int) -> Path:
    """`pages` born-digital pages that take turns: one column, another column, then two columns."""
    layouts = [[PARAGRAPHS[0:5]], [PARAGRAPHS[5:10]], [PARAGRAPHS[2:6], PARAGRAPHS[6:10]]]
    return make_born_digital_pdf(path, [layouts[i % len(layouts)] for i in range(pages)])


def ground_truth(pdf_path: Path) -> list[str]:
    """The text layer of every page, as pdfium extracts it."""
    pdf = pdfium.PdfDocument(str(pdf_path))
    try:
        texts = []
        for page in pdf:
            textpage = page.get_textpage()
            texts.append(textpage.get_text_range())
            textpage.close()
            page.close()
        return texts
    finally:
        pdf.close()


def word_boxes(pdf_path: Path, number: int, *, width: int, height: int) -> list[tuple[str, tuple[float, float, float, float]]]:
    """The words of page `number` (1-based) of a born-digital PDF with their boxes (x0, y0, x1, y1) in
    pixels of that page rendered to `width` x `height` (origin top-left)."""
    pdf = pdfium.PdfDocument(str(pdf_path))
    try:
        page = pdf[number - 1]
        page_width, page_height = page.get_size()
        sx, sy = width / page_width, height / page_height
        textpage = page.get_textpage()
        words: list[tuple[str, tuple[float, float, float, float]]] = []
        chars: list[str] = []
        box: list[float] = []
        for index in range(textpage.count_chars()):
            char = textpage.get_text_range(index, 1)
            if char.isspace() or not char:
                if chars:
                    words.append(("".join(chars), (box[0] * sx, (page_height - box[3]) * sy, box[2] * sx, (page_height - box[1]) * sy)))
                chars, box = [], []
                continue
            left, bottom, right, top = textpage.get_charbox(index)
            box = [left, bottom, right, top] if not box else [min(box[0], left), min(box[1], bottom), max(box[2], right), max(box[3], top)]
            chars.append(char)
        if chars:
            words.append(("".join(chars), (box[0] * sx, (page_height - box[3]) * sy, box[2] * sx, (page_height - box[1]) * sy)))
        textpage.close()
        page.close()
        return words
    finally:
        pdf.close()


def render_pdf_pages(pdf_path: Path, *, dpi: int = 200) -> list[Image.Image]:
    pdf = pdfium.PdfDocument(str(pdf_path))
    try:
        return [page.render(scale=dpi / 72).to_pil().convert("L") for page in pdf]
    finally:
        pdf.close()


def image_only_pdf(path: Path, images: Sequence[Image.Image], *, dpi: int = 200) -> Path:
    """A scan-like PDF: one raster image per page, no text layer."""
    first, *rest = [image.convert("RGB") for image in images]
    first.save(path, format="PDF", save_all=True, append_images=rest, resolution=dpi)
    return path


def photo_like(image: Image.Image, *, skew_degrees: float = 2.0, seed: int = 6) -> bytes:
    """A phone-photo-like JPEG of a page: slightly rotated, blurred, greyish paper, noise, quality 60."""
    rng = np.random.default_rng(seed)
    gray = image.convert("L").rotate(skew_degrees, resample=Image.BICUBIC, expand=True, fillcolor=255)
    gray = gray.filter(ImageFilter.GaussianBlur(0.6))
    pixels = np.asarray(gray, dtype=np.float32)[..., None].repeat(3, axis=2)
    pixels = pixels - np.array([20.0, 16.0, 10.0]) + rng.normal(0.0, 12.0, pixels.shape[:2])[..., None]
    noisy = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    noisy.save(buffer, format="JPEG", quality=60)
    return buffer.getvalue()


def text_line_page(text: str, number: int = 1):
    """A 600 x 120 PNG page with one line of text in a large font (fast to read)."""
    from PIL import ImageDraw, ImageFont

    from scans.pipeline.types import PageImage

    image = Image.new("L", (600, 120), 255)
    ImageDraw.Draw(image).text((20, 30), text, fill=0, font=ImageFont.load_default(size=48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return PageImage(number=number, data=buffer.getvalue(), mime="image/png", width=600, height=120)


def normalize(text: str) -> str:
    return " ".join(text.split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, O(len(a) * len(b)) time and O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def cer(hypothesis: str, reference: str) -> float:
    """Character error rate counting whitespace: runs of whitespace are one space, and count."""
    reference = normalize(reference)
    return edit_distance(normalize(hypothesis), reference) / max(1, len(reference))


def cer_ignoring_whitespace(hypothesis: str, reference: str) -> float:
    """Character error rate of the characters alone (every whitespace removed first)."""
    reference = "".join(reference.split())
    return edit_distance("".join(hypothesis.split()), reference) / max(1, len(reference))
