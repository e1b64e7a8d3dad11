"""The `teacher` data source: deterministic, resumable after SIGKILL with identical tokens, one-line errors
for unusable settings (nothing written), evaluation instructions never trained on, and packing that keeps
chat samples whole."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from linearize import UserError
from linearize.config.schema import DataConfig, TeacherSamplesConfig
from linearize.data import build_datasets
from linearize.data import teacher_samples as ts

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["The river ran past the mill. Farmers brought grain every autumn. The miller kept the accounts.",
           "A cat lived on a boat. It liked fish! Nobody knew its name, and nobody asked."] * 3
# Small enough for a 2-layer model to finish in about a second, large enough for several shards of
# every kind (batch kinds cycle long_chat, continuation, chat, ...).
SETTINGS = TeacherSamplesConfig(tokens=160, max_new_tokens=8, batch_size=4, context_tokens=[24, 48], seed=5)


def _tokenizer(path, chat: bool = True):
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE if chat else None
    return tok


def _generate(model, tok, out_dir, settings=SETTINGS, **kwargs):
    return ts.generate_teacher_samples(model, tok, settings, out_dir, prompts_texts=PROMPTS, **kwargs)


def _ids(samples):
    return [(s.kind, s.ids, s.new_tokens) for s in samples]


def test_two_runs_give_the_same_tokens_and_every_kind(tmp_path, tiny_tokenizer, make_tiny_model):
    tok, model = _tokenizer(tiny_tokenizer), make_tiny_model()
    first = _generate(model, tok, tmp_path / "a")
    second = _generate(model, tok, tmp_path / "b")
    assert _ids(first) == _ids(second)
    assert {s.kind for s in first} == set(ts.SAMPLE_KINDS)
    assert sum(s.new_tokens for s in first) >= SETTINGS.tokens
    other = _generate(model, tok, tmp_path / "c", dataclasses.replace(SETTINGS, seed=6))
    assert _ids(other) != _ids(first)  # the seed matters
    # A rerun on a complete folder reads the shards back instead of generating.
    assert _ids(_generate(model, tok, tmp_path / "a")) == _ids(first)


def test_changed_settings_are_refused_on_an_existing_folder(tmp_path, tiny_tokenizer, make_tiny_model):
    tok, model = _tokenizer(tiny_tokenizer), make_tiny_model()
    _generate(model, tok, tmp_path, dataclasses.replace(SETTINGS, tokens=20))
    with pytest.raises(UserError, match="other settings.*settings"):
        _generate(model, tok, tmp_path, dataclasses.replace(SETTINGS, tokens=20, temperature=0.3))


KILLED_JOB = """
import os, signal, sys, torch
torch.set_num_threads(1)
sys.path[:0] = [{tests!r}, {repo!r}]
from test_teacher_samples import SETTINGS, PROMPTS, _tokenizer
from conftest import tiny_model
from linearize.data import teacher_samples as ts
if {kill!r}:
    write = ts._write_shard
    def write_then_kill(path, samples):
        write(path, samples)
        os.kill(os.getpid(), signal.SIGKILL)
    ts._write_shard = write_then_kill
