"""What every benchmark writes: one JSON file with rows, machine info and notes, and a PNG plot.

The JSON schema is shared so `update_readme_table` can render results of any benchmark, including
ones written later, without knowing them::

    {
      "benchmark": "preprocess_throughput", "title": "...", "schema_version": 1,
      "quick": false, "created_utc": "...", "command_line": "...", "git_commit": "...",
      "machine": {"cpu_model", "cores", "ram_gib", "gpu", "os", "python", "packages"},
      "rows": [{"metric", "ours", "baseline", "baseline_name", "ratio", "unit",
                "higher_is_better", "headline"}],
      "details": {...benchmark specific...}, "notes": ["..."], "plot": "NAME.png"
    }

``ratio`` is always ours / baseline; ``higher_is_better`` says which side of 1 is a lead.
Rows with ``headline: false`` appear in RESULTS.md but not in the README table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# Versions worth knowing when comparing results across machines; missing ones are skipped.
PACKAGES = (
    "numpy",
    "pyarrow",
    "ray",
    "torch",
    "transformers",
    "datasets",
    "soundfile",
    "soxr",
    "librosa",
    "psutil",
)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark has: where results go and whether this is a tiny smoke run."""
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=RESULTS_DIR,
        help="directory for NAME.json and NAME.png (default: benchmarks/results)",
    )
    parser.add_argument(
        "--tag",
        default="",
        help="suffix for the file names, e.g. the machine: NAME-TAG.json (default: none)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for a smoke run under a minute; files get a -quick suffix and the "
        "README table skips them",
    )


def result_stem(name: str, args: argparse.Namespace) -> Path:
    """Path without extension; quick runs never overwrite real results."""
    suffix = (f"-{args.tag}" if args.tag else "") + ("-quick" if args.quick else "")
    return Path(args.output_dir) / f"{name}{suffix}"


def result_row(
    metric: str,
    ours: float,
    baseline: float,
    baseline_name: str,
    unit: str,
    higher_is_better: bool,
    headline: bool = True,
) -> dict[str, Any]:
    """One comparison, the unit of the results table."""
    return {
        "metric": metric,
        "ours": ours,
        "baseline": baseline,
        "baseline_name": baseline_name,
        "ratio": ours / baseline if baseline else None,
        "unit": unit,
        "higher_is_better": higher_is_better,
        "headline": headline,
    }


def git_commit() -> str | None:
    """HEAD's commit read from .git directly, so benchmarks never run git themselves."""
    git_dir = REPO_ROOT / ".git"
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        if (git_dir / ref).exists():
            return (git_dir / ref).read_text().strip()
        for line in (git_dir / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split(" ", 1)[0]
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    # nvidia-smi instead of torch.cuda: no CUDA initialisation, and works without torch.
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listing.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    """Hardware and software the figures were measured on."""
    packages = {}
    for package in PACKAGES:
        try:
            packages[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu_model": _cpu_model(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": _gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": packages,
    }


def machine_summary(machine: dict[str, Any]) -> str:
    """One line for tables, e.g. 'AMD EPYC, 2 cores, 23.4 GiB, no GPU'."""
    gpus = machine.get("gpu") or []
    gpu = f"{len(gpus)}× {gpus[0].split(',')[0]}" if gpus else "no GPU"
    parts = [
        str(machine.get("cpu_model", "?")),
        f"{machine.get('cores', '?')} cores",
        f"{machine.get('ram_gib', '?')} GiB",
        gpu,
    ]
    return ", ".join(parts)


def write_results(
    name: str,
    title: str,
    args: argparse.Namespace,
    argv: Sequence[str],
    rows: list[dict[str, Any]],
    details: dict[str, Any],
    notes: list[str],
) -> Path:
    """Writes NAME.json beside the plot (same stem) and returns its path."""
    stem = result_stem(name, args)
    stem.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "title": title,
        "schema_version": SCHEMA_VERSION,
        "quick": bool(args.quick),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command_line": f"python -m benchmarks.{name} {shlex.join(argv)}".strip(),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "rows": rows,
        "details": details,
        "notes": notes,
        "plot": stem.with_suffix(".png").name,
    }
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def new_figure(columns: int, title: str, width_per_column: float = 5.5) -> tuple[Any, list[Any]]:
    """A row of `columns` axes with a headless backend (benchmarks run on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        1, columns, figsize=(width_per_column * columns, 4.2), squeeze=False
    )
    figure.suptitle(title)
    return figure, list(axes[0])


def grouped_bars(
    axis: Any,
    group_labels: Sequence[str],
    series: dict[str, Sequence[float]],
    ylabel: str,
    value_format: str = "{:.0f}",
) -> None:
    """Bars of several series side by side per group, each bar labelled with its value."""
    width = 0.8 / max(len(series), 1)
    for position, (label, values) in enumerate(series.items()):
        offsets = [g + (position - (len(series) - 1) / 2) * width for g in range(len(group_labels))]
        bars = axis.bar(offsets, values, width, label=label)
        axis.bar_label(bars, labels=[value_format.format(v) for v in values], fontsize=7)
    axis.set_xticks(range(len(group_labels)), group_labels)
    axis.set_ylabel(ylabel)
    # Headroom above the tallest bar keeps the legend off the bars.
    axis.margins(y=0.1 + 0.07 * len(series))
    axis.legend(fontsize=7, loc="upper left")


def save_figure(figure: Any, args: argparse.Namespace, name: str) -> Path:
    """Saves the PNG next to the JSON result and closes the figure."""
    import matplotlib.pyplot as plt

    path = result_stem(name, args).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def print_rows(rows: list[dict[str, Any]], out: Any = sys.stdout) -> None:
    """Console summary of a result's rows."""
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "n/a"
        print(
            f"{row['metric']}: ours {row['ours']:.4g} {row['unit']} vs "
            f"{row['baseline_name']} {row['baseline']:.4g} {row['unit']} (ratio {ratio})",
            file=out,
        )
