"""The `teacher` data source: sequences the teacher writes itself (sequence-level distillation data).

Three kinds of sample (`SAMPLE_KINDS`):
- `continuation`: the opening sentences of a prompt-corpus document, continued by the teacher;
- `chat`: an instruction through the teacher's chat template, answered by the teacher;
- `long_chat`: one or more prompt-corpus documents (their length drawn from `context_tokens`) followed by
  an instruction, about the documents (`DOCUMENT_INSTRUCTIONS`) or unrelated to them, answered.
Instructions come from `teacher_samples.instructions` (a file) or are written by the teacher from
`SEED_TOPICS` (self-instruct). The evaluation's instructions are never among them.

Generation is batched with the KV cache (left padding). Each batch is one kind (a low-discrepancy
sequence over batch indices keeps the shares of every prefix of batches close to chat_share / long_share,
and a batch of one kind pads little) and is seeded from (seed, batch index) only, so batch b is the same
whether or not earlier batches were generated in this process. Each batch is written as one safetensors
shard, atomically, so a SIGKILL loses at most the batch in progress and a rerun continues with identical
tokens. `samples.json` records the settings; a folder made with other settings is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from ..errors import UserError
from ..models.assets import atomic_file

SAMPLE_KINDS = ("continuation", "chat", "long_chat")
CHAT_MODES = ("auto", "on", "off")
RECORD_FILE = "samples.json"
SHARD_PATTERN = "shard_{:05d}.safetensors"
# Bumped when the same settings would produce other tokens (prompt formats, seeding).
FORMAT_VERSION = 1

# Prompts from a document: its first sentences, at most this many, and at most this many characters.
PROMPT_SENTENCES = 3
PROMPT_MAX_CHARS = 400
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Characters read from a document per context token wanted: enough text to tokenize, never a whole book.
CHARS_PER_TOKEN_READ = 8
DOCUMENT_SEPARATOR = "\n\n"
# Share of long_chat instructions that are about the documents; the rest are unrelated to them.
RELATED_SHARE = 0.5
# Self-instruct: the teacher writes a request about a topic in at most this many tokens.
INSTRUCTION_MAX_NEW_TOKENS = 48
SELF_INSTRUCT_PROMPT = ("Write one request that a person might send to a helpful assistant about {topic}. "
                        "Reply with the request only, as a single sentence.")
FALLBACK_INSTRUCTION = "Write a short paragraph about {topic}."
# Room for the chat template's markup around a long_chat prompt, against the teacher's position limit.
TEMPLATE_ROOM = 64
# Batch b is of kind chosen by frac(b · φ⁻¹): equidistributed, so every prefix of batches keeps the shares.
GOLDEN_STEP = 0.6180339887498949

SEED_TOPICS = (
    "cooking dinner on a budget", "the history of ancient Rome", "learning a second language", "houseplants",
    "personal finance", "writing a cover letter", "basic algebra", "sorting a list in Python", "the solar system",
    "training for a 10 km run", "sleep habits", "planning a trip to Japan", "climate and weather",
    "photosynthesis", "job interviews", "board games", "the French Revolution", "first aid for burns",
    "choosing a laptop", "writing a short poem", "email etiquette", "composting", "how vaccines work",
    "renting an apartment", "car maintenance", "music theory", "public speaking", "recycling",
    "ocean animals", "time management", "the water cycle", "baking bread", "SQL queries", "birdwatching",
    "negotiating a salary", "volcanoes", "the printing press", "meditation", "fixing a bicycle", "chess openings",
)
DOCUMENT_INSTRUCTIONS = (
    "Summarize the text above in three sentences.",
    "What is the main subject of the text above? Answer in one sentence.",
    "List three facts that the text above states.",
    "Write a question that the text above answers, then answer it.",
    "Explain the text above to a twelve-year-old.",
    "Give the text above a short title.",
    "Which names, places or dates appear in the text above?",
    "Rewrite the first sentence of the text above in plainer words.",
)


@dataclass(frozen=True)
class Sample:
    ids: list[int]  # prompt and answer, as the student will read them
    kind: str  # a name of SAMPLE_KINDS
    new_tokens: int  # how many of `ids` the teacher generated


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def excluded_instructions(exclude: Sequence[str] = ()) -> frozenset[str]:
    """Normalized instructions that training prompts must not contain: `exclude` plus the evaluation's
    own (linearize.evals.instructions.EVAL_INSTRUCTIONS, where that module exists)."""
    try:
        from ..evals.instructions import EVAL_INSTRUCTIONS
    except ImportError:
        EVAL_INSTRUCTIONS = ()
    return frozenset(_norm(t) for t in (*exclude, *EVAL_INSTRUCTIONS))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_enabled(settings, tokenizer) -> bool:
    """Whether chat samples are made: `chat` on / off, or auto = when the tokenizer has a chat template."""
    if settings.chat not in CHAT_MODES:
        raise UserError(f"data.teacher_samples.chat must be one of {', '.join(CHAT_MODES)}, got {settings.chat!r}")
    if settings.chat == "on" and not has_chat_template(tokenizer):
        raise UserError("data.teacher_samples.chat=on, but the teacher's tokenizer has no chat template "
                        "(use chat=off or auto)")
    return settings.chat == "on" or (settings.chat == "auto" and has_chat_template(tokenizer))


def check_settings(settings, tokenizer, max_positions: int | None) -> bool:
    """UserError (one line) for settings that cannot work; returns whether chat samples are made."""
    if settings.tokens <= 0:
        raise UserError(f"data.teacher_samples.tokens must be > 0, got {settings.tokens}")
    if settings.max_new_tokens <= 0:
        raise UserError(f"data.teacher_samples.max_new_tokens must be > 0, got {settings.max_new_tokens}")
    if settings.batch_size <= 0:
        raise UserError(f"data.teacher_samples.batch_size must be > 0, got {settings.batch_size}")
    if settings.temperature < 0 or not 0 < settings.top_p <= 1:
        raise UserError(f"data.teacher_samples: temperature must be >= 0 and 0 < top_p <= 1, got "
                        f"{settings.temperature} / {settings.top_p}")
    context = list(settings.context_tokens)
    if len(context) != 2 or not 0 < context[0] <= context[1]:
        raise UserError(f"data.teacher_samples.context_tokens must be [min, max] with 0 < min <= max, got {context}")
    chat = chat_enabled(settings, tokenizer)
    longest = context[1] + TEMPLATE_ROOM + settings.max_new_tokens
    if chat and settings.long_share > 0 and max_positions is not None and longest > max_positions:
        raise UserError(f"data.teacher_samples.context_tokens max {context[1]} + max_new_tokens "
                        f"{settings.max_new_tokens} (+{TEMPLATE_ROOM} template) exceeds the teacher's "
                        f"max_position_embeddings {max_positions}")
    return chat


def opening(text: str) -> str:
    """The first PROMPT_SENTENCES sentences of a document, cut to PROMPT_MAX_CHARS at a space."""
    head = " ".join(_SENTENCE_END.split(text.strip(), maxsplit=PROMPT_SENTENCES)[:PROMPT_SENTENCES])
    if len(head) > PROMPT_MAX_CHARS:
        head = head[:PROMPT_MAX_CHARS].rsplit(" ", 1)[0]
    return head.strip()


def _seed(*parts) -> int:
    """A 63-bit seed from the parts: the same in every process (no Python hash randomization)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def batch_kind(settings, chat: bool, index: int) -> str:
    """The kind of batch `index`: long_chat / chat / continuation with shares chat_share · long_share,
    chat_share · (1 − long_share), and the rest."""
    if not chat:
        return "continuation"
    u = (index * GOLDEN_STEP) % 1.0
    long_cut = settings.chat_share * settings.long_share
    return "long_chat" if u < long_cut else "chat" if u < settings.chat_share else "continuation"


