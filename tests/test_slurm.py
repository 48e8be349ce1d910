"""Ranks started by SLURM give the numbers of ``gatedpo train --nproc 4``: four processes with the environment srun
sets (always), and under a real one-node cluster (``tools/slurm_local.sh``): ``srun -n 4``, and
``launcher/slurm.sbatch`` in both of its modes, the srun one preempted mid-run (its warning signal), requeued and
resumed."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from distributed import gatedpo

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"tokens_per_second", "real_tokens_per_second", "step_seconds", "memory/peak_mib_max_rank"}
WORLD = 4
STEPS = 6
TINY = {  # TP 2 x DP 2 on 4 ranks; a checkpoint every 2 steps, for the requeue
    "parallel": {"tensor": 2},
    "model": {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 64},
    "train": {"micro_batch_size": 2, "global_batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "reference_batch_size": 8,
              "max_steps": STEPS, "save_every": 2, "eval_every": 3},
    "data": {"builtin_pairs": 120, "max_length": 64, "max_prompt_length": 40, "eval_fraction": 0.2},
}  # fmt: skip
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _rows(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without any scheduler's or launcher's variables (the tests may run inside a SLURM job);
    this checkout's package first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in TORCH_VARS}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("DS_ACCELERATOR", "cpu")
    return {**env, **extra}


def _log_tail(*paths: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in paths if p.exists())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("slurm_runs")
    cfg = {**TINY, "data": {**TINY["data"], "cache_dir": str(work / "cache")}}
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return work


def _train_args(work: Path, out: Path) -> list[str]:
    return ["train", "--config", str(work / "tiny.yaml"), f"train.output_dir={out}"]


@pytest.fixture(scope="module")
def reference(work) -> list[dict]:
    """The same run on 4 processes of the test pool (the numbers every launch path must give)."""
    out = work / "nproc"
    proc = gatedpo(WORLD, *_train_args(work, out), env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))  # step 0: the evaluation before training
    return rows


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _host() -> str:
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
    except OSError:
        return "localhost"
    return name


def _srun_task_env(rank: int, job_id: int, host: str) -> dict[str, str]:
    """What srun sets for task ``rank`` of `srun -n 4` on one node (as Slurm 22.05 sets it), and nothing else of
    torch's: no RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT."""
    return {
        "SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_JOB_NAME": "gatedpo",
        "SLURM_JOB_NODELIST": host, "SLURM_NODELIST": host, "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
        "SLURM_JOB_CPUS_PER_NODE": str(WORLD), "SLURM_CPUS_ON_NODE": str(WORLD), "SLURM_TASKS_PER_NODE": str(WORLD),
        "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NODELIST": host, "SLURM_STEP_NUM_NODES": "1",
        "SLURM_STEP_NUM_TASKS": str(WORLD), "SLURM_STEP_TASKS_PER_NODE": str(WORLD), "SLURM_NTASKS": str(WORLD),
        "SLURM_NPROCS": str(WORLD), "SLURM_GTIDS": ",".join(map(str, range(WORLD))), "SLURMD_NODENAME": host,
        "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
    }  # fmt: skip


def test_four_processes_with_the_environment_srun_sets_give_the_nproc_metrics(work, reference):
    # A job id whose port (20000 + id % 20000, as gatedpo derives it) is free here.
    job_id = next(
        j for j in range(400_000 + os.getpid() % 10_000, 500_000) if _port_is_free(20000 + j % 20000)
    )
    out, host = work / "simulated", _host()
    logs = [work / f"simulated-{r}.log" for r in range(WORLD)]
    cmd = [sys.executable, "-m", "gatedpo_mega.cli", *_train_args(work, out)]
    procs = []
    for r, log in enumerate(logs):
        with log.open("w") as f:
            env = _clean_env(**_srun_task_env(r, job_id, host))
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * WORLD, _log_tail(*logs)
    assert _rows(out) == reference


