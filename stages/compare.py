"""`linearize compare`: several configs through the normal pipeline at one token budget, evaluated on the
same held-out tokens, as one table (`compare.md`), every number (`compare.json`) and a plot of quality
against decode-state memory (`compare.png`) under the output directory.

Each config runs as `<out>/<config stem>/` with overrides that set the budget: `transfer_tokens` of
attention transfer and `lora_tokens` of LoRA at the config's `data.seq_len`, one sequence per optimizer
step (a config without a transfer stage gets the LoRA budget only), then its evaluate stage on the shared
held-out text with passkey retrieval at `PASSKEY_FACTOR` × the training length. Then, per run, the
perplexity ratio on other kinds of offline text (`TEXT_KINDS`) and the decode-state bytes of one
sequence after a `state_context`-token prefill. Runs and these extra measurements are resumable: a
finished run is skipped, and its measurements are reused while their inputs are unchanged."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from linearize.errors import UserError
from linearize.files import save_figure, write_json, write_text

from .config_loader import CONFIGS_DIR, load_config
from .registry import TRAINING_STAGES
from .rundir import CompareDir, RunDir, claim_compare

EVALUATE = "evaluate"
BASELINES = ("baseline_window_only", "baseline_no_transfer")  # presets under configs/, added by --baselines
PASSKEY_FACTOR = 4  # passkey prompts at 4x the training length: retrieval beyond what the student trained on
STATE_CONTEXT = 4096
BYTES_PER_MIB = 2**20
# Other kinds of held-out text, by the column name of the table: registered corpora (linearize.data) that
# every CPython install carries, so the exact text follows the Python version, which compare.json records.
TEXT_KINDS: dict[str, str] = {"code": "python-code", "manual": "python-manual"}


@dataclass(frozen=True)
class CompareOptions:
    configs: tuple[Path, ...]
    out_dir: Path
    transfer_tokens: int = 83_000
    lora_tokens: int = 58_000
    overrides: tuple[str, ...] = ()  # key=value for every run, after the budget's own
    eval: Optional[str] = None  # held-out text (data.eval spec); None: the first config's data.eval
    eval_sequences: int = 80  # sequences of the held-out text (perplexity, KL, top-1)
    text_sequences: int = 20  # sequences of each other text kind
    stage_eval_sequences: int = 8  # each training stage's own final eval loss (a cheap sanity check)
    texts: tuple[str, ...] = tuple(TEXT_KINDS)
    baselines: bool = False
    state_context: int = STATE_CONTEXT


# ------------------------------------------------------------------------------------------- the runs


def _config_paths(options: CompareOptions) -> list[Path]:
    paths = [Path(p) for p in options.configs]
    if options.baselines:
        paths += [CONFIGS_DIR / f"{name}.yaml" for name in BASELINES
                  if CONFIGS_DIR / f"{name}.yaml" not in [p.resolve() for p in paths]]
    for path in paths:
        if not path.is_file():
            raise UserError(f"config not found: {path}")
    stems = [p.stem for p in paths]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise UserError(f"two configs share the name {', '.join(twice)}: each run is <out>/<config stem>/, rename one")
    return paths


def _check_options(options: CompareOptions) -> None:
    unknown = [kind for kind in options.texts if kind not in TEXT_KINDS]
    if unknown:
        raise UserError(f"unknown text kind(s) {', '.join(unknown)}; valid: {', '.join(TEXT_KINDS)}")
    for name in ("transfer_tokens", "lora_tokens"):
        if getattr(options, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(options, name)}")
    for name in ("eval_sequences", "text_sequences", "stage_eval_sequences", "state_context"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")


def _stage_tokens(options: CompareOptions) -> dict[str, int]:
    return {"attention_transfer": options.transfer_tokens, "lora_recovery": options.lora_tokens}


def budget_overrides(path: Path, cfg, eval_spec: str, options: CompareOptions) -> list[str]:
    """The overrides that put `cfg` (the config at `path`) on the shared budget and evaluation."""
    seq, tokens = cfg.data.seq_len, _stage_tokens(options)
    training = [s for s in cfg.stages if s in TRAINING_STAGES and tokens[s] > 0]
    n = options.eval_sequences
    out = [f"run_name={path.stem}", f"output_dir={options.out_dir}", f"data.eval={eval_spec}",
           f"data.max_eval_sequences={n}", f"evaluate.max_sequences={n}",
           f"evaluate.long_context.passkey_lengths=[{PASSKEY_FACTOR * seq}]",
           f"stages=[{','.join(training + [EVALUATE])}]"]  # eval.json is all the table needs: no export
    for stage in training:
        steps = tokens[stage] // seq
        if steps < 1:
            raise UserError(f"{path}: {tokens[stage]} {stage} tokens are less than one {seq}-token sequence")
        # One sequence per optimizer step: at ~100-160 steps, accumulating 8 would leave 15-20 updates.
        out += [f"{stage}.max_steps={steps}", f"{stage}.grad_accum=1", f"{stage}.micro_batch_size=1",
                f"{stage}.eval_every={steps}", f"{stage}.save_every={max(steps // 2, 1)}",
                f"{stage}.eval_sequences={options.stage_eval_sequences}"]
    if "attention_transfer" in training:
        # The recipe's plateau scheduler needs many evaluations; cosine decays over the short budget instead.
        out.append("attention_transfer.scheduler=cosine")
    return out


def check_one_teacher(configs: dict) -> None:
    """One table compares students of one teacher: refuses (one line naming each model.path) configs whose
    teachers differ, by spec or by the files behind it (`linearize.models.fingerprint`)."""
    from linearize.models.fingerprint import teacher_fingerprint

    digests = {path: teacher_fingerprint(cfg.model.path, cfg.model.tokenizer)["digest"] for path, cfg in configs.items()}
    if len(set(digests.values())) > 1:
        named = "; ".join(f"{path.name}: model.path {cfg.model.path!r}" for path, cfg in configs.items())
        raise UserError(f"compare needs one teacher for every config, and these differ ({named}); run compare once "
                        "per teacher")


def run_config(path: Path, eval_spec: str, options: CompareOptions):
    """The config of `path` on the shared budget; the user's overrides apply last."""
    base = load_config(path, options.overrides)
    return load_config(path, [*budget_overrides(path, base, eval_spec, options), *options.overrides])