@dataclass
class _Sources:
    """Everything a batch is drawn from."""

    openings: list[str]
    documents: Sequence[str]
    instructions: list[str] | None  # None: self-instruct
    excluded: frozenset[str]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_ids(tokenizer, message: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                         tokenize=False)
    return _ids(tokenizer, text)


def _stop_ids(model, tokenizer) -> list[int]:
    stops = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    return stops


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[list[int]], settings, seed: int, max_new_tokens: int) -> list[list[int]]:
    """The new tokens for each prompt (through the first stop token), sampled under `seed`."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [B, P], left padded
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    stops = _stop_ids(model, tokenizer)
    sampling = dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p) \
        if settings.temperature > 0 else dict(do_sample=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=stops, **sampling)  # [B, P + new]
    answers = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        answers.append(row[:end])
    return answers


def _context(tokenizer, documents: Sequence[str], length: int, rng: random.Random) -> str:
    """Random documents joined until `length` tokens, cut to exactly that many, as text."""
    ids: list[int] = []
    while len(ids) < length:
        text = documents[rng.randrange(len(documents))][: length * CHARS_PER_TOKEN_READ]
        ids += (_ids(tokenizer, DOCUMENT_SEPARATOR) if ids else []) + _ids(tokenizer, text)
    return tokenizer.decode(ids[:length])


def _fallback(topic: str, excluded: frozenset[str]) -> str:
    for candidate in [topic, *SEED_TOPICS]:
        text = FALLBACK_INSTRUCTION.format(topic=candidate)
        if _norm(text) not in excluded:
            return text
    raise UserError("every fallback instruction is among the evaluation's instructions")


def _instructions(model, tokenizer, settings, sources: _Sources, count: int, rng, seed: int) -> list[str]:
    """`count` instructions: from the given list, or written by the teacher about random seed topics."""
    if sources.instructions is not None:
        return [rng.choice(sources.instructions) for _ in range(count)]
    topics = [rng.choice(SEED_TOPICS) for _ in range(count)]
    prompts = [_chat_ids(tokenizer, SELF_INSTRUCT_PROMPT.format(topic=t)) for t in topics]
    written = _generate(model, tokenizer, prompts, settings, seed, INSTRUCTION_MAX_NEW_TOKENS)
    out = []
    for topic, ids in zip(topics, written):
        lines = [line.strip(" \"'") for line in tokenizer.decode(ids, skip_special_tokens=True).splitlines()]
        text = next((line for line in lines if line), "")
        out.append(text if text and _norm(text) not in sources.excluded else _fallback(topic, sources.excluded))
    return out


def _prompts(model, tokenizer, settings, sources: _Sources, kind: str, index: int) -> list[list[int]]:
    rng = random.Random(_seed(settings.seed, index, "plan"))
    size = settings.batch_size
    if kind == "continuation":
        bos = tokenizer("", add_special_tokens=True)["input_ids"]  # the model's usual document start
        return [bos + _ids(tokenizer, rng.choice(sources.openings)) for _ in range(size)]
    instructions = _instructions(model, tokenizer, settings, sources, size, rng, _seed(settings.seed, index, "instruct"))
    if kind == "chat":
        return [_chat_ids(tokenizer, text) for text in instructions]
    low, high = settings.context_tokens
    messages = []
    for text in instructions:
        context = _context(tokenizer, sources.documents, rng.randint(low, high), rng)
        ask = rng.choice(DOCUMENT_INSTRUCTIONS) if rng.random() < RELATED_SHARE else text
        messages.append(context + DOCUMENT_SEPARATOR + ask)
    return [_chat_ids(tokenizer, message) for message in messages]


def _batch(model, tokenizer, settings, sources: _Sources, chat: bool, index: int) -> list[Sample]:
    kind = batch_kind(settings, chat, index)
    prompts = _prompts(model, tokenizer, settings, sources, kind, index)
    answers = _generate(model, tokenizer, prompts, settings, _seed(settings.seed, index, "answer"), settings.max_new_tokens)
    return [Sample(p + a, kind, len(a)) for p, a in zip(prompts, answers)]


def _write_shard(path: Path, samples: list[Sample]) -> None:
    tensors = {
        "tokens": torch.tensor([t for s in samples for t in s.ids], dtype=torch.int64),  # [sum of lengths]
        "lengths": torch.tensor([len(s.ids) for s in samples], dtype=torch.int64),
        "new_tokens": torch.tensor([s.new_tokens for s in samples], dtype=torch.int64),
        "kinds": torch.tensor([SAMPLE_KINDS.index(s.kind) for s in samples], dtype=torch.int64),
    }
    with atomic_file(path, "wb") as handle:
        handle.write(save_safetensors(tensors))


def read_shard(path: Path) -> list[Sample]:
    tensors = load_safetensors(path.read_bytes())
    pieces = torch.split(tensors["tokens"], tensors["lengths"].tolist())
    return [Sample(ids.tolist(), SAMPLE_KINDS[kind], new) for ids, kind, new
            in zip(pieces, tensors["kinds"].tolist(), tensors["new_tokens"].tolist())]


def _digest(texts: Sequence[str] | None) -> str | None:
    if texts is None:
        return None
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _record(model, tokenizer, settings, sources: _Sources, prompts_texts) -> dict:
    config = model.config
    return {
        "format": FORMAT_VERSION,
        "settings": dataclasses.asdict(settings),
        "teacher": {name: getattr(config, name, None) for name in
                    ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings")},
        "tokenizer": {"vocab": len(tokenizer), "chat_template_sha256": _digest([tokenizer.chat_template or ""])},
        "prompts_sha256": _digest(prompts_texts),
        "instructions_sha256": _digest(sources.instructions),
        "excluded_sha256": _digest(sorted(sources.excluded)),
    }


def _open_folder(out_dir: Path, record: dict) -> None:
    """Writes the settings record, or checks that the folder's record is this one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RECORD_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(key for key in {*saved, *record} if saved.get(key) != record.get(key))
        if changed:
            raise UserError(f"{out_dir} holds teacher samples made with other settings ({', '.join(changed)} "
                            "differ): use another folder or delete it")
        return
    with atomic_file(path, "w") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)


