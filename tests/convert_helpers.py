"""Tiny Hugging Face models of each supported family, and the multi-process workers of tests/test_convert.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
TOKENS = [[5, 17, 93, 2, 44, 61, 8, 99, 31, 0, 12, 77]]  # ids < 100: valid in every family's vocabulary


def hf_config(kind: str, **overrides: Any) -> Any:
    """hidden 64, 4 heads in 2 key/value groups: vocabularies of 100-300 are not multiples of 64 x TP 2 = 128.
    Qwen3's heads are 32 wide (not hidden / heads = 16), with q/k norms. ``overrides`` replace any argument."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    families = {
        "llama": (LlamaConfig, dict(vocab_size=100, num_hidden_layers=2, rope_theta=500000.0)),
        "mistral": (MistralConfig, dict(vocab_size=200, num_hidden_layers=4, sliding_window=None)),
        "qwen2": (Qwen2Config, dict(vocab_size=300, num_hidden_layers=2, tie_word_embeddings=True)),
        "qwen3": (
            Qwen3Config,
            dict(vocab_size=150, num_hidden_layers=2, head_dim=32, tie_word_embeddings=True),
        ),
    }
    cls, own = families[kind]
    return cls(**{**common, **own, **overrides})


def make_hf_folder(kind: str, root: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A random model saved with ``save_pretrained`` (fp32), biases and norms not their initial values, and a
    stand-in tokenizer file; ``overrides`` are config arguments."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                p.add_(
                    torch.randn_like(p) * 0.1
                )  # not the ones/zeros a fresh model has: the test must see them
    path = root / kind
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return path


