"""The `linearize` command line (also `python -m linearize`).

    linearize run [CONFIG] [key=value ...] [--force | --accept-changes]      every stage in `stages`
    linearize stage NAME CONFIG [key=value ...] [--force | --accept-changes]  one stage
    linearize eval TARGET [--out DIR] [key=value ...]      evaluate a run, an export, or a config
    linearize export RUN_DIR OUT_DIR [--overwrite] [--format F]  write a HF model folder (F: linearize, qwen3_5)
    linearize generate MODEL_DIR "prompt"                   load an export and generate
    linearize config CONFIG [key=value ...]                print the resolved config
    linearize check CONFIG [key=value ...]                 load model tokenizer and data, report sizes
    linearize compare CONFIG... [--out DIR] [key=value ...]   configs at one budget: compare.md/.json/.png

A user mistake (`linearize.UserError`, a missing file) or an expected fault (disk full, no permission)
prints one line `linearize: error: ...` on stderr and exits with status 2; `--traceback` shows the full
trace instead. Ctrl-C exits with status 130, SIGTERM with 143 (one line each, the same cleanup).
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import signal
import sys
import threading
from pathlib import Path

from linearize import UserError
from linearize.errors import one_line

from .config_loader import CONFIGS_DIR, config_to_dict, load_config
from .registry import STAGES

PROG = "linearize"
DEFAULT_CONFIG = CONFIGS_DIR / "demo.yaml"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell convention
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
# OS faults a user fixes outside linearize (free space, permissions, a read-only mount): one line, no trace.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
DEFAULT_NEW_TOKENS = 48

OVERRIDES_HELP = ("config overrides as dotted key=value, applied after the yaml files, e.g. "
                  "data.seq_len=256 attention.window_size=32 stages=[evaluate] (see docs/configs.md)")
FORCE_HELP = ("re-run the stages that run from scratch: discard their previous outputs and checkpoints, and "
              "the later stages built on them (default: skip finished stages, resume interrupted ones)")
ACCEPT_HELP = ("continue a stage whose config or training data changed from its last checkpoint, with the "
               "new values (default: refuse, naming the changed keys)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds exactly as Ctrl-C does (temp files removed, the
    run lock released, checkpoints already written kept)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _int_list(text: str) -> list[int]:
    """`2,4,16` → [2, 4, 16]; argparse turns the error into one line and exit 2."""
    try:
        return [int(item) for item in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None


def _comma_list(text: str) -> list[str]:
    """`--texts code,manual` (an empty string: none); one option value, so it cannot take the configs."""
    return [item.strip() for item in text.split(",") if item.strip()]


# ---------------------------------------------------------------------------------------------- handlers


def _split_config_arg(config: str | None, overrides: list[str]) -> tuple[Path, list[str]]:
    """`run` accepts overrides without a config: a first argument with '=' that is not a file is one."""
    if config is None or ("=" in config and not Path(config).is_file()):
        return DEFAULT_CONFIG, ([config] if config else []) + overrides
    return Path(config), overrides


def cmd_run(args: argparse.Namespace) -> int:
    path, overrides = _split_config_arg(args.config, args.overrides)
    cfg = load_config(path, overrides)
    from .pipeline import run_stages

    run_stages(cfg, list(cfg.stages), force=args.force, accept_changes=args.accept_changes)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from .pipeline import run_stages

    run_stages(cfg, [args.name], force=args.force, accept_changes=args.accept_changes)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if not Path(args.target).exists():
        raise UserError(f"eval target not found: {args.target}")
    from .evaluate import evaluate_target

    elsewhere = {"out_dir": Path(args.out)} if args.out else {}  # default: under the target
    results = evaluate_target(args.target, list(args.overrides), **elsewhere)
    print(json.dumps(results, indent=2, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if not Path(args.run_dir).is_dir():
        raise UserError(f"run directory not found: {args.run_dir}")
    from .export import export_run

    export_run(args.run_dir, args.out_dir, overwrite=args.overwrite, format=args.format)
    print(f"exported {args.run_dir} to {args.out_dir}")
    return 0


def _prompt_ids(tokenizer, prompt: str, chat: bool):
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat needs a chat template, and this model's tokenizer has none; "
                            "drop --chat to continue the prompt as plain text")
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return tokenizer(prompt, return_tensors="pt")


def _check_generate_args(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise UserError("PROMPT is empty: give some text to continue")
    if args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")


def cmd_generate(args: argparse.Namespace) -> int:
    _check_generate_args(args)
    if not Path(args.model_dir).is_dir():
        raise UserError(f"model directory not found: {args.model_dir}")
    import torch
    from transformers import TextStreamer

    from linearize.models import load_export

    model, tokenizer = load_export(args.model_dir)
    inputs = _prompt_ids(tokenizer, args.prompt, args.chat)
    if inputs["input_ids"].shape[-1] == 0:  # e.g. only characters the tokenizer drops
        raise UserError(f"PROMPT {args.prompt!r} tokenizes to no tokens")
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    print(args.prompt, end="" if not args.chat else "\n", flush=True)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                       streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **sampling)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validates everything a run reads before it starts: config, model location, tokenizer, data."""
    cfg = load_config(args.config, args.overrides)
    from linearize.data import build_datasets, mix_entries
    from linearize.models.teacher import load_model_tokenizer, resolve_model_path

    location = resolve_model_path(cfg.model.path)
    tokenizer = load_model_tokenizer(cfg.model)
    train, evaluation = build_datasets(cfg.data, tokenizer, cfg.seed)
    attention = f"{cfg.attention.mechanism} + {cfg.attention.feature_map}"
    print(f"config  {args.config}: ok ({attention}, stages {list(cfg.stages)})")
    print(f"model   {cfg.model.path} -> {location}")
    # data.mix replaces data.train: name what the rows were drawn from
    sources = (cfg.data.train if cfg.data.mix is None
               else "mix of " + " + ".join(f"{source} ({weight:g})" for source, weight in mix_entries(cfg.data.mix)))
    print(f"train   {sources}: {train.shape[0]} sequences x {train.shape[1]} tokens")
    print(f"eval    {cfg.data.eval or 'held out'}: {evaluation.shape[0]} sequences x {evaluation.shape[1]} tokens")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    configs = [item for item in args.items if "=" not in item or Path(item).is_file()]
    overrides = [item for item in args.items if item not in configs] + list(args.overrides)
    if not configs:
        raise UserError("compare needs at least one CONFIG (a yaml file)")
    from .compare import CompareOptions, compare

    compare(CompareOptions(
        configs=tuple(Path(c) for c in configs), out_dir=Path(args.out), transfer_tokens=args.transfer_tokens,
        lora_tokens=args.lora_tokens, overrides=tuple(overrides), eval=args.eval, eval_sequences=args.eval_sequences,
        text_sequences=args.text_sequences, stage_eval_sequences=args.stage_eval_sequences, texts=tuple(args.texts),
        baselines=args.baselines, state_context=args.state_context, retrieval_prompts=args.retrieval_prompts,
        instructions=args.instructions, context_windows=tuple(args.context_windows)))
    return 0


