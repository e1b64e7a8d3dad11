"""Closeness to the teacher and its behaviours, for one converted model (`evaluate.behaviour.enabled`, so
the evaluate stage, `linearize eval` and `linearize compare` all measure the same things;
docs/behaviour.md):

- per kind of text (`TEXT_KINDS`: the run's news eval text, Python source, the Python manual): KL to the
  teacher, top-1 agreement and the perplexity ratio;
- retrieval at 1x, 2x and 4x the training length: the passkey, and badge recall (a second format that
  neither the passkey nor the `recall` training source uses), student and teacher;
- agreement with the teacher on fixed instructions (through the chat template when there is one), short
  and after documents of several windows, unrelated and related to the question.

The teacher is the same model through `adapters.teacher_view` (adapter off, softmax attention)."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from linearize.adapters import teacher_view
from linearize.evals import passkey, recall
from linearize.evals.agreement import teacher_agreement
from linearize.evals.passkey import passkey_retrieval
from linearize.evals.recall import badge_recall
from linearize.evals.teacher_cache import TeacherCache, source_digest, tokenizer_digest
from linearize.train.evaluation import compare_on_tokens

# Kind of text -> data source; None: the run's own data.eval (news in the presets).
TEXT_KINDS: dict[str, Optional[str]] = {"news": None, "code": "python-code", "manual": "python-manual"}
RETRIEVAL_FACTORS = (1, 2, 4)  # retrieval prompt lengths in training lengths: seen, and beyond
# Needle depths of the passkey (0 puts it first, 1 right before the question) and their names in tables: a
# student's sink tokens can keep the start and its window the end; only the middle needs the whole prompt.
PASSKEY_DEPTHS = {0.0: "start", 0.5: "middle", 1.0: "end"}
DEFAULT_WINDOW = 64  # agreement documents are measured in windows; a mechanism without one uses this


def _texts(cfg, model, tokenizer, settings, held_out: Optional[dict]) -> dict:
    """{kind: teacher_ppl, student_ppl, ppl_ratio, kl, top1_agreement} on `text_sequences` rows each.
    `held_out`: the evaluation's own measurement of the run's eval text, reused for that kind when it
    covers the same rows (no second teacher and student pass over them)."""
    from .evaluate import eval_tokens

    texts = {}
    for kind in settings.texts:
        source = TEXT_KINDS[kind] or cfg.data.eval
        n = settings.text_sequences
        if TEXT_KINDS[kind] is None and held_out is not None and held_out.get("sequences") == n:
            texts[kind] = {**held_out, "ppl_ratio": held_out["student_ppl"] / held_out["teacher_ppl"]}
            continue
        kind_cfg = replace(cfg, data=replace(cfg.data, eval=source, max_eval_sequences=n),
                           evaluate=replace(cfg.evaluate, max_sequences=n))
        metrics = compare_on_tokens(model, eval_tokens(kind_cfg, tokenizer), teacher_view=teacher_view)
        metrics["ppl_ratio"] = metrics["student_ppl"] / metrics["teacher_ppl"]
        texts[kind] = metrics
    return texts


def retrieval_lengths(cfg) -> list[int]:
    settings = cfg.evaluate.behaviour
    return list(settings.retrieval_lengths) or [f * cfg.data.seq_len for f in RETRIEVAL_FACTORS]


def _retrieval(cfg, model, tokenizer, settings, cache: Optional[TeacherCache] = None) -> dict:
    """Passkey (`retrieval_prompts` per length, spread over the depths) and badge recall, student and
    teacher, at each retrieval length; the teacher's from `cache` when it holds them."""
    lengths = retrieval_lengths(cfg)
    per_depth = max(1, round(settings.retrieval_prompts / len(PASSKEY_DEPTHS)))
    # What the teacher's results depend on besides its weights (the cache key; the prompts are built inside
    # the measurement, so their format is keyed by its module's source and the tokenizer).
    parts = {"lengths": lengths, "depths": list(PASSKEY_DEPTHS), "per_depth": per_depth,
             "prompts": settings.retrieval_prompts, "seed": cfg.seed,
             "tokenizer": tokenizer_digest(tokenizer) if cache is not None else None}
    result = {}
    for name, module, measure in (
            ("passkey", passkey, lambda m: passkey_retrieval(m, tokenizer, lengths, list(PASSKEY_DEPTHS), per_depth,
                                                             seed=cfg.seed)),
            ("badge", recall, lambda m: badge_recall(m, tokenizer, lengths, settings.retrieval_prompts, seed=cfg.seed))):
        student = measure(model)

        def measure_teacher(measure=measure):
            with teacher_view(model):
                return measure(model)

        teacher = (measure_teacher() if cache is None else
                   cache.results(model, name, {**parts, "source": source_digest(module)}, measure_teacher))
        result[name] = {"student": student, "teacher": teacher}
    return result


def behaviour_metrics(cfg, model, tokenizer, held_out: Optional[dict] = None) -> dict:
    """eval.json's behaviour keys for `model` (a converted model, possibly with its LoRA adapter):
    `texts`, `retrieval`, `teacher_agreement`. `held_out`: the evaluation's metrics on the run's eval text
    (`compare_on_tokens` with the teacher), reused for the news kind when they cover the same rows. With
    `evaluate.behaviour.teacher_cache`, the teacher's retrieval results and answers are read from that folder
    when an earlier evaluation of the same teacher stored them, and stored there otherwise."""
    settings = cfg.evaluate.behaviour
    window = getattr(cfg.attention, "window_size", 0) or DEFAULT_WINDOW
    cache = TeacherCache(settings.teacher_cache) if settings.teacher_cache else None
    result = {
        "texts": _texts(cfg, model, tokenizer, settings, held_out),
        "retrieval": _retrieval(cfg, model, tokenizer, settings, cache),
        "teacher_agreement": teacher_agreement(model, tokenizer, window=window, n=settings.instructions,
                                               multipliers=list(settings.context_windows), related=settings.related,
                                               seed=cfg.seed, cache=cache),
    }
    if cache is not None:
        waited = f" ({cache.waits} after waiting for another evaluation measuring them)" if cache.waits else ""
        print(f"teacher measurements: {cache.hits} reused from {cache.folder}{waited}, {cache.misses} measured and "
              "stored there", flush=True)
    return result


def summary_lines(behaviour: dict) -> list[str]:
    """The closing summary's behaviour lines: KL per text kind, retrieval at the first length, agreement
    short and after the longest document."""
    lines = []
    texts = behaviour.get("texts") or {}
    if texts:
        lines.append("KL to the teacher: " + ", ".join(f"{kind} {m['kl']:.3f}" for kind, m in texts.items())
                     + "; top-1 agreement: " + ", ".join(f"{kind} {m['top1_agreement']:.3f}" for kind, m in texts.items()))
    passkey = (behaviour.get("retrieval") or {}).get("passkey")
    if passkey:
        student, teacher = passkey["student"], passkey["teacher"]
        cells = ", ".join(f"{length}: {sum(row) / len(row):.2f} (teacher {sum(t) / len(t):.2f})"
                          for length, row, t in zip(student["lengths"], student["accuracy"], teacher["accuracy"]))
        lines.append(f"passkey exact by prompt length: {cells}")
    agreement = behaviour.get("teacher_agreement") or {}
    if agreement:
        longest = max(agreement, key=int)
        lines.append(f"answers equal to the teacher's: {agreement['0']['match_share']:.2f} short, "
                     f"{agreement[longest]['match_share']:.2f} after {longest} tokens of unrelated text")
    return lines
