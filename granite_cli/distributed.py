"""Data-parallel runs over several processes (GPUs, machines) with accelerate / torch.distributed.

`accelerate launch --num_processes N -m granite_cli caption ...` (or `torchrun`) starts N copies;
each one finds its rank here, loads the model on its own device, and takes its share of the
items. The share is decided by every process alike from the same item list, balanced by the
estimated cost of each item (its image tokens), not by count: a folder of PDF pages and thumbnails
would otherwise leave some GPUs idle while others still work through pages.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

#: A rank may wait for slower ones for this long at the end of a run before giving up.
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass
class Ranks:
    """This process's place in the run: rank `rank` of `world` processes."""

    rank: int = 0
    world: int = 1
    device: str | None = None
    """The device accelerate assigns this process (cuda:LOCAL_RANK, or cpu); None when single."""
    _state: Any = None

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def broadcast(self, value: Any) -> Any:
        """`value` of rank 0, on every rank."""
        if self._state is None:
            return value
        import torch.distributed as dist

        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current(device: str = "auto") -> Ranks:
    """This process's rank, initialising the process group when launched as several processes
    (gloo on the CPU, nccl on GPUs); a plain single-process run touches nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    return Ranks(state.process_index, state.num_processes, str(state.device), state)


def split(costs: Sequence[float], world: int) -> list[list[int]]:
    """Deterministic, cost-balanced shares: item indices for each rank, in input order.

    Longest-processing-time-first greedy: the costliest item goes to the least loaded rank
    (ties to the lower rank, equal costs in input order), which keeps the largest share within
    4/3 of the best possible.
    """
    loads = [(0.0, rank) for rank in range(world)]
    heapq.heapify(loads)
    shares: list[list[int]] = [[] for _ in range(world)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        shares[rank].append(index)
        heapq.heappush(loads, (load + costs[index], rank))
    return [sorted(share) for share in shares]


def item_cost(size: tuple[int, int] | None, image_tokens: Callable[[int, int], int], answer_tokens: int) -> float:
    """Estimated work for one item: its prefill (image tokens) plus its decode (answer tokens,
    weighted as they run at a fraction of prefill speed per token but one at a time)."""
    if size is None:  # fails fast: a missing or unreadable input
        return 1.0
    return float(image_tokens(*size) + 20 * answer_tokens)
