"""Write faults made real, not injected: a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored), a read-only
folder (chmod 0o555, or a read-only bind mount where the tests run as root, which ignores the mode) and a
full small file system (a tmpfs in a private user + mount namespace). Each fault hits every kind of file
a run writes: safetensors (student, hidden-cache shard, checkpoint), JSON, PNG and the export's weights.

The writes run in a child process (`python tests/test_write_faults.py FAULT FOLDER`): it writes a
previous version of every file, turns the fault on, writes each again and prints what happened as JSON.
Each must give a UserError of one line naming the path and the cause, leave the previous file (or
folder) byte-identical, and leave no temp file behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Below every file written here (the smallest, a JSON record, is ~2 KiB) and above none: each write fails.
FSIZE_LIMIT = 1024
TMPFS_SIZE = "4m"  # room for the previous versions; filled up before the writes under test
CAUSES = {"fsize": ("file too large",), "readonly": ("read-only file system", "permission denied"),
          "full": ("disk full",)}
WRITERS = ("student", "hidden_shard", "checkpoint", "json", "jsonl", "png", "metrics_plot", "export")


# ------------------------------------------------------------------------------------------- the child


def _tiny_student():
    import torch

    import linearize
    from conftest import tiny_model
    from linearize.config import AttentionConfig

    model = tiny_model("llama")
    linearize.linearize_model(model, AttentionConfig(mechanism="linear"))
    return model, torch


def _writers(folder: Path, tokenizer_dir: Path) -> dict:
    """name → (path whose content must survive, write(version)); version 0 is the previous file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from transformers import AutoTokenizer

    from linearize.files import save_figure, write_json, write_jsonl
    from linearize.models.exported import save_export
    from linearize.train.checkpoint import TrainerState, save_checkpoint
    from linearize.train.hidden_cache import HiddenCache
    from linearize.train.metrics import plot_metrics
    from linearize.train.student import save_student

    model, torch = _tiny_student()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    cache = HiddenCache(folder / "cache", torch.zeros(4, 8, dtype=torch.long), torch.float32, {"teacher": "tiny"})

    def figure(version):
        fig = Figure(figsize=(3, 2))
        FigureCanvasAgg(fig)
        fig.subplots().plot([0, 1, 2], [version, 2, 1])
        return fig

    def checkpoint(version):
        save_checkpoint(folder / "stage", model, {"optimizer": optimizer.state_dict(), "scaler": None}, {"step": 0},
                        TrainerState(step=version + 1), {"seed": version}, keep_last=0, data={})

    records = [{"step": s, "loss": 1.0 / (s + 1), "lr": 1e-3, "padding": "x" * 64} for s in range(30)]
    return {
        "student": (folder / "student.safetensors", lambda v: save_student(model, folder / "student.safetensors")),
        "hidden_shard": (cache._shard_path(1, 0), lambda v: cache._write_shard(1, 0, torch.full((4, 8, 64), float(v)))),
        "checkpoint": (folder / "stage" / "step_1", checkpoint),
        "json": (folder / "eval.json", lambda v: write_json(folder / "eval.json", {"v": v, "rows": list(range(400))})),
        "jsonl": (folder / "metrics.jsonl", lambda v: write_jsonl(folder / "metrics.jsonl", records[v:])),
        "png": (folder / "plot.png", lambda v: save_figure(figure(v), folder / "plot.png")),
        "metrics_plot": (folder / "loss.png", lambda v: plot_metrics(records[v:], folder / "loss.png", f"run {v}")),
        "export": (folder / "export", lambda v: save_export(model, tokenizer, folder / "export", run_config={"v": v})),
    }


def _snapshot(path: Path) -> dict:
    """Relative name → bytes of a file or of every file under a folder."""
    if path.is_file():
        return {"": path.read_bytes().hex()}
    return {p.relative_to(path).as_posix(): p.read_bytes().hex() for p in sorted(path.rglob("*")) if p.is_file()}


def _names(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def _fault_on(fault: str, folder: Path) -> None:
    if fault == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, resource.RLIM_INFINITY))
    elif fault == "readonly":
        if os.geteuid() != 0:
            for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
                path.chmod(0o555)
        else:  # root ignores the mode; a read-only bind mount binds root too (we are in a private namespace)
            subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
    elif fault == "full":
        with open(folder / "filler", "wb", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)  # one page at a time, so the disk ends up full to the page
            except OSError:
                pass


def child(fault: str, folder: Path, tokenizer_dir: Path) -> None:
    sys.path.insert(0, str(HERE))
    import torch

    torch.set_num_threads(1)
    if fault == "full":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(folder)], check=True)
    writers = _writers(folder, tokenizer_dir)
    for _, write in writers.values():
        write(0)
    before = {name: _snapshot(path) for name, (path, _) in writers.items()}
    _fault_on(fault, folder)
    names = _names(folder)  # after the fault: the filler of a full disk is ours
    from linearize.errors import UserError

    results = {}
    for name, (path, write) in writers.items():
        try:
            write(1)
            outcome = {"error": None}
        except UserError as err:
            outcome = {"error": "UserError", "message": str(err)}
        except Exception as err:  # what the test must never see: a traceback's exception
            outcome = {"error": type(err).__name__, "message": str(err)}
        outcome.update(path=str(path), intact=_snapshot(path) == before[name], leftovers=sorted(_names(folder) - names))
        results[name] = outcome
    print(json.dumps(results))


# ------------------------------------------------------------------------------------------- the tests


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0


def _run_child(fault: str, folder: Path, tokenizer_dir: Path) -> dict:
    command = [sys.executable, str(Path(__file__)), fault, str(folder), str(tokenizer_dir)]
    if fault == "full" or (fault == "readonly" and os.geteuid() == 0):
        command = ["unshare", "-Urm", *command]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=list(CAUSES))
def fault_results(request, tmp_path_factory, tiny_tokenizer):
    fault = request.param
    if fault == "full" and not _unshare_works():
        pytest.skip("a small full file system needs a tmpfs mounted in a user namespace (`unshare -Urm`), "
                    "which this machine does not allow")
    if fault == "readonly" and os.geteuid() == 0 and not _unshare_works():
        pytest.skip("running as root, which ignores a folder's mode, and no user namespace for a read-only mount")
    folder = tmp_path_factory.mktemp(f"fault-{fault}")
    folder.chmod(0o755)
    return fault, _run_child(fault, folder, tiny_tokenizer)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_real_write_fault_is_one_line_and_loses_nothing(fault_results, writer):
    fault, results = fault_results
    result = results[writer]
    assert result["error"] == "UserError", result
    message = result["message"]
    assert len(message.splitlines()) == 1, message
    assert result["path"] in message or str(Path(result["path"]).parent) in message, message
    assert any(cause in message for cause in CAUSES[fault]), message
    assert result["intact"], f"{writer}: the previous file changed under a {fault} fault"
    assert result["leftovers"] == [], f"{writer}: left {result['leftovers']}"


if __name__ == "__main__":
    child(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
