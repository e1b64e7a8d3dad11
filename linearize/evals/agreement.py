"""Agreement with the teacher on fixed instructions, short and after long documents.

Each instruction (`instructions.EVAL_INSTRUCTIONS`) goes through the tokenizer's chat template when it has
one (plain text otherwise) and both the student and the teacher decode greedily from it (KV cache). Per
prompt: the length of the greedy prefix the two share, whether all `tokens` greedy tokens match, and
KL(teacher || student) at the answer's first position. Measured with no document ("0") and after a
document of at least m × window tokens for each multiplier m, unrelated (corpus text) and related (the
same text with a fact passage the instruction asks about). The teacher is the same model with its adapter
off and softmax attention everywhere (`adapters.teacher_view`) unless a separate teacher model is given.

Prompts of one setting are built at the token level to one common length (the document takes up the
difference), so they batch without padding; converted layers refuse left padding."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import adapters
from ..errors import UserError
from ..losses.distill import kl_per_position
from ..surgery import wrapped_attentions
from .instructions import EVAL_INSTRUCTIONS, pick_instructions, related_case
from .teacher_cache import TeacherCache, tokens_digest

SHORT_TOKENS = 16  # greedy tokens compared without a document
LONG_TOKENS = 32  # and after one
MULTIPLIERS = (2, 4, 16)  # document lengths in windows
UNRELATED_CORPUS = "python-manual"  # a registered corpus; always offline (ships with Python)
DOCUMENT_MARK = "\u0000DOCUMENT\u0000"  # where the document goes in the rendered template; no real text has it
DOCUMENT_STRIDE = 7  # prompt i starts at corpus document 7·i, so neighbouring prompts read different text
FACT_DEPTHS = (0.25, 0.5, 0.75)  # where the related facts sit in their document, cycled over prompts


@dataclass(frozen=True)
class Answers:
    """Greedy answers to one batch of prompts: tokens `[N, n]` (pad after an end of sequence) and the
    logits at the answer's first position `[N, V]` (fp32, CPU)."""

    tokens: torch.Tensor
    first_logits: torch.Tensor


