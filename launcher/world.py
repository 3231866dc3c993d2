"""Who this process is and where its ranks meet, from whatever started it (torchrun, accelerate, srun, ftl).

Under SLURM the rendezvous is the first host of the job's node list, at a port derived from the job id (two
jobs sharing a node never collide). Node names need not be DNS names: when the first host does not resolve,
the address SLURM holds for it (`NodeAddr`) is used. The job script asks this module once, in the batch
shell (`python -m launcher.world` prints `ADDR PORT`); ranks started by a bare `srun ftl train` ask
it themselves.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping

PORT_BASE, PORT_SPAN = 20000, 10000  # below Linux's ephemeral range (32768-60999)


def free_port() -> int:
    """A TCP port that is free on this machine right now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_world(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) when alone.

    RANK/WORLD_SIZE (torchrun, accelerate, `ftl --nproc`) win over SLURM_* (one srun task per rank)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def cpu_threads_per_rank(env: Mapping[str, str] | None = None) -> int | None:
    """This rank's share of the machine's cores: SLURM's --cpus-per-task, else cores ÷ ranks on this node.
    None when OMP_NUM_THREADS is set (the user decided). Without this every rank starts one thread per core,
    and OpenMP threads spinning against each other slow a step many times over under any other load."""
    env = os.environ if env is None else env
    if "OMP_NUM_THREADS" in env:
        return None
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(env["SLURM_CPUS_PER_TASK"])
    local = env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or "1"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(local) if local.isdigit() else 1))


def rendezvous_port(job_id: str | int) -> int:
    """A port for the job's rendezvous, fixed by its id."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def _scontrol(*args: str) -> str | None:
    try:
        out = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def first_host(nodelist: str) -> str | None:
    """The first host of a SLURM node list (`n[1-2]` -> n1); a single plain name needs no scontrol."""
    if re.fullmatch(r"[\w.-]+", nodelist):
        return nodelist
    out = _scontrol("show", "hostnames", nodelist)
    hosts = out.split() if out else []
    return hosts[0] if hosts else None


def node_address(host: str) -> str:
    """`host` itself when it resolves, else the NodeAddr slurmctld holds for it."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    out = _scontrol("show", "node", host) or ""
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else host


def slurm_rendezvous(env: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """(address, port) where the ranks of the current SLURM job meet; None outside a job."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not job or not nodes:
        return None
    if int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1"))) == 1:
        return "127.0.0.1", rendezvous_port(job)  # every rank is on this node
    host = first_host(nodes)
    if host is None:
        raise RuntimeError(f"cannot expand SLURM node list {nodes!r}: scontrol is not available")
    return node_address(host), rendezvous_port(job)


def main() -> int:
    """Print `ADDR PORT` for the current SLURM job (the job script's rendezvous)."""
    try:
        found = slurm_rendezvous()
    except RuntimeError as err:
        print(f"ftl: {err}", file=sys.stderr)
        return 1
    if found is None:
        print("ftl: not inside a SLURM job (SLURM_JOB_ID / SLURM_JOB_NODELIST unset)", file=sys.stderr)
        return 1
    print(*found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
