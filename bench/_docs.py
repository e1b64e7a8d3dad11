"""Writing a benchmark's markdown table into a docs/ file, shared by the bench scripts."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from linearize.files import write_text


def write_section(path: Path, title: str, section: str, header: str) -> None:
    """Replaces the section that starts with `title` in `path` (up to the next `## ` heading), or appends
    it; other sections stay. A missing file starts with `header`. Written atomically (`linearize.files`)."""
    text = path.read_text() if path.exists() else header
    start = text.find(title)
    if start >= 0:
        end = text.find("\n## ", start + len(title))
        rest = text[end + 1:] if end >= 0 else ""
        # a blank line before the next heading, however the section ends
        text = text[:start] + (section.rstrip("\n") + "\n\n" if rest else section) + rest
    else:
        text = text.rstrip("\n") + "\n\n" + section
    write_text(path, text)


def publish(section: str, path: Optional[Path], title: str, header: str) -> None:
    """Prints a bench's markdown section and, when `path` is given (`--write`), puts it in that file."""
    print(section)
    if path:
        write_section(path, title, section, header)