def _encode(tokenizer, text: str, specials: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=specials)["input_ids"]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_parts(tokenizer, instruction: str, with_document: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the document for `instruction` (everything in `before` when there is
    no document). Chat: one user turn holding document + blank line + instruction, then the assistant's
    generation prompt. Plain text: the tokenizer's special prefix, document, blank line, instruction."""
    content = f"{DOCUMENT_MARK}\n\n{instruction}" if with_document else instruction
    if has_chat_template(tokenizer):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
        before, _, after = rendered.partition(DOCUMENT_MARK) if with_document else (rendered, "", "")
        return _encode(tokenizer, before), _encode(tokenizer, after)  # templates carry their own specials
    before, _, after = content.partition(DOCUMENT_MARK) if with_document else (content + "\n", "", "")
    return _encode(tokenizer, before, specials=True), _encode(tokenizer, after + "\n")


class DocumentSource:
    """Token ids of unrelated text: documents of a corpus concatenated from a given start, each document
    tokenized once."""

    def __init__(self, tokenizer, documents: Sequence[str]):
        if not documents:
            raise ValueError("teacher agreement: the document source has no documents")
        self.tokenizer, self.documents, self._ids = tokenizer, list(documents), {}

    def _doc(self, i: int) -> list[int]:
        if i not in self._ids:
            self._ids[i] = _encode(self.tokenizer, self.documents[i] + "\n\n")
        return self._ids[i]

    def take(self, start: int, count: int) -> list[int]:
        ids, i = [], start
        while len(ids) < count:
            ids += self._doc(i % len(self.documents))
            i += 1
            if i - start > len(self.documents) and not ids:
                raise ValueError("teacher agreement: the document source tokenizes to nothing")
        return ids[:count]


def build_prompts(tokenizer, instructions: Sequence[str], doc_tokens: int, related: bool,
                  source: Optional[DocumentSource], seed: int = 0) -> list[torch.Tensor]:
    """One LongTensor per instruction. doc_tokens = 0: the instruction alone (lengths differ). Otherwise
    every prompt has the same length, with a document of at least `doc_tokens` tokens; `related` replaces
    each instruction by a question about facts hidden in its document (`instructions.related_case`)."""
    if doc_tokens == 0:
        return [torch.tensor(prompt_parts(tokenizer, text, False)[0]) for text in instructions]
    cases = [related_case(i, seed) for i in range(len(instructions))] if related else None
    questions = [case.instruction for case in cases] if related else list(instructions)
    parts = [prompt_parts(tokenizer, q, True) for q in questions]
    total = doc_tokens + max(len(before) + len(after) for before, after in parts)
    prompts = []
    for i, (before, after) in enumerate(parts):
        need = total - len(before) - len(after)  # >= doc_tokens: the document pads prompts to one length
        if not related:
            document = source.take(DOCUMENT_STRIDE * i, need)
        else:
            facts = _encode(tokenizer, f"\n\n{cases[i].facts}\n\n")
            if len(facts) > need:
                raise ValueError(f"teacher agreement: a related document of {doc_tokens} tokens cannot hold its "
                                 f"{len(facts)}-token fact passage; use a longer window or multiplier")
            filler = source.take(DOCUMENT_STRIDE * i, need - len(facts))
            cut = round(FACT_DEPTHS[i % len(FACT_DEPTHS)] * len(filler))
            document = filler[:cut] + facts + filler[cut:]
        prompts.append(torch.tensor(before + document + after))
    return prompts


def same_length_batches(prompts: Sequence[torch.Tensor], batch_size: int) -> list[list[int]]:
    """Indices of `prompts` in batches of equal length (no padding), at most `batch_size` each."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    return [group[j:j + batch_size] for group in by_length.values() for j in range(0, len(group), batch_size)]


@torch.no_grad()
def greedy_answers(model, prompts: Sequence[torch.Tensor], tokens: int, pad_token_id: int, batch_size: int = 8,
                   progress: Optional[tqdm] = None) -> Answers:
    """Greedy decoding of `tokens` new tokens from every prompt with the KV cache (`model.generate`)."""
    device = next(model.parameters()).device
    out_tokens = torch.full((len(prompts), tokens), pad_token_id, dtype=torch.long)
    first: list[Optional[torch.Tensor]] = [None] * len(prompts)
    for batch in same_length_batches(prompts, batch_size):
        ids = torch.stack([prompts[i] for i in batch]).to(device)  # [N, L]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, pad_token_id=pad_token_id, return_dict_in_generate=True,
                             output_logits=True)
        new = out.sequences[:, ids.shape[1]:].cpu()  # [N, ≤ tokens]: shorter when every row ended early
        out_tokens[batch, :new.shape[1]] = new
        for row, i in enumerate(batch):
            first[i] = out.logits[0][row].float().cpu()  # [V]: the logits that chose the first answer token
        if progress is not None:
            progress.update(len(batch))
    return Answers(out_tokens, torch.stack(first))


def agreement_scores(student: Answers, teacher: Answers) -> dict:
    """match_share: share of prompts whose every compared token equals the teacher's; mean_prefix: mean
    length of the shared greedy prefix (tokens after an end of sequence are pad in both, so two answers
    that end together match in full); first_kl: mean KL(teacher || student) at the answer's first position."""
    if student.tokens.shape != teacher.tokens.shape:
        raise ValueError(f"agreement: answer shapes differ: {tuple(student.tokens.shape)} vs "
                         f"{tuple(teacher.tokens.shape)}")
    n, width = student.tokens.shape
    differs = student.tokens != teacher.tokens  # [N, n]
    # the first differing position, or n when none differs
    prefix = torch.where(differs.any(-1), differs.int().argmax(-1), torch.full((n,), width))
    first_kl = kl_per_position(student.first_logits[None], teacher.first_logits[None])[0]  # [N]
    return {"match_share": (prefix == width).float().mean().item(), "mean_prefix": prefix.float().mean().item(),
            "first_kl": first_kl.mean().item(), "n": n, "tokens": width}


def _reference_answers(model, prompts, tokens: int, pad: int, batch_size: int, bar: tqdm,
                       cache: Optional[TeacherCache]) -> Answers:
    """The teacher's greedy answers to `prompts`, from `cache` when it holds them (keyed by the prompt ids)."""
    if cache is None:
        return greedy_answers(model, prompts, tokens, pad, batch_size, bar)
    parts = {"prompts": tokens_digest(prompts), "tokens": tokens, "pad": pad, "batch_size": batch_size}
    found = cache.tensors(model, "agreement", parts, lambda: vars(greedy_answers(model, prompts, tokens, pad, batch_size)))
    bar.update(len(prompts))
    return Answers(found["tokens"], found["first_logits"])


def _teacher(model, teacher) -> tuple[object, Callable[[], ContextManager]]:
    """The model that answers as the teacher, and a factory of the context it answers in."""
    if teacher is not None:
        return teacher, contextlib.nullcontext
    if not adapters.is_wrapped(model) and not any(True for _ in wrapped_attentions(model)):
        raise UserError("teacher agreement: the model has no converted layers or adapter to switch off, so it "
                        "cannot act as its own teacher; give the teacher model")
    return model, lambda: adapters.teacher_view(model)


def teacher_agreement(model, tokenizer, *, window: int, multipliers: Sequence[int] = MULTIPLIERS,
                      instructions: Sequence[str] = EVAL_INSTRUCTIONS, n: Optional[int] = None,
                      short_tokens: int = SHORT_TOKENS, long_tokens: int = LONG_TOKENS, related: bool = True,
                      documents: Optional[Sequence[str]] = None, teacher=None, batch_size: int = 8,
                      seed: int = 0, cache: Optional[TeacherCache] = None) -> dict:
    """eval.json's `teacher_agreement`: {context tokens: scores} with "0" (no document, `short_tokens`
    compared) and str(m · window) for each multiplier (unrelated document, `long_tokens` compared; with
    `related`, a "related" entry of the same scores beside them). Scores: `agreement_scores` and one
    example answer pair. `documents`: the unrelated text (default: the registered corpus
    UNRELATED_CORPUS); `teacher`: a separate teacher model (default: `model` itself in teacher view);
    `cache`: the teacher's answers are read from it when it holds them for these exact prompts."""
    if window < 1 or any(m < 1 for m in multipliers):
        raise ValueError(f"teacher agreement: window and multipliers must be >= 1, got {window}, {list(multipliers)}")
    chosen = pick_instructions(n, instructions)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if documents is None and multipliers:
        from ..data import load_corpus

        documents = load_corpus(UNRELATED_CORPUS)
    source = DocumentSource(tokenizer, documents) if multipliers else None
    settings = [("0", 0, False, short_tokens)]
    for m in multipliers:
        kinds = (False, True) if related else (False,)
        settings += [(str(m * window), m * window, kind, long_tokens) for kind in kinds]
    prompts = {(key, kind): build_prompts(tokenizer, chosen, doc, kind, source, seed) for key, doc, kind, _ in settings}
    teacher_model, teacher_view = _teacher(model, teacher)
    results: dict = {}
    with tqdm(total=2 * sum(map(len, prompts.values())), desc="teacher agreement", leave=False) as bar:
        for key, _, kind, tokens in settings:
            batch = prompts[(key, kind)]
            student = greedy_answers(model, batch, tokens, pad, batch_size, bar)
            with teacher_view():
                reference = _reference_answers(teacher_model, batch, tokens, pad, batch_size, bar, cache)
            scores = agreement_scores(student, reference)
            scores["example"] = {"teacher": tokenizer.decode(reference.tokens[0], skip_special_tokens=True),
                                 "student": tokenizer.decode(student.tokens[0], skip_special_tokens=True)}
            if kind:
                results[key]["related"] = scores
            else:
                results[key] = scores
    return results
