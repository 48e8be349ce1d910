"""The test pool (tests/distributed.py): each run gets what a fresh set of processes would have, and a failure
anywhere is reported with its traceback and leaves the next run unharmed."""

import os
from pathlib import Path

import pytest
from distributed import gatedpo, run_distributed

pytestmark = [pytest.mark.multiprocess]


def _dirty_the_state(rank, world, out):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gatedpo_mega.megatron.parallel import initialize_layout

    initialize_layout(1, world)  # megatron-core's groups, as a training run leaves them
    assert ps.model_parallel_is_initialized()
    os.environ["LEFT_BEHIND"] = "1"
    dist.all_reduce(__import__("torch").ones(1))
    Path(out, f"pid{rank}").write_text(str(os.getpid()))


def _check_fresh(rank, world, out, expected_env):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    assert not ps.model_parallel_is_initialized()  # the last run's groups are gone
    assert "LEFT_BEHIND" not in os.environ and os.environ["POOL_TEST"] == expected_env
    assert os.environ["RANK"] == str(rank) and os.environ["WORLD_SIZE"] == str(world)
    assert Path.cwd() == Path(out)
    assert torch.initial_seed() == torch.default_generator.initial_seed()
    assert dist.get_world_size() == world
    Path(out, f"again{rank}").write_text(str(os.getpid()))
    print(f"rank {rank} says hello")


def _fail_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("rank one is broken")


def test_each_run_starts_clean_in_the_same_processes(tmp_path, monkeypatch, capfd):
    run_distributed(_dirty_the_state, 2, str(tmp_path))
    monkeypatch.setenv("POOL_TEST", "value")
    monkeypatch.chdir(tmp_path)
    run_distributed(_check_fresh, 2, str(tmp_path), "value")
    for r in range(2):  # the same processes: imports paid once
        assert (tmp_path / f"pid{r}").read_text() == (tmp_path / f"again{r}").read_text()
    assert "rank 1 says hello" in capfd.readouterr().out


def test_a_failing_rank_is_named_with_its_traceback_and_the_next_run_works(tmp_path):
    with pytest.raises(AssertionError, match=r"(?s)rank 1:.*ValueError: rank one is broken"):
        run_distributed(_fail_on_rank_one, 2)
    run_distributed(_dirty_the_state, 2, str(tmp_path))  # new processes, the same contract


def test_a_command_under_the_pool_reports_its_exit_code_and_output(tmp_path):
    done = gatedpo(2, "train", "--config", str(tmp_path / "absent.yaml"))
    assert done.returncode == 2
    assert done.stderr.count("gatedpo: error:") == 1 and "absent.yaml" in done.stderr
