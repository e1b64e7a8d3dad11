"""Hostile and careless use of a finished run (issue 25): foreign folders, a teacher replaced at the same
path, edited or damaged records, damaged hidden-state caches, signals and debris, compare's arguments,
write faults and non-finite numbers. Every case asserts the exit status, that stderr is one line with no
traceback, what the line says, and that the user's files and the run's finished outputs are
byte-identical afterwards. A fault that interrupts training resumes to the same student (sha256-equal).

One finished tiny run (every stage) and one finished block-wise run with an automatic layer choice are
shared by the module; each case works on a copy."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from linearize.files import sha256_file
from test_stages import tiny_run_config

STAGES_ALL = ["attention_transfer", "lora_recovery", "evaluate", "export"]
REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"\d+%\|")  # a progress bar's line (evaluation, weight loading), not a message


@pytest.fixture(autouse=True, scope="module")
def no_progress_bars():
    """transformers' weight-loading bar writes to stderr; the one line asserted there is linearize's."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------ helpers


def cli(*args) -> tuple[int, str, str]:
    """`linearize ARGS` in this process: (exit status, stderr, stdout)."""
    from stages.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main([str(a) for a in args])
    return rc, err.getvalue(), out.getvalue()


def one_line(stderr: str, *expected: str) -> str:
    """The single `linearize: ...` line of stderr, holding every expected fragment; no traceback."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines()
             if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1, stderr
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    return lines[0]


def refused(args, *expected: str, rc: int = 2) -> str:
    code, err, _ = cli(*args)
    assert code == rc, err
    return one_line(err, *expected)


def snapshot(*folders: Path) -> dict:
    """sha256 of every file below the folders (the run lock's empty file included)."""
    out = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                out[str(path)] = sha256_file(path)
    return out


def write_config(cfg, path: Path) -> Path:
    from stages.config_loader import config_to_dict

    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


class Run:
    """A copy of a shared finished run under its own folder: its config file, run dir and teacher copy."""

    def __init__(self, source: "Run | tuple", dest: Path, own_teacher: bool = False):
        from stages.config_loader import config_from_dict, config_to_dict, save_resolved

        cfg, run_dir = source
        overrides = [f"output_dir={dest / 'runs'}"]
        if own_teacher:
            self.teacher = dest / "teacher"
            shutil.copytree(cfg.model.path, self.teacher)
            overrides.append(f"model.path={self.teacher}")
        shutil.copytree(run_dir, dest / "runs" / cfg.run_name)
        self.cfg = config_from_dict(config_to_dict(cfg), "test", overrides)
        self.dir = dest / "runs" / cfg.run_name
        self.config = write_config(self.cfg, dest / "cfg.yaml")
        save_resolved(self.cfg, self.dir / "config.yaml")  # as a run at this path would have recorded it


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_tokenizer):
    """(cfg, run dir) of one tiny run of every stage."""
    from stages.pipeline import run_stages

    root = tmp_path_factory.mktemp("hostile")
    cfg = tiny_run_config(root, tiny_tokenizer)
    with contextlib.redirect_stdout(io.StringIO()):
        run_stages(cfg)
    return cfg, Path(cfg.output_dir) / cfg.run_name


@pytest.fixture
def run(finished, tmp_path) -> Run:
    return Run(finished, tmp_path)


@pytest.fixture(scope="module")
def blockwise(tmp_path_factory, tiny_tokenizer):
    """Block-wise stage 1 (one layer per block, both converted): (cfg, finished run dir, its student's
    sha256, (cfg, run dir) of a copy interrupted by Ctrl-C after block 0, the hidden-state cache built)."""
    from stages import blockwise as bw
    from stages.config_loader import config_from_dict, config_to_dict
    from stages.pipeline import run_stages

    root = tmp_path_factory.mktemp("blockwise")
    cfg = tiny_run_config(root, tiny_tokenizer, attention_transfer={"block_size": 1})
    cfg = config_from_dict(config_to_dict(cfg), "test", ["stages=[attention_transfer]"])
    with contextlib.redirect_stdout(io.StringIO()):
        run_stages(cfg)
    run_dir = Path(cfg.output_dir) / cfg.run_name
    student = sha256_file(run_dir / "attention_transfer" / "student.safetensors")

    interrupted = config_from_dict(config_to_dict(cfg), "test", [f"output_dir={root / 'interrupted'}"])
    train_block = bw._train_block

    def stop_at_second(run, lazy, b, layers, num_blocks):
        if b == 1:
            raise KeyboardInterrupt
        return train_block(run, lazy, b, layers, num_blocks)

    bw._train_block = stop_at_second
    try:
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(KeyboardInterrupt):
            run_stages(interrupted)
    finally:
        bw._train_block = train_block
    return cfg, run_dir, student, (interrupted, Path(interrupted.output_dir) / cfg.run_name)


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, tiny_tokenizer):
    """(cfg, run dir) of stage 1 with softmax_layers: auto (one of the two layers kept)."""
    from stages.config_loader import config_from_dict, config_to_dict
    from stages.pipeline import run_stages

    root = tmp_path_factory.mktemp("auto")
    cfg = tiny_run_config(root, tiny_tokenizer, attention={"softmax_layers": "auto", "softmax_layer_count": 1,
                                                           "selection_steps": 2})
    cfg = config_from_dict(config_to_dict(cfg), "test", ["stages=[attention_transfer]"])
    with contextlib.redirect_stdout(io.StringIO()):
        run_stages(cfg)
    return cfg, Path(cfg.output_dir) / cfg.run_name


