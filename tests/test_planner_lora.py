"""The planner's LoRA terms (``gatedpo plan`` with ``model.lora.rank`` > 0): the adapter count against PEFT's, the
per-rank count and the activations LoRA adds or removes against a model built at TP 2, and the memory it saves."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from convert_helpers import FAMILIES, hf_config
from distributed import run_distributed

from gatedpo_mega.config import Config, LoraConfig, ModelConfig, ParallelConfig, load_config
from gatedpo_mega.planner import (
    DTYPE_BYTES,
    GiB,
    adapter_activation_bytes,
    adapter_parameters,
    feasible,
    layer_activation_bytes,
    plan_memory,
    stage_adapter_parameters,
    stage_parameters,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128256


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize(
    "targets", [["all-linear"], ["q_proj", "v_proj"], ["o_proj", "up_proj", "down_proj"]]
)
def test_adapter_parameters_equal_peft_on_the_hugging_face_model(kind, targets):
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from gatedpo_mega.config import LORA_TARGETS
    from gatedpo_mega.convert.hf_config import hf_model_config

    hf = hf_config(kind)
    mcfg, _ = hf_model_config(hf.to_dict())
    mcfg.lora = LoraConfig(rank=8, target_modules=targets)
    names = list(LORA_TARGETS) if targets == ["all-linear"] else targets
    peft = get_peft_model(AutoModelForCausalLM.from_config(hf), PeftConfig(r=8, target_modules=names))
    trained = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert adapter_parameters(Config(model=mcfg)) == trained


FIELDS = {
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 96,
}  # fmt: skip
# (rank, targets, dropout) pairs whose saved tensors differ by what the planner says: the inputs of fc1 and fc2 kept
# once an adapter reads them; the rank-r intermediates and the concatenated A of a fused site; dropout's masks.
# (o_proj's input is the attention output's own storage on this CPU; the planner counts it as the full-parameter
# plan does, beside the attention output.)
QVGD = ("q_proj", "v_proj", "gate_proj", "down_proj")
PAIRS = [
    ((4, QVGD, 0.0), (4, ("q_proj", "v_proj"), 0.0)),
    ((8, ("all-linear",), 0.0), (4, ("all-linear",), 0.0)),
    ((4, QVGD, 0.1), (4, QVGD, 0.0)),
]
TOKENS = 2 * 48


def _lora_cfg(rank: int, targets: list[str], dropout: float, tp: int) -> Config:
    lora = LoraConfig(rank=rank, target_modules=targets, dropout=dropout)
    return Config(model=ModelConfig(**FIELDS, lora=lora), parallel=ParallelConfig(tensor=tp))


def _saved_bytes(model, tokens: int) -> int:
    """Bytes the decoder layers save for backward over ``tokens`` tokens: distinct storages, parameters left out."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    torch.manual_seed(0)
    y = torch.randn(tokens // 2, 2, FIELDS["hidden_size"], requires_grad=True)  # [s, b, h]
    rotary = model.rotary_pos_emb(tokens // 2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for layer in model.decoder.layers:
            y = layer(y, attention_mask=None, rotary_pos_emb=rotary)
            y = y[0] if isinstance(y, tuple) else y
    total = sum(saved.values())  # counted while y (and so every saved tensor) is alive
    del y
    return total


def _built_worker(rank: int, world: int, out: str) -> None:
    """Each rank builds the model as training does (megatron-core, then the adapters), counts its parameters, and
    measures what its decoder layers save for backward."""
    import torch

    from gatedpo_mega.megatron.backend import stage_info
    from gatedpo_mega.megatron.lora import add_adapters
    from gatedpo_mega.megatron.model import build_model
    from gatedpo_mega.megatron.parallel import initialize_layout

    lay = initialize_layout(world, 1)
    results = {}
    for setting in dict.fromkeys(s for pair in PAIRS for s in pair):  # the same order on every rank
        cfg = _lora_cfg(setting[0], list(setting[1]), setting[2], world)
        model = build_model(
            cfg.model, vocab_size=300, stage=stage_info(cfg, lay), pipeline=1, seed=0, tp_group=lay.tp_group
        )
        add_adapters(
            model, cfg.model, layer_offset=0, tp_group=lay.tp_group, tp_rank=lay.tp_rank, tp_size=lay.tp, seed=0,
        )  # fmt: skip
        model.train()
        adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora." in n)
        total = sum(p.numel() for p in model.parameters())
        results[setting] = (adapters, total, _saved_bytes(model, TOKENS))
    torch.save(results, f"{out}.{rank}")


@pytest.mark.multiprocess
def test_adapters_and_their_activations_on_each_rank_equal_the_built_model_at_tp2(tmp_path):
    import torch

    out = str(tmp_path / "built")
    run_distributed(_built_worker, 2, out)
    for rank in range(2):
        built = torch.load(f"{out}.{rank}")

        def planned(setting):
            cfg = _lora_cfg(setting[0], list(setting[1]), setting[2], 2)
            per_layer = layer_activation_bytes(cfg, TOKENS) + adapter_activation_bytes(cfg, TOKENS)
            return stage_adapter_parameters(cfg), FIELDS["num_layers"] * per_layer, cfg

        for setting, (adapters, total, _) in built.items():
            n, _, cfg = planned(setting)
            assert adapters == n, (rank, setting)
            assert total == stage_parameters(cfg, 300, 0) + n, (rank, setting)
        for a, b in PAIRS:
            measured = built[a][2] - built[b][2]
            assert measured > 0 and planned(a)[1] - planned(b)[1] == measured, (rank, a, b)


def _cfg(*overrides: str) -> Config:
    return load_config(ROOT / "configs/llama3-70b.yaml", list(overrides))


def test_lora_keeps_the_base_weights_and_trains_only_the_adapters():
    full = _cfg("parallel.zero_stage=1")
    lora = _cfg("parallel.zero_stage=1", "model.lora.rank=16")
    assert lora.train.reference == "live" and full.train.reference == "precomputed"
    wb = DTYPE_BYTES["bf16"]
    for zero in (0, 1, 2, 3):
        f = replace(full, parallel=ParallelConfig(tensor=8, zero_stage=zero))
        lo = replace(lora, parallel=ParallelConfig(tensor=8, zero_stage=zero))
        pf = plan_memory(f, world=64, vocab_size=VOCAB).busiest
        pl = plan_memory(lo, world=64, vocab_size=VOCAB).busiest
        assert pl.total < pf.total, zero
        parts = {p.name: p.bytes for p in (*pl.parts, *pl.backward)}
        assert parts["weights"] == {p.name: p.bytes for p in pf.parts}["weights"]  # the base, as sharded
        assert parts["reference model"] == 0  # the policy with its adapters off
        n = stage_adapter_parameters(lo)
        assert pl.trained == n < pf.trained / 50
        assert parts["LoRA adapters"] == (-(-n // 8) if zero == 3 else n) * wb
        split = 8 if zero else 1
        assert parts["optimizer: Adam moments"] == 8 * -(-n // split)
        assert parts["gradients"] == (-(-n // 8) if zero >= 2 else n) * wb  # the adapters' only
    # Llama-3-70B on one node of 8 x 80 GiB: LoRA rank 16 fits, full-parameter training does not (docs/planning.md)
    assert feasible(_cfg("model.lora.rank=16"), 8, VOCAB, 80 * GiB)
    assert not feasible(_cfg(), 8, VOCAB, 80 * GiB)
