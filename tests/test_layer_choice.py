"""`attention.softmax_layers: auto`: the selector registry, what the transfer probe measures, and a
tiny run that records its choice once, applies it (student, export record, report) and never re-chooses."""
from __future__ import annotations

import json

import pytest
import torch

import linearize
from conftest import tiny_model
from linearize.config import AttentionConfig
from linearize.errors import UserError
from linearize.train.layer_choice import (SELECTORS, Probe, choose, select_softmax_layers, softmax_layer_count,
                                          uniform)
from test_stages import tiny_run_config

AUTO_ONE_LAYER = {"softmax_layers": "auto", "softmax_layer_count": 1, "selection_steps": 2}


def _converted(num_layers: int, **attention):
    model = tiny_model("llama", num_hidden_layers=num_layers)
    return linearize.linearize_model(model, AttentionConfig(**{"mechanism": "linear", "feature_dim": 8, **attention}))


def _probe(steps: int = 4, seed: int = 0) -> Probe:
    g = torch.Generator().manual_seed(seed)
    return Probe(train=torch.randint(0, 256, (8, 32), generator=g), held_out=torch.randint(0, 256, (2, 32), generator=g),
                 steps=steps, lr=1e-2, mse_factor=1000.0)


def test_selector_registry_uniform_spacing_and_counts():
    assert {"transfer_probe", "uniform"} <= set(SELECTORS)
    scores = uniform(_converted(6), 2, _probe())
    assert [layer for layer, score in scores.items() if score == 1.0] == [1, 4]  # the middles of 0-2 and 3-5
    subset = uniform(_converted(6, layers=[0, 2, 4, 5]), 2, _probe())
    assert sorted(scores) == list(range(6)) and sorted(subset) == [0, 2, 4, 5]
    assert choose(subset, 2) == [2, 5]
    assert choose({0: 1.0, 1: 3.0, 2: 3.0, 3: 2.0}, 2) == [1, 2]  # highest scores; ties go to the lower layer
    assert softmax_layer_count(3, 8) == 3 and softmax_layer_count(0.25, 8) == 2 and softmax_layer_count(0.01, 8) == 1
    with pytest.raises(UserError, match="at least one layer must stay converted"):
        softmax_layer_count(4, 4)


@pytest.mark.parametrize("selector", ["transfer_probe", "layer_kl"])
def test_probing_selectors_pick_the_layer_with_sharp_attention(selector):
    """Layer 2's queries scaled 8x make its teacher attention near one-hot, which a linear student cannot
    follow: its relative transfer error is 8-11x the others' and its KL ~20x, on three seeds of this
    model, so the margin of 5x below leaves room for noise."""
    for seed in range(2):
        model = tiny_model("llama", seed=seed, num_hidden_layers=4)
        with torch.no_grad():
            model.model.layers[2].self_attn.q_proj.weight.mul_(8.0)
        linearize.linearize_model(model, AttentionConfig(mechanism="linear", feature_dim=8))
        record = select_softmax_layers(model, selector, 1, _probe(seed=seed))
        assert record["choice"] == [2] and record["candidates"] == [0, 1, 2, 3]
        others = [score for layer, score in record["scores"].items() if layer != "2"]
        assert record["scores"]["2"] > 5 * max(others)
        assert record["tokens"] == {"probe": 4 * 32, "held_out": 2 * 32}


def _copier_in_layer(responsible: int, num_layers: int = 4):
    """A stand-in whose copying lives in one known layer (tests/test_recall_eval.py's construction): attention
    outputs are zero outside `responsible`, which attends sharply and weighs heavily; the recall answers are
    its own confident greedy continuations. Returns (model converted in every layer, recall examples)."""
    from test_recall_eval import SHARP

    model = tiny_model("llama", num_hidden_layers=num_layers)
    with torch.no_grad():
        for idx, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.mul_(SHARP["o_proj"] if idx == responsible else 0.0)
        for name in ("q_proj", "k_proj"):
            getattr(model.model.layers[responsible].self_attn, name).weight.mul_(SHARP[name])
        model.lm_head.weight.mul_(SHARP["lm_head"])
        prompts = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))  # [N, T]
        ids = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8,
                             do_sample=False, pad_token_id=0)  # [N, T + 8]
    linearize.linearize_model(model, AttentionConfig(mechanism="linear", feature_dim=8, chunk_size=4))
    return model, tuple((row, torch.arange(16, 24)) for row in ids)


