"""Write docs/BAD_INPUT.md from the test suite's case tables (tests/bad_input_cases.py).

Every case is run here, and its row shows what it actually did: the exception and the start of
its message, or what a call that must work does (and the warning it gives). The tests check
that the committed file is this script's output, so the document cannot drift from the tests:
``tests/test_bad_input_doc.py`` all but the command-line table, ``tests/test_cli.py`` that
table, from its own runs of the command-line cases.

    python scripts/bad_input_doc.py          # rewrite docs/BAD_INPUT.md
    python scripts/bad_input_doc.py --check  # exit 1 if docs/BAD_INPUT.md is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BAD_INPUT.md"
sys.path.insert(0, str(ROOT / "tests"))

import bad_input_cases as cases  # noqa: E402

# A message is quoted up to this many characters, cut at a word boundary.
QUOTE = 150
LOAD_PREFIX = "cannot load this state dict: "
LOAD_SUFFIX = ". Nothing was changed"
FAULT_PREFIX = re.compile(r"blockopt: the probe at step \d+ failed and was discarded: ")


def quote(message: str, prefix: str = "") -> str:
    """The start of ``message`` on one line, ``…`` where it was cut."""
    text = " ".join(message.split())
    lead = ""
    if prefix and text.startswith(prefix):
        text, lead = text[len(prefix) :], "… "
    if FAULT_PREFIX.match(text):
        text, lead = FAULT_PREFIX.sub("", text, count=1), "… "
    if LOAD_SUFFIX in text:
        text = text[: text.index(LOAD_SUFFIX)] + " …"
    if len(text) > QUOTE:
        cut = text.rfind(" ", 0, QUOTE)
        text = text[: cut if cut > QUOTE // 2 else QUOTE] + " …"
    return lead + text


def code(text: str) -> str:
    """``text`` as Markdown inline code inside a table cell."""
    text = text.replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def outcome(case: Any) -> tuple[str, str]:
    """Run ``case``: its exception's type and message start; for a call that works, the
    warning it gives and its start, or what it does."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.run()
        except (Exception, KeyboardInterrupt) as err:  # the case's outcome, whatever it is
            prefix = LOAD_PREFIX if isinstance(case, cases.LoadCase) else ""
            text = quote(str(err), prefix)
            return f"`{type(err).__name__}`", code(text) if text else "(no message)"
    if case.error is not None:
        raise AssertionError(f"case {case.id} raised nothing, but its test expects an error")
    warned = [w for w in caught if case.warns is not None and issubclass(w.category, case.warns)]
    if warned:
        return f"works, warns `{case.warns.__name__}`", code(quote(str(warned[0].message)))
    return "works", case.message.removeprefix("works: ")


def table(section: cases.Section) -> list[str]:
    rows = ["| input | outcome | message (start) | fix |", "| --- | --- | --- | --- |"]
    for case in section.cases:
        kind, message = outcome(case)
        fix = case.fix or section.fix or "—"
        rows.append(f"| {case.input} | {kind} | {message} | {fix} |")
    return rows


# The OS's words for an unwritable directory differ between users (root sees a read-only
# file system where others are denied permission): the document names neither.
OS_REASON = re.compile(r" \((Permission denied|Read-only file system)\)")


CLI_HEADER = ["| command line | outcome | message (start) |", "| --- | --- | --- |"]


def cli_row(argv: list[str], run: Any, paths: dict[str, str]) -> str:
    """A command-line case's row: its argv template, exit status and error line, the case's
    own paths written back as the template's placeholders."""
    message = run.stderr.strip().splitlines()[-1].removeprefix("blockopt: error: ")
    for name, path in sorted(paths.items(), key=lambda kv: -len(kv[1])):
        message = message.replace(path, "{" + name + "}")
    message = OS_REASON.sub("", message)
    command = code(" ".join(["blockopt", *argv]))
    return f"| {command} | exit {run.returncode} | {code(quote(message))} |"


def cli_rows() -> list[str]:
    """Run every command-line case of tests/test_cli.py (BAD) as its test does, in forked
    children of one interpreter; a row each (``tests/test_cli.py`` checks the rows against
    its own runs of the cases)."""
    import test_cli

    rows = list(CLI_HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "factories").mkdir()
        factories = test_cli.write_factories(base / "factories")
        a_file = base / "a-file"
        a_file.write_text("not a directory\n")
        io = base / "io"
        io.mkdir()
        ro = test_cli._read_only_dir(base)
        if ro is None:
            raise RuntimeError("no read-only directory for the command line's cases")
        try:
            runs, folders = test_cli.run_bad_cases(base, factories, ro, a_file, io, fresh=False)
        finally:
            if ro.is_relative_to(base):
                ro.chmod(0o755)
        for case, (argv, _) in test_cli.BAD.items():
            paths = {"dir": str(folders[case][1]), "ro": str(ro), "file": str(a_file)}
            rows.append(cli_row(argv, runs[case], {**paths, "factories": str(factories)}))
    return rows


def cli_table(document: str) -> list[str]:
    """The command-line table of a document that :func:`render` wrote."""
    lines = document.splitlines()
    start = lines.index(CLI_HEADER[0])
    end = lines.index("", start)
    return lines[start:end]


def render(cli: list[str] | None = None) -> str:
    """The document; ``cli``: its command-line table, when already known (else run)."""
    lines = [cases.INTRO.strip(), ""]
    for section in cases.SECTIONS:
        lines += [f"## {section.title}", "", section.intro.strip(), "", *table(section), ""]
        if section.after:
            lines += [section.after.strip(), ""]
    cli = cli_rows() if cli is None else cli
    lines += [cases.OUTRO.strip(), "", *cli, "", cases.CLI_AFTER.strip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        stale = not DOC.exists() or DOC.read_text() != text
        if stale:
            print(f"{DOC} is out of date; run python scripts/bad_input_doc.py", file=sys.stderr)
        return int(stale)
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
