"""The yaml config loader: strictness (one-line errors naming key and file), includes, overrides, the
shipped configs, and config diffs."""
from __future__ import annotations

from pathlib import Path

from dataclasses import FrozenInstanceError

import pytest

from linearize import UserError
from linearize.attention import MECHANISMS
from linearize.config import changed_keys, config_to_dict
from stages.config_loader import CONFIGS_DIR, config_from_dict, load_config, save_resolved

ALL_YAMLS = sorted(CONFIGS_DIR.rglob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_error(path, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_configs_dir_has_the_presets():
    names = {p.relative_to(CONFIGS_DIR).as_posix() for p in ALL_YAMLS}
    for preset in ("demo", "lolcats", "hedgehog_linear", "liger", "liger_window", "lawcat",
                   "baseline_window_only", "baseline_no_transfer"):
        assert f"{preset}.yaml" in names
    assert {"engine/single.yaml", "engine/zero2.yaml", "engine/zero3.yaml"} <= names


RECIPES_DIR = CONFIGS_DIR.parent / "bench" / "recipes"  # the quality experiments' rows (bench/quality.py)


@pytest.mark.parametrize("path", ALL_YAMLS + sorted(RECIPES_DIR.glob("*.yaml")),
                         ids=lambda p: p.relative_to(CONFIGS_DIR.parent).as_posix())
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.attention.mechanism in MECHANISMS


def test_demo_values():
    cfg = load_config(CONFIGS_DIR / "demo.yaml")
    assert cfg.model.path == "smollm2-135m-instruct"
    assert (cfg.data.train, cfg.data.eval, cfg.data.seq_len) == ("demo-wiki", "demo-news", 512)
    assert (cfg.attention.mechanism, cfg.attention.feature_map) == ("window_linear", "hedgehog")
    assert list(cfg.stages) == ["attention_transfer", "lora_recovery", "evaluate", "export"]


def test_presets_follow_their_recipes():
    lolcats = load_config(CONFIGS_DIR / "lolcats.yaml")
    assert lolcats.attention_transfer.lr == pytest.approx(1e-2)
    assert lolcats.attention_transfer.mse_factor == 1000.0
    assert (lolcats.lora_recovery.rank, lolcats.lora_recovery.alpha) == (8, 16.0)
    # the behaviour recipe of the 141K-token table (docs/quality.md, 2026-12-08): no adapter in stage 2, the
    # recall selector's layers, 30% recall data
    assert list(lolcats.lora_recovery.targets) == [] and lolcats.lora_recovery.train_student
    assert (lolcats.lora_recovery.kl_weight, lolcats.lora_recovery.ce_weight) == (1.0, 0.0)
    assert lolcats.lora_recovery.lr == pytest.approx(3e-3)
    assert (lolcats.attention.sink_tokens, lolcats.attention.linear_half_life) == (32, 64)
    assert (lolcats.attention.softmax_layers, lolcats.attention.softmax_layer_count) == ("auto", 3)
    assert lolcats.attention.softmax_layer_selector == "recall"
    assert [(m.source, m.weight) for m in lolcats.data.mix] == [("recall", 0.3), ("demo-wiki", 0.7)]
    assert "attention_transfer" not in load_config(CONFIGS_DIR / "baseline_no_transfer.yaml").stages
    assert load_config(CONFIGS_DIR / "baseline_window_only.yaml").attention.window_only
    assert load_config(CONFIGS_DIR / "engine/zero3.yaml").engine.name == "deepspeed"


def test_every_preset_key_has_a_comment():
    for path in ALL_YAMLS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            is_key = ":" in stripped and not stripped.startswith(("#", "-"))
            is_section = stripped.endswith(":")
            if is_key and not is_section:
                assert "#" in line, f"{path}:{number} has no comment: {line}"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "model:\n  pathh: x\n")
    message = load_error(path)
    assert str(path) in message and "model.pathh" in message and "did you mean 'path'" in message


def test_unknown_top_level_key(tmp_path):
    message = load_error(write(tmp_path / "bad.yaml", "learning_rate: 1\n"))
    assert "learning_rate" in message and "unknown key" in message


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "data:\n  seq_len: long\n")
    message = load_error(path)
    assert str(path) in message and "data.seq_len" in message


