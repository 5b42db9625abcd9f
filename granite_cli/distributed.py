"""Data-parallel runs over several processes (GPUs, machines) with accelerate / torch.distributed.

`accelerate launch --num_processes N -m granite_cli caption ...` (or `torchrun`) starts N copies;
each one finds its rank here, loads the model on its own device, and takes its share of the
items. The share is decided by every process alike from the same item list, balanced by the
estimated cost of each item (its image tokens), not by count: a folder of PDF pages and thumbnails
would otherwise leave some GPUs idle while others still work through pages.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Ranks:
    """This process's place in the run: rank `rank` of `world` processes. `barrier` waits for
    every process; `broadcast` gives every process rank 0's value (the engine's process group
    provides both: see `granite_cli.engine.ranks`)."""

    rank: int = 0
    world: int = 1
    device: str | None = None
    """The device this process was given (cuda:LOCAL_RANK, or cpu); None when single."""
    barrier: Callable[[], None] = lambda: None
    broadcast: Callable[[Any], Any] = lambda value: value

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device_for(self, requested: str) -> str:
        """Where this process loads the model: among several, `auto` and `cuda` mean the GPU
        this process was given (else every process would load onto the first one); a device
        named exactly (`cpu`, `cuda:1`) stays the caller's choice."""
        if self.distributed and self.device is not None and requested in ("auto", "cuda"):
            return self.device
        return requested


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
