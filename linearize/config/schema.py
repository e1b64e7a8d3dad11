"""Dataclass schemas for every config section. OmegaConf builds structured (strict) configs from these,
so an unknown key or a wrong type is an error. Defaults follow the LoLCATs recipe (../shared/METHODS.md).
Each field's rules (names, ranges) sit beside it as metadata (`linearize.config.rules`); rules across keys
are in `linearize.config.validate`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .rules import Registry, above, at_least, choices, in_range

# sigmoid(logit(0.1)) = 0.1: LoLCATs starts every head giving the window 10% weight.
INIT_WINDOW_LOGIT = math.log(0.1 / 0.9)
# Block-wise transfer's disk budget above this is a typo, not a disk (1e6 GB = 1 PB).
MAX_CACHE_GB = 1e6
CHAT_MODES = ("auto", "on", "off")  # teacher_samples.chat
EXPORT_LINEARIZE = "linearize"  # export.format: the bundled-modeling-code export; the others are FAMILIES

# The registries that declare each set of names (imported only when a config is validated).
DTYPES = Registry("linearize.dtypes", "DTYPES")
OPTIONAL_DTYPES = Registry("linearize.dtypes", "DTYPES", extra=(None,))
MECHANISMS = Registry("linearize.attention", "MECHANISMS")
FAMILIES = Registry("linearize.models.families", "FAMILIES")
OPTIONAL_FAMILIES = Registry("linearize.models.families", "FAMILIES", extra=(None,))
SCHEDULES = Registry("linearize.train.schedule", "SCHEDULES")
AUTOCAST = Registry("linearize.train.engine", "AUTOCAST_DTYPES")


def _export_formats() -> tuple:
    return (EXPORT_LINEARIZE, *FAMILIES())


@dataclass(frozen=True)
class ModelConfig:
    path: str = "smollm2-135m-instruct"  # HF directory, a .gguf file, or a registered name
    dtype: str = field(default="float32", metadata=choices(DTYPES))
    tokenizer: Optional[str] = None  # defaults to model.path


@dataclass(frozen=True)
class AttentionConfig:
    mechanism: str = field(default="window_linear", metadata=choices(MECHANISMS))
    feature_map: str = field(default="hedgehog", metadata=choices(Registry("linearize.feature_maps", "available_feature_maps")))
    feature_dim: int = field(default=64, metadata=above(0))  # f: hedgehog output width is 2f
    tie_qk_feature_map: bool = False  # one map shared by q and k (lawcat always ties)
    window_size: int = field(default=64, metadata=above(0))  # W for window mechanisms
    sink_tokens: int = field(default=0, metadata=at_least(0))  # window mechanisms: the first N tokens stay in every query's softmax part
    window_only: bool = False  # window_linear without the linear branch: the sliding-window baseline
    # window_linear: the linear keys' weights decay as 2^(-distance / H) (H in tokens), bounding the linear
    # mass at any context length; None: the undecayed LoLCATs form
    linear_half_life: Optional[float] = field(default=None, metadata=above(0))
    # window_linear: one half-life per head, starting at linear_half_life and learned with the feature maps
    linear_half_life_learned: bool = False
    init_window_logit: float = INIT_WINDOW_LOGIT
    liger_alpha: float = field(default=0.5, metadata=at_least(0))  # liger_window: weight of the sliding-window softmax half
    liger_beta: float = field(default=0.5, metadata=at_least(0))  # liger_window: weight of the gated linear half
    gate_rank: int = field(default=16, metadata=above(0))  # lawcat: low-rank gate projection width
    gate_norm: float = field(default=16.0, metadata=above(0))  # liger/lawcat: g = logsigmoid(.) / gate_norm
    conv_kernel: int = field(default=4, metadata=above(0))  # lawcat: causal depthwise conv width
    delta_rope: bool = False  # gated_delta: q/k after RoPE (default: before, not yet chosen by measurement)
    decay_from: str = field(  # gated_delta family: where the decay is computed from
        default="projection", metadata=choices(Registry("linearize.attention.gated_delta", "DECAY_SOURCES")))
    init: str = field(  # gated_delta family: how the new parameters start
        default="calibrated", metadata=choices(Registry("linearize.attention.calibrate", "INITS")))
    calibration_tokens: int = field(default=1024, metadata=above(0))  # init=calibrated: teacher tokens the statistics are read from
    # Layers that keep teacher attention: a list of indices, or "auto" (a run chooses them: see below).
    softmax_layers: Any = field(default_factory=list)
    softmax_layer_count: float = field(default=0.0, metadata=at_least(0))  # auto: N >= 1 layers, or a fraction 0 < N < 1 of them (rounded, at least 1)
    softmax_layer_selector: str = field(  # auto: how the layers are chosen
        default="transfer_probe", metadata=choices(Registry("linearize.train.layer_choice", "SELECTORS")))
    selection_steps: int = field(default=8, metadata=at_least(0))  # auto, transfer_probe: probe length in optimizer steps (~10% of the transfer's)
    layers: Optional[list[int]] = None  # layers to convert (None = all not in softmax_layers)
    form: str = field(  # how the student computes a full sequence (each mechanism supports some forms)
        default="chunk", metadata=choices(Registry("linearize.ops._common", "FORM_NAMES")))
    chunk_size: int = field(default=64, metadata=above(0))
    backend: str = field(default="auto", metadata=choices(Registry("linearize.ops._common", "BACKENDS")))
    compile: bool = False  # torch.compile the student attention for training calls (not decoding)
    # A serving family the student is trained in the exact form of, so it exports as that family's plain
    # checkpoint (`linearize export --format qwen3_5`): None, or a serving family.
    native_family: Optional[str] = field(default=None, metadata=choices(OPTIONAL_FAMILIES))
    # auto with selector=recall: weight of the recall-loss score against the KL score (1 = recall only).
    selector_recall_weight: float = field(default=1.0, metadata=in_range(0, 1))


@dataclass(frozen=True)
class TeacherSamplesConfig:
    """The `teacher` data source: sequences the teacher writes itself (docs/configs.md)."""

    prompts: str = "demo-wiki"  # a corpus name or file: the opening sentences of its documents prompt the teacher
    instructions: Optional[str] = None  # a file of instructions (one per line); None: the teacher writes them from seed topics
    tokens: int = field(default=65536, metadata=above(0))  # how many tokens to generate in all
    temperature: float = field(default=0.7, metadata=above(0))
    top_p: float = field(default=0.9, metadata=in_range(0, 1, low_open=True))
    max_new_tokens: int = field(default=256, metadata=above(0))  # per sample
    chat: str = field(default="auto", metadata=choices(CHAT_MODES))  # answers to instructions through the teacher's chat template
    chat_share: float = field(default=0.5, metadata=in_range(0, 1))  # share of the samples that are chat (when chat is on)
    long_share: float = field(default=0.3, metadata=in_range(0, 1))  # share of chat samples with documents before the instruction
    context_tokens: list[int] = field(default_factory=lambda: [256, 512])  # [min, max] document tokens before an instruction
    batch_size: int = field(default=8, metadata=above(0))
    seed: int = 0


@dataclass(frozen=True)
class RecallDataConfig:
    """The `recall` data source: procedurally generated in-context recall sequences."""

    sequences: int = field(default=512, metadata=above(0))  # how many sequences the source yields
    min_distance: int = field(default=32, metadata=above(0))  # tokens between a span and its query, at least
    max_distance: int = 480  # and at most
    queries: int = field(default=4, metadata=at_least(1))  # queries per sequence
    seed: int = 0
    filler: str = "demo-wiki"  # a corpus name or file: the natural text the spans and queries are wrapped in


@dataclass(frozen=True)
class MixEntry:
    """One source of `data.mix` (both keys required)."""

    source: str  # a corpus name, a file, `teacher` (data.teacher_samples) or `recall` (data.recall)
    weight: float = field(metadata=above(0))  # relative share of the sequences drawn from it


@dataclass(frozen=True)
class DataConfig:
    train: str = "demo-wiki"  # text/jsonl/parquet file, a registered corpus name, or a hub dataset name
    eval: str = "demo-news"
    text_field: str = "text"  # column for jsonl/parquet/hub datasets
    seq_len: int = field(default=512, metadata=above(0))
    allow_beyond_context: bool = False  # allow seq_len > the model's max_position_embeddings
    eval_fraction: float = field(default=0.0, metadata=in_range(0, 1, high_open=True))  # >0: hold out this fraction of data.train when data.eval is empty
    max_eval_sequences: int = field(default=80, metadata=above(0))
    shuffle: bool = True
    # When set, replaces data.train: sequences drawn from the sources in proportion to their weights,
    # e.g. [{source: teacher, weight: 0.7}, {source: recall, weight: 0.3}].
    mix: Optional[list[MixEntry]] = None
    teacher_samples: TeacherSamplesConfig = field(default_factory=TeacherSamplesConfig)
    recall: RecallDataConfig = field(default_factory=RecallDataConfig)


@dataclass(frozen=True)
class TrainStageConfig:
    """Keys every training stage reads (the loop, the schedule, checkpoints); the stages set their own
    defaults below."""

    max_steps: int = field(default=100, metadata=at_least(0))
    save_every: int = field(default=50, metadata=above(0))
    eval_every: int = field(default=50, metadata=above(0))
    eval_sequences: int = field(default=0, metadata=at_least(0))  # held-out sequences for the in-stage eval; 0 = all data.max_eval_sequences
    keep_last: int = field(default=2, metadata=above(0))
    lr: float = field(default=1e-2, metadata=at_least(0))
    weight_decay: float = field(default=0.0, metadata=at_least(0))
    scheduler: str = field(default="cosine", metadata=choices(SCHEDULES))
    warmup_steps: int = field(default=0, metadata=at_least(0))
    min_lr: float = field(default=1e-5, metadata=at_least(0))
    plateau_patience: int = field(default=10, metadata=at_least(0))  # scheduler=plateau: evals without a new best before the rate drops
    plateau_factor: float = field(default=0.1, metadata=at_least(0))  # scheduler=plateau: the rate's multiplier at each drop
    micro_batch_size: int = field(default=1, metadata=above(0))
    grad_accum: int = field(default=1, metadata=above(0))
    grad_clip: float = field(default=1.0, metadata=at_least(0))  # 0 disables clipping
    autocast: str = field(default="none", metadata=choices(AUTOCAST))


@dataclass(frozen=True)
class TransferConfig(TrainStageConfig):
    mse_factor: float = field(default=1000.0, metadata=at_least(0))
    attn_ce_weight: float = field(default=0.0, metadata=at_least(0))  # >0 needs attention.form=parallel and a mechanism with attention weights
    block_size: int = field(default=0, metadata=at_least(0))  # decoder layers per block-wise transfer block; 0 = every layer at once
    cache_gb: float = field(default=64.0, metadata=in_range(0, MAX_CACHE_GB))  # block-wise: disk budget for the cached teacher hidden states
    cache_dtype: Optional[str] = field(default=None, metadata=choices(OPTIONAL_DTYPES))  # block-wise; None = model.dtype


@dataclass(frozen=True)
class LoraRecoveryConfig(TrainStageConfig):
    lr: float = field(default=1e-4, metadata=at_least(0))
    min_lr: float = field(default=1e-6, metadata=at_least(0))
    rank: int = field(default=8, metadata=above(0))
    alpha: float = 16.0
    dropout: float = field(default=0.0, metadata=in_range(0, 1, high_open=True))
    # Empty (with train_student): no adapter, only the student's own parameters train, so the teacher's weights
    # stay as they are; with window_linear a prompt inside the window (and sinks) is then the teacher's exactly.
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # KL-first (docs/quality.md): KL to the teacher's logits is the recovery objective; next-token CE on one
    # corpus pulls the student away from the teacher (closer news perplexity, worse KL, code and retrieval).
    kl_weight: float = field(default=1.0, metadata=at_least(0))  # KL(teacher || student) on logits
    ce_weight: float = field(default=0.0, metadata=at_least(0))  # next-token cross-entropy weight (an option)
    train_student: bool = False  # keep feature maps / gates trainable during LoRA
    recompute_attention: bool = True  # recompute student attention in backward: less memory, ~1 more mechanism forward per step
    kl_top_k: int = field(default=0, metadata=at_least(0))  # >0: KL over the teacher's k largest logits per position (+ one bucket for the rest); 0 = full vocabulary
    kl_temperature: float = field(default=1.0, metadata=above(0))  # softens teacher and student in the KL (the loss is scaled by temperature²)
    hidden_weight: float = field(default=0.0, metadata=at_least(0))  # >0 adds per-layer MSE of the student's decoder-layer outputs to the teacher's


@dataclass(frozen=True)
class LongContextConfig:
    """Long-context evaluation; off by default (slow on CPU). See docs/export.md."""

    passkey_lengths: list[int] = field(default_factory=list, metadata=above(0, each=True))  # prompt lengths in tokens; empty: no passkey eval
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0], metadata=in_range(0, 1, each=True))  # needle position, 0 = start
    passkey_trials: int = field(default=2, metadata=above(0))  # random keys per (length, depth) cell
    position_seq_len: int = field(default=0, metadata=at_least(0))  # >0: perplexity by position on data.eval packed to this length
    position_buckets: int = field(default=4, metadata=above(0))
    position_sequences: int = field(default=4, metadata=above(0))


@dataclass(frozen=True)
class BehaviourConfig:
    """Closeness and behaviour against the teacher (docs/behaviour.md); off by default (minutes on CPU)."""

    enabled: bool = False
    texts: list[str] = field(default_factory=lambda: ["news", "code", "manual"],  # KL, top-1, ppl ratio per kind
                             metadata=choices(Registry("stages.behaviour", "TEXT_KINDS"), each=True))
    text_sequences: int = field(default=16, metadata=above(0))  # sequences of data.seq_len per text kind
    # Retrieval prompt lengths in tokens; empty: 1x, 2x and 4x data.seq_len.
    retrieval_lengths: list[int] = field(default_factory=list, metadata=above(0, each=True))
    retrieval_prompts: int = field(default=36, metadata=above(0))  # per length and format (fewer than 36 is noisy)
    instructions: int = field(default=60, metadata=above(0))  # fixed instructions for teacher agreement (of 66)
    # Documents before the instructions, in windows (attention.window_size, or 64): 16 x 64 ~ 1,000 tokens.
    context_windows: list[int] = field(default_factory=lambda: [2, 4, 16], metadata=above(0, each=True))
    related: bool = True  # also documents that hold the facts the question asks about
    # A folder that keeps the teacher's retrieval results and answers between evaluations of students of one
    # teacher (`linearize compare` sets it); null: measured every time. Not part of any stage's config digest.
    teacher_cache: Optional[str] = None


@dataclass(frozen=True)
class EvaluateConfig:
    max_sequences: int = field(default=80, metadata=above(0))
    sample_prompt: str = "The capital of France is"
    sample_tokens: int = field(default=24, metadata=at_least(0))
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    long_context: LongContextConfig = field(default_factory=LongContextConfig)


@dataclass(frozen=True)
class ExportConfig:
    # linearize (bundled modeling code), or a serving family (qwen3_5: a plain Qwen3_5ForCausalLM checkpoint)
    format: str = field(default=EXPORT_LINEARIZE, metadata=choices(_export_formats))
    merge_lora: bool = True
    dtype: Optional[str] = field(default=None, metadata=choices(OPTIONAL_DTYPES))  # None: model.dtype


@dataclass(frozen=True)
class EngineConfig:
    name: str = field(default="single", metadata=choices(Registry("linearize.train.engine", "ENGINES")))
    zero_stage: int = field(default=2, metadata=choices(Registry("linearize.train.distributed", "ZERO_STAGES")))
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = field(default="fp32", metadata=choices(Registry("linearize.train.distributed", "PRECISIONS")))


# Marks the RunConfig sections that belong to one pipeline stage: a stage's checkpoints and DONE record
# ignore the other stages' sections (stages/registry.py maps the same names to their runners).
STAGE_SECTION = {"stage": True}


@dataclass(frozen=True)
class RunConfig:
    run_name: str = "demo"
    output_dir: str = "checkpoints"
    seed: int = 0
    stages: list[str] = field(  # the stage sections below (stages/registry.py STAGES), run in the listed order
        default_factory=lambda: ["attention_transfer", "lora_recovery", "evaluate", "export"],
        metadata=choices(lambda: stage_sections(), each=True),
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attention_transfer: TransferConfig = field(default_factory=TransferConfig, metadata=STAGE_SECTION)
    lora_recovery: LoraRecoveryConfig = field(default_factory=LoraRecoveryConfig, metadata=STAGE_SECTION)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, metadata=STAGE_SECTION)
    export: ExportConfig = field(default_factory=ExportConfig, metadata=STAGE_SECTION)
    engine: EngineConfig = field(default_factory=EngineConfig)


def stage_sections() -> tuple[str, ...]:
    """The RunConfig sections that configure one stage each, in pipeline order."""
    return tuple(f.name for f in fields(RunConfig) if f.metadata.get("stage"))
