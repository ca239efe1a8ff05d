"""Data: tokenizers (`tokenizer`), corpus readers (`corpus`), indexed-dataset writing and checks
(`indexed`), preprocessing (`preprocess`), training datasets and sampler (`gpt_data`).
Submodules are imported explicitly; this package imports nothing heavy. See docs/data.md."""
