"""What a run directory promises (issue 10): one process per run, nothing deleted that linearize did not
write, deletions that cannot leave a half-deleted stage, and refused inputs that would silently train on
garbage (a binary "text" file, a sequence length beyond the teacher's context, a damaged DONE record)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types

import pytest

from linearize.errors import UserError
from stages import rundir


# ---------------------------------------------------------------------------------------------- lock


HOLD_LOCK = """
import sys, time
from stages.rundir import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_process_on_a_run_directory_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by process {holder.pid} "):
            with rundir.run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with rundir.run_lock(tmp_path):  # the holder died (SIGKILL): its lock is taken over
        assert (tmp_path / rundir.LOCK_FILE).read_text().strip() == str(os.getpid())


def test_run_stages_takes_the_lock(tmp_path, monkeypatch):
    from stages import pipeline

    cfg = types.SimpleNamespace(output_dir=str(tmp_path), run_name="r", stages=["evaluate"],
                                engine=types.SimpleNamespace(name="single"))
    monkeypatch.setattr(pipeline, "_run_locked", lambda *args: {"ran": True})
    with rundir.run_lock(tmp_path / "r"):
        with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
            pipeline.run_stages(cfg)
    assert pipeline.run_stages(cfg) == {"ran": True}


# ---------------------------------------------------------------------------------------------- discarding


def test_only_marked_stage_folders_are_discarded(tmp_path):
    users = tmp_path / "evaluate"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not written by linearize"):
        rundir.discard_stage(users)
    assert (users / "notes.txt").read_text() == "mine"
    ours = tmp_path / "export"
    rundir.mark_stage(ours, "export")
    (ours / "model.safetensors").write_text("x")
    assert rundir.discard_stage(ours) and not ours.exists()
    assert not rundir.discard_stage(ours)  # nothing there: nothing to do


def test_an_interrupted_discard_leaves_no_stage_that_looks_finished(tmp_path, monkeypatch):
    stage = tmp_path / "evaluate"
    rundir.mark_stage(stage, "evaluate")
    (stage / "DONE").write_text('{"metrics": {}, "config": {}}')
    real_rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        if ".discarded-" in str(path) and not kwargs.get("ignore_errors"):
            raise KeyboardInterrupt  # Ctrl-C in the middle of deleting
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rundir.discard_stage(stage)
    assert not stage.exists()  # renamed away first: no DONE is left where the pipeline looks
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    rundir.remove_discard_leftovers(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_run_into_a_foreign_folder_is_refused(tmp_path):
    from stages.pipeline import _plan

    users = tmp_path / "lora_recovery"
    users.mkdir()
    (users / "data.bin").write_bytes(b"\0")
    with pytest.raises(UserError, match="not written by linearize"):
        _plan(users, "lora_recovery", {}, force=True, accept_changes=False)


# ---------------------------------------------------------------------------------------------- inputs


def test_a_binary_file_is_not_text(tmp_path):
    from linearize.data import load_texts

    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(UserError, match=r"weights.txt is not text: \d+% of its characters"):
        load_texts(str(binary))
    mostly_text = tmp_path / "latin1.txt"
    mostly_text.write_bytes("Caf\xe9 au lait, a name like Jos\xe9.\nSecond line.\n".encode("latin-1"))
    assert load_texts(str(mostly_text))[1] == "Second line."  # a few stray bytes are still text


def test_seq_len_beyond_the_trained_context_needs_an_explicit_yes(make_tiny_model):
    from linearize.train.student import check_context

    model = make_tiny_model("llama")  # max_position_embeddings 512
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(seq_len=513, allow_beyond_context=False))
    with pytest.raises(UserError, match=r"data.seq_len=513 is beyond .*max_position_embeddings=512"):
        check_context(cfg, model)
    cfg.data.allow_beyond_context = True
    check_context(cfg, model)
    cfg.data.seq_len, cfg.data.allow_beyond_context = 512, False
    check_context(cfg, model)


@pytest.mark.parametrize("content", ["[]", '{"metrics": {}}', "{not json", '{"config": 3, "metrics": {}}'])
def test_a_malformed_done_record_is_one_line(tmp_path, content):
    from stages.rundir import read_done

    (tmp_path / "DONE").write_text(content)
    with pytest.raises(UserError, match="DONE is corrupt"):
        read_done(tmp_path)