def hf_logits(
    path: Path | str, tokens: list[list[int]] = TOKENS, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The logits of the folder's model loaded by transformers in ``dtype``, returned as float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float()


def stage_logits(
    model: Any, lay: Any, rank: int, hidden_size: int, vocab_size: int, tokens: list[list[int]] = TOKENS
) -> torch.Tensor | None:
    """``tokens`` (rows of equal length) through this rank's pipeline stage (hidden states passed by send/recv);
    the full unpadded logits on the last stage, None elsewhere."""
    import torch.distributed as dist

    from gatedpo_mega.megatron.backend import causal_mask

    model.eval()
    ids = torch.tensor(tokens)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        if not lay.first_stage:
            hidden = torch.empty(
                ids.shape[1], ids.shape[0], hidden_size, dtype=next(model.parameters()).dtype
            )
            dist.recv(
                hidden, src=rank - lay.tp
            )  # megatron-core's order: tensor fastest, then data, then pipeline
            model.set_input_tensor(hidden)
        y = model(ids, pos, attention_mask=causal_mask(ids.shape[1], ids.device))
        if not lay.last_stage:
            dist.send(y.contiguous(), dst=rank + lay.tp)
            return None
        parts = [torch.empty_like(y) for _ in range(lay.tp)]
        dist.all_gather(parts, y.contiguous(), group=lay.tp_group)
        return torch.cat(parts, dim=-1)[..., :vocab_size]


def mcore_logits_worker(rank: int, world: int, folders: list[str], out: str, tp: int, pp: int) -> None:
    """Every mcore folder (laid out tp x pp) loaded into ``build_model`` stages; the last stage's first tensor rank
    writes the full (unpadded) logits to ``out``."""
    from gatedpo_mega.convert import load_mcore_weights, read_mcore_meta
    from gatedpo_mega.convert.hf_config import model_config_from_dict
    from gatedpo_mega.megatron.model import StageInfo, build_model
    from gatedpo_mega.megatron.parallel import initialize_layout

    lay = initialize_layout(tp, pp)
    results = {}
    for folder in folders:
        meta = read_mcore_meta(folder)
        cfg = model_config_from_dict({**meta["model"], "fused_logprobs": False}, folder)
        per = cfg.num_layers // pp
        stage = StageInfo(
            pre_process=lay.first_stage, post_process=lay.last_stage, layer_offset=lay.pp_rank * per,
            tp_rank=lay.tp_rank, tp_size=tp,
        )  # fmt: skip
        model = build_model(
            cfg, vocab_size=meta["vocab_size"], stage=stage, pipeline=pp, seed=1, tp_group=lay.tp_group
        )
        load_mcore_weights(
            model, folder, cfg=cfg, vocab_size=meta["vocab_size"], tp_rank=lay.tp_rank, tp=tp, pp_rank=lay.pp_rank, pp=pp
        )  # fmt: skip
        full = stage_logits(model, lay, rank, cfg.hidden_size, meta["vocab_size"])
        if full is None:
            continue
        results[folder] = full
    if lay.last_stage and lay.tp_rank == 0:
        torch.save(results, out)


def zero_checkpoint_worker(
    rank: int, world: int, mcore_dir: str, out: str, tp: int, pp: int, zero: int
) -> None:
    """A training checkpoint as ``training/checkpoint.py`` lays it out, written by DeepSpeed itself: the model of
    ``mcore_dir`` (same TP x PP) wrapped by ``build_engine`` at ZeRO ``zero`` and saved before any step, so its
    fp32 master weights are exactly the loaded ones."""
    from dataclasses import asdict

    from gatedpo_mega.backend import make_backend
    from gatedpo_mega.config import load_config
    from gatedpo_mega.convert import load_mcore_weights, read_mcore_meta
    from gatedpo_mega.deepspeed.engine import build_engine
    from gatedpo_mega.families import SHAPE_FIELDS
    from gatedpo_mega.formats import DEEPSPEED_DIR, DEEPSPEED_TAG, TRAIN_FORMAT, TRAIN_VERSION
    from gatedpo_mega.megatron.model import StageInfo, build_model
    from gatedpo_mega.megatron.parallel import initialize_layout

    meta = read_mcore_meta(mcore_dir)
    m = meta["model"]
    keys = (*SHAPE_FIELDS, "rotary_base", "norm_epsilon", "max_position_embeddings", "dtype")
    overrides = [f"model.{k}={str(m[k]).lower() if isinstance(m[k], bool) else m[k]}" for k in keys]
    overrides += [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.zero_stage={zero}"]
    overrides += ["train.micro_batch_size=1", f"train.global_batch_size={world // (tp * pp)}"]
    cfg = load_config(None, overrides)
    lay = initialize_layout(tp, pp)
    per = cfg.model.num_layers // pp
    stage = StageInfo(
        pre_process=lay.first_stage, post_process=lay.last_stage, layer_offset=lay.pp_rank * per,
        tp_rank=lay.tp_rank, tp_size=tp,
    )  # fmt: skip
    vocab = meta["vocab_size"]
    model = build_model(cfg.model, vocab_size=vocab, stage=stage, pipeline=pp, seed=3, tp_group=lay.tp_group)
    load_mcore_weights(
        model, mcore_dir, cfg=cfg.model, vocab_size=vocab, tp_rank=lay.tp_rank, tp=tp, pp_rank=lay.pp_rank, pp=pp
    )  # fmt: skip
    engine = build_engine(model, cfg, lay, num_micro_batches=1, engine_driver=make_backend(cfg).engine_driver)
    ckpt = Path(out)
    engine.save_checkpoint(str(ckpt / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
    if rank == 0:
        record = {
            "format": TRAIN_FORMAT, "version": TRAIN_VERSION, "step": 0,
            "layout": {"tensor": tp, "pipeline": pp, "data": lay.dp, "zero_stage": zero},
            "model": asdict(cfg.model), "vocab_size": vocab, "padded_vocab_size": meta["padded_vocab_size"],
            "hf_config": meta["hf_config"],
        }  # fmt: skip
        (ckpt / "meta.json").write_text(json.dumps(record))


def train_worker(rank: int, world: int, overrides: list[str]) -> None:
    from gatedpo_mega.config import load_config
    from gatedpo_mega.training.data import make_run_data
    from gatedpo_mega.training.loop import train

    train(load_config(None, overrides), make_run_data)


def trained_logits_worker(
    rank: int,
    world: int,
    ckpt: str,
    out: str,
    tokens: list[list[int]] = TOKENS,
    dtypes: tuple[str, ...] = ("fp32",),
) -> None:
    """The trained model's logits, its weights read by ``load_state_dict`` from DeepSpeed's own model-states files
    (not through the converter): the reference the exported Hugging Face model must reproduce. The model is built
    at the checkpoint's layout in each of ``dtypes`` (its weights cast to it); ``out`` gets ``{dtype: logits}``,
    float32."""
    from gatedpo_mega.convert.hf_config import model_config_from_dict
    from gatedpo_mega.formats import module_states_file
    from gatedpo_mega.megatron.model import StageInfo, build_model
    from gatedpo_mega.megatron.parallel import initialize_layout

    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    tp, pp = meta["layout"]["tensor"], meta["layout"]["pipeline"]
    lay = initialize_layout(tp, pp)
    mp = lay.pp_rank * tp + lay.tp_rank
    state = torch.load(module_states_file(Path(ckpt), mp, meta["layout"]["zero_stage"]), weights_only=False)
    results = {}
    for dtype in dtypes:
        cfg = model_config_from_dict(
            {**meta["model"], "fused_logprobs": False, "init_from": "", "dtype": dtype}, ckpt
        )
        stage = StageInfo(
            pre_process=lay.first_stage, post_process=lay.last_stage,
            layer_offset=lay.pp_rank * (cfg.num_layers // pp), tp_rank=lay.tp_rank, tp_size=tp,
        )  # fmt: skip
        model = build_model(
            cfg, vocab_size=meta["vocab_size"], stage=stage, pipeline=pp, seed=7, tp_group=lay.tp_group
        )
        result = model.load_state_dict(state["module"], strict=False)
        assert not [k for k in result.missing_keys if not k.endswith("_extra_state")], result.missing_keys
        assert not result.unexpected_keys, result.unexpected_keys
        full = stage_logits(model, lay, rank, cfg.hidden_size, meta["vocab_size"], tokens)
        del model
        if full is not None:
            results[dtype] = full.float()
    if lay.last_stage and lay.tp_rank == 0:
        torch.save(results, out)
