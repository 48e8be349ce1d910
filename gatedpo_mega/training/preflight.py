"""What a run reads, checked in the launching process before any worker or process group starts.

First the config itself: ``load_run_config`` builds it from the user's files with the model fields that
``model.init_from`` fixes read from the source (``adopt_source_shapes``), and ``model.lora``'s from a PEFT adapter in
``model.init_adapter`` (``adopt_adapter_fields``), so that the user writes none of them and a written one that
disagrees is refused in one line before anything else is read.

Each check is the one the ranks run later, called early: the data pipeline itself (every record of the training data
and of each ``data.eval_sets`` set read and validated, tokenized into the cache the ranks then read), the packages of the ``train.report_to`` trackers, the tokenizer (trained here first when the config asks for it), and ``model.init_from`` against the config (every
mismatch in one message). A refusal is one ``UserError`` line, seconds after launch, with no peer to stop.

Before those, ``resolve_hub_ids`` turns Hugging Face Hub ids in ``model.init_from``, ``data.source`` and
``data.eval_sets`` into their
folders in the local Hugging Face cache (downloading what is missing), once, so that every rank reads the same
local files and none asks the Hub.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from gatedpo_mega.config import Config, ConfigPaths, build_config, load_tree
from gatedpo_mega.data import load_preference_data
from gatedpo_mega.data.pipeline import ensure_tokenizer, load_eval_set
from gatedpo_mega.data.sources import hub_dataset
from gatedpo_mega.hub import hub_id, resolve_model
from gatedpo_mega.training.data import run_vocab_size
from gatedpo_mega.training.initial_weights import (
    adopt_adapter_fields,
    adopt_source_shapes,
    check_source_fits,
    read_source,
)
from gatedpo_mega.training.reporters import check_installed


def load_run_config(paths: ConfigPaths, overrides: Sequence[str] = ()) -> tuple[Config, list[str]]:
    """A run's config from the user's YAML files and ``key=value`` overrides, the fields ``model.init_from`` fixes
    read from the source and ``model.lora``'s from ``model.init_adapter``; and the lines to show about written values
    the source replaced."""
    tree, notes = adopt_source_shapes(load_tree(paths, overrides))
    return build_config(adopt_adapter_fields(tree)), notes


def preflight(cfg: Config, *, data: bool = True) -> None:
    """Raise the first problem with ``cfg``'s inputs. ``data=False`` when the run's data does not come from the
    pipeline (a ``make_data`` of its own)."""
    check_installed(cfg.train.report_to)  # the cheapest first: a missing package, before the data is read
    vocab = None
    if data:
        ensure_tokenizer(cfg.data, seed=cfg.train.seed)
        tokenizer = load_preference_data(cfg.data, seed=cfg.train.seed).tokenizer
        for name in cfg.data.eval_sets:  # each read, validated and tokenized into the cache as well
            load_eval_set(cfg.data, name, seed=cfg.train.seed)
        vocab = run_vocab_size(cfg, tokenizer.vocab_size)
    if cfg.model.init_from:
        src = read_source(cfg.model.init_from)
        check_source_fits(cfg, src, vocab if vocab is not None else cfg.model.vocab_size or src.vocab_size)
    if cfg.model.init_adapter:
        from gatedpo_mega.convert.peft import check_adapter

        # its LoRA config, and every tensor's shape where the config holds the model's (the megatron backend)
        check_adapter(cfg.model, tensors=cfg.model.backend == "megatron")


def resolve_hub_ids(cfg: Config, *, data: bool = True) -> tuple[Config, list[str]]:
    """``cfg`` with each Hub id of ``model.init_from``, ``data.source`` and ``data.eval_sets`` (``data=False``: not
    read) replaced by its
    folder in the Hugging Face cache, and one line per id saying so. The folder names the repository and the commit
    (``.../models--org--name/snapshots/<commit>``): the saved config.yaml reruns the same files, offline too."""
    model, data_cfg, notes = cfg.model, cfg.data, []
    if model.init_from and (ident := hub_id(model.init_from)):
        folder = resolve_model(ident)
        model = replace(model, init_from=str(folder))
        notes.append(f"model.init_from {ident}: {folder}")
    if data and data_cfg.source != "builtin" and hub_id(data_cfg.source):
        folder = hub_dataset(data_cfg.source)
        notes.append(f"data.source {data_cfg.source}: {folder}")
        data_cfg = replace(data_cfg, source=str(folder))
    if data:
        sets = dict(data_cfg.eval_sets)
        for name, spec in sets.items():
            if hub_id(spec.source):
                folder = hub_dataset(spec.source)
                notes.append(f"data.eval_sets.{name} {spec.source}: {folder}")
                sets[name] = replace(spec, source=str(folder))
        data_cfg = replace(data_cfg, eval_sets=sets)
    return replace(cfg, model=model, data=data_cfg), notes