# ---- A real one-node SLURM cluster -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """``tools/slurm_local.sh start`` in a folder of its own on free ports; the environment its clients need."""
    needed = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "scontrol")
    gone = [
        p for p in needed if shutil.which(p, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None
    ]
    if gone:
        pytest.skip(
            f"slurm-wlm and munge are not installed ({', '.join(gone)} not found): tools/slurm_local.sh install"
        )
    if shutil.which("gatedpo", path=_clean_env()["PATH"]) is None:
        pytest.skip("the gatedpo command is not installed in this environment (pip install -e .)")
    state = tmp_path_factory.mktemp("cluster")
    port = next(p for p in range(17000, 19000, 2) if _port_is_free(p) and _port_is_free(p + 1))
    env = _clean_env(
        GATEDPO_SLURM_DIR=str(state), GATEDPO_SLURM_PORT=str(port), GATEDPO_SLURM_CPUS=str(WORLD)
    )
    script = str(ROOT / "tools" / "slurm_local.sh")
    started = subprocess.run(["bash", script, "start"], capture_output=True, text=True, env=env, timeout=120)
    if started.returncode != 0:
        subprocess.run(["bash", script, "stop"], capture_output=True, env=env, timeout=60)
        pytest.skip(f"the one-node SLURM cluster did not start: {started.stderr.strip()[-1500:]}")
    yield {**env, "SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run(["bash", script, "stop"], capture_output=True, env=env, timeout=60)


def test_srun_tasks_are_the_ranks(slurm, work, reference):
    out = work / "srun"
    cmd = ["srun", "-n", str(WORLD), "--kill-on-bad-exit=1", sys.executable, "-m", "gatedpo_mega.cli"]
    proc = subprocess.run(
        [*cmd, *_train_args(work, out), "train.resume=auto"],
        capture_output=True,
        text=True,
        env=slurm,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # train.resume=auto and no checkpoint yet: a fresh start, as a requeued job's first start is.
    assert f"no checkpoint in {out}/checkpoints: starting at step 0" in proc.stdout
    assert _rows(out) == reference


def _sbatch(slurm: dict[str, str], work: Path, mode: str, out: Path) -> str:
    """``launcher/slurm.sbatch`` as written, sized for this machine on sbatch's command line; the job's id. (Its end
    comes from ``_wait_for_end``: ``sbatch --wait`` polls at 2, 8, then 32 s and would add up to 30 s a job.)"""
    logs = work / f"logs-{mode}"
    logs.mkdir()
    env = {**slurm, "CONFIG": str(work / "tiny.yaml"), "OUTPUT": str(out), "MODE": mode, "LOGS": str(logs)}
    sized = ["--nodes=1", f"--ntasks-per-node={WORLD}", "--cpus-per-task=1", "--gpus-per-node=0",
             "--time=30:00", f"--output={logs}/%x-%j.out", f"--job-name=gatedpo-{mode}"]  # fmt: skip
    proc = subprocess.run(
        ["sbatch", "--parsable", *sized, str(ROOT / "launcher" / "slurm.sbatch")],
        cwd=work, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    job = proc.stdout.strip().split(";")[0]
    assert proc.returncode == 0 and job.isdigit(), proc.stdout + proc.stderr
    return job


def _job_field(show: str, name: str) -> str:
    m = re.search(rf"\b{name}=(\S+)", show)
    return m.group(1) if m else ""


def _wait_for_end(slurm: dict[str, str], job: str, restarts: int, timeout: float) -> str:
    """``scontrol show job`` once the job has ended after ``restarts`` requeues. (``sbatch --wait`` can take a
    requeued job's passing state for its end and return 1 while the job goes on.)"""
    deadline = time.monotonic() + timeout
    while True:
        show = subprocess.run(
            ["scontrol", "show", "job", job], capture_output=True, text=True, env=slurm
        ).stdout
        state = _job_field(show, "JobState")
        if int(_job_field(show, "Restarts") or 0) >= restarts and state in (
            "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
        ):  # fmt: skip
            return show
        assert time.monotonic() < deadline, f"job {job} did not end:\n{show}"
        time.sleep(0.2)


def test_sbatch_torchrun_mode(slurm, work, reference):
    out = work / "sbatch-torchrun"
    job = _sbatch(slurm, work, "torchrun", out)
    show = _wait_for_end(slurm, job, restarts=0, timeout=600)
    logs = work / "logs-torchrun"
    node_log = logs / f"gatedpo-torchrun-{job}-node0.out"
    ended = (_job_field(show, "JobState"), _job_field(show, "ExitCode"))
    assert ended == ("COMPLETED", "0:0"), show + _log_tail(logs / f"gatedpo-torchrun-{job}.out", node_log)
    assert _rows(out) == reference
    assert "[rank0]:no checkpoint in" in node_log.read_text()  # one file per node, lines prefixed by rank


def test_sbatch_srun_mode_preempted_mid_run_saves_requeues_and_resumes(slurm, work, reference):
    out = work / "sbatch-srun"
    job = _sbatch(slurm, work, "srun", out)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-00000002").exists():  # the first checkpoint: preempt now
        show = subprocess.run(
            ["scontrol", "show", "job", job], capture_output=True, text=True, env=slurm
        ).stdout
        assert time.monotonic() < deadline and _job_field(show, "JobState") in (
            "PENDING",
            "CONFIGURING",
            "RUNNING",
        ), show
        time.sleep(0.05)
    # What --signal=B:USR1@180 sends before the time limit: the script passes it on to the ranks, they save at the
    # end of their step and exit 75, and the script requeues the job.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, env=slurm, timeout=60)
    while "Restarts=1" not in (show := subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                                                      text=True, env=slurm).stdout) or "JobState=PENDING" not in show:  # fmt: skip
        assert time.monotonic() < deadline and "JobState=COMPLETED" not in show, show
        time.sleep(0.1)
    # A requeued job the scheduler starts again at once can reach slurmd while it still holds the job as killed
    # ("Job 3 already killed, do not launch batch job": FAILED 1:0 with nothing in its log); production requeues
    # wait out a BeginTime delay (~2 minutes) for the same reason. Here: once the node is idle, start it now.
    while (state := subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                   env=slurm).stdout.split()) != ["idle"]:  # fmt: skip
        assert time.monotonic() < deadline, f"the node did not become idle after the requeue: {state}"
        time.sleep(0.2)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, env=slurm, timeout=60)
    show = _wait_for_end(slurm, job, restarts=1, timeout=600)
    logs = work / "logs-srun"
    ranks = [logs / f"gatedpo-srun-{job}-{r}.out" for r in range(WORLD)]
    ended = (_job_field(show, "JobState"), _job_field(show, "ExitCode"))
    assert ended == ("COMPLETED", "0:0"), show + _log_tail(logs / f"gatedpo-srun-{job}.out", *ranks)
    assert _rows(out) == reference
    batch = (logs / f"gatedpo-srun-{job}.out").read_text()
    assert "(restart 0)" in batch and "(restart 1)" in batch  # one log, appended by the second start
    assert f"gatedpo: job {job} preempted (step exit " in batch and "): requeued" in batch
    rank0 = ranks[0].read_text()
    assert f"no checkpoint in {out}/checkpoints: starting at step 0" in rank0
    saved = re.search(r"gatedpo: preempted: SIGUSR1 received: stopped after step (\d+) of 6, checkpoint (\S+) "
                      r"written and verified", rank0)  # fmt: skip
    assert saved and 2 <= int(saved.group(1)) < STEPS, rank0[-3000:]
    assert saved.group(2) == str(out / "checkpoints" / f"step-{int(saved.group(1)):08d}")
    resumed = re.search(r"resumed from \S+ \(step (\d+)\)", rank0)
    assert resumed and resumed.group(1) == saved.group(1)
    assert all(p.exists() for p in ranks)
