"""docs/BAD_INPUT.md is what scripts/bad_input_doc.py writes from the case tables, so that it
lists every case tested with what the call actually does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def doc_generator():
    """scripts/bad_input_doc.py, imported."""
    script = ROOT / "scripts" / "bad_input_doc.py"
    spec = importlib.util.spec_from_file_location("bad_input_doc", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bad_input_doc", module)
    spec.loader.exec_module(module)
    return module


def test_bad_input_doc_is_generated_from_the_case_tables() -> None:
    """All but the command-line table, which tests/test_cli.py checks against its own runs."""
    generator = doc_generator()
    committed = (ROOT / "docs" / "BAD_INPUT.md").read_text()
    text = generator.render(cli=generator.cli_table(committed))
    assert committed == text, "docs/BAD_INPUT.md is stale: run python scripts/bad_input_doc.py"


def test_every_case_has_a_row() -> None:
    from bad_input_cases import SECTIONS

    committed = (ROOT / "docs" / "BAD_INPUT.md").read_text()
    cli = set(doc_generator().cli_table(committed))
    lines = [line for line in committed.splitlines() if line not in cli]
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| ---")]
    headers = sum(1 for line in rows if line.startswith("| input |"))
    assert len(rows) - headers == sum(len(s.cases) for s in SECTIONS)
