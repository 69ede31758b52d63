"""A process that reports where torchrun put it: one line `RANK=.. WORLD_SIZE=.. LOCAL_RANK=.. MASTER_ADDR=..
MASTER_PORT=.. SUM=..` after one gloo all_reduce of rank + 1 over the whole group (so SUM proves they all met).

    bash run.sh tests/rank_worker.py
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import leave_process_group  # noqa: E402

dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1])
dist.all_reduce(total)
names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
print(" ".join(f"{name}={os.environ[name]}" for name in names), f"SUM={int(total)}", flush=True)
leave_process_group()