def student_of(run_dir: Path) -> str:
    return sha256_file(run_dir / "attention_transfer" / "student.safetensors")


# ------------------------------------------------------------------ 2. nothing foreign is overwritten


@pytest.mark.parametrize("content", [{"config.yaml": "mine: 1\n", "report.md": "# my notes\n"},
                                     {"data.csv": "a,b\n1,2\n"}, {"sub/keep.txt": "x"}])
def test_run_refuses_a_foreign_folder_named_by_run_name(run, tmp_path, content):
    foreign = tmp_path / "runs" / "mine"
    for name, text in content.items():
        (foreign / name).parent.mkdir(parents=True, exist_ok=True)
        (foreign / name).write_text(text)
    before = snapshot(foreign)
    refused(["run", run.config, "run_name=mine"], "not a linearize run directory", str(foreign), "another run_name")
    assert snapshot(foreign) == before and not (foreign / ".lock").exists()


def test_run_refuses_a_file_where_the_run_directory_goes(run, tmp_path):
    (tmp_path / "runs" / "afile").write_text("mine")
    refused(["run", run.config, "run_name=afile"], "is a file")
    assert (tmp_path / "runs" / "afile").read_text() == "mine"


def test_a_run_from_before_markers_still_resumes(run):
    (run.dir / ".linearize_run").unlink()
    before = snapshot(run.dir / "attention_transfer", run.dir / "lora_recovery")
    code, err, out = cli("run", run.config)
    assert code == 0, err
    assert "attention_transfer: done, skipping" in out
    assert snapshot(run.dir / "attention_transfer", run.dir / "lora_recovery") == before


@pytest.mark.parametrize("where", ["attention_transfer", "lora_recovery/adapter", "evaluate", ".", "..", "other"])
def test_export_refuses_a_destination_inside_a_run(run, tmp_path, where):
    if where == "other":  # another run's folder
        Run((run.cfg, run.dir), tmp_path / "second")
        dest = tmp_path / "second" / "runs" / "tiny" / "attention_transfer"
    else:
        dest = run.dir / where
    before = snapshot(tmp_path)
    line = refused(["export", run.dir, dest, "--overwrite"], "export destination")
    assert "run directory" in line and "choose" in line
    assert snapshot(tmp_path) == before


def test_export_refuses_a_compare_folder(run, tmp_path):
    folder = tmp_path / "cmp"
    folder.mkdir()
    (folder / ".linearize_compare").write_text("{}")
    (folder / "compare.md").write_text("# mine")
    before = snapshot(folder)
    refused(["export", run.dir, folder, "--overwrite"], "compare folder")
    assert snapshot(folder) == before


