"""`load_texts(spec)`: documents from a local file, a registered corpus, or a Hugging Face hub dataset.

Spec forms, tried in this order:
- an existing local file: `.txt` (one document per line), `.jsonl` / `.json`, `.parquet`, `.csv`
  (the `text_field` column; read with `datasets`, which never needs the network for local files);
- a registered corpus name (`demo-wiki`, `demo-news`; see `corpora.py`);
- a hub dataset `NAME[:CONFIG][@SPLIT]` (split defaults to `train`), only when the hub is reachable.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from ..errors import UserError, one_line
from ..offline import datasets_offline
from .corpora import CORPORA, is_corpus, load_corpus

HUB_SPEC = re.compile(r"^(?P<name>[\w.-]+(?:/[\w.-]+)?)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.\[\]:%+-]+))?$")
DEFAULT_HUB_SPLIT = "train"


# Real text keeps a few stray bytes (a Latin-1 name, a cut multibyte character); binary files (archives,
# model weights, images) decode to mostly U+FFFD and NULs. A fifth of the characters is far from both.
MAX_UNDECODABLE = 0.2


def _load_txt(path: Path, text_field: str) -> list[str]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    bad = text.count("\ufffd") + text.count("\x00")
    if text and bad > MAX_UNDECODABLE * len(text):
        raise UserError(f"data file {path} is not text: {bad / len(text):.0%} of its characters are not UTF-8 "
                        "(binary or compressed file?)")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # the newlines open() translates
    return [line.strip() for line in lines if line.strip()]


def _load_with_datasets(builder: str) -> Callable[[Path, str], list[str]]:
    def load(path: Path, text_field: str) -> list[str]:
        # Packaged builders on a local file never touch the network (measured), so the process-wide
        # HF_DATASETS_OFFLINE is left alone: a hub dataset for data.eval must still work.
        import datasets

        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # parser errors of every format: report them as a bad file
            raise UserError(f"cannot read {path} as {builder}: {one_line(exc)}") from None
        return _column(table, text_field, str(path))

    return load


LOCAL_FORMATS: dict[str, Callable[[Path, str], list[str]]] = {
    ".txt": _load_txt,
    ".jsonl": _load_with_datasets("json"),
    ".json": _load_with_datasets("json"),
    ".parquet": _load_with_datasets("parquet"),
    ".csv": _load_with_datasets("csv"),
}


def _column(table, text_field: str, source: str) -> list[str]:
    if text_field not in table.column_names:
        raise UserError(f"{source} has no column {text_field!r} (data.text_field); columns: {', '.join(table.column_names)}")
    return [text.strip() for text in table[text_field] if isinstance(text, str) and text.strip()]


def _hub_offline() -> bool:
    return datasets_offline()


def _load_hub(spec: str, text_field: str) -> list[str]:
    match = HUB_SPEC.match(spec)
    name, config, split = match["name"], match["config"], match["split"] or DEFAULT_HUB_SPLIT
    if _hub_offline():
        raise UserError(
            f"data {spec!r} is not a local file or a registered corpus ({', '.join(CORPORA)}), "
            "and hub datasets are off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)")
    import datasets

    try:
        table = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, auth, missing dataset/config/split: all are the user's to fix
        raise UserError(f"cannot load hub dataset {spec!r}: {one_line(exc)}") from None
    return _column(table, text_field, spec)


def _local_file(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    if path.is_dir():
        raise UserError(f"data {spec!r} is a directory; give a file ({', '.join(LOCAL_FORMATS)})")
    return path if path.is_file() else None


def load_texts(spec: str, text_field: str = "text") -> list[str]:
    """Non-empty documents named by `spec` (see the module docstring), in file order.

    Raises UserError for a missing file, an unknown format, a missing column, a file with no documents,
    or a hub dataset while offline.
    """
    path = _local_file(spec)
    if path is not None:
        loader = LOCAL_FORMATS.get(path.suffix.lower())
        if loader is None:
            raise UserError(f"data file {spec}: unsupported format {path.suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
        texts = loader(path, text_field)
    elif is_corpus(spec):
        texts = load_corpus(spec)
    elif Path(spec).suffix.lower() in LOCAL_FORMATS or not HUB_SPEC.match(spec):
        raise UserError(f"data file not found: {spec}")
    else:
        texts = _load_hub(spec, text_field)
    if not texts:
        raise UserError(f"data {spec!r} has no documents (empty, or no non-empty {text_field!r} values)")
    return texts
