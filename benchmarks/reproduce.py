"""Regenerate docs/REPRODUCTION.md: the papers' findings measured with blockopt.

    python benchmarks/reproduce.py                    # full suite (under 15 minutes on 2 cores)
    python benchmarks/reproduce.py --quick            # smoke run into a scratch directory
    python benchmarks/reproduce.py --only calibration # rerun some parts, keep the others

Writes the markdown, its PNG figures under docs/figures/ and the raw numbers to
docs/reproduction.json. With ``--only``, the parts not named keep their section, numbers, run
time and date from the existing page and JSON (the calibration reads the kept parts' numbers).
Everything runs on data that ships with installed packages.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = [
    ("a", "repro_init"),
    ("b", "repro_quadratic"),
    ("c", "repro_attention"),
    ("d", "repro_training"),
    ("e", "repro_kernels"),
    ("calibration", "repro_calibration"),
]
ROOT = Path(__file__).resolve().parents[1]


RUNS = "runs"  # the JSON's record of each part's run time and date, beside the parts' data


@dataclass(frozen=True)
class Kept:
    """A part kept from the existing page: its markdown section (heading included), data, run
    seconds and date."""

    markdown: str
    data: Any
    seconds: float
    day: str


def existing_parts(out: Path) -> dict[str, Kept]:
    """The parts of an existing ``REPRODUCTION.md`` with their data in ``reproduction.json``,
    by part key; none when either file is missing. Pages written before run records were kept
    give every part the page's own date and the per-part times of its header."""
    page, raw = out / "REPRODUCTION.md", out / "reproduction.json"
    if not (page.is_file() and raw.is_file()):
        return {}
    text, data = page.read_text(), json.loads(raw.read_text())
    runs = data.pop(RUNS, {})
    day = re.search(r"(\d{4}-\d{2}-\d{2})\)\.", text)
    times = dict(re.findall(r"\((\w+)\) (\d+)s", text.split("\n## ", 1)[0]))
    kept = {}
    for chunk in re.split(r"\n(?=## )", text)[1:]:
        m = re.match(r"## \((\w)\) ", chunk)
        key = m.group(1) if m else "calibration"
        if key not in data:
            continue
        run = runs.get(key, {})
        kept[key] = Kept(
            chunk.rstrip("\n"),
            data[key],
            float(run.get("seconds", times.get(key, 0))),
            run.get("date", day.group(1) if day else "unknown date"),
        )
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: docs/, or a new scratch directory with --quick)",
    )
    parser.add_argument(
        "--only", nargs="*", help="rerun only these parts (e.g. a b); keep the others as they are"
    )
    args = parser.parse_args(argv)
    keys = [k for k, _ in PARTS]
    unknown = sorted(set(args.only or ()) - set(keys))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(keys)}")
    if args.out is None:  # a smoke run never writes over (or merges into) the real page
        args.out = Path(tempfile.mkdtemp(prefix="blockopt-repro-")) if args.quick else ROOT / "docs"
    fig_dir = args.out / "figures"
    kept = existing_parts(args.out) if args.only else {}
    body, data, runs = [], {}, {}
    today = str(date.today())
    start = time.perf_counter()
    for key, module_name in PARTS:
        if args.only and key not in args.only:
            if key in kept:
                body.append(kept[key].markdown)
                data[key] = kept[key].data
                runs[key] = {"seconds": kept[key].seconds, "date": kept[key].day}
            continue
        module = importlib.import_module(module_name)
        t0 = time.perf_counter()
        if key == "calibration":
            section = module.run(fig_dir, data, quick=args.quick)
        else:
            section = module.run(fig_dir, quick=args.quick)
        seconds = time.perf_counter() - t0
        print(f"part {key}: {seconds:.0f}s", flush=True)
        title = f"## ({section.key}) {section.title}" if len(key) == 1 else f"## {section.title}"
        body.append(f"{title}\n\n{section.markdown}")
        data[key] = section.data
        runs[key] = {"seconds": seconds, "date": today}
    total = sum(r["seconds"] for r in runs.values())
    days = sorted({r["date"] for r in runs.values()})
    cpu = platform.processor() or platform.machine()
    when = days[0] if len(days) == 1 else f"parts run from {days[0]} to {days[-1]}"
    header = [
        "# Reproduction of the papers' findings",
        "Regenerate this page, its figures and `reproduction.json` from scratch with "
        f"`python benchmarks/reproduce.py` (this run: {total / 60:.1f} minutes on "
        f"{torch.get_num_threads()} threads, {cpu}, torch {torch.__version__}, {when}). "
        "All data ships with installed packages (scikit-learn digits, the text of Python's "
        "`pydoc_data.topics`); nothing is downloaded. Each part states the paper's claim, our "
        "measurement and whether they agree.",
        "Per-part run time: "
        + ", ".join(
            f"({k}) {r['seconds']:.0f}s" + ("" if len(days) == 1 else f" on {r['date']}")
            for k, r in runs.items()
        )
        + ".",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "REPRODUCTION.md").write_text("\n\n".join(header + body) + "\n")
    record = {**data, RUNS: runs}
    (args.out / "reproduction.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    print(f"wrote {args.out / 'REPRODUCTION.md'} in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
