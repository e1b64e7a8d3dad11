"""`linearize compare`: several configs through the normal pipeline at one token budget, evaluated on the
same held-out tokens, as one table (`compare.md`), every number (`compare.json`) and two plots under the
output directory: KL to the teacher against decode-state memory (`compare.png`), and agreement with the
teacher against context length (`compare_agreement.png`).

Each config runs as `<out>/<config stem>/` with overrides that set the budget: `transfer_tokens` of
attention transfer and `lora_tokens` of LoRA at the config's `data.seq_len`, one sequence per optimizer
step (a config without a transfer stage gets the LoRA budget only), then its evaluate stage on the shared
held-out text with the behaviour measurements on (`stages/behaviour.py`, docs/behaviour.md): KL, top-1
and perplexity ratio per kind of text, passkey and badge recall at 1x/2x/4x the training length, and
agreement with the teacher on instructions, short and after documents. Then, per run, the decode-state
bytes of one sequence after a `state_context`-token prefill. Runs and these bytes are resumable: a
finished run is skipped, and its bytes are reused while their inputs are unchanged."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from linearize.errors import UserError
from linearize.files import save_figure, write_json, write_text

from .behaviour import PASSKEY_DEPTHS, TEXT_KINDS, retrieval_lengths
from .config_loader import CONFIGS_DIR, load_config
from .registry import TRAINING_STAGES
from .rundir import CompareDir, RunDir, claim_compare

EVALUATE = "evaluate"
BASELINES = ("baseline_window_only", "baseline_no_transfer")  # presets under configs/, added by --baselines
STATE_CONTEXT = 4096
BYTES_PER_MIB = 2**20
# The kind of text that is the shared held-out text (`--eval`): the evaluate stage's own KL, top-1 and
# perplexities on `eval_sequences` rows already measure it, so the behaviour pass skips it.
HELD_OUT = next(kind for kind, source in TEXT_KINDS.items() if source is None)
# Retrieval format (eval.json `retrieval`) -> its score at each prompt length, from one side's result.
RETRIEVAL_SCORES = {
    "passkey": lambda result: [sum(row) / len(row) for row in result["accuracy"]],  # exact, mean over depths
    "badge": lambda result: list(result["exact"]),
}
# The behaviour settings each row records and the table states (the user's overrides may change them).
BEHAVIOUR_SETTINGS = ("text_sequences", "retrieval_prompts", "instructions", "context_windows")


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
    retrieval_prompts: int = 36  # passkey and badge prompts per length (12 a cell read 0.08 where 36 read 0.33)
    instructions: int = 60  # teacher-agreement instructions per context length
    context_windows: tuple[int, ...] = (2, 4, 16)  # agreement documents, in windows: 16 x 64 ~ 1,000 tokens


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
    for name in ("eval_sequences", "text_sequences", "stage_eval_sequences", "state_context", "retrieval_prompts",
                 "instructions"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
    if any(m < 1 for m in options.context_windows):
        raise UserError(f"--context-windows must all be >= 1, got {list(options.context_windows)}")


def _stage_tokens(options: CompareOptions) -> dict[str, int]:
    return {"attention_transfer": options.transfer_tokens, "lora_recovery": options.lora_tokens}


def _list(values) -> str:
    return f"[{','.join(map(str, values))}]"


def behaviour_overrides(options: CompareOptions) -> list[str]:
    """The evaluate stage's behaviour measurements at compare's settings; the held-out kind is left to the
    evaluate stage's own metrics (the same text, `eval_sequences` rows)."""
    measured = [kind for kind in options.texts if kind != HELD_OUT]
    b = "evaluate.behaviour"
    return [f"{b}.enabled=true", f"{b}.texts={_list(measured)}", f"{b}.text_sequences={options.text_sequences}",
            f"{b}.retrieval_prompts={options.retrieval_prompts}", f"{b}.instructions={options.instructions}",
            f"{b}.context_windows={_list(options.context_windows)}",
            # every row measures the same teacher on the same prompts: the first row's teacher results serve all
            f"{b}.teacher_cache={json.dumps(str(CompareDir(options.out_dir).teacher_cache))}",  # quoted: any path
            "evaluate.long_context.passkey_lengths=[]"]  # the behaviour pass measures the passkey already


