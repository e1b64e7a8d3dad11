"""Training and evaluation data: documents from files, registered corpora or hub datasets, packed into
`[N, seq_len]` token-id tensors, shuffled by seed, split into train and eval."""
from .corpora import CORPORA, load_corpus
from .loading import LOCAL_FORMATS, load_texts
from .packing import build_datasets, in_stage_eval, pack_sequences, shuffle_sequences, split_sequences, tokenize_documents
from .wiki import strip_wiki_markup, wiki_dump_to_documents

__all__ = [
    "CORPORA", "LOCAL_FORMATS", "build_datasets", "in_stage_eval", "load_corpus", "load_texts", "pack_sequences",
    "shuffle_sequences", "split_sequences", "strip_wiki_markup", "tokenize_documents", "wiki_dump_to_documents",
]
