"""LoRA adapters (linearize.adapters): what a user sees when a model is wrapped."""
import warnings

from conftest import tiny_model
from linearize import adapters


def test_wrapping_with_lora_shows_no_warning_about_peft_internals():
    """peft's use of a deprecated transformers API warned on every LoRA run; users see nothing of it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapters.wrap(tiny_model("llama"), rank=2, alpha=4.0, dropout=0.0, targets=["q_proj"])
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
