"""Which converted layers stop a student finding a passkey in the middle of its prompt (a diagnostic).

    python bench/passkey_layers.py checkpoints/behaviour_141k/gated_delta_window_behaviour_none

Loads a finished run's final student (student parameters + LoRA adapter), then measures the passkey with the
needle at one depth (default: the middle, which neither the sink tokens nor the window reach) while only some
converted layers run their student and the others their softmax attention (`students_only_in`):
- every layer converted (the student) and none (the teacher's attention with the student's LoRA);
- each layer converted alone: how much the middle needle's exact share falls when that one layer is linear;
- every layer converted except the K that hurt most alone, for each K in --keep: whether keeping the layers that
  copy exact brings the middle needle back, before any training for that choice;
- with --greedy K: from the full student, the layers restored to softmax one at a time, each step the one whose
  restoration lowers most the cross-entropy of the key's tokens after the question (teacher-forced, on other
  keys than the exact-share prompts), with the exact share after each step. The single-layer scores above can
  miss damage that only adds up over many layers; this asks the complementary question.

This reads the passkey template on purpose: it diagnoses, it chooses nothing. A selector must not be tuned on it
(the `recall` selector scores layers on the `recall` training source instead), so use it to ask whether a choice
of layers can carry retrieval at all, not to pick a recipe's layers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run (its resolved config and stages)")
    parser.add_argument("--length", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default 0.5: the middle)")
    parser.add_argument("--trials", type=int, default=12, help="prompts (default 12)")
    parser.add_argument("--keep", type=int, nargs="*", default=[1, 3, 6, 10], help="K layers kept softmax")
    parser.add_argument("--greedy", type=int, default=0, help="restore K layers greedily (default 0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="JSON of every number (default: RUN/passkey_layers.json)")
    args = parser.parse_args()

    import torch
    from linearize.errors import UserError
    from linearize.files import write_json
    from linearize.evals.passkey import passkey_prompt, passkey_retrieval
    from linearize.evals.recall import recall_loss
    from linearize.surgery import students_only_in, wrapped_attentions
    from stages.config_loader import load_config
    from stages.evaluate import final_student
    from stages.rundir import RunDir

    config = RunDir(args.run_dir).config
    if not config.is_file():
        raise SystemExit(f"error: {config} does not exist (a run directory holds its {config.name})")
    try:
        start = final_student(load_config(config, []), args.run_dir)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    model, tokenizer = start.model.eval(), start.tokenizer
    converted = sorted(a.layer_idx for a in wrapped_attentions(model))

    def exact(layers) -> float:
        with students_only_in(model, layers):  # both measures run under no_grad
            return passkey_retrieval(model, tokenizer, [args.length], [args.depth], trials=args.trials)["accuracy"][0][0]

    out = args.out or args.run_dir / "passkey_layers.json"
    started = time.time()
    result = {"run": str(args.run_dir), "length": args.length, "depth": args.depth, "trials": args.trials,
              "converted": converted, "student": exact(converted), "teacher_attention": exact([])}
    alone = {layer: exact([layer]) for layer in converted}
    result["alone"] = alone
    ranked = sorted(converted, key=lambda layer: (alone[layer], layer))  # most harmful first
    result["kept"] = {}
    for k in args.keep:
        kept = sorted(ranked[:k])
        result["kept"][k] = {"layers": kept, "exact": exact([layer for layer in converted if layer not in kept])}
    if args.greedy:
        import random

        rng = random.Random(1)  # other keys than passkey_retrieval's (seed 0)
        examples = []
        for _ in range(args.trials):
            key = rng.randrange(10_000, 100_000)
            answer = tokenizer(f" {key}", add_special_tokens=False)["input_ids"]
            prompt = passkey_prompt(tokenizer, args.length, args.depth, key)
            examples.append((torch.cat([prompt, torch.tensor(answer)]),  # [L + A]
                             torch.arange(args.length, args.length + len(answer))))

        def answer_loss(layers) -> float:
            with students_only_in(model, layers):  # both measures run under no_grad
                return recall_loss(model, examples)

        kept, steps = [], [{"kept": [], "loss": answer_loss(converted), "exact": result["student"]}]
        for _ in range(args.greedy):
            losses = {c: answer_loss([layer for layer in converted if layer not in kept and layer != c])
                      for c in converted if c not in kept}
            best = min(losses, key=losses.get)
            kept = sorted(kept + [best])
            steps.append({"kept": kept, "loss": losses[best],
                          "exact": exact([layer for layer in converted if layer not in kept])})
            print(f"greedy: kept {kept}: answer cross-entropy {losses[best]:.3f}, exact {steps[-1]['exact']:.2f}",
                  flush=True)
            write_json(out, {**result, "greedy": steps})  # each step kept: a stopped run loses at most one
        result["greedy"] = steps
    result["seconds"] = time.time() - started

    write_json(out, result)  # atomic: a rerun never leaves half a file
    print(f"passkey at {args.length} tokens, needle depth {args.depth}, {args.trials} prompts; {args.run_dir}")
    print(f"| layers converted | exact |\n|---|---|\n| all {len(converted)} (the student) | {result['student']:.2f} |")
    print(f"| none (softmax everywhere, LoRA on) | {result['teacher_attention']:.2f} |")
    for k, kept in result["kept"].items():
        print(f"| all but {k} kept softmax {kept['layers']} | {kept['exact']:.2f} |")
    if args.greedy:
        print("\n| restored to softmax (greedy) | answer cross-entropy | exact |\n|---|---|---|")
        for step in result["greedy"]:
            print(f"| {step['kept'] or 'none'} | {step['loss']:.3f} | {step['exact']:.2f} |")
    print("\nconverted alone (exact share; the rest softmax): "
          + ", ".join(f"{layer}: {alone[layer]:.2f}" for layer in converted))
    print(f"{result['seconds']:.0f} s; {out}")


if __name__ == "__main__":
    main()
