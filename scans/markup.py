"""Model output (Markdown, possibly with raw HTML tables as olmOCR writes them) as safe HTML and as
plain text, both from one parse by markdown-it-py (CommonMark + GFM tables and strikethrough).

Model output is untrusted. `markdown_to_html` hands everything markdown-it produces to nh3 (the Rust
html5ever/ammonia sanitizer) with an allow-list: no scripts, styles, frames, forms, SVG/MathML, event
attributes, images or `id`s; links only `http:`, `https:` and `mailto:`. What is safe is decided by nh3
alone; this module only decides what is *text*:

- A tag whose name is not an HTML element (`<MIME>`, `List<T>`) is text that looks like markup, so it
  is shown (escaped) and kept in the plain text. Tags that are HTML elements are markup.
- LaTeX is kept exactly as written, delimiters included: `$...$` and `$$...$$` (Pandoc's rules: no
  space inside the dollars, no digit after the closing one) and `\\(...\\)`, `\\[...\\]` (olmOCR's) are
  parsed as math so Markdown never touches them (`\\\\`, `_`, `*` inside formulas).
- `*` inside a word (`x*y*z`) stays literal in the plain text: emphasis there is almost always an
  OCR'd multiplication or wildcard, not styling.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import nh3
from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode
from mdit_py_plugins.dollarmath import dollarmath_plugin

if TYPE_CHECKING:
    from markdown_it.renderer import RendererHTML
    from markdown_it.rules_inline import StateInline
    from markdown_it.token import Token
    from markdown_it.utils import EnvType, OptionsDict

# Every element name of the WHATWG HTML standard, obsolete ones included, plus SVG and MathML roots.
HTML_ELEMENTS = frozenset(
    """a abbr acronym address applet area article aside audio b base basefont bdi bdo bgsound big blink
    blockquote body br button canvas caption center cite code col colgroup data datalist dd del details
    dfn dialog dir div dl dt em embed fieldset figcaption figure font footer form frame frameset h1 h2 h3
    h4 h5 h6 head header hgroup hr html i iframe image img input ins isindex kbd keygen label legend li
    link listing main map mark marquee math menu menuitem meta meter multicol nav nextid nobr noembed
    noframes noscript object ol optgroup option output p param picture plaintext portal pre progress q
    rb rp rt rtc ruby s samp script search section select slot small source spacer span strike strong
    style sub summary sup svg table tbody td template textarea tfoot th thead time title tr track tt u ul
    var video wbr xmp""".split()
)

ALLOWED_TAGS = frozenset(
    """a abbr b bdi bdo blockquote br caption cite code col colgroup dd del dfn div dl dt em figcaption
    figure h1 h2 h3 h4 h5 h6 hr i ins kbd li mark ol p pre q s samp small span strike strong sub sup
    table tbody td tfoot th thead tr u ul var""".split()
)
# Removed with everything inside them (the rest of the HTML elements are unwrapped: tag gone, text kept).
DROPPED_WITH_CONTENT = frozenset(
    """script style iframe frame frameset noscript noembed noframes object embed applet template
    textarea select svg math title xmp plaintext""".split()
)
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "abbr": {"title"},
    "td": {"colspan", "rowspan", "align", "style"},
    "th": {"colspan", "rowspan", "align", "style", "scope"},
    "col": {"span"},
    "colgroup": {"span"},
    "ol": {"start", "reversed"},
    "bdo": {"dir"},
}
ALLOWED_CLASSES = {"span": {"math", "image"}, "div": {"math"}}
URL_SCHEMES = frozenset({"http", "https", "mailto"})

_SANITIZER = nh3.Cleaner(
    tags=set(ALLOWED_TAGS),
    clean_content_tags=set(DROPPED_WITH_CONTENT),
    attributes={tag: set(names) for tag, names in ALLOWED_ATTRIBUTES.items()},
    url_schemes=set(URL_SCHEMES),
    url_relative="deny",
    link_rel="noopener noreferrer nofollow",
    allowed_classes={tag: set(names) for tag, names in ALLOWED_CLASSES.items()},
    filter_style_properties={"text-align"},
    strip_comments=True,
)

# One HTML tag, as CommonMark defines it (markdown-it's own open/close tag patterns); comments are
# found with str.find so an unclosed `<!--` costs one scan, not one per later `<`.
_TAG = re.compile(
    r"<(/?)([A-Za-z][A-Za-z0-9-]*)(?:\s+[A-Za-z_:][A-Za-z0-9:._-]*"
    r"(?:\s*=\s*(?:[^\"'=<>`\x00-\x20]+|'[^']*'|\"[^\"]*\"))?)*\s*/?>"
)
_MATH_TYPES = {
    "math_inline": "$",
    "math_inline_double": "$$",
    "math_block": "$$",
    "math_block_label": "$$",
}


# --- HTML fragments inside Markdown --------------------------------------------------------------


def _html_pieces(fragment: str) -> Iterator[tuple[str, str, str]]:
    """Split an HTML fragment into ("text", raw, "") | ("tag", raw, name) | ("end", raw, name) |
    ("comment", raw, ""), in one left-to-right pass (linear in the length)."""
    position = 0
    text_from = 0
    comments_closed = True  # False once an unclosed `<!--` is seen: no later `-->` exists
    while True:
        start = fragment.find("<", position)
        if start < 0:
            break
        if fragment.startswith("<!--", start) and comments_closed:
            end = fragment.find("-->", start + 4)
            if end >= 0:
                if text_from < start:
                    yield "text", fragment[text_from:start], ""
                position = text_from = end + 3
                yield "comment", fragment[start:position], ""
                continue
            comments_closed = False
        match = _TAG.match(fragment, start)
        if match is None:
            position = start + 1
            continue
        if text_from < start:
            yield "text", fragment[text_from:start], ""
        yield ("end" if match.group(1) else "tag"), match.group(0), match.group(2).lower()
        position = text_from = match.end()
    if text_from < len(fragment):
        yield "text", fragment[text_from:], ""


def _escape_non_html_tags(fragment: str) -> str:
    """Tags whose names are not HTML elements are text: escape them so they are shown, not dropped."""
    out = []
    for kind, raw, name in _html_pieces(fragment):
        if kind in ("tag", "end") and name not in HTML_ELEMENTS:
            out.append(html.escape(raw, quote=False))
        else:
            out.append(raw)
    return "".join(out)


# --- the parser ------------------------------------------------------------------------------------


def _bracket_math(state: StateInline, silent: bool) -> bool:
    r"""`\(...\)` and `\[...\]` as one math token (before the escape rule turns `\(` into `(`).

    mdit-py-plugins' texmath has these delimiters but searches with a regex from every `\(`, which is
    quadratic on text full of unclosed ones; here a failed search is remembered, so the whole inline
    run is scanned at most once per delimiter."""
    src, start = state.src, state.pos
    opener = src[start : start + 2]
    if opener not in ("\\(", "\\["):
        return False
    closer = "\\)" if opener == "\\(" else "\\]"
    misses: dict[str, int] = state.env.setdefault("_math_misses", {}).setdefault(id(src), {})
    limit = min(state.posMax, misses.get(closer, len(src)))
    end = src.find(closer, start + 2, limit)
    if end < 0:
        if state.posMax >= len(src):
            misses[closer] = min(misses.get(closer, len(src)), start + 2)
        return False
    if not silent:
        token = state.push("math_inline_bracket", "span", 0)
        token.markup = opener
        token.content = src[start + 2 : end]
    state.pos = end + 2
    return True


def _math_source(token: Token) -> str:
    if token.type == "math_inline_bracket":
        return token.markup + token.content + ("\\)" if token.markup == "\\(" else "\\]")
    fence = _MATH_TYPES[token.type]
    return fence + token.content + fence


@lru_cache(maxsize=1)
def _parser() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    dollarmath_plugin(md, allow_labels=False, allow_space=False, allow_digits=False, double_inline=True)
    md.inline.ruler.before("escape", "math_bracket", _bracket_math)

    def html_raw(self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        return _escape_non_html_tags(tokens[idx].content)

    def image(self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        # Never loaded from anywhere: the picture's description stands in for it.
        alt = self.renderInlineAsText(tokens[idx].children or [], options, env)
        return f'<span class="image">{html.escape(alt)}</span>' if alt else ""

    def math(self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
        token = tokens[idx]
        source = html.escape(_math_source(token), quote=False)
        return f'<div class="math">{source}</div>\n' if token.block else f'<span class="math">{source}</span>'

    md.add_render_rule("html_inline", html_raw)
    md.add_render_rule("html_block", html_raw)
    md.add_render_rule("image", image)
    for name in (*_MATH_TYPES, "math_inline_bracket"):
        md.add_render_rule(name, math)
    return md


def markdown_to_html(markdown: str) -> str:
    """Safe HTML for showing a page's Markdown in a browser (a fragment: no <html>/<body>).

    Whatever the input, the result contains only `ALLOWED_TAGS` with `ALLOWED_ATTRIBUTES`, links with
    `http:`/`https:`/`mailto:` URLs (`rel="noopener noreferrer nofollow"`), and no comments. Rendering is
    linear in the input's length (markdown-it-py's guarantees, nh3's parser)."""
    return _SANITIZER.clean(_parser().render(markdown))


