"""Initial weights from ``model.init_from``: a training checkpoint of this project, a megatron-core folder written by
``gatedpo convert``, or a Hugging Face model folder (converted for this rank on the way in).

The model fields a source fixes are read from its metadata alone: ``adopt_source_shapes`` fills them into the
config the user wrote (``gatedpo train``, ``gatedpo config``), refusing a written one that disagrees. Whether a source
fits a config is decided the same way (``read_source`` then ``check_source_fits``): ``launch`` asks before any
process starts, and every rank asks again before it reads a tensor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gatedpo_mega.config import Config, ModelConfig, read_field
from gatedpo_mega.errors import UserError
from gatedpo_mega.families import SHAPE_FIELDS, differences, saved_value
from gatedpo_mega.formats import MCORE_META, module_states_file
from gatedpo_mega.hub import hub_id, resolve_model
from gatedpo_mega.megatron.model import expert_offset
from gatedpo_mega.megatron.parallel import Layout
from gatedpo_mega.training.checkpoint import RESUME_FIELDS, CheckpointError, read_meta, resolve_checkpoint

# Besides the shapes, a source fixes the function its weights compute: their norm epsilon, rotary base and routing.
FUNCTION_FIELDS = ("norm_epsilon", "rotary_base", "moe_router_topk", "moe_norm_topk_prob")
HF_FIELDS = (*SHAPE_FIELDS, *FUNCTION_FIELDS)


def source_kind(path: Path) -> str:
    """``checkpoint`` | ``mcore`` | ``hf``, from the marker file the folder holds."""
    try:
        exists = path.exists()
    except OSError as e:  # a name too long for the filesystem, a path through a file
        raise UserError(f"model.init_from={str(path)[:200]}: {e.strerror}") from None
    if not exists:
        raise UserError(f"model.init_from={path} does not exist")
    if (path / MCORE_META).is_file():
        return "mcore"
    if (path / "config.json").is_file():
        return "hf"
    resolve_checkpoint(path)  # raises with the reason when it is not one
    return "checkpoint"


@dataclass(frozen=True, slots=True)
class InitSource:
    """What ``model.init_from`` holds, from its metadata (no tensor read)."""

    kind: str  # checkpoint | mcore | hf
    path: Path  # the folder the weights come from (a run folder's latest checkpoint, for a run folder)
    vocab_size: int  # the true vocabulary
    meta: dict[str, Any]  # gatedpo_mcore.json, a checkpoint's meta.json, or a Hugging Face config.json

    @property
    def hf_config(self) -> dict[str, Any] | None:
        """The Hugging Face ``config.json`` behind the weights, when there is one."""
        return self.meta if self.kind == "hf" else self.meta.get("hf_config")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"model.init_from: {path} is unreadable ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"model.init_from: {path} is not a JSON object")
    return value


def read_source(path_text: str) -> InitSource:
    """The metadata of ``model.init_from``; a missing or unreadable source is one ``UserError``."""
    path = Path(path_text)
    kind = source_kind(path)
    if kind == "hf":
        meta = _read_json(path / "config.json")
        vocab = meta.get("vocab_size")
        if not isinstance(vocab, int):
            raise UserError(f"model.init_from: {path / 'config.json'} has no integer vocab_size")
        return InitSource(kind, path, vocab, meta)
    if kind == "mcore":
        from gatedpo_mega.convert.mcore import read_mcore_meta

        meta = read_mcore_meta(path)
        return InitSource(kind, path, int(meta["vocab_size"]), meta)
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    return InitSource(kind, path, int(meta["vocab_size"]), meta)


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def _mismatch(what: str, theirs: Any, mine: Any, whose: str = "config") -> str:
    return f"{what} {_show(theirs)} (source) vs {_show(mine)} ({whose})"


def _disagrees(where: Any, found: list[str]) -> UserError:
    return UserError(f"model.init_from={where} disagrees with the config: " + "; ".join(found))


def source_mismatches(cfg: Config, src: InitSource, vocab_size: int) -> list[str]:
    """Every way ``src`` disagrees with the config (none: it fits), each as ``what A (source) vs B (config)``."""
    if cfg.model.backend != "megatron":
        return []  # the transformers backend builds its model from the folder itself
    fields: tuple[str, ...]
    if src.kind == "hf":
        from gatedpo_mega.convert import hf_model_config

        saved, fields = asdict(hf_model_config(src.meta, where=str(src.path / "config.json"))[0]), HF_FIELDS
    elif src.kind == "mcore":
        saved, fields = src.meta["model"], SHAPE_FIELDS
    else:  # a checkpoint's module weights also depend on the padded vocabulary, their dtype and backend
        saved, fields = src.meta["model"], RESUME_FIELDS
    out = [
        _mismatch(f"model.{key}", theirs, mine)
        for key, theirs, mine in differences(saved, asdict(cfg.model), fields)
    ]
    if src.vocab_size != vocab_size:
        out.append(_mismatch("vocabulary", src.vocab_size, vocab_size, "this run"))
    if src.kind == "mcore":
        from gatedpo_mega.megatron.model import padded_vocab_size

        tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
        theirs = (src.meta["tensor"], src.meta["pipeline"])
        padded = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, tp)
        if theirs != (tp, pp):
            out.append(
                f"parallel.tensor x pipeline {theirs[0]} x {theirs[1]} (source) vs {tp} x {pp} (config; "
                f"gatedpo convert reshard --src {src.path} --dst DIR --tensor {tp} --pipeline {pp} re-cuts it)"
            )
        elif src.vocab_size == vocab_size and src.meta["padded_vocab_size"] != padded:
            out.append(
                f"padded vocabulary {src.meta['padded_vocab_size']} (source) vs {padded} (config: "
                f"model.make_vocab_size_divisible_by={cfg.model.make_vocab_size_divisible_by})"
            )
    return out


def check_source_fits(cfg: Config, src: InitSource, vocab_size: int) -> None:
    """One ``UserError`` naming every mismatch between ``model.init_from`` and the config."""
    found = source_mismatches(cfg, src, vocab_size)
    if found:
        raise _disagrees(src.path, found)


def source_fields(src: InitSource) -> dict[str, Any]:
    """What ``src`` says of the ``ModelConfig`` fields its weights fix: the shapes, the function they compute (an mcore
    folder's or checkpoint's when its saved model config has them), ``max_position_embeddings`` (where known) and,
    for an mcore folder or a checkpoint, whose embedding is padded already, ``make_vocab_size_divisible_by``."""
    if src.kind == "hf":
        from gatedpo_mega.convert import hf_model_config

        model = asdict(hf_model_config(src.meta, where=str(src.path / "config.json"))[0])
        return {k: model[k] for k in (*HF_FIELDS, "max_position_embeddings")}
    saved = src.meta["model"]
    out = {k: saved_value(saved, k) for k in SHAPE_FIELDS}
    extra = (*FUNCTION_FIELDS, "max_position_embeddings", "make_vocab_size_divisible_by")
    return out | {k: saved[k] for k in extra if k in saved}


def adopt_source_shapes(tree: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``tree`` (what the user wrote: ``load_tree``) with the model fields ``model.init_from`` fixes taken from it, and
    a line for each written value it replaced.

    - The fields its weights fix (``source_fields``): filled in where not written; every written one that disagrees
      (and a written ``model.vocab_size``) is named in one ``UserError``.
    - ``max_position_embeddings``: filled in where not written (a limit, not a shape: a written one is kept).
    - An mcore folder's or checkpoint's ``make_vocab_size_divisible_by`` replaces the written one: a run from those
      weights cannot pad them again (the config's applies to a model initialised here, and to a Hugging Face folder,
      padded on the way in).

    A Hub id is read from its ``config.json`` in the cache (``launch`` fetches the weights for the ranks)."""
    model = tree.get("model")
    if not isinstance(model, dict) or not isinstance(text := model.get("init_from"), str) or not text:
        return tree, []  # a value of the wrong type is refused when the config is built
    if model.get("backend", "megatron") != "megatron":
        return tree, []  # the transformers backend builds its model from the folder itself
    ident = hub_id(text)
    src = read_source(str(resolve_model(ident, ["config.json"])) if ident else text)
    fixed = source_fields(src)
    limit = fixed.pop("max_position_embeddings", None)
    padding = fixed.pop("make_vocab_size_divisible_by", None)
    keys = (*fixed, "vocab_size", "max_position_embeddings", "make_vocab_size_divisible_by")
    written = {k: read_field(ModelConfig, "model", k, model[k]) for k in keys if k in model}
    found = [_mismatch(f"model.{k}", v, written[k]) for k, v in fixed.items() if written.get(k, v) != v]
    if written.get("vocab_size", 0) not in (0, src.vocab_size):
        found.append(_mismatch("model.vocab_size", src.vocab_size, written["vocab_size"]))
    if found:
        raise _disagrees(ident or src.path, found)
    adopted, notes = dict(fixed), []
    if limit is not None and "max_position_embeddings" not in written:
        adopted["max_position_embeddings"] = limit
    if padding is not None:
        mine = written.get("make_vocab_size_divisible_by", padding)
        if mine != padding:
            notes.append(
                f"model.make_vocab_size_divisible_by {padding} from model.init_from, whose embedding is padded "
                f"already (the config's {mine} applies to models initialised here)"
            )
        adopted["make_vocab_size_divisible_by"] = padding
    return {**tree, "model": {**model, **adopted}}, notes


