"""Several nodes, stood for by several launcher invocations on this host: torchrun agents joined by a c10d
rendezvous, the DeepSpeed launcher's per-node mode (no ssh), a node lost mid-run, and a job that restarts itself
(torchrun --max-restarts with train.resume=auto). Each gives the metrics of one uninterrupted 4-process run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import gatedpo

from gatedpo_mega.training.checkpoint import verify

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launcher" / "launch.sh"
BASE = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3",
    "train.warmup_steps=1", "data.builtin_pairs=120", "data.max_length=64", "data.max_prompt_length=40",
    "parallel.tensor=2", "train.save_every=3", "train.max_steps=9",
]  # fmt: skip
TIMING = {"tokens_per_second", "real_tokens_per_second", "step_seconds", "memory/peak_mib_max_rank"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # torchrun and deepspeed of this environment
    return env


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """One "node": the launcher (launch.sh execs it: the same process) in a session of its own."""
    return subprocess.Popen(
        ["bash", str(LAUNCH), *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env(),
        start_new_session=True, cwd=ROOT,
    )  # fmt: skip


def _finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> None:
    for p, log in zip(procs, logs, strict=True):
        assert p.wait(timeout=timeout) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """TP 2 x DP 2 on 4 processes of the test pool, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = gatedpo(4, "train", *BASE, f"data.cache_dir={cache}", f"train.output_dir={out}", env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return _metrics(out)


def test_two_torchrun_nodes_give_the_one_node_metrics(reference, cache, tmp_path):
    out, endpoint = tmp_path / "run", f"127.0.0.1:{_port()}"
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = [
        _start(["--nnodes", "2", "--node-rank", str(i), "--nproc", "2", "--rdzv-endpoint", endpoint, "--", "train",
                *BASE, f"data.cache_dir={cache}", f"train.output_dir={out}"], logs[i])
        for i in range(2)
    ]  # fmt: skip
    _finish(procs, logs)
    assert _metrics(out) == reference


def test_two_deepspeed_nodes_without_ssh_give_the_one_node_metrics(reference, cache, tmp_path):
    out, port = tmp_path / "run", str(_port())
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = [
        _start(["--launcher", "deepspeed", "--hostfile", str(hostfile), "--no-ssh", "--node-rank", str(i),
                "--master-addr", "127.0.0.1", "--master-port", port, "--", "train", *BASE,
                f"data.cache_dir={cache}", f"train.output_dir={out}"], logs[i])
        for i in range(2)
    ]  # fmt: skip
    _finish(procs, logs)
    assert _metrics(out) == reference


def _wait_for(path: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def _wait_listening(endpoint: str, timeout: float = 60) -> None:
    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {endpoint}"
            time.sleep(0.1)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts each rank in a session of its own)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    os.kill(pid, signal.SIGKILL)
    for child in children:
        _kill_tree(int(child))


def test_a_lost_node_stops_the_other_with_one_line_and_leaves_whole_checkpoints(cache, tmp_path):
    out, endpoint = tmp_path / "run", f"127.0.0.1:{_port()}"
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    args = [*BASE, f"data.cache_dir={cache}", f"train.output_dir={out}", "train.max_steps=400",
            "train.save_every=1", "train.collective_timeout_minutes=0.5"]  # fmt: skip
    procs = []
    for i in range(2):  # node 0 first: it hosts the rendezvous store, as the head node does
        procs.append(_start(["--nnodes", "2", "--node-rank", str(i), "--nproc", "2", "--rdzv-endpoint", endpoint,
                             "--", "train", *args], logs[i]))  # fmt: skip
        if i == 0:
            _wait_listening(endpoint)
    _wait_for(out / "checkpoints" / "step-00000002")
    _kill_tree(procs[1].pid)  # node 1: its agent and its two ranks, as a machine that goes down
    lost = time.monotonic()
    code = procs[0].wait(timeout=90)
    assert code != 0 and time.monotonic() - lost < 30 + 20  # within the collective time-out
    ours = re.findall(r"gatedpo: [^\r\n]*", logs[0].read_text())
    # One line from each of node 0's ranks that got to say it: torchrun's agent stops a node's other ranks as soon as
    # one exits, so the second may be terminated before its collective fails.
    assert 1 <= len(ours) <= 2, ours
    for line in ours:
        assert re.fullmatch(r"gatedpo: rank [01]: a peer stopped \(.*127\.0\.0\.1.*\)", line) or re.fullmatch(
            r"gatedpo: error: rank [01]: a collective waited longer than .*", line
        ), line
    folders = sorted((out / "checkpoints").iterdir())
    complete = [f for f in folders if not f.name.startswith(".tmp-")]
    assert len(complete) >= 2
    for folder in complete:  # nothing that looks complete is missing a part
        assert verify(folder) is None, folder


def test_a_job_under_torchrun_max_restarts_resumes_by_itself(reference, cache, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "node.log"
    proc = _start(["--nproc", "4", "--master-port", str(_port()), "--max-restarts", "2", "--", "train", *BASE,
                   f"data.cache_dir={cache}", f"train.output_dir={out}", "train.resume=auto"], log)  # fmt: skip
    _wait_for(out / "checkpoints" / "step-00000003")
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 4, workers
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; torchrun restarts the node's ranks
    _finish([proc], [log])
    text = log.read_text()
    assert "no checkpoint in" in text and "resumed from" in text, text[-3000:]
    assert _metrics(out) == reference
