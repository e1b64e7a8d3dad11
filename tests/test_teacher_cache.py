"""The teacher cache (linearize/evals/teacher_cache.py, `evaluate.behaviour.teacher_cache`): one key for every
student of one teacher, another for a teacher changed in place; a second evaluation reads the teacher's
results instead of measuring them and gets the same eval.json; a damaged entry is measured again; the
setting changes no stage's config digest, and `linearize compare` sets it for its rows; an evaluation beside
another that is measuring an entry waits and reads it; a folder it cannot write in is one line."""
import copy
import dataclasses
import errno
import threading

import pytest

import torch

import linearize
from linearize import adapters
from linearize.evals.agreement import teacher_agreement
from linearize.evals.teacher_cache import TeacherCache, teacher_digest, teacher_name
from linearize.files import WriteFault

from conftest import tiny_model
from test_agreement import SETTINGS

ATTENTION = linearize.AttentionConfig(mechanism="window_linear", window_size=4, feature_dim=8, chunk_size=4)


def _student(original, softmax_layers=()):
    attention = dataclasses.replace(ATTENTION, softmax_layers=list(softmax_layers))
    student = linearize.linearize_model(copy.deepcopy(original), attention)
    return adapters.wrap(student, rank=2, alpha=4.0, dropout=0.0, targets=["q_proj", "v_proj", "gate_proj"])


