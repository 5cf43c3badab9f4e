"""Where a run's global batches come from: the training examples in an order that is a pure function of (seed,
position), so that a resumed run continues exactly where the interrupted one was.

A batch source knows the run's length (`n_examples`, `total_steps`), where a step boundary is (every
`batch_size` examples; the last batch may be shorter) and which examples the run uses. The trainer keeps its
position (`examples_seen`) in its state and asks for the batches from there.
"""
import math

import torch

import data


class DatasetSource:
    """Global batches of `batch_size` examples of `dataset`, epoch after epoch, cut at the run's length."""

    def __init__(self, dataset, cfg, world_size):
        self.dataset, self.batch_size, self.seed = dataset, cfg.total_batch_size, cfg.seed
        self.group_by_length = cfg.group_by_length
        n_total = len(dataset) * cfg.n_epochs if cfg.n_epochs is not None else math.inf
        n_examples = int(min(n_total, cfg.n_examples if cfg.n_examples is not None else math.inf))
        # every process must run the same number of forward passes (sharded weights are gathered collectively), so
        # the last global batch is cut to a multiple of world_size (no-op on one device)
        self.n_examples = n_examples - n_examples % world_size
        self.total_steps = math.ceil(self.n_examples / self.batch_size)

    def epoch_order(self, epoch):
        """The order of the training examples in one epoch: a permutation seeded by (seed, epoch). With
        group_by_length, the permutation is cut into windows of 64 global batches, each window sorted by length
        and cut into global batches, and those batches shuffled again: similar lengths share a batch (less
        padding), while the batches still come in random order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        if not self.group_by_length:
            return order
        size = self.batch_size
        batches = []
        for start in range(0, len(order), 64 * size):
            window = sorted(order[start:start + 64 * size], key=lambda i: -data.example_length(self.dataset[i]))
            batches += [window[i:i + size] for i in range(0, len(window), size)]
        last = [batches.pop()] if len(batches[-1]) < size else []  # a short batch stays last, not mid-epoch
        return [i for b in torch.randperm(len(batches), generator=generator).tolist() + [len(batches)] * bool(last)
                for i in (batches + last)[b]]

    def used(self) -> list:
        """The examples this run trains on (n_examples may stop mid-epoch)."""
        n = len(self.dataset)
        indices = range(n) if self.n_examples >= n else self.epoch_order(0)[:self.n_examples]
        return [self.dataset[i] for i in indices]

    def examples(self, start=0):
        """Training examples in order from position `start`, cut at n_examples."""
        position = start
        while position < self.n_examples:
            epoch, offset = divmod(position, len(self.dataset))
            for i in self.epoch_order(epoch)[offset:offset + self.n_examples - position]:
                yield self.dataset[i]
            position += min(len(self.dataset) - offset, self.n_examples - position)

    def batches(self, start=0):
        """The global batches from position `start` (a step boundary): lists of up to batch_size examples."""
        stream = self.examples(start)
        while True:
            batch = [ex for _, ex in zip(range(self.batch_size), stream)]
            if not batch:
                return
            yield batch
