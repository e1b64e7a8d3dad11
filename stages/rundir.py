"""What a run directory promises: one process at a time, nothing deleted that linearize did not write,
and a DONE record for every finished stage, from which later stages find the outputs they build on.

- `run_lock(run_dir)`: an exclusive `flock` on `<run>/.lock`, which holds the holder's PID. The kernel
  drops the lock when its process dies (even by SIGKILL), so a stale lock file is simply taken over.
- `mark_stage(stage_dir, stage)`: writes `<stage_dir>/.linearize_stage` naming the stage. A stage folder
  is discarded (`discard_stage`) only if it carries that marker, or the DONE record of a linearize
  version from before markers existed.
- `discard_stage`: renames the folder to a hidden `.<stage>.discarded-<pid>` name first (one atomic
  step), then deletes that; an interruption leaves a hidden leftover (removed by the next run), never a
  half-deleted stage that still looks finished.
- `mark_done` / `read_done`: `<stage_dir>/DONE` holds the stage's final metrics and the config it ran
  with (or, for a folder meant to be shared, that config's digest). A stage with nothing to train
  records `{"skipped": reason}` as its metrics.
- `find_student_file` / `adapter_dir`: the outputs of the newest finished stage that wrote them
  (`STUDENT_SOURCES`); a finished stage without its output is an error, never a fallback.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from linearize.adapters import ADAPTER_FILES
from linearize.errors import UserError, one_line
from linearize.files import sha256_file, write_json
from linearize.models.exported import is_export_dir
from linearize.train.checkpoint import MANIFEST, latest_checkpoint
from linearize.train.loop import METRICS_FILE, PLOT_FILE
from linearize.train.state import ACCEPT_HINT, RESTART_HINT, check_same_config, stage_view

# Every name a run directory holds, declared once; `RunDir` / `StageDir` / `CompareDir` build the paths.
LOCK_FILE = ".lock"
RUN_MARKER = ".linearize_run"  # <run>/: linearize made this run directory
STAGE_MARKER = ".linearize_stage"
COMPARE_MARKER = ".linearize_compare"  # <compare out>/: linearize made this compare folder
TEACHER_RECORD = "teacher.json"  # <run>/: the teacher's fingerprint when the run started
DISCARDED = re.compile(r"^\.(?P<stage>[\w-]+)\.discarded-\d+$")
RUN_CONFIG = "config.yaml"  # the resolved config the run was started with
REPORT_FILE = "report.md"
DONE_FILE = "DONE"
SKIPPED = "skipped"  # the metrics key of a stage that had nothing to do; its value says why
STUDENT_FILE = "student.safetensors"
ADAPTER_DIR = "adapter"
CALIBRATION_FILE = "calibration.json"
LAYER_CHOICE_FILE = "softmax_layers.json"
LAYER_CHOICE_PLOT = "softmax_layers.png"
BLOCK_PREFIX = "block_"  # <stage>/block_<b>/: one block of block-wise transfer, a sub-stage
CACHE_DIR = "hidden"  # <stage>/hidden/: the teacher's hidden states at block inputs
EXPORT_DIR = "export"
TEACHER_SAMPLES_DIR = "teacher_samples"  # <run>/teacher_samples/: the teacher source's shards (stages/teacher_data.py)
EVAL_FILE = "eval.json"
TEACHER_DIR = "teacher"  # <evaluate>/teacher/: the teacher's long-context tables and heatmap
COMPARE_RECORD = "compare_run.json"  # per compared run: wall time and the cached extra measurements
COMPARE_MD, COMPARE_JSON, COMPARE_PNG = "compare.md", "compare.json", "compare.png"
COMPARE_AGREEMENT_PNG = "compare_agreement.png"
TEXTS_DIR = "texts"  # <compare out>/texts/<kind>.jsonl
TEACHER_CACHE_DIR = "teacher_cache"  # the teacher's measurements, shared by the rows (evaluate.behaviour.teacher_cache)


@dataclass(frozen=True)
class StageDir:
    """`<run>/<stage>/` (or a block's sub-stage folder) and the files a stage keeps there."""

    path: Path

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def done(self) -> Path:
        return self.path / DONE_FILE

    @property
    def marker(self) -> Path:
        return self.path / STAGE_MARKER

    @property
    def student(self) -> Path:
        return self.path / STUDENT_FILE

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def calibration(self) -> Path:
        return self.path / CALIBRATION_FILE

    @property
    def layer_choice(self) -> Path:
        return self.path / LAYER_CHOICE_FILE

    @property
    def layer_choice_plot(self) -> Path:
        return self.path / LAYER_CHOICE_PLOT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def loss_plot(self) -> Path:
        return self.path / PLOT_FILE

    @property
    def cache(self) -> Path:
        return self.path / CACHE_DIR

    @property
    def eval(self) -> Path:
        return self.path / EVAL_FILE

    @property
    def teacher(self) -> Path:
        return self.path / TEACHER_DIR

    def block(self, index: int) -> "StageDir":
        return StageDir(self.path / f"{BLOCK_PREFIX}{index}")


@dataclass(frozen=True)
class RunDir:
    """`<output_dir>/<run_name>/`: named paths for every file a run holds."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / RUN_CONFIG

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def export(self) -> Path:
        return self.root / EXPORT_DIR

    @property
    def teacher_samples(self) -> Path:
        return self.root / TEACHER_SAMPLES_DIR

    @property
    def compare_record(self) -> Path:
        return self.root / COMPARE_RECORD

    @property
    def marker(self) -> Path:
        return self.root / RUN_MARKER

    @property
    def teacher_record(self) -> Path:
        return self.root / TEACHER_RECORD

    def stage(self, name: str) -> StageDir:
        return StageDir(self.root / name)

    def is_run(self) -> bool:
        return self.marker.is_file() or self.config.is_file()


@dataclass(frozen=True)
class CompareDir:
    """`linearize compare --out DIR`: the table, the numbers, the plot, the texts and one run per config."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def markdown(self) -> Path:
        return self.root / COMPARE_MD

    @property
    def json(self) -> Path:
        return self.root / COMPARE_JSON

    @property
    def plot(self) -> Path:
        return self.root / COMPARE_PNG

    @property
    def agreement_plot(self) -> Path:
        return self.root / COMPARE_AGREEMENT_PNG

    @property
    def texts(self) -> Path:
        return self.root / TEXTS_DIR

    def text(self, kind: str) -> Path:
        return self.texts / f"{kind}.jsonl"

    @property
    def teacher_cache(self) -> Path:
        return self.root / TEACHER_CACHE_DIR

    @property
    def marker(self) -> Path:
        return self.root / COMPARE_MARKER

    def run(self, stem: str) -> RunDir:
        return RunDir(self.root / stem)

    def is_compare(self) -> bool:
        """The marker, or (folders from before markers) a compare.json with its setup and rows."""
        if self.marker.is_file():
            return True
        try:
            record = json.loads(self.json.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(record, dict) and {"setup", "rows"} <= record.keys()


# ---------------------------------------------------------------------------------------------- ownership


def _foreign_content(folder: Path, ignored=(LOCK_FILE,)) -> bool:
    """The folder holds something besides the files named in `ignored` (a lock an earlier refusal left)."""
    return folder.is_dir() and any(entry.name not in ignored for entry in folder.iterdir())


def _is_legacy_run(run: RunDir) -> bool:
    """A run from before run markers: its config.yaml beside at least one linearize stage folder."""
    from .registry import STAGES

    return run.config.is_file() and any(is_linearize_stage(run.root / stage) for stage in STAGES
                                        if (run.root / stage).is_dir())


def claim_run(run_dir: Path) -> RunDir:
    """Creates the run directory or takes over one linearize made; refuses (one line) a file, or a
    non-empty folder that is not a linearize run (no marker), so nothing of the user's is overwritten."""
    run = RunDir(run_dir)
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"run directory {run.root} is a file; move it away or use another run_name")
    if not run.marker.is_file() and _foreign_content(run.root) and not _is_legacy_run(run):
        raise UserError(f"{run.root} exists and is not a linearize run directory (no {RUN_MARKER} marker); "
                        "move it away or use another run_name")
    run.root.mkdir(parents=True, exist_ok=True)
    if not run.marker.is_file():
        write_json(run.marker, {"linearize": "run"}, indent=None)
    return run


def claim_compare(out_dir: Path) -> CompareDir:
    """The same rule for `linearize compare --out DIR`: a new or empty folder, or a compare folder."""
    where = CompareDir(out_dir)
    if where.root.exists() and not where.root.is_dir():
        raise UserError(f"compare --out {where.root} is a file; choose a folder")
    if not where.is_compare() and _foreign_content(where.root, ignored=()):
        raise UserError(f"compare --out {where.root} exists and is not a linearize compare folder (no "
                        f"{COMPARE_MARKER} marker); choose a new or empty folder")
    where.root.mkdir(parents=True, exist_ok=True)
    if not where.marker.is_file():
        write_json(where.marker, {"linearize": "compare"}, indent=None)
    return where


def enclosing_run(path: Path) -> Optional[RunDir]:
    """The run directory `path` lies in (or is), found by the markers of its folders upwards; None."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        run = RunDir(folder)
        if run.marker.is_file() or _is_legacy_run(run):  # a config.yaml alone is no run (a home folder may hold one)
            return run
    return None
# Later stages supersede earlier ones: LoRA may have trained the student parameters further.
STUDENT_SOURCES = ("lora_recovery", "attention_transfer")


def _lock_holder(handle) -> str:
    handle.seek(0)
    text = handle.read().strip()
    return f"process {text}" if text else "another process"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Holds `<run_dir>/.lock` for the block; UserError naming the holder's PID if another process has it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(f"{run_dir} is in use by {_lock_holder(handle)} (one process per run directory); "
                            "wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # the lock goes with the descriptor; an empty file names no holder
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def mark_stage(stage_dir: Path, stage: str) -> None:
    """Creates the stage folder (if needed) and records that linearize owns it."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker = stage_dir / STAGE_MARKER
    if not marker.is_file():
        write_json(marker, {"stage": stage}, indent=None)


def _has_legacy_done(stage_dir: Path) -> bool:
    """A DONE record with the keys linearize writes (runs made before stage markers existed)."""
    try:
        record = json.loads((stage_dir / DONE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"metrics", "config"} <= record.keys()


def is_linearize_stage(stage_dir: Path) -> bool:
    """The stage marker, or (runs from before markers) a linearize DONE record or checkpoint."""
    stage_dir = Path(stage_dir)
    if (stage_dir / STAGE_MARKER).is_file() or _has_legacy_done(stage_dir):
        return True
    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is not None and (checkpoint / MANIFEST).is_file():
        return True
    return is_export_dir(stage_dir)  # the export stage replaces its folder, marker included


def check_owned(stage_dir: Path) -> None:
    """Refuses to run a stage into an existing, non-empty folder that linearize did not write."""
    stage_dir = Path(stage_dir)
    if stage_dir.is_dir() and any(stage_dir.iterdir()) and not is_linearize_stage(stage_dir):
        raise UserError(f"{stage_dir} exists but was not written by linearize (no {STAGE_MARKER} marker); "
                        "move it away or use another run_name")
    if stage_dir.exists() and not stage_dir.is_dir():
        raise UserError(f"{stage_dir} is a file, where linearize keeps a stage folder; move it away")


def discard_stage(stage_dir: Path) -> bool:
    """Deletes a linearize stage folder (rename, then delete). Returns False if there was none; refuses
    (UserError) a folder linearize did not write."""
    stage_dir = Path(stage_dir)
    if not stage_dir.exists():
        return False
    check_owned(stage_dir)
    aside = stage_dir.with_name(f".{stage_dir.name}.discarded-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(stage_dir, aside)
    shutil.rmtree(aside)
    return True


def remove_discard_leftovers(run_dir: Path) -> None:
    """Deletes hidden `.<stage>.discarded-<pid>` folders an interrupted discard left behind."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for leftover in run_dir.iterdir():
            if DISCARDED.match(leftover.name) and leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- DONE records


def config_digest(config: dict, stage: str) -> str:
    """sha256 of the part of `config` that `stage` depends on (key order does not matter)."""
    return hashlib.sha256(json.dumps(stage_view(config, stage), sort_keys=True).encode()).hexdigest()


# The outputs a DONE record vouches for by sha256, where the stage wrote them: a student or adapter swapped,
# or a layer-choice record edited, after the stage finished is refused instead of silently used.
VOUCHED = (STUDENT_FILE, LAYER_CHOICE_FILE, CALIBRATION_FILE, EVAL_FILE, *(f"{ADAPTER_DIR}/{name}" for name in ADAPTER_FILES))
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def vouched_files(stage_dir: Path) -> dict[str, str]:
    """relative name → sha256 of the VOUCHED files present in `stage_dir`."""
    return {name: sha256_file(Path(stage_dir) / name) for name in VOUCHED if (Path(stage_dir) / name).is_file()}


def mark_done(stage_dir: Path, metrics: dict, config: dict, *, stage: Optional[str] = None) -> None:
    """Writes `<stage_dir>/DONE` with the stage's final metrics, the config it ran with, and the sha256 of
    the outputs it vouches for (`VOUCHED`). With `stage`, the record keeps only the digest of that stage's
    config and vouches for no file: for a folder meant to be shared (the export), whose config would name
    local paths of this machine."""
    record = {"metrics": metrics}
    if stage is None:
        record["config"] = config
        record["files"] = vouched_files(stage_dir)
    else:
        record["config_digest"] = config_digest(config, stage)
    write_json(Path(stage_dir) / DONE_FILE, record)


def same_config_as_done(done: dict, config: dict, stage: str, where: Path, accept: bool) -> list[str]:
    """check_same_config against a DONE record, which holds the config or (shared folders) its digest."""
    if "config" in done:
        return check_same_config(done["config"], config, stage, where, accept)
    if done["config_digest"] == config_digest(config, stage):
        return []
    if not accept:
        raise UserError(f"{stage}: the config changed since {where} was written (the record keeps only a digest, "
                        f"so the keys are not named); use a new run_name, {RESTART_HINT}, or {ACCEPT_HINT}")
    return ["<config digest>"]


def _well_formed_done(record) -> bool:
    files = record.get("files", {}) if isinstance(record, dict) else None
    return (isinstance(record, dict) and isinstance(record.get("metrics"), dict)
            and (isinstance(record.get("config"), dict) or isinstance(record.get("config_digest"), str))
            and isinstance(files, dict)
            and all(isinstance(k, str) and isinstance(v, str) and SHA256_HEX.match(v) for k, v in files.items()))


def read_done(stage_dir: Path, verify: bool = True):
    """The DONE record ({"metrics", "config" or "config_digest", "files"}) of a finished stage, or None.
    One line naming the file when it is not such a record; with `verify`, also when a file it vouches for
    is missing or changed since the stage finished."""
    path = Path(stage_dir) / DONE_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is corrupt ({one_line(err)}); delete it, or re-run the stage with --force") from None
    if not _well_formed_done(record):
        raise UserError(f"{path} is corrupt (not a DONE record: an object with metrics, config and file hashes); "
                        "delete it, or re-run the stage with --force")
    if verify:
        verify_done_files(Path(stage_dir), record)
    return record


def verify_done_files(stage_dir: Path, record: dict) -> None:
    """Refuses (one line) a vouched file that is missing or whose sha256 differs from the DONE record's."""
    for name, digest in record.get("files", {}).items():
        path = stage_dir / name
        if not path.is_file():
            raise UserError(f"{path} is missing, though the DONE record of {stage_dir.name} vouches for it; restore "
                            "it, or re-run the stage with --force")
        if sha256_file(path) != digest:
            raise UserError(f"{path} changed after {stage_dir.name} finished (its sha256 differs from the DONE "
                            "record's): restore it, or re-run the stage with --force")


def clear_done(stage_dir: Path) -> None:
    (Path(stage_dir) / DONE_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- stage outputs


def finished(run_dir: Path, stage: str) -> bool:
    """True if `stage` finished in `run_dir` and wrote its outputs; False if it never started or was
    skipped (it had nothing to train, so it wrote none). UserError if it started and did not finish:
    its outputs must not be replaced by silent defaults."""
    stage_dir = Path(run_dir) / stage
    done = read_done(stage_dir)
    if done is not None:
        return not (isinstance(done["metrics"], dict) and SKIPPED in done["metrics"])
    if stage_dir.is_dir() and any(stage_dir.iterdir()):
        raise UserError(f"{stage} in {run_dir} has not finished (no DONE record in {stage_dir}): run it to the "
                        "end first (`linearize run` resumes it)")
    return False


def _missing_output(stage: str, path: Path) -> UserError:
    return UserError(f"{stage} finished but its output {path} is missing; re-run the stage (`--force`) to recreate it")


def find_student_file(run_dir: Path, sources=STUDENT_SOURCES) -> Optional[Path]:
    """The newest finished stage's saved student parameters, or None (no stage trained them). A finished
    stage without its file, or a stage that started and did not finish, is an error, never a fallback."""
    for stage in sources:
        if finished(run_dir, stage):
            path = Path(run_dir) / stage / STUDENT_FILE
            if not path.is_file():
                raise _missing_output(stage, path)
            return path
    return None


def adapter_dir(run_dir: Path) -> Optional[Path]:
    """The LoRA stage's adapter folder if that stage finished, None if it never ran or ran without LoRA
    targets (it trained only the student parameters); UserError if it finished without a loadable adapter
    (or started and did not finish)."""
    if not finished(run_dir, "lora_recovery"):
        return None
    done = read_done(Path(run_dir) / "lora_recovery", verify=False)  # verified by finished()
    if done.get("config", {}).get("lora_recovery", {}).get("targets") == []:
        return None
    adapter = Path(run_dir) / "lora_recovery" / ADAPTER_DIR
    for needed in ADAPTER_FILES:
        if not (adapter / needed).is_file():
            raise _missing_output("lora_recovery", adapter / needed)
    return adapter


# ---------------------------------------------------------------------------------------------- the teacher


def read_teacher_record(run: RunDir) -> Optional[dict]:
    """`<run>/teacher.json` (a teacher fingerprint), checked; None for a run from before the record."""
    path = run.teacher_record
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is corrupt ({one_line(err)}); delete it to record the current teacher") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not (isinstance(files, dict) and isinstance(record.get("digest"), str)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        raise UserError(f"{path} is not a teacher record (an object with 'files' and 'digest'); delete it to "
                        "record the current teacher")
    return record


def check_teacher(run: RunDir, model_cfg, record_new: bool = False) -> dict:
    """The teacher's fingerprint, checked against the run's record: one line naming model.path when its
    files changed since the run started. record_new: (re)write the record instead (a new run, or every
    stage re-run from scratch). A run without a record gets one."""
    from linearize.models.fingerprint import changed_files, teacher_fingerprint

    current = teacher_fingerprint(model_cfg.path, model_cfg.tokenizer)
    recorded = None if record_new else read_teacher_record(run)
    if recorded is None:
        if run.root.is_dir() and os.access(run.root, os.W_OK):
            write_json(run.teacher_record, current)
        return current
    changed = changed_files(recorded, current)
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise UserError(f"model.path {model_cfg.path!r}: the teacher changed since this run started ({shown} differ "
                        f"from {run.teacher_record}); restore it, use a new run_name, or re-run every stage with --force")
    return current
