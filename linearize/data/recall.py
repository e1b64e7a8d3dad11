"""The `recall` data source: procedurally generated sequences whose continuation copies a span from
earlier context, at controlled distances, wrapped in natural text.

Each sequence is one task with several queries (`data.recall.queries`):
- key-value lookup: a short list of random keys with random values; later, between stretches of
  filler text, a sentence names a key and repeats its value;
- repeated spans: random word sequences quoted once, then quoted again later.

The copied tokens (the answer) are token-identical to the definition (the value's ids are tokenized
once and spliced into both places), so only copying from context predicts them. The distance of a
query is the number of tokens from the start of the value in the definition to the start of the answer,
drawn uniformly from [min_distance, max_distance]. Filler is running text from a corpus (not a repeated
sentence), and neither the wording nor the number format of the passkey evaluation is used: values are
letter-digit codes and word sequences, never a 5-digit number, and no "pass key" / "What is ...?" frame,
so a recall evaluation on passkey prompts measures transfer, not the template.

`recall_examples` yields held-out sequences (an RNG stream disjoint from the training source's) with the
positions of their answer tokens, for recall scores.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import UserError

# The corpus whose text fills the space between definitions and queries when none is given.
DEFAULT_FILLER = "demo-wiki"
# Extra key-value pairs beyond the queried ones: lookups then need the key, not just "the last value".
DISTRACTOR_PAIRS = 2
# Filler before the first definition, at most: the definitions do not always open the sequence.
MAX_LEAD_FILLER = 24
CODE_ALPHABET = string.ascii_uppercase.replace("O", "").replace("I", "") + "23456789"  # no 0/O, 1/I confusion
CODE_LENGTHS = (3, 4, 5)
SPAN_WORDS = (3, 7)  # words in a repeated span, inclusive range
# Salts of the two RNG streams: training rows and held-out examples never share a generator state.
TRAIN_SALT, HELD_OUT_SALT = "recall-train", "recall-held-out"

KEY_WORDS_A = ("amber", "brisk", "cobalt", "dusty", "eager", "frosty", "gilded", "hollow", "ivory", "jolly",
               "khaki", "lunar", "misty", "noble", "olive", "pale", "quiet", "rusty", "silver", "tidy",
               "umber", "velvet", "woolly", "young", "zesty")
KEY_WORDS_B = ("anchor", "badger", "candle", "dolphin", "ember", "falcon", "garden", "harbor", "island",
               "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "ribbon",
               "saddle", "tunnel", "violin", "walnut", "yarrow", "zephyr", "bramble")
SPAN_VOCABULARY = ("river", "copper", "window", "marble", "thunder", "pocket", "cedar", "signal", "lemon",
                   "harvest", "engine", "feather", "puzzle", "glacier", "saffron", "compass", "tulip",
                   "ladder", "cinder", "meadow", "velvet", "orbit", "pebble", "canyon", "whistle", "maple",
                   "falcon", "basket", "ember", "shadow", "prism", "oyster", "lantern", "summit", "quill")


@dataclass(frozen=True)
class RecallFormat:
    """How one task is written. `{key}` is the key's text; `{value}` marks where the value's token ids
    are spliced in (they carry their own leading space)."""

    header: str  # opens the definitions block
    item: str  # one definition
    query: str  # a later sentence that repeats the value of `{key}`
    values: str  # a name of VALUE_KINDS


VALUE_KINDS = ("code", "words")

FORMATS: dict[str, RecallFormat] = {
    "inventory": RecallFormat("\n\nStock room inventory:", "\n* {key}, shelf{value}",
                              "\nSomeone asked where the {key} was kept; it sits on shelf{value}.\n", "code"),
    "extensions": RecallFormat("\n\nOffice phone list:", "\n{key} desk - ext.{value}",
                               "\nTo call the {key} desk, dial ext.{value} and wait.\n", "code"),
    "glossary": RecallFormat("\n\nTeam jargon, explained:", "\n\"{key}\" means{value}.",
                             "\nRecall that in team jargon \"{key}\" means{value}.\n", "words"),
    "quotes": RecallFormat("\n\nLines copied from an old notebook:", "\nline {key}:{value}",
                           "\nThe notebook's line {key}, word for word:{value}\n", "words"),
}


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _value_text(kind: str, rng: random.Random) -> str:
    if kind == "code":
        return " " + "".join(rng.choice(CODE_ALPHABET) for _ in range(rng.choice(CODE_LENGTHS)))
    return " " + " ".join(rng.choice(SPAN_VOCABULARY) for _ in range(rng.randint(*SPAN_WORDS)))


def _keys(count: int, rng: random.Random) -> list[str]:
    pairs = rng.sample([(a, b) for a in KEY_WORDS_A for b in KEY_WORDS_B], count)
    return [f"{a} {b}" for a, b in pairs]


def _split_value(template: str, tokenizer, **fields) -> tuple[list[int], list[int]]:
    """Token ids of the template's text before and after `{value}`."""
    before, _, after = template.partition("{value}")
    return _ids(tokenizer, before.format(**fields)), _ids(tokenizer, after.format(**fields))