def _read_record(run_dir: Path) -> dict:
    """`compare_run.json`, checked: an object whose `wall_s` is a number and whose `extra` holds a `key`
    and `metrics`; one line naming the file otherwise."""
    path = RunDir(run_dir).compare_record
    if not path.is_file():
        return {}
    redo = "delete it to measure the run again"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is corrupt ({' '.join(str(err).split())}); {redo}") from None
    extra = record.get("extra", {}) if isinstance(record, dict) else None
    wall = record.get("wall_s", 0.0) if isinstance(record, dict) else None
    if not (isinstance(wall, (int, float)) and not isinstance(wall, bool) and isinstance(extra, dict)
            and (not extra or {"key", "metrics"} <= extra.keys())):
        raise UserError(f"{path} is not a compare record (an object with a number 'wall_s' and 'extra' holding "
                        f"'key' and 'metrics'); {redo}")
    return record


def _write_json(path: Path, data) -> None:
    write_json(path, data)


def _evaluation(run_dir: Path) -> Optional[dict]:
    """The evaluate stage's DONE record of a run, or None."""
    from .rundir import read_done

    return read_done(run_dir / EVALUATE)


def _update_record(run_dir: Path, **values) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(RunDir(run_dir).compare_record, {**_read_record(run_dir), **values})


def run_timed(cfg, run_dir: Path) -> float:
    """Runs (or resumes, or skips) the pipeline; returns the wall seconds spent on this run so far, over
    every invocation that had something to do (an interrupted one included)."""
    from .pipeline import run_stages

    finished = _evaluation(run_dir) is not None
    started = time.perf_counter()
    try:
        run_stages(cfg)
    finally:
        if not finished:
            spent = _read_record(run_dir).get("wall_s", 0.0) + time.perf_counter() - started
            _update_record(run_dir, wall_s=spent)
    return _read_record(run_dir).get("wall_s", 0.0)


# ------------------------------------------------------------------------------- extra measurements


def write_texts(out_dir: Path, kinds) -> dict[str, str]:
    """kind → a jsonl file of its documents under `<out>/texts/` (what `data.eval` reads)."""
    from linearize.data import load_corpus

    where = CompareDir(out_dir)
    where.texts.mkdir(parents=True, exist_ok=True)
    specs = {}
    for kind in kinds:
        path = where.text(kind)
        text = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in load_corpus(TEXT_KINDS[kind]))
        if not path.is_file() or path.read_text() != text:
            write_text(path, text)
        specs[kind] = str(path)
    return specs


