"""The old name of ``training/initial_weights.py``, kept only while ``training/loop.py`` (under a concurrent
refactor) still imports it; delete this file when that import reads ``training.initial_weights``."""

from gatedpo_mega.training.initial_weights import load_initial_weights, source_hf_config

__all__ = ["load_initial_weights", "source_hf_config"]
