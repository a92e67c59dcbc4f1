"""Pre-flight check of a SLURM allocation: every rank joins the process group and agrees.

Launched like the trainer (scripts/slurm/common.sh flexsp_launch), it reads torchrun's
environment, all-reduces a rank-dependent tensor, and checks the sum against the closed form
so a wrong RANK/WORLD_SIZE mapping (duplicate or missing ranks) fails loudly.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl when CUDA is present, else gloo)")
    p.add_argument("--timeout-s", type=float, default=120.0)
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            print(f"dist_check: {var} is not set (launch with torchrun or scripts/slurm/common.sh)", file=sys.stderr)
            return 2
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != int(os.environ["WORLD_SIZE"]):
        raise RuntimeError(f"world size {world} != WORLD_SIZE {os.environ['WORLD_SIZE']}")
    t = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(t)
    expected = world * (world + 1) / 2
    seen = [None] * world
    dist.all_gather_object(seen, rank)
    ok = t.item() == expected and sorted(seen) == list(range(world))
    line = (
        f"dist_check: rank {rank}/{world} local_rank {local_rank} host {socket.gethostname()} "
        f"backend {backend} sum {t.item():.0f} (expected {expected:.0f}) {'OK' if ok else 'MISMATCH'}\n"
    )
    sys.stdout.write(line)  # one write per line: ranks share the job's log
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
