"""What every benchmark writes: one JSON file of rows, machine and notes, and a PNG plot, in a
schema `update_readme_table` renders whatever the benchmark::

    {"benchmark", "title", "schema_version": 1, "quick", "created_utc", "command_line",
     "settings", "git_commit",
     "machine": {"cpu_model", "cores", "ram_gib", "gpu", "os", "python", "packages"},
     "rows": [{"metric", "ours", "baseline", "baseline_name", "ratio", "unit",
               "higher_is_better", "headline"}], "details": {...}, "notes": [...], "plot"}

A row compares ours with its anchor (``baseline``) measured in the same run: ``ratio`` is
ours / baseline, ``higher_is_better`` says which side of 1 leads; rows with ``headline: false``
appear in RESULTS.md only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import platform
import re
import shlex
import subprocess
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from benchmarks.process_tree import machine_cores

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# Versions worth knowing when comparing results across machines; missing ones are skipped.
PACKAGES = ("numpy", "pyarrow", "ray", "torch", "transformers", "datasets", "deepspeed")
PACKAGES += ("soundfile", "soxr", "librosa", "psutil")


def result_row(
    metric: str,
    ours: float,
    baseline: float,
    baseline_name: str,
    unit: str,
    higher_is_better: bool,
    headline: bool = True,
) -> dict[str, Any]:
    """One comparison of ours with its anchor, the unit of the results table."""
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


def figure_rows(
    ours: dict[str, Any], anchor: dict[str, Any], anchor_name: str, figures: Sequence[tuple]
) -> list[dict[str, Any]]:
    """A row per (metric, key, unit, higher is better, headline) of `figures` both sides have."""
    return [
        result_row(metric, ours[key], anchor[key], anchor_name, unit, higher_is_better, headline)
        for metric, key, unit, higher_is_better, headline in figures
        if ours.get(key) is not None and anchor.get(key) is not None
    ]


def git_commit() -> str | None:
    """HEAD's commit read from .git directly, so benchmarks never run git themselves."""
    git_dir = REPO_ROOT / ".git"
    with contextlib.suppress(OSError):
        head = (git_dir / "HEAD").read_text().strip()
        ref = head.removeprefix("ref: ")
        if ref == head:
            return head  # detached
        if (git_dir / ref).exists():
            return (git_dir / ref).read_text().strip()
        packed = (git_dir / "packed-refs").read_text().splitlines()
        return next((line.split(" ")[0] for line in packed if line.endswith(" " + ref)), None)
    return None


def machine_info() -> dict[str, Any]:
    """Hardware and software the figures were measured on."""
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        models = [line.split(":", 1)[1] for line in cpuinfo if line.startswith("model name")]
    # nvidia-smi instead of torch.cuda: no CUDA initialisation, and works without torch.
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
    try:
        listing = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True)
        gpus = [line.strip() for line in listing.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        gpus = []
    packages = {}
    for package in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[package] = importlib.metadata.version(package)
    return {
        "cpu_model": models[0].strip() if models else platform.processor() or platform.machine(),
        "cores": machine_cores(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpus,
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": packages,
    }


def machine_summary(machine: dict[str, Any]) -> str:
    """One line for tables, e.g. 'AMD EPYC, 2 cores, 23.4 GiB, no GPU'."""
    gpus = machine.get("gpu") or []
    gpu = f"{len(gpus)}× {gpus[0].split(',')[0]}" if gpus else "no GPU"
    cores, ram = machine.get("cores", "?"), machine.get("ram_gib", "?")
    return f"{machine.get('cpu_model', '?')}, {cores} cores, {ram} GiB, {gpu}"


def finish(
    args: argparse.Namespace, rows: list[dict], details: dict[str, Any], final: bool = True
) -> int:
    """Writes NAME.json and, where matplotlib is, NAME.png, then prints the rows (unless a
    partial result, not `final`); the exit code. Title and notes come from the benchmark's
    docstring (args.benchmark, kept by harness.parse_args): one text, in the code and beside the
    figures, says how they were measured."""
    name, doc, argv = args.benchmark
    # NAME[-TAG][-quick]: quick runs never overwrite real results.
    suffix = (f"-{args.tag}" if args.tag else "") + ("-quick" if args.quick else "")
    stem = Path(args.output_dir) / f"{name}{suffix}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot = stem.with_suffix(".png") if importlib.util.find_spec("matplotlib") else None
    paragraphs = (doc or name).strip().split("\n\n")
    # Bullets and numbered items are notes of their own; indented usage examples are left out.
    notes = [
        " ".join(item.split()).removeprefix("* ")
        for paragraph in paragraphs[1:]
        if not paragraph.startswith("    ")
        for item in re.split(r"\n(?=\* |\d\. )", paragraph)
    ]
    document = {
        "benchmark": name,
        "title": paragraphs[0],
        "schema_version": SCHEMA_VERSION,
        "quick": bool(args.quick),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command_line": f"python -m benchmarks.{name} {shlex.join(argv)}".strip(),
        # Every option's value, defaults and those the benchmark resolved included.
        "settings": {key: value for key, value in vars(args).items() if key != "benchmark"},
        "git_commit": git_commit(),
        "machine": machine_info(),
        "rows": rows,
        "details": details,
        "notes": notes,
        "plot": plot.name if plot else None,
    }
    path = stem.with_suffix(".json")
    text = json.dumps(document, indent=1, ensure_ascii=False, default=str)  # paths as text
    path.write_text(text + "\n", encoding="utf-8")
    if plot:
        plot_rows(rows, f"{name} on {machine_summary(document['machine'])}", plot)
    if not final:
        return 0
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "n/a"
        print(
            f"{row['metric']}: ours {row['ours']:.4g} {row['unit']} vs "
            f"{row['baseline_name']} {row['baseline']:.4g} {row['unit']} (ratio {ratio})"
        )
    print(f"wrote {path}")
    return 0


def plot_rows(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Saves every row's ours / anchor as a bar (1 = parity, green where ours leads) to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # benchmarks run on servers
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row["ratio"]]
    ratios = [row["ratio"] for row in rows]
    figure, axis = plt.subplots(figsize=(13, 1.4 + 0.3 * len(rows)))
    leads = [(row["ratio"] > 1) == row["higher_is_better"] for row in rows]
    axis.barh(range(len(rows)), ratios, color=["tab:green" if x else "tab:red" for x in leads])
    axis.axvline(1, color="black", linewidth=0.8)
    labels = [f"{row['metric']}; anchor = {row['baseline_name']}" for row in rows]
    axis.set_yticks(range(len(rows)), [textwrap.shorten(t, 100) for t in labels], fontsize=7)
    for y, row in enumerate(rows):
        figures = f" {row['ours']:.3g} vs {row['baseline']:.3g} {row['unit']}"
        axis.annotate(figures, (row["ratio"], y), va="center", fontsize=7)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlim(min([*ratios, 1]) / 1.5, max([*ratios, 1]) * 4)  # room for the figures
    axis.set_xlabel("ours / anchor, measured in the same run (green: ours leads)")
    axis.set_title(title, fontsize=9)
    figure.savefig(path, dpi=110, bbox_inches="tight")  # the long labels included
    plt.close(figure)