# ---------------------------------------------------------------------------------------------- parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def _add_run(sub, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "run", parents=[common], help="run every stage listed in the config",
        description="Run the stages listed in the config's `stages` key, in order (attention_transfer, "
                    "lora_recovery, evaluate, export). A stage that finished is skipped; an interrupted "
                    "one resumes from its last checkpoint; --force re-runs them from scratch. Outputs go to "
                    "<output_dir>/<run_name>/.")
    parser.add_argument("config", nargs="?", metavar="CONFIG",
                        help=f"yaml config (default: {DEFAULT_CONFIG.relative_to(CONFIGS_DIR.parent)})")
    _add_overrides(parser)
    _add_restart_flags(parser)
    parser.set_defaults(handler=cmd_run)


def _add_restart_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--force", action="store_true", help=FORCE_HELP)
    group.add_argument("--accept-changes", action="store_true", help=ACCEPT_HELP)


def _add_stage(sub, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "stage", parents=[common], help="run one stage",
        description="Run one stage of the config's pipeline. Stages read what earlier stages wrote in the "
                    "run directory (lora_recovery starts from the attention_transfer result).")
    parser.add_argument("name", choices=list(STAGES), metavar="NAME", help=f"one of: {', '.join(STAGES)}")
    parser.add_argument("config", metavar="CONFIG", help="yaml config")
    _add_overrides(parser)
    _add_restart_flags(parser)
    parser.set_defaults(handler=cmd_stage)


