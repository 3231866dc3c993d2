"""One rank of `ftl check --nproc N`: join the process group (as a training rank would) and all-reduce once.

python -m launcher.launch.probe TIMEOUT_SECONDS     (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
"""

from __future__ import annotations

import datetime
import sys
import time

import torch
import torch.distributed as dist

from launcher.dist import backend_for


def main() -> int:
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 120.0
    t0 = time.perf_counter()
    backend = backend_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    device = torch.device("cuda", dist.get_rank() % max(1, torch.cuda.device_count())) if backend == "nccl" else "cpu"
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    world = dist.get_world_size()
    dist.destroy_process_group()
    if int(t.item()) != world:
        print(f"all-reduce gave {t.item()}, expected {world}")
        return 1
    print(f"{world} ranks met and all-reduced ({backend}) in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
