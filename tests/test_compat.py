"""gatedpo_mega.megatron.compat: each megatron-core difference is handled by what the installed release has."""

import dataclasses
import logging
import warnings

from gatedpo_mega.megatron.compat import GPT_MODEL_LOGGER, _DropMessage, whole_layer_cuda_graphs


@dataclasses.dataclass
class _Scope016:
    cuda_graph_scope: list[str] | str = "full"


@dataclasses.dataclass
class _Modules019:
    cuda_graph_modules: list[str] | str = "full"
    cuda_graph_scope: list[str] | str | None = None  # the old name, still taken with a DeprecationWarning


def test_cuda_graph_argument_follows_the_field_the_release_has():
    assert whole_layer_cuda_graphs(_Scope016) == {"cuda_graph_scope": []}
    assert whole_layer_cuda_graphs(_Modules019) == {"cuda_graph_modules": []}


def test_the_installed_transformer_config_takes_it_without_a_deprecation():
    from megatron.core.transformer.transformer_config import TransformerConfig

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        TransformerConfig(
            num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
            **whole_layer_cuda_graphs(TransformerConfig),
        )  # fmt: skip
    assert not [w for w in seen if "cuda_graph" in str(w.message) or "full scope" in str(w.message)]


def test_only_the_gpt_model_deprecation_line_is_dropped(caplog):
    logger = logging.getLogger(GPT_MODEL_LOGGER + ".test")
    logger.addFilter(_DropMessage("GPTModel IS DEPRECATED"))
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
