"""``benchmarks/reproduce.py --only``: rerun some parts, keep the others' sections and numbers."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import reproduce  # noqa: E402


def _sections(text: str) -> dict[str, str]:
    """The page's ``## `` sections by heading."""
    chunks = text.split("\n## ")[1:]
    return {c.split("\n", 1)[0]: c for c in chunks}


def test_only_reruns_the_named_part_and_keeps_the_others(tmp_path: Path) -> None:
    for name in ("REPRODUCTION.md", "reproduction.json"):
        shutil.copy(ROOT / "docs" / name, tmp_path / name)
    before_page = (tmp_path / "REPRODUCTION.md").read_text()
    before_data = json.loads((tmp_path / "reproduction.json").read_text())
    before_data.pop(reproduce.RUNS, None)

    assert reproduce.main(["--only", "calibration", "--out", str(tmp_path)]) == 0
    page = (tmp_path / "REPRODUCTION.md").read_text()
    data = json.loads((tmp_path / "reproduction.json").read_text())
    old, new = _sections(before_page), _sections(page)
    assert list(old) == list(new)  # every part, in order
    for heading in new:
        if heading.startswith("("):  # parts (a)-(e): kept to the byte
            assert new[heading] == old[heading], heading
    runs = data.pop(reproduce.RUNS)
    assert set(runs) == set(data) == {"a", "b", "c", "d", "e", "calibration"}
    for key in ("a", "b", "c", "d", "e"):
        assert data[key] == before_data[key]
    # the calibration read the kept parts: none is reported missing, and its cases are theirs
    assert data["calibration"]["missing"] == []
    labels = [c["label"] for c in data["calibration"]["cases"]]
    assert labels == [c["label"] for c in before_data["calibration"]["cases"]] and len(labels) > 10
    assert "(calibration) " in page.split("\n## ", 1)[0]

    # a second rerun keeps what the first recorded, dates included
    assert reproduce.main(["--only", "calibration", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "reproduction.json").read_text())
    assert {k: v for k, v in again[reproduce.RUNS].items() if k != "calibration"} == {
        k: v for k, v in runs.items() if k != "calibration"
    }
    assert _sections((tmp_path / "REPRODUCTION.md").read_text()) == new


def test_only_refuses_an_unknown_part(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--only", "f", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unknown part(s) f; the parts are a, b, c, d, e, calibration" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_quick_run_writes_to_a_scratch_directory(tmp_path: Path, monkeypatch) -> None:
    """--quick without --out never touches docs/: it writes into a new scratch directory."""
    scratch = tmp_path / "scratch"
    monkeypatch.setattr(
        reproduce.tempfile, "mkdtemp", lambda prefix: str(scratch.mkdir() or scratch)
    )
    before = (ROOT / "docs" / "REPRODUCTION.md").read_bytes()
    assert reproduce.main(["--quick", "--only", "calibration"]) == 0
    assert (ROOT / "docs" / "REPRODUCTION.md").read_bytes() == before
    assert (scratch / "REPRODUCTION.md").is_file() and (scratch / "reproduction.json").is_file()
