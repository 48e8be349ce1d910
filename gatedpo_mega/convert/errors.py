"""Conversion errors: each reaches the user as one ``gatedpo: error: ...`` line naming the tensor or file."""

from __future__ import annotations

from gatedpo_mega.errors import UserError


class ConvertError(UserError):
    """A checkpoint cannot be converted; the message names the file or tensor."""


class UnsupportedModelError(ConvertError):
    """The architecture or one of its options has no megatron-core equivalent here."""


class MissingTensorError(ConvertError):
    """A tensor the model needs is not in the checkpoint."""


class UnexpectedTensorError(ConvertError):
    """The checkpoint holds a tensor the model does not have."""


class ShapeMismatchError(ConvertError):
    """A tensor's shape differs from the one the model config implies."""


class LayoutMismatchError(ConvertError):
    """A checkpoint's tensor x pipeline layout (or model shape) differs from the one asked for."""


class CheckpointFormatError(ConvertError):
    """A file is missing, incomplete or not in the expected format."""


class DestinationError(ConvertError):
    """The destination exists and is not empty (use --force), or overlaps the source."""


class AdapterError(ConvertError):
    """A PEFT LoRA adapter folder is missing, is not plain LoRA, or does not fit the model's LoRA config."""