def test_export_refuses_a_foreign_folder_without_overwrite(run, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    refused(["export", run.dir, folder], "not a linearize export")
    assert (folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("content", [{"compare.md": "# my table\n"}, {"texts/code.jsonl": "{}\n"}])
def test_compare_refuses_a_foreign_out_folder(run, tmp_path, content):
    out = tmp_path / "out"
    for name, text in content.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    refused(["compare", run.config, "--out", out, "--texts", ""], "not a linearize compare folder", str(out))
    assert snapshot(out) == before


def test_compare_refuses_a_file_as_out(run, tmp_path):
    (tmp_path / "out").write_text("mine")
    refused(["compare", run.config, "--out", tmp_path / "out", "--texts", ""], "is a file")
    assert (tmp_path / "out").read_text() == "mine"


# ------------------------------------------------------------------------ 3. the teacher's identity


def _change_weights(teacher: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = teacher / "model.safetensors"
    state = load_file(path)
    name = next(n for n in state if n.endswith("q_proj.weight"))
    state[name] = state[name] + 0.01
    save_file(state, path, metadata={"format": "pt"})


def _change_tokenizer(teacher: Path) -> None:
    path = teacher / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["model_max_length"] = 12345
    path.write_text(json.dumps(config))


@pytest.fixture
def own_teacher_run(finished, tmp_path) -> Run:
    from stages.rundir import RunDir, check_teacher

    copy = Run(finished, tmp_path, own_teacher=True)
    check_teacher(RunDir(copy.dir), copy.cfg.model)  # same files at the new path: recorded fingerprint holds
    return copy


@pytest.mark.parametrize("change", [_change_weights, _change_tokenizer], ids=["weights", "tokenizer"])
@pytest.mark.parametrize("command", ["run", "stage", "export", "eval"])
def test_a_changed_teacher_is_refused_naming_model_path(own_teacher_run, tmp_path, change, command):
    r = own_teacher_run
    change(r.teacher)
    before = snapshot(r.dir)
    args = {"run": ["run", r.config], "stage": ["stage", "evaluate", r.config],
            "export": ["export", r.dir, tmp_path / "exported"], "eval": ["eval", r.dir, "--out", tmp_path / "ev"]}
    refused(args[command], "model.path", "the teacher changed since this run started", "teacher.json")
    assert snapshot(r.dir) == before and not (tmp_path / "exported").exists()


def test_a_touched_but_equal_teacher_is_accepted(run):
    weights = Path(run.cfg.model.path) / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # re-hashed, same content
    try:
        before = snapshot(run.dir / "attention_transfer")
        code, err, out = cli("stage", "attention_transfer", run.config)
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert code == 0, err
    assert "done, skipping" in out
    assert snapshot(run.dir / "attention_transfer") == before


@pytest.mark.parametrize("text", ["{", "[1]", '{"files": 3, "digest": "x"}'])
def test_a_corrupt_teacher_record_is_one_line(run, text):
    (run.dir / "teacher.json").write_text(text)
    before = snapshot(run.dir)
    refused(["run", run.config], "teacher.json", "delete it")
    assert snapshot(run.dir) == before


def test_the_hidden_cache_key_holds_the_teacher(tmp_path):
    import torch

    from linearize.train.hidden_cache import HiddenCache

    rows = torch.arange(8).reshape(2, 4)
    keys = {HiddenCache(tmp_path, rows, torch.float32, {"model": "m", "teacher": t}).key(1) for t in ("a", "b")}
    assert len(keys) == 2


def test_a_teacher_changed_during_a_blockwise_stage_is_refused(blockwise, tmp_path):
    cfg, _, _, (interrupted, idir) = blockwise
    teacher = tmp_path / "teacher"
    shutil.copytree(cfg.model.path, teacher)
    run_dir = tmp_path / "runs" / cfg.run_name
    shutil.copytree(idir, run_dir)
    from stages.config_loader import config_from_dict, config_to_dict

    moved = config_from_dict(config_to_dict(cfg), "test", [f"output_dir={tmp_path / 'runs'}", f"model.path={teacher}"])
    _change_weights(teacher)
    before = snapshot(run_dir)
    refused(["run", write_config(moved, tmp_path / "cfg.yaml")], "model.path", "teacher changed")
    assert snapshot(run_dir) == before


# ------------------------------------------------------------------------------- 4. typed records


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"config": {}}', '{"metrics": 1, "config": {}}',
                                  '{"metrics": {}, "config": {}, "files": {"student.safetensors": 5}}'])
def test_a_corrupt_done_record_is_one_line(run, text):
    (run.dir / "attention_transfer" / "DONE").write_text(text)
    before = snapshot(run.dir)
    refused(["run", run.config], "attention_transfer/DONE", "corrupt", "--force")
    assert snapshot(run.dir) == before


@pytest.mark.parametrize("victim", ["attention_transfer/student.safetensors", "lora_recovery/adapter/adapter_model.safetensors",
                                    "evaluate/eval.json"])
@pytest.mark.parametrize("how", ["edited", "missing"])
def test_a_vouched_file_changed_after_done_is_refused(run, victim, how):
    path = run.dir / victim
    if how == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[-2] ^= 0xFF
        path.write_bytes(bytes(data))
    before = snapshot(run.dir)
    refused(["run", run.config], str(path), "--force")
    assert snapshot(run.dir) == before


