"""Is the linear branch what loses the chat frame past the window? Agreement with the teacher of a finished
LoLCATs-form run when its linear branch is scaled down at evaluation time.

    python bench/linear_branch_scale.py checkpoints/demo --alphas 1 0.5 0.25 0
    python bench/linear_branch_scale.py checkpoints/demo --alphas 1 0 --sinks 32
    python bench/linear_branch_scale.py checkpoints/demo --alphas 1 --half-lives 256 64 16

In every window_linear layer the query features fq are multiplied by alpha (a forward hook on the feature
maps; nothing is written): the linear keys' weights fq·fk scale by alpha against the window's softmax
weights, and alpha 0 leaves the sliding window and its sinks alone. For each alpha: agreement with the
teacher (the same weights in teacher view) on 12 fixed instructions short, and after 256 and 1,024 tokens of
unrelated text (the evaluate stage's prompts), with the first-token KL and one answer, and the news KL
(8 held-out rows of the run's data.eval).

`--half-lives H ...` adds rows at alpha 1 whose linear branch decays instead: a linear key s counts for
query t with weight fq_t·fk_s·2^(−(t−s)/H), as a decayed linear-attention state would weigh it. Computed
without touching the op: fq_t is multiplied by 2^(−t/H) and fk_s by 2^(s/H) (t, s: positions in the
sequence, counted by the hook; fp32 holds 2^(±T/H) for T/H up to ~120, so H ≥ 16 at these lengths).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = (("0", 0, 16), ("256", 256, 32), ("1024", 1024, 32))  # (name, document tokens, greedy tokens compared)


def main(argv=None) -> int:
    from linearize.adapters import teacher_view
    from linearize.data import load_corpus
    from linearize.evals.agreement import (
        UNRELATED_CORPUS, DocumentSource, agreement_scores, build_prompts, greedy_answers,
    )
    from linearize.evals.instructions import EVAL_INSTRUCTIONS, pick_instructions
    from stages.config_loader import load_config
    from linearize.train.evaluation import compare_on_tokens
    from stages.evaluate import eval_tokens, final_student
    from stages.rundir import RunDir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished window_linear run")
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.0])
    parser.add_argument("--half-lives", type=float, nargs="*", default=[],
                        help="also rows whose linear branch decays with this half-life in tokens (alpha 1)")
    parser.add_argument("--sinks", type=int, default=None, help="attention.sink_tokens at evaluation (default: the run's)")
    parser.add_argument("--instructions", type=int, default=12)
    args = parser.parse_args(argv)
    overrides = [f"attention.sink_tokens={args.sinks}"] if args.sinks is not None else []
    cfg = load_config(RunDir(args.run).config, overrides)
    start = final_student(cfg, args.run)
    model, tokenizer = start.model.eval(), start.tokenizer
    maps = [m for name, m in model.named_modules() if name.endswith("feature_maps")]
    if not maps:
        raise SystemExit(f"error: {args.run} has no window_linear layers (no feature maps to scale)")
    chosen = pick_instructions(args.instructions, EVAL_INSTRUCTIONS)
    source = DocumentSource(tokenizer, load_corpus(UNRELATED_CORPUS))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = {name: build_prompts(tokenizer, chosen, doc, False, source, 0) for name, doc, _ in SETTINGS}
    news = eval_tokens(cfg, tokenizer)[:8]  # [8, L]
    alpha, half_life = [1.0], [0.0]  # half-life 0: no decay
    seen: dict[int, int] = {}  # feature-map module -> tokens seen in the current sequence

    def scale_queries(module, inputs, output):
        fq, fk = output  # [B, T, H, F] each
        t = fq.shape[1]
        start = 0 if t > 1 else seen.get(id(module), 0)  # a call of several tokens starts a sequence here
        seen[id(module)] = start + t
        if not half_life[0]:
            return fq * alpha[0], fk
        pos = torch.arange(start, start + t, dtype=torch.float32, device=fq.device)
        decay = torch.exp2(-pos / half_life[0])[None, :, None, None]  # [1, T, 1, 1]
        return fq * (alpha[0] * decay), fk / decay

    rows = []
    with torch.no_grad():
        with teacher_view(model):
            teacher = {name: greedy_answers(model, prompts[name], n, pad, 8) for name, _, n in SETTINGS}
        for m in maps:
            m.register_forward_hook(scale_queries)
        settings = [(a, 0.0) for a in args.alphas] + [(1.0, h) for h in args.half_lives]
        for a, h in settings:
            alpha[0], half_life[0] = a, h
            cells = [f"{a:g}" + (f", half-life {h:g}" if h else ""),
                     f"{compare_on_tokens(model, news, teacher_view=teacher_view)['kl']:.3f}"]
            for name, _, n in SETTINGS:
                student = greedy_answers(model, prompts[name], n, pad, 8)
                scores = agreement_scores(student, teacher[name])
                cells.append(f"{scores['match_share']:.2f} / {scores['mean_prefix']:.1f} / {scores['first_kl']:.2f}")
            answer = tokenizer.decode(student.tokens[1], skip_special_tokens=False)[:60].replace("\n", "\\n")
            cells.append(f"`{answer}`")
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    example = tokenizer.decode(teacher["1024"].tokens[1], skip_special_tokens=False)[:60].replace("\n", "\\n")
    print(f"\nrun {args.run}, sinks {cfg.attention.sink_tokens}, {len(maps)} window_linear layers; teacher's answer "
          f"after 1,024 tokens: `{example}`")
    print("| alpha | news KL | short: match / prefix / first KL | after 256 tokens | after 1,024 tokens | an answer after 1,024 |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
