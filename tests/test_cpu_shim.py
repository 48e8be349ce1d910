"""The CPU shim for megatron-core: installed only without CUDA, and each patched spot behaves."""

import pytest
import torch

from gatedpo_mega.megatron.cpu_shim import CpuRNGStatesTracker, apply_cpu_shim

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the shim is only applied on hosts without CUDA"
)


def test_shim_installs_and_maps_cuda_spots_to_the_cpu():
    assert apply_cpu_shim() is True
    assert apply_cpu_shim() is True  # idempotent
    from megatron.core.pipeline_parallel import schedules

    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert t.device.type == "cpu"
    assert torch.cuda.current_device() == "cpu"
    x = torch.ones(2)
    assert x.cuda() is x


def test_rng_tracker_forks_named_cpu_states():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before)  # the outer stream is untouched
    with tracker.fork():
        b = torch.rand(3)
    assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(123)))
    assert not torch.equal(a, b)  # the named stream advances
    with pytest.raises(RuntimeError, match="already exists"):
        tracker.add("model-parallel-rng", 5)
    with pytest.raises(RuntimeError, match="is not added"), tracker.fork("nope"):
        pass