def budget_overrides(path: Path, cfg, eval_spec: str, options: CompareOptions) -> list[str]:
    """The overrides that put `cfg` (the config at `path`) on the shared budget and evaluation."""
    seq, tokens = cfg.data.seq_len, _stage_tokens(options)
    training = [s for s in cfg.stages if s in TRAINING_STAGES and tokens[s] > 0]
    n = options.eval_sequences
    out = [f"run_name={path.stem}", f"output_dir={options.out_dir}", f"data.eval={eval_spec}",
           f"data.max_eval_sequences={n}", f"evaluate.max_sequences={n}", *behaviour_overrides(options),
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
    """The config of `path` on the shared budget; the user's overrides apply last (but may not switch the
    behaviour measurements off: the table leads with them)."""
    base = load_config(path, options.overrides)
    cfg = load_config(path, [*budget_overrides(path, base, eval_spec, options), *options.overrides])
    if not cfg.evaluate.behaviour.enabled:
        raise UserError(f"{path}: compare's table leads with the behaviour measurements; drop the override "
                        "evaluate.behaviour.enabled=false")
    return cfg


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


def _evaluation(run_dir: Path) -> Optional[dict]:
    """The evaluate stage's DONE record of a run, or None."""
    from .rundir import read_done

    return read_done(run_dir / EVALUATE)


def _update_record(run_dir: Path, **values) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(RunDir(run_dir).compare_record, {**_read_record(run_dir), **values})


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


# ----------------------------------------------------------------------------------- decode-state bytes


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


def state_metrics(cfg, run_dir: Path, options: CompareOptions) -> dict:
    """The decode-state bytes of student and teacher, cached in the run's record under a key of what they
    depend on (a record of an older compare, keyed otherwise, is measured again)."""
    from .rundir import DONE_FILE

    key = {"evaluate": _digest(run_dir / EVALUATE / DONE_FILE), "context": options.state_context}
    cached = _read_record(run_dir).get("extra")
    if cached and cached["key"] == key:
        return cached["metrics"]
    from linearize.adapters import teacher_view
    from linearize.train import default_device

    from .evaluate import final_student

    model = final_student(cfg, run_dir).model.to(default_device())
    student_bytes = decode_state_bytes(model, options.state_context)
    with teacher_view(model):
        teacher_bytes = decode_state_bytes(model, options.state_context)
    metrics = {"state_bytes": student_bytes, "teacher_state_bytes": teacher_bytes}
    _update_record(run_dir, extra={"key": key, "metrics": metrics})
    return metrics


# ----------------------------------------------------------------------------------------- one row


def _ratio(metrics: dict) -> float:
    return metrics["student_ppl"] / metrics["teacher_ppl"]


def _texts(evaluation: dict) -> dict:
    """Per kind of text: the held-out kind from the evaluate stage's own metrics, the rest from the
    behaviour measurements (which win if they measured the held-out kind too)."""
    held_out = {k: evaluation[k] for k in ("teacher_ppl", "student_ppl", "kl", "top1_agreement")}
    return {HELD_OUT: {**held_out, "ppl_ratio": _ratio(held_out)}, **evaluation.get("texts", {})}


def _retrieval(evaluation: dict) -> dict:
    """{format: lengths, student and teacher score at each length} from eval.json's `retrieval`."""
    out = {}
    for name, result in evaluation["retrieval"].items():
        score = RETRIEVAL_SCORES[name]
        out[name] = {"lengths": result["student"]["lengths"], "student": score(result["student"]),
                     "teacher": score(result["teacher"])}
    return out


def _passkey_by_depth(evaluation: dict) -> Optional[dict]:
    """eval.json's passkey grids ([length][depth] exact shares), student and teacher, or None without a passkey.
    The table's passkey column averages over depths, which hides where a student finds the needle: in the
    sinks (start), the window (end), or only where exact attention over the whole prompt is needed (middle)."""
    passkey = evaluation["retrieval"].get("passkey")
    if passkey is None:
        return None
    return {"lengths": passkey["student"]["lengths"], "depths": passkey["student"]["depths"],
            "student": passkey["student"]["accuracy"], "teacher": passkey["teacher"]["accuracy"]}


def make_row(path: Path, cfg, evaluation: dict, extra: dict, wall_s: float) -> dict:
    missing = [k for k in ("retrieval", "teacher_agreement") if k not in evaluation]
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if missing:
        raise UserError(f"{run_dir / EVALUATE} has no {' or '.join(missing)} (evaluated without "
                        f"evaluate.behaviour.enabled); delete {run_dir / EVALUATE} to evaluate it again")
    return {"config": str(path), "name": path.stem, "stages": list(cfg.stages), "seq_len": cfg.data.seq_len,
            "tokens": {s: getattr(cfg, s).max_steps * cfg.data.seq_len for s in cfg.stages if s in TRAINING_STAGES},
            "student_ppl": evaluation["student_ppl"], "teacher_ppl": evaluation["teacher_ppl"],
            "ppl_ratio": _ratio(evaluation), "kl": evaluation["kl"], "top1_agreement": evaluation["top1_agreement"],
            "texts": _texts(evaluation), "retrieval": _retrieval(evaluation),
            "passkey_by_depth": _passkey_by_depth(evaluation),
            "teacher_agreement": evaluation["teacher_agreement"], "retrieval_lengths": retrieval_lengths(cfg),
            "behaviour": {key: getattr(cfg.evaluate.behaviour, key) for key in BEHAVIOUR_SETTINGS},
            "state_bytes": extra["state_bytes"], "teacher_state_bytes": extra["teacher_state_bytes"],
            "wall_s": wall_s, "run_dir": str(run_dir)}


def compare_one(path: Path, eval_spec: str, options: CompareOptions) -> dict:
    cfg = run_config(path, eval_spec, options)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    print(f"compare: {path.stem} -> {run_dir}", flush=True)
    wall_s = run_timed(cfg, run_dir)
    evaluation = _evaluation(run_dir)["metrics"]
    return make_row(path, cfg, evaluation, state_metrics(cfg, run_dir, options), wall_s)


# ------------------------------------------------------------------------------------------ outputs


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _context_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _agreement(row: dict) -> tuple[dict, int, dict]:
    """(short entry, longest context in tokens, its unrelated-document entry) of a row's agreement."""
    agreement = row["teacher_agreement"]
    longest = max(map(int, agreement))
    return agreement["0"], longest, agreement[str(longest)]


def _retrieval_headers(rows: list[dict]) -> list[str]:
    """One label per retrieval length: tokens when every row prompts at the same lengths, else multiples
    of each row's training length (the default lengths scale with data.seq_len)."""
    lengths = {tuple(r["retrieval_lengths"]) for r in rows}
    if len(lengths) == 1:
        return [str(n) for n in next(iter(lengths))]
    return [f"{n / rows[0]['seq_len']:g}×" for n in rows[0]["retrieval_lengths"]]


def _setting(rows: list[dict], key: str) -> str:
    """A behaviour setting of the rows: its value when they share it, else a pointer to compare.json."""
    values = {json.dumps(r["behaviour"][key]) for r in rows}
    return values.pop() if len(values) == 1 else "(per row: compare.json)"


def _kinds(rows: list[dict]) -> list[str]:
    measured = {kind for r in rows for kind in r["texts"]}
    return [kind for kind in TEXT_KINDS if kind in measured]


def markdown(result: dict) -> str:
    from linearize.data import CORPORA

    rows, setup = result["rows"], result["setup"]
    kinds = _kinds(rows)
    formats = [name for name in RETRIEVAL_SCORES if any(name in r["retrieval"] for r in rows)]
    lengths = sorted({r["seq_len"] for r in rows})
    # The held-out text is packed at each run's data.seq_len: only one length gives every row the same tokens.
    length = (f"{lengths[0]}-token sequences" if len(lengths) == 1 else
              f"sequence lengths {', '.join(map(str, lengths))} (rows differ in held-out tokens)")
    budget = (f"{length}; budget {setup['transfer_tokens']:,} tokens of attention transfer + "
              f"{setup['lora_tokens']:,} of LoRA, one sequence per step (configs without a transfer stage: LoRA only)")
    others = [k for k in kinds if TEXT_KINDS[k] is not None]
    lines = ["# linearize compare", "",
             f"{budget}; {HELD_OUT}: held-out text `{setup['eval']}`, {setup['eval_sequences']} sequences"
             + "".join(f"; {k}: {CORPORA[TEXT_KINDS[k]].description}, {_setting(rows, 'text_sequences')} sequences"
                       for k in others)
             + f"; retrieval: {_setting(rows, 'retrieval_prompts')} prompts a length and format; agreement: "
             f"{_setting(rows, 'instructions')} instructions, documents of {_setting(rows, 'context_windows')} "
             f"windows. Machine: {setup['machine']}; {setup['date']}.", ""]
    labels = _retrieval_headers(rows) if rows else []
    header = (["config"] + [f"KL {k}" for k in kinds] + [f"top-1 {HELD_OUT}"]
              + [f"{name} @{label} (s / t)" for name in formats for label in labels]
              + ["agree short", "agree long (@tokens)"] + [f"ppl ratio {k}" for k in kinds]
              + [f"decode state @{_context_label(setup['state_context'])} (MiB/seq)", "stages", "wall (min)"])
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        short, longest, long = _agreement(r)
        cells = ([r["name"]] + [_fmt(r["texts"].get(k, {}).get("kl"), ".3f") for k in kinds]
                 + [f"{r['texts'][HELD_OUT]['top1_agreement']:.3f}"]
                 + [f"{_fmt(s)} / {_fmt(t)}" for name in formats
                    for s, t in zip(r["retrieval"][name]["student"], r["retrieval"][name]["teacher"])]
                 + [f"{short['match_share']:.2f}", f"{long['match_share']:.2f} (@{longest})"]
                 + [_fmt(r["texts"].get(k, {}).get("ppl_ratio"), ".3f") for k in kinds]
                 + [f"{r['state_bytes'] / BYTES_PER_MIB:.2f}",
                    ", ".join(s for s in r["stages"] if s in TRAINING_STAGES) or "none", f"{r['wall_s'] / 60:.1f}"])
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        first = rows[0]
        teachers = ", ".join(f"{k} {first['texts'][k]['teacher_ppl']:.2f}" for k in kinds if k in first["texts"])
        lines += ["", "KL: mean KL(teacher ‖ student) per token; top-1: share of positions where both predict the "
                  "same next token. Retrieval: exact answers, student / teacher (passkey averaged over needle "
                  "depths). agree: share of instructions whose greedy answer equals the teacher's (16 tokens "
                  "short; 32 after the longest unrelated document). ppl ratio: student / teacher perplexity "
                  f"(teacher: {teachers}). Teacher KV cache at the same context: "
                  f"{first['teacher_state_bytes'] / BYTES_PER_MIB:.2f} MiB per sequence."]
    lines += _depth_table(rows)
    return "\n".join(lines) + "\n"


def _depth_table(rows: list[dict]) -> list[str]:
    """Passkey exact share by prompt length and needle depth, the teacher first (from the first row that has
    the grids), or nothing when the rows do not share one set of lengths and depths."""
    grids = [(r["name"], r.get("passkey_by_depth")) for r in rows]
    grids = [(name, g) for name, g in grids if g is not None]
    if not grids or len({(tuple(g["lengths"]), tuple(g["depths"])) for _, g in grids}) != 1:
        return []
    lengths, depths = grids[0][1]["lengths"], grids[0][1]["depths"]
    names = " / ".join(PASSKEY_DEPTHS.get(d, f"{d:g}") for d in depths)
    header = ["config"] + [f"@{n}: {names}" for n in lengths]
    lines = ["", "Passkey by needle depth (exact; where a student finds it: start = in the sink tokens, end = in "
             "the window, middle = only through attention over the whole prompt):", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, grid in [("teacher", grids[0][1]["teacher"])] + [(name, g["student"]) for name, g in grids]:
        lines.append("| " + " | ".join([name] + [" / ".join(f"{x:.2f}" for x in row) for row in grid]) + " |")
    return lines


def _new_figure(size: tuple[float, float]):
    """A figure of its own with the Agg canvas: matplotlib's process-wide backend is never switched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


# A legend, not labels beside the points: runs often sit on top of each other (same state size, close
# values) and their labels would overlap. Colour and marker both vary, so coincident points stay apart.
MARKERS = "osD^vP*X<>"


def _style(i: int) -> dict:
    return {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]}


def figure(result: dict):
    """KL to the teacher on the held-out text against decode-state MiB per sequence, one point per config
    in the legend, the teacher (KL 0, its KV cache) as the reference."""
    from matplotlib.ticker import NullFormatter

    fig, ax = _new_figure((7.6, 4.4))
    for i, r in enumerate(result["rows"]):
        ax.scatter([r["state_bytes"] / BYTES_PER_MIB], [r["texts"][HELD_OUT]["kl"]], s=40, alpha=0.85,
                   label=r["name"], **_style(i))
    if result["rows"]:
        teacher = result["rows"][0]["teacher_state_bytes"] / BYTES_PER_MIB
        ax.scatter([teacher], [0.0], color="black", marker="x", label="teacher (KV cache)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a narrow log range run into each other
    ax.margins(0.1)
    ax.set_xlabel(f"decode state per sequence at {result['setup']['state_context']} tokens (MiB)")
    ax.set_ylabel(f"KL to the teacher on {Path(result['setup']['eval']).name} (lower is closer)")
    fig.tight_layout()
    return fig


def agreement_figure(result: dict):
    """Share of instructions answered as the teacher does against the tokens of document before them, one
    line per config (solid: unrelated document; dashed: a document holding the asked facts), the teacher
    (1.0 by definition) as the reference line."""
    fig, ax = _new_figure((7.6, 4.4))
    for i, r in enumerate(result["rows"]):
        contexts = sorted(map(int, r["teacher_agreement"]))
        entries = [r["teacher_agreement"][str(n)] for n in contexts]
        ax.plot(contexts, [e["match_share"] for e in entries], label=r["name"], **_style(i))
        related = [(n, e["related"]["match_share"]) for n, e in zip(contexts, entries) if "related" in e]
        if related:
            ax.plot(*zip(*related), linestyle="--", alpha=0.6, **_style(i))
    ax.axhline(1.0, color="black", linewidth=1, label="teacher")
    ax.set_ylim(-0.05, 1.05)
    # two lines: on one, the label is wider than the axes the outside legend leaves, and its start is cut off
    ax.set_xlabel("tokens of document before the instruction\n(dashed: the document holds the answer)")
    ax.set_ylabel("answers equal to the teacher's (share)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def agreement_plot_path(out_dir: Path) -> Path:
    return CompareDir(out_dir).agreement_plot


def _setup(options: CompareOptions, eval_spec: str) -> dict:
    import torch

    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"Python {platform.python_version()}")
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    return {"eval": eval_spec, "eval_sequences": options.eval_sequences, "texts": list(options.texts),
            "text_sequences": options.text_sequences, "transfer_tokens": options.transfer_tokens,
            "lora_tokens": options.lora_tokens, "state_context": options.state_context,
            "retrieval_prompts": options.retrieval_prompts, "instructions": options.instructions,
            "context_windows": list(options.context_windows), "overrides": list(options.overrides),
            "machine": machine, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_outputs(result: dict, out_dir: Path) -> dict[str, Path]:
    where = CompareDir(out_dir)
    paths = {"md": where.markdown, "json": where.json, "png": where.plot, "agreement": agreement_plot_path(out_dir)}
    write_json(paths["json"], result)
    write_text(paths["md"], markdown(result))
    save_figure(figure(result), paths["png"])
    save_figure(agreement_figure(result), paths["agreement"])
    return paths


def compare(options: CompareOptions) -> dict:
    """Runs every config (and with `baselines` the two baseline presets), measures them, and writes
    compare.md, compare.json, compare.png and compare_agreement.png under `options.out_dir`; returns what
    compare.json holds."""
    _check_options(options)
    paths = _config_paths(options)
    eval_spec = options.eval or load_config(paths[0], options.overrides).data.eval
    if not eval_spec:
        raise UserError(f"{paths[0]} has no data.eval to evaluate every run on: give --eval SPEC")
    out_dir = Path(options.out_dir)
    check_one_teacher({path: run_config(path, eval_spec, options) for path in paths})
    claim_compare(out_dir)
    rows = [compare_one(path, eval_spec, options) for path in paths]
    result = {"setup": _setup(options, eval_spec), "rows": rows}
    for kind, where in write_outputs(result, out_dir).items():
        print(f"compare: wrote {where}")
    return result
