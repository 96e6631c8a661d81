"""The ``blockopt`` command line (also ``python -m blockopt``): ``demo``, ``probe`` and ``tune``.

Exit codes: 0 on success, 2 on bad usage or bad input (one line on stderr naming the cause and the
fix), 130 when interrupted. Output files are written to what their path names: a regular file
(or a symbolic link to one, which stays a link) atomically (a temporary file in the target's
directory, then renamed, keeping an existing file's permissions), after their directories were
checked, before any probing, so that each is whole or absent, though a command's several outputs
are not replaced in one atomic step; a FIFO, a device or another special file (or a link to one)
is opened and written as it is, never replaced; ``-`` is standard output (the table then goes to
standard error).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import inspect
import io
import json
import math
import os
import random
import shlex
import stat
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn, TextIO

from blockopt.curvature.blocks import STRATEGIES

if TYPE_CHECKING:
    from blockopt.curvature.spectra import BlockSpectrum

__all__ = ["UsageError", "build_parser", "main"]

MODELS = ("gpt", "vit", "cnn")
COLUMNS_HELP = (
    "Columns: lambda_min and lambda_max are the block's extreme Ritz values, signed (they bound "
    "its extreme eigenvalues from inside and equal them once --steps reaches the block's size); "
    "neg is the block's share of negative curvature, the SLQ weight on Ritz values below minus "
    "its round-off level, in %; trace is the Hutchinson estimate; lr, printed only with "
    "--base-lr, is --base-lr times the block's factor clip(rho_max / rho, 1, --max-factor), "
    "rho = max(|lambda_max|, |lambda_min|). Blocks the heterogeneity score leaves out (negligible "
    "curvature: within the round-off of their products; unused; no second derivative) show - "
    "and a note saying why; --json keeps their raw values."
)


class UsageError(Exception):
    """A user error: reported as one line on stderr with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types -------------------------------------------------------------------------------


def _number(parse: Callable[[str], Any], ok: Callable[[Any], bool], what: str):
    """An argparse type: ``parse(text)``, refused with "expected {what}" unless ``ok``."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return convert


# Lanczos steps, start vectors, training steps; learning rates; bounds on lr factors.
_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
_max_factor = _number(float, lambda v: math.isfinite(v) and v >= 1, "a finite number >= 1")
# Seeds: torch.manual_seed takes up to 2**64 - 1, and the demo seeds generators with seed + 30000.
_SEED_LIMIT = 2**63
_seed = _number(int, lambda v: 0 <= v < _SEED_LIMIT, "an integer from 0 to 2**63 - 1")


def _factory_spec(text: str):
    """argparse type: ``MODULE:FACTORY``, checked for syntax only (nothing imported yet)."""
    from blockopt.cli.factory import FactoryError, parse_spec

    try:
        return parse_spec(text)
    except FactoryError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# -- output files ---------------------------------------------------------------------------------


STDOUT = Path("-")  # an output path that means standard output


def _target(path: Path) -> tuple[Path, bool]:
    """Where writing ``path`` goes and whether by atomic rename: a regular file or a path that
    does not exist yet (through any symbolic links to them) is replaced atomically in its own
    directory; anything else (a FIFO, a socket, a device, whatever lies under ``/dev`` or
    ``/proc`` such as ``/dev/stdout``) is opened and written where it is, so that it is never
    replaced by a regular file."""
    if path == STDOUT or _through_descriptors(path):
        return path, False
    try:
        mode = os.stat(path).st_mode  # follows links
    except (FileNotFoundError, NotADirectoryError):  # nothing there yet: create it (the checks
        return Path(os.path.realpath(path)), True  # say when its directory is missing)
    except OSError:  # cannot tell: write to it as it is, and let that say why not
        return path, False
    if stat.S_ISREG(mode):
        return Path(os.path.realpath(path)), True
    return path, False


_DESCRIPTOR_DIRS = ("/dev/", "/proc/")


def _through_descriptors(path: Path) -> bool:
    """Whether ``path`` or a link on the way to what it names is under ``/dev`` or ``/proc``
    (``/dev/stdout`` is a link to ``/proc/self/fd/1``): such a path names an open file of the
    process or a device, written where it is, never replaced."""
    current = os.path.abspath(path)
    for _ in range(40):  # the kernel's limit on links followed
        if current.startswith(_DESCRIPTOR_DIRS):
            return True
        if not os.path.islink(current):
            return False
        current = os.path.join(os.path.dirname(current), os.readlink(current))
        current = os.path.abspath(current)
    return True  # a loop of links: let open() say so


def _link_loop(path: Path) -> bool:
    """Whether following ``path``'s symbolic links never ends (``ELOOP``)."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ELOOP
    return False


