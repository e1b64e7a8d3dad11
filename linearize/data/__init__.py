"""Training and evaluation data: documents from files, registered corpora or hub datasets, and generated
sources (`teacher` samples, `recall` sequences), packed into `[N, seq_len]` token-id tensors, mixed by
weight, shuffled by seed, split into train and eval."""
from .corpora import CORPORA, load_corpus
from .loading import LOCAL_FORMATS, load_texts
from .mix import SOURCES, SourceContext, mix_counts, mix_entries, mix_rows, source_rows
from .packing import build_datasets, in_stage_eval, pack_sequences, shuffle_sequences, split_sequences, tokenize_documents
from .recall import recall_examples, recall_rows
from .teacher_samples import generate_teacher_samples, pack_samples, teacher_rows
from .wiki import strip_wiki_markup, wiki_dump_to_documents

__all__ = [
    "CORPORA", "LOCAL_FORMATS", "SOURCES", "SourceContext", "build_datasets", "generate_teacher_samples",
    "in_stage_eval", "load_corpus", "load_texts", "mix_counts", "mix_entries", "mix_rows", "pack_samples",
    "pack_sequences", "recall_examples", "recall_rows", "shuffle_sequences", "source_rows", "split_sequences",
    "strip_wiki_markup", "teacher_rows", "tokenize_documents", "wiki_dump_to_documents",
]
