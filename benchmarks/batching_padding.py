"""Padding and batches at equal memory: random, HF LengthGroupedSampler, ours.

The budget is padded audio per batch (batch size × longest utterance), which a wav2vec2 batch's
activation memory grows with. Per budget, on the demo corpus's lengths and on Common Voice-like
ones, epochs averaged (the largest batch: the maximum):

* random: shuffled utterances packed greedily while the padded batch fits the budget.
* HF LengthGroupedSampler, as Trainer(group_by_length=True) uses it, at two batch sizes:
  "mean-matched", the largest whose mean padded seconds per batch fit the budget (single
  batches overshoot it), the anchor for padding and the largest batch; "memory-safe", budget //
  longest utterance, which never does, the anchor for batches per epoch.
* ours: DurationBucketSampler(max_batch_seconds=budget), never over the budget either.

    python -m benchmarks.batching_padding --budgets 100 200
    python -m benchmarks.batching_padding --dataset data/train   # lengths of a prepared dataset
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from benchmarks import harness
from benchmarks.benchmark_results import figure_rows, finish
from benchmarks.harness import SAMPLING_RATE
from train.duration_bucket_sampler import DurationBucketSampler

NAME = "batching_padding"
METHOD_LABELS = {
    "random": "random (budget-packed)",
    "hf_mean_matched": "HF LengthGrouped, mean-matched batch size",
    "hf_memory_safe": "HF LengthGrouped, memory-safe batch size",
    "ours": "ours (DurationBucketSampler)",
}
METHODS = tuple(METHOD_LABELS)
# (anchor method, figure, label, unit) of each row; every figure is better lower.
COMPARISONS = (
    ("random", "padding_percent", "padding", "%"),
    ("hf_mean_matched", "padding_percent", "padding", "%"),
    ("hf_mean_matched", "max_padded_seconds", "largest batch (peak memory)", "s"),
    ("hf_memory_safe", "batches", "batches per epoch", "batches"),
)


def own_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budgets", type=float, nargs="+", default=[100.0, 200.0], help="s")
    parser.add_argument("--cv_utterances", type=int, default=10_000, help="Common Voice-like")
    parser.add_argument("--epochs", type=int, default=3, help="epochs averaged")


def pack_in_order(order: np.ndarray, lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Cuts `order` into consecutive batches whose count × longest stays within `budget`
    (an utterance longer than that alone gets a batch, as in our sampler)."""
    batches, start, longest = [], 0, 0
    for position, index in enumerate(order):
        longest_with = max(longest, int(lengths[index]))
        if position > start and (position - start + 1) * longest_with > budget:
            batches.append(order[start:position])
            start, longest_with = position, int(lengths[index])
        longest = longest_with
    batches.append(order[start:])
    return batches


