"""Cleaning of single values: Unicode normalisation, whitespace, HTML, labels, missing values.

Pure functions of one value; the pipeline (prepare.py) decides what happens to the row.
"""

from __future__ import annotations

import html
import re
import unicodedata
from html.parser import HTMLParser

_SPACE = re.compile(r"[^\S\n]+")       # whitespace other than line breaks
# C0 and C1 control characters and DEL; tab, line feed and carriage return are formatting in text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LINE_EDGES = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFKC (full-width letters, ligatures, non-breaking spaces -> their plain forms); runs of
    spaces and tabs become one space; line breaks stay (they format prompts and code), but at
    most one blank line in a row; the ends are trimmed."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _LINE_EDGES.sub("\n", _SPACE.sub(" ", text))
    return _BLANK_LINES.sub("\n\n", text).strip()


class _TextOnly(HTMLParser):
    # Block-level tags separate words ("<p>a</p><p>b</p>" is "a b", not "ab"); script and
    # style contents are code, not text.
    BLOCKS = {"p", "br", "div", "li", "tr", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol"}
    SKIP = {"script", "style"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        self.skipping += tag in self.SKIP
        if tag in self.BLOCKS:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        self.skipping -= tag in self.SKIP and self.skipping > 0
        if tag in self.BLOCKS:
            self.parts.append(" ")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """Tags removed, entities decoded (``&amp;`` -> ``&``). Text without tags is only unescaped."""
    if "<" not in text:
        return html.unescape(text)
    parser = _TextOnly()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def is_missing(value: object) -> bool:
    """None, NaN, an empty or blank string, or an empty list."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple)):
        return len(value) == 0
    return False


def normalize_label(value: object, lowercase: bool, mapping: dict[str, str]) -> str:
    """A label as text: trimmed, optionally lowercased, then renamed by ``mapping``.

    Whole-number floats read from a spreadsheet (``1.0``) become ``"1"``, so they match the ``1``
    written elsewhere.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    label = normalize_text(str(value))
    if lowercase:
        label = label.lower()
    return mapping.get(label, label)


def find_control(text: str) -> int:
    """Where the first control character (C0, DEL, C1; not tab or line breaks) is, or -1."""
    found = _CONTROL.search(text)
    return found.start() if found else -1


def strip_control(text: str) -> str:
    """``text`` without control characters (tab, line feed and carriage return stay)."""
    return _CONTROL.sub("", text)