def test_missing_value_is_an_error(tmp_path):
    message = load_error(write(tmp_path / "bad.yaml", "model:\n  path:\n"))
    assert "model.path" in message and "missing value" in message


def test_scalar_for_a_section(tmp_path):
    assert "mapping" in load_error(write(tmp_path / "bad.yaml", "model: 3\n"))


def test_invalid_yaml_gives_the_line(tmp_path):
    assert "line 2" in load_error(write(tmp_path / "bad.yaml", "seed: 1\n  x: [\n"))


def test_missing_file():
    assert "not found" in load_error("no/such/config.yaml")


def test_unknown_mechanism_lists_valid_names(tmp_path):
    path = write(tmp_path / "bad.yaml", "attention:\n  mechanism: mamba\n")
    message = load_error(path)
    assert str(path) in message and "attention.mechanism" in message
    assert all(name in message for name in MECHANISMS)


def test_bad_dtype_and_stage_names(tmp_path):
    path = write(tmp_path / "ok.yaml", "seed: 1\n")
    assert "model.dtype" in load_error(path, ["model.dtype=float64"])
    assert "stages" in load_error(path, ["stages=[attention_transfer, distill]"])


def test_range_and_consistency_checks(tmp_path):
    path = write(tmp_path / "ok.yaml", "seed: 1\n")
    assert "> 0" in load_error(path, ["data.seq_len=0"])
    assert "[0, 1)" in load_error(path, ["data.eval_fraction=1.5"])
    assert "lora_recovery.eval_sequences" in load_error(path, ["lora_recovery.eval_sequences=-1"])
    assert "parallel" in load_error(path, ["attention_transfer.attn_ce_weight=1"])
    load_config(path, ["attention_transfer.attn_ce_weight=1", "attention.form=parallel"])
    assert "no loss to train on" in load_error(path, ["lora_recovery.ce_weight=0", "lora_recovery.kl_weight=0"])
    assert "lora_recovery.ce_weight" in load_error(path, ["lora_recovery.ce_weight=-1"])
    load_config(path, ["lora_recovery.ce_weight=0", "lora_recovery.kl_weight=1"])  # KL-only distillation
    assert "nothing to train" in load_error(path, ["lora_recovery.targets=[]"])
    load_config(path, ["lora_recovery.targets=[]", "lora_recovery.train_student=true"])  # the student's own parameters


def test_includes_merge_in_order_then_file(tmp_path):
    write(tmp_path / "frag/a.yaml", "seed: 1\ndata:\n  seq_len: 128\n")
    write(tmp_path / "frag/b.yaml", "seed: 2\n")
    path = write(tmp_path / "run.yaml", "includes: [frag/a.yaml, frag/b.yaml]\nrun_name: mine\n")
    cfg = load_config(path)
    assert (cfg.seed, cfg.data.seq_len, cfg.run_name) == (2, 128, "mine")
    write(tmp_path / "run2.yaml", "includes: [frag/b.yaml]\nseed: 7\n")
    assert load_config(tmp_path / "run2.yaml").seed == 7


def test_includes_fall_back_to_the_configs_dir(tmp_path):
    cfg = load_config(write(tmp_path / "run.yaml", "includes: [engine/zero2.yaml]\n"))
    assert (cfg.engine.name, cfg.engine.zero_stage) == ("deepspeed", 2)


def test_errors_in_an_include_name_the_fragment(tmp_path):
    fragment = write(tmp_path / "frag.yaml", "attention:\n  windw: 3\n")
    message = load_error(write(tmp_path / "run.yaml", "includes: [frag.yaml]\n"))
    assert str(fragment) in message and "attention.windw" in message


