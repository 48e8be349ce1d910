"""Checkpoint conversion: Hugging Face Llama-family folders <-> megatron-core checkpoints at any TP x PP, and
DeepSpeed ZeRO training checkpoints -> Hugging Face (a LoRA run's merged, or as a PEFT adapter folder). See
``docs/convert.md``."""

from gatedpo_mega.convert.commands import add_convert_commands, hf_to_mcore, mcore_to_hf, reshard, zero_to_hf
from gatedpo_mega.convert.errors import (
    AdapterError,
    CheckpointFormatError,
    ConvertError,
    DestinationError,
    LayoutMismatchError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedModelError,
)
from gatedpo_mega.convert.hf_config import hf_model_config, to_hf_config
from gatedpo_mega.convert.mapping import hf_shapes, hf_to_mcore_state, local_shapes, mcore_to_hf_state
from gatedpo_mega.convert.mcore import load_mcore_weights, rank_file, read_mcore_meta

__all__ = [
    "AdapterError",
    "CheckpointFormatError",
    "ConvertError",
    "DestinationError",
    "LayoutMismatchError",
    "MissingTensorError",
    "ShapeMismatchError",
    "UnexpectedTensorError",
    "UnsupportedModelError",
    "add_convert_commands",
    "hf_model_config",
    "hf_shapes",
    "hf_to_mcore",
    "hf_to_mcore_state",
    "load_mcore_weights",
    "local_shapes",
    "mcore_to_hf",
    "mcore_to_hf_state",
    "rank_file",
    "read_mcore_meta",
    "reshard",
    "to_hf_config",
    "zero_to_hf",
]
