"""Teacher agreement (linearize/evals/agreement.py) against stand-in models with known answers, and its
prompts: the chat template when the tokenizer has one, one length per long setting, related facts."""
import copy

import pytest
import torch

import linearize
from linearize.errors import UserError
from linearize.evals.agreement import Answers, agreement_scores, build_prompts, DocumentSource, teacher_agreement
from linearize.evals.instructions import EVAL_INSTRUCTIONS, related_case

from conftest import tiny_model

DOCS = ["Pack the documents into sequences of fixed length, then shuffle them. " * 3,
        "A sliding window keeps the most recent keys and values exactly. " * 2]
CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|endoftext|>assistant:{% endif %}")
SETTINGS = dict(window=64, multipliers=(4,), n=3, short_tokens=6, long_tokens=8, documents=DOCS, batch_size=2)


@pytest.fixture
def tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


def _flip_after(model, k):
    """Make `model` answer with its least likely token from the k-th generated token on (k = 0: the first):
    identical to the unchanged model before, and different from it from there."""
    state = {"step": 0}

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[1] > 1:  # a prompt's prefill picks answer token 0; each decode call the next one
            state["step"] = 0
        if state["step"] >= k:
            output.logits = -output.logits
        state["step"] += 1
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model


def test_agreement_scores_by_hand():
    teacher = Answers(torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 0, 0]]), torch.zeros(3, 5))
    student_logits = torch.zeros(3, 5)
    student_logits[1, 0] = 2.0  # one prompt's first-position distribution differs
    student = Answers(torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [5, 6, 0, 0]]), student_logits)
    scores = agreement_scores(student, teacher)
    assert scores["match_share"] == pytest.approx(2 / 3) and scores["mean_prefix"] == pytest.approx(3.0)
    p = torch.full((5,), 0.2)  # the teacher's uniform distribution against softmax([2, 0, 0, 0, 0])
    kl = (p * (p.log() - student_logits[1].log_softmax(-1))).sum()
    assert scores["first_kl"] == pytest.approx(kl.item() / 3, rel=1e-5)  # fp32 log-softmax rounding
    assert (scores["n"], scores["tokens"]) == (3, 4)


def test_a_model_agrees_with_itself(tokenizer):
    model = tiny_model("llama")
    result = teacher_agreement(model, tokenizer, teacher=model, **SETTINGS)
    assert set(result) == {"0", "256"} and set(result["256"]["related"]) >= {"match_share", "mean_prefix", "first_kl"}
    for scores in (result["0"], result["256"], result["256"]["related"]):
        assert scores["match_share"] == 1.0 and scores["mean_prefix"] == scores["tokens"] and scores["n"] == 3
        assert scores["first_kl"] < 1e-6  # the same logits on both sides; fp32 rounding
    assert (result["0"]["tokens"], result["256"]["tokens"]) == (6, 8)


@pytest.mark.parametrize("k", [0, 3])
def test_a_model_changed_after_k_tokens_shares_a_prefix_of_k(tokenizer, k):
    teacher = tiny_model("llama")
    student = _flip_after(copy.deepcopy(teacher), k)
    result = teacher_agreement(student, tokenizer, teacher=teacher, **SETTINGS)
    for scores in (result["0"], result["256"], result["256"]["related"]):
        assert scores["match_share"] == 0.0 and scores["mean_prefix"] == k
        if k > 0:
            assert scores["first_kl"] < 1e-6  # the first answer position is unchanged
    if k == 0:  # the first position's KL by hand: softmax(logits) against softmax(−logits), short prompts
        prompts = build_prompts(tokenizer, EVAL_INSTRUCTIONS[:3], 0, False, None)
        kls = []
        with torch.no_grad():
            for ids in prompts:
                logits = teacher(input_ids=ids[None]).logits[0, -1].double()  # [V]
                kls.append((logits.softmax(-1) * (logits.log_softmax(-1) - (-logits).log_softmax(-1))).sum())
        # fp32 model logits through fp32 log-softmax against float64
        assert result["0"]["first_kl"] == pytest.approx(torch.stack(kls).mean().item(), rel=1e-4)


def test_the_converted_model_is_its_own_teacher(tokenizer):
    """Without `teacher`, the converted model in teacher view answers as the unconverted model does."""
    original = tiny_model("llama")
    student = linearize.linearize_model(copy.deepcopy(original), linearize.AttentionConfig(
        mechanism="window_linear", window_size=4, feature_dim=8, chunk_size=4))
    own = teacher_agreement(student, tokenizer, **SETTINGS)
    separate = teacher_agreement(student, tokenizer, teacher=original, **SETTINGS)
    for key in own:
        assert own[key]["example"] == separate[key]["example"]
        # the teacher view is the same softmax computation as the original model; fp32 rounding
        assert own[key]["first_kl"] == pytest.approx(separate[key]["first_kl"], rel=1e-4, abs=1e-6)
        assert own[key]["mean_prefix"] == separate[key]["mean_prefix"]
    with pytest.raises(UserError, match="give the teacher model"):
        teacher_agreement(original, tokenizer, **SETTINGS)


def test_prompts_use_the_chat_template_and_share_one_length(tokenizer):
    plain = build_prompts(tokenizer, EVAL_INSTRUCTIONS[:3], 0, False, None)
    assert tokenizer.decode(plain[0]).startswith(EVAL_INSTRUCTIONS[0])
    tokenizer.chat_template = CHAT_TEMPLATE
    source = DocumentSource(tokenizer, DOCS)
    short = build_prompts(tokenizer, EVAL_INSTRUCTIONS[:3], 0, False, source)
    assert tokenizer.decode(short[1]) == f"<|endoftext|>user: {EVAL_INSTRUCTIONS[1]}\n<|endoftext|>assistant:"
    for related in (False, True):
        prompts = build_prompts(tokenizer, EVAL_INSTRUCTIONS[:3], 200, related, source)
        assert len({len(p) for p in prompts}) == 1  # one length: a batch without padding
        for i, p in enumerate(prompts):
            text = tokenizer.decode(p)
            assert text.startswith("<|endoftext|>user: ") and text.endswith("\n<|endoftext|>assistant:")
            question = related_case(i).instruction if related else EVAL_INSTRUCTIONS[i]
            assert f"\n\n{question}\n" in text
            assert (related_case(i).facts in text) == related
            assert len(p) - len(short[i]) >= 200  # the document takes >= 200 tokens