def test_only_one_level_of_includes(tmp_path):
    write(tmp_path / "inner.yaml", "seed: 1\n")
    write(tmp_path / "outer.yaml", "includes: [inner.yaml]\n")
    assert "one level" in load_error(write(tmp_path / "run.yaml", "includes: [outer.yaml]\n"))
    assert "not found" in load_error(write(tmp_path / "run2.yaml", "includes: [nope.yaml]\n"))


def test_overrides_win_and_are_typed(tmp_path):
    path = write(tmp_path / "run.yaml", "data:\n  seq_len: 128\n")
    cfg = load_config(path, ["data.seq_len=64", "lora_recovery.lr=3e-4", "attention.softmax_layers=[0, 5]",
                             "lora_recovery.targets=[v_proj]", "model.tokenizer=null"])
    assert cfg.data.seq_len == 64
    assert cfg.lora_recovery.lr == pytest.approx(3e-4)
    assert list(cfg.attention.softmax_layers) == [0, 5]
    assert list(cfg.lora_recovery.targets) == ["v_proj"]
    assert cfg.model.tokenizer is None


def test_empty_override_is_the_empty_string(tmp_path):
    path = write(tmp_path / "run.yaml", "seed: 1\n")
    assert load_config(path, ["data.eval="]).data.eval == ""
    assert "missing value" in load_error(path, ["data.seq_len="])


def test_override_errors_name_the_command_line(tmp_path):
    path = write(tmp_path / "run.yaml", "seed: 1\n")
    for bad in (["data.seqlen=3"], ["data.seq_len=abc"], ["seq_len"], ["attention.mechanism=rwkv"]):
        assert load_error(path, bad).startswith("command line: "), bad


def test_value_errors_name_the_file_that_set_them(tmp_path):
    write(tmp_path / "frag.yaml", "attention:\n  feature_map: cosformer\n")
    message = load_error(write(tmp_path / "run.yaml", "includes: [frag.yaml]\nseed: 3\n"))
    assert message.startswith(str(tmp_path / "frag.yaml")) and "hedgehog" in message


def test_config_is_frozen():
    cfg = load_config(CONFIGS_DIR / "demo.yaml")
    with pytest.raises(FrozenInstanceError):
        cfg.seed = 3
    with pytest.raises(FrozenInstanceError):
        cfg.data.seq_len = 3


