"""A rank started by SLURM's ``srun``: SLURM's variables read as the ones ``torch.distributed`` reads.

``srun`` starts every task of a job step itself (one per GPU) and sets ``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``, ``SLURM_NODEID``, the step's node list and its tasks per node, but none of ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``. ``launcher_env`` derives them:

- ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` = ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``;
- ``LOCAL_WORLD_SIZE`` = this node's entry (``SLURM_NODEID``) of the step's tasks per node, ``"2(x3),1"`` meaning
  2, 2, 2, 1 (``SLURM_STEP_TASKS_PER_NODE``, else ``SLURM_NTASKS_PER_NODE``, else ``SLURM_TASKS_PER_NODE``);
- ``MASTER_ADDR`` = the first host of the step's node list, ``"node[01-03,07],gpu5"`` meaning node01, node02,
  node03, node07, gpu5 (``SLURM_STEP_NODELIST``, else ``SLURM_JOB_NODELIST``, else ``SLURM_NODELIST``): SLURM's
  block and cyclic distributions both place task 0 on the first node;
- ``MASTER_PORT`` = ``20000 + SLURM_JOB_ID % 20000``, the same on every task of the job without any exchange.

A variable already set is kept (a ``MASTER_PORT`` exported in the batch script; under ``torchrun`` everything).
Only the tasks of a step are mapped: the batch script itself also has ``SLURM_PROCID=0`` and ``SLURM_NTASKS=N``
but no ``SLURM_STEP_ID``, and a step of one task runs as outside SLURM (one process, or ``--nproc N`` started
here). Pure: the environment goes in, the variables to add come out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from gatedpo_mega.errors import UserError

PORT_BASE, PORT_SPAN = 20000, 20000


class ClusterEnvError(UserError):
    """The scheduler's variables contradict each other or cannot be read; nothing has started."""


def _split_top(text: str) -> list[str]:
    """``a[1,2],b`` -> ``["a[1,2]", "b"]``: commas outside brackets separate the items."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError("nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("']' without '['")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("'[' without ']'")
    items.append(text[start:])
    return items


def _expand_ranges(body: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]``: a range keeps the width of its first bound."""
    out = []
    for part in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"'{part}' is not a number or a range")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"range '{part}' runs backwards")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def _expand_host(item: str) -> list[str]:
    """One item of a host list, with any number of bracketed ranges (``rack[1-2]-n[1-2]``: four hosts)."""
    m = re.match(r"([^\[\]]*)\[([^\[\]]*)\]", item)
    if m is None:
        if not item or "[" in item or "]" in item:
            raise ValueError(f"'{item}' is not a host name")
        return [item]
    rest = item[m.end() :]
    tails = _expand_host(rest) if rest else [""]
    return [m.group(1) + n + tail for n in _expand_ranges(m.group(2)) for tail in tails]


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list: ``"node[01-03,07],gpu5"`` -> node01, node02, node03, node07, gpu5.
    Raises ``ValueError`` saying what is wrong."""
    text = text.strip()
    if not text:
        raise ValueError("empty")
    return [host for item in _split_top(text) for host in _expand_host(item)]


def expand_counts(text: str) -> list[int]:
    """SLURM's tasks per node: ``"2(x3),1"`` -> [2, 2, 2, 1]. Raises ``ValueError`` saying what is wrong."""
    out: list[int] = []
    for part in text.strip().split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ValueError(f"'{part}' is neither N nor N(xM)")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        if environ.get(name, "").strip():
            return name, environ[name]
    return None


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    if not value.strip().isdigit():
        raise ClusterEnvError(f"{name}={value!r} is not a non-negative integer")
    return int(value)


def under_srun(environ: Mapping[str, str]) -> bool:
    """A task of an ``srun`` step of more than one task, not started by a launcher that sets torch's variables."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return False
    tasks = environ.get("SLURM_NTASKS", "").strip()
    step = "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ
    slurm = all(k in environ for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
    return slurm and step and tasks != "1"


def launcher_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` so that ``torch.distributed``'s ``env://`` start finds them (empty
    unless under ``srun``: see the module docstring). Raises ``ClusterEnvError`` on contradicting values."""
    if not under_srun(environ):
        return {}
    rank, world, local = (_int(environ, k) for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
    if rank >= world:
        raise ClusterEnvError(f"SLURM_PROCID={rank} is not below SLURM_NTASKS={world}")
    node = _int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local)}

    found = _first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if found is None:
        raise ClusterEnvError(
            "srun set none of SLURM_STEP_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE, SLURM_TASKS_PER_NODE"
        )
    name, value = found
    try:
        counts = expand_counts(value)
    except ValueError as e:
        raise ClusterEnvError(f"{name}={value!r} cannot be read: {e}") from None
    per_node = counts[0] if name == "SLURM_NTASKS_PER_NODE" else None  # one number that holds for every node
    if per_node is None:
        if node >= len(counts):
            raise ClusterEnvError(f"SLURM_NODEID={node} but {name}={value!r} lists {len(counts)} node(s)")
        per_node = counts[node]
    if local >= per_node:
        raise ClusterEnvError(
            f"SLURM_LOCALID={local} is not below this node's {per_node} task(s) ({name}={value!r})"
        )
    env["LOCAL_WORLD_SIZE"] = str(per_node)

    found = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if found is None:
        raise ClusterEnvError("srun set none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST")
    name, value = found
    try:
        hosts = expand_hostlist(value)
    except ValueError as e:
        raise ClusterEnvError(f"{name}={value!r} is not a host list ({e})") from None
    env["MASTER_ADDR"] = hosts[0]

    if "MASTER_PORT" not in environ:
        found = _first(environ, "SLURM_JOB_ID", "SLURM_JOBID")
        if found is None:
            raise ClusterEnvError("srun set no SLURM_JOB_ID to derive MASTER_PORT from: set MASTER_PORT")
        env["MASTER_PORT"] = str(PORT_BASE + _int(environ, found[0]) % PORT_SPAN)
    return {k: v for k, v in env.items() if k not in environ}
