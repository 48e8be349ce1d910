"""SLURM's variables read as torch's: host lists, tasks per node, what is kept, what is refused."""

import pytest

from gatedpo_mega.errors import UserError
from gatedpo_mega.training.cluster import ClusterEnvError, expand_counts, expand_hostlist, launcher_env


def srun_env(**changes: str | None) -> dict[str, str]:
    """What srun sets for task 5 of 8 on the second of two nodes (`srun -N 2 -n 8`), changed by ``changes``
    (None: removed)."""
    env = {
        "SLURM_JOB_ID": "123456", "SLURM_JOBID": "123456", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
        "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NPROCS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURMD_NODENAME": "gpu08", "PATH": "/usr/bin",
    }  # fmt: skip
    for k, v in changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("n[8-10]", ["n8", "n9", "n10"]),  # no padding: the width of the first bound
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("gpu-a100-[1-2].cluster", ["gpu-a100-1.cluster", "gpu-a100-2.cluster"]),
        ("x[5]", ["x5"]),
    ],
)
def test_hostlist_forms(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("node[01-03", "'[' without ']'"),
        ("node01]", "']' without '['"),
        ("node[03-01]", "range '03-01' runs backwards"),
        ("node[a-c]", "'a-c' is not a number or a range"),
        ("node[]", "'' is not a number or a range"),
        ("a,,b", "'' is not a host name"),
        ("n[[1]]", "nested '['"),
    ],
)
def test_hostlist_errors(text, why):
    with pytest.raises(ValueError) as e:
        expand_hostlist(text)
    assert str(e.value) == why


@pytest.mark.parametrize(
    ("text", "counts"), [("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("8(x2)", [8, 8]), ("1,3,2", [1, 3, 2])]
)
def test_tasks_per_node_forms(text, counts):
    assert expand_counts(text) == counts


@pytest.mark.parametrize("text", ["", "2x3", "2(3)", "(x2)", "two"])
def test_tasks_per_node_errors(text):
    with pytest.raises(ValueError, match="is neither N nor N"):
        expand_counts(text)


def test_a_task_of_srun_gets_torch_variables():
    assert launcher_env(srun_env()) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }  # fmt: skip


def test_uneven_tasks_per_node_are_read_for_this_node():
    # `srun -n 7` over 4 nodes: 2, 2, 2, 1 tasks; the last node's only task is rank 6.
    env = srun_env(
        SLURM_PROCID="6", SLURM_NTASKS="7", SLURM_LOCALID="0", SLURM_NODEID="3",
        SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_STEP_NODELIST="node[01-03,07]",
    )  # fmt: skip
    got = launcher_env(env)
    assert (got["RANK"], got["WORLD_SIZE"], got["LOCAL_WORLD_SIZE"], got["MASTER_ADDR"]) == (
        "6",
        "7",
        "1",
        "node01",
    )


def test_which_variables_are_read_first():
    # The step's own node list and tasks per node win over the job's (a step may use part of the allocation).
    env = srun_env(
        SLURM_STEP_NODELIST="gpu08", SLURM_STEP_TASKS_PER_NODE="3", SLURM_NODEID="0", SLURM_LOCALID="2"
    )
    assert (launcher_env(env)["MASTER_ADDR"], launcher_env(env)["LOCAL_WORLD_SIZE"]) == ("gpu08", "3")
    # Without the step's: --ntasks-per-node (one number for every node), then the job's.
    env = srun_env(SLURM_STEP_NODELIST=None, SLURM_STEP_TASKS_PER_NODE=None, SLURM_NTASKS_PER_NODE="4")
    assert (launcher_env(env)["MASTER_ADDR"], launcher_env(env)["LOCAL_WORLD_SIZE"]) == ("gpu07", "4")
    env = srun_env(SLURM_STEP_NODELIST=None, SLURM_JOB_NODELIST=None, SLURM_STEP_TASKS_PER_NODE=None)
    assert (launcher_env(env)["MASTER_ADDR"], launcher_env(env)["LOCAL_WORLD_SIZE"]) == ("gpu07", "4")
    env = srun_env(SLURM_JOB_ID=None)
    assert launcher_env(env)["MASTER_PORT"] == str(20000 + 123456 % 20000)  # from SLURM_JOBID


def test_variables_already_set_are_kept():
    assert "MASTER_PORT" not in launcher_env(srun_env(MASTER_PORT="29500"))
    got = launcher_env(srun_env(MASTER_ADDR="10.0.0.1", RANK="5"))
    assert "MASTER_ADDR" not in got and "RANK" not in got and got["WORLD_SIZE"] == "8"
    # torchrun under srun (one per node) has set all of torch's variables for its workers: nothing is mapped.
    assert launcher_env(srun_env(RANK="3", WORLD_SIZE="16", LOCAL_RANK="3")) == {}


def test_outside_an_srun_step_of_several_tasks_nothing_is_mapped():
    assert launcher_env({"PATH": "/usr/bin"}) == {}
    # The batch script itself: SLURM_PROCID=0 and SLURM_NTASKS=N, but no step (`gatedpo train --nproc N` there).
    assert launcher_env(srun_env(SLURM_STEP_ID=None, SLURM_STEPID=None)) == {}
    # A step of one task (`srun --pty bash`, `srun -n 1 gatedpo train --nproc 4`): as outside SLURM.
    one = srun_env(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_NODEID="0")
    assert launcher_env(one) == {}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"SLURM_PROCID": "8"}, "SLURM_PROCID=8 is not below SLURM_NTASKS=8"),
        ({"SLURM_NTASKS": "eight"}, "SLURM_NTASKS='eight' is not a non-negative integer"),
        (
            {"SLURM_LOCALID": "4"},
            "SLURM_LOCALID=4 is not below this node's 4 task(s) (SLURM_STEP_TASKS_PER_NODE='4(x2)')",
        ),
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 but SLURM_STEP_TASKS_PER_NODE='4(x2)' lists 2 node(s)"),
        (
            {"SLURM_STEP_TASKS_PER_NODE": "4x2"},
            "SLURM_STEP_TASKS_PER_NODE='4x2' cannot be read: '4x2' is neither N nor N(xM)",
        ),
        (
            {"SLURM_STEP_NODELIST": "gpu[07-08"},
            "SLURM_STEP_NODELIST='gpu[07-08' is not a host list ('[' without ']')",
        ),
        (
            {"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None, "SLURM_NODELIST": None},
            "srun set none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST",
        ),
        (
            {"SLURM_JOB_ID": None, "SLURM_JOBID": None},
            "srun set no SLURM_JOB_ID to derive MASTER_PORT from: set MASTER_PORT",
        ),
    ],
)
def test_contradicting_values_are_refused_in_one_line(changes, message):
    with pytest.raises(ClusterEnvError) as e:
        launcher_env(srun_env(**changes))
    assert str(e.value) == message
    assert isinstance(e.value, UserError) and e.value.exit_code == 2


def test_launch_refuses_before_anything_starts(monkeypatch, tmp_path, capsys):
    from gatedpo_mega.cli import main

    for k, v in srun_env(SLURM_PROCID="9").items():
        monkeypatch.setenv(k, v)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert main(["train", f"train.output_dir={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "gatedpo: error: SLURM_PROCID=9 is not below SLURM_NTASKS=8"
    ]
    assert not (tmp_path / "out").exists()
