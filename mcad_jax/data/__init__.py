"""Datasets, tokenizer and the input pipeline. TFDS is imported lazily."""
