"""Renders every benchmarks/results/*.json as one Markdown table: RESULTS.md and the README.

Works for any result that follows the schema in benchmarks/benchmark_results.py (a top-level
"rows" list and a "machine"), so benchmarks added later need no change here. Files that do not
follow it are skipped with a warning; quick smoke-run results are skipped unless asked for.

README.md is only touched between the lines ``<!-- results:start -->`` and
``<!-- results:end -->``, and only if both exist; the README gets the headline rows only.

    python -m benchmarks.update_readme_table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.benchmark_results import REPO_ROOT, RESULTS_DIR, machine_summary

START_MARKER = "<!-- results:start -->"
END_MARKER = "<!-- results:end -->"
COLUMNS = ("Benchmark", "What is compared", "Ours", "Other", "Ours / other", "Machine")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.update_readme_table", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--results_dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--results_md", type=Path, default=RESULTS_DIR.parent / "RESULTS.md", help="written always"
    )
    parser.add_argument(
        "--readme", type=Path, default=REPO_ROOT / "README.md", help="updated between markers"
    )
    parser.add_argument("--include_quick", action="store_true", help="also list --quick runs")
    return parser.parse_args(argv)


def load_results(results_dir: Path, include_quick: bool) -> list[tuple[Path, dict[str, Any]]]:
    """Readable results with a rows list, sorted by file name."""
    results = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            print(f"skipping {path}: {error}", file=sys.stderr)
            continue
        if not isinstance(document, dict) or not isinstance(document.get("rows"), list):
            print(f"skipping {path}: no 'rows' list", file=sys.stderr)
            continue
        if document.get("quick") and not include_quick:
            continue
        results.append((path, document))
    return results


def format_number(value: Any) -> str:
    """Three significant digits, thousands separated; anything non-numeric as text."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "–" if value is None else str(value)
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def format_ratio(row: dict[str, Any]) -> str:
    """ours / other, marked lead or trail according to higher_is_better."""
    ratio = row.get("ratio")
    ours, other = row.get("ours"), row.get("baseline")
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (ours, other))
    if ratio is None and numeric and other:
        ratio = ours / other
    if not isinstance(ratio, int | float):
        return "–"
    higher_is_better = row.get("higher_is_better")
    if higher_is_better is None or ratio == 1:
        return f"{ratio:.2f}"
    leads = ratio > 1 if higher_is_better else ratio < 1
    return f"{ratio:.2f} ({'lead' if leads else 'trail'})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(
    results: list[tuple[Path, dict[str, Any]]], headline_only: bool, link_base: Path
) -> str:
    """Markdown table, one line per row; links to the JSON files relative to `link_base`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for path, document in results:
        name = document.get("benchmark") or path.stem
        link = Path(os.path.relpath(path, link_base)).as_posix()
        machine = document.get("machine")
        machine_text = machine_summary(machine) if isinstance(machine, dict) else "?"
        for row in document["rows"]:
            if not isinstance(row, dict) or (headline_only and not row.get("headline", True)):
                continue
            unit = f" {row['unit']}" if row.get("unit") else ""
            compared = f"{row.get('metric', '?')}; other = {row.get('baseline_name', '?')}"
            cells = (
                f"[{name}]({link})",
                compared,
                format_number(row.get("ours")) + unit,
                format_number(row.get("baseline")) + unit,
                format_ratio(row),
                machine_text,
            )
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render_results_md(results: list[tuple[Path, dict[str, Any]]], results_md: Path) -> str:
    """The full page: every row, then each benchmark's command, notes and plot."""
    base = results_md.parent
    parts = [
        "# Benchmark results\n",
        "Generated by `python -m benchmarks.update_readme_table` from `benchmarks/results/*.json`;"
        " edit those (by rerunning the benchmarks), not this file. Ratios are ours / other; "
        "'lead' or 'trail' accounts for whether higher or lower is better.\n",
        render_table(results, headline_only=False, link_base=base),
    ]
    for path, document in results:
        name = document.get("benchmark") or path.stem
        parts.append(f"## {document.get('title') or name} (`{path.name}`)\n")
        facts = [
            f"- command: `{document['command_line']}`" if document.get("command_line") else "",
            f"- commit: `{document['git_commit']}`" if document.get("git_commit") else "",
            f"- measured: {document['created_utc']}" if document.get("created_utc") else "",
        ]
        parts.append("\n".join(f for f in facts if f) + "\n")
        notes = document.get("notes") or []
        if notes:
            parts.append("\n".join(f"- {note}" for note in notes) + "\n")
        plot = document.get("plot")
        if plot and (path.parent / plot).exists():
            link = Path(os.path.relpath(path.parent / plot, base)).as_posix()
            parts.append(f"![{name}]({link})\n")
    return "\n".join(parts)


def replace_between_markers(text: str, table: str) -> str | None:
    """`text` with the marked block replaced, or None if the markers are missing or misordered."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        return None
    return text[: start + len(START_MARKER)] + "\n\n" + table + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = load_results(args.results_dir, args.include_quick)
    args.results_md.write_text(render_results_md(results, args.results_md), encoding="utf-8")
    print(f"wrote {args.results_md} ({sum(len(d['rows']) for _, d in results)} rows)")
    if not args.readme.exists():
        return 0
    readme = args.readme.read_text(encoding="utf-8")
    link = Path(os.path.relpath(args.results_md, args.readme.parent)).as_posix()
    table = render_table(results, headline_only=True, link_base=args.readme.parent)
    table += f"\nAll rows, notes and plots: [{link}]({link}).\n"
    updated = replace_between_markers(readme, table)
    if updated is None:
        print(f"{args.readme} has no {START_MARKER} ... {END_MARKER} block; left unchanged")
    elif updated != readme:
        args.readme.write_text(updated, encoding="utf-8")
        print(f"updated the results table in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
