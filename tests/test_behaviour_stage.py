"""The evaluate stage's behaviour measurements (`evaluate.behaviour.enabled`): KL per kind of text, passkey
and badge recall for student and teacher, teacher agreement short and after documents; eval.json holds
them and the run's closing summary prints them beside the perplexity ratio."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from test_stages import tiny_run_config

BEHAVIOUR = {"enabled": True, "texts": ["news", "code"], "text_sequences": 1, "retrieval_lengths": [400],
             "retrieval_prompts": 3, "instructions": 2, "context_windows": [2], "related": False}


@pytest.fixture(scope="module")
def behaviour_run(tmp_path_factory, tiny_tokenizer):
    from stages.pipeline import run_stages

    root = tmp_path_factory.mktemp("behaviour")
    cfg = tiny_run_config(root, tiny_tokenizer, evaluate={"behaviour": BEHAVIOUR})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_stages(cfg, ["attention_transfer", "evaluate"])
    return cfg, root / "runs" / "tiny", printed.getvalue()


def test_eval_json_holds_closeness_and_behaviour(behaviour_run):
    cfg, run_dir, _ = behaviour_run
    result = json.loads((run_dir / "evaluate" / "eval.json").read_text())
    assert sorted(result["texts"]) == ["code", "news"]
    for metrics in result["texts"].values():
        assert metrics["kl"] > 0 and 0 <= metrics["top1_agreement"] <= 1
        assert metrics["ppl_ratio"] == pytest.approx(metrics["student_ppl"] / metrics["teacher_ppl"])
    for name in ("passkey", "badge"):
        student, teacher = result["retrieval"][name]["student"], result["retrieval"][name]["teacher"]
        assert student["lengths"] == teacher["lengths"] == [400]
    assert result["retrieval"]["passkey"]["student"]["trials"] == 1  # 3 prompts over 3 depths
    agreement = result["teacher_agreement"]
    window = cfg.attention.window_size
    assert sorted(agreement, key=int) == ["0", str(2 * window)]
    assert all(entry["n"] == 2 and 0 <= entry["match_share"] <= 1 for entry in agreement.values())


def test_the_summary_prints_kl_passkey_and_agreement(behaviour_run):
    _, run_dir, printed = behaviour_run
    assert "KL to the teacher: news " in printed and ", code " in printed
    report = (run_dir / "report.md").read_text()  # the report carries the same lines
    assert "## Behaviour" in report and "- passkey exact by prompt length: 400: " in report
    assert "passkey exact by prompt length: 400: " in printed
    assert "answers equal to the teacher's: " in printed and "after 16 tokens of unrelated text" in printed


def test_behaviour_is_off_by_default(tmp_path, tiny_tokenizer):
    cfg = tiny_run_config(tmp_path, tiny_tokenizer)
    assert not cfg.evaluate.behaviour.enabled


def test_the_news_kind_reuses_the_evaluations_own_rows(behaviour_run, monkeypatch):
    """When the evaluation already measured the run's eval text on as many rows, the news kind reuses it
    (no second teacher and student pass); other kinds, and another row count, are measured."""
    import stages.behaviour as behaviour

    cfg, _, _ = behaviour_run
    calls = []
    monkeypatch.setattr(behaviour, "compare_on_tokens", lambda *a, **k: calls.append(a) or dict(HELD_OUT))
    monkeypatch.setattr("stages.evaluate.eval_tokens", lambda cfg, tokenizer: [0])
    settings = cfg.evaluate.behaviour
    texts = behaviour._texts(cfg, None, None, settings, {**HELD_OUT, "sequences": settings.text_sequences})
    assert len(calls) == 1 and texts["news"]["ppl_ratio"] == pytest.approx(2.0)  # only code was measured
    behaviour._texts(cfg, None, None, settings, {**HELD_OUT, "sequences": settings.text_sequences + 1})
    assert len(calls) == 3


HELD_OUT = {"teacher_ppl": 10.0, "student_ppl": 20.0, "kl": 0.5, "top1_agreement": 0.5, "sequences": 1}


def test_a_second_evaluation_reads_the_teacher_from_the_cache(behaviour_run, tmp_path):
    """With evaluate.behaviour.teacher_cache, the first evaluation stores the teacher's retrieval and answers
    and the next one (here: the same run evaluated again) reads all of them: its eval.json equals the
    uncached one's, and the setting does not make the finished stages stale."""
    import dataclasses
    import shutil

    from stages.pipeline import run_stages

    cfg, run_dir, _ = behaviour_run
    copy_dir = tmp_path / "runs"
    shutil.copytree(run_dir, copy_dir / run_dir.name)
    settings = dataclasses.replace(cfg.evaluate.behaviour, teacher_cache=str(tmp_path / "teacher_cache"))
    cached = dataclasses.replace(cfg, output_dir=str(copy_dir),
                                 evaluate=dataclasses.replace(cfg.evaluate, behaviour=settings))
    printed = []
    for _ in range(2):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run_stages(cached, ["evaluate"], force=True)
        printed.append(out.getvalue())
    assert "teacher measurements: 0 reused" in printed[0] and ", 0 measured" in printed[1]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        run_stages(cached, ["attention_transfer", "evaluate"])  # the key is not part of any stage's config
    assert out.getvalue().count("done, skipping") == 2
    original = json.loads((run_dir / "evaluate" / "eval.json").read_text())
    again = json.loads((copy_dir / run_dir.name / "evaluate" / "eval.json").read_text())
    for name in ("passkey", "badge"):
        assert again["retrieval"][name]["teacher"] == original["retrieval"][name]["teacher"]
    assert again["teacher_agreement"] == original["teacher_agreement"]
