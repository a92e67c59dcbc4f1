"""Data: document-level datasets, preprocessing, synthetic lengths.

Entry point for the trainer: ``build.build_datasets(DataConfig(...)) -> (train, valid)`` and
``sampler.GlobalBatchSampler``. Modules: tokenizer (byte-level / HuggingFace), indexed
(megatron.core .bin/.idx access), documents (length rule + counts), mock, stdlib_corpus,
blend, sampler, preprocess (JSONL -> .bin/.idx), synthetic (long-tail lengths).
Nothing is imported here so torch-free users (the planner) stay light.
"""
