"""`qsimpo pairs` under torchrun / accelerate launch: each process answers its share, one process writes one file.

The prompts still to do are cut into chunks of ``batch_size × processes`` in prompt order; process r takes
rows r, r + P, r + 2P, ... of each chunk. After each chunk every process hands its results to every other
(``all_gather_object`` over gloo, which needs no GPU and works beside NCCL), so all of them hold the same
state, and process 0 alone appends the chunk's rows to ``--out`` in prompt order. What is done already
is process 0's reading of ``--out``, shared with the others at the start, so only process 0 needs to see
the file. The file is the one a single process writes (answers are seeded per prompt and answer, not
per batch or process), and an interrupted run resumes from it with any number of processes.
"""

from __future__ import annotations

import os
from datetime import timedelta


class Processes:
    """This process's place among the processes torchrun or accelerate launch started (one, without them)."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.started, self.group = False, None
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                # A chunk can take minutes to sample on a CPU; the default 30-minute timeout is the only limit loosened.
                dist.init_process_group("gloo", timeout=timedelta(hours=6))
                self.started = True
            elif dist.get_backend() != "gloo":  # objects travel over gloo, whatever the launcher chose for tensors
                self.group = dist.new_group(backend="gloo", timeout=timedelta(hours=6))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def chunks(self, todo: list, batch_size: int):
        """For each chunk: this process's part, as (index in ``todo``, item). Every process gets every chunk,
        so each takes the same number of steps (a part may be empty at the end)."""
        step = batch_size * self.world
        for start in range(0, len(todo), step):
            yield list(enumerate(todo[start:start + step], start))[self.rank::self.world]

    def exchange(self, mine: list, *counts: int) -> tuple[list, list[int]]:
        """Every process's results for this chunk (tuples whose first item is the index), in prompt order, and
        ``counts`` summed over the processes."""
        if self.world == 1:
            return sorted(mine, key=lambda r: r[0]), list(counts)
        import torch.distributed as dist

        everyone = [None] * self.world
        dist.all_gather_object(everyone, (mine, counts), group=self.group)
        results = sorted((r for part, _ in everyone for r in part), key=lambda r: r[0])
        return results, [sum(c[i] for _, c in everyone) for i in range(len(counts))]

    def share(self, obj):
        """Process 0's ``obj``, on every process."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def finish(self) -> None:
        """Wait until every process is done (a normal end only: after an error a peer may never get here). A process
        that tears the group down while its peer is still in the last exchange makes gloo abort that peer."""
        if self.started:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
