"""Data: wiki markup stripping, local file formats, the demo corpora, packing, shuffling and splits."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from linearize import UserError
from linearize.config import DataConfig
from linearize.data import (
    build_datasets,
    load_corpus,
    load_texts,
    pack_sequences,
    shuffle_sequences,
    split_sequences,
    strip_wiki_markup,
    wiki_dump_to_documents,
)
from linearize.models import assets

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Linear attention replaces the softmax with a kernel feature map.",
    "A sliding window keeps the most recent keys and values exactly.",
    "Pack the documents into sequences of fixed length, then shuffle them.",
] * 6

WIKITEXT = """{{Infobox person|name=Ada {{nowrap|Lovelace}}|image=[[File:Ada.jpg|thumb]]}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="a">Cited {{cite book|title=X}}</ref> She wrote
the first [[algorithm]]<ref name="b"/> for the [[Analytical Engine|engine]] &amp; more.<!-- hidden note -->
[[File:Engine.png|thumb|The [[Analytical Engine|engine]] in a museum]]
== Early life ==
* She was born in <small>London</small> in 1815 ({{lang|fr|née}}).
{| class="wikitable"
| cell one || {{flag|UK}}
|}
See [http://example.org the archive] for ''more''.
== References ==
{{reflist}}
Everything after the references heading is dropped.
[[Category:Mathematicians]]
[[de:Ada Lovelace]]
"""


def tokenizer(path):
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- wiki


def test_strip_wiki_markup_keeps_prose_only():
    text = strip_wiki_markup(WIKITEXT)
    assert text.splitlines()[0] == "Ada Lovelace was an English mathematician. She wrote"
    assert "the first algorithm for the engine & more." in text
    assert "Early life" in text.splitlines()
    assert "She was born in London in 1815." in text
    assert "See the archive for more." in text
    for leftover in ("{{", "}}", "[[", "]]", "<", ">", "'''", "==", "Infobox", "Cited", "hidden", "wikitable",
                     "cell one", "museum", "Category", "Mathematicians", "de:", "dropped", "http", "|"):
        assert leftover not in text, leftover


def _page(title, ns, text, redirect=False):
    extra = '<redirect title="X" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns>{extra}<revision><text xml:space=\"preserve\">"
            f"{text}</text></revision></page>")


def test_wiki_dump_keeps_articles_only():
    body = "Prose about the topic with a [[link]]. " * 20  # longer than MIN_ARTICLE_CHARS
    xml = ("<mediawiki xmlns=\"http://www.mediawiki.org/xml/export-0.10/\">"
           + _page("Article", 0, body) + _page("Redirect", 0, body, redirect=True)
           + _page("Talk:Article", 1, body) + _page("Stub", 0, "Too short.") + "</mediawiki>")
    documents = wiki_dump_to_documents(xml.encode())
    assert len(documents) == 1
    assert documents[0].startswith("Article\nProse about the topic with a link.")


# ---------------------------------------------------------------------------------------------- files


def test_load_txt_jsonl_parquet_csv(tmp_path):
    import datasets

    (tmp_path / "d.txt").write_text("first doc\n\n  second doc  \n")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(DOCS[:3])))
    datasets.Dataset.from_dict({"body": ["p one", "", "p two"]}).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.csv").write_text("body,id\nc one,1\nc two,2\n")
    assert load_texts(str(tmp_path / "d.txt")) == ["first doc", "second doc"]
    assert load_texts(str(tmp_path / "d.jsonl"), "body") == DOCS[:3]
    assert load_texts(str(tmp_path / "d.parquet"), "body") == ["p one", "p two"]
    assert load_texts(str(tmp_path / "d.csv"), "body") == ["c one", "c two"]


def test_load_errors_name_the_file(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "d.xml").write_text("<x/>")
    cases = {
        str(tmp_path / "d.jsonl"): "no column 'text'",
        str(tmp_path / "empty.txt"): "no documents",
        str(tmp_path / "d.xml"): "unsupported format",
        str(tmp_path / "missing.txt"): "not found",
        str(tmp_path): "directory",
        "some-org/some-dataset": "hub datasets are off",  # conftest sets HF_DATASETS_OFFLINE
    }
    for spec, expected in cases.items():
        with pytest.raises(UserError, match=expected) as info:
            load_texts(spec)
        assert spec in str(info.value)


# ---------------------------------------------------------------------------------------------- corpora


@pytest.fixture
def wheel_cache(tmp_path, monkeypatch):
    """A fresh LINEARIZE_CACHE holding links to the fetched wheels (skips when they were never fetched)."""
    try:
        wheel = assets.find_wheel("gensim-4.4.0-*.whl", "the demo corpora test")
    except UserError:
        pytest.skip("gensim wheel not fetched: bash scripts/fetch_assets.sh")
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / wheel.name).symlink_to(wheel.resolve())
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_demo_corpora_extract_and_cache(wheel_cache):
    news = load_corpus("demo-news")
    assert len(news) == 300  # lee_background.cor: 300 articles, one per line
    wiki = load_corpus("demo-wiki")
    assert 90 <= len(wiki) <= 110  # ~100 articles survive the stub filter
    prose = "\n".join(wiki)
    assert len(prose.split()) > 300_000
    assert prose.count("{{") == 0 and prose.count("[[") < 5  # a few unbalanced file captions may remain
    assert (wheel_cache / "corpora" / "demo-wiki.jsonl").is_file()
    assert load_corpus("demo-wiki") == wiki  # second read comes from the cache
    assert load_texts("demo-news") == news


def test_python_corpora_read_this_python_and_are_not_cached(tmp_path, monkeypatch):
    import sysconfig
    from pathlib import Path

    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    code = load_texts("python-code")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert code[0] == (stdlib / "argparse.py").read_text(encoding="utf-8")  # the running Python's source
    manual = load_texts("python-manual")
    assert len(manual) > 20 and any("yield" in doc for doc in manual)  # the language reference's topics
    assert not (tmp_path / "corpora").exists()  # a cache would go stale when the Python version changes


def test_missing_wheel_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    with pytest.raises(UserError, match="fetch_assets.sh"):
        load_texts("demo-news")


# ---------------------------------------------------------------------------------------------- packing


def test_pack_sequences_joins_documents_with_eos(tiny_tokenizer):
    tok = tokenizer(tiny_tokenizer)
    seq_len = 16
    packed = pack_sequences(DOCS, tok, seq_len)
    stream = []
    for doc in DOCS:
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = len(stream) // seq_len
    assert packed.dtype == torch.long and packed.shape == (rows, seq_len)
    assert packed.flatten().tolist() == stream[: rows * seq_len]


def test_pack_too_little_data_names_the_source(tiny_tokenizer):
    with pytest.raises(UserError, match="data.train 'tiny.txt'.*fewer than one sequence"):
        pack_sequences(["short"], tokenizer(tiny_tokenizer), 512, source="data.train 'tiny.txt'")


def test_shuffle_is_a_seeded_permutation():
    rows = torch.arange(40).view(20, 2)  # [N, L]
    a, b, c = shuffle_sequences(rows, 1), shuffle_sequences(rows, 1), shuffle_sequences(rows, 2)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, rows)
    assert sorted(a[:, 0].tolist()) == rows[:, 0].tolist()


def test_split_sequences_is_disjoint_and_complete():
    rows = torch.arange(20).view(10, 2)
    train, held = split_sequences(rows, 0.25, seed=0)
    assert (train.shape[0], held.shape[0]) == (7, 3)  # ceil(0.25 * 10) = 3 held out
    assert sorted(torch.cat([train, held])[:, 0].tolist()) == rows[:, 0].tolist()
    with pytest.raises(UserError, match="eval_fraction"):
        split_sequences(rows[:1], 0.5, seed=0)


def test_build_datasets_eval_file_cap_and_determinism(tmp_path, tiny_tokenizer):
    tok = tokenizer(tiny_tokenizer)
    (tmp_path / "train.txt").write_text("\n".join(DOCS))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    cfg = DataConfig(train=str(tmp_path / "train.txt"), eval=str(tmp_path / "eval.jsonl"), seq_len=8,
                     max_eval_sequences=5)
    train, evaluation = build_datasets(cfg, tok, seed=3)
    unshuffled = pack_sequences(DOCS, tok, 8)
    assert train.shape == unshuffled.shape and not torch.equal(train, unshuffled)
    assert torch.equal(evaluation, unshuffled[:5])  # eval keeps file order, capped
    again, _ = build_datasets(cfg, tok, seed=3)
    assert torch.equal(train, again)
    ordered, _ = build_datasets(DataConfig(**{**cfg.__dict__, "shuffle": False}), tok, seed=3)
    assert torch.equal(ordered, unshuffled)


def test_build_datasets_holds_out_a_fraction(tmp_path, tiny_tokenizer):
    tok = tokenizer(tiny_tokenizer)
    (tmp_path / "train.txt").write_text("\n".join(DOCS))
    cfg = DataConfig(train=str(tmp_path / "train.txt"), eval="", eval_fraction=0.2, seq_len=8)
    train, evaluation = build_datasets(cfg, tok, seed=0)
    total = pack_sequences(DOCS, tok, 8).shape[0]
    assert train.shape[0] + evaluation.shape[0] == total and evaluation.shape[0] >= 1
    with pytest.raises(UserError, match="no evaluation data"):
        build_datasets(DataConfig(train=cfg.train, eval="", seq_len=8), tok, seed=0)


def test_in_stage_eval_takes_the_first_rows_or_all():
    from types import SimpleNamespace

    from linearize.data import in_stage_eval

    rows = torch.arange(12).view(6, 2)  # [6 sequences, 2 tokens]
    assert torch.equal(in_stage_eval(rows, SimpleNamespace(eval_sequences=2)), rows[:2])
    assert torch.equal(in_stage_eval(rows, SimpleNamespace(eval_sequences=0)), rows)
    assert torch.equal(in_stage_eval(rows, SimpleNamespace(eval_sequences=99)), rows)