def _check_output(option: str, path: Path) -> None:
    """Fail now, before any probing, if ``path`` cannot be written."""
    if path == STDOUT:
        return
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name, e.g. {path}/out.json")
    target, atomic = _target(path)
    if not atomic:
        if not path.exists() and not path.is_symlink():
            return
        if _link_loop(path):
            raise UsageError(
                f"cannot write {option} {path}: its symbolic links form a loop; point the "
                "link at a file, or give another path"
            )
        if path.is_socket():
            raise UsageError(
                f"cannot write {option} {path}: it is a socket, which cannot be opened as a "
                "file; give a file path, a named pipe or - for standard output"
            )
        if not os.access(path, os.W_OK):
            raise UsageError(f"cannot write {option} {path}: it is not writable")
        return
    path = target
    if path.exists() and not os.access(path, os.W_OK):  # the rename would replace it anyway
        raise UsageError(
            f"cannot write {option} {path}: the file is read-only; make it writable "
            f"(chmod u+w {shlex.quote(str(path))}) or choose another path"
        )
    parent = path.parent
    if not parent.exists():
        raise UsageError(
            f"cannot write {option} {path}: directory {parent} does not exist; create it "
            "first or choose another path"
        )
    if not parent.is_dir():
        raise UsageError(f"cannot write {option} {path}: {parent} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise UsageError(
            f"cannot write {option} {path}: directory {parent} is not writable "
            f"({err.strerror or err}); choose a writable directory"
        ) from None


# The formats matplotlib's Agg canvas writes (FigureCanvasBase.get_supported_filetypes()), listed
# here so that checking the option does not import matplotlib, which reads a matplotlibrc in the
# working directory; the figure is drawn in blockopt's figure worker (blockopt.logging.renderer).
PLOT_FORMATS = (
    "eps", "jpeg", "jpg", "pdf", "pgf", "png", "ps", "raw", "rgba", "svg", "svgz", "tif",
    "tiff", "webp",
)  # fmt: skip


def _check_plot(path: Path) -> str:
    """The image format for ``--plot``, from the file's extension (PNG for ``-``)."""
    if path == STDOUT:
        return "png"
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in PLOT_FORMATS:
        raise UsageError(
            f"--plot {path}: unknown image format {path.suffix or '(none)'!r}; use one of "
            f"{', '.join('.' + f for f in PLOT_FORMATS)}, e.g. spectra.png"
        )
    return fmt


@contextlib.contextmanager
def _atomic_outputs() -> Iterator[Callable[[Path, Callable[[IO[bytes]], None]], None]]:
    """Stage files with ``stage(path, write)``; on a clean exit all are renamed into place, on an
    error none is. Either way the temporary files are removed, and an ``OSError`` (disk full,
    directory gone) is a :class:`UsageError` naming the file.

    Each output is replaced atomically, so it is always whole (old or new) or absent; the outputs
    together are not: if renaming the second fails, the first has already been replaced, which
    the message says."""
    staged: list[tuple[str, Path]] = []
    direct: list[tuple[bytes, Path]] = []  # written in place: stdout, FIFOs, devices

    def stage(path: Path, write: Callable[[IO[bytes]], None]) -> None:
        target, atomic = _target(path)
        if not atomic:
            buffer = io.BytesIO()
            write(buffer)
            direct.append((buffer.getvalue(), path))
            return
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            staged.append((tmp, target))
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.chmod(tmp, _mode_of(target))
        except OSError as err:
            raise UsageError(f"could not write {path}: {err.strerror or err}") from None

    try:
        yield stage
        done: list[str] = []
        for tmp, path in staged:
            try:
                os.replace(tmp, path)
            except OSError as err:
                written = f"; {', '.join(done)} already written" if done else ""
                raise UsageError(
                    f"could not write {path}: {err.strerror or err}{written}"
                ) from None
            done.append(str(path))
        for data, path in direct:
            _write_in_place(path, data, done)
            done.append(str(path))
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):  # renamed already, or cannot be removed
                os.unlink(tmp)


