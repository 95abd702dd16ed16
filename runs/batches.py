"""The data order of a run: the batch at step k is a pure function of (seed, k), so resuming at any step is exact."""
import itertools

import torch


class BatchOrder:
    """Indices of the global batch at step k: epoch e = k // steps_per_epoch is a permutation seeded by (seed, e).
    Each DDP rank takes its own slice. No iterator state, so resuming at any step is exact."""

    def __init__(self, n, batch_size, seed, rank=0, world=1):
        if batch_size % world:
            raise ValueError(f"train.batch_size={batch_size} is not divisible by the {world} processes")
        if batch_size > n:
            raise ValueError(f"train.batch_size={batch_size} exceeds the data set size ({n})")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.steps_per_epoch = n // batch_size
        self.epoch, self.perm = None, None

    def __call__(self, step):
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.epoch, self.perm = epoch, torch.randperm(self.n, generator=generator)
        batch = self.perm[j * self.batch_size:(j + 1) * self.batch_size]
        per_rank = self.batch_size // self.world
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()


def batches(dataset, order, start_step, num_workers):
    """Yield collated batches for steps start_step, start_step + 1, ... A data set with a `batch(indices)` method
    (the trajectory store: each shard read once per batch) is read through it instead of item by item."""
    if hasattr(dataset, "batch"):
        return (dataset.batch(order(step)) for step in itertools.count(start_step))
    class Steps(torch.utils.data.Sampler):
        def __iter__(self):
            step = start_step
            while True:
                yield order(step)
                step += 1
    # Its own generator: creating the iterator must not draw from the global RNG the objective uses.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=Steps(), num_workers=num_workers,
                                         persistent_workers=num_workers > 0,
                                         generator=torch.Generator().manual_seed(start_step))
    return iter(loader)
