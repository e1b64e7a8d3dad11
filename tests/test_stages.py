"""Every stage end to end on a tiny llama saved to disk: transfer → LoRA (+KL) → evaluate → export,
then load_export and generate; skipping finished stages; refusing a changed config."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch

from conftest import TOKENIZER_TEXT, tiny_model
from linearize.errors import UserError
from linearize.train.evaluation import greedy_sample

STAGE_NAMES = ["attention_transfer", "lora_recovery", "evaluate", "export"]
# The delta-rule students, covered by every end-to-end test file (pipeline, CLI, DeepSpeed, export, lm-eval).
DELTA_MECHANISMS = ("gated_delta", "kda", "gated_delta_window")
EVAL_KEYS = {"teacher_ppl", "student_ppl", "kl", "top1_agreement", "samples"}


def write_tiny_assets(root, tokenizer_dir):
    """A tiny llama + tokenizer as a HF directory, and train/eval text files; returns config overrides."""
    model_dir = root / "teacher"
    tiny_model("llama").save_pretrained(model_dir)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, model_dir / item.name)
    (root / "train.txt").write_text("\n".join(TOKENIZER_TEXT * 2))
    (root / "eval.txt").write_text("\n".join(reversed(TOKENIZER_TEXT)))
    return {"model": {"path": str(model_dir)},
            "data": {"train": str(root / "train.txt"), "eval": str(root / "eval.txt"), "seq_len": 32,
                     "max_eval_sequences": 2}}


def tiny_run_config(root, tokenizer_dir, **sections):
    """A validated RunConfig for a few-step run of every stage on the tiny assets."""
    from stages.config_loader import config_from_dict

    data = write_tiny_assets(root, tokenizer_dir)
    data.update(run_name="tiny", output_dir=str(root / "runs"),
                attention={"mechanism": "window_linear", "window_size": 8, "feature_dim": 8, "chunk_size": 8},
                attention_transfer={"max_steps": 4, "save_every": 2, "eval_every": 2, "lr": 1e-2},
                lora_recovery={"max_steps": 3, "save_every": 3, "eval_every": 3, "lr": 1e-3, "kl_weight": 0.5},
                evaluate={"max_sequences": 2, "sample_tokens": 4, "sample_prompt": "The quick"})
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return config_from_dict(data, "test")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_tokenizer):
    """(config, run dir, results, printed output) of one full pipeline run, shared by this module's
    tests: tests that change a run work on a copy (`copy_run`)."""
    from stages.pipeline import run_stages

    root = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_run_config(root, tiny_tokenizer)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = run_stages(cfg)
    return cfg, root / "runs" / "tiny", results, printed.getvalue()


def copy_run(cfg, run_dir, dest):
    """The config and run dir of a copy of the run under `dest` (teacher and data files are shared)."""
    from stages.config_loader import config_from_dict, config_to_dict

    shutil.copytree(run_dir, dest / "tiny")
    return config_from_dict(config_to_dict(cfg), "test", [f"output_dir={dest}"]), dest / "tiny"


@pytest.mark.parity
def test_every_stage_then_load_export_and_generate(tiny_run):
    cfg, run_dir, results, printed = tiny_run
    assert list(results) == STAGE_NAMES
    for stage in STAGE_NAMES:
        assert (run_dir / stage / "DONE").is_file()
    assert (run_dir / "attention_transfer" / "student.safetensors").is_file()
    assert (run_dir / "lora_recovery" / "adapter" / "adapter_config.json").is_file()
    evaluation = json.loads((run_dir / "evaluate" / "eval.json").read_text())
    assert EVAL_KEYS <= evaluation.keys()
    assert 0.0 <= evaluation["top1_agreement"] <= 1.0 and evaluation["kl"] >= 0.0
    # the hybrid's branch diagnostics: one entry per converted layer, window + linear shares summing to one
    shares = evaluation["branch_shares"]["layers"]
    assert sorted(shares) == ["0", "1"]
    assert all(abs(s["window"] + s["linear"] - 1.0) < 1e-9 for s in shares.values())  # float64 shares
    report = (run_dir / "report.md").read_text()
    assert "attention_transfer/loss.png" in report and "student perplexity" in report
    assert "teacher perplexity" in printed and "generates:" in printed
    ratio = evaluation["student_ppl"] / evaluation["teacher_ppl"]
    assert f"({ratio:.2f}x the teacher)" in printed  # the summary names the ratio
    assert "student: window_linear in every converted layer, no softmax layers" in printed

    from linearize.models.exported import load_export

    model, tokenizer = load_export(run_dir / "export")
    section = json.loads((run_dir / "export" / "config.json").read_text())["linearize"]
    assert section["attention"]["mechanism"] == "window_linear" and len(section["layers"]) == 2
    assert len(greedy_sample(model, tokenizer, "The quick", 4)) > 0
    _check_export_matches_run(cfg, run_dir, model)
    root = str(run_dir.parent.parent)  # every path of this run (teacher, data, output_dir) lies below it
    leaking = [p.name for p in (run_dir / "export").rglob("*") if p.is_file() and root.encode() in p.read_bytes()]
    assert leaking == []  # the export folder (its DONE record included) is shareable


def test_the_export_stage_notices_a_changed_config(tiny_run, tmp_path):
    from stages.config_loader import config_from_dict, config_to_dict
    from stages.pipeline import run_stages

    cfg, run_dir = copy_run(*tiny_run[:2], tmp_path)
    assert run_stages(cfg, ["export"]) and "config_digest" in json.loads((run_dir / "export" / "DONE").read_text())
    changed = config_from_dict(config_to_dict(cfg), "test", ["export.dtype=bfloat16"])
    with pytest.raises(UserError, match="export: the config changed"):
        run_stages(changed, ["export"])
    assert run_stages(changed, ["export"], accept_changes=True)["export"]["dtype"] == "bfloat16"


def _check_export_matches_run(cfg, run_dir, exported):
    """The export's logits equal those of the run's student rebuilt from the run files (LoRA merged)."""
    from linearize.adapters import merge
    from stages.common import attach_adapter, build_student

    student, _, _ = build_student(cfg, run_dir)
    student = merge(attach_adapter(student, run_dir))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # identical fp32 weights and code; only the merge order could differ
        torch.testing.assert_close(exported(input_ids=ids).logits, student.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_rerun_skips_done_stages_and_refuses_changed_config(tiny_run, tmp_path, capsys):
    from stages.config_loader import config_from_dict, config_to_dict
    from stages.pipeline import run_stages

    cfg, run_dir, first, _ = tiny_run
    cfg, run_dir = copy_run(cfg, run_dir, tmp_path)
    again = run_stages(cfg)
    assert capsys.readouterr().out.count("done, skipping") == 4
    assert again["evaluate"]["student_ppl"] == first["evaluate"]["student_ppl"]
    changed = config_from_dict(config_to_dict(cfg), "test", ["attention_transfer.lr=0.5", "seed=3"])
    with pytest.raises(UserError, match=r"attention_transfer: the config changed .*attention_transfer.lr, seed"):
        run_stages(changed)
    capsys.readouterr()
    forced = run_stages(changed, force=True)
    printed = capsys.readouterr().out
    assert "done, skipping" not in printed and printed.count("results are stale") == 3
    assert "attention_transfer: --force, discarded its previous outputs" in printed
    metrics = (run_dir / "attention_transfer" / "metrics.jsonl").read_text().splitlines()
    assert forced["attention_transfer"]["step"] == 4 and len(metrics) == 4  # all 4 steps trained again
    first = json.loads(metrics[0])
    assert first["step"] == 1 and first["lr"] > 0.1  # from step 1, on the new lr=0.5 schedule (old: 0.01)
    assert json.loads((run_dir / "attention_transfer" / "DONE").read_text())["config"]["seed"] == 3


def test_accept_changes_continues_from_the_last_checkpoint(tiny_run, tmp_path, capsys):
    from stages.config_loader import config_from_dict, config_to_dict
    from stages.pipeline import run_stages

    cfg, run_dir = copy_run(*tiny_run[:2], tmp_path)
    changed = config_from_dict(config_to_dict(cfg), "test", ["attention_transfer.lr=0.02"])
    with pytest.raises(UserError, match=r"no step left .*raise attention_transfer.max_steps"):
        run_stages(changed, ["attention_transfer"], accept_changes=True)
    longer = config_from_dict(config_to_dict(changed), "test", ["attention_transfer.max_steps=6"])
    result = run_stages(longer, ["attention_transfer"], accept_changes=True)["attention_transfer"]
    metrics = [json.loads(line) for line in (run_dir / "attention_transfer" / "metrics.jsonl").read_text().splitlines()]
    assert result["step"] == 6 and [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # steps 5-6 added
    assert "results are stale" in capsys.readouterr().out  # later stages were built on the old student
    assert not (run_dir / "lora_recovery").exists()


def test_missing_outputs_of_a_finished_stage_are_errors_naming_the_file(tiny_run, tmp_path):
    from stages.evaluate import evaluate_target
    from stages.export import export_run

    cfg, run_dir = copy_run(*tiny_run[:2], tmp_path)
    (run_dir / "lora_recovery" / "adapter" / "adapter_model.safetensors").unlink()
    # The DONE record vouches for the stage's outputs by sha256 (tests/test_hostile.py covers edits too).
    vouched = r"{} is missing, though the DONE record of lora_recovery vouches for it"
    with pytest.raises(UserError, match=vouched.format(r".*adapter_model.safetensors")):
        export_run(run_dir, tmp_path / "out")
    (run_dir / "lora_recovery" / "student.safetensors").unlink()
    with pytest.raises(UserError, match=vouched.format(r".*student.safetensors")):
        evaluate_target(run_dir)
    shutil.rmtree(run_dir / "lora_recovery")
    (run_dir / "attention_transfer" / "student.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"student.safetensors changed after attention_transfer finished"):
        export_run(run_dir, tmp_path / "out")
    (run_dir / "attention_transfer" / "DONE").unlink()  # started, never finished
    with pytest.raises(UserError, match="attention_transfer in .* has not finished"):
        export_run(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_records_only_what_it_merged(tiny_run, tmp_path):
    from stages.export import export_run

    cfg, run_dir = copy_run(*tiny_run[:2], tmp_path)
    assert tiny_run[2]["export"]["merged_lora"] is True
    shutil.rmtree(run_dir / "lora_recovery")  # a run without LoRA: nothing to merge
    written = export_run(run_dir, tmp_path / "out", cfg)
    assert (written["merged_lora"], written["adapter_shipped"]) == (False, False)


@pytest.mark.parametrize("where", ["run", "parent", "cwd"])
def test_export_never_replaces_the_run_or_the_working_directory(tiny_run, tmp_path, monkeypatch, where):
    from stages.export import export_run

    _, run_dir = copy_run(*tiny_run[:2], tmp_path)
    monkeypatch.chdir(tmp_path / "tiny" / "evaluate")
    out = {"run": run_dir, "parent": run_dir / "..", "cwd": tmp_path / "tiny" / "evaluate"}[where]
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(UserError, match="export destination .* (is|contains) the (run|working) directory"):
        export_run(run_dir, out, overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_export_into_a_users_folder_needs_overwrite(tiny_run, tmp_path):
    from stages.export import export_run

    _, run_dir = copy_run(*tiny_run[:2], tmp_path)
    users = tmp_path / "mine"
    users.mkdir()
    (users / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="mine"):
        export_run(run_dir, users)
    assert (users / "thesis.tex").read_text() == "precious"
    export_run(run_dir, users, overwrite=True)
    assert (users / "config.json").is_file() and not (users / "thesis.tex").exists()


def test_generate_chat_on_an_export_without_template(tiny_run, capsys):
    from stages import cli

    _, run_dir, _, _ = tiny_run
    assert cli.main(["generate", str(run_dir / "export"), "hi", "--chat"]) == cli.EXIT_USER_ERROR
    assert "--chat needs a chat template" in capsys.readouterr().err


def test_no_transfer_baseline_and_unknown_stage(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file

    from stages.pipeline import run_stages

    cfg = tiny_run_config(tmp_path, tiny_tokenizer, lora_recovery={"kl_weight": 0.0, "ce_weight": 1.0, "train_student": True})
    results = run_stages(cfg, ["lora_recovery", "evaluate"])
    assert results["lora_recovery"]["student_from"].startswith("none")
    lora_dir = tmp_path / "runs" / "tiny" / "lora_recovery"
    trained = load_file(lora_dir / "step_3" / "trainable.safetensors")
    student = load_file(lora_dir / "student.safetensors")
    assert any("lora_" in name for name in trained)
    assert sum(not name.startswith("base_model.model.") for name in trained) == 0  # peft prefixes all
    assert {f"base_model.model.{name}" for name in student} <= trained.keys()  # train_student: they trained
    assert results["evaluate"]["student_ppl"] > 1.0
    with pytest.raises(UserError, match="valid: attention_transfer, lora_recovery, evaluate, export"):
        run_stages(cfg, ["distill"])


def test_stage_2_without_lora_targets_trains_the_student_and_keeps_the_teacher_inside_the_window(tmp_path, tiny_tokenizer):
    """`lora_recovery.targets: []` with train_student: no adapter is made or written, only the student
    parameters train, and a prompt that fits the window is computed exactly as the teacher computes it."""
    from safetensors.torch import load_file

    from linearize import adapters
    from stages.common import attach_adapter, build_student
    from stages.pipeline import run_stages

    cfg = tiny_run_config(tmp_path, tiny_tokenizer, lora_recovery={"targets": [], "train_student": True})
    results = run_stages(cfg)
    run_dir = tmp_path / "runs" / "tiny"
    lora_dir = run_dir / "lora_recovery"
    assert not (lora_dir / "adapter").exists()
    trained = load_file(lora_dir / "step_3" / "trainable.safetensors")
    student = load_file(lora_dir / "student.safetensors")
    transferred = load_file(run_dir / "attention_transfer" / "student.safetensors")
    assert set(trained) == set(student)  # the student parameters, and nothing else, trained
    assert any(not torch.equal(student[name], transferred[name]) for name in student)
    assert results["export"]["merged_lora"] is False and results["evaluate"]["student_ppl"] > 1.0

    model, _, _ = build_student(cfg, run_dir)
    model = attach_adapter(model, run_dir)
    assert not adapters.is_wrapped(model)
    ids = torch.randint(0, model.config.vocab_size, (1, cfg.attention.window_size))  # fits the window whole
    with torch.no_grad():
        student_logits = model(ids).logits
        with adapters.teacher_view(model):
            teacher_logits = model(ids).logits
    # Same weights and softmax over the same keys; only the summation order of the two attention paths differs.
    torch.testing.assert_close(student_logits, teacher_logits, rtol=0, atol=1e-5)


def test_switching_a_presets_mechanism_on_the_command_line_runs_end_to_end(tmp_path, tiny_tokenizer, capsys):
    """`linearize run configs/demo.yaml attention.mechanism=liger`, on the tiny model: liger brings its own
    feature map, stage 1 has nothing to train and is skipped, the other stages run."""
    from stages.config_loader import config_from_dict, config_to_dict
    from stages.pipeline import run_stages

    preset = tiny_run_config(tmp_path, tiny_tokenizer)  # window_linear + hedgehog, like demo.yaml
    cfg = config_from_dict(config_to_dict(preset), "test", ["attention.mechanism=liger"])
    results = run_stages(cfg)
    assert results["attention_transfer"] == {"skipped": "liger adds no trainable parameters"}
    assert results["lora_recovery"]["step"] == 3 and results["evaluate"]["student_ppl"] > 1.0
    assert results["export"]["merged_lora"] is True


def test_a_stage_with_nothing_to_train_is_skipped_and_recorded(tmp_path, tiny_tokenizer, capsys):
    """liger adds no parameters: attention_transfer says so in one line, records {"skipped": reason} and
    writes no student; the later stages run as after a run without that stage, and a re-run skips it."""
    from stages.pipeline import run_stages

    cfg = tiny_run_config(tmp_path, tiny_tokenizer, attention={"mechanism": "liger", "feature_map": "softmax_dim"})
    results = run_stages(cfg)
    run_dir = tmp_path / "runs" / "tiny"
    reason = "liger adds no trainable parameters"
    assert f"attention_transfer: skipped: {reason}\n" in capsys.readouterr().out
    assert json.loads((run_dir / "attention_transfer" / "DONE").read_text())["metrics"] == {"skipped": reason}
    assert not (run_dir / "attention_transfer" / "student.safetensors").exists()
    assert results["lora_recovery"]["student_from"].startswith("none")
    assert results["evaluate"]["student_ppl"] > 1.0 and (run_dir / "export" / "DONE").is_file()
    assert f"skipped: {reason}" in (run_dir / "report.md").read_text()
    assert run_stages(cfg)["attention_transfer"] == {"skipped": reason}
    assert capsys.readouterr().out.count("done, skipping") == 4
    from stages.config_loader import config_from_dict, config_to_dict

    changed = config_from_dict(config_to_dict(cfg), "test", ["attention_transfer.lr=0.5"])
    # a skipped stage trained nothing, so --accept-changes runs it again rather than finding "no step left"
    assert run_stages(changed, ["attention_transfer"], accept_changes=True)["attention_transfer"] == {"skipped": reason}


def test_stage_2_without_lora_targets_or_student_parameters_is_skipped(tmp_path, tiny_tokenizer, capsys):
    """`lora_recovery.targets: []` on a mechanism with nothing of its own to train (liger): stage 2 says so
    in one line and is recorded as skipped; evaluation and export then use the converted model as it is."""
    from stages.pipeline import run_stages

    cfg = tiny_run_config(tmp_path, tiny_tokenizer, attention={"mechanism": "liger", "feature_map": "softmax_dim"},
                          lora_recovery={"targets": [], "train_student": True})
    results = run_stages(cfg)
    reason = "no LoRA targets, and liger adds no trainable parameters"
    assert results["lora_recovery"] == {"skipped": reason}
    assert f"lora_recovery: skipped: {reason}\n" in capsys.readouterr().out
    assert results["evaluate"]["student_ppl"] > 1.0 and results["export"]["merged_lora"] is False


def test_evaluate_target_on_run_and_export_dirs(tiny_run, tmp_path):
    from stages.evaluate import evaluate_target

    cfg, run_dir, results, _ = tiny_run
    other_eval = tmp_path / "other.txt"
    shutil.copy(cfg.data.train, other_eval)
    on_run = evaluate_target(run_dir, [f"data.eval={other_eval}"])
    export = shutil.copytree(run_dir / "export", tmp_path / "export")
    recorded = json.loads((export / "linearize_run.json").read_text())
    recorded["data"]["train"] = str(tmp_path / "absent.txt")  # an export is evaluated without the run's data
    (export / "linearize_run.json").write_text(json.dumps(recorded))
    on_export = evaluate_target(export, [f"data.eval={other_eval}"])
    assert {"teacher_ppl", "student_ppl", "kl", "top1_agreement"} <= on_run.keys()
    assert "teacher_ppl" not in on_export  # an export does not carry its teacher
    # merged vs unmerged LoRA: the same function up to fp32 rounding of W + BA
    assert on_export["student_ppl"] == pytest.approx(on_run["student_ppl"], rel=1e-4)
    assert on_run["student_ppl"] != pytest.approx(results["evaluate"]["student_ppl"], rel=1e-6)  # other data
    with pytest.raises(UserError, match="neither a run directory"):
        evaluate_target(run_dir / "evaluate")


def test_transfer_loss_with_attention_weights_trains_student_parameters():
    """attn_ce_weight > 0 (parallel form): layers hand over attention weights and the CE term adds in."""
    import linearize
    from linearize.config.schema import AttentionConfig
    from linearize.losses import transfer_objective

    model = tiny_model("llama")
    linearize.linearize_model(model, AttentionConfig(mechanism="window_linear", form="parallel", window_size=4,
                                                     feature_dim=8))
    linearize.freeze_for_transfer(model)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    mse_only = transfer_objective(attn_ce_weight=0.0)(model, ids)
    with_ce = transfer_objective(attn_ce_weight=1.0)(model, ids)
    assert with_ce > mse_only  # the CE of a row distribution against another is positive
    with_ce.backward()
    trained = [name for name, p in model.named_parameters() if p.grad is not None]
    assert trained and all(p.requires_grad for name, p in model.named_parameters() if name in trained)


@pytest.mark.parity
@pytest.mark.parametrize("mechanism", DELTA_MECHANISMS)
def test_delta_student_with_softmax_layers_through_the_cli(tmp_path, tiny_tokenizer, capsys, mechanism):
    """`linearize run` with layer 1 of 2 kept as softmax attention (transfer MSE, LoRA with KL, evaluate,
    export), then `linearize eval` on the run and on its export, and `linearize generate` on the export
    (cached decoding) giving the uncached greedy continuation."""
    import yaml

    from linearize.models.exported import load_export
    from stages import cli
    from stages.config_loader import config_to_dict

    cfg = tiny_run_config(tmp_path, tiny_tokenizer, attention={"mechanism": mechanism, "softmax_layers": [1]})
    assert cfg.lora_recovery.kl_weight > 0
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    assert cli.main(["run", str(config)]) == 0
    run_dir, export = tmp_path / "runs" / "tiny", tmp_path / "runs" / "tiny" / "export"
    assert (run_dir / "attention_transfer" / "student.safetensors").is_file()  # stage 1 trained, not skipped
    assert json.loads((export / "config.json").read_text())["linearize"]["layers"] == {"0": mechanism, "1": "softmax"}
    capsys.readouterr()

    evaluations = []
    for target in (run_dir, export):  # an export keeps only the eval file's name: point it at the file
        assert cli.main(["eval", str(target), f"data.eval={cfg.data.eval}"]) == 0
        evaluations.append(json.loads(capsys.readouterr().out))
    on_run, on_export = evaluations
    assert EVAL_KEYS - {"samples"} <= on_run.keys() and on_run["student_ppl"] > 1.0
    # merged vs unmerged LoRA: the same function up to fp32 rounding of W + BA
    assert on_export["student_ppl"] == pytest.approx(on_run["student_ppl"], rel=1e-4)

    assert cli.main(["generate", str(export), "The quick", "--max-new-tokens", "5"]) == 0
    model, tokenizer = load_export(export)
    prompt = tokenizer("The quick", return_tensors="pt").input_ids
    with torch.no_grad():  # the CLI decodes with the cache; this recomputes the full forward for every token
        uncached = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False,
                                  pad_token_id=tokenizer.pad_token_id)
    want = tokenizer.decode(uncached[0, prompt.shape[1]:], skip_special_tokens=True)
    assert capsys.readouterr().out == f"The quick{want}\n"