ts.generate_teacher_samples(tiny_model(), _tokenizer({tok!r}), SETTINGS, {out!r}, prompts_texts=PROMPTS)
"""


def _job(out: Path, tok_path, kill: bool) -> subprocess.CompletedProcess:
    code = KILLED_JOB.format(tests=str(TESTS_DIR), repo=str(REPO), kill=kill, tok=str(tok_path), out=str(out))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parity
def test_sigkill_after_the_first_shard_then_rerun_gives_identical_tokens(tmp_path, tiny_tokenizer):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = _job(whole, tiny_tokenizer, kill=False)
    assert done.returncode == 0, done.stderr[-2000:]
    crash = _job(killed, tiny_tokenizer, kill=True)
    assert crash.returncode == -signal.SIGKILL
    assert sorted(p.name for p in killed.glob("shard_*")) == ["shard_00000.safetensors"]
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]
    resumed = _job(killed, tiny_tokenizer, kill=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    names = sorted(p.name for p in whole.glob("shard_*"))
    assert len(names) > 1 and names == sorted(p.name for p in killed.glob("shard_*"))
    for name in names:  # byte-identical shards: the same tokens, kinds and counts
        assert (whole / name).read_bytes() == (killed / name).read_bytes(), name


@pytest.mark.parametrize("change, chat, prompts, expected", [
    (dict(tokens=0), True, PROMPTS, "tokens must be > 0"),
    (dict(chat="on"), False, PROMPTS, "no chat template"),
    (dict(context_tokens=[64, 600]), True, PROMPTS, "max_position_embeddings 512"),
    (dict(context_tokens=[64, 32]), True, PROMPTS, r"\[min, max\]"),
    ({}, True, ["", "   "], "no documents"),
])
def test_bad_settings_give_one_line_and_write_nothing(tmp_path, tiny_tokenizer, make_tiny_model, change, chat,
                                                      prompts, expected):
    tok, model = _tokenizer(tiny_tokenizer, chat=chat), make_tiny_model()
    out = tmp_path / "samples"
    with pytest.raises(UserError, match=expected) as info:
        ts.generate_teacher_samples(model, tok, dataclasses.replace(SETTINGS, **change), out, prompts_texts=prompts)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_chat_auto_without_a_template_makes_continuations_only(tmp_path, tiny_tokenizer, make_tiny_model):
    samples = _generate(make_tiny_model(), _tokenizer(tiny_tokenizer, chat=False), tmp_path)
    assert {s.kind for s in samples} == {"continuation"}


def test_evaluation_instructions_are_never_training_prompts(tmp_path, tiny_tokenizer, make_tiny_model):
    tok = _tokenizer(tiny_tokenizer)
    held_out = "Name three rivers in Europe."
    settings = dataclasses.replace(SETTINGS, chat_share=1.0, long_share=0.0)  # chat batches only
    samples = _generate(make_tiny_model(), tok, tmp_path / "a", settings,
                        instructions=[held_out, "Describe a sunny day."], exclude=[held_out])
    texts = [tok.decode(s.ids) for s in samples]
    assert texts and all("Describe a sunny day." in t and held_out not in t for t in texts)
    with pytest.raises(UserError, match="no instructions"):
        _generate(make_tiny_model(), tok, tmp_path / "b", settings, instructions=[held_out], exclude=[held_out])


def test_packing_keeps_chat_samples_whole_at_row_starts():
    eos, seq_len = 0, 8
    chat = ts.Sample([7, 7, 7], "chat", 1)
    long = ts.Sample(list(range(1, 12)), "long_chat", 2)  # longer than a row: keeps its last 8 tokens
    text = [ts.Sample([5] * 6, "continuation", 3) for _ in range(3)]
    rows = ts.pack_samples([chat, *text, long], seq_len, eos)
    assert rows[0].tolist() == [7, 7, 7, eos, 5, 5, 5, 5]
    assert rows[1].tolist() == list(range(5, 12)) + [eos]
    # 21 stream tokens: 4 fill the chat row, the 17 left make 2 full rows, the last token is dropped.
    assert rows.shape == (4, seq_len) and rows[2].tolist() == [5, 5, eos, 5, 5, 5, 5, 5]


def test_build_datasets_takes_the_teacher(tmp_path, tiny_tokenizer, make_tiny_model):
    tok, model = _tokenizer(tiny_tokenizer), make_tiny_model()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    cfg = DataConfig(train="teacher", eval="", eval_fraction=0.2, seq_len=32,
                     teacher_samples=dataclasses.replace(SETTINGS, prompts=str(prompts)))
    train, held_out = build_datasets(cfg, tok, seed=0, teacher=model, samples_dir=tmp_path / "ts")
    again, _ = build_datasets(cfg, tok, seed=0, teacher=model, samples_dir=tmp_path / "ts")
    assert train.shape[1] == 32 and held_out.shape[0] >= 1 and torch.equal(train, again)
    with pytest.raises(UserError, match="needs the teacher model"):
        build_datasets(cfg, tok, seed=0)