def test_save_resolved_round_trips(tmp_path):
    cfg = load_config(CONFIGS_DIR / "lolcats.yaml", ["seed=5"])
    saved = save_resolved(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(saved)
    assert changed_keys(cfg, again) == []
    assert config_to_dict(again) == config_to_dict(cfg)
    assert changed_keys(cfg, config_from_dict(config_to_dict(cfg), "checkpoint")) == []


def test_diff_configs_lists_changed_keys():
    a = load_config(CONFIGS_DIR / "demo.yaml")
    b = load_config(CONFIGS_DIR / "demo.yaml", ["seed=1", "attention.window_size=32", "stages=[evaluate]"])
    assert changed_keys(a, b) == ["attention.window_size", "seed", "stages"]
    assert changed_keys(a, a) == []
    assert changed_keys({"x": {"y": 1}}, {"x": {"y": 1, "z": 2}}) == ["x.z"]


def test_names_come_from_the_registries_when_present(tmp_path, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("linearize.feature_maps")
    fake.available_feature_maps = lambda: ["cosformer"]
    monkeypatch.setitem(sys.modules, "linearize.feature_maps", fake)
    path = write(tmp_path / "run.yaml", "attention:\n  feature_map: cosformer\n")
    assert load_config(path).attention.feature_map == "cosformer"
    assert "valid: cosformer" in load_error(path, ["attention.feature_map=hedgehog"])


def test_a_value_the_loader_accepts_never_fails_later():
    """Every name the loader accepts comes from the registry that uses it, so the library takes it."""
    import dataclasses

    from linearize.dtypes import torch_dtype
    from linearize.train import distributed
    from linearize.train.schedule import SCHEDULES, build_schedule

    cfg = load_config(CONFIGS_DIR / "demo.yaml")
    for section in ("attention_transfer", "lora_recovery"):
        for name in SCHEDULES:  # plateau once passed the loader for lora_recovery and failed in the stage
            stage = load_config(CONFIGS_DIR / "demo.yaml", [f"{section}.scheduler={name}"])
            assert build_schedule(getattr(stage, section)).lr(1) > 0
    for precision in distributed.PRECISIONS:
        for zero_stage in distributed.ZERO_STAGES:
            engine = load_config(CONFIGS_DIR / "demo.yaml", [f"engine.precision={precision}",
                                                              f"engine.zero_stage={zero_stage}"]).engine
            assert distributed.deepspeed_config(engine, cfg.attention_transfer, 1)["zero_optimization"]["stage"] == zero_stage
    for dtype in ("float32", "bfloat16", "float16"):
        torch_dtype(load_config(CONFIGS_DIR / "demo.yaml", [f"model.dtype={dtype}"]).model.dtype)
    # engine.zero_stage=0 once passed and died inside DeepSpeed with a traceback
    assert "engine.zero_stage" in load_error(CONFIGS_DIR / "demo.yaml", ["engine.zero_stage=0"])
    assert dataclasses.is_dataclass(cfg) and not hasattr(cfg, "_metadata")  # a dataclass, not an OmegaConf node


def test_command_line_keys_the_mechanism_ignores_are_warned_about(capsys):
    cfg = load_config(CONFIGS_DIR / "demo.yaml", ["attention.mechanism=liger", "attention.window_size=32",
                                                   "attention.gate_norm=8", "seed=2"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["linearize: warning: attention.window_size is ignored by attention.mechanism=liger; "
                        "it applies to: window_linear, liger_window, gated_delta_window"]  # gate_norm is liger's; seed is not attention
    assert cfg.attention.window_size == 32  # a warning, not an error
    load_config(CONFIGS_DIR / "demo.yaml", ["attention.mechanism=liger"])  # the preset's own keys: no warning
    assert "warning" not in capsys.readouterr().err


def test_the_docs_list_each_mechanisms_keys():
    """docs/configs.md's "which keys apply" table says what each mechanism declares."""
    from linearize.attention import COMMON_CONFIG_KEYS, mechanism_config_keys

    docs = (CONFIGS_DIR.parent / "docs" / "configs.md").read_text()
    for mechanism, keys in mechanism_config_keys().items():
        own = ", ".join(f"`{key}`" for key in keys if key not in COMMON_CONFIG_KEYS) or "(none)"
        assert f"| `{mechanism}` | {own} |" in docs


def test_stage_sections_of_the_schema_are_the_registered_stages():
    """The library knows a stage's config section from the schema; the runners know it from the registry."""
    from linearize.config import stage_sections
    from stages.registry import STAGES

    assert stage_sections() == tuple(STAGES)


def test_switching_to_liger_on_the_command_line_brings_its_feature_map(capsys):
    switched = load_config(CONFIGS_DIR / "demo.yaml", ["attention.mechanism=liger"])
    assert switched.attention.feature_map == "softmax_dim"  # demo's hedgehog does not fit liger's gate
    assert "note: attention.feature_map=softmax_dim, liger's default, replaces hedgehog" in capsys.readouterr().err
    chosen = load_config(CONFIGS_DIR / "demo.yaml", ["attention.mechanism=liger", "attention.feature_map=elu"])
    assert chosen.attention.feature_map == "elu" and capsys.readouterr().err == ""  # named: kept
    kept = load_config(CONFIGS_DIR / "demo.yaml", ["attention.mechanism=linear"])
    assert kept.attention.feature_map == "hedgehog"  # linear takes any map: the file's stays
