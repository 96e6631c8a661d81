"""Load a user's ``MODULE:FACTORY`` and build the ``(model, probe)`` pair it returns.

``MODULE`` is an importable dotted module name (searched on ``sys.path`` and, where the command
line asks, first in the current directory, as ``python -m`` does) or the path of a ``.py`` file
(its folder searched first, as ``python path.py`` does); ``FACTORY`` is a dotted attribute path
inside it naming a zero-argument callable. Only the named module is imported, and names are
resolved with ``getattr``; nothing is evaluated. The extra folder is on ``sys.path`` only while
the module is imported and the factory runs, so nothing imported later (torch imports modules
lazily while probing) can be picked up from it. Every failure of the user's code, ``SystemExit``
and other ``BaseException`` included (``KeyboardInterrupt`` excepted), is a
:class:`FactoryError` whose message names the cause and the fix.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

__all__ = ["FactoryError", "FactorySpec", "build", "load_factory", "parse_spec"]

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class FactoryError(Exception):
    """A ``MODULE:FACTORY`` that cannot be loaded or returns the wrong thing."""


@dataclass(frozen=True)
class FactorySpec:
    """A parsed ``MODULE:FACTORY``: ``module`` is a dotted name or a ``.py`` path."""

    module: str
    attr: str

    @property
    def is_path(self) -> bool:
        return self.module.endswith(".py")

    def __str__(self) -> str:
        return f"{self.module}:{self.attr}"


def parse_spec(text: str) -> FactorySpec:
    """Split ``MODULE:FACTORY`` at its last colon and check both halves' syntax."""
    module, sep, attr = text.rpartition(":")
    hint = "expected MODULE:FACTORY, e.g. mymodels:make or path/to/mymodels.py:make"
    if not sep or not module or not attr:
        raise FactoryError(f"{text!r} is not MODULE:FACTORY; {hint}")
    if not _DOTTED.fullmatch(attr):
        raise FactoryError(f"{attr!r} is not a Python name or dotted attribute path; {hint}")
    if not module.endswith(".py") and not _DOTTED.fullmatch(module):
        raise FactoryError(f"{module!r} is neither a dotted module name nor a .py file; {hint}")
    return FactorySpec(module, attr)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def describe(err: BaseException) -> str:
    """What user code did, for an error message: ``called sys.exit(2)`` for a ``SystemExit``,
    ``raised Type: message`` otherwise."""
    if isinstance(err, SystemExit):
        return f"called sys.exit({'' if err.code is None else repr(err.code)})"
    return f"raised {_one_line(err)}"


class _Exited(Exception):
    """User code raised ``SystemExit``; the message says how, quoting what it last printed."""


@contextlib.contextmanager
def _user_code() -> Iterator[None]:
    """Run the user's module or factory with its ``sys.stderr`` held back, written out when it
    returns or raises. A ``SystemExit`` (``sys.exit``, an ``argparse`` parser run on import)
    becomes :class:`_Exited`, its held-back output dropped but for the last line, which the
    message quotes: the user sees one blockopt error, not another program's usage."""
    held = io.StringIO()
    real, sys.stderr = sys.stderr, held
    exited: SystemExit | None = None
    try:
        yield
    except SystemExit as err:
        exited = err
    finally:
        sys.stderr = real
        if exited is None:
            real.write(held.getvalue())
    if exited is not None:
        lines = [" ".join(line.split()) for line in held.getvalue().splitlines()]
        last = next((line for line in reversed(lines) if line), "")
        printed = f" after printing {last[:200]!r}" if last else ""
        raise _Exited(describe(exited) + printed)


@contextlib.contextmanager
def _searched_first(folder: str | None) -> Iterator[None]:
    """``folder`` first on ``sys.path`` inside the block (unless already on it), removed after."""
    if folder is None or folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # the user's code may have removed it itself
            sys.path.remove(folder)


def _folder(spec: FactorySpec, search: str | None) -> str | None:
    """The folder searched first for ``spec``: a ``.py`` file's own, else ``search``."""
    return str(Path(spec.module).resolve().parent) if spec.is_path else search


