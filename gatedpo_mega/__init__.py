"""Gate-DPO on megatron-core and DeepSpeed."""

__version__ = "0.1.0"
