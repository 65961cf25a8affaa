"""Loader throughput: collated audio a DataLoader delivers from the shards, against copying it.

Ours: a torch DataLoader over ShardDataset (memory-mapped Arrow shards) with DurationBucketSampler
batches and CTCCollator (normalization, padding, labels, attention mask), pinned where CUDA is
present, per --num_workers, worker start-up included (first_batch_seconds). Anchor: this process
copying the same samples from the same memory maps, batch by batch, into one preallocated padded
buffer (pinned where CUDA is present): the copy any loader of this layout makes. The ratio is the
share of the copy's speed left after collation and worker IPC.

Audio s/s = real (unpadded) audio seconds per wall second over --epochs epochs of the sampler's
plan, from warm page cache (the anchor's untimed first pass warms it). A measurement where other
work took over 8 % of the machine's CPU is rerun, up to --repeats runs; the least disturbed stays.

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
from benchmarks.benchmark_results import finish, result_row
from benchmarks.process_tree import least_disturbed
from preprocess.shard_format import ShardDataset
from train.ctc_collator import CTCCollator
from train.duration_bucket_sampler import DurationBucketSampler

NAME = "loader_throughput"
ANCHOR = "in-process copy of the same samples"


def own_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num_workers", type=int, nargs="+", default=[0, 1, 2], help="loader's")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per configuration")


def planned_audio_seconds(dataset: ShardDataset, plans: list[list[list[np.ndarray]]]) -> float:
    """Real (unpadded) audio seconds in the planned batches."""
    samples = sum(int(dataset.num_samples[ranks[0]].sum()) for plan in plans for ranks in plan)
    return samples / dataset.sampling_rate


def copy_same_samples(
    dataset: ShardDataset, sampler: DurationBucketSampler, epochs: int, pinned: bool
) -> dict[str, Any]:
    """The anchor: every planned utterance copied into a preallocated padded batch buffer."""
    # Views into the memory maps, made before timing: the anchor is the copy, not the lookup.
    views = [dataset[index]["audio"] for index in range(len(dataset))]
    plans = [sampler.plan_epoch(epoch) for epoch in range(epochs + 1)]
    rows = max(ranks[0].size for plan in plans for ranks in plan)
    shape = (rows, int(dataset.num_samples.max()))
    buffer = torch.empty(shape, dtype=torch.float32, pin_memory=pinned).numpy()

    def copy_epoch(plan: list[list[np.ndarray]]) -> None:
        for ranks in plan:
            for row, index in enumerate(ranks[0]):
                buffer[row, : views[index].size] = views[index]

    copy_epoch(plans[-1])  # warm-up: faults the shards into this process and the page cache
    started = time.perf_counter()
    for plan in plans[:epochs]:
        copy_epoch(plan)
    seconds = time.perf_counter() - started
    audio_seconds = planned_audio_seconds(dataset, plans[:epochs])
    return {
        "audio_seconds": audio_seconds,
        "seconds": seconds,
        "audio_seconds_per_second": audio_seconds / seconds,
        "gib_per_second": audio_seconds * dataset.sampling_rate * 4 / seconds / 2**30,
    }


def measure_loader(
    dataset: ShardDataset,
    sampler: DurationBucketSampler,
    num_workers: int,
    epochs: int,
    pinned: bool,
) -> dict[str, Any]:
    """Times `epochs` epochs through a DataLoader, worker start-up included."""
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=CTCCollator(vocab=dataset.vocab, do_normalize=True),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pinned,
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
    audio_seconds = planned_audio_seconds(dataset, [sampler.plan_epoch(e) for e in range(epochs)])
    return {
        "num_workers": num_workers,
        "audio_seconds": audio_seconds,
        "seconds": seconds,
        "batches": batches,
        "first_batch_seconds": first_batch_seconds,
        "audio_seconds_per_second": audio_seconds / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    shared = {"dataset": None, "hours": 1.0, "unique_hours": 0.5, "seed": 0}
    shared |= {"max_batch_seconds": 100.0, "num_cpus": None, "object_store_memory": None}
    shared |= {"repeats": 3, "wait_for_idle": 0.0, "work_dir": None}
    quick = {"hours": 0.02, "unique_hours": 0.02, "epochs": 1}
    args = harness.parse_args(NAME, __doc__, argv, shared, quick, own_options)
    pinned = torch.cuda.is_available()
    anchor_name = ANCHOR + (", into pinned memory" if pinned else "")
    with harness.work_directory(args.work_dir) as work:
        path, _ = harness.args_dataset(args, work)
        dataset = ShardDataset(str(path))
        sampler = DurationBucketSampler(
            num_samples=dataset.num_samples,
            sampling_rate=dataset.sampling_rate,
            max_batch_seconds=args.max_batch_seconds,
            seed=args.seed,
        )
        measures = [partial(copy_same_samples, dataset, sampler, args.epochs, pinned)]
        measures += [
            partial(measure_loader, dataset, sampler, workers, args.epochs, pinned)
            for workers in args.num_workers
        ]
        anchor, *loaders = [least_disturbed(m, args.repeats, args.wait_for_idle) for m in measures]
    rows = [
        result_row(
            f"collated audio delivered, num_workers={loader['num_workers']}",
            loader["audio_seconds_per_second"],
            anchor["audio_seconds_per_second"],
            anchor_name,
            "audio s/s",
            higher_is_better=True,
        )
        for loader in loaders
    ]
    details = {
        "dataset": str(args.dataset or "demo corpus, built for this run"),
        "dataset_hours": dataset.total_hours,
        "utterances": len(dataset),
        "max_batch_seconds": args.max_batch_seconds,
        "epochs": args.epochs,
        "pinned_memory": pinned,
        "copy_bound": anchor,
        "loaders": loaders,
    }
    return finish(NAME, __doc__, args, argv, rows, details)


if __name__ == "__main__":
    sys.exit(main())