def adopt_adapter_fields(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with ``model.lora``'s rank, alpha and target_modules read from ``model.init_adapter``'s
    ``adapter_config.json`` (``convert.peft.read_adapter_config``: what is not plain LoRA is refused) where not
    written; every written one that disagrees is named in one ``UserError``."""
    model = tree.get("model")
    if not isinstance(model, dict) or not isinstance(folder := model.get("init_adapter"), str) or not folder:
        return tree
    lora = model.get("lora", {})
    if not isinstance(lora, dict):
        return tree  # refused when the config is built
    from gatedpo_mega.config import LoraConfig
    from gatedpo_mega.convert.peft import lora_mismatches, read_adapter_config

    fields = read_adapter_config(folder)
    written = {k: read_field(LoraConfig, "model.lora", k, v) for k, v in lora.items() if k in fields}
    try:  # the written values as the config spells them (all-linear: the seven names)
        mine = LoraConfig(**{**fields, **written})
    except ValueError as e:
        raise UserError(str(e)) from None
    found = lora_mismatches(fields, mine)
    if found:
        raise UserError(f"model.init_adapter={folder} disagrees with the config: " + "; ".join(found))
    return {**tree, "model": {**model, "lora": {**lora, **fields}}}


def source_identity(path_text: str) -> str:
    """A short hash of what the initial weights are (names, sizes and times of the files): the reference
    log-probs cached for one source are never read for another."""
    if not path_text:
        return ""
    path = Path(path_text)
    if source_kind(path) == "checkpoint":
        path = resolve_checkpoint(path)
    return files_identity(path)


def files_identity(path: Path) -> str:
    """A short hash of a folder's file names, sizes and modification times (and its resolved path)."""
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def source_vocab_size(path_text: str) -> int:
    """The true vocabulary size of ``model.init_from`` (0 when there is none)."""
    return read_source(path_text).vocab_size if path_text else 0


def source_hf_config(path_text: str) -> dict[str, Any] | None:
    """The Hugging Face ``config.json`` behind ``model.init_from``, when there is one (None otherwise)."""
    return read_source(path_text).hf_config if path_text else None


def _parameters_only(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def load_checkpoint_weights(
    model: torch.nn.Module, src: InitSource, cfg: Config, layout: Layout, vocab: int
) -> None:
    """This rank's weights from a training checkpoint: its module weights when it was written at this tensor x
    pipeline layout (any data-parallel size, ZeRO 0-2); otherwise (another layout, or ZeRO-3 partitions) resharded
    on the way in from the fp32 master weights, reading only the tensors this rank keeps."""
    path = src.path
    theirs = src.meta["layout"]  # only the weights are read: the layout may differ (checked by shape below)
    where = f"model.init_from={path}"
    if int(theirs.get("expert", 1)) > 1 or layout.ep > 1:
        raise CheckpointError(
            f"{where}: a training checkpoint with experts split over ranks (parallel.expert > 1), or this run's, is "
            "not read as initial weights: export it (gatedpo convert zero-to-hf) and start from that folder"
        )
    if (theirs["tensor"], theirs["pipeline"]) == (layout.tp, layout.pp) and theirs["zero_stage"] < 3:
        f = module_states_file(path, layout.pp_rank * layout.tp + layout.tp_rank, theirs["zero_stage"])
        if not f.is_file():
            raise CheckpointError(f"{where}: {f.relative_to(path)} is missing")
        state = torch.load(f, map_location="cpu", weights_only=False)["module"]
        copy_weights(model, _parameters_only(state), where)
        return
    from gatedpo_mega.convert import hf_to_mcore_state
    from gatedpo_mega.convert.mapping import HFView
    from gatedpo_mega.convert.train_checkpoint import TrainCheckpoint

    ckpt = TrainCheckpoint(path)
    view = HFView(ckpt.get, ckpt.cfg, vocab_size=vocab, tensor=ckpt.tensor, pipeline=ckpt.pipeline)
    local = hf_to_mcore_state(
        view, cfg.model, vocab_size=vocab, tensor=layout.tp, pipeline=layout.pp, tp_rank=layout.tp_rank,
        pp_rank=layout.pp_rank,
    )  # fmt: skip
    copy_weights(model, local, where)
    ckpt.release()


def copy_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into ``model``'s parameters, refusing a missing, extra or mis-shaped tensor by name."""
    params = _parameters_only(dict(model.state_dict()))
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(f"{where}: {what} ({len(missing)} missing, {len(extra)} unexpected tensors)")
    with torch.no_grad():
        for name, target in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{where}: {name} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))