def decode_state_bytes(model, context: int) -> int:
    """Bytes of the generation cache of one sequence after a `context`-token prefill of random tokens
    (student states, window keys/values, softmax layers' keys/values); does not depend on the weights."""
    import torch
    from transformers import DynamicCache

    from linearize.attention import cache_nbytes

    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))  # [1, L]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache_nbytes(cache)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def extra_metrics(cfg, run_dir: Path, text_specs: dict[str, str], options: CompareOptions) -> dict:
    """Per text kind: teacher and student perplexity, KL, top-1; and the decode-state bytes of student and
    teacher. Cached in the run's record under a key of everything they depend on."""
    from .rundir import DONE_FILE

    key = {"evaluate": _digest(run_dir / EVALUATE / DONE_FILE), "sequences": options.text_sequences,
           "context": options.state_context, "texts": {k: _digest(Path(p)) for k, p in text_specs.items()}}
    cached = _read_record(run_dir).get("extra")
    if cached and cached["key"] == key:
        return cached["metrics"]
    from linearize.adapters import teacher_view
    from linearize.train import default_device
    from linearize.train.evaluation import compare_on_tokens

    from .evaluate import eval_tokens, final_student

    start = final_student(cfg, run_dir)
    model = start.model.to(default_device())
    texts = {}
    for kind, spec in text_specs.items():
        n = options.text_sequences
        kind_cfg = replace(cfg, data=replace(cfg.data, eval=spec, max_eval_sequences=n),
                           evaluate=replace(cfg.evaluate, max_sequences=n))
        texts[kind] = compare_on_tokens(model, eval_tokens(kind_cfg, start.tokenizer), teacher_view=teacher_view)
    student_bytes = decode_state_bytes(model, options.state_context)
    with teacher_view(model):
        teacher_bytes = decode_state_bytes(model, options.state_context)
    metrics = {"texts": texts, "state_bytes": student_bytes, "teacher_state_bytes": teacher_bytes}
    _update_record(run_dir, extra={"key": key, "metrics": metrics})
    return metrics


# ----------------------------------------------------------------------------------------- one row


def _ratio(metrics: dict) -> float:
    return metrics["student_ppl"] / metrics["teacher_ppl"]


def _passkey(evaluation: dict, key: str) -> Optional[float]:
    return evaluation.get(key, {}).get("passkey", {}).get("mean_accuracy")


def make_row(path: Path, cfg, evaluation: dict, extra: dict, wall_s: float) -> dict:
    texts = {kind: {**m, "ppl_ratio": _ratio(m)} for kind, m in extra["texts"].items()}
    ratio = _ratio(evaluation)
    spread = max((abs(t["ppl_ratio"] - ratio) for t in texts.values()), default=0.0)
    return {"config": str(path), "name": path.stem, "stages": list(cfg.stages), "seq_len": cfg.data.seq_len,
            "tokens": {s: getattr(cfg, s).max_steps * cfg.data.seq_len for s in cfg.stages if s in TRAINING_STAGES},
            "student_ppl": evaluation["student_ppl"], "teacher_ppl": evaluation["teacher_ppl"], "ppl_ratio": ratio,
            "kl": evaluation["kl"], "top1_agreement": evaluation["top1_agreement"],
            "passkey": {"length": PASSKEY_FACTOR * cfg.data.seq_len, "student": _passkey(evaluation, "long_context"),
                        "teacher": _passkey(evaluation, "long_context_teacher")},
            "texts": texts, "ratio_spread": spread, "state_bytes": extra["state_bytes"],
            "teacher_state_bytes": extra["teacher_state_bytes"], "wall_s": wall_s,
            "run_dir": str(Path(cfg.output_dir) / cfg.run_name)}


def compare_one(path: Path, eval_spec: str, text_specs: dict[str, str], options: CompareOptions) -> dict:
    cfg = run_config(path, eval_spec, options)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    print(f"compare: {path.stem} -> {run_dir}", flush=True)
    wall_s = run_timed(cfg, run_dir)
    evaluation = _evaluation(run_dir)["metrics"]
    return make_row(path, cfg, evaluation, extra_metrics(cfg, run_dir, text_specs, options), wall_s)


# ------------------------------------------------------------------------------------------ outputs


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


FIXED_COLUMNS = 9  # the table's columns besides one per other kind of text


