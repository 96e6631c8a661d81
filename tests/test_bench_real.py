"""The real-models benchmark: its builders give deterministic batches and a finite loss, and a
tiny smoke run prints the summary, the targets and a table per model, and writes nothing."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_real
import real_models


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    """The benchmark sets torch's thread count; put it back for the tests that follow."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key", sorted(real_models.BUILDERS))
def test_builders_are_deterministic_and_give_a_finite_loss(key: str) -> None:
    torch.set_num_threads(1)
    one, two = real_models.build(key, 0), real_models.build(key, 0)
    for a, b in zip(one.model.state_dict().values(), two.model.state_dict().values()):
        assert torch.equal(a, b)
    for i in (0, 1, 7):
        assert _same(one.batch(i), two.batch(i))
    assert not _same(one.batch(0), one.batch(1))
    assert _same(one.probe_batch, two.probe_batch)
    assert not _same(one.probe_batch, one.holdout_batch)
    assert not _same(one.probe_batch, one.batch(0))
    assert len(one.eval_batches) == real_models.EVAL_BATCHES
    for a, b in zip(one.eval_batches, two.eval_batches):
        assert _same(a, b)
    size = len(next(iter(one.batch(0).values())))
    assert size == len(next(iter(one.probe_batch.values())))
    assert size == len(next(iter(one.holdout_batch.values())))
    loss = one.loss(one.batch(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert loss.requires_grad
    assert math.isfinite(one.eval_loss()) and one.model.training
    assert one.parameters > 1000
    if key == "bert":  # 15% of each sequence predicted, the rest ignored
        labels = one.batch(0)["labels"]
        picked = (labels != real_models.IGNORE).sum(dim=1)
        assert torch.all(picked == round(real_models.MASK_SHARE * real_models.CONTEXT))
    if key == "llama":
        config = one.model.config
        assert config.num_key_value_heads < config.num_attention_heads
    with pytest.raises(ValueError, match="unknown model"):
        real_models.build("alexnet")


def test_quick_run_prints_the_tables_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_write(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a --no-write run wrote the doc")

    monkeypatch.setattr(bench_real, "write_section", no_write)
    args = ["--quick", "--steps", "3", "--models", "encoder", "resnet", "--no-write"]
    args += ["--runs", "wrap_sgd", "wrap_adamw_holdout", "--json", str(tmp_path / "raw.json")]
    assert bench_real.main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("## Real models\n")
    assert "`python benchmarks/bench_real.py`" in out
    titles = ("nn.TransformerEncoder, digits rows", "ResNet (BatchNorm), digits")
    for heading in ("### Summary", "### Targets", *(f"### {t}" for t in titles)):
        assert f"\n{heading}\n" in out
    labels = ["SGD", "AdamW", "wrap(SGD)", "wrap(AdamW), holdout"]
    summary = out.split("### Summary", 1)[1].split("### Targets", 1)[0]
    assert "| model | parameters | initial loss | " + " | ".join(labels) in summary
    number = r"(\d+\.\d+)"
    for title in titles:
        row = re.search(rf"^\| {re.escape(title)} \| [\d,]+ \| (.+) \|$", summary, re.M)
        assert row, title
        cells = row.group(1).split(" | ")
        assert len(cells) == 1 + len(labels) + 2
        assert all(math.isfinite(float(c)) for c in cells)
    targets = out.split("### Targets", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(
        rf"^\| (.+?) \| {number} \| {number} \| (holds|\*\*does not hold\*\* \(.+\)) \|$",
        targets,
        re.M,
    )
    assert [r[0] for r in rows] == list(titles)
    for _, a, b, _ in rows:
        assert float(a) > 0 and float(b) > 0
    assert re.search(r"^The target holds on \d of 2 models", targets, re.M)
    for title in titles:
        table = out.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]
        runs = re.findall(
            r"^\| ((?:wrap\()?(?:SGD|AdamW)\)?(?:, holdout)?) \| (.+) \|$", table, re.M
        )
        assert [r[0] for r in runs] == labels
        for label, rest in runs:
            cells = rest.split(" | ")
            assert len(cells) == 12
            assert math.isfinite(float(cells[0]))  # final loss
            assert all(math.isfinite(float(c.rstrip("%"))) for c in cells[-3:])
            if label.startswith("wrap("):
                assert math.isfinite(float(cells[1]))  # ratio
                assert re.fullmatch(r"(sgd|adam)( → \w+@\d+)*", cells[3])
                assert math.isfinite(float(cells[5]))  # first score
                assert re.fullmatch(r"[\d.]+ s = \d+ steps", cells[6])
                assert int(cells[7]) >= 1  # probes
                assert cells[8].endswith("%")
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert set(raw["models"]) == {"encoder", "resnet"}
    for runs in raw["models"].values():
        assert runs["wrap_sgd"]["first_probe_seconds"] > 0
        assert math.isfinite(runs["wrap_sgd"]["ratio"])


def test_more_seeds_add_their_ratios_and_the_count_over_all_seeds(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench_real, "write_section", lambda *_a, **_k: None)
    args = ["--quick", "--steps", "2", "--models", "resnet", "--runs", "wrap_sgd"]
    raw_path = tmp_path / "raw.json"
    assert bench_real.main([*args, "--more-seeds", "2", "--no-write", "--json", str(raw_path)]) == 0
    out = capsys.readouterr().out
    assert "`python benchmarks/bench_real.py --more-seeds 2`" in out
    assert "One seed, and 2 more in [Other seeds](#other-seeds)." in out
    section = out.split("\n### Other seeds\n", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| ResNet \(BatchNorm\), digits \| (\d) \| (\d+\.\d{3}) \| (.+) \|$",
                      section, re.M)  # fmt: skip
    assert [r[0] for r in rows] == ["1", "2"]
    ratios = {}
    for sd in (0, 1, 2):  # each seed's ratio is its own runs' ratio
        plain = bench_real.train("resnet", bench_real.BY_RUN["sgd"], 2, sd).final
        ratios[sd] = bench_real.train("resnet", bench_real.BY_RUN["wrap_sgd"], 2, sd).final / plain
    for sd, shown, target in rows:
        assert shown == f"{ratios[int(sd)]:.3f}"
        assert target == ("holds" if ratios[int(sd)] <= 1.02 else "**does not hold**")
    raw = json.loads(raw_path.read_text())  # the raw results hold every seed's runs
    assert set(raw["more_seeds"]) == {"1", "2"}
    seen = {0: raw["models"], **{int(sd): runs for sd, runs in raw["more_seeds"].items()}}
    for sd, runs in seen.items():
        assert runs["resnet"]["wrap_sgd"]["ratio"] == pytest.approx(ratios[sd], rel=1e-12)
    held = sum(r <= 1.02 for r in ratios.values())
    assert f"Over seeds 0, 1, 2, the target holds on {held} of 3 (model, seed) pairs" in section
    with pytest.raises(SystemExit):
        bench_real.main([*args, "--more-seeds", "-1", "--no-write"])