@pytest.mark.parametrize("responsible", [1, 2])
def test_the_recall_selector_keeps_the_layer_the_model_copies_through(responsible):
    """After the same short probe, converting the copying layer raises the recall loss and no other layer
    changes it, so the recall selector keeps exactly that layer softmax; blended with layer_kl it still does."""
    from dataclasses import replace

    model, examples = _copier_in_layer(responsible)
    probe = replace(_probe(steps=2), recall=examples)
    record = select_softmax_layers(model, "recall", 1, probe)
    assert record["choice"] == [responsible] and record["candidates"] == [0, 1, 2, 3]
    others = [abs(score) for layer, score in record["scores"].items() if layer != str(responsible)]
    assert record["scores"][str(responsible)] > 0.05 and max(others) < 1e-6  # fp32 rounding elsewhere
    model, examples = _copier_in_layer(responsible)
    blended = select_softmax_layers(model, "recall", 1, replace(_probe(steps=2), recall=examples, recall_weight=0.5))
    assert blended["choice"] == [responsible]
    with pytest.raises(UserError, match="needs held-out recall examples"):
        select_softmax_layers(_converted(4), "recall", 1, _probe())


def test_students_only_in_converts_just_those_layers():
    """layer_kl's view: with only layer 1 running its student, layer 0 (and every other) gives the
    teacher's output, so the logits equal those of the model converted in layer 1 alone."""
    from linearize.surgery import students_only_in

    all_layers, layer_one = _converted(3), _converted(3, layers=[1])
    layer_one.load_state_dict(all_layers.state_dict(), strict=False)  # the same student parameters in layer 1
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad(), students_only_in(all_layers, [1]):
        only = all_layers(input_ids=ids).logits
    with torch.no_grad():
        expected, converted = layer_one(input_ids=ids).logits, all_layers(input_ids=ids).logits
    torch.testing.assert_close(only, expected, rtol=0, atol=0)  # the same modules run on the same inputs
    assert not torch.equal(only, converted)  # and leaving the block converts every layer again


def test_the_transfer_score_does_not_follow_the_size_of_a_layers_outputs():
    """Scaling a layer's values scales its teacher and student outputs alike: its relative error stays,
    where the raw MSE would grow 100x (on SmolLM2 the raw MSE simply grew with depth)."""
    from linearize.train.layer_choice import held_out_relative_error

    model, tokens = _converted(2), _probe().held_out
    before = held_out_relative_error(model, tokens)
    with torch.no_grad():
        model.model.layers[1].self_attn.base_layer.v_proj.weight.mul_(10.0)
    after = held_out_relative_error(model, tokens)
    assert after[1] == pytest.approx(before[1], rel=1e-4)  # fp32 sums of ~1e3 terms, rounded differently


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, tiny_tokenizer):
    """(config, run dir) of a transfer + export run with `softmax_layers: auto` on the tiny 2-layer llama."""
    from stages.pipeline import run_stages

    root = tmp_path_factory.mktemp("auto_run")
    cfg = tiny_run_config(root, tiny_tokenizer, attention=AUTO_ONE_LAYER,
                          attention_transfer={"max_steps": 2, "save_every": 2, "eval_every": 2})
    run_stages(cfg, ["attention_transfer", "export"])
    return cfg, root / "runs" / "tiny"


def test_auto_records_and_applies_its_choice(auto_run):
    cfg, run_dir = auto_run
    record = json.loads((run_dir / "attention_transfer" / "softmax_layers.json").read_text())
    assert record["selector"] == "transfer_probe" and record["candidates"] == [0, 1] and len(record["choice"]) == 1
    assert set(record["scores"]) == {"0", "1"} and record["tokens"]["probe"] == 2 * cfg.data.seq_len
    (chosen,) = record["choice"]
    export = json.loads((run_dir / "export" / "config.json").read_text())["linearize"]
    assert export["layers"] == {str(chosen): "softmax", str(1 - chosen): cfg.attention.mechanism}
    assert export["attention"]["softmax_layers"] == [chosen]
    from safetensors.torch import load_file

    student = load_file(run_dir / "attention_transfer" / "student.safetensors")
    assert student and all(f"layers.{1 - chosen}." in name for name in student)  # only the converted layer trained
    assert (run_dir / "attention_transfer" / "softmax_layers.png").is_file()
    assert "attention_transfer/softmax_layers.png" in (run_dir / "report.md").read_text()
    assert (run_dir / "config.yaml").read_text().count("softmax_layers: auto") == 1  # the config keeps auto
    from stages.pipeline import _layers_line

    assert f"softmax attention kept in layers [{chosen}], chosen by transfer_probe" in _layers_line(cfg, run_dir)


def test_a_rerun_reads_the_choice_and_force_on_its_stage_chooses_again(auto_run, tmp_path, monkeypatch):
    import stages.layer_choice
    from stages.pipeline import run_stages
    from test_stages import copy_run

    cfg, run_dir = copy_run(*auto_run, tmp_path)
    calls = []

    def refuse(*args):
        calls.append(args)
        raise AssertionError("the recorded choice must be read, not made again")

    monkeypatch.setattr(stages.layer_choice, "select_softmax_layers", refuse)
    run_stages(cfg, ["export"], force=True)  # builds the student from the recorded choice
    (run_dir / "attention_transfer" / "DONE").unlink()  # as if interrupted after its last checkpoint
    run_stages(cfg, ["attention_transfer"])  # resumes from that checkpoint with the recorded choice
    assert not calls and (run_dir / "attention_transfer" / "DONE").is_file()
    with pytest.raises(AssertionError, match="must be read"):
        run_stages(cfg, ["attention_transfer"], force=True)  # --force discards the choice with its stage
    assert len(calls) == 1 and not (run_dir / "attention_transfer" / "softmax_layers.json").exists()