def _add_eval(sub, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "eval", parents=[common], help="evaluate a run, an export, or a config's teacher",
        description="Evaluate TARGET on the config's eval data (perplexity of student and teacher, "
                    "a greedy sample) and print the results as JSON.")
    parser.add_argument("target", metavar="TARGET", help="a run directory, an exported model directory, or a yaml config")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="write eval.json and the evaluation's tables to DIR instead of under TARGET (the run is "
                             "then only read, so a read-only run can be evaluated)")
    _add_overrides(parser)
    parser.set_defaults(handler=cmd_eval)


def _add_export(sub, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "export", parents=[common], help="export a run as a self-describing Hugging Face model folder",
        description="Write the run's final student (LoRA merged unless export.merge_lora=false) as a "
                    "Hugging Face model folder that `linearize generate` and "
                    "`linearize.models.load_export` load without the original config.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (<output_dir>/<run_name>)")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="folder to write (created; an earlier export there is replaced)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR even if it holds something other than an export (never the run "
                             "itself, the working directory, or a folder containing them)")
    parser.add_argument("--format", default=None, metavar="FORMAT",
                        help="linearize (bundled modeling code, trust_remote_code) or a serving family: qwen3_5 "
                             "(a plain Qwen3_5ForCausalLM checkpoint of a native-form gated_delta run); "
                             "default: the run's export.format")
    parser.set_defaults(handler=cmd_export)


def _add_generate(sub, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "generate", parents=[common], help="generate text with an exported model",
        description="Load an exported model and continue PROMPT, streaming tokens as they come "
                    "(greedy unless --temperature > 0).")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="an exported model folder (linearize export)")
    parser.add_argument("prompt", metavar="PROMPT", help="text to continue (quote it)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS, metavar="N",
                        help=f"tokens to generate (default: {DEFAULT_NEW_TOKENS})")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sampling temperature; 0 = greedy (default: 0)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap PROMPT as a user message with the tokenizer's chat template")
    parser.set_defaults(handler=cmd_generate)


def _add_config(sub, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "config", parents=[common], help="print the resolved config",
        description="Load CONFIG with its includes and overrides, validate it, and print the full "
                    "resolved yaml (every key, defaults included).")
    parser.add_argument("config", metavar="CONFIG", help="yaml config")
    _add_overrides(parser)
    parser.set_defaults(handler=cmd_config)


def _add_check(sub, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "check", parents=[common], help="check a config's model and data before a long run",
        description="Validate CONFIG, locate the model (converting an embedded or gguf model once), load "
                    "the tokenizer, and tokenize and pack the train and eval data; print their sizes.")
    parser.add_argument("config", metavar="CONFIG", help="yaml config")
    _add_overrides(parser)
    parser.set_defaults(handler=cmd_check)


