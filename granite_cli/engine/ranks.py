"""This process's place in a run of several (accelerate launch, torchrun): the torch.distributed
side of `granite_cli.distributed.Ranks`."""

from __future__ import annotations

import os
from datetime import timedelta

from ..distributed import Ranks

#: A rank may wait for slower ones for this long at the end of a run before giving up.
BARRIER_TIMEOUT = timedelta(days=7)


def current(device: str = "auto") -> Ranks:
    """This process's rank, initialising the process group when launched as several processes
    (gloo on the CPU, nccl on GPUs); a plain single-process run touches nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)

    def broadcast(value):
        box = [value if state.process_index == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    return Ranks(state.process_index, state.num_processes, str(state.device), state.wait_for_everyone, broadcast)