def _import(spec: FactorySpec) -> ModuleType:
    """Import the module the spec names (and nothing else)."""
    if spec.is_path:
        return _import_path(Path(spec.module))
    try:
        with _user_code():
            return importlib.import_module(spec.module)
    except _Exited as err:
        raise FactoryError(
            f"importing {spec.module!r} {err}; a module named as MODULE:FACTORY must not exit "
            "on import: put its script code under if __name__ == '__main__':"
        ) from None
    except KeyboardInterrupt:
        raise
    except ModuleNotFoundError as err:
        parts = spec.module.split(".")
        if err.name in {".".join(parts[: i + 1]) for i in range(len(parts))}:
            raise FactoryError(
                f"no module named {spec.module!r}: check the spelling, run from the directory "
                "that holds it, or add that directory to PYTHONPATH"
            ) from None
        raise FactoryError(
            f"importing {spec.module!r} failed: {_one_line(err)}; install what it imports"
        ) from None
    except BaseException as err:
        raise FactoryError(
            f"importing {spec.module!r} failed: {_one_line(err)}; fix the module"
        ) from None


def _import_path(path: Path) -> ModuleType:
    """Import a ``.py`` file as a module (its folder is first on ``sys.path`` meanwhile, see
    :func:`load_factory`, so that it can import its neighbours, as ``python path.py`` would)."""
    if not path.is_file():
        raise FactoryError(f"no file {str(path)!r}: check the path to the .py file")
    name = f"_blockopt_factory_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise FactoryError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        with _user_code():
            loader_spec.loader.exec_module(module)
    except BaseException as err:
        del sys.modules[name]
        if isinstance(err, KeyboardInterrupt):
            raise
        if isinstance(err, _Exited):
            raise FactoryError(
                f"importing {str(path)!r} {err}; a file named as MODULE:FACTORY must not exit "
                "on import: put its script code under if __name__ == '__main__':"
            ) from None
        raise FactoryError(
            f"importing {str(path)!r} failed: {_one_line(err)}; fix the file"
        ) from None
    return module


def load_factory(spec: FactorySpec, search: str | None = None) -> Callable[[], object]:
    """The callable ``spec`` names, after importing its module; while it is imported, ``search``
    (for a dotted module) or the ``.py`` file's folder is first on ``sys.path``."""
    with _searched_first(_folder(spec, search)):
        obj: object = _import(spec)
    for i, part in enumerate(spec.attr.split(".")):
        if not hasattr(obj, part):
            where = spec.module if i == 0 else ".".join(spec.attr.split(".")[:i])
            raise FactoryError(
                f"{where!r} has no attribute {part!r}; name a zero-argument function that returns "
                "(model, probe)"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(
            f"{str(spec)!r} is a {type(obj).__name__}, not callable; name a zero-argument "
            "function that returns (model, probe)"
        )
    return obj


def build(
    spec: FactorySpec, search: str | None = None
) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """Call the factory and check it returned ``(nn.Module, zero-argument callable)``.

    ``search`` (for a dotted module) or the ``.py`` file's folder is first on ``sys.path`` while
    the module is imported and the factory runs (which may import the module's neighbours),
    and removed before this returns: nothing imported while probing can come from it."""
    with _searched_first(_folder(spec, search)):
        factory = load_factory(spec)
        try:
            with _user_code():
                result = factory()
        except _Exited as err:
            raise FactoryError(
                f"{spec} {err}; a factory must return (model, probe), not exit"
            ) from None
        except KeyboardInterrupt:
            raise
        except BaseException as err:
            raise FactoryError(f"{spec} raised {_one_line(err)}; fix the factory") from None
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        got = type(result).__name__
        if isinstance(result, (tuple, list)):
            got += f" of length {len(result)}"
        raise FactoryError(f"{spec} returned a {got}; it must return a pair (model, probe)")
    model, probe = result
    if not isinstance(model, nn.Module):
        raise FactoryError(
            f"{spec} returned a {type(model).__name__} as the model; the first item of the pair "
            "must be a torch.nn.Module"
        )
    if not callable(probe):
        raise FactoryError(
            f"{spec} returned a {type(probe).__name__} as the probe; the second item must be a "
            "zero-argument callable returning the loss"
        )
    return model, probe
