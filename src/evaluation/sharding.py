"""Splitting evaluation work over processes (`accelerate launch` / torchrun) and gathering it back in order.

The work is a fixed list of global batches [k * B, (k + 1) * B); process r takes batches r, r + W, r + 2W, ...
Batch k is always the same images (evaluate_ldm.py seeds sample i's noise by (seed, i)), so the results do not
depend on how many processes share the work. Each process returns its rows with their global indices; gathering
puts them back in index order on every process.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch


def batch_ranges(num_items: int, batch_size: int) -> list[tuple[int, int]]:
    """The global batches (start, end) covering 0 .. num_items - 1."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return [(start, min(start + batch_size, num_items)) for start in range(0, num_items, batch_size)]


def process_batches(num_items: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(batch index k, start, end) of the global batches this process handles: k = rank, rank + world, ..."""
    ranges = batch_ranges(num_items, batch_size)
    return [(k, *ranges[k]) for k in range(rank, len(ranges), world_size)]


def gather_in_order(rows: torch.Tensor, indices: torch.Tensor, accelerator=None) -> torch.Tensor:
    """Every process's rows (n_r, D) with their global indices (n_r,) -> all rows in index order, on every process.

    Processes may hold different numbers of rows: they are padded to the longest (index -1) before the gather.
    Indices may have gaps (unreadable images that were skipped) but never repeat.
    """
    rows, indices = rows.float(), indices.long()
    if accelerator is not None and accelerator.num_processes > 1:
        device = accelerator.device
        rows = accelerator.pad_across_processes(rows.to(device).contiguous(), dim=0, pad_index=0)
        indices = accelerator.pad_across_processes(indices.to(device).contiguous(), dim=0, pad_index=-1)
        rows, indices = accelerator.gather(rows).cpu(), accelerator.gather(indices).cpu()
    keep = indices >= 0
    rows, indices = rows[keep], indices[keep]
    order = torch.argsort(indices)
    if len(indices) > 1 and not bool((indices[order][1:] > indices[order][:-1]).all()):
        raise RuntimeError("gathered rows repeat an index: two processes handled the same batch")
    return rows[order]


def local_rows(parts: list[torch.Tensor], index_parts: list[torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate this process's (n_i, D) parts and their indices; (0, D) and (0,) when it had no batch."""
    if not parts:
        return torch.zeros(0, dim), torch.zeros(0, dtype=torch.long)
    return torch.cat(parts).float().cpu(), torch.cat(index_parts).long().cpu()


def world(accelerator: Optional[object]) -> tuple[int, int]:
    """(rank, world size): (0, 1) without an accelerator."""
    if accelerator is None:
        return 0, 1
    return accelerator.process_index, accelerator.num_processes


def map_batches(
    num_items: int,
    batch_size: int,
    fn: Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]],
    accelerator=None,
    desc: str = "",
) -> torch.Tensor:
    """Run `fn(k, start, end) -> (rows (n, D), global indices (n,))` on this process's share of the global
    batches, with a progress bar on the main process, and gather every process's rows in index order."""
    from tqdm.auto import tqdm

    rank, size = world(accelerator)
    mine = process_batches(num_items, batch_size, rank, size)
    parts, index_parts, dim = [], [], 0
    with tqdm(total=num_items, desc=desc, disable=rank != 0, dynamic_ncols=True,
              mininterval=float(os.environ.get("LDM_PROGRESS_INTERVAL", "1.0"))) as bar:
        for k, start, end in mine:
            rows, indices = fn(k, start, end)
            parts.append(rows.float().cpu())
            index_parts.append(indices.long().cpu())
            dim = rows.shape[1]
            bar.update(min((end - start) * size, num_items - bar.n))  # the other processes keep the same pace
    if accelerator is not None and accelerator.num_processes > 1:
        dim = int(accelerator.gather(torch.tensor([dim], device=accelerator.device)).max())
    rows, indices = local_rows(parts, index_parts, dim)
    return gather_in_order(rows, indices, accelerator)