# --- Markdown to plain text ------------------------------------------------------------------------

_BLOCK_TAGS = frozenset(
    """address article aside blockquote caption center dd details dialog dir div dl dt fieldset figcaption
    figure footer form h1 h2 h3 h4 h5 h6 header hgroup hr li main menu nav ol p pre section summary table
    tbody tfoot thead ul""".split()
)
_SPACES = re.compile(r"[ \t\r\n\f\v]+")


Cell = list[str]
Row = list[Cell]


class _HtmlText:
    """HTML (olmOCR's tables, inline tags) to text: rows of tab-separated cells, block elements on their
    own lines, entities decoded, the content of scripts and styles dropped, and tags that are not HTML
    elements kept as written."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.line: list[str] = []
        self.rows: list[Row] = []  # of the open table
        self.tables = 0  # open tables; one nested in a cell is flattened into that cell's text
        self.skip: str | None = None  # inside <script>, <style> ...: until its end tag
        self.pre = 0

    def _sink(self) -> list[str]:
        if self.rows and self.rows[-1]:
            return self.rows[-1][-1]  # the open cell
        return self.line

    def text(self, value: str) -> None:
        value = html.unescape(value)
        if not self.pre:
            value = _SPACES.sub(" ", value)
        self._sink().append(value)

    def break_line(self) -> None:
        sink = self._sink()
        if sink is self.line:
            self.lines.append("".join(self.line))
            self.line = []
        else:
            sink.append(" ")

    def start(self, name: str, raw: str) -> None:
        if name in DROPPED_WITH_CONTENT:
            if not raw.endswith("/>"):
                self.skip = name
        elif name == "table":
            self.break_line()
            self.tables += 1
        elif name == "tr" and self.tables == 1:
            self.rows.append([])
        elif name in ("td", "th") and self.tables == 1:
            if not self.rows:
                self.rows.append([])
            self.rows[-1].append([])
        elif name in ("tr", "td", "th"):
            self.break_line()
        elif name == "pre":
            self.break_line()
            self.pre += 1
        elif name == "br" or name in _BLOCK_TAGS:
            self.break_line()
        elif name not in HTML_ELEMENTS:
            self._sink().append(raw)

    def end(self, name: str, raw: str) -> None:
        if name == "table" and self.tables:
            self.tables -= 1
            if self.tables == 0:
                rows, self.rows = self.rows, []
                for row in rows:
                    self.line.append("\t".join(_SPACES.sub(" ", "".join(cell)).strip() for cell in row))
                    self.break_line()
        elif name == "pre":
            self.pre = max(0, self.pre - 1)
            self.break_line()
        elif name in _BLOCK_TAGS:
            self.break_line()
        elif name not in HTML_ELEMENTS:
            self._sink().append(raw)

    def feed(self, fragment: str) -> None:
        for kind, raw, name in _html_pieces(fragment):
            if self.skip is not None:
                if kind == "end" and name == self.skip:
                    self.skip = None
            elif kind == "text":
                self.text(raw)
            elif kind == "tag":
                self.start(name, raw)
            elif kind == "end":
                self.end(name, raw)

    def result(self) -> str:
        while self.tables:  # an unclosed table still gives its rows
            self.end("table", "</table>")
        self.break_line()
        lines = [line.strip(" ") for line in self.lines]
        return "\n".join(line for line in lines if line)


def html_to_text(fragment: str) -> str:
    converter = _HtmlText()
    converter.feed(fragment)
    return converter.result()


def _is_word_char(char: str) -> bool:
    return char.isalnum()


def _literal_emphasis(node: SyntaxTreeNode) -> bool:
    """`x*y*z`: emphasis that starts or ends inside a word is kept as the characters it was."""
    if not node.markup.startswith("*"):
        return False
    before, after = node.previous_sibling, node.next_sibling
    return bool(
        (before is not None and before.type == "text" and before.content and _is_word_char(before.content[-1]))
        or (after is not None and after.type == "text" and after.content and _is_word_char(after.content[0]))
    )


def _inline_text(nodes: Sequence[SyntaxTreeNode]) -> str:
    out: list[str] = []
    for node in nodes:
        kind = node.type
        if kind == "text":
            out.append(node.content)
        elif kind in ("softbreak", "hardbreak"):
            out.append("\n")
        elif kind == "code_inline":
            out.append(node.content)
        elif kind in ("em", "strong"):
            inner = _inline_text(node.children)
            out.append(f"{node.markup}{inner}{node.markup}" if _literal_emphasis(node) else inner)
        elif kind == "link":
            inner = _inline_text(node.children)
            out.append(f"<{inner}>" if node.markup == "autolink" else inner)
        elif kind == "image":
            out.append(_inline_text(node.children))
        elif kind == "html_inline":
            out.append(_inline_tag_text(node.content))
        elif kind in _MATH_TYPES or kind == "math_inline_bracket":
            out.append(_math_source(node.token))  # type: ignore[arg-type]
        else:  # strikethrough (s) and anything a plugin adds: its text
            out.append(_inline_text(node.children) if node.children else node.content)
    return "".join(out)


def _inline_tag_text(raw: str) -> str:
    """One inline tag (or comment) as text: a line break for <br>, nothing for other HTML elements and
    comments, itself for a tag that is not HTML (`<MIME>`)."""
    match = _TAG.match(raw)
    if match is None:
        return ""
    name = match.group(2).lower()
    if name == "br":
        return "\n"
    return "" if name in HTML_ELEMENTS else raw


def _indent(text: str, first: str, rest: str) -> str:
    lines = text.split("\n")
    return "\n".join([first + lines[0], *((rest + line) if line else line for line in lines[1:])])


def _blocks(node: SyntaxTreeNode) -> list[str]:
    """The node's children as text blocks (joined with a blank line, or one line apart in tight lists)."""
    return [text for child in node.children if (text := _block_text(child)) is not None]