def _write_in_place(path: Path, data: bytes, done: list[str]) -> None:
    """Write ``data`` to standard output (``-``) or into the file ``path`` names as it is."""
    try:
        if path == STDOUT:
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return
        with open(path, "wb") as f:  # follows links; a FIFO waits for its reader
            f.write(data)
    except OSError as err:
        written = f"; {', '.join(done)} already written" if done else ""
        name = "standard output" if path == STDOUT else str(path)
        raise UsageError(f"could not write {name}: {err.strerror or err}{written}") from None


def _mode_of(target: Path) -> int:
    """The permissions an output gets: an existing file's own, else what ``open`` gives."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, so that outputs get the permissions a plain ``open`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- probe and tune -------------------------------------------------------------------------------


class _ProbeRaised(Exception):
    """The user's probe raised; carries the original error."""


def _seed_everything(seed: int) -> None:
    """Seed torch, numpy and ``random`` so that a factory's random initialisation repeats."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _measure(args: argparse.Namespace):
    """Build the user's model and probe, then estimate its block spectra."""
    from blockopt.cli.factory import FactoryError, build, describe
    from blockopt.curvature.hvp import DoubleBackwardError
    from blockopt.curvature.spectra import block_spectra

    # As `python -m` does, a MODULE next to you imports: the current directory is searched first,
    # but only while the factory's module is imported and the factory runs (see factory.build).
    search = None if "" in sys.path else os.getcwd()
    _seed_everything(args.seed)
    try:
        model, probe = build(args.target, search=search)
    except FactoryError as err:
        raise UsageError(str(err)) from None

    def guarded():
        try:
            return probe()
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # SystemExit included: the probe must return the loss
            raise _ProbeRaised(err) from err

    try:
        spectra = block_spectra(
            model, guarded, args.strategy, steps=args.steps, probes=args.probes, seed=args.seed
        )
    except _ProbeRaised as err:
        cause = err.args[0]
        raise UsageError(
            f"the probe {describe(cause)}; fix it so that probe() returns the loss"
        ) from None
    except DoubleBackwardError as err:
        raise UsageError(" ".join(str(err).split())) from None
    except (ValueError, TypeError, FloatingPointError, RuntimeError) as err:
        raise UsageError(f"cannot probe {args.target}: {' '.join(str(err).split())}") from None
    if all(s.status == "unused" for s in spectra.values()):
        raise UsageError(
            "the probe's loss does not depend on any parameter of the model; compute it through "
            "the model the factory returns"
        )
    return model, spectra


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Columns padded to their widest cell; columns in ``right`` are right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = []
    for row in (headers, *rows):
        cells = [
            f"{c:>{w}}" if i in right else f"{c:<{w}}" for i, (c, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def negative_share(s: BlockSpectrum, tol: float | None = None) -> float:
    """The block's share of negative curvature: the SLQ weight on Ritz values below ``-tol``,
    in ``[0, 1]``, over all the block's Ritz weights.

    ``tol`` defaults to the block's round-off level (``s.roundoff``, 0 when unknown), so that
    a Ritz value of -1e-17 in a positive semi-definite block does not count as negative
    curvature. ``nan`` for a block without Ritz values or whose weights do not sum to a positive
    finite number."""
    limit = -(s.roundoff or 0.0) if tol is None else -tol
    total = math.fsum(s.ritz_weights)
    if not (math.isfinite(total) and total > 0):
        return math.nan
    below = math.fsum(w for v, w in zip(s.ritz_values, s.ritz_weights) if v < limit)
    return below / total


def _left_out_note(reason: str) -> str:
    """The table note for a block the score leaves out: its reason's first clause."""
    return f"(left out: {reason.split(':')[0]})"


def spectra_table(
    spectra: Mapping[str, BlockSpectrum],
    excluded: Mapping[str, str],
    lrs: Mapping[str, float] | None = None,
) -> str:
    """One line per block: size, signed extreme Ritz values, share of negative curvature,
    trace and, when ``lrs`` is given, the block's learning rate (see ``COLUMNS_HELP``).

    A block in ``excluded`` (block -> reason, as :attr:`blockopt.Heterogeneity.excluded` pairs
    them) shows ``-`` for its curvature columns, whose values are round-off or missing, and a
    note with the reason's first clause."""
    rows = []
    for name, s in spectra.items():
        reason = excluded.get(name)
        if reason is None:
            cells = [
                f"{s.lambda_min:.3e}",
                f"{s.lambda_max:.3e}",
                _fmt_percent(negative_share(s)),
                f"{s.trace:.3e}",
            ]
        else:
            cells = ["-"] * 4
        row = [name, f"{s.numel:,}", *cells]
        if lrs is not None:
            row.append(f"{lrs[name]:.3g}")
        row.append(_left_out_note(reason) if reason is not None else "")
        rows.append(row)
    headers = ["block", "size", "lambda_min", "lambda_max", "neg", "trace"]
    if lrs is not None:
        headers.append("lr")
    headers.append("")
    return _table(headers, rows, right=set(range(1, len(headers) - 1)))


def _finite_or_none(value: float) -> float | None:
    """``value`` for JSON, ``None`` (null) when it is not finite."""
    return value if math.isfinite(value) else None


def _fmt_percent(share: float) -> str:
    """A share in ``[0, 1]`` as a percentage with one decimal, ``-`` when not finite."""
    return f"{100 * share:.1f}%" if math.isfinite(share) else "-"


def _report(args: argparse.Namespace, model, spectra) -> dict[str, Any]:
    """Print the table, score, recommended mode and (with ``--base-lr``) the suggested learning
    rates; return what ``--json`` adds to the spectra."""
    from blockopt.analysis.heterogeneity import heterogeneity
    from blockopt.analysis.tuning import block_lr_factors
    from blockopt.optimizer.policy import Thresholds

    h = heterogeneity(spectra)
    factors = block_lr_factors(spectra, max_factor=args.max_factor)
    base_lr: float | None = args.base_lr
    lrs = None if base_lr is None else {name: base_lr * f for name, f in factors.items()}
    thresholds = Thresholds()
    score: float | None = float(h)
    mode: str | None = thresholds.target(float(h), h.max_ratio)
    reason = thresholds.reason(float(h), h.max_ratio)
    if h.empty_reason is not None:  # a score over no block recommends nothing
        score, mode, reason = None, None, h.empty_reason
    excluded = dict(h.excluded)
    n_params = sum(s.numel for s in spectra.values())
    print(
        f"{args.target}: {type(model).__name__}, {len(spectra)} blocks (strategy "
        f"{args.strategy}), {n_params:,} parameters; {spectra.steps} Lanczos steps x "
        f"{spectra.probes} start vector(s) per block, seed {spectra.seed}: {spectra.hvps} "
        f"Hessian-vector products in {spectra.seconds:.1f} s"
    )
    print()
    print(spectra_table(spectra, excluded, lrs))
    print()
    if score is None:
        print(f"heterogeneity score: -, {reason}")
        print("recommended mode: none (a score over no block says nothing of the mode)")
    else:
        print(
            f"heterogeneity score: {score:.2f} decades (spread of the block curvature scales "
            f"max(|lambda_max|, |lambda_min|) over the bulk of the parameters)"
        )
        print(f"recommended mode: {mode} ({reason})")
    print(
        "lambda_min, lambda_max: the extreme Ritz values, signed; neg: share of negative "
        "curvature (SLQ weight on negative Ritz values); trace: Hutchinson estimate (see --help)"
    )
    if excluded:
        negligible = len(h.negligible)
        print(
            f"left out of the score: {len(excluded)} block(s), {negligible} of them with "
            "negligible curvature (within the round-off of their products: their numbers are "
            "noise); - marks them, --json has their values and reasons (heterogeneity.excluded)"
        )
    if lrs is None:
        print(
            "lr: not printed without --base-lr; give --base-lr LR (your tuned SGD learning rate, "
            "for the stiffest block) to see per-block rates, or run blockopt tune"
        )
    else:
        print(
            f"lr: --base-lr {base_lr:g} (the stiffest block's) times clip(rho_max / rho, 1, "
            f"{args.max_factor:g}), rho = max(|lambda_max|, |lambda_min|); blocks left out take "
            "their slices', the bulk's median or (negligible) the largest factor"
        )
    return {
        "score": score,
        # a score over no block is undefined: null, not the 0 it computes to
        "heterogeneity": h.to_dict()
        if score is not None
        else {
            **h.to_dict(),
            "score": None,
            "spread": None,
        },
        "recommended_mode": mode,
        "reason": reason,
        "base_lr": base_lr,
        "max_factor": args.max_factor,
        "strategy": args.strategy,
        "lr_factors": factors,
        "suggested_lrs": lrs,
        "negative_share": {name: _finite_or_none(negative_share(s)) for name, s in spectra.items()},
    }


def _json_writer(obj: Any) -> Callable[[IO[bytes]], None]:
    """A writer for :func:`_atomic_outputs` that dumps ``obj`` as indented JSON."""
    return lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode())


def _cmd_probe(args: argparse.Namespace) -> int:
    """``blockopt probe``: check the outputs, probe, print the table, then write the files."""
    outputs = [("--json", args.json), ("--plot", args.plot)]
    if args.json == STDOUT and args.plot == STDOUT:
        raise UsageError(
            "--json - and --plot - would both write to standard output; give one a file"
        )
    for option, path in outputs:
        if path is not None:
            _check_output(option, path)
    if args.json is not None and args.plot is not None and _same_file(args.json, args.plot):
        raise UsageError(
            f"--json {args.json} and --plot {args.plot} name the same file: the plot would "
            "replace the JSON; give them different paths"
        )
    _check_base_lr(args)
    fmt = _check_plot(args.plot) if args.plot is not None else None
    with _report_stream(args.json, args.plot):  # what the factory or probe prints, too
        model, spectra = _measure(args)
    with _report_stream(args.json, args.plot):
        extra = _report(args, model, spectra)
    with _atomic_outputs() as stage:
        if args.json is not None:
            stage(args.json, _json_writer({**spectra.to_dict(), **extra}))
        if args.plot is not None:
            from blockopt.analysis.heterogeneity import heterogeneity
            from blockopt.logging.renderer import draw
            from blockopt.logging.tensorboard import density_arguments

            image = draw("densities", density_arguments(spectra, heterogeneity(spectra)), fmt, 150)
            stage(args.plot, lambda f: f.write(image))
    with _report_stream(args.json, args.plot):
        if args.json is not None:
            lrs = "suggested lrs" if args.base_lr is not None else "lr factors"
            print(f"wrote the spectra, score, mode and {lrs} to {_named(args.json)}")
        if args.plot is not None:
            print(f"wrote the block densities to {_named(args.plot)}")
    return 0


def _named(path: Path) -> str:
    return "standard output" if path == STDOUT else str(path)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two output paths (not ``-``) end at the same file, through any links."""
    if STDOUT in (a, b):
        return False
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist yet: the real paths above decided
        return False


def _check_base_lr(args: argparse.Namespace) -> None:
    """Refuse a ``--base-lr`` whose largest suggested rate (times ``--max-factor``) is not a
    finite float: it would be written as ``Infinity``, which JSON readers and
    :func:`blockopt.param_groups` refuse."""
    base_lr = getattr(args, "base_lr", None)
    if base_lr is None:
        return
    largest = base_lr * args.max_factor
    if not math.isfinite(largest):
        raise UsageError(
            f"--base-lr {base_lr:g} times --max-factor {args.max_factor:g} is not a finite "
            "number: the flattest blocks' suggested rates would overflow; give your tuned SGD "
            "learning rate (e.g. --base-lr 0.1) or a smaller --max-factor"
        )


def _report_stream(*outputs: Path | None) -> contextlib.AbstractContextManager[Any]:
    """Print the report to standard error when an output goes to standard output (``-``)."""
    if STDOUT in outputs:
        return contextlib.redirect_stdout(sys.stderr)
    return contextlib.nullcontext()


def _cmd_tune(args: argparse.Namespace) -> int:
    """``blockopt tune``: probe, print the per-block learning rates, write them as JSON."""
    if args.out is not None:
        _check_output("--out", args.out)
    _check_base_lr(args)
    with _report_stream(args.out):  # what the factory or probe prints, too
        model, spectra = _measure(args)
    with _report_stream(args.out):
        report = _report(args, model, spectra)
    if report["score"] is None:
        raise UsageError(
            f"{report['reason']}: no block's curvature was measured, so there are no per-block "
            "rates to suggest and nothing was written; probe a loss with curvature (a real "
            "batch through the model, not a loss linear in its parameters)"
        )
    lrs = report["suggested_lrs"]
    if args.out is None:
        return 0
    with _atomic_outputs() as stage:
        stage(args.out, _json_writer(lrs))
    with _report_stream(args.out):
        print(f"wrote {len(lrs)} block learning rates to {_named(args.out)}; use them with")
        source = "FILE" if args.out == STDOUT else repr(str(args.out))
        print(
            f"  torch.optim.SGD(blockopt.param_groups(model, json.load(open({source}))), "
            f"lr={args.base_lr:g}, momentum=0.9)"
        )
    return 0


# -- demo -----------------------------------------------------------------------------------------


class ProgressBar:
    """A carriage-return progress bar on a terminal; one line per finished run otherwise."""

    def __init__(self, stream: TextIO, width: int = 30, interval: float = 0.1) -> None:
        self.stream, self.width, self.interval = stream, width, interval
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last = 0.0
        self._start = time.perf_counter()

    def __call__(self, label: str, done: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        if done == 1:
            self._start = now
        finished = done >= total
        if not finished and (not self.tty or now - self._last < self.interval):
            return
        self._last = now
        filled = round(self.width * done / total)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{label:<9} [{bar}] {done}/{total}  loss {loss:.3f}  {now - self._start:5.1f}s"
        self.stream.write(("\r" if self.tty else "") + line + ("\n" if finished else ""))
        self.stream.flush()


def _fmt(value: float | None, spec: str) -> str:
    """A number for a table cell, ``-`` when missing or not finite."""
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def results_table(results) -> str:
    """Per model and optimizer: learning rate, final losses, held-out accuracy."""
    rows = []
    for r in results:
        lr = f"{r.lr:g}"
        if r.optimizer == "auto" and r.end_lr is not None:
            lr = f"{r.lr:g} ({r.modes[0][0]})"
            if len(r.modes) > 1 or not math.isclose(r.end_lr, r.lr):
                lr += f" -> {r.end_lr:.2g} ({r.modes[-1][0]})"
        m = r.metrics
        acc = m.get("held_out_accuracy")
        train = _fmt(m.get("train_loss"), ".4f")
        if r.diverged_at is not None:
            train = f"diverged@{r.diverged_at}"
        rows.append(
            [
                r.task,
                r.optimizer,
                lr,
                train,
                _fmt(m.get("held_out_loss"), ".4f"),
                "-" if acc is None else f"{100 * acc:.1f}%",
            ]
        )
    headers = ["model", "optimizer", "lr", "train loss", "held-out loss", "held-out acc"]
    return _table(headers, rows, right={3, 4, 5})


def short_reason(reason: str | None) -> str:
    """A policy reason cut to its condition: ``"score 4.01 > 1.5: block curvatures ..."`` gives
    ``"score 4.01 > 1.5"``; a reason to stay keeps its ``"stay: "``; ``-`` when there is none."""
    if not reason:
        return "-"
    stay = reason.startswith("stay: ")
    body = reason[len("stay: ") :] if stay else reason
    return ("stay: " if stay else "") + body.split(":")[0].strip()


def auto_table(results) -> str:
    """Per model, blockopt's auto run: scores, modes over time, probe overhead and why."""
    rows = []
    for r in results:
        if r.optimizer != "auto":
            continue
        modes = " -> ".join(f"{mode}@{step}" for mode, step in r.modes)
        overhead = r.overhead
        cost = (
            f"{r.probe_seconds:.1f}s / {r.train_seconds:.1f}s = {100 * overhead:.0f}%"
            if overhead is not None
            else "-"
        )
        rows.append(
            [
                r.task,
                _fmt(r.first_score, ".2f"),
                _fmt(r.end_score, ".2f"),
                modes,
                str(r.probes),
                cost,
                short_reason(r.reason),
            ]
        )
    headers = [
        "model",
        "score first probe",
        "score at end",
        "modes",
        "probes",
        "probe overhead",
        "why",
    ]
    return _table(headers, rows, right={1, 2, 4})


def _prepare_logdir(root: Path) -> Path:
    """Create the log root and check it is writable before training."""
    if root == STDOUT:
        raise UsageError(
            "--logdir - would name a directory called '-': TensorBoard logs are a directory of "
            "event files, not a stream; give a directory, e.g. --logdir runs"
        )
    if _link_loop(root):
        raise UsageError(
            f"cannot write TensorBoard logs under --logdir {root}: its symbolic links form a "
            "loop; point the link at a directory, or choose another"
        )
    if root.is_symlink() and not root.exists():  # a link to a directory yet to be: create it
        root = Path(os.path.realpath(root))
    if root.exists() and not root.is_dir():
        raise UsageError(
            f"cannot write TensorBoard logs under --logdir {root}: it is a file, not a "
            "directory; choose a directory (it is created if missing)"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        raise UsageError(
            f"cannot write TensorBoard logs under --logdir {root}: {err.strerror or err}; choose "
            "a writable directory"
        ) from None
    from blockopt.cli.demo import demo_logdir

    return demo_logdir(root)


def _ratio_rule(t) -> str:
    """The demo legend's words for ``block_ratio``: nothing when the rule is off."""
    if t.block_ratio is None:
        return ""
    return (
        f" (block_sgd if some blocks sit more than {t.block_ratio:g} decades below the "
        "stiffest: max_ratio)"
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    """``blockopt demo``: train every chosen model with each optimizer and summarise."""
    from blockopt.cli.demo import DEFAULT_STEPS, LRS, MOMENTUM, QUICK_STEPS, TASKS, run_demo
    from blockopt.optimizer.block_optimizer import BlockOptimizer
    from blockopt.optimizer.policy import Thresholds

    tasks = list(MODELS) if args.model == "all" else [args.model]
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if {"vit", "cnn"} & set(tasks) and importlib.util.find_spec("sklearn") is None:
        raise UsageError(
            "the ViT and CNN train on scikit-learn's digits: install scikit-learn (pip install "
            "scikit-learn, or blockopt's demo extra), or run --model gpt"
        )
    logdir = _prepare_logdir(args.logdir)
    defaults = inspect.signature(BlockOptimizer).parameters
    print(f"blockopt demo: {steps} steps per run, seed {args.seed}")
    print(f"  sgd:  torch.optim.SGD, momentum {MOMENTUM}, fixed lr (docs/BENCHMARKS.md grid)")
    print("  adam: torch.optim.AdamW, no weight decay, fixed lr (docs/BENCHMARKS.md grid)")
    print(
        "  auto: BlockOptimizer(model, probe) with its defaults, starting in "
        f"{defaults['mode'].default} at lr {defaults['lr'].default:g}"
    )
    for key in tasks:
        print(
            f"  {key}: {TASKS[key].title}; sgd lr {LRS[key]['sgd']:g}, adam lr {LRS[key]['adam']:g}"
        )
    print(f"TensorBoard logs: {logdir}")
    sys.stdout.flush()
    start = time.perf_counter()
    results = run_demo(tasks, steps, logdir, args.seed, progress=ProgressBar(sys.stderr))
    print()
    print(f"Results after {steps} steps")
    print("(train loss: all training digits, or 256 training text windows;")
    print(" held-out: the test digits, or 256 windows of the last 10% of the text)")
    print(results_table(results))
    print()
    t = Thresholds()
    print("blockopt auto")
    print(
        f"(score: heterogeneity in decades; below {t.sgd_below:g} calls for sgd{_ratio_rule(t)}, "
        f"above {t.adam_above:g} for adam, block_sgd in between;"
    )
    print(
        " modes: mode@step, the start then each switch; probe overhead: seconds in probes and "
        "lr searches / seconds of the training loop;"
    )
    print(" why: the condition that chose the final mode)")
    print(auto_table(results))
    print()
    print(f"done in {time.perf_counter() - start:.0f}s. TensorBoard logs: {logdir}")
    print("view them with:")
    print(f"  tensorboard --logdir {shlex.quote(str(args.logdir))}")
    return 0


# -- parser ---------------------------------------------------------------------------------------


def _add_probe_options(p: argparse.ArgumentParser) -> None:
    """The target and probe settings ``probe`` and ``tune`` share."""
    p.add_argument(
        "target",
        metavar="MODULE:FACTORY",
        type=_factory_spec,
        help="a module (a dotted name importable from here or PYTHONPATH, or a .py file) and a "
        "zero-argument callable in it returning (model, probe), e.g. mymodels:make; probe() "
        "returns a scalar loss computed through model on a batch of your choice",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="tensor",
        help="how parameters are split into blocks: tensor (one per tensor, fused Q/K/V "
        "split), head (Q and K also per attention head), module (weight and bias together), model "
        "(one block: the full Hessian) (default: tensor)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=30,
        metavar="N",
        help="Lanczos steps per block (default: 30)",
    )
    p.add_argument(
        "--probes",
        type=_positive_int,
        default=1,
        help="random start vectors per block (default: 1)",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seeds torch, numpy and random before the factory runs, and the start vectors: an "
        "integer from 0 to 2**63 - 1 (default: 0)",
    )
    p.add_argument(
        "--max-factor",
        type=_max_factor,
        default=100.0,
        help="largest ratio between a block's lr and the base lr (default: 100)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``blockopt`` parser with its ``demo``, ``probe`` and ``tune`` commands."""
    parser = _Parser(
        prog="blockopt",
        description="Blockwise Hessian spectra for PyTorch models, and an optimizer that acts on "
        "them. Exit codes: 0 success, 2 bad usage or input.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    from blockopt.cli.demo import DEFAULT_STEPS, LRS, QUICK_STEPS

    lrs = "; ".join(f"{k} sgd {v['sgd']:g}, adam {v['adam']:g}" for k, v in LRS.items())
    demo = commands.add_parser(
        "demo",
        help="train the bundled models with SGD, Adam and blockopt, and compare",
        description="Train the bundled tiny GPT (pydoc_data.topics text), tiny ViT and BatchNorm "
        "CNN (scikit-learn digits) with fixed SGD (momentum 0.9), fixed Adam (AdamW) and "
        "blockopt's auto mode (BlockOptimizer with its defaults), each from the same initial "
        "weights on the same batches; log every run to TensorBoard and print a summary: final "
        "losses, held-out accuracy, heterogeneity scores, modes chosen and probe overhead. "
        f"Fixed learning rates, from the grid in docs/BENCHMARKS.md: {lrs}. Nothing is "
        "downloaded; about a minute on 2 CPU cores, half a minute with --quick.",
        epilog="View the logs with: tensorboard --logdir runs",
    )
    demo.add_argument(
        "--model", choices=["all", *MODELS], default="all", help="which model(s) (default: all)"
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"training steps per run (default: {DEFAULT_STEPS})",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run: {QUICK_STEPS} steps per run unless --steps is given",
    )
    demo.add_argument(
        "--logdir",
        type=Path,
        default=Path("runs"),
        metavar="DIR",
        help="TensorBoard log root; each demo writes DIR/demo-<time>/<model>/<optimizer> "
        "(default: runs)",
    )
    demo.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="S",
        help="seeds the initial weights and the batches (an integer from 0 to 2**63 - 1): on one "
        "machine a seed gives the same losses, accuracies, scores and modes every time "
        "(default: 0)",
    )
    demo.set_defaults(run=_cmd_demo)

    probe = commands.add_parser(
        "probe",
        help="print the block spectra, heterogeneity score and recommended mode of your model",
        description="Estimate every diagonal Hessian block's spectrum of your model's probe loss "
        "(Lanczos on Hessian-vector products) and print, per block, its size, "
        "signed extreme Ritz values, share of negative curvature, Hutchinson trace and, with "
        "--base-lr, suggested learning rate, then the heterogeneity score and the mode it calls "
        "for. " + COLUMNS_HELP,
    )
    _add_probe_options(probe)
    probe.add_argument(
        "--base-lr",
        type=_positive_float,
        default=None,
        metavar="LR",
        help="the learning rate for the stiffest block, e.g. your tuned SGD lr: adds the lr "
        "column, base_lr times each block's factor (without it no lr is printed; --json "
        "always has the factors, lr_factors)",
    )
    probe.add_argument(
        "--json",
        type=Path,
        metavar="FILE",
        help="also write Spectra.to_dict() with the score, recommended mode, the blocks' lr "
        "factors and shares of negative curvature and, with --base-lr, the suggested lrs to FILE "
        "(blockopt.Spectra.from_dict reads it back; - for standard output)",
    )
    probe.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw every block's density to FILE (- for a PNG on standard output)",
    )
    probe.set_defaults(run=_cmd_probe)

    tune = commands.add_parser(
        "tune",
        help="suggest per-block learning rates for your model and write them as JSON",
        description="Probe your model's block spectra and give each block the learning rate "
        "base_lr * clip(rho_max / rho_block, 1, max_factor), rho being a block's curvature scale "
        "max(|lambda_max|, |lambda_min|). --out writes {block: lr} as JSON; load it with "
        "torch.optim.SGD(blockopt.param_groups(model, json.load(open(FILE))), lr=...).",
    )
    _add_probe_options(tune)
    tune.add_argument(
        "--base-lr",
        type=_positive_float,
        required=True,
        help="the learning rate for the stiffest block, e.g. your tuned SGD lr",
    )
    tune.add_argument(
        "--out", type=Path, metavar="FILE", help="write the {block: lr} JSON here (- for stdout)"
    )
    tune.set_defaults(run=_cmd_tune)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Show a warning as one ``blockopt: warning:`` line, without the source location."""
    print(f"blockopt: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2), already printed
        return int(done.code or 0)
    if not getattr(args, "run", None):
        print("blockopt: error: choose a command: demo, probe or tune (see blockopt --help)",
              file=sys.stderr)  # fmt: skip
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            return args.run(args)
        except UsageError as err:
            print(f"blockopt: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\nblockopt: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
