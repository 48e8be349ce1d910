"""Make megatron-core (0.16.1 to 0.19.x) run on a host without CUDA (CPU tensors, gloo groups).

megatron-core's tensor-parallel layers run on CPU as-is (``use_cpu_initialization=True``); a few places of the
model and the pipeline schedules assume CUDA:

- ``torch.cuda.current_device()`` as a device (rotary embeddings, p2p shape exchange): answers ``"cpu"``;
- ``device="cuda"`` in ``pipeline_parallel/schedules.py`` (token counters): that module sees a ``torch`` whose
  tensor factories map ``"cuda"`` to the CPU;
- ``pin_memory=True`` in ``rope_utils.get_pos_emb_on_this_cp_rank`` (context parallelism): that module sees the
  same ``torch``, which also drops ``pin_memory`` (there is no pinned allocator without an accelerator);
- ``Tensor.cuda()`` on tied embeddings under pipeline parallelism: the identity;
- ``torch.cuda.synchronize()`` in p2p communication: a no-op;
- the CUDA RNG tracker (``get_cuda_rng_tracker().fork()`` around dropout): a tracker of named CPU generator states;
- the CUDA generator state saved around recomputed forwards (``model.recompute``): nothing to save.

Everything else is megatron-core's own code path, so TP/PP results on CPU are the GPU code's results.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch

_applied = False


class CpuRNGStatesTracker:
    """Megatron's RNG tracker interface over named CPU generator states."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"RNG state {name!r} or seed {seed} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_device(kwargs: dict[str, Any]) -> dict[str, Any]:
    dev = kwargs.get("device")
    if dev is not None and torch.device(dev).type == "cuda":
        kwargs = {**kwargs, "device": "cpu"}
    if kwargs.get("pin_memory"):
        kwargs = {**kwargs, "pin_memory": False}
    return kwargs


class _TorchOnCpu(types.ModuleType):
    """``torch`` as seen by the schedules and rotary modules: tensor factories put ``device='cuda'`` on the CPU,
    unpinned."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in ("zeros", "ones", "empty", "full", "tensor"):
            return lambda *a, **k: attr(*a, **_cpu_device(k))
        return attr


class _Stream:
    """The one "stream" of a host without CUDA: work is already in order."""

    def wait_stream(self, other: Any) -> None:
        pass

    def record_event(self) -> _Stream:  # an event that has already happened
        return self

    def synchronize(self) -> None:
        pass


_STREAM = _Stream()


class _CudaStreamsOnCpu(types.ModuleType):
    """``torch.cuda`` as the MoE token dispatcher sees it: one stream, ``torch.cuda.stream`` a no-op."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    Stream = staticmethod(lambda *a, **k: _STREAM)
    current_stream = staticmethod(lambda *a, **k: _STREAM)
    stream = staticmethod(lambda *a, **k: contextlib.nullcontext())

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _host_splits(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """The dispatcher's device-to-host copy of its all-to-all split sizes: on a GPU they arrive as numpy arrays,
    which ``all_to_all_single`` takes as its ``list[int]`` splits; a CPU tensor it does not take."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.tolist()
    return tensor


class _TorchWithCpuStreams(_TorchOnCpu):
    def __getattr__(self, name: str) -> Any:
        if name == "cuda":
            return _CudaStreamsOnCpu()
        return super().__getattr__(name)


def apply_cpu_shim() -> bool:
    """Install the shim if CUDA is absent; returns whether it is (now) installed. Idempotent."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import token_dispatcher

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    schedules.torch = _TorchOnCpu()  # type: ignore[attr-defined]
    rope_utils.torch = _TorchOnCpu()  # type: ignore[attr-defined]
    token_dispatcher.torch = _TorchWithCpuStreams()  # type: ignore[attr-defined]
    token_dispatcher.maybe_move_tensor_to_cpu = _host_splits  # type: ignore[attr-defined]
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recomputation saves and restores "the CUDA generator" around each recomputed forward: there is
    # none (the CPU generator and the tracker's named states are saved beside it).
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)  # type: ignore[attr-defined]
    mrandom._set_cuda_rng_state = lambda *a, **k: None  # type: ignore[attr-defined]
    # model_parallel_cuda_manual_seed calls torch.cuda.manual_seed, a lazy no-op without CUDA.
    _applied = True
    return True
