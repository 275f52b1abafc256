"""Batches for training: a resumable, shardable, infinite stream over a map-style dataset.

Each epoch is a permutation drawn from `seed + epoch`, split evenly over the processes, so the order of
batches is a pure function of (seed, step) and a resumed run continues exactly where it stopped
(`InfiniteLoader(..., start_batch=n)` skips n batches without loading them). Items that a dataset returns as
None (unreadable files) are dropped by `collate` and counted in `loader.num_skipped`; an epoch in which every item
of this process's share is unreadable raises DatasetError instead of drawing empty batches forever.
"""

from __future__ import annotations

import atexit
import logging
import signal
import weakref
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .image_folder import DatasetError

logger = logging.getLogger(__name__)


def collate(items: list[Optional[dict]]) -> dict:
    """Stack a list of item dicts. None items are dropped and counted in batch['num_skipped'].

    Tensors of equal shape are stacked; tensors whose first dimension differs (text embeddings of different
    lengths) are right-padded with zeros and get a `<key>_mask` (B, L) of ones for real positions;
    ints become a LongTensor; anything else (captions) stays a list.
    """
    kept = [it for it in items if it is not None]
    batch: dict = {"num_skipped": len(items) - len(kept)}
    if not kept:
        return batch
    for key in kept[0]:
        values = [it[key] for it in kept]
        first = values[0]
        if isinstance(first, torch.Tensor):
            if all(v.shape == first.shape for v in values):
                batch[key] = torch.stack(values)
            else:
                length = max(v.shape[0] for v in values)
                padded = first.new_zeros((len(values), length, *first.shape[1:]))
                mask = torch.zeros(len(values), length, dtype=torch.long)
                for i, v in enumerate(values):
                    padded[i, : v.shape[0]] = v
                    mask[i, : v.shape[0]] = 1
                batch[key] = padded
                batch[f"{key}_mask"] = mask
        elif isinstance(first, bool) or not isinstance(first, int):
            batch[key] = values
        else:
            batch[key] = torch.tensor(values, dtype=torch.long)
    return batch


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: a cluster's SIGTERM / SIGUSR1, or Ctrl-C's SIGINT, reaches the whole process tree; workers
    leave it to the training process, which finishes its step first (a worker killed by it would fail that step)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of one epoch for one process: permutation(seed + epoch)[rank::world], in full batches."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0
        per_rank = num_items // world_size
        self.batches_per_epoch = max(1, per_rank // batch_size) if per_rank else 0
        if self.batches_per_epoch == 0:
            raise DatasetError(f"a dataset of {num_items} item(s) is too small for {world_size} processes: each needs "
                               f"at least one item an epoch")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.num_items, generator=g)
        mine = perm[self.rank :: self.world_size][: (self.num_items // self.world_size)].tolist()
        bs = min(self.batch_size, len(mine))
        for b in range(self.start_batch, self.batches_per_epoch):
            yield mine[b * bs : (b + 1) * bs]


def _close_at_exit(ref: "weakref.ref[InfiniteLoader]") -> None:
    loader = ref()
    if loader is not None:
        loader.close()


class InfiniteLoader:
    """Endless iterator of collated batches; `batches_seen` counts the batches drawn since batch 0, including those
    dropped because every item was unreadable: it, not step x accumulation, is where a resumed loader must start
    (the trainers save it in their checkpoints)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        start_batch: int = 0,
    ):
        self.sampler = EpochBatchSampler(len(dataset), batch_size, seed, rank, world_size)
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=pin_memory and torch.cuda.is_available(),
            collate_fn=collate,
            persistent_workers=num_workers > 0,
            worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
            # each new epoch's iterator draws a worker base seed: from its own generator, not the global one, so
            # that a resumed run's global RNG stream (dropout) matches the uninterrupted run's
            generator=torch.Generator().manual_seed(seed + rank),
        )
        self.batches_seen = start_batch
        self.num_skipped = 0
        if num_workers > 0:
            # The workers ignore SIGTERM (ignore_stop_signals), and multiprocessing's exit hook stops the workers
            # still alive at exit with SIGTERM, then joins them: a process leaving with this loader alive (an
            # uncaught exception keeps it in the traceback, e.g. NonFiniteLossError) would wait forever. This hook,
            # registered later, runs first and stops them through their queues.
            atexit.register(_close_at_exit, weakref.ref(self))

    def close(self) -> None:
        """Stop the worker processes (a later iteration starts new ones)."""
        iterator = getattr(self.loader, "_iterator", None)  # the persistent workers' iterator
        if iterator is not None:
            iterator._shutdown_workers()
            self.loader._iterator = None

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        while True:
            epoch, offset = divmod(self.batches_seen, self.batches_per_epoch)
            self.sampler.set_epoch(epoch, offset)
            readable = False
            for batch in self.loader:
                self.batches_seen += 1
                if batch["num_skipped"]:
                    self.num_skipped += batch["num_skipped"]
                    logger.info("skipped %d unreadable file(s) so far", self.num_skipped)
                if len(batch) == 1:  # every item of the batch was unreadable
                    continue
                readable = True
                yield batch
            if not readable and offset == 0:  # a whole epoch drawn and nothing to train on: it would spin forever
                raise DatasetError(self._unreadable_epoch_message())

    def _unreadable_epoch_message(self) -> str:
        s = self.sampler
        share = s.batches_per_epoch * min(s.batch_size, s.num_items // s.world_size)
        return (f"no readable item in a whole epoch: the {share} items of this process's share of the dataset's "
                f"{s.num_items} were all unreadable (check the dataset's path)")
