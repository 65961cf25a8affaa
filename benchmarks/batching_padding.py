"""Padding and batch count at the same memory budget: random, HF LengthGroupedSampler, ours.

The memory budget is padded audio per batch, ``len(batch) * longest / sampling_rate`` seconds:
activation memory of a wav2vec2 batch grows with it. Compared on two length distributions (the
demo corpus and one shaped like Common Voice), per budget:

* random: shuffled utterances packed greedily while the padded batch fits the budget
  (dynamic batch size, never over budget), i.e. batching without any length awareness.
* HF LengthGroupedSampler (transformers.trainer_pt_utils, what Trainer(group_by_length=True)
  uses: random mega-batches of 50 batches, sorted by length, cut into fixed-size batches).
  Its batch size is fixed, so two equivalences are reported: "mean-matched", the largest
  batch size whose mean padded seconds per batch stays within the budget (same average memory,
  but single batches exceed it: see max_padded_seconds), and "memory-safe", budget // longest
  utterance, which can never exceed it.
* ours: train.duration_bucket_sampler.DurationBucketSampler(max_batch_seconds=budget).

    python -m benchmarks.batching_padding --budgets 100 200
    python -m benchmarks.batching_padding --dataset data/train   # lengths of a prepared dataset
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from benchmarks.benchmark_inputs import clip_num_samples, make_corpus, work_directory
from benchmarks.benchmark_results import (
    add_output_arguments,
    grouped_bars,
    new_figure,
    print_rows,
    result_row,
    save_figure,
    write_results,
)
from preprocess.shard_format import ShardDataset
from train.duration_bucket_sampler import DurationBucketSampler

NAME = "batching_padding"
SAMPLING_RATE = 16_000
# Common Voice-like clip lengths: lognormal with a 4.5 s median and sigma 0.35 (about 95 % of
# clips between 2.3 and 8.9 s), redrawn outside [1, 10] s because the Common Voice recorder
# stops at 10 s and clips under a second are rejected at validation.
CV_MEDIAN_SECONDS = 4.5
CV_SIGMA = 0.35
CV_RANGE_SECONDS = (1.0, 10.0)
METHODS = ("random", "hf_mean_matched", "hf_memory_safe", "ours")
METHOD_LABELS = {
    "random": "random (budget-packed)",
    "hf_mean_matched": "HF LengthGrouped, mean-matched batch size",
    "hf_memory_safe": "HF LengthGrouped, memory-safe batch size",
    "ours": "ours (DurationBucketSampler)",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[100.0, 200.0],
        help="padded seconds per batch (default: 100 200)",
    )
    parser.add_argument(
        "--dataset", type=Path, default=None, help="prepared dataset whose lengths to use"
    )
    parser.add_argument(
        "--corpus_hours",
        type=float,
        default=10.0,
        help="demo corpus generated when no --dataset is given (default: 10)",
    )
    parser.add_argument(
        "--corpus_unique_hours",
        type=float,
        default=0.5,
        help="distinct audio in that corpus; the rest repeats its lengths (default: 0.5)",
    )
    parser.add_argument(
        "--cv_utterances",
        type=int,
        default=10_000,
        help="utterances drawn for the Common Voice-like distribution (default: 10000)",
    )
    parser.add_argument(
        "--num_buckets",
        type=int,
        default=30,
        help="DurationBucketSampler num_buckets (default: 30, the sampler's default)",
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs averaged (default: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", type=Path, default=None, help="where the corpus goes")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.corpus_hours = args.corpus_unique_hours = 0.05
        args.cv_utterances, args.epochs = 2_000, 1
    return args


def common_voice_like_lengths(count: int, seed: int) -> np.ndarray:
    """Clip lengths in samples drawn from the truncated lognormal described above."""
    rng = np.random.default_rng(seed)
    seconds = np.empty(0)
    while seconds.size < count:
        draws = rng.lognormal(np.log(CV_MEDIAN_SECONDS), CV_SIGMA, count)
        low, high = CV_RANGE_SECONDS
        seconds = np.concatenate([seconds, draws[(draws >= low) & (draws <= high)]])
    return np.round(seconds[:count] * SAMPLING_RATE).astype(np.int64)


def pack_in_order(order: np.ndarray, lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Cuts `order` into consecutive batches whose count × longest stays within `budget`.

    An utterance longer than the budget gets a batch of its own, as in our sampler.
    """
    batches, start, longest = [], 0, 0
    for position, index in enumerate(order):
        longest_with = max(longest, int(lengths[index]))
        if position > start and (position - start + 1) * longest_with > budget:
            batches.append(order[start:position])
            start, longest_with = position, int(lengths[index])
        longest = longest_with
    batches.append(order[start:])
    return batches


