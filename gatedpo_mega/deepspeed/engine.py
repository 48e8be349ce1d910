"""DeepSpeed ZeRO around a megatron-core model.

Two drivers share one loss hook (``gatedpo_mega.loss``); the backend says which it uses (``Backend.engine_driver``):

- ``schedule`` (ZeRO 0/1, any pipeline size): megatron-core's ``get_forward_backward_func()`` runs the
  micro-batches and their backward passes (gradient accumulation in ``.grad``); DeepSpeed then reduces the
  gradients over the data-parallel group and steps the ZeRO-1 optimizer, as its own pipeline engine does.
- ``engine`` (ZeRO 2/3, pipeline 1): DeepSpeed's engine drives the micro-batches (``engine.backward`` per
  micro-batch, ``gradient_accumulation_steps`` = their number), because ZeRO 2 and 3 reduce and partition
  gradients in hooks during each backward pass.

Stage 2 and 3 shard gradients and parameters over the data-parallel group; DeepSpeed refuses them with pipeline
parallelism, and so does the config validation.

Experts under expert parallelism (EP) are DeepSpeed's own kind of MoE parameter (``allreduce=False``, which
megatron-core sets on them): ``expert_groups`` registers megatron-core's expert-parallel and expert-data-parallel
groups with DeepSpeed under one name, tags the experts with it, gives them their own optimizer groups
(``moe: True``) and tells the engine it has MoE layers. ZeRO 1 and 2 then partition the experts over the
expert-data-parallel group and reduce their gradients over it, dividing by the data-parallel size as for every
other gradient: the all-to-all's backward has already summed the EP peers' tokens into each expert's gradient, so
that is the mean over the data-parallel ranks' micro-batches (megatron-core's DDP scales them the same way). Its
gradient norm sums the squares over data x model parallel ranks, every expert once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from gatedpo_mega.config import Config
from gatedpo_mega.environment import quiet_deepspeed_start
from gatedpo_mega.megatron.parallel import Layout


class LayoutMPU:
    """The ``mpu`` object DeepSpeed asks for groups, answered from an explicit ``Layout``.

    DeepSpeed counts a replicated (non tensor-parallel) parameter in the gradient norm only where the tensor rank is
    0 and then sums the norm over the model-parallel group (tensor x pipeline), which is what these answer.

    Context parallelism is more data parallelism to DeepSpeed: its data-parallel group is data x context
    (``Layout.grad_group``), over which it all-reduces or reduce-scatters the gradients, dividing by the group's size,
    and over which ZeRO 1-3 partition. Each CP rank's gradient is its own tokens' share of the whole rows' loss, so
    the loss is scaled by CP first (megatron-core's convention, which its schedule applies itself; ``train_step``
    for the engine-driven micro-batches): the average over DP x CP is then the sum over CP and the mean over DP.
    (DeepSpeed's own sequence-parallel correction is missing from ZeRO 3's reduce-scatter, which divides by the
    whole group: this convention holds at every stage.)
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def get_model_parallel_group(self) -> Any:
        return self.layout.mp_group

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp * self.layout.pp

    def get_model_parallel_rank(self) -> int:
        return self.layout.pp_rank * self.layout.tp + self.layout.tp_rank

    def get_tensor_model_parallel_group(self) -> Any:
        return self.layout.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.layout.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.layout.rank - self.layout.tp_rank

    def get_pipeline_model_parallel_group(self) -> Any:
        return self.layout.pp_group

    def get_data_parallel_group(self) -> Any:
        return self.layout.grad_group

    def get_data_parallel_rank(self) -> int:
        return self.layout.grad_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp * self.layout.cp


