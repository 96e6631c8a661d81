"""Writing one benchmark's section of docs/BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def write_section(section: str, text: str, doc_path: Path = DOC) -> None:
    """Replace the section headed ``section`` (up to the next ``## `` heading) with ``text``, or
    append ``text`` when the doc has no such section yet."""
    doc = doc_path.read_text() if doc_path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text + "\n", doc)
    else:
        doc = doc.rstrip() + "\n\n" + text
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(doc)
