"""Preference data: files to tokenized pairs to micro-batches."""
