"""Gate-DPO on megatron-core and DeepSpeed."""

from gatedpo_mega.environment import hide_unused_trackers

__version__ = "0.1.0"

hide_unused_trackers()  # megatron-core's and DeepSpeed's imports of wandb and mlflow (environment.py)