def test_names_lose_their_wrappers_and_the_students_own_weights_are_not_the_teachers():
    assert teacher_name("base_model.model.model.layers.0.self_attn.base_layer.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert teacher_name("model.layers.0.self_attn.mechanism.feature_q.weight") is None
    assert teacher_name("base_model.model.model.layers.1.mlp.gate_proj.lora_A.default.weight") is None


def test_every_student_of_one_teacher_shares_its_digest():
    original = tiny_model("llama")
    digest = teacher_digest(original)
    student = _student(original)
    assert teacher_digest(student) == digest  # converted and wrapped in LoRA: the same teacher view
    with torch.no_grad():  # the student's own weights are not the teacher's
        for name, p in student.named_parameters():
            if "lora_B" in name or ".mechanism." in name:
                p.add_(1.0)
    assert teacher_digest(student) == digest


def test_a_teacher_changed_in_place_is_another_key():
    original = tiny_model("llama")
    digest = teacher_digest(original)
    changed = copy.deepcopy(original)
    with torch.no_grad():
        changed.model.layers[1].self_attn.q_proj.weight[0, 0] += 1e-3
    assert teacher_digest(changed) != digest
    assert teacher_digest(copy.deepcopy(original).to(torch.bfloat16)) != digest  # another dtype, other answers


def _counting(monkeypatch):
    import linearize.evals.agreement as agreement

    calls = []
    real = agreement.greedy_answers
    monkeypatch.setattr(agreement, "greedy_answers", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    return calls


def test_a_second_student_reads_the_teachers_answers(tmp_path, tiny_tokenizer, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    original = tiny_model("llama")
    calls = _counting(monkeypatch)
    uncached = teacher_agreement(_student(original), tokenizer, **SETTINGS)
    settings_count = len(calls) // 2  # student and teacher once per setting
    cache = TeacherCache(tmp_path / "cache")
    first = teacher_agreement(_student(original), tokenizer, cache=cache, **SETTINGS)
    assert (cache.hits, cache.misses) == (0, settings_count)
    other = _student(original, softmax_layers=[1])  # another student of the same teacher
    calls.clear()
    second = teacher_agreement(other, tokenizer, cache=cache, **SETTINGS)
    assert (cache.hits, cache.misses) == (settings_count, settings_count) and len(calls) == settings_count  # students only
    assert second == teacher_agreement(other, tokenizer, **SETTINGS)  # read or measured, the same scores
    assert first == uncached
    calls.clear()
    teacher_agreement(other, tokenizer, cache=cache, **{**SETTINGS, "long_tokens": SETTINGS["long_tokens"] + 1})
    assert len(calls) == settings_count + 2  # other answer lengths after a document: its teacher answers are measured


def test_a_damaged_entry_is_measured_again(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    student = _student(tiny_model("llama"))
    cache = TeacherCache(tmp_path / "cache")
    first = teacher_agreement(student, tokenizer, cache=cache, **SETTINGS)
    entries = sorted(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))  # not the locks
    assert entries and all(p.suffix == ".safetensors" for p in entries)
    entries[0].write_bytes(b"not a safetensors file")
    again = TeacherCache(tmp_path / "cache")
    assert teacher_agreement(student, tokenizer, cache=again, **SETTINGS) == first
    assert again.misses == 1 and again.hits == len(entries) - 1


def test_an_evaluation_beside_one_measuring_an_entry_waits_and_reads_it(tmp_path):
    # Two TeacherCache objects on one folder, as two compare rows in two processes: flock locks belong to the open
    # file, so two threads that each open the lock file contend as two processes do.
    model = torch.nn.Linear(2, 2)
    started, release, measured_by_second = threading.Event(), threading.Event(), threading.Event()
    first_cache, second_cache = TeacherCache(tmp_path), TeacherCache(tmp_path)
    results = {}

    def slow_measure():
        started.set()
        release.wait(10)
        return {"exact": [0.5]}

    def second_measure():
        measured_by_second.set()
        return {"exact": [0.0]}

    first = threading.Thread(target=lambda: results.update(first=first_cache.results(model, "passkey", {}, slow_measure)))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: results.update(second=second_cache.results(model, "passkey", {},
                                                                                        second_measure)))
    second.start()
    # Without the lock the second lookup measures at once; with it, it waits. 0.5 s gives it the time to go wrong.
    assert not measured_by_second.wait(0.5)
    release.set()
    first.join(10), second.join(10)
    assert results["second"] == results["first"] == {"exact": [0.5]}
    assert (second_cache.hits, second_cache.misses, second_cache.waits) == (1, 0, 1)
    assert (first_cache.hits, first_cache.misses, first_cache.waits) == (0, 1, 0)


def test_a_cache_folder_it_cannot_write_in_is_one_line(tmp_path, monkeypatch):
    import linearize.evals.teacher_cache as teacher_cache

    def read_only(path, *args, **kwargs):  # as open() in a folder this user may not write in (root may write anywhere)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(teacher_cache, "open", read_only, raising=False)
    with pytest.raises(WriteFault) as fault:
        TeacherCache(tmp_path).results(torch.nn.Linear(2, 2), "passkey", {}, lambda: {"exact": [1.0]})
    assert str(tmp_path) in str(fault.value) and "\n" not in str(fault.value)
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written


def test_retrieval_reads_the_teachers_results_from_the_cache(tmp_path, monkeypatch):
    import stages.behaviour as behaviour

    calls = []

    def fake_measure(name):
        def measure(model, *args, **kwargs):
            calls.append((name, adapters.is_wrapped(model)))
            return {"lengths": [8], "accuracy": [[0.5]], "exact": [0.5], "n": len(calls)}
        return measure

    monkeypatch.setattr(behaviour, "passkey_retrieval", fake_measure("passkey"))
    monkeypatch.setattr(behaviour, "badge_recall", fake_measure("badge"))
    monkeypatch.setattr(behaviour, "tokenizer_digest", lambda tokenizer: "tok")
    cfg = type("Cfg", (), {"seed": 0, "data": type("D", (), {"seq_len": 8})(),
                           "evaluate": type("E", (), {"behaviour": None})()})()
    settings = type("S", (), {"retrieval_prompts": 3, "retrieval_lengths": [8]})()
    cfg.evaluate.behaviour = settings
    model = _student(tiny_model("llama"))
    cache = TeacherCache(tmp_path)
    first = behaviour._retrieval(cfg, model, None, settings, cache)
    assert len(calls) == 4 and cache.misses == 2  # student and teacher, two formats
    second = behaviour._retrieval(cfg, model, None, settings, cache)
    assert len(calls) == 6 and cache.hits == 2  # the students only
    assert second["passkey"]["teacher"] == first["passkey"]["teacher"]
    settings.retrieval_prompts = 6  # other prompts: measured again
    behaviour._retrieval(cfg, model, None, settings, cache)
    assert len(calls) == 10


def test_the_setting_changes_no_stage_digest():
    from linearize.config import RunConfig, config_to_dict
    from linearize.train.state import stage_view

    plain = config_to_dict(RunConfig())
    cached = copy.deepcopy(plain)
    cached["evaluate"]["behaviour"]["teacher_cache"] = "somewhere/teacher_cache"
    assert stage_view(cached, "evaluate") == stage_view(plain, "evaluate")
    assert cached["evaluate"]["behaviour"]["teacher_cache"] == "somewhere/teacher_cache"  # the input is not changed
    other = copy.deepcopy(plain)
    other["evaluate"]["behaviour"]["instructions"] = 7  # a computing key still counts
    assert stage_view(other, "evaluate") != stage_view(plain, "evaluate")


def test_compare_points_every_row_at_one_cache(tmp_path):
    from stages.compare import CompareOptions, behaviour_overrides
    from stages.config_loader import parse_overrides

    out = tmp_path / "a folder: with spaces"
    overrides = parse_overrides(behaviour_overrides(CompareOptions(configs=(), out_dir=out)))
    assert overrides["evaluate"]["behaviour"]["teacher_cache"] == str(out / "teacher_cache")
