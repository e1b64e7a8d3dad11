"""What an export promises beyond its logits (issue 10): its bundled code is checked against recorded
sha256s, it holds no absolute path of the machine that wrote it, it records the transformers version
and warns once outside the declared range, writing it never destroys a user's folder or leaves
temporary folders, and damaged files are one-line errors. Loading an export or a teacher never runs or asks
about remote code."""
from __future__ import annotations

import builtins
import copy
import errno
import hashlib
import importlib.metadata
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import linearize
from linearize.config import AttentionConfig
from linearize.errors import UserError
from linearize.models import bundle, export_loader, export_writer, exported
from linearize.models.exported import load_export, save_export

from conftest import tiny_model


def _export(out: Path, tokenizer_dir: Path, **kwargs) -> Path:
    from transformers import AutoTokenizer

    model = tiny_model("llama")
    linearize.linearize_model(model, AttentionConfig(mechanism="linear"))
    return save_export(model, AutoTokenizer.from_pretrained(tokenizer_dir), out, **kwargs)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_tokenizer):
    """One export, copied by the tests that damage it."""
    return _export(tmp_path_factory.mktemp("pristine") / "export", tiny_tokenizer)


@pytest.fixture
def export(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "export"))


@pytest.fixture
def prompts(monkeypatch):
    """The questions asked through input(), which is how transformers asks `[y/N]` (it turns any error
    of input() into its usual refusal, so only the record shows that it asked)."""
    asked = []

    def record(question=""):
        asked.append(question)
        raise EOFError

    monkeypatch.setattr(builtins, "input", record)
    return asked


def _section(export: Path) -> dict:
    return json.loads((export / "config.json").read_text())["linearize"]


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------ bundle hashes


def test_export_records_the_sha256_of_every_bundled_file(export):
    recorded = _section(export)["bundle"]
    assert bundle.MODELING_FILE in recorded
    assert set(recorded) == {p.name for p in export.glob("*.py")}
    for name, digest in recorded.items():
        assert hashlib.sha256((export / name).read_bytes()).hexdigest() == digest


def _change_a_file(export: Path) -> str:
    name = sorted(_section(export)["bundle"])[-1]
    with open(export / name, "a") as handle:
        handle.write("\nimport os  # an added line\n")
    return name


def _add_a_file(export: Path) -> str:
    (export / "lz_extra.py").write_text("print('not recorded')\n")
    return "lz_extra.py"


def _remove_a_file(export: Path) -> str:
    (export / bundle.MODELING_FILE).unlink()
    return bundle.MODELING_FILE


def _drop_the_record(export: Path) -> str:
    config = json.loads((export / "config.json").read_text())
    del config["linearize"]["bundle"]
    (export / "config.json").write_text(json.dumps(config))
    return "re-export"


@pytest.mark.parametrize("damage", [_change_a_file, _add_a_file, _remove_a_file, _drop_the_record])
def test_load_export_refuses_a_bundle_that_is_not_the_recorded_one(export, damage):
    named = damage(export)
    with pytest.raises(UserError) as excinfo:
        load_export(export)
    assert named in _one_line_error(excinfo)


def test_an_export_without_code_and_without_record_still_loads(export):
    """Exports from before the bundle (no .py files) cannot run foreign code: nothing to verify."""
    _drop_the_record(export)
    for file in export.glob("*.py"):
        file.unlink()
    load_export(export)


# ------------------------------------------------------------------------------------------ remote code


def test_load_export_never_runs_or_asks_about_remote_code(export, prompts):
    """A config.json whose model type only its auto_map could supply: without trust_remote_code=False
    transformers would ask [y/N] (or run the bundled file); load_export refuses in one line."""
    config = json.loads((export / "config.json").read_text())
    config["model_type"] = "linearize_unknown"
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as excinfo:
        load_export(export)
    assert "linearize_unknown" in _one_line_error(excinfo)
    assert prompts == []


# ------------------------------------------------------------------------------------------ local paths


