"""The megatron-core backend: ``GPTModel`` at any tensor x pipeline layout, driven by megatron-core's schedules.

The loss hook sits at Megatron's seam ``forward_step(data_iterator, model) -> (output, partial(loss_func, ...))``:
on the last pipeline stage the output is this rank's vocabulary shard of the logits (or the fused output layer's
statistics) and the loss function (``gatedpo_mega.loss``) turns it into ``(loss, aux)``; earlier stages return
their hidden states and the schedule moves them along.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.loss import LossContext, OutputRequest, output_request
from gatedpo_mega.megatron.attention import SDPAttention
from gatedpo_mega.megatron.experts import expert_config
from gatedpo_mega.megatron.lora import adapters, add_adapters, freeze_initial
from gatedpo_mega.megatron.model import StageInfo, build_model, expert_offset
from gatedpo_mega.megatron.output import set_output_request
from gatedpo_mega.megatron.parallel import Layout

if TYPE_CHECKING:
    from gatedpo_mega.backend import LossFunc
    from gatedpo_mega.config import Config


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """megatron-core's boolean attention mask: True where attention is *not* allowed."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu_(1)[None, None]


def uses_mask(model: torch.nn.Module) -> bool:
    """Whether the model's core attention needs the dense causal mask (megatron-core's local attention does;
    ``SDPAttention`` is causal without one)."""
    return not any(isinstance(m, SDPAttention) for m in model.modules())


def model_forward(
    model: torch.nn.Module, batch: PreferenceBatch, request: OutputRequest | None = None
) -> torch.Tensor:
    """Logits ``[2B, W, V/TP]`` (``[1, T, V/TP]`` packed; this rank's ``W/CP`` or ``T/CP`` tokens with context
    parallelism) on the last stage, or ``[2B, W, 3]`` statistics of whole rows with the fused output layer, which
    answers ``request`` (by default: the statistics of the batch's targets)."""
    request = request if request is not None else output_request(None, batch)
    cp = getattr(getattr(model, "module", model), "config", None)
    if request.shard is None and getattr(cp, "context_parallel_size", 1) > 1:
        raise RuntimeError(
            "a context-parallel model runs on its rank's tokens: give the LossContext its cp_group"
        )
    set_output_request(model, request)
    ids = batch.model_input_ids
    positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
    if (
        request.shard is not None
    ):  # this rank's tokens; megatron-core's rotary embedding picks their positions
        ids, positions = request.shard.local(ids), request.shard.local(positions)
    # With experts the router leaves padding out of its load-balancing loss (megatron/experts.py).
    extra = {"padding_mask": ~batch.token_mask} if expert_config(model) is not None else {}
    p = batch.packing
    if p is not None:
        # thd: megatron-core restarts the rotary positions per document; SDPAttention keeps documents apart. With
        # context parallelism cu_seqlens stay the whole row's, as megatron-core's thd rotary embedding reads them.
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = p.cu_seqlens
        packed = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=p.max_seqlen,
            max_seqlen_kv=p.max_seqlen,
        )
        packed.host_bounds = p.bounds  # type: ignore[attr-defined]  # read by SDPAttention: no device sync
        return model(ids, positions, attention_mask=None, packed_seq_params=packed, **extra)
    mask = causal_mask(ids.shape[1], ids.device) if uses_mask(model) else None
    return model(ids, positions, attention_mask=mask, **extra)


def forward_step(
    loss_func: LossFunc, ctx: LossContext, data_iterator: Any, model: torch.nn.Module
) -> tuple[torch.Tensor, Any]:
    """Megatron's ``forward_step_func`` (bind ``loss_func`` and ``ctx`` with ``functools.partial``)."""
    batch: PreferenceBatch = next(data_iterator)
    request = output_request(ctx, batch)
    return model_forward(model, batch, request), partial(loss_func, batch, ctx, request=request)


