"""The long-run wall-time benchmark, on a tiny smoke run: it prints a table per setting and the
targets with a wall ratio, and writes nothing."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_long


def test_best_override_parses_and_rejects_unknown_names() -> None:
    assert bench_long.parse_best("gpt=adam:0.001") == ("gpt", ("adam", 0.001))
    for bad in ("gpt=adam", "mlp=adam:0.1", "gpt=lion:0.1", "gpt=adam:x"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"KEY=MODE:LR|unknown"):
            bench_long.parse_best(bad)


def test_quick_run_prints_the_tables_and_targets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_write(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a --no-write run wrote the doc")

    monkeypatch.setattr(bench_long, "write_section", no_write)
    args = ["--quick", "--steps", "30", "--short-steps", "20", "--no-write", "--no-sgd"]
    args += ["--tasks", "gpt", "cnn", "--warmup", "0", "--jobs", "2"]
    assert bench_long.main([*args, "--json", str(tmp_path / "raw.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## Long runs\n")
    assert "`python benchmarks/bench_long.py`" in out
    assert "each, 1 seed; a `--quick` smoke run" in out and "denormals kept" not in out
    assert "Every run flushes denormal floats to zero" in out
    for heading in (
        "### Tiny GPT, pydoc_data text, 30 steps",
        "### BatchNorm CNN, digits, 30 steps",
        "### Tiny GPT, pydoc_data text, 20 steps",
        "### Targets",
    ):
        assert heading in out
    assert re.search(r"^\| auto \| 0\.1 \(defaults\) \| [\d.]+ \|", out, re.M)
    assert re.search(r"^\| adam \(fixed\) \| 0\.003 \|", out, re.M)
    assert re.search(r"^\| block_sgd \(fixed\) \| 0\.03 \|", out, re.M)
    targets = out.split("### Targets", 1)[1]
    rows = re.findall(
        r"^\| (.+?) \| \w+ [\d.]+ \| (\d+\.\d{3}) \| ≤ ([\d.]+) \| (.+?) \| \d+% \|", targets, re.M
    )
    assert [(r[0], r[2]) for r in rows] == [
        ("Tiny GPT, pydoc_data text, 30 steps", "1.03"),
        ("BatchNorm CNN, digits, 30 steps", "1.03"),
        ("Tiny GPT, pydoc_data text, 20 steps", "1.1"),
    ]
    for _, ratio, _, verdict in rows:
        assert float(ratio) > 0
        assert verdict in ("holds", "**does not hold**")
    assert (tmp_path / "raw.json").exists()


def test_runs_take_turns_in_an_order_that_reverses() -> None:
    calls: list[str] = []

    def run(name: str, pauses: int):
        for i in range(pauses):
            calls.append(name)
            yield i
        calls.append(f"{name} done")
        return f"result {name}"

    out = bench_long.take_turns({"a": run("a", 2), "b": run("b", 3)})
    assert calls == ["a", "b", "b", "a", "a done", "b", "b done"]
    assert {k: r.result for k, r in out.items()} == {"a": "result a", "b": "result b"}
    assert all(r.seconds >= 0 and r.cpu_seconds >= 0 for r in out.values())
