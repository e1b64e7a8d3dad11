"""Registered corpora: names that `data.train` / `data.eval` accept besides files and hub datasets.

The demo corpora are read out of the gensim wheel's test data (fetched by `scripts/fetch_assets.sh`,
never installed); the extracted documents are cached as jsonl under `<cache>/corpora/`.
"""
from __future__ import annotations

import bz2
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..models.assets import atomic_file, cache_dir, find_wheel, read_member
from .wiki import wiki_dump_to_documents

GENSIM_WHEEL = "gensim-4.4.0-*.whl"
GENSIM_TEST_DATA = "gensim/test/test_data/"


def _lines_to_documents(raw: bytes) -> list[str]:
    """One document per non-empty line."""
    return [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]


def _wiki_bz2_to_documents(raw: bytes) -> list[str]:
    return wiki_dump_to_documents(bz2.decompress(raw))


@dataclass(frozen=True)
class Corpus:
    wheel: str  # glob of the wheel file name
    member: str  # path inside the wheel
    parse: Callable[[bytes], list[str]]  # raw bytes -> documents
    description: str


CORPORA: dict[str, Corpus] = {
    "demo-wiki": Corpus(
        GENSIM_WHEEL, GENSIM_TEST_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        _wiki_bz2_to_documents, "~100 English Wikipedia articles (2016, CC BY-SA), markup stripped, ~0.6M tokens"),
    "demo-news": Corpus(
        GENSIM_WHEEL, GENSIM_TEST_DATA + "lee_background.cor",
        _lines_to_documents, "300 Australian news articles (Lee corpus), one per line, ~75k tokens"),
}


def is_corpus(name: str) -> bool:
    return name in CORPORA


def _read_cached(path: Path) -> list[str]:
    with path.open() as handle:
        return [json.loads(line)["text"] for line in handle]


def load_corpus(name: str) -> list[str]:
    """Documents of a registered corpus, extracted from its wheel once and cached."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; registered: {', '.join(CORPORA)}")
    cached = cache_dir("corpora") / f"{name}.jsonl"
    if cached.is_file():
        return _read_cached(cached)
    corpus = CORPORA[name]
    documents = corpus.parse(read_member(find_wheel(corpus.wheel, f"corpus {name!r}"), corpus.member))
    with atomic_file(cached, "w") as handle:
        for text in documents:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return documents