def load_initial_weights(model: torch.nn.Module, cfg: Config, layout: Layout, vocab_size: int) -> None:
    src = read_source(cfg.model.init_from)
    check_source_fits(cfg, src, vocab_size)  # as launch() did before any process started
    if src.kind == "checkpoint":
        load_checkpoint_weights(model, src, cfg, layout, vocab_size)
        return
    from gatedpo_mega import convert
    from gatedpo_mega.convert.folders import HFFolder

    if src.kind == "mcore":
        convert.load_mcore_weights(
            model, src.path, cfg=cfg.model, vocab_size=vocab_size, tp_rank=layout.tp_rank, tp=layout.tp,
            pp_rank=layout.pp_rank, pp=layout.pp, expert_offset=expert_offset(cfg.model, layout.ep_rank, layout.ep),
        )  # fmt: skip
        return
    state = HFFolder(src.path)  # lazy: this rank reads only the tensors it keeps (its own experts)
    local = convert.hf_to_mcore_state(
        state, cfg.model, vocab_size=vocab_size, tensor=layout.tp, pipeline=layout.pp, tp_rank=layout.tp_rank,
        pp_rank=layout.pp_rank, expert=layout.ep, ep_rank=layout.ep_rank,
    )  # fmt: skip
    copy_weights(model, local, f"model.init_from={src.path}")