def length_grouped_batches(
    lengths: np.ndarray, batch_size: int, epoch: int, seed: int
) -> list[np.ndarray]:
    """LengthGroupedSampler's indices, cut into batches as the Trainer's DataLoader does."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    sampler = LengthGroupedSampler(batch_size, lengths=lengths.tolist(), generator=generator)
    indices = np.fromiter(iter(sampler), dtype=np.int64, count=lengths.size)
    return np.split(indices, range(batch_size, lengths.size, batch_size))


def batch_statistics(batches: list[np.ndarray], lengths: np.ndarray) -> dict[str, float]:
    """Padding fraction as DurationBucketSampler.padding_fraction defines it, plus batch sizes."""
    padded = np.array([b.size * int(lengths[b].max()) for b in batches], dtype=np.float64)
    real = float(sum(int(lengths[b].sum()) for b in batches))
    return {
        "padding_percent": 100 * (padded.sum() - real) / padded.sum(),
        "batches": len(batches),
        "mean_padded_seconds": float(padded.mean()) / SAMPLING_RATE,
        "max_padded_seconds": float(padded.max()) / SAMPLING_RATE,
        "mean_utterances_per_batch": lengths.size / len(batches),
    }


def mean_matched_batch_size(lengths: np.ndarray, budget: int, seed: int) -> int:
    """Largest fixed batch size whose mean padded seconds per batch is within the budget: a
    binary search from the memory-safe size, as the mean grows with the batch size."""
    low = max(1, budget // int(lengths.max()))
    high = max(low, budget // int(lengths.min()))
    while low < high:
        middle = (low + high + 1) // 2
        batches = length_grouped_batches(lengths, middle, 0, seed)
        fits = batch_statistics(batches, lengths)["mean_padded_seconds"] <= budget / SAMPLING_RATE
        low, high = (middle, high) if fits else (low, middle - 1)
    return low


def compare_methods(
    lengths: np.ndarray, seconds: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Every method's batch statistics at a budget of `seconds`, over --epochs epochs."""
    budget, seed = int(seconds * SAMPLING_RATE), args.seed
    ours = DurationBucketSampler(
        audio_lengths=lengths, sampling_rate=SAMPLING_RATE, max_batch_seconds=seconds, seed=seed
    )
    sizes = {"hf_mean_matched": mean_matched_batch_size(lengths, budget, seed)}
    sizes["hf_memory_safe"] = max(1, budget // int(lengths.max()))
    results: dict[str, Any] = {"budget_seconds": seconds}
    for method in METHODS:
        per_epoch = []
        for epoch in range(args.epochs):
            if method == "random":
                order = np.random.default_rng([seed, epoch]).permutation(lengths.size)
                batches = pack_in_order(order, lengths, budget)
            elif method == "ours":
                batches = [ranks[0] for ranks in ours.plan_epoch(epoch)]
            else:
                batches = length_grouped_batches(lengths, sizes[method], epoch, seed)
            per_epoch.append(batch_statistics(batches, lengths))
        results[method] = {
            key: (max if key == "max_padded_seconds" else np.mean)([e[key] for e in per_epoch])
            for key in per_epoch[0]
        }
        if method in sizes:
            results[method]["batch_size"] = sizes[method]
    return results


def demo_corpus_lengths(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """The lengths of --dataset, else of a demo corpus's clips at 16 kHz from their MP3 headers."""
    if args.dataset is not None:
        from preprocess.shard_format import ShardDataset

        return ShardDataset(str(args.dataset)).audio_lengths, f"prepared dataset {args.dataset}"
    import soundfile

    with harness.work_directory(args.work_dir) as work:
        manifest = harness.make_corpus(work, args.hours, args.unique_hours, args.seed)
        infos = [soundfile.info(path) for path in harness.manifest_audio_files(manifest)]
    lengths = [round(info.frames * SAMPLING_RATE / info.samplerate) for info in infos]
    source = f"demo corpus, {args.hours:g} h ({args.unique_hours:g} h distinct)"
    return np.asarray(lengths, np.int64), source


def main(argv: list[str] | None = None) -> int:
    shared = {"dataset": None, "hours": 10.0, "unique_hours": 0.5, "seed": 0, "work_dir": None}
    quick = {"hours": 0.05, "unique_hours": 0.05, "cv_utterances": 2_000, "epochs": 1}
    args = harness.parse_args(NAME, __doc__, argv, shared, quick, own_options)
    corpus_lengths, corpus_source = demo_corpus_lengths(args)
    cv_lengths = harness.common_voice_like_lengths(args.cv_utterances, args.seed)
    distributions = {"demo corpus": (corpus_lengths, corpus_source)}
    distributions["Common Voice-like"] = (cv_lengths, harness.CV_DESCRIPTION)
    details: dict[str, Any] = {"distributions": {}}
    rows = []
    for name, (lengths, source) in distributions.items():
        budgets = [compare_methods(lengths, budget, args) for budget in args.budgets]
        seconds = lengths / SAMPLING_RATE
        summary = {"utterances": int(lengths.size), "hours": float(seconds.sum() / 3600)}
        summary["distinct_lengths"] = int(np.unique(lengths).size)
        summary |= {f"p{q}_seconds": float(np.percentile(seconds, q)) for q in (1, 10, 50, 90, 99)}
        summary["max_seconds"] = float(seconds.max())
        details["distributions"][name] = {"source": source, "summary": summary, "budgets": budgets}
        for comparison in budgets:
            budget = comparison["budget_seconds"]
            for anchor, key, label, unit in COMPARISONS:
                metric = f"{label}, {name}, {budget:g} s padded per batch"
                figure = [(metric, key, unit, False, budget == args.budgets[0])]
                rows += figure_rows(
                    comparison["ours"], comparison[anchor], METHOD_LABELS[anchor], figure
                )
    return finish(args, rows, details)


if __name__ == "__main__":
    sys.exit(main())
