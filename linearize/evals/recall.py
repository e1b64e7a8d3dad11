"""In-context recall, two ways: an evaluation on a format no training source uses, and the recall loss
a layer selector scores layers by.

`badge_recall`: a short guest list of people with 4-digit badge numbers, text about the evening, then a
question naming one guest; the answer is that guest's number, copied from the list. Its wording, key kind (person names) and value kind
(digits only) appear neither in the `recall` training source (letter-digit codes and word spans under
shelf/extension/glossary/notebook frames) nor in the passkey template, so a score measures transfer of
retrieval, not memory of a format. Scored on the greedy answer: exact match of all its tokens, and the
share of the number's tokens right in place (per-token: partial credit, as passkey's digit accuracy).

`recall_loss` / `recall_scores`: the mean cross-entropy of the answer tokens of held-out recall sequences
(`linearize.data.recall.recall_examples`), and how much it rises when only one layer runs its student."""
from __future__ import annotations

import random
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..surgery import students_only_in, wrapped_attentions
from .agreement import same_length_batches

HEADER = "Guest list for the harbour dinner, with the badge number of every guest."
# Between the list and the question, repeated and cut to make a prompt exactly its length.
PAD_TEXT = (" Dinner is served at eight in the long hall by the water. Guests arrive by ferry from the old"
            " pier, and the band plays until midnight.")
LINE = "\n{name} wears badge number{number}."  # `{number}` marks where the number's ids are spliced in
QUESTION = "\n\nAt the gate, the guard reads one line of the list aloud: {name} wears badge number"
FIRST_NAMES = ("Ada", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Imani", "Jonas", "Kira",
               "Luca", "Maya", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Stefan", "Tara", "Umar", "Vera",
               "Wendell", "Xenia", "Yusuf", "Zoe", "Anton", "Beatriz", "Cyril", "Delia", "Emil", "Fiona")
LAST_NAMES = ("Abbott", "Barros", "Castillo", "Dalton", "Eriksen", "Fischer", "Garza", "Holm", "Ibarra",
              "Jensen", "Kowalski", "Laurent", "Mendez", "Nakamura", "Ortega", "Petrov", "Quist", "Ramos",
              "Sato", "Tanaka", "Ueda", "Varga", "Weber", "Yilmaz", "Zeller", "Brandt", "Costa", "Dubois")
NUMBERS = (1000, 10000)  # 4-digit badge numbers: guessing one is hopeless
GUESTS = 6  # listed guests: one asked for, the others distractors a lookup must tell apart


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _has_digit(tokenizer, token: int) -> bool:
    return any(ch.isdigit() for ch in tokenizer.decode([token]))