class _Filler:
    """Running text from random documents, tokenized on demand (each document once per generator)."""

    def __init__(self, texts: Sequence[str], tokenizer, rng: random.Random):
        if not texts:
            raise UserError("the recall source's filler text has no documents")
        self.texts, self.tokenizer, self.rng = texts, tokenizer, rng
        self.cache: dict[int, list[int]] = {}
        self.stream: list[int] = []

    def _document(self) -> list[int]:
        index = self.rng.randrange(len(self.texts))
        if index not in self.cache:
            self.cache[index] = _ids(self.tokenizer, self.texts[index])
        return self.cache[index]

    def start(self) -> None:
        """Begin a fresh stretch of text at a random point of a random document."""
        document = self._document()
        self.stream = document[self.rng.randrange(max(1, len(document) // 2)):]

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if not self.stream:
                self.stream = _ids(self.tokenizer, "\n\n") + self._document()
            need = count - len(out)
            out.extend(self.stream[:need])
            self.stream = self.stream[need:]
        return out


@dataclass(frozen=True)
class _Query:
    item: int
    start: int  # where the query sentence begins
    before: list[int]  # its ids up to the answer
    after: list[int]  # its ids after the answer


def _plan_queries(rng, queries, items, value_starts, prefix_ids, block_end, seq_len, min_distance, max_distance):
    """Queries placed so each answer lies [min_distance, max_distance] tokens after its value, in order,
    without overlapping one another or the definitions; those that cannot be placed are dropped."""
    wanted = []
    for item in rng.sample(range(len(items)), min(queries, len(items))):
        before, after = prefix_ids[item]
        # The answer can come no earlier than a query sentence that starts right after the definitions.
        earliest = max(min_distance, block_end + len(before) - value_starts[item])
        if earliest <= max_distance:
            answer = value_starts[item] + rng.randint(earliest, max_distance)
            wanted.append(_Query(item, answer - len(before), before, after))
    placed, free_from = [], block_end
    for query in sorted(wanted, key=lambda q: q.start):
        start = max(query.start, free_from)
        distance = start + len(query.before) - value_starts[query.item]
        end = start + len(query.before) + len(items[query.item]) + len(query.after)
        if distance <= max_distance and end <= seq_len:
            placed.append(_Query(query.item, start, query.before, query.after))
            free_from = end
    return placed


def recall_sequence(tokenizer, seq_len: int, rng: random.Random, filler: _Filler, *, queries: int,
                    min_distance: int, max_distance: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids `[seq_len]`, answer_positions `[A]`): one sequence; `input_ids[t]` for t in
    answer_positions is an answer token, predicted from the logits at t − 1."""
    fmt = FORMATS[rng.choice(sorted(FORMATS))]
    keys = _keys(queries + DISTRACTOR_PAIRS, rng)
    items = [_ids(tokenizer, _value_text(fmt.values, rng)) for _ in keys]  # each value's ids, used twice
    filler.start()
    ids = filler.take(rng.randint(0, MAX_LEAD_FILLER)) + _ids(tokenizer, fmt.header)  # header, then items
    value_starts = []
    for key, value in zip(keys, items):
        before, after = _split_value(fmt.item, tokenizer, key=key)
        value_starts.append(len(ids) + len(before))
        ids += before + value + after
    ids += _ids(tokenizer, "\n")
    prefix_ids = [_split_value(fmt.query, tokenizer, key=key) for key in keys]
    placed = _plan_queries(rng, queries, items, value_starts, prefix_ids, len(ids), seq_len, min_distance,
                           max_distance)
    if not placed:
        raise UserError(f"recall: no query fits in data.seq_len={seq_len} with distances "
                        f"[{min_distance}, {max_distance}] (the definitions take {len(ids)} tokens)")
    answers: list[int] = []
    for query in placed:
        ids += filler.take(query.start - len(ids)) + query.before
        answers.extend(range(len(ids), len(ids) + len(items[query.item])))
        ids += items[query.item] + query.after
    ids += filler.take(seq_len - len(ids))
    return torch.tensor(ids[:seq_len], dtype=torch.long), torch.tensor(answers, dtype=torch.long)


def _check(seq_len: int, queries: int, min_distance: int, max_distance: int) -> None:
    if queries < 1:
        raise UserError(f"data.recall.queries must be >= 1, got {queries}")
    if not 0 < min_distance <= max_distance:
        raise UserError(f"data.recall distances need 0 < min_distance <= max_distance, got "
                        f"[{min_distance}, {max_distance}]")
    if max_distance >= seq_len:
        raise UserError(f"data.recall.max_distance={max_distance} does not fit in data.seq_len={seq_len}")


def _generate(tokenizer, n: int, seq_len: int, seed: int, salt: str, filler_texts: Sequence[str], *,
              queries: int, min_distance: int, max_distance: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    _check(seq_len, queries, min_distance, max_distance)
    out = []
    for index in range(n):
        # One generator per sequence, seeded from (salt, seed, index): a sequence never depends on the
        # ones before it (str seeds hash with sha512: the same in every process).
        rng = random.Random(f"{salt}:{seed}:{index}")
        filler = _Filler(filler_texts, tokenizer, rng)
        out.append(recall_sequence(tokenizer, seq_len, rng, filler, queries=queries, min_distance=min_distance,
                                   max_distance=max_distance))
    return out


def _filler_texts(filler: Sequence[str] | None) -> Sequence[str]:
    if filler is not None:
        return filler
    from .loading import load_texts

    return load_texts(DEFAULT_FILLER)


def recall_rows(recall_cfg, tokenizer, seq_len: int, filler: Sequence[str] | None = None) -> torch.Tensor:
    """LongTensor `[data.recall.sequences, seq_len]`: the training rows of the `recall` source."""
    if recall_cfg.sequences < 1:
        raise UserError(f"data.recall.sequences must be >= 1, got {recall_cfg.sequences}")
    pairs = _generate(tokenizer, recall_cfg.sequences, seq_len, recall_cfg.seed, TRAIN_SALT, _filler_texts(filler),
                      queries=recall_cfg.queries, min_distance=recall_cfg.min_distance,
                      max_distance=recall_cfg.max_distance)
    return torch.stack([ids for ids, _ in pairs])  # [N, L]


def recall_examples(tokenizer, n: int, seq_len: int, seed: int = 0, *, filler: Sequence[str] | None = None,
                    queries: int = 4, min_distance: int = 32,
                    max_distance: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` held-out recall sequences: (input_ids `[seq_len]`, answer_positions `[A]`), where
    `input_ids[answer_positions]` are the copied tokens (score the logits at `answer_positions - 1`).

    Drawn from an RNG stream the training source never uses, so they are held out for every seed.
    `filler`: documents for the text in between (default: the demo-wiki corpus); `max_distance`
    defaults to 3/4 of `seq_len`."""
    max_distance = max_distance if max_distance is not None else (3 * seq_len) // 4
    return _generate(tokenizer, n, seq_len, seed, HELD_OUT_SALT, _filler_texts(filler), queries=queries,
                     min_distance=min_distance, max_distance=max_distance)
