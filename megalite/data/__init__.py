"""Data: Megatron-compatible indexed datasets (.bin/.idx), GPT datasets with blending, tokenizers, preprocessing,
and the embedded default corpus (the interpreter's standard library)."""
from megalite.data.gpt_dataset import BlendedDataset, GPTDataset, build_gpt_datasets, samples_per_epoch
from megalite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError
from megalite.data.indices import build_blending_indices, build_sample_index

__all__ = [
    "BlendedDataset",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "build_blending_indices",
    "build_gpt_datasets",
    "build_sample_index",
    "samples_per_epoch",
]