def test_export_holds_no_absolute_path_and_eval_still_works(tmp_path, tmp_path_factory, tiny_tokenizer):
    """Teacher, tokenizer, data, output_dir and the adapter all live under pytest's temporary root: no
    file of the export may name it, and `linearize eval EXPORT data.eval=FILE` still runs."""
    from linearize import adapters
    from stages.config_loader import config_to_dict
    from stages.evaluate import evaluate_target
    from linearize.train.student import load_converted
    from test_stages import tiny_run_config

    cfg = tiny_run_config(tmp_path, tiny_tokenizer)
    model, tokenizer = load_converted(cfg)
    assert Path(model.config._name_or_path).is_absolute()  # the case under test: loaded from a local folder
    adapter = tmp_path / "adapter"
    adapters.wrap(copy.deepcopy(model), rank=2, alpha=8, dropout=0.0, targets=["q_proj"]).save_pretrained(adapter)
    assert str(tmp_path) in (adapter / "adapter_config.json").read_text()
    out = save_export(model, tokenizer, tmp_path / "export", run_config=config_to_dict(cfg), adapter_dir=adapter)

    machine = str(tmp_path_factory.getbasetemp()).encode()
    leaks = [p.relative_to(out) for p in out.rglob("*") if p.is_file() and machine in p.read_bytes()]
    assert leaks == []
    run = json.loads((out / exported.RUN_CONFIG_FILE).read_text())
    assert (run["data"]["eval"], run["model"]["path"]) == ("eval.txt", "teacher")  # names kept, folders dropped
    result = evaluate_target(out, [f"data.eval={tmp_path / 'eval.txt'}"])
    assert result["student_ppl"] > 0


def test_without_local_paths_keeps_everything_else():
    config = {"model": {"path": "/srv/models/teacher", "tokenizer": None}, "data": {"train": "demo-wiki",
              "eval": "rel/news.txt", "files": ["/a/b.txt", "hub/name"]}, "prompt": "The capital", "n": 3}
    assert exported.without_local_paths(config) == {
        "model": {"path": "teacher", "tokenizer": None}, "data": {"train": "demo-wiki", "eval": "rel/news.txt",
        "files": ["b.txt", "hub/name"]}, "prompt": "The capital", "n": 3}


# ------------------------------------------------------------------------------------------ versions


def test_export_records_its_transformers_version(export):
    import transformers

    assert _section(export)["transformers_version"] == transformers.__version__


def _loads_warnings(export: Path, times: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(times):
            load_export(export)
    return [str(w.message) for w in caught if "tested with" in str(w.message)]


def test_a_transformers_outside_the_declared_range_warns_once(export, monkeypatch):
    import transformers

    tested = exported.tested_transformers()
    assert tested is not None and transformers.__version__ in tested  # the dev venv is in range
    monkeypatch.setattr(export_loader, "_warned_versions", set())
    assert _loads_warnings(export, 2) == []
    monkeypatch.setattr(transformers, "__version__", "99.0.0")
    got = _loads_warnings(export, 2)
    assert len(got) == 1 and "99.0.0" in got[0] and str(tested) in got[0]


def test_no_warning_without_package_metadata(export, monkeypatch):
    import transformers

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(export_loader, "_warned_versions", set())
    monkeypatch.setattr(importlib.metadata, "requires", absent)
    monkeypatch.setattr(transformers, "__version__", "99.0.0")
    assert exported.tested_transformers() is None
    assert _loads_warnings(export, 1) == []


# ------------------------------------------------------------------------------------------ save safety


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_export_refuses_a_users_folder_unless_overwrite(tmp_path, tiny_tokenizer):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError) as excinfo:
        _export(mine, tiny_tokenizer)
    assert str(mine) in _one_line_error(excinfo)
    assert _snapshot(mine) == {"thesis.tex": b"years of work"}
    _export(mine, tiny_tokenizer, overwrite=True)
    assert exported.is_export_dir(mine) and not (mine / "thesis.tex").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("swap", [True, False], ids=["swap", "rename-aside"])
def test_save_export_replaces_an_export_or_fills_an_empty_folder(tmp_path, tiny_tokenizer, pristine, monkeypatch, swap):
    if not swap:
        monkeypatch.setattr(export_writer, "_exchange", lambda a, b: False)
    (tmp_path / "empty").mkdir()
    _export(tmp_path / "empty", tiny_tokenizer)
    shutil.copytree(pristine, tmp_path / "old")
    (tmp_path / "old" / "stale.txt").write_text("from the previous export")
    _export(tmp_path / "old", tiny_tokenizer)
    assert not (tmp_path / "old" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "old"]  # nothing renamed aside remains


def _fail_while_writing_weights(model, filename, metadata=None):
    Path(filename).write_bytes(b"half a tensor")
    raise OSError(errno.ENOSPC, "No space left on device", filename)


def _fail_while_bundling(out_dir):
    raise RuntimeError("a bug while bundling")


@pytest.mark.parametrize("target,fault,expected", [
    ("save_model", _fail_while_writing_weights, UserError),
    ("bundle.write_bundle", _fail_while_bundling, RuntimeError)])
