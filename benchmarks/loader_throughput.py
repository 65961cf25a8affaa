"""Loader throughput: collated audio a DataLoader delivers from the shards, against copying it.

Ours: a torch DataLoader over ShardDataset (memory-mapped Arrow shards) with DurationBucketSampler
batches and CTCCollator (normalization, padding, labels, attention mask) per --num_workers,
worker start-up included. Anchor: this process copying the same samples from the same memory
maps, batch by batch, into one preallocated padded buffer: the copy any loader of this layout
makes. Both pin where CUDA is present. The ratio is the share of the copy's speed left after
collation and worker IPC. Audio s/s: real audio seconds per wall second over --epochs epochs of
the sampler's plan, page cache warm; the least disturbed of up to --repeats runs.

    python -m benchmarks.loader_throughput --hours 1 --num_workers 0 1 2
    python -m benchmarks.loader_throughput --dataset data/train
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks import harness
from benchmarks.benchmark_results import figure_rows, finish
from benchmarks.process_tree import least_disturbed
from preprocess.shard_format import ShardDataset
from train.ctc_collator import CTCCollator
from train.duration_bucket_sampler import DurationBucketSampler

NAME = "loader_throughput"
ANCHOR = "in-process copy of the same samples"
# Where CUDA is, our loader pins its batches, and the anchor copies into pinned memory.
PINNED = torch.cuda.is_available()


def own_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num_workers", type=int, nargs="+", default=[0, 1, 2], help="loader's")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per configuration")


def delivered(
    dataset: ShardDataset, sampler: DurationBucketSampler, epochs: int, seconds: float
) -> dict[str, float]:
    """Real (unpadded) audio seconds of `epochs` planned epochs, delivered in `seconds`."""
    plans = [sampler.plan_epoch(epoch) for epoch in range(epochs)]
    samples = sum(int(dataset.audio_lengths[ranks[0]].sum()) for plan in plans for ranks in plan)
    audio = samples / dataset.sampling_rate
    return {"audio_seconds": audio, "seconds": seconds, "audio_seconds_per_second": audio / seconds}


def copy_same_samples(dataset: ShardDataset, sampler: DurationBucketSampler, epochs: int) -> dict:
    """The anchor: every planned utterance copied into a preallocated padded batch buffer."""
    # Views into the memory maps, made before timing: the anchor is the copy, not the lookup.
    views = [dataset[index]["audio"] for index in range(len(dataset))]
    plans = [sampler.plan_epoch(epoch) for epoch in range(epochs + 1)]
    rows = max(ranks[0].size for plan in plans for ranks in plan)
    shape = (rows, int(dataset.audio_lengths.max()))
    buffer = torch.empty(shape, dtype=torch.float32, pin_memory=PINNED).numpy()

    def copy_epoch(plan: list[list[np.ndarray]]) -> None:
        for ranks in plan:
            for row, index in enumerate(ranks[0]):
                buffer[row, : views[index].size] = views[index]

    copy_epoch(plans[-1])  # warm-up: faults the shards into this process and the page cache
    started = time.perf_counter()
    for plan in plans[:epochs]:
        copy_epoch(plan)
    result = delivered(dataset, sampler, epochs, time.perf_counter() - started)
    bytes_per_second = result["audio_seconds_per_second"] * dataset.sampling_rate * 4
    return {**result, "gib_per_second": bytes_per_second / 2**30}


def measure_loader(
    dataset: ShardDataset, sampler: DurationBucketSampler, epochs: int, num_workers: int
) -> dict[str, Any]:
    """Times `epochs` epochs through a DataLoader, worker start-up included."""
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=CTCCollator(vocab=dataset.vocab, do_normalize=True),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=PINNED,
    )
    batches, first_batch_seconds = 0, None
    started = time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for _ in loader:
            batches += 1
            if first_batch_seconds is None:
                first_batch_seconds = time.perf_counter() - started
    seconds = time.perf_counter() - started
    del loader  # stops persistent workers before the next configuration starts its own
    result = {"num_workers": num_workers, **delivered(dataset, sampler, epochs, seconds)}
    return result | {"batches": batches, "first_batch_seconds": first_batch_seconds}


def main(argv: list[str] | None = None) -> int:
    shared = {"dataset": None, "hours": 1.0, "unique_hours": 0.5, "seed": 0}
    shared |= {"max_batch_seconds": 100.0, "num_cpus": None, "object_store_memory": None}
    shared |= {"repeats": 3, "wait_for_idle": 0.0, "work_dir": None}
    quick = {"hours": 0.02, "unique_hours": 0.02, "epochs": 1}
    args = harness.parse_args(NAME, __doc__, argv, shared, quick, own_options)
    anchor_name = ANCHOR + (", into pinned memory" if PINNED else "")
    with harness.work_directory(args.work_dir) as work:
        path, _ = harness.args_dataset(args, work)
        dataset = ShardDataset(str(path))
        sampler = DurationBucketSampler(
            audio_lengths=dataset.audio_lengths,
            sampling_rate=dataset.sampling_rate,
            max_batch_seconds=args.max_batch_seconds,
            seed=args.seed,
        )
        measures = [partial(copy_same_samples, dataset, sampler, args.epochs)]
        measures += [
            partial(measure_loader, dataset, sampler, args.epochs, n) for n in args.num_workers
        ]
        anchor, *loaders = [least_disturbed(m, args.repeats, args.wait_for_idle) for m in measures]
    rows = []
    for loader in loaders:
        metric = f"collated audio delivered, num_workers={loader['num_workers']}"
        figure = [(metric, "audio_seconds_per_second", "audio s/s", True, True)]
        rows += figure_rows(loader, anchor, anchor_name, figure)
    details = {"dataset": str(path), "dataset_hours": dataset.total_hours}
    details |= {"utterances": len(dataset), "pinned_memory": PINNED}
    details |= {"copy_bound": anchor, "loaders": loaders}
    return finish(args, rows, details)


if __name__ == "__main__":
    sys.exit(main())
