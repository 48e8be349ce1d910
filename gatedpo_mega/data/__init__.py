"""Preference data: files to tokenized pairs to micro-batches."""

from gatedpo_mega.data.config import DataConfig
from gatedpo_mega.data.errors import DataError
from gatedpo_mega.data.loader import PreferenceLoader
from gatedpo_mega.data.pipeline import PreferenceData, load_preference_data
from gatedpo_mega.data.tokenized import DataReport, Pair, TokenizedPairs

__all__ = [
    "DataConfig",
    "DataError",
    "DataReport",
    "Pair",
    "PreferenceData",
    "PreferenceLoader",
    "TokenizedPairs",
    "load_preference_data",
]