def test_an_edited_layer_choice_is_refused(auto_run, tmp_path):
    r = Run(auto_run, tmp_path)
    path = r.dir / "attention_transfer" / "softmax_layers.json"
    record = json.loads(path.read_text())
    record["choice"] = [1 - record["choice"][0]]
    path.write_text(json.dumps(record))
    before = snapshot(r.dir)
    refused(["run", r.config], "softmax_layers.json", "changed after attention_transfer finished")
    assert snapshot(r.dir) == before


def test_the_summary_names_the_layers_that_were_trained(auto_run, tmp_path):
    r = Run(auto_run, tmp_path)
    chosen = json.loads((r.dir / "attention_transfer" / "softmax_layers.json").read_text())["choice"]
    code, err, out = cli("run", r.config)
    assert code == 0, err
    assert f"softmax attention kept in layers {chosen}" in out


@pytest.mark.parametrize("text", ["[]", "{", '{"wall_s": "slow"}', '{"wall_s": 1, "extra": {"metrics": {}}}'])
def test_a_corrupt_compare_record_is_one_line(tmp_path, text):
    from linearize.errors import UserError
    from stages.compare import _read_record

    (tmp_path / "compare_run.json").write_text(text)
    with pytest.raises(UserError, match="compare_run.json.*delete it"):
        _read_record(tmp_path)
    assert (tmp_path / "compare_run.json").read_text() == text


def _interrupted_copy(blockwise, tmp_path) -> Run:
    cfg, _, _, (interrupted, idir) = blockwise
    return Run((interrupted, idir), tmp_path)


@pytest.mark.parametrize("text", ["{", '{"metrics": {}}'])
def test_a_corrupt_block_done_record_is_one_line(blockwise, tmp_path, text):
    r = _interrupted_copy(blockwise, tmp_path)
    (r.dir / "attention_transfer" / "block_0" / "DONE").write_text(text)
    before = snapshot(r.dir)
    refused(["run", r.config], "block_0/DONE", "corrupt")
    assert snapshot(r.dir) == before


def test_a_swapped_block_student_is_refused(blockwise, tmp_path):
    r = _interrupted_copy(blockwise, tmp_path)
    path = r.dir / "attention_transfer" / "block_0" / "student.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    before = snapshot(r.dir)
    refused(["run", r.config], "block_0/student.safetensors", "changed after block_0 finished")
    assert snapshot(r.dir) == before


# -------------------------------------------------------------------- 5. the hidden-state cache


def _damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:  # a flipped byte in the tensor, the header intact
        data = bytearray(path.read_bytes())
        data[-10] ^= 0x40
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["damaged", "truncated", "missing"])
def test_a_bad_cache_shard_is_recomputed_and_the_student_is_unchanged(blockwise, tmp_path, how):
    r = _interrupted_copy(blockwise, tmp_path)
    shard = r.dir / "attention_transfer" / "hidden" / "layer_1" / "shard_00000.safetensors"
    _damage(shard, how)
    code, err, out = cli("run", r.config)
    assert code == 0, err
    assert f"{shard} is" in out and "recomputing it" in out
    assert student_of(r.dir) == blockwise[2]


def test_a_shard_damaged_while_training_reads_it_is_one_line(blockwise, tmp_path):
    import torch

    from linearize.errors import UserError
    from linearize.train.hidden_cache import HiddenCache, save_safetensors, tensor_sha256

    rows = torch.arange(8).reshape(2, 4)
    cache = HiddenCache(tmp_path, rows, torch.float32, {"model": "m"})
    hidden = torch.randn(2, 4, 3)
    path = tmp_path / "layer_1" / "shard_00000.safetensors"
    path.parent.mkdir()
    save_safetensors({"hidden": hidden}, path, metadata={"key": cache.key(1), "sha256": tensor_sha256(hidden + 1)})
    with pytest.raises(UserError, match="is damaged.*recomputes"):
        cache.lookup(1, rows, 3)


def test_a_damaged_cache_index_is_rebuilt(tmp_path):
    import torch

    from linearize.train.hidden_cache import HiddenCache

    cache = HiddenCache(tmp_path, torch.arange(8).reshape(2, 4), torch.float32, {"model": "m"})
    (tmp_path / "layer_1").mkdir()
    for text in ("{", "[]", '{"key": 5}'):
        (tmp_path / "layer_1" / "index.json").write_text(text)
        assert cache.read_index(1) is None and not cache.complete(1)


# ---------------------------------------------------------------------------- 7. signals and debris


