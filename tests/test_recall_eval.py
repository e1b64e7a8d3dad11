"""The badge recall evaluation and the recall loss/scores of linearize/evals/recall.py, on stand-ins whose
answers are known: a perfect copier, a random model, and a model whose predictions live in one layer."""
import random
import re

import pytest
import torch
import torch.nn.functional as F

import linearize
from linearize.evals.recall import badge_prompt, badge_recall, recall_loss, recall_scores

from conftest import tiny_model

# Weight scales that make layer 2 decisive (picked on one seed: rise 0.15 nats; 0.0003 unscaled, where
# random attention is near uniform and linear attention imitates it).
SHARP = {"o_proj": 10.0, "q_proj": 4.0, "k_proj": 4.0, "lm_head": 5.0}
LENGTHS = [400, 600]  # the tiny tokenizer spends about a token per character


@pytest.fixture
def tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


class Copier(torch.nn.Module):
    """Answers every badge question right: reads the asked name, finds its line, copies the number.
    `first_listed`: copies the first guest's number whoever is asked, as the 141K-token students with 32 sink
    tokens do (the list's first line lies inside the sinks; docs/quality.md)."""

    def __init__(self, tokenizer, first_listed: bool = False):
        super().__init__()
        self.tokenizer, self.first_listed = tokenizer, first_listed
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # badge_recall reads the device from a parameter

    def generate(self, input_ids, max_new_tokens, **kwargs):
        rows = []
        for ids in input_ids:
            text = self.tokenizer.decode(ids)
            name = re.search(r"the guard reads one line of the list aloud: (.+) wears badge number$", text).group(1)
            name = r"[^\n]+" if self.first_listed else re.escape(name)
            number = re.search(rf"\n{name} wears badge number( \d+)\.", text).group(1)  # the first match
            answer = self.tokenizer(number, add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(torch.cat([ids, torch.tensor(answer + [0] * (max_new_tokens - len(answer)))]))
        return torch.stack(rows)


def test_badge_prompt_has_its_length_and_asks_for_a_listed_number(tokenizer):
    for length in LENGTHS:
        ids, answer = badge_prompt(tokenizer, length, random.Random(length))
        assert len(ids) == length
        text = tokenizer.decode(ids)
        name = re.search(r"the guard reads one line of the list aloud: (.+) wears badge number$", text).group(1)
        assert f"\n{name} wears badge number{tokenizer.decode(answer)}." in text
        assert len(re.findall(r" wears badge number \d{4}\.", text)) == 6  # the asked guest among 5 others
    same, again = badge_prompt(tokenizer, 400, random.Random(1)), badge_prompt(tokenizer, 400, random.Random(1))
    assert torch.equal(same[0], again[0]) and same[1] == again[1]
    with pytest.raises(ValueError, match="cannot hold 6 guests"):
        badge_prompt(tokenizer, 40, random.Random(0))


def test_a_perfect_copier_scores_one_and_a_random_model_about_zero(tokenizer):
    perfect = badge_recall(Copier(tokenizer), tokenizer, LENGTHS, trials=4)
    assert perfect["exact"] == [1.0, 1.0] and perfect["per_token"] == [1.0, 1.0] and perfect["mean_exact"] == 1.0
    guessing = badge_recall(tiny_model("llama"), tokenizer, LENGTHS, trials=4, batch_size=2)
    assert guessing["exact"] == [0.0, 0.0]
    assert guessing["mean_per_token"] < 0.2  # a random model hits a digit in place ~1/256 of the time
    assert guessing["lengths"] == LENGTHS and guessing["trials"] == 4


def test_the_example_pairs_one_cases_answer_with_its_own_generation(tokenizer):
    perfect = badge_recall(Copier(tokenizer), tokenizer, LENGTHS, trials=6, batch_size=4)  # two batches a length
    assert [e["generated"] for e in perfect["examples"]] == [e["answer"] for e in perfect["examples"]]


def test_copying_the_first_listed_guest_scores_about_one_in_six(tokenizer):
    # The heuristic of a student that only reads the sinks: right when the first guest is the one asked for.
    first = badge_recall(Copier(tokenizer, first_listed=True), tokenizer, [LENGTHS[0]], trials=36)
    assert 0.0 < first["exact"][0] < 0.4  # 1/6 expected; 36 trials: 2 standard deviations is about 0.12


def test_recall_loss_is_the_mean_answer_token_cross_entropy(tokenizer):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(0, 256, (12,), generator=g), torch.tensor([5, 6, 7])),
                (torch.randint(0, 256, (9,), generator=g), torch.tensor([8])),
                (torch.randint(0, 256, (12,), generator=g), torch.tensor([1, 11]))]
    terms = []
    with torch.no_grad():
        for ids, positions in examples:
            log_p = model(input_ids=ids[None]).logits[0].double().log_softmax(-1)  # [T, V]
            terms += [-log_p[p - 1, ids[p]] for p in positions]
    # fp32 logits and cross-entropy against float64 log-softmax, batched vs one at a time
    assert recall_loss(model, examples, batch_size=2) == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match=">= 1"):
        recall_loss(model, [(examples[0][0], torch.tensor([0, 3]))])


def test_recall_scores_pick_the_layer_that_holds_the_predictions():
    """A 4-layer model whose attention does nothing outside layer 2 (o_proj = 0 there), whose layer 2
    attends sharply (q, k scaled up: close to copying one position, which linear attention cannot do) and
    weighs heavily in the output, and whose answer tokens are its own confident greedy predictions:
    converting any other layer leaves the recall loss exactly unchanged; converting layer 2 moves its
    predictions away, so that layer scores highest."""
    responsible = 2
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():
        for idx, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.mul_(SHARP["o_proj"] if idx == responsible else 0.0)
        for name in ("q_proj", "k_proj"):
            getattr(model.model.layers[responsible].self_attn, name).weight.mul_(SHARP[name])
        model.lm_head.weight.mul_(SHARP["lm_head"])  # confident predictions: a moved prediction costs CE
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, 256, (3, 16), generator=g)  # [N, T]
        ids = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8,
                             do_sample=False, pad_token_id=0)  # [N, T + 8]
    examples = [(row, torch.arange(16, 24)) for row in ids]
    linearize.linearize_model(model, linearize.AttentionConfig(mechanism="linear", feature_dim=8, chunk_size=4))
    scores = recall_scores(model, examples, candidates=[0, 1, 2, 3])
    assert max(scores, key=scores.get) == responsible
    assert scores[responsible] > 0.05  # linear attention in place of sharp softmax moves layer 2's predictions
    for layer in (0, 1, 3):
        assert abs(scores[layer]) < 1e-6  # no attention output to change; fp32 rounding only
    with pytest.raises(ValueError, match="not converted"):
        linearize.unlinearize_model(model)
        recall_scores(model, examples, candidates=[1])
