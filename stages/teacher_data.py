"""The run's training data when it includes the teacher's own samples (`data.train: teacher`, or a
`data.mix` entry with `source: teacher`).

The samples are made once per run, by the plain teacher, before the first stage reads any data
(`ensure_teacher_samples`, called by the pipeline), and stored under `<run>/teacher_samples/` (resumable
batch by batch: `linearize.data.teacher_samples`). Every later reader (`run_datasets`) gets them through
a stand-in that holds only the teacher's config: reading can never generate, so a student (or a
converted model in any mode) never writes training data by accident."""
from __future__ import annotations

from pathlib import Path

import torch

from linearize.data import build_datasets
from linearize.errors import UserError
from linearize.models.teacher import load_model_tokenizer, load_teacher, resolve_model_path

from .rundir import RunDir

TEACHER_SOURCE = "teacher"


def uses_teacher(data_cfg) -> bool:
    """Whether `data.train` or a `data.mix` entry is the teacher source."""
    sources = [data_cfg.train] if data_cfg.mix is None else [entry.source for entry in data_cfg.mix]
    return TEACHER_SOURCE in sources


class IncompleteSamples(UserError):
    """The stored teacher samples do not cover the data's settings yet."""


class RecordedTeacher:
    """The teacher as a reader of stored samples needs it: its config (the samples' record names it) and
    nothing that generates."""

    def __init__(self, config, samples_dir: Path):
        self.config, self.samples_dir = config, samples_dir

    def _missing(self, *args, **kwargs):
        raise IncompleteSamples(f"the teacher samples in {self.samples_dir} are incomplete for data.teacher_samples: run "
                        "`linearize run` (it generates them before the first stage)")

    parameters = generate = _missing


def samples_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).teacher_samples


def ensure_teacher_samples(cfg, run_dir: Path) -> None:
    """Generates the teacher samples the run's data needs and does not hold yet (nothing when the data
    has no teacher source). Loads the plain teacher for it and frees it afterwards."""
    if not uses_teacher(cfg.data):
        return
    from transformers import AutoConfig

    tokenizer = load_model_tokenizer(cfg.model)
    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model.path), trust_remote_code=False)
    try:  # already complete (a later stage, a resume): read, without loading the teacher's weights
        build_datasets(cfg.data, tokenizer, cfg.seed, teacher=RecordedTeacher(config, samples_dir(run_dir)),
                       samples_dir=samples_dir(run_dir))
        return
    except IncompleteSamples:
        pass
    teacher, tokenizer = load_teacher(cfg.model)
    build_datasets(cfg.data, tokenizer, cfg.seed, teacher=teacher, samples_dir=samples_dir(run_dir))
    del teacher


def run_datasets(cfg, tokenizer, run_dir: Path, model: torch.nn.Module | None = None):
    """`linearize.data.build_datasets` for a run: the teacher source reads `<run>/teacher_samples/`.
    `model`: any model with the teacher's config (the converted student has it); without one, no
    teacher source can be read."""
    if not uses_teacher(cfg.data):
        return build_datasets(cfg.data, tokenizer, cfg.seed)
    if model is None:
        raise UserError("data.train uses the teacher source, which needs the run directory's stored samples")
    folder = samples_dir(run_dir)
    return build_datasets(cfg.data, tokenizer, cfg.seed, teacher=RecordedTeacher(model.config, folder),
                          samples_dir=folder)