def test_sigterm_is_one_line_143_and_resumes_to_the_same_student(blockwise, tmp_path):
    from stages import blockwise as bw

    r = _interrupted_copy(blockwise, tmp_path)
    train_block = bw._train_block

    def terminate(run, lazy, b, layers, num_blocks):
        os.kill(os.getpid(), signal.SIGTERM)
        return train_block(run, lazy, b, layers, num_blocks)

    bw._train_block = terminate
    try:
        code, err, _ = cli("run", r.config)
    finally:
        bw._train_block = train_block
    assert code == 143
    one_line(err, "terminated (SIGTERM)", "resumes")
    assert not (r.dir / "attention_transfer" / "DONE").exists()
    code, err, _ = cli("run", r.config)
    assert code == 0, err
    assert student_of(r.dir) == blockwise[2]


def test_stale_export_temps_are_removed_when_the_export_runs_again(run):
    debris = [run.dir / ".export.tmp-abc123", run.dir / ".export.old-def456"]
    for folder in debris:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    before = snapshot(run.dir / "attention_transfer", run.dir / "lora_recovery", run.dir / "evaluate")
    code, err, out = cli("stage", "export", run.config, "--force")
    assert code == 0, err
    assert not any(folder.exists() for folder in debris)
    assert "removed .export.tmp-abc123" in out
    assert snapshot(run.dir / "attention_transfer", run.dir / "lora_recovery", run.dir / "evaluate") == before


def test_eval_of_a_read_only_run_writes_elsewhere(run, tmp_path):
    """A read-only bind mount in a private namespace (root ignores file modes): eval --out works, eval
    without it says why in one line; one interpreter runs both."""
    before = snapshot(run.dir)
    out = tmp_path / "ev"
    code = (f"import contextlib, io, sys; from stages.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()): a = main(['eval', '{run.dir}', '--out', '{out}'])\n"
            f"sys.exit(10 * a + main(['eval', '{run.dir}']))\n")
    script = (f"mount --bind {run.dir} {run.dir} && mount -o remount,bind,ro {run.dir} && "
              f"{sys.executable} -c \"$0\"")
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr  # the first call 0, the second 2
    one_line(proc.stderr, "read-only", "--out DIR")
    assert {"teacher_ppl", "student_ppl"} <= json.loads((out / "eval.json").read_text()).keys()
    assert snapshot(run.dir) == before


# ------------------------------------------------------------------------------------- 8. compare


def test_compare_refuses_configs_of_different_teachers(finished, tmp_path):
    a = Run(finished, tmp_path / "a", own_teacher=True)
    b = Run(finished, tmp_path / "b", own_teacher=True)
    _change_weights(b.teacher)
    second = b.config.rename(tmp_path / "b" / "other.yaml")
    out = tmp_path / "out"
    refused(["compare", a.config, second, "--out", out, "--texts", ""], "one teacher", str(a.teacher), str(b.teacher))
    assert not out.exists()


def test_compare_texts_cannot_swallow_configs():
    from stages.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["compare", "--texts", "code,manual", "a.yaml", "b.yaml", "seed=1"])
    assert args.texts == ["code", "manual"] and args.items == ["a.yaml", "b.yaml", "seed=1"]
    args = parse_args(build_parser(), ["compare", "a.yaml", "--texts", "code", "b.yaml"])
    assert args.texts == ["code"] and args.items == ["a.yaml", "b.yaml"]


def test_compare_names_an_unknown_text_kind(run, tmp_path):
    refused(["compare", run.config, "--out", tmp_path / "out", "--texts", "code,poetry"], "unknown text kind", "poetry")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------- 1 and 6 (built elsewhere): a few cases here too


def test_a_size_limit_during_export_is_one_line_and_keeps_the_previous_export(run, tmp_path):
    dest = tmp_path / "exported"
    code, err, _ = cli("export", run.dir, dest)
    assert code == 0, err
    before = snapshot(dest, run.dir)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        code, err, _ = cli("export", run.dir, dest)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert code == 2
    one_line(err, "file too large", str(dest))
    assert snapshot(dest, run.dir) == before
    assert not list(tmp_path.glob(".exported.tmp-*"))


@pytest.mark.parametrize("override", ["attention.softmax_layer_count=nan", "attention_transfer.cache_gb=inf",
                                      "attention_transfer.lr=nan"])
def test_non_finite_numbers_are_refused_before_anything_loads(run, tmp_path, override):
    before = snapshot(run.dir)
    for command in ("config", "run"):
        code, err, _ = cli(command, run.config, override, "run_name=fresh")
        assert code == 2
        one_line(err, override.split("=")[0])
    assert snapshot(run.dir) == before and not (tmp_path / "runs" / "fresh").exists()
