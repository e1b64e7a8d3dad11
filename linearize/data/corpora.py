"""Registered corpora: names that `data.train` / `data.eval` accept besides files and hub datasets.

The demo corpora are read out of the gensim wheel's test data (fetched by `scripts/fetch_assets.sh`,
never installed); the extracted documents are cached as jsonl under `<cache>/corpora/`. The Python corpora
are text every CPython install carries (standard-library source, the language reference), held-out text of
kinds the demo model is never trained on here; they are read directly, since they follow the running
Python version.
"""
from __future__ import annotations

import bz2
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..models.assets import atomic_file, cache_dir, find_wheel, read_member
from .wiki import wiki_dump_to_documents

GENSIM_WHEEL = "gensim-4.4.0-*.whl"
GENSIM_TEST_DATA = "gensim/test/test_data/"
# The stdlib modules of `python-code`: plain Python with docstrings and comments.
CODE_MODULES = ("argparse", "dataclasses", "textwrap", "functools", "pathlib", "csv", "difflib", "heapq",
                "shutil", "statistics", "string", "fractions", "calendar", "tokenize", "json/decoder")


def _lines_to_documents(raw: bytes) -> list[str]:
    """One document per non-empty line."""
    return [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]


def _wiki_bz2_to_documents(raw: bytes) -> list[str]:
    return wiki_dump_to_documents(bz2.decompress(raw))


def _gensim_member(member: str, parse: Callable[[bytes], list[str]]) -> Callable[[], list[str]]:
    def read() -> list[str]:
        return parse(read_member(find_wheel(GENSIM_WHEEL, "a demo corpus"), GENSIM_TEST_DATA + member))
    return read


def _python_code() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / f"{name}.py").read_text(encoding="utf-8") for name in CODE_MODULES]


def _python_manual() -> list[str]:
    from pydoc_data.topics import topics  # the Python language reference's topics, as plain text

    return [topics[name] for name in sorted(topics)]


@dataclass(frozen=True)
class Corpus:
    read: Callable[[], list[str]]  # the documents, from wherever the corpus lives
    description: str
    cached: bool  # extracted once into <cache>/corpora/ (slow to read); False: read every time


CORPORA: dict[str, Corpus] = {
    "demo-wiki": Corpus(
        _gensim_member("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2", _wiki_bz2_to_documents),
        "~100 English Wikipedia articles (2016, CC BY-SA), markup stripped, ~0.6M tokens", cached=True),
    "demo-news": Corpus(
        _gensim_member("lee_background.cor", _lines_to_documents),
        "300 Australian news articles (Lee corpus), one per line, ~75k tokens", cached=True),
    "python-code": Corpus(
        _python_code, "Python standard-library source (" + ", ".join(CODE_MODULES) + ")", cached=False),
    "python-manual": Corpus(_python_manual, "the Python language reference (pydoc topics)", cached=False),
}


def is_corpus(name: str) -> bool:
    return name in CORPORA


def _read_cached(path: Path) -> list[str]:
    with path.open() as handle:
        return [json.loads(line)["text"] for line in handle]


def load_corpus(name: str) -> list[str]:
    """Documents of a registered corpus (a cached one is extracted once, then read from the cache)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; registered: {', '.join(CORPORA)}")
    corpus = CORPORA[name]
    if not corpus.cached:
        return corpus.read()
    cached = cache_dir("corpora") / f"{name}.jsonl"
    if cached.is_file():
        return _read_cached(cached)
    documents = corpus.read()
    with atomic_file(cached, "w") as handle:
        for text in documents:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return documents
