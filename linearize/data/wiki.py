"""MediaWiki dump → plain prose: one document per article, paragraphs separated by newlines.

Markup is removed in passes, each one regex or one balanced-span scan, innermost spans first so that
nested templates, tables and links (a link inside a file caption inside a template) come apart cleanly.
"""
from __future__ import annotations

import html
import io
import re
import xml.etree.ElementTree as ET
from typing import Iterator

# Articles shorter than this after stripping are stubs, lists or disambiguation pages: not prose.
MIN_ARTICLE_CHARS = 500
# Everything from the first of these headings on is citations and link lists, not prose.
TAIL_SECTIONS = ("see also", "references", "notes", "external links", "further reading", "bibliography",
                 "sources", "footnotes", "citations")
# Tags whose content is not prose (citations, formulas, galleries, code).
DROPPED_TAGS = ("ref", "references", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight",
                "source", "hiero", "chem", "ce", "graph", "mapframe", "templatedata")
# Link namespaces that carry no prose (media, categories); interlanguage links are matched separately.
DROPPED_NAMESPACES = ("file", "image", "media", "category")

# Lines that are leftovers of tables, templates or file links whose brackets did not balance.
MARKUP_LINE_STARTS = ("|", "!", "{", "}", "[[")

_COMMENT = re.compile(r"<!--.*?(-->|$)", re.DOTALL)
_DROPPED_ELEMENT = re.compile(
    r"<(%s)\b[^>]*?(/>|>.*?</\1\s*>)" % "|".join(DROPPED_TAGS), re.DOTALL | re.IGNORECASE)
_INNER_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*?\}\}", re.DOTALL)
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*?\|\}", re.DOTALL)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_INTERLANGUAGE = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)?:")
_HTML_TAG = re.compile(r"</?[a-zA-Z][^>]*?/?>")
_EMPHASIS = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACES = re.compile(r"[ \t\u00a0]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")


def _remove_innermost(pattern: re.Pattern, text: str) -> str:
    """Deletes spans matched by `pattern` (which only matches spans with nothing nested inside) until
    none is left, so nesting of any depth comes apart from the inside out."""
    previous = None
    while previous != text:
        previous, text = text, pattern.sub("", text)
    return text


def _link_text(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    namespace = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if namespace in DROPPED_NAMESPACES or _INTERLANGUAGE.match(target):
        return ""
    return (label or target.lstrip(":")).strip()


def _replace_links(text: str) -> str:
    previous = None
    while previous != text:
        previous, text = text, _INNER_LINK.sub(_link_text, text)
    return text


def _cut_tail_sections(text: str) -> str:
    for heading in _HEADING.finditer(text):
        if heading.group(2).strip().lower() in TAIL_SECTIONS:
            return text[: heading.start()]
    return text


def _tidy_lines(text: str) -> str:
    """Headings become their own short lines; table/markup leftovers go; spaces and blank lines collapse."""
    text = _HEADING.sub(r"\2", text)
    text = _LIST_MARK.sub("", text)
    lines = []
    for line in text.splitlines():
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", line)).strip()
        if line and not line.startswith(MARKUP_LINE_STARTS):
            lines.append(line)
    return "\n".join(lines)


def strip_wiki_markup(text: str) -> str:
    """Plain text of one article's wikitext: templates, tables, references, comments, files, categories
    and html tags removed; `[[target|label]]` → label, `[[target]]` → target; heading markers removed."""
    text = _COMMENT.sub("", text)
    text = _DROPPED_ELEMENT.sub("", text)
    text = _remove_innermost(_INNER_TEMPLATE, text)
    text = _remove_innermost(_INNER_TABLE, text)
    text = _cut_tail_sections(text)
    text = _replace_links(text)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = html.unescape(_HTML_TAG.sub("", text))
    text = _MAGIC_WORD.sub("", _EMPHASIS.sub("", text))
    text = _EMPTY_BRACKETS.sub("", text)
    return _tidy_lines(text)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_wiki_pages(xml_bytes: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of every main-namespace, non-redirect page of a MediaWiki XML dump."""
    for _, element in ET.iterparse(io.BytesIO(xml_bytes), events=("end",)):
        if _local(element.tag) != "page":
            continue
        fields = {_local(child.tag): child for child in element.iter()}
        is_article = fields.get("ns") is not None and fields["ns"].text == "0"
        if is_article and "redirect" not in fields and fields.get("text") is not None:
            yield fields["title"].text or "", fields["text"].text or ""
        element.clear()


def wiki_dump_to_documents(xml_bytes: bytes) -> list[str]:
    """Prose documents (title line + article text) of a MediaWiki XML dump, stubs dropped."""
    documents = []
    for title, wikitext in iter_wiki_pages(xml_bytes):
        body = strip_wiki_markup(wikitext)
        if len(body) >= MIN_ARTICLE_CHARS:
            documents.append(f"{title}\n{body}")
    return documents
