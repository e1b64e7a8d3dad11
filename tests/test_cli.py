"""The command line: user mistakes give one line on stderr and exit 2 (checked in real subprocesses),
and each subcommand calls its stage function with the right arguments (checked in-process with fakes)."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from stages import cli
from stages.config_loader import CONFIGS_DIR
from stages.registry import STAGES

REPO = Path(__file__).resolve().parents[1]
DEMO = str(CONFIGS_DIR / "demo.yaml")
# Offline: a mistaken hub lookup must fail fast instead of waiting on the network.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_cli(*args, cwd=REPO):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(REPO), **OFFLINE}
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, *fragments):
    assert result.returncode == cli.EXIT_USER_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("linearize: error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def tiny_dir(tmp_path, make_tiny_model, tiny_tokenizer):
    """A saved tiny llama with its tokenizer: a model.path that loads in well under a second."""
    path = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- errors


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("includes: [model/smollm2.yaml]\nattention:\n  windw_size: 3\n")
    assert_one_line_error(run_cli("config", str(bad)), str(bad), "attention.windw_size", "unknown key")
    assert_one_line_error(run_cli("config", DEMO, "data.seq_len=long"), "command line", "data.seq_len")
    result = run_cli("config", DEMO, "attention.mechanism=mamba")
    assert_one_line_error(result, "attention.mechanism", "window_linear", "lawcat", "liger")
    assert_one_line_error(run_cli("config", str(tmp_path / "missing.yaml")), "not found")


def test_missing_model_path_is_one_line(tmp_path):
    result = run_cli("run", DEMO, f"model.path={tmp_path / 'no_model'}", f"output_dir={tmp_path}")
    assert_one_line_error(result, "model.path", "no_model")
    assert_one_line_error(run_cli("check", DEMO, f"model.path={tmp_path / 'no_model'}"), "model.path")


def test_empty_data_file_is_one_line(tmp_path, tiny_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_cli("check", DEMO, f"model.path={tiny_dir}", f"data.train={empty}")
    assert_one_line_error(result, str(empty), "no documents")


def test_check_reports_sizes(tmp_path, tiny_dir):
    text = tmp_path / "train.txt"
    text.write_text("\n".join(["Linear attention replaces the softmax with a kernel feature map."] * 40))
    result = run_cli("check", DEMO, f"model.path={tiny_dir}", f"data.train={text}", "data.eval=",
                     "data.eval_fraction=0.25", "data.seq_len=32")
    assert result.returncode == 0, result.stderr
    assert "sequences x 32 tokens" in result.stdout
    assert f"train   {text}:" in result.stdout


def test_check_names_the_mix_that_replaces_data_train(tmp_path, tiny_dir):
    text = tmp_path / "train.txt"
    text.write_text("\n".join(["Linear attention replaces the softmax with a kernel feature map."] * 40))
    result = run_cli("check", DEMO, f"model.path={tiny_dir}", f"data.mix=[{{source: {text}, weight: 1}}]",
                     "data.eval=", "data.eval_fraction=0.25", "data.seq_len=32")
    assert result.returncode == 0, result.stderr
    train_line = next(line for line in result.stdout.splitlines() if line.startswith("train"))
    assert train_line.startswith(f"train   mix of {text} (1):") and "demo-wiki" not in train_line, train_line


def test_python_dash_m_linearize_and_argparse_errors():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **OFFLINE}
    result = subprocess.run([sys.executable, "-m", "linearize", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "generate" in result.stdout
    assert run_cli("stage", "distill", DEMO).returncode == cli.EXIT_USER_ERROR


# ---------------------------------------------------------------------------------------------- dispatch


@pytest.fixture
def fake_stages(monkeypatch):
    """Replaces the stage modules the CLI imports lazily; records every call."""
    calls = []

    def fake(name, **functions):
        module = types.ModuleType(f"stages.{name}")
        for attr, fn in functions.items():
            setattr(module, attr, fn)
        monkeypatch.setitem(sys.modules, f"stages.{name}", module)

    fake("pipeline", run_stages=lambda cfg, names, force=False, accept_changes=False:
         calls.append(("run", cfg, list(names), (force, accept_changes))))
    fake("evaluate", evaluate_target=lambda target, overrides: calls.append(("eval", target, overrides)) or {"ppl": 1.5})
    fake("export", export_run=lambda run_dir, out_dir, overwrite=False, format=None:
         calls.append(("export", run_dir, out_dir, overwrite)))
    return calls


def test_run_passes_the_configs_stages(fake_stages):
    assert cli.main(["run", DEMO, "--force", "seed=7", "stages=[evaluate,export]"]) == 0
    (_, cfg, names, flags), = fake_stages
    assert (cfg.seed, names, flags) == (7, ["evaluate", "export"], (True, False))


def test_force_and_accept_changes_are_two_exclusive_flags(fake_stages, capsys):
    assert cli.main(["stage", "attention_transfer", DEMO, "--accept-changes"]) == 0
    assert fake_stages[-1][3] == (False, True)
    with pytest.raises(SystemExit):
        cli.main(["run", DEMO, "--force", "--accept-changes"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_run_defaults_to_the_demo_config(fake_stages):
    assert cli.main(["run", "seed=3"]) == 0
    (_, cfg, names, flags), = fake_stages
    assert (cfg.run_name, cfg.seed, names, flags) == ("demo", 3, list(STAGES), (False, False))


def test_stage_runs_one_stage(fake_stages):
    assert cli.main(["stage", "lora_recovery", DEMO, "lora_recovery.rank=4"]) == 0
    (_, cfg, names, _), = fake_stages
    assert names == ["lora_recovery"] and cfg.lora_recovery.rank == 4


def test_eval_and_export_dispatch(fake_stages, tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path), "data.eval=x.txt"]) == 0
    assert '"ppl": 1.5' in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path), str(tmp_path / "out")]) == 0
    assert cli.main(["export", str(tmp_path), str(tmp_path / "out"), "--overwrite"]) == 0
    assert fake_stages == [("eval", str(tmp_path), ["data.eval=x.txt"]),
                           ("export", str(tmp_path), str(tmp_path / "out"), False),
                           ("export", str(tmp_path), str(tmp_path / "out"), True)]
    assert cli.main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == cli.EXIT_USER_ERROR


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(cfg, names, force=False, accept_changes=False):
        raise KeyboardInterrupt

    module = types.ModuleType("stages.pipeline")
    module.run_stages = interrupted
    monkeypatch.setitem(sys.modules, "stages.pipeline", module)
    assert cli.main(["run", DEMO]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "linearize: interrupted"


def test_traceback_flag_reraises(fake_stages):
    from linearize import UserError

    with pytest.raises(UserError):
        cli.main(["config", DEMO, "seed=x", "--traceback"])


@pytest.mark.parametrize("command", ["run", "stage", "eval", "export", "generate", "config", "check", "compare"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: linearize {command}" in out and len(out.splitlines()) > 5


def test_generate_streams_a_greedy_continuation(monkeypatch, tmp_path, capsys, make_tiny_model, tiny_tokenizer):
    import linearize.models.exported as exported

    model, tokenizer = make_tiny_model("llama"), AutoTokenizer.from_pretrained(tiny_tokenizer)
    monkeypatch.setattr(exported, "load_export", lambda path: (model, tokenizer))
    assert cli.main(["generate", str(tmp_path), "The quick brown fox", "--max-new-tokens", "5"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("The quick brown fox") and len(first) > len("The quick brown fox")
    cli.main(["generate", str(tmp_path), "The quick brown fox", "--max-new-tokens", "5"])
    assert capsys.readouterr().out == first  # greedy: the same continuation every time
    assert cli.main(["generate", str(tmp_path / "nope"), "x"]) == cli.EXIT_USER_ERROR


@pytest.mark.parametrize("args, fragment", [
    (["   "], "PROMPT is empty"),
    (["hi", "--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
    (["hi", "--max-new-tokens", "-3"], "--max-new-tokens must be > 0"),
    (["hi", "--temperature", "-0.5"], "--temperature must be"),
    (["hi", "--temperature", "nan"], "--temperature must be"),
])
def test_generate_refuses_bad_arguments_in_one_line(args, fragment, tmp_path, capsys):
    assert cli.main(["generate", str(tmp_path), *args]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"linearize: error: {fragment}") and len(err.splitlines()) == 1, err


def test_generate_chat_without_a_template_is_one_line(monkeypatch, tmp_path, capsys, make_tiny_model, tiny_tokenizer):
    import linearize.models.exported as exported

    model, tokenizer = make_tiny_model("llama"), AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert not tokenizer.chat_template  # the tiny tokenizer has none
    monkeypatch.setattr(exported, "load_export", lambda path: (model, tokenizer))
    assert cli.main(["generate", str(tmp_path), "hi", "--chat"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("linearize: error: --chat needs a chat template") and len(err.splitlines()) == 1


def test_disk_full_is_one_line_not_a_traceback(monkeypatch, capsys):
    import errno

    def full(cfg, names, force=False, accept_changes=False):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/demo/evaluate/eval.json")

    module = types.ModuleType("stages.pipeline")
    module.run_stages = full
    monkeypatch.setitem(sys.modules, "stages.pipeline", module)
    assert cli.main(["run", DEMO]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("linearize: error: No space left on device: /runs/demo/evaluate/eval.json")
    assert "intact" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "", ".", "..", "a/b", "sp ace"])
def test_run_name_must_be_one_folder_name(name, capsys):
    assert cli.main(["config", DEMO, f"run_name={name}"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "run_name" in err and "not a folder name" in err and len(err.splitlines()) == 1, err


def test_config_values_cannot_read_the_environment(tmp_path):
    bad = tmp_path / "env.yaml"
    bad.write_text("includes: [model/smollm2.yaml]\ndata:\n  train: ${oc.env:HOME}/secret.txt\n")
    assert_one_line_error(run_cli("config", str(bad)), str(bad), "data.train", "environment")
    assert_one_line_error(run_cli("config", DEMO, "evaluate.sample_prompt=${oc.env:HOME}"),
                          "command line", "evaluate.sample_prompt", "environment")
    plain = run_cli("config", DEMO, "run_name=r1", "evaluate.sample_prompt=${run_name}")  # a key reference is fine
    assert plain.returncode == 0 and "sample_prompt: r1" in plain.stdout, plain.stderr
