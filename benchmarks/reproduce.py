"""Regenerate docs/REPRODUCTION.md: the papers' findings measured with blockopt.

    python benchmarks/reproduce.py            # full suite (under 15 minutes on 2 CPU cores)
    python benchmarks/reproduce.py --quick    # smoke run into a scratch directory

Writes the markdown, its PNG figures under docs/figures/ and the raw numbers to
docs/reproduction.json. Everything runs on data that ships with installed packages.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="output directory")
    parser.add_argument("--only", nargs="*", help="run only these parts (e.g. a b)")
    args = parser.parse_args(argv)
    fig_dir = args.out / "figures"
    sections, data, timings = [], {}, {}
    start = time.perf_counter()
    for key, module_name in PARTS:
        if args.only and key not in args.only:
            continue
        module = importlib.import_module(module_name)
        t0 = time.perf_counter()
        if key == "calibration":
            section = module.run(fig_dir, data, quick=args.quick)
        else:
            section = module.run(fig_dir, quick=args.quick)
        timings[key] = time.perf_counter() - t0
        print(f"part {key}: {timings[key]:.0f}s", flush=True)
        sections.append(section)
        data[key] = section.data
    total = time.perf_counter() - start
    cpu = platform.processor() or platform.machine()
    header = [
        "# Reproduction of the papers' findings",
        "Regenerate this page, its figures and `reproduction.json` from scratch with "
        f"`python benchmarks/reproduce.py` (this run: {total / 60:.1f} minutes on "
        f"{torch.get_num_threads()} threads, {cpu}, torch {torch.__version__}, {date.today()}). "
        "All data ships with installed packages (scikit-learn digits, the text of Python's "
        "`pydoc_data.topics`); nothing is downloaded. Each part states the paper's claim, our "
        "measurement and whether they agree.",
        "Per-part run time: " + ", ".join(f"({k}) {v:.0f}s" for k, v in timings.items()) + ".",
    ]
    body = [
        f"## ({s.key}) {s.title}\n\n{s.markdown}"
        if len(s.key) == 1
        else f"## {s.title}\n\n{s.markdown}"
        for s in sections
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "REPRODUCTION.md").write_text("\n\n".join(header + body) + "\n")
    (args.out / "reproduction.json").write_text(json.dumps(data, indent=1, sort_keys=True))
    print(f"wrote {args.out / 'REPRODUCTION.md'} in {total:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
