"""Synthetic passkey retrieval: a random number hidden at a chosen depth of repetitive filler text,
then a question; the score is exact match of the digits in the greedy continuation.

Prompt (token ids, exactly `length` of them): special prefix + filler[:cut] + needle + filler[cut:] +
question, with cut = depth · (filler tokens), so depth 0 puts the needle first and 1 right before the
question.

Beside exact match, `digit_accuracy` gives partial credit: the share of the key's digits that the answer
repeats in their places. Guessing scores about 0.1; it separates students that all score 0 exactly."""
from __future__ import annotations

import random
import re

import torch
from tqdm.auto import tqdm

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5
# Room for the digits when a tokenizer splits them, plus a leading space or punctuation token.
ANSWER_TOKENS = KEY_DIGITS + 3
DIGITS = re.compile(r"\d+")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> torch.Tensor:
    """LongTensor `[length]`: the passkey prompt with the needle at `depth` ∈ [0, 1] of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth}")
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    needle, question = _ids(tokenizer, NEEDLE.format(key=key)), _ids(tokenizer, QUESTION)
    filler_len = length - len(prefix) - len(needle) - len(question)
    if filler_len < 0:
        raise ValueError(f"passkey length {length} is too short: the needle and question alone take "
                         f"{length - filler_len} tokens")
    unit = _ids(tokenizer, FILLER)
    filler = (unit * (filler_len // len(unit) + 1))[:filler_len]
    cut = round(depth * filler_len)
    return torch.tensor(prefix + filler[:cut] + needle + filler[cut:] + question)


def digits_in_place(answer: str, key: str) -> float:
    """Share of `key`'s digits that `answer` has at the same positions (a missing digit counts as wrong)."""
    return sum(a == k for a, k in zip(answer, key)) / len(key)


def _answer(tokenizer, ids: torch.Tensor) -> str:
    found = DIGITS.search(tokenizer.decode(ids, skip_special_tokens=True))
    return found.group(0) if found else ""


@torch.no_grad()
def passkey_retrieval(model, tokenizer, lengths: list[int], depths: list[float], trials: int = 2,
                      seed: int = 0) -> dict:
    """Accuracy per (length, depth): `accuracy[i][j]` for lengths[i], depths[j], over `trials` random
    keys (one batch of equal-length prompts per cell; greedy decoding); `digit_accuracy` the same grid of
    digits in place."""
    if trials < 1:
        raise ValueError(f"passkey trials must be >= 1, got {trials}")
    device = next(model.parameters()).device
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    accuracy, digit_accuracy, examples = [], [], []
    cells = [(length, depth) for length in lengths for depth in depths]
    for length, depth in tqdm(cells, desc="passkey", leave=False):
        keys = [rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS) for _ in range(trials)]
        ids = torch.stack([passkey_prompt(tokenizer, length, depth, key) for key in keys]).to(device)  # [N, L]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                             do_sample=False, pad_token_id=pad)
        answers = [_answer(tokenizer, row[length:]) for row in out]
        hits = sum(answer == str(key) for answer, key in zip(answers, keys))
        accuracy.append(hits / trials)
        digit_accuracy.append(sum(digits_in_place(a, str(k)) for a, k in zip(answers, keys)) / trials)
        examples.append({"length": length, "depth": depth, "key": keys[0], "answer": answers[0]})

    def grid(cells: list[float]) -> list[list[float]]:  # flat cells -> [len(lengths)][len(depths)]
        return [cells[i * len(depths):(i + 1) * len(depths)] for i in range(len(lengths))]

    return {"lengths": list(lengths), "depths": list(depths), "trials": trials, "accuracy": grid(accuracy),
            "mean_accuracy": sum(accuracy) / len(accuracy), "digit_accuracy": grid(digit_accuracy),
            "mean_digit_accuracy": sum(digit_accuracy) / len(digit_accuracy), "examples": examples}
