"""`linearize compare` on tiny models: two configs at one budget give two rows, the table and the plot; a
re-run skips the finished runs and reuses their measurements; the budget overrides; decode-state bytes;
bad input is one line."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import tiny_model
from linearize.errors import UserError
from stages import cli, compare
from test_stages import write_tiny_assets

SEQ_LEN = 32  # write_tiny_assets' data.seq_len
BUDGET = ["--transfer-tokens", "64", "--lora-tokens", "32"]  # 2 transfer steps, 1 LoRA step
SMALL = ["--eval-sequences", "1", "--text-sequences", "1", "--stage-eval-sequences", "1", "--state-context", "128"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_configs(root, tokenizer_dir) -> list[str]:
    """Two yaml configs on the tiny assets: window_linear with both training stages, liger with LoRA only."""
    assets = write_tiny_assets(root, tokenizer_dir)
    shared = {**assets, "evaluate": {"sample_tokens": 2, "sample_prompt": "The quick",
                                     "long_context": {"passkey_depths": [0.5], "passkey_trials": 1}}}
    configs = {
        "window": {"attention": {"mechanism": "window_linear", "window_size": 8, "feature_dim": 8, "chunk_size": 8},
                   "stages": ["attention_transfer", "lora_recovery", "evaluate", "export"]},
        "liger": {"attention": {"mechanism": "liger", "feature_map": "softmax_dim", "chunk_size": 8},
                  "stages": ["lora_recovery", "evaluate"]},
    }
    paths = []
    for name, extra in configs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**shared, **extra}))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_tokenizer):
    """(configs, out dir, printed output) of one comparison of the two tiny configs."""
    root = tmp_path_factory.mktemp("compare")
    configs = write_configs(root, tiny_tokenizer)
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        printed = []
        mp.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
        assert cli.main(["compare", *configs, "--out", str(out), *BUDGET, *SMALL]) == 0
    return configs, out, "\n".join(printed)


def test_two_configs_give_two_rows_the_table_and_the_plot(compared):
    configs, out, _ = compared
    result = json.loads((out / "compare.json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["window", "liger"]
    assert rows["window"]["tokens"] == {"attention_transfer": 64, "lora_recovery": 32}
    assert rows["liger"]["tokens"] == {"lora_recovery": 32}  # no transfer stage: the LoRA budget only
    for row in rows.values():
        numbers = [row["ppl_ratio"], row["kl"], row["top1_agreement"], row["ratio_spread"], row["wall_s"]]
        numbers += [row["texts"][kind]["ppl_ratio"] for kind in ("code", "manual")]
        assert all(math.isfinite(x) and x >= 0 for x in numbers)
        assert row["ppl_ratio"] == row["student_ppl"] / row["teacher_ppl"]
        assert row["passkey"]["length"] == 4 * SEQ_LEN and row["passkey"]["student"] is not None
        assert row["state_bytes"] > 0 and row["teacher_state_bytes"] > 0
        assert (out / row["name"] / "evaluate" / "eval.json").is_file()
        assert not (out / row["name"] / "export").exists()  # the table needs eval.json only
    # The same held-out tokens for every run: one teacher, so one teacher perplexity per kind of text
    # (approx: each teacher pass runs inside a different student's wrappers, which may round differently).
    assert rows["window"]["teacher_ppl"] == pytest.approx(rows["liger"]["teacher_ppl"])
    code = [rows[name]["texts"]["code"]["teacher_ppl"] for name in ("window", "liger")]
    assert code[0] == pytest.approx(code[1])
    table = (out / "compare.md").read_text()
    assert f"{SEQ_LEN}-token sequences" in table  # one length: every row scored on the same tokens
    assert "| window | attention_transfer, lora_recovery |" in table and "| liger | lora_recovery |" in table
    rows_of_table = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows_of_table) == 4 and len({line.count("|") for line in rows_of_table}) == 1  # header, rule, 2 rows
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
    # One legend entry per run and the teacher, and one point each, even where two runs coincide.
    ax = compare.figure(result).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["window", "liger", "teacher (KV cache)"]
    assert len(ax.collections) == 3


def test_a_rerun_skips_finished_runs_and_reuses_their_measurements(compared, monkeypatch, capsys):
    configs, out, _ = compared
    before = json.loads((out / "compare.json").read_text())["rows"]

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a finished run was measured again")

    monkeypatch.setattr("linearize.train.evaluation.compare_on_tokens", no_evaluation)
    assert cli.main(["compare", *configs, "--out", str(out), *BUDGET, *SMALL]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done, skipping") == 5  # window: transfer, LoRA, evaluate; liger: LoRA, evaluate
    after = json.loads((out / "compare.json").read_text())["rows"]
    assert [row["wall_s"] for row in after] == [row["wall_s"] for row in before]
    assert [row["ppl_ratio"] for row in after] == [row["ppl_ratio"] for row in before]


def test_budget_overrides_set_steps_from_tokens(tmp_path):
    from stages.compare import CompareOptions, budget_overrides
    from stages.config_loader import CONFIGS_DIR, load_config

    options = CompareOptions(configs=(), out_dir=tmp_path, transfer_tokens=5000, lora_tokens=3000)
    lolcats = load_config(CONFIGS_DIR / "lolcats.yaml", ["data.seq_len=1000"])
    out = budget_overrides(CONFIGS_DIR / "lolcats.yaml", lolcats, "demo-news", options)
    assert {"attention_transfer.max_steps=5", "lora_recovery.max_steps=3", "attention_transfer.grad_accum=1",
            "stages=[attention_transfer,lora_recovery,evaluate]", "data.eval=demo-news",
            "evaluate.long_context.passkey_lengths=[4000]"} <= set(out)
    liger = load_config(CONFIGS_DIR / "liger.yaml", ["data.seq_len=1000"])
    liger_out = budget_overrides(CONFIGS_DIR / "liger.yaml", liger, "x", options)
    assert not any(o.startswith("attention_transfer.") for o in liger_out)
    with pytest.raises(UserError, match="less than one 1000-token sequence"):
        budget_overrides(CONFIGS_DIR / "lolcats.yaml", lolcats, "x", CompareOptions((), tmp_path, transfer_tokens=999))


def test_decode_state_bytes_are_constant_for_a_linear_student_and_grow_for_the_teacher():
    import linearize
    from linearize.adapters import teacher_view
    from linearize.config.schema import AttentionConfig
    from stages.compare import decode_state_bytes

    model = tiny_model("llama")
    attention = AttentionConfig(mechanism="window_linear", window_size=8, feature_dim=8, chunk_size=8)
    linearize.linearize_model(model, attention)
    student = [decode_state_bytes(model, n) for n in (64, 128)]
    with teacher_view(model):
        teacher = [decode_state_bytes(model, n) for n in (64, 128)]
    assert student[0] == student[1]  # past the window, a window + linear state no longer grows
    # Teacher: 2 layers x (keys + values) x 2 kv heads x 16 dims x fp32 bytes per token.
    assert teacher == [n * 2 * 2 * 2 * 16 * torch.finfo(torch.float32).bits // 8 for n in (64, 128)]


@pytest.mark.parametrize("args, fragment", [
    (["missing.yaml"], "config not found: missing.yaml"),
    (["{config}", "--texts", "poetry"], "unknown text kind(s) poetry; valid: code, manual"),
    (["{config}", "no_such_key=1"], "no_such_key"),
    (["{config}", "--lora-tokens", "-1"], "--lora-tokens must be >= 0"),
    (["{config}", "{config}"], "two configs share the name"),
])
def test_bad_input_is_one_line(args, fragment, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\n")
    args = [a.format(config=config) for a in args]
    assert cli.main(["compare", *args, "--out", str(tmp_path / "out")]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