def _context_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def markdown(result: dict) -> str:
    from linearize.data import CORPORA

    rows, setup = result["rows"], result["setup"]
    kinds = setup["texts"]
    lengths = sorted({r["seq_len"] for r in rows})
    # The held-out text is packed at each run's data.seq_len: only one length gives every row the same tokens.
    length = (f"{lengths[0]}-token sequences" if len(lengths) == 1 else
              f"sequence lengths {', '.join(map(str, lengths))} (rows differ in held-out tokens)")
    budget = (f"{length}; budget {setup['transfer_tokens']:,} tokens of attention transfer + "
              f"{setup['lora_tokens']:,} of LoRA, one sequence per step (configs without a transfer stage: LoRA only)")
    lines = ["# linearize compare", "",
             f"{budget}; held-out text `{setup['eval']}`, {setup['eval_sequences']} sequences; other text: "
             + "; ".join(f"{k}: {CORPORA[TEXT_KINDS[k]].description}, {setup['text_sequences']} sequences" for k in kinds)
             + f". Machine: {setup['machine']}; {setup['date']}.", "",
             "| config | stages | ppl ratio | KL | top-1 | " + " | ".join(f"{k} ratio" for k in kinds)
             + f" | spread | passkey @{PASSKEY_FACTOR}× (student / teacher) | decode state @"
             + f"{_context_label(setup['state_context'])} (MiB/seq) | wall (min) |",
             "|---" * (FIXED_COLUMNS + len(kinds)) + "|"]
    for r in rows:
        stages = ", ".join(s for s in r["stages"] if s in TRAINING_STAGES) or "none"
        lines.append(f"| {r['name']} | {stages} | {r['ppl_ratio']:.3f} | {r['kl']:.3f} | {r['top1_agreement']:.3f} | "
                     + " | ".join(f"{r['texts'][k]['ppl_ratio']:.3f}" for k in kinds)
                     + f" | {r['ratio_spread']:.3f} | {_fmt(r['passkey']['student'])} / {_fmt(r['passkey']['teacher'])}"
                     f" | {r['state_bytes'] / BYTES_PER_MIB:.2f} | {r['wall_s'] / 60:.1f} |")
    if rows:
        first = rows[0]
        teachers = ", ".join([f"`{setup['eval']}` {first['teacher_ppl']:.2f}"]
                             + [f"{k} {first['texts'][k]['teacher_ppl']:.2f}" for k in kinds])
        lines += ["", f"ppl ratio: student / teacher perplexity (teacher: {teachers}). spread: the largest "
                  f"|ratio on another kind of text − ratio on `{setup['eval']}`|. Teacher KV cache at the same "
                  f"context: {first['teacher_state_bytes'] / BYTES_PER_MIB:.2f} MiB per sequence."]
    return "\n".join(lines) + "\n"


def figure(result: dict):
    """Perplexity ratio against decode-state MiB per sequence, one point per config in the legend, the
    teacher (ratio 1, its KV cache) as the reference."""
    # A figure of its own with the Agg canvas: matplotlib's process-wide backend is never switched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.6, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # A legend, not labels beside the points: runs often sit on top of each other (same state size, close
    # ratios) and their labels would overlap. Colour and marker both vary, so coincident points stay apart.
    markers = "osD^vP*X<>"
    for i, r in enumerate(result["rows"]):
        ax.scatter([r["state_bytes"] / BYTES_PER_MIB], [r["ppl_ratio"]], color=f"C{i % 10}",
                   marker=markers[i % len(markers)], s=40, alpha=0.85, label=r["name"])
    if result["rows"]:
        teacher = result["rows"][0]["teacher_state_bytes"] / BYTES_PER_MIB
        ax.scatter([teacher], [1.0], color="black", marker="x", label="teacher (KV cache)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    ax.set_xscale("log")
    ax.margins(0.1)
    ax.set_xlabel(f"decode state per sequence at {result['setup']['state_context']} tokens (MiB)")
    ax.set_ylabel(f"perplexity ratio on {Path(result['setup']['eval']).name}")
    fig.tight_layout()
    return fig


def plot(result: dict, path: Path) -> Path:
    """`figure(result)` as a PNG at `path`, written atomically."""
    return save_figure(figure(result), path)


def _setup(options: CompareOptions, eval_spec: str) -> dict:
    import torch

    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"Python {platform.python_version()}")
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    return {"eval": eval_spec, "eval_sequences": options.eval_sequences, "texts": list(options.texts),
            "text_sequences": options.text_sequences, "transfer_tokens": options.transfer_tokens,
            "lora_tokens": options.lora_tokens, "state_context": options.state_context,
            "passkey_factor": PASSKEY_FACTOR, "overrides": list(options.overrides), "machine": machine,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_outputs(result: dict, out_dir: Path) -> dict[str, Path]:
    where = CompareDir(out_dir)
    paths = {"md": where.markdown, "json": where.json, "png": where.plot}
    _write_json(paths["json"], result)
    write_text(paths["md"], markdown(result))
    plot(result, paths["png"])
    return paths


def compare(options: CompareOptions) -> dict:
    """Runs every config (and with `baselines` the two baseline presets), measures them, and writes
    compare.md, compare.json and compare.png under `options.out_dir`; returns what compare.json holds."""
    _check_options(options)
    paths = _config_paths(options)
    eval_spec = options.eval or load_config(paths[0], options.overrides).data.eval
    if not eval_spec:
        raise UserError(f"{paths[0]} has no data.eval to evaluate every run on: give --eval SPEC")
    out_dir = Path(options.out_dir)
    check_one_teacher({path: run_config(path, eval_spec, options) for path in paths})
    claim_compare(out_dir)
    text_specs = write_texts(out_dir, options.texts)
    rows = [compare_one(path, eval_spec, text_specs, options) for path in paths]
    result = {"setup": _setup(options, eval_spec), "rows": rows}
    for kind, where in write_outputs(result, out_dir).items():
        print(f"compare: wrote {where}")
    return result
