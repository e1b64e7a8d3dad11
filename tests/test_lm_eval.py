"""lm-eval-harness on an export: `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`
(here its Python entry, `simple_evaluate`, with the same model arguments) on two local tasks: its
per-choice log-likelihoods (right-padded batches) and its greedy generations (left-padded batches) equal
our own computation on `load_export`'s model."""
from __future__ import annotations

import json

import pytest
import torch

import linearize
from linearize.config import AttentionConfig
from linearize.models.exported import load_export, save_export

from conftest import tiny_model
from test_stages import DELTA_MECHANISMS

lm_eval = pytest.importorskip("lm_eval")

MC_DOCS = [
    {"question": "The quick brown fox", "choices": ["jumps", "sleeps", "reads"], "answer": 0},
    {"question": "A sliding window keeps the most recent", "choices": ["keys", "dogs"], "answer": 0},
    {"question": "Linear attention replaces the", "choices": ["softmax", "fox", "window"], "answer": 0},
]
GEN_DOCS = [{"prompt": "The quick brown", "target": " fox"},
            {"prompt": "Pack the documents into sequences of fixed", "target": " length"},
            {"prompt": "Linear", "target": " attention"}]
MAX_GEN_TOKENS = 4
# lm-eval and this test sum the same fp32 log-softmax values; batching changes float reduction order only.
ATOL = 1e-4
# The hybrid, and each delta-rule student with a softmax layer kept (layer 1 of 2); a window of 4 < the
# prompts makes gated_delta_window use both its halves (the others do not read it).
STUDENTS = [("window_linear", {"window_size": 4, "feature_dim": 8}),
            *[(mechanism, {"softmax_layers": [1], "window_size": 4}) for mechanism in DELTA_MECHANISMS]]

TASKS = {
    "linearize_tiny_mc": """
task: linearize_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    "linearize_tiny_gen": """
task: linearize_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: %d
  do_sample: false
metric_list:
  - metric: exact_match
""" % MAX_GEN_TOKENS,
}


def _write_tasks(root, docs_by_task):
    for name, template in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("\n".join(json.dumps(d) for d in docs_by_task[name]) + "\n")
        (root / f"{name}.yaml").write_text(template.format(data=data))


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Summed log-probability of `continuation` after `context`, split into tokens as lm-eval does."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    ids = torch.tensor([whole])
    logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)  # [T−1, V]
    targets = ids[0, len(ctx):]
    return float(logprobs[len(ctx) - 1:].gather(-1, targets[:, None]).sum())


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    """The two local tasks alone: lm-eval's own task index (thousands of yaml files) takes 15-20 s to build."""
    from lm_eval.tasks import TaskManager

    task_dir = tmp_path_factory.mktemp("tasks")
    _write_tasks(task_dir, {"linearize_tiny_mc": MC_DOCS, "linearize_tiny_gen": GEN_DOCS})
    return TaskManager(include_path=str(task_dir), include_defaults=False)


@pytest.mark.parametrize("mechanism,attention", STUDENTS)
def test_lm_eval_on_an_export(tmp_path, tiny_tokenizer, task_manager, mechanism, attention):
    from transformers import AutoTokenizer

    model = tiny_model("llama")
    linearize.linearize_model(model, AttentionConfig(mechanism=mechanism, **attention))
    export = save_export(model, AutoTokenizer.from_pretrained(tiny_tokenizer), tmp_path / "export")
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={export},trust_remote_code=True,dtype=float32",
        tasks=list(TASKS), task_manager=task_manager, batch_size=2, device="cpu",
        log_samples=True, bootstrap_iters=0,
    )
    ours, tokenizer = load_export(export)
    with torch.no_grad():
        for sample in results["samples"]["linearize_tiny_mc"]:
            doc = sample["doc"]
            got = [resp[0][0] for resp in sample["resps"]]
            want = [_loglikelihood(ours, tokenizer, doc["question"], " " + c) for c in doc["choices"]]
            assert got == pytest.approx(want, abs=ATOL)
        for sample in results["samples"]["linearize_tiny_gen"]:
            ids = tokenizer(sample["doc"]["prompt"], return_tensors="pt").input_ids
            out = ours.generate(ids, max_new_tokens=MAX_GEN_TOKENS, do_sample=False, pad_token_id=0)
            want = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
            assert sample["resps"][0][0] == want
    assert 0.0 <= results["results"]["linearize_tiny_mc"]["acc,none"] <= 1.0
