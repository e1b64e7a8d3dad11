"""`linearize compare` on tiny models: two configs at one budget give two rows, a table that leads with
closeness and behaviour, and the two plots; a re-run skips the finished runs and reuses their
measurements; the budget overrides; decode-state bytes; bad input is one line."""
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
# Agreement documents of 2 windows: window_size 8 for "window"; liger has no window, so 64 (stages.behaviour).
LONGEST = {"window": 2 * 8, "liger": 2 * 64}
BUDGET = ["--transfer-tokens", "64", "--lora-tokens", "32"]  # 2 transfer steps, 1 LoRA step
SMALL = ["--eval-sequences", "1", "--text-sequences", "1", "--stage-eval-sequences", "1", "--state-context", "128"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RETRIEVAL_LENGTHS = (400, 448)  # two lengths (one column each); badge prompts need ~392 tokens of the tiny tokenizer
# The behaviour measurements at a few seconds: the user's overrides apply after compare's own settings.
TINY_BEHAVIOUR = ["evaluate.behaviour.retrieval_prompts=1", "evaluate.behaviour.instructions=2",
                  "evaluate.behaviour.context_windows=[2]", "evaluate.behaviour.related=false",
                  f"evaluate.behaviour.retrieval_lengths=[{','.join(map(str, RETRIEVAL_LENGTHS))}]"]


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
        assert cli.main(["compare", *configs, "--out", str(out), *BUDGET, *SMALL, *TINY_BEHAVIOUR]) == 0
    return configs, out, "\n".join(printed)


def test_two_configs_give_two_rows_the_table_and_the_plot(compared):
    configs, out, _ = compared
    result = json.loads((out / "compare.json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["window", "liger"]
    assert rows["window"]["tokens"] == {"attention_transfer": 64, "lora_recovery": 32}
    assert rows["liger"]["tokens"] == {"lora_recovery": 32}  # no transfer stage: the LoRA budget only
    for row in rows.values():
        assert sorted(row["texts"]) == ["code", "manual", "news"]
        numbers = [row["ppl_ratio"], row["kl"], row["top1_agreement"], row["wall_s"]]
        numbers += [row["texts"][kind][key] for kind in row["texts"] for key in ("kl", "ppl_ratio")]
        assert all(math.isfinite(x) and x >= 0 for x in numbers)
        assert row["ppl_ratio"] == row["student_ppl"] / row["teacher_ppl"]
        assert row["texts"]["news"]["kl"] == row["kl"]  # the held-out kind is the evaluate stage's own text
        for name in ("passkey", "badge"):
            retrieval = row["retrieval"][name]
            assert retrieval["lengths"] == list(RETRIEVAL_LENGTHS)
            assert all(0 <= x <= 1 for x in retrieval["student"] + retrieval["teacher"])
            assert len(retrieval["student"]) == len(retrieval["teacher"]) == len(RETRIEVAL_LENGTHS)
        assert sorted(row["teacher_agreement"], key=int) == ["0", str(LONGEST[row["name"]])]
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
    assert "retrieval: 1 prompts a length" in table and "agreement: 2 instructions" in table  # the runs' own settings
    main_table, depth_table = [block for block in table.split("\n\n") if block.startswith("|")]
    rows_of_table = main_table.splitlines()
    assert len(rows_of_table) == 4 and len({line.count("|") for line in rows_of_table}) == 1  # header, rule, 2 rows
    header = [cell.strip() for cell in rows_of_table[0].strip("|").split("|")]
    assert header[:13] == ["config", "KL news", "KL code", "KL manual", "top-1 news",
                           "passkey @400 (s / t)", "passkey @448 (s / t)", "badge @400 (s / t)", "badge @448 (s / t)",
                           "agree short", "agree long (@tokens)", "ppl ratio news", "ppl ratio code"]
    window_row = [cell.strip() for cell in rows_of_table[2].strip("|").split("|")]
    assert window_row[:2] == ["window", f"{rows['window']['kl']:.3f}"]
    assert window_row[10].endswith("(@16)")
    assert window_row[-2:-1] == ["attention_transfer, lora_recovery"]
    # Passkey by needle depth: the teacher, then each row's grid, cell by cell from eval.json.
    depth_lines = depth_table.splitlines()
    assert depth_lines[0].startswith("| config | @400: start / middle / end | @448: start / middle / end")
    for line, (name, side) in zip(depth_lines[2:], [("window", "teacher"), ("window", "student"),
                                                    ("liger", "student")]):
        passkey = json.loads((out / name / "evaluate" / "eval.json").read_text())["retrieval"]["passkey"]
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == (name if side == "student" else "teacher")
        assert cells[1:] == [" / ".join(f"{x:.2f}" for x in row) for row in passkey[side]["accuracy"]]
    assert len(depth_lines) == 5  # header, rule, teacher, 2 rows
    for plot in ("compare.png", "compare_agreement.png"):
        assert (out / plot).read_bytes()[:8] == PNG_MAGIC
    # One legend entry per run and the teacher, and one point each, even where two runs coincide.
    ax = compare.figure(result).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["window", "liger", "teacher (KV cache)"]
    assert len(ax.collections) == 3
    assert "KL" in ax.get_ylabel()


def test_the_agreement_plot_has_a_line_per_run_and_the_teacher_at_one(compared):
    _, out, _ = compared
    result = json.loads((out / "compare.json").read_text())
    ax = compare.agreement_figure(result).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["window", "liger", "teacher"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    for row in result["rows"]:
        agreement = row["teacher_agreement"]
        longest = LONGEST[row["name"]]
        assert list(lines[row["name"]].get_xdata()) == [0, longest]
        assert list(lines[row["name"]].get_ydata()) == [agreement["0"]["match_share"],
                                                         agreement[str(longest)]["match_share"]]
    assert list(lines["teacher"].get_ydata()) == [1.0, 1.0]


def test_a_rerun_skips_finished_runs_and_reuses_their_measurements(compared, monkeypatch, capsys):
    configs, out, _ = compared
    before = json.loads((out / "compare.json").read_text())["rows"]

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a finished run was measured again")

    monkeypatch.setattr("linearize.train.evaluation.compare_on_tokens", no_evaluation)
    monkeypatch.setattr(compare, "decode_state_bytes", no_evaluation)
    assert cli.main(["compare", *configs, "--out", str(out), *BUDGET, *SMALL, *TINY_BEHAVIOUR]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done, skipping") == 5  # window: transfer, LoRA, evaluate; liger: LoRA, evaluate
    after = json.loads((out / "compare.json").read_text())["rows"]
    assert [row["wall_s"] for row in after] == [row["wall_s"] for row in before]
    assert [row["ppl_ratio"] for row in after] == [row["ppl_ratio"] for row in before]
    assert [row["retrieval"] for row in after] == [row["retrieval"] for row in before]


def test_budget_overrides_set_steps_from_tokens(tmp_path):
    from stages.compare import CompareOptions, budget_overrides
    from stages.config_loader import CONFIGS_DIR, load_config

    options = CompareOptions(configs=(), out_dir=tmp_path, transfer_tokens=5000, lora_tokens=3000)
    lolcats = load_config(CONFIGS_DIR / "lolcats.yaml", ["data.seq_len=1000"])
    out = budget_overrides(CONFIGS_DIR / "lolcats.yaml", lolcats, "demo-news", options)
    assert {"attention_transfer.max_steps=5", "lora_recovery.max_steps=3", "attention_transfer.grad_accum=1",
            "stages=[attention_transfer,lora_recovery,evaluate]", "data.eval=demo-news",
            "evaluate.behaviour.enabled=true", "evaluate.behaviour.texts=[code,manual]",
            "evaluate.behaviour.retrieval_prompts=36", "evaluate.behaviour.instructions=60",
            "evaluate.behaviour.context_windows=[2,4,16]", "evaluate.long_context.passkey_lengths=[]"} <= set(out)
    cfg = load_config(CONFIGS_DIR / "lolcats.yaml", ["data.seq_len=1000", *out])
    assert cfg.evaluate.behaviour.enabled and cfg.evaluate.behaviour.texts == ["code", "manual"]
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
    (["{config}", "--texts", "poetry"], "unknown text kind(s) poetry; valid: news, code, manual"),
    (["{config}", "evaluate.behaviour.enabled=false"], "drop the override evaluate.behaviour.enabled=false"),
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


def test_a_run_evaluated_without_behaviour_is_refused_in_one_line(tmp_path):
    from types import SimpleNamespace

    cfg = SimpleNamespace(output_dir=str(tmp_path), run_name="old")
    older = {"student_ppl": 2.0, "teacher_ppl": 1.0, "kl": 0.1, "top1_agreement": 0.9}  # an older compare's eval.json
    with pytest.raises(UserError, match=r"has no retrieval or teacher_agreement .*delete .*old/evaluate") as err:
        compare.make_row(tmp_path / "old.yaml", cfg, older, {}, 0.0)
    assert "\n" not in str(err.value)


def test_the_depth_table_puts_each_grid_where_it_belongs():
    grid = lambda *rows: [list(r) for r in rows]  # noqa: E731  [length][depth]
    row = lambda name, student, teacher: {"name": name, "passkey_by_depth": {  # noqa: E731
        "lengths": [512, 1024], "depths": [0.0, 0.5, 1.0], "student": student, "teacher": teacher}}
    teacher = grid((1.0, 1.0, 0.25), (0.5, 1.0, 0.75))
    rows = [row("sinks", grid((1.0, 0.0, 0.0), (1.0, 0.0, 0.0)), teacher),
            row("window", grid((0.0, 0.0, 1.0), (0.0, 0.0, 0.5)), teacher), {"name": "old", "passkey_by_depth": None}]
    lines = [line for line in compare._depth_table(rows) if line.startswith("|")]
    assert lines[0] == "| config | @512: start / middle / end | @1024: start / middle / end |"
    assert lines[2:] == ["| teacher | 1.00 / 1.00 / 0.25 | 0.50 / 1.00 / 0.75 |",
                         "| sinks | 1.00 / 0.00 / 0.00 | 1.00 / 0.00 / 0.00 |",
                         "| window | 0.00 / 0.00 / 1.00 | 0.00 / 0.00 / 0.50 |"]  # a row without grids is left out
    other = row("longer", grid((1.0, 1.0, 1.0)), teacher)
    other["passkey_by_depth"]["lengths"] = [2048]
    assert compare._depth_table(rows + [other]) == []  # no shared lengths: no table
