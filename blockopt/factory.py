"""Load a user's ``MODULE:FACTORY`` and build the ``(model, probe)`` pair it returns.

``MODULE`` is an importable dotted module name (searched on ``sys.path``, which the command line
extends with the current directory, as ``python -m`` does) or the path of a ``.py`` file;
``FACTORY`` is a dotted attribute path inside it naming a zero-argument callable. Only the named
module is imported, and names are resolved with ``getattr``; nothing is evaluated. Every failure
is a :class:`FactoryError` whose message names the cause and the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
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


def _import(spec: FactorySpec) -> ModuleType:
    """Import the module the spec names (and nothing else)."""
    if spec.is_path:
        return _import_path(Path(spec.module))
    try:
        return importlib.import_module(spec.module)
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
    except Exception as err:
        raise FactoryError(
            f"importing {spec.module!r} failed: {_one_line(err)}; fix the module"
        ) from None


def _import_path(path: Path) -> ModuleType:
    """Import a ``.py`` file as a module, its directory first on ``sys.path`` so that it can
    import its neighbours, as ``python path.py`` would."""
    if not path.is_file():
        raise FactoryError(f"no file {str(path)!r}: check the path to the .py file")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = f"_blockopt_factory_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise FactoryError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise FactoryError(
            f"importing {str(path)!r} failed: {_one_line(err)}; fix the file"
        ) from None
    return module


def load_factory(spec: FactorySpec) -> Callable[[], object]:
    """The callable ``spec`` names, after importing its module."""
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


def build(spec: FactorySpec) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """Call the factory and check it returned ``(nn.Module, zero-argument callable)``."""
    factory = load_factory(spec)
    try:
        result = factory()
    except Exception as err:
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