def deepspeed_config(cfg: Config, *, dp: int, num_micro_batches: int, engine_driver: bool) -> dict[str, Any]:
    """``engine_driver``: DeepSpeed's engine runs each micro-batch (``Backend.engine_driver``), so it accumulates
    gradients itself; otherwise a step is one "micro-batch" of all of them, accumulated by the schedule."""
    t = cfg.train
    gas = num_micro_batches if engine_driver else 1
    micro = t.micro_batch_size if engine_driver else t.micro_batch_size * num_micro_batches
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * dp,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            # Without hooks (stage 1) gradients are reduced after the schedule, not during backward.
            # Expert parallelism: DeepSpeed reduces experts over their own group from these buckets only.
            "contiguous_gradients": engine_driver or cfg.parallel.expert > 1,
            "overlap_comm": False,
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
        },
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lr_lambda(step: int, *, warmup: int, total: int, ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``ratio`` (= min_lr / lr) at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def expert_group_name(layout: Layout) -> str:
    return f"ep_size_{layout.ep}"  # the name DeepSpeed's own MoE layers give the group of this EP size


def register_expert_groups(model: torch.nn.Module, layout: Layout) -> list[torch.nn.Parameter]:
    """Register this layout's expert groups with DeepSpeed (``deepspeed.utils.groups``, filled in place: the engine
    keeps references to its dicts) and tag every expert parameter with their name; returns the expert parameters
    (none without expert parallelism: at EP 1 the experts are ordinary data-parallel parameters)."""
    experts = [p for p in model.parameters() if not getattr(p, "allreduce", True)]
    if layout.ep == 1 or not experts:
        return []
    import torch.distributed as dist
    from deepspeed.utils import groups

    name = expert_group_name(layout)
    groups._EXPERT_PARALLEL_GROUP[name] = layout.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(layout.ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = layout.expert_dp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(layout.expert_dp_group)
    groups.expert_tensor_parallel_world_size = layout.tp  # megatron-core's expert TP is the TP
    for p in experts:
        p.group_name = name  # type: ignore[attr-defined]
    return experts


@contextlib.contextmanager
def engine_with_moe_layers(num_layers: int, num_experts: int) -> Iterator[None]:
    """``deepspeed.initialize`` whose engine knows it has MoE layers (it looks for its own ``MoE`` modules only, and
    its ZeRO optimizer and gradient reduction treat experts as such only then)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._configure_distributed_model

    def configure(self: Any, model: Any) -> None:
        original(self, model)
        self.has_moe_layers = True
        self.num_experts = [num_experts] * num_layers

    DeepSpeedEngine._configure_distributed_model = configure  # type: ignore[method-assign]
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = original  # type: ignore[method-assign]


def without_inference_comm_op() -> None:
    """DeepSpeed's communication backend builds its shared-memory all-reduce on a CPU host (a C++ compile of about
    20 s the first time on a host) and sets it up in every process, for ``inference_all_reduce``, which only its
    inference engine calls. Training never does: marked as not available, it is neither built nor set up."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(
    model: torch.nn.Module, cfg: Config, layout: Layout, *, num_micro_batches: int, engine_driver: bool
) -> Any:
    import deepspeed

    without_inference_comm_op()

    t = cfg.train
    experts = {id(p) for p in register_expert_groups(model, layout)}
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    expert_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:  # with LoRA: the adapters only (the base is frozen)
            if id(p) in experts:
                expert_decay.append(p)  # (2-d weights only)
            else:
                (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if expert_decay:
        groups.append(
            {
                "params": expert_decay,
                "weight_decay": t.weight_decay,
                "name": expert_group_name(layout),
                "moe": True,
            }
        )
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)  # type: ignore[arg-type]
    ratio = t.min_lr / t.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=t.warmup_steps, total=t.max_steps, ratio=ratio)
    )
    moe = (
        engine_with_moe_layers(cfg.model.num_layers // layout.pp, cfg.model.num_experts)
        if experts
        else contextlib.nullcontext()
    )
    with quiet_deepspeed_start(), moe:
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            mpu=LayoutMPU(layout),
            config=deepspeed_config(
                cfg,
                dp=layout.dp * layout.cp,
                num_micro_batches=num_micro_batches,
                engine_driver=engine_driver,
            ),
            dist_init_required=False,
        )
    return engine


def skips_nonfinite_steps(engine: Any) -> bool:
    """Whether DeepSpeed checks the reduced gradients itself and skips the update when they are NaN or infinite
    (``engine.was_step_applied()`` is then False).

    Its engine counts a step as skipped when the optimizer it wraps reports ``overflow``
    (``DeepSpeedEngine._take_model_step``): the ZeRO 1-3 optimizers do (a non-finite global gradient norm, fp32 or
    bf16), and so does the bf16 optimizer without ZeRO. With fp32 and no ZeRO the client optimizer steps on the
    gradients as they are: NaN reaches the weights, and clipping by a NaN norm turns every gradient into NaN.
    """
    return hasattr(engine.optimizer, "overflow")