def test_a_record_for_another_request_is_refused(auto_run, tmp_path):
    from stages.config_loader import config_from_dict, config_to_dict
    from test_stages import copy_run

    cfg, run_dir = copy_run(*auto_run, tmp_path)
    other = config_from_dict(config_to_dict(cfg), "test", ["attention.softmax_layer_selector=uniform"])
    from stages.layer_choice import applied

    with pytest.raises(UserError, match="softmax_layer_selector=uniform .recorded transfer_probe.") as err:
        applied(other, run_dir)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"selector": "uniform", "count": 1, "steps": 8}',
                                     '{"selector": "uniform", "count": 1, "steps": 8, "choice": ["a"]}'])
def test_a_damaged_choice_record_is_one_line_naming_it(auto_run, tmp_path, content):
    """Invalid JSON, a list, no `choice`, or a choice that is not layer indices: one line naming the file."""
    from stages.layer_choice import applied
    from test_stages import copy_run

    cfg, run_dir = copy_run(*auto_run, tmp_path)
    record = run_dir / "attention_transfer" / "softmax_layers.json"
    record.write_text(content)
    with pytest.raises(UserError, match="softmax_layers.json is not a") as err:
        applied(cfg, run_dir)
    assert "\n" not in str(err.value)


def test_a_stage_reads_the_choice_and_never_makes_it(auto_run, tmp_path):
    """Only the pipeline chooses (`stages.layer_choice.ensure_choice`, before a stage runs); a stage started
    without a recorded choice says so in one line instead of training a probe model."""
    import shutil

    from stages.common import start_stage
    from test_stages import copy_run

    cfg, run_dir = copy_run(*auto_run, tmp_path)
    shutil.rmtree(run_dir / "attention_transfer")
    with pytest.raises(UserError, match="holds no layer choice yet"):
        start_stage(cfg, run_dir, "evaluate")


@pytest.mark.parametrize("attention, problem", [
    ({"softmax_layers": "all"}, "attention.softmax_layers: must be a list of layer indices or 'auto'"),
    ({"softmax_layers": [-1]}, "attention.softmax_layers: layer indices must be integers >= 0"),
    ({"softmax_layers": "auto"}, "auto needs attention.softmax_layer_count > 0"),
    ({"softmax_layers": "auto", "softmax_layer_count": 2.5}, "must be a whole number"),
    ({**AUTO_ONE_LAYER, "softmax_layer_selector": "best"}, "unknown value 'best'; valid: transfer_probe, uniform"),
])
def test_config_errors_are_one_line(attention, problem):
    from stages.config_loader import config_from_dict

    with pytest.raises(UserError) as err:
        config_from_dict({"attention": attention}, "test")
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_auto_is_refused_by_the_library():
    """`auto` is resolved by a run (block-wise or not: tests/test_blockwise.py); the library takes indices."""
    with pytest.raises(UserError, match="resolved by a run"):
        linearize.linearize_model(tiny_model("llama"), AttentionConfig(softmax_layers="auto"))


def test_the_choice_keys_are_read_whatever_the_mechanism():
    """Setting them on the command line gives no 'ignored by attention.mechanism' warning."""
    from stages.config_loader import config_from_dict, ignored_attention_keys

    keys = [f"attention.{key}" for key in ("softmax_layers", "softmax_layer_count", "softmax_layer_selector",
                                           "selection_steps")]
    for mechanism in ("window_linear", "liger_window", "gated_delta"):
        cfg = config_from_dict({"attention": {**AUTO_ONE_LAYER, "mechanism": mechanism}}, "test")
        assert ignored_attention_keys(cfg, keys) == []


@pytest.mark.slow
def test_two_deepspeed_ranks_train_with_rank_zeros_choice(tmp_path, tiny_tokenizer):
    """Rank 0 chooses (one printed line), the other rank waits for its file, and both train the same
    student as a single process with the same config."""
    from test_deepspeed import PER_RANK, SINGLE, _config, _launch, _run_single

    for name in ("single", "ranks"):
        (tmp_path / name).mkdir()
    _run_single(_config(tmp_path / "single", tiny_tokenizer, SINGLE, ["attention_transfer"], AUTO_ONE_LAYER))
    config = _config(tmp_path / "ranks", tiny_tokenizer, PER_RANK, ["attention_transfer"], AUTO_ONE_LAYER)
    done = _launch(config, tmp_path / "ranks.yaml", zero_stage=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count("softmax layers [") == 1
    records = [json.loads((tmp_path / name / "runs" / "tiny" / "attention_transfer" / "softmax_layers.json").read_text())
               for name in ("single", "ranks")]
    assert records[0]["choice"] == records[1]["choice"]