def test_a_failed_export_leaves_the_old_one_and_no_temporary_folder(tmp_path, tiny_tokenizer, pristine, monkeypatch,
                                                                      target, fault, expected):
    out = Path(shutil.copytree(pristine, tmp_path / "export"))
    before = _snapshot(out)
    monkeypatch.setattr(f"linearize.models.export_writer.{target}", fault)
    with pytest.raises(expected) as excinfo:
        _export(out, tiny_tokenizer)
    if expected is UserError:
        assert "disk full" in _one_line_error(excinfo) and str(out) in str(excinfo.value)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_an_export_is_replaced_in_one_swap_where_the_system_can(tmp_path, tiny_tokenizer, pristine, monkeypatch):
    """With renameat2(RENAME_EXCHANGE) no rename is needed, so no moment passes without an export at OUT."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").write_text("b")
    if not export_writer._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this system cannot swap two paths atomically")
    assert (tmp_path / "a").read_text() == "b" and (tmp_path / "b").is_dir()
    out = Path(shutil.copytree(pristine, tmp_path / "export"))
    (out / "stale.txt").write_text("from the previous export")

    def no_rename(src, dst):
        raise AssertionError(f"renamed {src} -> {dst}")

    monkeypatch.setattr(export_writer.os, "rename", no_rename)
    _export(out, tiny_tokenizer)
    assert exported.is_export_dir(out) and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "export"]


def test_a_failed_final_rename_puts_the_old_export_back(tmp_path, tiny_tokenizer, pristine, monkeypatch):
    """The fallback where paths cannot be swapped: rename aside, rename in, delete."""
    out = Path(shutil.copytree(pristine, tmp_path / "export"))
    before = _snapshot(out)
    monkeypatch.setattr(export_writer, "_exchange", lambda a, b: False)
    real_rename = export_writer.os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".export.tmp-"):
            raise OSError(errno.EIO, "I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(export_writer.os, "rename", rename)
    with pytest.raises(UserError, match=r"cannot write the export to .*export: I/O error"):  # the machine's fault: one line
        _export(out, tiny_tokenizer)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# ------------------------------------------------------------------------------------------ damaged files


def _edit_config(export: Path, **changes) -> None:
    config = json.loads((export / "config.json").read_text())
    config.update(changes)
    (export / "config.json").write_text(json.dumps(config))


def test_weights_that_do_not_fit_the_config_name_the_parameter_and_both_shapes(export):
    _edit_config(export, intermediate_size=96)
    with pytest.raises(UserError) as excinfo:
        load_export(export)
    message = _one_line_error(excinfo)
    stored, built = re.search(r"mlp\.\w+_proj\.weight has shape (\[.*?\]) in the file, but config.json builds "
                              r"(\[.*?\])", message).groups()
    assert sorted(json.loads(stored)) == [64, 128] and sorted(json.loads(built)) == [64, 96]


@pytest.mark.parametrize("damage", [
    lambda e: (e / "config.json").write_text("{not json"),
    lambda e: _edit_config(e, linearize={"attention": {}, "layers": "all"}),
    lambda e: _edit_config(e, linearize=["attention"]),
    lambda e: (e / "model.safetensors").write_bytes(b"\x00" * 16),
    lambda e: (e / "model.safetensors").unlink(),
])
def test_damaged_export_files_are_one_line_errors(export, damage):
    damage(export)
    with pytest.raises(UserError) as excinfo:
        load_export(export)
    assert str(export) in _one_line_error(excinfo)


def test_loaded_weights_are_the_saved_ones(export, pristine):
    """The checks above do not change what loads: same logits from the copy as from the original."""
    ids = torch.arange(12)[None]  # [1, T]
    with torch.no_grad():
        torch.testing.assert_close(load_export(export)[0](ids).logits, load_export(pristine)[0](ids).logits,
                                   atol=0, rtol=0)  # same files, same kernels: bit-identical


# ------------------------------------------------------------------------------------------ teachers


def _remote_code_folder(folder: Path, tokenizer_dir: Path, *, model: bool) -> Path:
    """A teacher folder whose model (model=True) or tokenizer exists only in the code it ships, which
    would leave a marker file if it ever ran."""
    from transformers import AutoTokenizer

    tiny_model("llama").save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    (folder / "custom.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').close()\n")
    if model:
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="lz_remote_test", auto_map={"AutoConfig": "custom.Config",
                                                             "AutoModelForCausalLM": "custom.Model"})
        (folder / "config.json").write_text(json.dumps(config))
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.update(tokenizer_class="LzRemoteTokenizer",
                      auto_map={"AutoTokenizer": ["custom.LzRemoteTokenizer", None]})
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("model", [True, False], ids=["model", "tokenizer"])
def test_a_teacher_that_needs_its_own_code_is_refused_without_a_question(tmp_path, tiny_tokenizer, prompts, model):
    from linearize.config import ModelConfig
    from linearize.models import load_teacher

    folder = _remote_code_folder(tmp_path / "teacher", tiny_tokenizer, model=model)
    with pytest.raises(UserError) as excinfo:
        load_teacher(ModelConfig(path=str(folder)))
    assert "needs the custom code" in _one_line_error(excinfo)
    assert prompts == [] and not (folder / "RAN").exists()