def _add_compare(sub, common: argparse.ArgumentParser) -> None:
    from .compare import CompareOptions, STATE_CONTEXT, TEXT_KINDS

    defaults = CompareOptions(configs=(), out_dir=Path())
    parser = sub.add_parser(
        "compare", parents=[common], help="run several configs at one token budget and compare them",
        description="Run each CONFIG through the pipeline as <DIR>/<config stem>/ at the same token budget "
                    "(one sequence per step; finished runs are skipped, interrupted ones resume), evaluate every "
                    "run on the same held-out tokens, on other kinds of text and for its behaviour (retrieval, agreement "
                    "with the teacher short and after long context), and write compare.md, compare.json, compare.png "
                    "(KL against decode-state memory) and compare_agreement.png (agreement against context) to DIR.")
    parser.add_argument("items", nargs="+", metavar="CONFIG", help="yaml configs (key=value overrides may follow)")
    parser.add_argument("--transfer-tokens", type=int, default=defaults.transfer_tokens, metavar="N",
                        help=f"attention-transfer tokens per run (default: {defaults.transfer_tokens})")
    parser.add_argument("--lora-tokens", type=int, default=defaults.lora_tokens, metavar="M",
                        help=f"LoRA tokens per run (default: {defaults.lora_tokens})")
    parser.add_argument("--out", default="checkpoints/compare", metavar="DIR",
                        help="folder of the runs and the results (default: checkpoints/compare)")
    parser.add_argument("--eval", metavar="SPEC", help="held-out text for every run (default: the first config's data.eval)")
    parser.add_argument("--eval-sequences", type=int, default=defaults.eval_sequences, metavar="N",
                        help=f"held-out sequences (default: {defaults.eval_sequences})")
    parser.add_argument("--texts", type=_comma_list, default=list(TEXT_KINDS), metavar="KIND[,KIND...]",
                        help=f"kinds of text to evaluate on (news: the held-out text), comma-separated, of: {', '.join(TEXT_KINDS)} "
                             "(default: all; '' for none)")
    parser.add_argument("--text-sequences", type=int, default=defaults.text_sequences, metavar="N",
                        help=f"sequences of each other kind of text (default: {defaults.text_sequences})")
    parser.add_argument("--retrieval-prompts", type=int, default=defaults.retrieval_prompts, metavar="N",
                        help=f"passkey and badge prompts per length (default: {defaults.retrieval_prompts})")
    parser.add_argument("--instructions", type=int, default=defaults.instructions, metavar="N",
                        help=f"fixed instructions for teacher agreement (default: {defaults.instructions})")
    parser.add_argument("--context-windows", type=_int_list, metavar="M[,M...]", default=list(defaults.context_windows),
                        help="documents before the instructions, in windows (default: "
                             f"{','.join(map(str, defaults.context_windows))})")
    parser.add_argument("--stage-eval-sequences", type=int, default=defaults.stage_eval_sequences, metavar="N",
                        help=f"held-out sequences of each training stage's own final eval (default: "
                             f"{defaults.stage_eval_sequences})")
    parser.add_argument("--state-context", type=int, default=STATE_CONTEXT, metavar="N",
                        help=f"prefill length at which decode-state bytes are measured (default: {STATE_CONTEXT})")
    parser.add_argument("--baselines", action="store_true",
                        help="add the window-only and no-transfer baselines (configs/baseline_*.yaml)")
    parser.set_defaults(handler=cmd_compare, overrides=[])


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand accepts too (SUPPRESS keeps a subcommand from resetting the global value)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of user errors (for bug reports)")
    _add_local_rank(common)
    return common


def _add_local_rank(parser: argparse.ArgumentParser) -> None:
    """The `deepspeed` launcher passes --local_rank=N (before the subcommand); it is accepted and ignored,
    the rank comes from the LOCAL_RANK variable the launcher also sets."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


SUBCOMMANDS = (_add_run, _add_stage, _add_eval, _add_export, _add_generate, _add_config, _add_check, _add_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a softmax-attention decoder LLM into a linear / hybrid attention model: "
                    "attention transfer, LoRA recovery, evaluation, export. Configs: docs/configs.md.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of user errors (for bug reports)")
    _add_local_rank(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options()
    for add in SUBCOMMANDS:
        add(sub, common)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like `parse_args`, but key=value overrides may also follow options (`run cfg.yaml --force seed=1`),
    which argparse alone rejects once an option has ended the positionals."""
    args, extra = parser.parse_known_args(argv)
    late_overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    if hasattr(args, "items"):  # `compare a.yaml --texts code b.yaml`: configs may follow options too
        late_items = [item for item in extra if item not in late_overrides and not item.startswith("-")]
        args.items = list(args.items) + late_items
        extra = [item for item in extra if item not in late_items]
    unknown = [item for item in extra if item not in late_overrides]
    if unknown or (late_overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late_overrides:
        args.overrides = list(args.overrides) + late_overrides
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `linearize` script; returns the process exit status."""
    args = parse_args(build_parser(), argv)
    # Python can set handlers in the main thread only (an embedding caller may run us elsewhere).
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        return args.handler(args)
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM); finished checkpoints and stages are kept, `linearize run` resumes",
              file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if args.traceback:
            raise
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        if args.traceback or exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{PROG}: error: {exc.strerror or exc}{where}; files finished before this point "
              "(checkpoints, earlier stages) are intact", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