def _list_text(node: SyntaxTreeNode) -> str:
    ordered = node.type == "ordered_list"
    number = int(node.attrs.get("start", 1)) if ordered else 0
    tight = all(p.hidden for item in node.children for p in item.children if p.type == "paragraph")
    items = []
    for item in node.children:
        marker = f"{number}{node.markup or '.'} " if ordered else f"{node.markup or '-'} "
        body = ("\n" if tight else "\n\n").join(_blocks(item))
        items.append(_indent(body, marker, " " * len(marker)))
        number += 1
    return ("\n" if tight else "\n\n").join(items)


_TEXT_BLOCKS: dict[str, Callable[[SyntaxTreeNode], str | None]] = {
    "paragraph": lambda node: _inline_text(node.children[0].children) if node.children else "",
    "heading": lambda node: _inline_text(node.children[0].children) if node.children else "",
    "bullet_list": _list_text,
    "ordered_list": _list_text,
    "blockquote": lambda node: "\n\n".join(_blocks(node)),
    "code_block": lambda node: node.content.rstrip("\n"),
    "fence": lambda node: node.content.rstrip("\n"),
    "html_block": lambda node: html_to_text(node.content),
    "hr": lambda node: None,
    "table": lambda node: "\n".join(
        "\t".join(_inline_text(cell.children[0].children).strip() if cell.children else "" for cell in row.children)
        for section in node.children
        for row in section.children
    ),
}


def _block_text(node: SyntaxTreeNode) -> str | None:
    if node.type in _MATH_TYPES:
        return _math_source(node.token)  # type: ignore[arg-type]
    convert = _TEXT_BLOCKS.get(node.type)
    if convert is not None:
        return convert(node)
    return "\n\n".join(_blocks(node)) if node.children else node.content


def markdown_to_text(markdown: str) -> str:
    """Plain text of a page's Markdown: markup removed, structure kept.

    Paragraphs and blocks are separated by a blank line; tables (GFM or HTML) become rows of
    tab-separated cells; list items keep their markers (`-`, `*`, `1.`); headings, emphasis, code and
    link markup are removed (an autolink keeps its `<...>`); images become their description; LaTeX,
    text that only looks like a tag (`<MIME>`) and `*` inside words are kept as written. Returns "" for
    input without text, else the text with one trailing newline."""
    tree = SyntaxTreeNode(_parser().parse(markdown))
    text = "\n\n".join(block for block in _blocks(tree) if block.strip())
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    return text + "\n" if text.strip() else ""