def random_batches(lengths: np.ndarray, budget: int, epoch: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng([seed, epoch]).permutation(lengths.size)
    return pack_in_order(order, lengths, budget)


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


def mean_padded_seconds(lengths: np.ndarray, batch_size: int, seed: int) -> float:
    batches = length_grouped_batches(lengths, batch_size, 0, seed)
    return batch_statistics(batches, lengths)["mean_padded_seconds"]


def mean_matched_batch_size(lengths: np.ndarray, budget: int, seed: int) -> int:
    """Largest fixed batch size whose mean padded seconds per batch is within the budget.

    Mean padded size grows with the batch size (longer batches, longer maxima), so a binary
    search between the memory-safe size and budget // shortest finds it.
    """
    low = max(1, budget // int(lengths.max()))
    high = max(low, budget // int(lengths.min()))
    budget_seconds = budget / SAMPLING_RATE
    while low < high:
        middle = (low + high + 1) // 2
        if mean_padded_seconds(lengths, middle, seed) <= budget_seconds:
            low = middle
        else:
            high = middle - 1
    return low


def compare_methods(
    lengths: np.ndarray, budget_seconds: float, epochs: int, seed: int, num_buckets: int
) -> dict[str, Any]:
    """Every method's statistics at one budget, averaged over `epochs` epochs."""
    budget = int(budget_seconds * SAMPLING_RATE)
    ours = DurationBucketSampler(
        num_samples=lengths,
        sampling_rate=SAMPLING_RATE,
        max_batch_seconds=budget_seconds,
        num_buckets=num_buckets,
        seed=seed,
    )
    safe_size = max(1, budget // int(lengths.max()))
    matched_size = mean_matched_batch_size(lengths, budget, seed)
    batchers: dict[str, Callable[[int], list[np.ndarray]]] = {
        "random": lambda epoch: random_batches(lengths, budget, epoch, seed),
        "hf_mean_matched": lambda epoch: length_grouped_batches(lengths, matched_size, epoch, seed),
        "hf_memory_safe": lambda epoch: length_grouped_batches(lengths, safe_size, epoch, seed),
        "ours": lambda epoch: [ranks[0] for ranks in ours.plan_epoch(epoch)],
    }
    results: dict[str, Any] = {"budget_seconds": budget_seconds}
    for method, batcher in batchers.items():
        per_epoch = [batch_statistics(batcher(epoch), lengths) for epoch in range(epochs)]
        results[method] = {
            key: max(e[key] for e in per_epoch)
            if key == "max_padded_seconds"
            else float(np.mean([e[key] for e in per_epoch]))
            for key in per_epoch[0]
        }
    results["hf_mean_matched"]["batch_size"] = matched_size
    results["hf_memory_safe"]["batch_size"] = safe_size
    return results


def describe_lengths(lengths: np.ndarray) -> dict[str, float]:
    seconds = lengths / SAMPLING_RATE
    return {
        "utterances": int(lengths.size),
        "hours": float(seconds.sum() / 3600),
        "distinct_lengths": int(np.unique(lengths).size),
        **{f"p{q}_seconds": float(np.percentile(seconds, q)) for q in (1, 10, 50, 90, 99)},
        "max_seconds": float(seconds.max()),
    }


def build_rows(distributions: dict[str, Any], budgets: list[float]) -> list[dict[str, Any]]:
    rows = []
    for name, distribution in distributions.items():
        for comparison in distribution["budgets"]:
            budget = comparison["budget_seconds"]
            where = f"{name}, {budget:g} s padded per batch"
            headline = budget == budgets[0]
            ours = comparison["ours"]
            for baseline, metric, label, unit in (
                ("random", "padding_percent", "padding", "%"),
                ("hf_mean_matched", "padding_percent", "padding", "%"),
                ("hf_mean_matched", "max_padded_seconds", "largest batch (peak memory)", "s"),
                ("hf_memory_safe", "batches", "batches per epoch", "batches"),
            ):
                rows.append(
                    result_row(
                        f"{label}, {where}",
                        ours[metric],
                        comparison[baseline][metric],
                        METHOD_LABELS[baseline],
                        unit,
                        higher_is_better=False,
                        headline=headline,
                    )
                )
    return rows


def plot(distributions: dict[str, Any], args: argparse.Namespace) -> None:
    groups = [
        (name, comparison)
        for name, distribution in distributions.items()
        for comparison in distribution["budgets"]
    ]
    labels = [f"{name}\n{c['budget_seconds']:g} s" for name, c in groups]
    figure, (padding_axis, batches_axis, lengths_axis) = new_figure(
        3, "Batching at equal padded-seconds budget", width_per_column=6.5
    )
    for axis, metric, ylabel, value_format in (
        (padding_axis, "padding_percent", "padding, % of padded samples", "{:.1f}"),
        (batches_axis, "batches", "batches per epoch", "{:.0f}"),
    ):
        series = {METHOD_LABELS[m]: [c[m][metric] for _, c in groups] for m in METHODS}
        grouped_bars(axis, labels, series, ylabel, value_format)
    for name, distribution in distributions.items():
        lengths_axis.hist(
            distribution["lengths"] / SAMPLING_RATE, bins=60, alpha=0.6, density=True, label=name
        )
    lengths_axis.set_xlabel("utterance length, s")
    lengths_axis.set_ylabel("density")
    lengths_axis.legend(fontsize=8)
    save_figure(figure, args, NAME)


def demo_corpus_lengths(args: argparse.Namespace, work: Path) -> tuple[np.ndarray, str]:
    if args.dataset is not None:
        return ShardDataset(str(args.dataset)).num_samples, f"prepared dataset {args.dataset}"
    manifest = make_corpus(work, args.corpus_hours, args.corpus_unique_hours, args.seed)
    source = (
        f"demo corpus, {args.corpus_hours:g} h ({args.corpus_unique_hours:g} h distinct), "
        "lengths from MP3 headers"
    )
    return clip_num_samples(manifest, SAMPLING_RATE), source


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    with work_directory(args.work_dir) as work:
        corpus_lengths, corpus_source = demo_corpus_lengths(args, work)
    distributions: dict[str, Any] = {
        "demo corpus": {"lengths": corpus_lengths, "source": corpus_source},
        "Common Voice-like": {
            "lengths": common_voice_like_lengths(args.cv_utterances, args.seed),
            "source": (
                f"lognormal, median {CV_MEDIAN_SECONDS} s, sigma {CV_SIGMA}, redrawn outside "
                f"{CV_RANGE_SECONDS[0]:g}-{CV_RANGE_SECONDS[1]:g} s"
            ),
        },
    }
    for distribution in distributions.values():
        lengths = distribution["lengths"]
        distribution["summary"] = describe_lengths(lengths)
        distribution["budgets"] = [
            compare_methods(lengths, budget, args.epochs, args.seed, args.num_buckets)
            for budget in args.budgets
        ]
    rows = build_rows(distributions, args.budgets)
    notes = [
        "Budget = padded seconds per batch (batch size × longest utterance), the quantity "
        "activation memory grows with. Padding % = padded samples that are padding, summed "
        f"over an epoch, averaged over {args.epochs} epoch(s).",
        "random and ours never exceed the budget. HF's batch size is fixed: 'mean-matched' "
        "uses the largest size whose mean padded seconds per batch fits the budget (its "
        "max_padded_seconds shows how far single batches overshoot); 'memory-safe' uses "
        "budget // longest utterance, which never overshoots. Batch counts are compared with "
        "the memory-safe one, padding and the largest batch with the mean-matched one.",
        "LengthGroupedSampler is used as Trainer(group_by_length=True) uses it with "
        "gradient_accumulation_steps=1: mega-batches of min(50, n // (4 × batch size)) batches.",
        "Fewer batches per epoch at the same budget means more audio per optimizer step and "
        "fewer steps per epoch.",
    ]
    details = {
        "budgets_seconds": args.budgets,
        "epochs": args.epochs,
        "num_buckets": args.num_buckets,
        "distributions": {
            name: {key: value for key, value in d.items() if key != "lengths"}
            for name, d in distributions.items()
        },
    }
    path = write_results(
        NAME, "Padding and batches at equal memory", args, argv, rows, details, notes
    )
    plot(distributions, args)
    print_rows(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