def badge_prompt(tokenizer, length: int, rng: random.Random, guests: int = GUESTS) -> tuple[torch.Tensor, list[int]]:
    """(prompt `[length]`, answer ids): special prefix + header + `guests` guest lines + padding text +
    question naming one of them. The padding takes up what is left, so every prompt is exactly `length`
    and the list sits about `length` tokens before the question."""
    if guests < 2:
        raise ValueError(f"badge recall: needs at least 2 guests (one is asked for), got {guests}")
    prefix, header = tokenizer("", add_special_tokens=True)["input_ids"], _ids(tokenizer, HEADER)
    names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], guests)
    lines, answers = [], []
    for name in names:
        number = _ids(tokenizer, f" {rng.randrange(*NUMBERS)}")
        before, _, after = LINE.format(name=name, number="\0").partition("\0")
        lines += _ids(tokenizer, before) + number + _ids(tokenizer, after)
        answers.append(number)
    queried = rng.randrange(guests)
    question = _ids(tokenizer, QUESTION.format(name=names[queried]))
    spare = length - len(prefix) - len(header) - len(lines) - len(question)
    if spare < 0:
        raise ValueError(f"badge recall: a prompt of {length} tokens cannot hold {guests} guests and the question "
                         f"({length - spare} tokens)")
    unit = _ids(tokenizer, PAD_TEXT)
    padding = (unit * (spare // len(unit) + 1))[:spare]
    return torch.tensor(prefix + header + lines + padding + question), answers[queried]


@torch.no_grad()
def badge_recall(model, tokenizer, lengths: Sequence[int], trials: int = 36, seed: int = 0,
                 batch_size: int = 8, guests: int = GUESTS) -> dict:
    """Recall at each prompt length (e.g. 1x, 2x, 4x the training length), `trials` random lists each,
    greedy decoding with the KV cache: `exact[i]` share of answers whose tokens all equal the number's,
    `per_token[i]` share of the number's digit-bearing tokens right in place (a leading space token
    common to every answer is not credited)."""
    if trials < 1:
        raise ValueError(f"badge recall: trials must be >= 1, got {trials}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(f"badge-recall-{seed}")
    exact, per_token, examples = [], [], []
    with tqdm(total=len(lengths) * trials, desc="badge recall", leave=False) as bar:
        for length in lengths:
            cases = [badge_prompt(tokenizer, length, rng, guests) for _ in range(trials)]
            width = max(len(answer) for _, answer in cases)
            hits, credit = 0, 0.0
            for start in range(0, trials, batch_size):
                batch = cases[start:start + batch_size]
                ids = torch.stack([prompt for prompt, _ in batch]).to(device)  # [N, L]
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=width,
                                     do_sample=False, pad_token_id=pad)
                if start == 0:  # the example: the first case's answer beside the first case's generation
                    examples.append({"length": length, "answer": tokenizer.decode(cases[0][1]),
                                     "generated": tokenizer.decode(out[0, length:], skip_special_tokens=True)})
                for row, (_, answer) in zip(out[:, length:].tolist(), batch):
                    got = row[:len(answer)]
                    hits += got == answer
                    scored = [j for j, t in enumerate(answer) if _has_digit(tokenizer, t)]
                    credit += sum(j < len(got) and got[j] == answer[j] for j in scored) / len(scored)
                bar.update(len(batch))
            exact.append(hits / trials)
            per_token.append(credit / trials)
    return {"lengths": list(lengths), "trials": trials, "exact": exact, "per_token": per_token,
            "mean_exact": sum(exact) / len(exact), "mean_per_token": sum(per_token) / len(per_token),
            "examples": examples}


@torch.no_grad()
def recall_loss(model, examples: Sequence[tuple[torch.Tensor, torch.Tensor]], batch_size: int = 8,
                progress: Optional[tqdm] = None) -> float:
    """Mean cross-entropy of the answer tokens over all `examples` (input_ids `[T]`, answer_positions `[A]`:
    `input_ids[answer_positions]` are the copied tokens, predicted by the logits one position earlier),
    each answer token weighted equally. Equal-length examples run as one batch, without a cache."""
    if not examples:
        raise ValueError("recall_loss: no examples")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in same_length_batches([ids for ids, _ in examples], batch_size):
        ids = torch.stack([examples[i][0] for i in batch]).to(device)  # [N, T]
        logits = model(input_ids=ids, use_cache=False).logits.float()  # [N, T, V]
        for row, i in enumerate(batch):
            positions = torch.as_tensor(examples[i][1], device=device).long()  # [A]
            if positions.numel() == 0 or positions.min() < 1:
                raise ValueError("recall_loss: answer positions must be >= 1 (position 0 has no prediction)")
            predicted = logits[row, positions - 1]  # [A, V]
            total += F.cross_entropy(predicted, ids[row, positions], reduction="sum").item()
            count += positions.numel()
        if progress is not None:
            progress.update(len(batch))
    return total / count


def recall_scores(model, examples: Sequence[tuple[torch.Tensor, torch.Tensor]], candidates: Iterable[int],
                  batch_size: int = 8) -> dict[int, float]:
    """{layer: rise of `recall_loss` when only that converted layer runs its student, every other layer its
    softmax attention}: how much in-context recall the model loses when that layer is converted. The
    largest score marks the layer to keep softmax. Every candidate must be a converted layer."""
    candidates = list(candidates)
    converted = {a.layer_idx for a in wrapped_attentions(model)}
    missing = [layer for layer in candidates if layer not in converted]
    if missing:
        raise ValueError(f"recall_scores: layers {missing} are not converted; converted: {sorted(converted)}")
    with tqdm(total=(len(candidates) + 1) * len(examples), desc="recall scores", leave=False) as bar:
        with students_only_in(model, []):
            base = recall_loss(model, examples, batch_size, bar)
        scores = {}
        for layer in candidates:
            with students_only_in(model, [layer]):
                scores[layer] = recall_loss(model, examples, batch_size, bar) - base
    return scores