def _sources(settings, tokenizer, prompts_texts, instructions, exclude, chat: bool) -> _Sources:
    openings = [o for o in map(opening, prompts_texts) if o]
    documents = [t for t in prompts_texts if t.strip()]
    if not openings:
        raise UserError(f"data.teacher_samples.prompts {settings.prompts!r} has no documents to prompt the teacher with")
    excluded = excluded_instructions(exclude)
    pool = None
    if instructions is not None:
        pool = [t.strip() for t in instructions if t.strip() and _norm(t) not in excluded]
        if chat and not pool:
            raise UserError(f"data.teacher_samples.instructions {settings.instructions!r} has no instructions "
                            "(after removing the evaluation's own)")
    assert not any(_norm(t) in excluded for t in DOCUMENT_INSTRUCTIONS), "a document instruction is an eval prompt"
    return _Sources(openings, documents, pool, excluded)


def generate_teacher_samples(model, tokenizer, settings, out_dir: Path, *, prompts_texts: Sequence[str],
                             instructions: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> list[Sample]:
    """The teacher's samples for `settings` (a TeacherSamplesConfig), generating the batches `out_dir`
    does not hold yet, until `settings.tokens` new tokens are reached.

    prompts_texts: the prompt corpus's documents (their openings prompt continuations; long_chat contexts
    are drawn from them). instructions: the chat instructions (None: the teacher writes them). exclude:
    instructions never to train on, beside the evaluation's own. Deterministic in settings.seed on a
    given machine and thread count. UserError, with nothing written, for unusable settings."""
    max_positions = getattr(model.config, "max_position_embeddings", None)
    chat = check_settings(settings, tokenizer, max_positions)
    sources = _sources(settings, tokenizer, prompts_texts, instructions, exclude, chat)
    out_dir = Path(out_dir)
    _open_folder(out_dir, _record(model, tokenizer, settings, sources, prompts_texts))
    samples: list[Sample] = []
    generated, index = 0, 0
    with tqdm(total=settings.tokens, desc="teacher samples", unit="tok") as bar:
        while generated < settings.tokens:
            path = out_dir / SHARD_PATTERN.format(index)
            if path.is_file():
                batch = read_shard(path)
            else:
                batch = _batch(model, tokenizer, settings, sources, chat, index)
                _write_shard(path, batch)
            samples += batch
            new = sum(s.new_tokens for s in batch)
            generated += new
            bar.update(min(new, settings.tokens - bar.n))
            index += 1
    return samples


def pack_samples(samples: Sequence[Sample], seq_len: int, eos: int) -> torch.Tensor:
    """LongTensor `[N, seq_len]`. Chat samples open a row each and are never cut (one longer than a row
    keeps its last seq_len tokens: the instruction and answer); the rest of each such row, and the rows
    after, are filled with the continuation samples' stream (cut anywhere, the incomplete tail dropped).
    Samples are separated by eos where they do not end with it already."""
    def ended(ids: list[int]) -> list[int]:
        return ids if ids and ids[-1] == eos else ids + [eos]

    stream = [t for s in samples if s.kind == "continuation" for t in ended(s.ids)]
    whole = [ended(s.ids)[-seq_len:] for s in samples if s.kind != "continuation"]
    rows, used = [], 0
    for ids in whole:
        need = seq_len - len(ids)
        if used + need > len(stream):  # no continuation text left to fill rows: the rest goes in the stream
            stream = stream[used:] + [t for rest in whole[len(rows):] for t in rest]
            used = 0
            break
        rows.append(ids + stream[used:used + need])
        used += need
    stream = stream[used:]
    rows += [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not rows:
        raise UserError(f"the teacher samples hold fewer tokens than one sequence of data.seq_len={seq_len}")
    return torch.tensor(rows, dtype=torch.long)  # [N, L]


def teacher_rows(model, tokenizer, data_cfg, samples_dir: Path, *, exclude: Sequence[str] = ()) -> torch.Tensor:
    """LongTensor `[N, data.seq_len]`: the `teacher` source for a DataConfig, samples stored in `samples_dir`."""
    from .loading import load_texts

    settings = data_cfg.teacher_samples
    prompts = load_texts(settings.prompts, data_cfg.text_field)
    instructions = load_texts(settings.instructions, data_cfg.text_field) if settings.instructions else None
    samples = generate_teacher_samples(model, tokenizer, settings, samples_dir, prompts_texts=prompts,
                                       instructions=instructions, exclude=exclude)
    return pack_samples(samples, data_cfg.seq_len, tokenizer.eos_token_id)
