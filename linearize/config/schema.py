"""Dataclass schemas for every config section. OmegaConf builds structured (strict) configs from these,
so an unknown key or a wrong type is an error. Defaults follow the LoLCATs recipe (../shared/METHODS.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

# sigmoid(logit(0.1)) = 0.1: LoLCATs starts every head giving the window 10% weight.
INIT_WINDOW_LOGIT = math.log(0.1 / 0.9)


@dataclass(frozen=True)
class ModelConfig:
    path: str = "smollm2-135m-instruct"  # HF directory, a .gguf file, or a registered name
    dtype: str = "float32"  # a name of linearize.dtypes.DTYPES
    tokenizer: Optional[str] = None  # defaults to model.path


@dataclass(frozen=True)
class AttentionConfig:
    mechanism: str = "window_linear"  # a name of linearize.attention.MECHANISMS
    feature_map: str = "hedgehog"  # a name of linearize.feature_maps (available_feature_maps())
    feature_dim: int = 64  # f: hedgehog output width is 2f
    tie_qk_feature_map: bool = False  # one map shared by q and k (lawcat always ties)
    window_size: int = 64  # W for window mechanisms
    sink_tokens: int = 0  # window mechanisms: the first N tokens stay in every query's softmax part
    window_only: bool = False  # window_linear without the linear branch: the sliding-window baseline
    init_window_logit: float = INIT_WINDOW_LOGIT
    liger_alpha: float = 0.5  # liger_window: weight of the sliding-window softmax half
    liger_beta: float = 0.5  # liger_window: weight of the gated linear half
    gate_rank: int = 16  # lawcat: low-rank gate projection width
    gate_norm: float = 16.0  # liger/lawcat: g = logsigmoid(.) / gate_norm
    conv_kernel: int = 4  # lawcat: causal depthwise conv width
    delta_rope: bool = False  # gated_delta: q/k after RoPE (default: before, not yet chosen by measurement)
    decay_from: str = "projection"  # gated_delta family: a name of linearize.attention.gated_delta.DECAY_SOURCES
    init: str = "calibrated"  # gated_delta family: a name of linearize.attention.calibrate.INITS
    calibration_tokens: int = 1024  # init=calibrated: teacher tokens the statistics are read from
    # Layers that keep teacher attention: a list of indices, or "auto" (a run chooses them: see below).
    softmax_layers: Any = field(default_factory=list)
    softmax_layer_count: float = 0.0  # auto: N >= 1 layers, or a fraction 0 < N < 1 of them (rounded, at least 1)
    softmax_layer_selector: str = "transfer_probe"  # auto: a name of linearize.train.layer_choice.SELECTORS
    selection_steps: int = 8  # auto, transfer_probe: probe length in optimizer steps (~10% of the transfer's)
    layers: Optional[list[int]] = None  # layers to convert (None = all not in softmax_layers)
    form: str = "chunk"  # how the student computes a full sequence: a name of linearize.ops.FORM_NAMES
    chunk_size: int = 64
    backend: str = "auto"  # a name of linearize.ops.BACKENDS
    compile: bool = False  # torch.compile the student attention for training calls (not decoding)
    # A serving family the student is trained in the exact form of, so it exports as that family's plain
    # checkpoint (`linearize export --format qwen3_5`): None, or a name of linearize.models.families.FAMILIES.
    native_family: Optional[str] = None
    # auto with selector=recall: weight of the recall-loss score against the KL score (1 = recall only).
    selector_recall_weight: float = 1.0


@dataclass(frozen=True)
class TeacherSamplesConfig:
    """The `teacher` data source: sequences the teacher writes itself (docs/configs.md)."""

    prompts: str = "demo-wiki"  # a corpus name or file: the opening sentences of its documents prompt the teacher
    instructions: Optional[str] = None  # a file of instructions (one per line); None: the teacher writes them from seed topics
    tokens: int = 65536  # how many tokens to generate in all
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256  # per sample
    chat: str = "auto"  # auto | on | off: answers to instructions through the teacher's chat template
    chat_share: float = 0.5  # share of the samples that are chat (when chat is on)
    long_share: float = 0.3  # share of chat samples with documents before the instruction
    context_tokens: list[int] = field(default_factory=lambda: [256, 512])  # [min, max] document tokens before an instruction
    batch_size: int = 8
    seed: int = 0


@dataclass(frozen=True)
class RecallDataConfig:
    """The `recall` data source: procedurally generated in-context recall sequences."""

    sequences: int = 512  # how many sequences the source yields
    min_distance: int = 32  # tokens between a span and its query, at least
    max_distance: int = 480  # and at most
    queries: int = 4  # queries per sequence
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    train: str = "demo-wiki"  # text/jsonl/parquet file, a registered corpus name, or a hub dataset name
    eval: str = "demo-news"
    text_field: str = "text"  # column for jsonl/parquet/hub datasets
    seq_len: int = 512
    allow_beyond_context: bool = False  # allow seq_len > the model's max_position_embeddings
    eval_fraction: float = 0.0  # >0: hold out this fraction of data.train when data.eval is empty
    max_eval_sequences: int = 80
    shuffle: bool = True
    # When set, replaces data.train: sequences drawn from the sources in proportion to their weights,
    # e.g. [{source: teacher, weight: 0.7}, {source: recall, weight: 0.3}].
    mix: Optional[list[dict[str, Any]]] = None
    teacher_samples: TeacherSamplesConfig = field(default_factory=TeacherSamplesConfig)
    recall: RecallDataConfig = field(default_factory=RecallDataConfig)


@dataclass(frozen=True)
class TrainStageConfig:
    """Keys every training stage reads (the loop, the schedule, checkpoints); the stages set their own
    defaults below."""

    max_steps: int = 100
    save_every: int = 50
    eval_every: int = 50
    eval_sequences: int = 0  # held-out sequences for the in-stage eval; 0 = all data.max_eval_sequences
    keep_last: int = 2
    lr: float = 1e-2
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # a name of linearize.train.schedule.SCHEDULES
    warmup_steps: int = 0
    min_lr: float = 1e-5
    plateau_patience: int = 10  # scheduler=plateau: evals without a new best before the rate drops
    plateau_factor: float = 0.1  # scheduler=plateau: the rate's multiplier at each drop
    micro_batch_size: int = 1
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables clipping
    autocast: str = "none"  # a name of linearize.train.engine.AUTOCAST_DTYPES


@dataclass(frozen=True)
class TransferConfig(TrainStageConfig):
    mse_factor: float = 1000.0
    attn_ce_weight: float = 0.0  # >0 needs attention.form=parallel
    block_size: int = 0  # decoder layers per block-wise transfer block; 0 = every layer at once
    cache_gb: float = 64.0  # block-wise: disk budget for the cached teacher hidden states
    cache_dtype: Optional[str] = None  # block-wise: a name of linearize.dtypes.DTYPES; None = model.dtype


@dataclass(frozen=True)
class LoraRecoveryConfig(TrainStageConfig):
    lr: float = 1e-4
    min_lr: float = 1e-6
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    kl_weight: float = 0.0  # >0 adds KL(teacher || student) on logits
    ce_weight: float = 1.0  # next-token cross-entropy weight; 0 with kl_weight > 0 = distillation on logits only
    train_student: bool = False  # keep feature maps / gates trainable during LoRA
    recompute_attention: bool = True  # recompute student attention in backward: less memory, ~1 more mechanism forward per step
    kl_top_k: int = 0  # >0: KL over the teacher's k largest logits per position (+ one bucket for the rest); 0 = full vocabulary
    kl_temperature: float = 1.0  # softens teacher and student in the KL (the loss is scaled by temperature²)
    hidden_weight: float = 0.0  # >0 adds per-layer MSE of the student's decoder-layer outputs to the teacher's


@dataclass(frozen=True)
class LongContextConfig:
    """Long-context evaluation; off by default (slow on CPU). See docs/export.md."""

    passkey_lengths: list[int] = field(default_factory=list)  # prompt lengths in tokens; empty: no passkey eval
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # needle position, 0 = start
    passkey_trials: int = 2  # random keys per (length, depth) cell
    position_seq_len: int = 0  # >0: perplexity by position on data.eval packed to this length
    position_buckets: int = 4
    position_sequences: int = 4


@dataclass(frozen=True)
class EvaluateConfig:
    max_sequences: int = 80
    sample_prompt: str = "The capital of France is"
    sample_tokens: int = 24
    behaviour: bool = False  # also measure closeness and behaviour: KL per text kind, retrieval, agreement (slow)
    long_context: LongContextConfig = field(default_factory=LongContextConfig)


@dataclass(frozen=True)
class ExportConfig:
    format: str = "linearize"  # linearize (bundled modeling code) | qwen3_5 (a plain Qwen3_5ForCausalLM checkpoint)
    merge_lora: bool = True
    dtype: Optional[str] = None  # a name of linearize.dtypes.DTYPES; None: model.dtype


@dataclass(frozen=True)
class EngineConfig:
    name: str = "single"  # a name of linearize.train.engine.ENGINES
    zero_stage: int = 2  # one of linearize.train.distributed.ZERO_STAGES
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "fp32"  # a name of linearize.train.distributed.PRECISIONS


# Marks the RunConfig sections that belong to one pipeline stage: a stage's checkpoints and DONE record
# ignore the other stages' sections (stages/registry.py maps the same names to their runners).
STAGE_SECTION = {"stage": True}


@dataclass(frozen=True)
class RunConfig:
    run_name: str = "demo"
    output_dir: str = "checkpoints"
    seed: int = 0
    stages: list[str] = field(  # names of stages/pipeline.py STAGES, run in the listed order
        default_factory=lambda: ["attention_transfer", "lora_recovery", "evaluate", "export"]
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