def stage_info(cfg: Config, layout: Layout) -> StageInfo:
    per_stage = cfg.model.num_layers // layout.pp
    return StageInfo(
        pre_process=layout.first_stage, post_process=layout.last_stage, layer_offset=layout.pp_rank * per_stage,
        tp_rank=layout.tp_rank, tp_size=layout.tp, expert_offset=expert_offset(cfg.model, layout.ep_rank, layout.ep),
    )  # fmt: skip


class MegatronBackend:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # ZeRO 2 and 3 reduce and partition gradients in hooks during every backward pass: DeepSpeed's engine must
        # run the micro-batches (pipeline 1 only, as DeepSpeed requires; the config refuses the rest).
        # Experts under expert parallelism at ZeRO 1 too: DeepSpeed reduces them over their own group only from
        # its contiguous gradient buckets, which its hooks fill (deepspeed/engine.py).
        experts = cfg.parallel.expert > 1 and cfg.parallel.pipeline == 1
        self.engine_driver = cfg.parallel.zero_stage >= 2 or experts

    def build(self, layout: Layout, vocab_size: int, device: torch.device) -> torch.nn.Module:
        cfg = self.cfg
        model = build_model(
            cfg.model, vocab_size=vocab_size, stage=stage_info(cfg, layout), pipeline=layout.pp,
            seed=cfg.train.seed, tp_group=layout.tp_group, context=layout.cp, expert=layout.ep,
        )  # fmt: skip
        if cfg.model.init_from:
            from gatedpo_mega.training.initial_weights import load_initial_weights

            load_initial_weights(model, cfg, layout, vocab_size)
        if cfg.model.lora.enabled:  # the base frozen, adapters on its linears (megatron/lora.py)
            stage = stage_info(cfg, layout)
            add_adapters(
                model, cfg.model, layer_offset=stage.layer_offset, tp_group=layout.tp_group,
                tp_rank=layout.tp_rank, tp_size=layout.tp, seed=cfg.train.seed,
            )  # fmt: skip
            if cfg.model.init_adapter:
                from gatedpo_mega.convert.peft import load_peft_adapter

                load_peft_adapter(model, cfg.model, stage.layer_offset, layout.tp_rank, layout.tp)
        model = model.to(device)
        if cfg.model.init_adapter:
            freeze_initial(model)  # the starting policy, the reference of this run
        return model

    def forward(self, model: torch.nn.Module, batch: PreferenceBatch, request: OutputRequest) -> torch.Tensor:
        return model_forward(model, batch, request)

    def adapters(self, model: torch.nn.Module, mode: str) -> AbstractContextManager[None]:
        """megatron/lora.py's: every ``LoraAdapter`` of the model switched to ``mode``."""
        return adapters(model, mode)

    def schedule(
        self,
        model: torch.nn.Module,
        batches: list[PreferenceBatch],
        loss_func: LossFunc,
        ctx: LossContext,
        *,
        forward_only: bool,
    ) -> list[dict[str, Any]]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        # With context parallelism megatron-core's schedule multiplies each loss by the CP size before backward,
        # which DeepSpeed's average over data x context then turns into a sum over CP (deepspeed/engine.py).
        out: list[dict[str, Any]] = get_forward_backward_func()(
            forward_step_func=partial(forward_step, loss_func, ctx),
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=max(b.input_ids.shape[1] for b in batches),
            micro_batch_size=batches[0].input_ids.shape[0],
            forward_only=forward_only,
        )
        return out

    def after_backward(self, model: torch.nn.Module, layout: Layout) -> None:
        """With pipeline parallelism a tied embedding lives on the first and the last stage: sum their gradients."""
        if layout.embedding_group is None or not getattr(model, "share_embeddings_and_output_weights", False):
            return
        if not (layout.first_stage or layout.last_stage):
            return
        weight = model.shared_embedding_or_output_weight()  # type: ignore[operator]
        if weight.grad is not None:
            dist.all_reduce(weight.grad, group=layout.embedding_group)

    def save_final(self, engine: Any, layout: Layout) -> None:
        """Nothing beyond the training checkpoints (``gatedpo convert zero-to-hf`` exports them)."""
