"""What every ``gatedpo`` process sets up before the libraries it drives start: the environment DeepSpeed reads
when it is first imported, and which of megatron-core's, DeepSpeed's and torch's known-harmless messages are not
shown. Called first thing by the command and by each worker process it starts."""

from __future__ import annotations

import contextlib
import importlib.abc
import io
import os
import re
import sys
import warnings
from collections.abc import Iterator, MutableMapping
from typing import Any

# (message regex, category, module regex, why it is harmless here). Each matches one upstream message where it is
# raised (``module`` is the module the warning is attributed to), so the same text from elsewhere still shows.
KNOWN_WARNINGS: list[tuple[str, type[Warning], str, str]] = [
    (
        r"(Transformer Engine and )?Apex (is|are) not installed",
        UserWarning,
        r"megatron\.core\.",
        "optional fused kernels; the torch implementations megatron-core falls back to are the ones used here",
    ),
    (
        r"Warning: tp_group is None, using default tp group",
        DeprecationWarning,
        r"megatron\.core\.tensor_parallel\.layers",
        "RowParallelLinear.forward itself passes tp_group=None to its matmul, which uses no group there",
    ),
    (
        r"The following imports from `dynamic_context\.py` will be removed",
        DeprecationWarning,
        r"megatron\.core\.inference\.contexts",
        "megatron-core's own import layout; the inference contexts are not used",
    ),
    (
        r"The 'megatron\.core\.transformer\.custom_layers\.transformer_engine'\s+module is deprecated",
        DeprecationWarning,
        r"megatron\.core\.transformer\.multi_latent_attention",
        "megatron-core importing its own deprecated module; Transformer Engine is not used",
    ),
    (
        r"MLP requires ffn_hidden_size, but it was not provided",
        DeprecationWarning,
        r"megatron\.core\.transformer\.(spec_utils|mlp)",  # raised in spec_utils up to 0.16, in mlp from 0.19
        "the local layer spec builds its MLP from config.ffn_hidden_size, which is model.ffn_hidden_size",
    ),
    (
        r"`torch\.jit\.script_method` is deprecated",
        DeprecationWarning,
        r"torch\.jit\._script",
        "raised while megatron-core's modules are imported; nothing here is scripted",
    ),
    (
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        FutureWarning,
        r"torch\.distributed\.c10d_logger",  # raised through torch's own logging wrapper of the collective
        "DeepSpeed's ZeRO gathers call it; it works as before in the pinned torch",
    ),
]
# Only where there is no CUDA device: on a GPU the advice applies.
CPU_ONLY_WARNINGS: list[tuple[str, type[Warning], str, str]] = [
    (
        r"When using async grad allreduce it is recommended to set the environment variable "
        r"CUDA_DEVICE_MAX_CONNECTIONS",
        UserWarning,
        r"megatron\.core\.tensor_parallel\.layers",
        "a CUDA stream setting; there are no CUDA streams on the CPU",
    ),
]
# DeepSpeed prints this (``print``, not its logger) each time a process loads its JIT-built shared-memory op.
BUILT_OP = re.compile(r"^DeepSpeed \S+ built successfully$")


def _sees_cuda() -> bool:
    import torch  # not deepspeed: its accelerator is chosen on import, from the variables set here

    return bool(torch.cuda.is_available())


def _writable_prefix() -> str | None:
    return sys.prefix if os.access(sys.prefix, os.W_OK) else None


def set_defaults(
    environ: MutableMapping[str, str], *, cuda: bool | None = None, prefix: str | None = ""
) -> dict[str, str]:
    """Set in ``environ`` what DeepSpeed needs and the user left unset; returns what was set.

    ``DS_ACCELERATOR=cpu`` where torch sees no CUDA device (``cuda``; detected when None): without it DeepSpeed
    warns on every rank that it fell back to the CPU. ``TORCH_EXTENSIONS_DIR=<prefix>/torch_extensions``, where
    ``prefix`` is the Python environment (``""``: ``sys.prefix`` if writable; None: leave torch's default, the
    home folder): DeepSpeed's CPU ops are built once per environment, as ``tools/bootstrap.sh`` sets it."""
    wanted: dict[str, str] = {}
    if "DS_ACCELERATOR" not in environ and not (_sees_cuda() if cuda is None else cuda):
        wanted["DS_ACCELERATOR"] = "cpu"
    if prefix == "":
        prefix = _writable_prefix()
    if "TORCH_EXTENSIONS_DIR" not in environ and prefix is not None:
        wanted["TORCH_EXTENSIONS_DIR"] = os.path.join(prefix, "torch_extensions")
    environ.update(wanted)
    return wanted


def quiet_known_warnings(*, cuda: bool | None = None) -> None:
    """Hide the warnings of ``KNOWN_WARNINGS`` (and, without a CUDA device, ``CPU_ONLY_WARNINGS``), each by its
    message and the module that raises it; every other warning shows as before."""
    known = KNOWN_WARNINGS + ([] if (_sees_cuda() if cuda is None else cuda) else CPU_ONLY_WARNINGS)
    for message, category, module, _why in known:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextlib.contextmanager
def quiet_deepspeed_start() -> Iterator[None]:
    """Around ``deepspeed.initialize``: its ``... built successfully`` print is not shown; anything else it prints,
    and its log (warnings and errors: DeepSpeed's logger is at WARNING), is."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept = [
            line for line in buffer.getvalue().splitlines(keepends=True) if not BUILT_OP.match(line.strip())
        ]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()


# megatron-core and DeepSpeed import these trackers at import time, when installed, for features this project does
# not use (megatron-core's inference logging and timers, DeepSpeed's autotuner): 2.3 s of every process's start.
# To them the trackers look absent (each import is guarded); everyone else, the ``train.report_to`` reporters
# included, imports them as usual.
UNUSED_BY_LIBRARIES = {"mlflow": ("deepspeed", "megatron"), "wandb": ("deepspeed", "megatron")}


class _HiddenFromLibraries(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that answers "no such module" for ``UNUSED_BY_LIBRARIES``'s packages when the
    import comes from a module of the libraries named for it, and lets every other import through."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        libraries = UNUSED_BY_LIBRARIES.get(fullname.partition(".")[0])
        if libraries is None:
            return None
        frame: Any = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(
            ("importlib", "_frozen_importlib")
        ):
            frame = frame.f_back
        importer = frame.f_globals.get("__name__", "") if frame is not None else ""
        if importer.partition(".")[0] in libraries:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def hide_unused_trackers() -> None:
    """Install the finder once (``import gatedpo_mega`` does)."""
    if not any(isinstance(f, _HiddenFromLibraries) for f in sys.meta_path):
        sys.meta_path.insert(0, _HiddenFromLibraries())
