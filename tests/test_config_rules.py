"""The rules beside the schema's fields and across keys (`linearize.config.validate`), through the loader
and the command line: every refusal is one line naming the key and where it was set, before anything
loads; the mechanisms' declared capabilities are what the mechanisms do."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from linearize import UserError
from linearize.attention import MECHANISMS, Projected, RunOptions, build_mechanism
from linearize.config import AttentionConfig, RunConfig, validate
from linearize.ops._common import FORM_NAMES
from stages import cli
from stages.config_loader import CONFIGS_DIR, load_config

DEMO = CONFIGS_DIR / "demo.yaml"


def refusal(overrides, path=DEMO) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def float_keys(cls: type, prefix: str = "") -> list[str]:
    """Every scalar float field of a config dataclass, dotted (lists of floats are checked apart)."""
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += float_keys(type(default), f"{prefix}{f.name}.")
        elif f.type in ("float", float):
            keys.append(f"{prefix}{f.name}")
    return keys


FLOAT_KEYS = float_keys(RunConfig)


def test_the_float_keys_are_found():
    assert {"attention.softmax_layer_count", "attention_transfer.cache_gb", "lora_recovery.kl_temperature",
            "data.teacher_samples.top_p"} <= set(FLOAT_KEYS)


def with_value(cfg, dotted: str, value):
    """A copy of frozen config `cfg` with dotted key `dotted` set to `value`."""
    head, _, rest = dotted.partition(".")
    return dataclasses.replace(cfg, **{head: with_value(getattr(cfg, head), rest, value) if rest else value})


def test_every_float_refuses_nan_and_inf():
    for key in FLOAT_KEYS:
        for value in (float("nan"), float("inf"), float("-inf")):
            assert validate(with_value(RunConfig(), key, value)) == [(key, f"must be a finite number, got {value}")]
    # the loader reads the words: each float key once through it would take ~15 s on these machines
    assert refusal(["lora_recovery.lr=-inf"]) == "command line: lora_recovery.lr: must be a finite number, got -inf"


def test_float_lists_and_mix_weights_refuse_nan():
    assert "evaluate.long_context.passkey_depths: must be a finite" in refusal(["evaluate.long_context.passkey_depths=[0.5, nan]"])
    assert "data.mix[1].weight: must be a finite" in refusal(["data.mix=[{source: teacher, weight: 1}, {source: recall, weight: inf}]"])


def test_cache_gb_has_a_ceiling():
    assert "attention_transfer.cache_gb: must be in [0, 1e+06], got 1e+300" in refusal(["attention_transfer.cache_gb=1e300"])
    assert load_config(DEMO, ["attention_transfer.cache_gb=1e6"]).attention_transfer.cache_gb == 1e6


@pytest.mark.parametrize("command", ["config", "run"])
@pytest.mark.parametrize("override, fragment", [
    ("attention.softmax_layer_count=nan", "attention.softmax_layer_count: must be a finite number"),
    ("attention.softmax_layer_count=inf", "attention.softmax_layer_count: must be a finite number"),
    ("attention_transfer.cache_gb=nan", "attention_transfer.cache_gb: must be a finite number"),
    ("attention_transfer.cache_gb=inf", "attention_transfer.cache_gb: must be a finite number"),
    ("attention_transfer.cache_gb=1e300", "attention_transfer.cache_gb: must be in [0, 1e+06]"),
])
def test_the_command_line_refuses_before_anything_loads(command, override, fragment, tmp_path, capsys):
    assert cli.main([command, str(DEMO), f"output_dir={tmp_path}", override]) == cli.EXIT_USER_ERROR
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("linearize: error: command line: ") and fragment in errors[0]
    assert list(tmp_path.iterdir()) == []  # no run folder, no stage folder


def test_gated_delta_has_no_parallel_form(tmp_path, capsys):
    message = refusal(["attention.mechanism=gated_delta", "attention.form=parallel"])
    assert message == "command line: attention.form: mechanism gated_delta has no 'parallel' form; valid: chunk, recurrent"
    assert cli.main(["run", str(DEMO), f"output_dir={tmp_path}", "attention.mechanism=gated_delta",
                     "attention.form=parallel"]) == cli.EXIT_USER_ERROR
    assert list(tmp_path.iterdir()) == []  # it once failed only after the stage folder existed
    for mechanism in ("kda", "gated_delta_window"):
        assert "has no 'parallel' form" in refusal([f"attention.mechanism={mechanism}", "attention.form=parallel"])
    load_config(DEMO, ["attention.mechanism=gated_delta", "attention.form=recurrent"])


def test_attention_weight_loss_needs_a_mechanism_that_gives_weights():
    message = refusal(["attention.mechanism=lawcat", "attention.form=parallel", "attention_transfer.attn_ce_weight=0.5"])
    assert message.startswith("command line: attention_transfer.attn_ce_weight: > 0 needs attention weights")
    assert "lawcat" in message and "linear, window_linear" in message
    assert "window_only" in refusal(["attention.window_only=true", "attention.form=parallel",
                                      "attention_transfer.attn_ce_weight=0.5"])
    load_config(DEMO, ["attention.mechanism=linear", "attention.form=parallel", "attention_transfer.attn_ce_weight=0.5"])


def test_a_learned_half_life_needs_one_to_start_from():
    message = refusal(["attention.linear_half_life=null", "attention.linear_half_life_learned=true"])
    assert message == ("command line: attention.linear_half_life_learned: true needs attention.linear_half_life "
                       "(the half-life every head starts from)")
    load_config(DEMO, ["attention.linear_half_life=32", "attention.linear_half_life_learned=true"])


@pytest.mark.parametrize("mechanism", [m for m in MECHANISMS if m != "gated_delta"])
def test_native_family_takes_only_gated_delta(mechanism):
    message = refusal([f"attention.mechanism={mechanism}", "attention.native_family=qwen3_5"])
    assert message.startswith("command line: attention.native_family: qwen3_5 cannot be trained with mechanism "
                              f"{mechanism};"), message


@pytest.mark.parametrize("override, key", [
    ("attention.sink_tokens=4", "attention.sink_tokens"),
    ("attention.delta_rope=true", "attention.delta_rope"),
    ("attention.decay_from=key", "attention.decay_from"),
])
def test_native_family_refuses_settings_its_layer_lacks(override, key):
    native = ["attention.mechanism=gated_delta", "attention.native_family=qwen3_5", "attention.sink_tokens=0"]
    assert refusal([*native, override]).startswith(f"command line: {key}: native_family=qwen3_5 needs {key}=")
    cfg = load_config(DEMO, native)
    assert (cfg.attention.native_family, cfg.attention.sink_tokens) == ("qwen3_5", 0)
    # demo.yaml sets the sinks: the refusal names the file that did
    assert refusal(native[:2]).startswith(f"{DEMO}: attention.sink_tokens: ")


@pytest.mark.parametrize("override, fragment", [
    ("attention.native_family=llama", "attention.native_family: unknown value 'llama'; valid: qwen3_5, null"),
    ("export.format=gguf", "export.format: unknown value 'gguf'; valid: linearize, qwen3_5"),
    ("data.teacher_samples.tokens=0", "data.teacher_samples.tokens: must be > 0"),
    ("data.teacher_samples.max_new_tokens=0", "data.teacher_samples.max_new_tokens: must be > 0"),
    ("data.teacher_samples.batch_size=0", "data.teacher_samples.batch_size: must be > 0"),
    ("data.teacher_samples.temperature=0", "data.teacher_samples.temperature: must be > 0"),
    ("data.teacher_samples.top_p=0", "data.teacher_samples.top_p: must be in (0, 1]"),
    ("data.teacher_samples.top_p=1.01", "data.teacher_samples.top_p: must be in (0, 1]"),
    ("data.teacher_samples.chat=maybe", "data.teacher_samples.chat: unknown value 'maybe'; valid: auto, on, off"),
    ("data.teacher_samples.chat_share=1.5", "data.teacher_samples.chat_share: must be in [0, 1]"),
    ("data.teacher_samples.long_share=-0.1", "data.teacher_samples.long_share: must be in [0, 1]"),
    ("data.teacher_samples.context_tokens=[512, 256]", "data.teacher_samples.context_tokens: must be a pair [min, max]"),
    ("data.teacher_samples.context_tokens=[0, 256]", "data.teacher_samples.context_tokens: must be a pair [min, max]"),
    ("data.teacher_samples.context_tokens=[256]", "data.teacher_samples.context_tokens: must be a pair [min, max]"),
    ("data.recall.sequences=0", "data.recall.sequences: must be > 0"),
    ("data.recall.min_distance=0", "data.recall.min_distance: must be > 0"),
    ("data.recall.min_distance=500", "data.recall.min_distance: must be <= data.recall.max_distance (480)"),
    ("data.recall.queries=0", "data.recall.queries: must be >= 1"),
    ("lora_recovery.kl_top_k=-1", "lora_recovery.kl_top_k: must be >= 0"),
    ("lora_recovery.kl_temperature=0", "lora_recovery.kl_temperature: must be > 0"),
    ("lora_recovery.hidden_weight=-1", "lora_recovery.hidden_weight: must be >= 0"),
    ("attention.selector_recall_weight=1.5", "attention.selector_recall_weight: must be in [0, 1]"),
    ("attention.softmax_layer_selector=best", "attention.softmax_layer_selector: unknown value 'best'"),
    ("data.mix=[]", "data.mix: is an empty list"),
    ("data.mix=[{source: teacher, weight: 0}]", "data.mix[0].weight: must be > 0"),
    ("data.mix=[{source: teacher}]", "data.mix[0].weight: missing value"),
    ("data.mix=[{weight: 1}]", "data.mix[0].source: missing value"),
    ("data.mix=[{source: '', weight: 1}]", "data.mix[0].source: is empty"),
    ("data.mix=[{source: teacher, weight: 1, share: 2}]", "data.mix[0].share: unknown key; valid keys at 'data.mix[0]': source, weight"),
])
def test_rules_of_the_new_keys(override, fragment):
    message = refusal([override])
    assert message.startswith("command line: ") and fragment in message, message


def test_the_new_keys_accept_good_values():
    cfg = load_config(DEMO, ["data.mix=[{source: teacher, weight: 0.7}, {source: recall, weight: 0.3}]",
                             "data.teacher_samples.top_p=1", "data.teacher_samples.context_tokens=[64, 64]",
                             "data.recall.min_distance=480", "export.format=qwen3_5", "attention.selector_recall_weight=0"])
    assert [(e.source, e.weight) for e in cfg.data.mix] == [("teacher", 0.7), ("recall", 0.3)]
    assert load_config(DEMO, ["data.mix=null"]).data.mix is None


def test_a_mix_entry_problem_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  mix:\n    - {source: teacher, weight: 1}\n    - {source: recall, weight: -2}\n")
    assert refusal([], path) == f"{path}: data.mix[1].weight: must be > 0, got -2.0"


def test_validate_reads_a_typed_config():
    """The library function: no yaml, no omegaconf, a RunConfig in, (key, problem) pairs out."""
    assert validate(RunConfig()) == []
    cfg = dataclasses.replace(RunConfig(), attention=AttentionConfig(mechanism="kda", form="parallel", feature_dim=-1))
    assert validate(cfg) == [("attention.feature_dim", "must be > 0, got -1")]  # field rules first, alone
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, feature_dim=8))
    assert validate(cfg) == [("attention.form", "mechanism kda has no 'parallel' form; valid: chunk, recurrent")]


BATCH, TOKENS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 1, 6, 4, 2, 16, 64


def _projected() -> Projected:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, TOKENS, HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(BATCH, TOKENS, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    return Projected(q, k, v, q, k, k, torch.randn(BATCH, TOKENS, HIDDEN, generator=gen))


@pytest.mark.parametrize("mechanism", [m for m, entry in MECHANISMS.items() if entry.factory is not None])
def test_declared_capabilities_are_what_the_mechanism_does(mechanism):
    """A form the registry declares runs, one it does not declare fails; attention weights likewise."""
    entry = MECHANISMS[mechanism]
    cfg = AttentionConfig(mechanism=mechanism, feature_map="softmax_dim" if mechanism.startswith("liger") else "hedgehog",
                          feature_dim=8, window_size=4, chunk_size=4)
    module, p = build_mechanism(cfg, HEADS, KV_HEADS, HEAD_DIM, HIDDEN), _projected()
    for form in FORM_NAMES:
        opts = RunOptions(form=form, chunk_size=4, backend="torch")
        if form in entry.forms:
            module(p, None, opts, want_state=False)
        else:
            with pytest.raises((UserError, ValueError)):
                module(p, None, opts, want_state=False)
    if entry.attention_weights:
        assert module.attention_weights(p).shape == (BATCH, HEADS, TOKENS, TOKENS)
    else:
        with pytest.raises(ValueError):
            module.attention_weights(p)
