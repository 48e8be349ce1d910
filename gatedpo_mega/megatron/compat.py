"""The one place that knows how the supported megatron-core releases (0.16.1 through 0.19.x) differ.

Each difference is detected by the feature itself (a dataclass field, a logger's message), never by a version
number, so a release in between behaves as the API it actually has. What differs between 0.16.1 and 0.19.x for
the parts used here:

- ``TransformerConfig.cuda_graph_scope`` was renamed ``cuda_graph_modules`` (0.19 still takes the old name, with a
  ``DeprecationWarning``); both mean "capture the whole layer" as ``[]``, and no CUDA graph is captured here.
- ``GPTModel.__init__`` logs, on every build, that ``GPTModel`` is frozen in favour of ``HybridModel``. It is
  still megatron-core's model for this dense Llama-family decoder (same modules, same parameter names, which
  the checkpoint formats and the conversions rely on), so that line is not shown.
- The ``MLP requires ffn_hidden_size`` warning moved from ``transformer/spec_utils.py`` to ``transformer/mlp.py``:
  ``gatedpo_mega.environment`` matches it in either module.

Everything else this package calls (the local layer spec and its ``core_attention`` slot, ``DotProductAttention``'s
constructor and forward, ``GPTModel``'s constructor and its ``output_layer(hidden, weight=...)`` call,
``PackedSeqParams``, the pipeline schedules, ``parallel_state``, and the RNG-tracker internals the CPU shim
replaces) has the same signature and behaviour in both.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

GPT_MODEL_LOGGER = "megatron.core.models.gpt.gpt_model"
GPT_MODEL_DEPRECATED = "GPTModel IS DEPRECATED"


def whole_layer_cuda_graphs(config_class: type) -> dict[str, Any]:
    """The ``TransformerConfig`` argument that leaves CUDA graphs at the whole layer (none are captured): the
    default, "full", is deprecated in every supported release. 0.16: ``cuda_graph_scope``; 0.19: renamed
    ``cuda_graph_modules``."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return {"cuda_graph_modules": []} if "cuda_graph_modules" in names else {"cuda_graph_scope": []}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_GPT_MODEL_FILTER = _DropMessage(GPT_MODEL_DEPRECATED)


def gpt_model(**kwargs: Any) -> Any:  # -> GPTModel
    """``GPTModel(**kwargs)``, without the deprecation line newer releases log on each construction."""
    from megatron.core.models.gpt import GPTModel

    logger = logging.getLogger(GPT_MODEL_LOGGER)
    logger.addFilter(_GPT_MODEL_FILTER)  # idempotent: a logger holds each filter once
    return GPTModel(**kwargs)


def moe_without_transformer_engine() -> None:
    """megatron-core 0.16.1's router computes its logits with Transformer Engine's GEMM where ``moe_utils`` imported
    it, and otherwise refers to a name its failed import never bound (``te_general_gemm``): bind it to None, which
    its own code reads as "use torch's matmul". Releases that bind it already are left alone. Idempotent."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # type: ignore[attr-defined]
