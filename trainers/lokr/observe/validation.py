"""``[validation]``: a held-out loss every ``validation.every`` optimizer steps on
``validation.samples`` samples that training never sees.

The samples are a seeded pick from the shard folder: the ``samples`` ids with the smallest
``hash64(seed, stream, id)``; they are left out of every epoch's batch plan and listed in
``validation.parquet`` in the run folder (id, timestep, bucket). Each is scored at one fixed
timestep, the timesteps spread evenly over the schedule (sample j of N, by id, at
⌊(2j + 1)·T / 2N⌋), with fixed noise and latent draws from ``hash64(seed, stream, id)``, its
stored caption unshuffled and nothing dropped, centre-cropped: two runs of the same seed score
the same numbers, and a curve compares across runs and resumes. The loss is the training loss
(ε or v target, min-SNR weights), averaged over the samples.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hakubooru.rng import hash64, hash64_array
from trainers.lokr.distributed import all_reduce_sum

VALIDATION_STREAM = 0x7A11D
FILE = "validation.parquet"


def pick(ids: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Index rows of the held-out samples (sorted): the ``samples`` smallest hashes of the ids."""
    if samples <= 0:
        return np.zeros(0, dtype=np.int64)
    keys = hash64_array(hash64(seed, VALIDATION_STREAM), np.asarray(ids))
    return np.sort(np.argsort(keys, kind="stable")[:samples]).astype(np.int64)


def timesteps(n: int, num_timesteps: int) -> np.ndarray:
    """Sample j of n (by id) is scored at ⌊(2j + 1)·T / 2n⌋: evenly over the schedule."""
    j = np.arange(n, dtype=np.int64)
    return (2 * j + 1) * num_timesteps // (2 * n)


class ValidationPlan:
    """The held-out rows in batches of one bucket each (buckets in listed order, ids ascending),
    shaped like a ``BatchPlan`` for ``BatchDataset``."""

    def __init__(self, rows: np.ndarray, bucket_rows: np.ndarray, buckets, batch_size: int, seed: int):
        self.buckets, self.global_batch, self.seed, self.epoch = buckets, int(batch_size), seed, 0
        self.batches, self.batch_bucket = [], []
        for b in np.unique(bucket_rows[rows]):
            mine = rows[bucket_rows[rows] == b]
            for s in range(0, len(mine), self.global_batch):
                self.batches.append(mine[s:s + self.global_batch])
                self.batch_bucket.append(int(b))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.batches[i]

    def bucket_of(self, i: int) -> tuple[int, int]:
        return tuple(self.buckets[self.batch_bucket[i]])


class Validation:
    """The held-out set of a run and its loss."""

    def __init__(self, cfg: dict, index, buckets, bucket_rows, num_timesteps: int):
        vc, tc = cfg["validation"], cfg["train"]
        self.every, self.seed = vc["every"], tc["seed"]
        self.rows = pick(index.ids, vc["samples"], tc["seed"])
        self.index = index
        self.timestep_of = dict(zip(index.ids[self.rows].tolist(), timesteps(len(self.rows), num_timesteps).tolist()))
        self.plan = ValidationPlan(self.rows, bucket_rows, buckets, tc["batch_size"], tc["seed"])
        self.bucket_rows, self.buckets = bucket_rows, buckets

    def training_rows(self) -> np.ndarray | None:
        """A mask of the index rows training may use (None: every row)."""
        if not len(self.rows):
            return None
        keep = np.ones(len(self.index), dtype=bool)
        keep[self.rows] = False
        return keep

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the loss is taken after optimizer step ``step``: every ``every`` and after the last."""
        return len(self.rows) > 0 and self.every > 0 and (step % self.every == 0 or step == total_steps)

    def write(self, folder: Path) -> Path:
        """``validation.parquet``: id, timestep, bucket width and height of each held-out sample."""
        ids = self.index.ids[self.rows]
        b = np.asarray(self.buckets, dtype=np.int32)[self.bucket_rows[self.rows]]
        table = pa.table({"id": pa.array(ids, pa.int64()),
                          "timestep": pa.array([self.timestep_of[i] for i in ids.tolist()], pa.int32()),
                          "bucket_w": pa.array(b[:, 0]), "bucket_h": pa.array(b[:, 1])})
        path = Path(folder) / FILE
        tmp = path.with_name(f".{FILE}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return path

    def draws(self, ids: torch.Tensor, latent_shape, noise_offset: float):
        """(timesteps, noise + offset, latent noise) of the samples ``ids``: fixed per sample."""
        c, h, w = latent_shape
        t, noise, latent_eps = [], [], []
        for post_id in ids.tolist():
            g = torch.Generator().manual_seed(hash64(self.seed, VALIDATION_STREAM, post_id))
            latent_eps.append(torch.randn((c, h, w), generator=g))
            offset = torch.randn((c, 1, 1), generator=g)
            noise.append(torch.randn((c, h, w), generator=g) + noise_offset * offset)
            t.append(self.timestep_of[post_id])
        return torch.tensor(t, dtype=torch.int64), torch.stack(noise), torch.stack(latent_eps)

    @torch.no_grad()
    def loss(self, dataset, loss_fn, dist) -> float:
        """The mean loss over the held-out samples: rank r scores batches r, r + W, …;
        ``loss_fn(batch)`` is the mean loss of one batch."""
        total = torch.zeros(2, dtype=torch.float64, device=dist.device)
        for i in range(dist.rank, len(self.plan), dist.world_size):
            batch = dataset[i]
            n = len(batch["ids"])
            if n:
                total[0] += float(loss_fn(batch)) * n
                total[1] += n
        all_reduce_sum(total, dist)
        return float(total[0] / total[1]) if total[1] else float("nan")
