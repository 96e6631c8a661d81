"""Blockwise Hessian spectra of a model: ``block_spectra(model, probe)``.

For each block (see :func:`blockopt.partition`) the diagonal Hessian block ``H_bb`` of the
probe's loss is explored with Lanczos from ``probes`` random Rademacher start vectors; the Ritz
values and weights of all runs form the block's stochastic Lanczos quadrature (SLQ) estimate of
its spectral density. One gradient graph serves every block and every step.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from blockopt.curvature.blocks import Block, Strategy, partition
from blockopt.curvature.fd_hvp import FiniteDifferenceHessian, whole_tensors
from blockopt.curvature.hvp import BlockHessian, BlockProducts, DoubleBackwardError
from blockopt.curvature.isolation import isolated
from blockopt.curvature.lanczos import (
    DEFAULT_BANDWIDTH,
    LanczosResult,
    check_lanczos_size,
    check_tol,
    gaussian_density,
    lanczos_many,
)
from blockopt.curvature.precision import half_precision
from blockopt.curvature.precision import upcast as precision_upcast
from blockopt.curvature.runs import block_seed, check_share, shared_runs, start_vectors
from blockopt.curvature.scalars import plain
from blockopt.distributed.reductions import (
    ProbeFailedElsewhere,
    Reduce,
    agree,
    agree_status,
    failed_alike,
    reduced_matvec,
)
from blockopt.distributed.wrappers import fully_sharded, refuse_sharded, sharded_by_fsdp

__all__ = [
    "BlockSpectrum",
    "Spectra",
    "block_spectra",
    "check_lanczos_settings",
    "evaluate_probe",
    "model_spectrum",
]

FORMAT_VERSION = 1

BACKENDS = ("auto", "autograd", "fd")
"""How :func:`block_spectra` takes its products (see its ``backend``)."""
DEFAULT_DTYPE = "float64"
"""The dtype a :class:`Spectra` records when none is given, built by hand or read from a dict
without one: that of the tridiagonal eigenproblems and of dense references, so that the
relative floor (:func:`blockopt.analysis.heterogeneity.default_floor`) that blocks without a
measured round-off level fall back on is float64's for spectra given by hand.
:func:`block_spectra` always records the dtype its products ran in."""


@dataclass(frozen=True)
class BlockSpectrum:
    """The SLQ estimate of one diagonal Hessian block's spectrum.

    ``ritz_values`` (nodes) and ``ritz_weights`` (weights, summing to 1) pool all start vectors,
    each run's weights divided by the number of runs. ``lambda_max``/``lambda_min`` are the
    extreme Ritz values, which converge to the block's extreme eigenvalues from inside as
    ``steps`` grows (exact once ``steps >= numel``). ``trace`` is the Hutchinson estimate
    ``numel * mean(v^T H_bb v)`` over the unit start vectors, exact for diagonal blocks.
    ``status`` is ``"ok"``, ``"unused"`` (the loss does not depend on the block) or
    ``"no_graph"`` (its gradient has no graph, so the block reads as zero; see
    :meth:`blockopt.BlockHessian.status`). ``roundoff`` is the round-off level of the block's
    own products (:attr:`blockopt.curvature.lanczos.LanczosResult.roundoff`), the largest over
    the runs that measured one; ``None`` when none did (every run took one step: a 1-coordinate
    block, a start vector that is an eigenvector), for spectra built by hand, and for dicts
    written before it was recorded. :func:`blockopt.heterogeneity` compares the block's
    curvature scale with it to tell real curvature from round-off.
    """

    name: str
    numel: int
    ritz_values: tuple[float, ...]
    ritz_weights: tuple[float, ...]
    lambda_max: float
    lambda_min: float
    trace: float
    steps: int = 0
    probes: int = 1
    status: str = "ok"
    roundoff: float | None = None

    def bandwidth(self) -> float:
        """Default Gaussian smoothing width: ``DEFAULT_BANDWIDTH`` times ``max |lambda|``."""
        scale = max(abs(self.lambda_max), abs(self.lambda_min))
        return DEFAULT_BANDWIDTH * (scale if scale > 0 else 1.0)

    def grid(self, points: int = 2001, *, sigma: float | None = None) -> np.ndarray:
        """An evenly spaced grid covering the Ritz values and 6 smoothing widths beyond."""
        s = self.bandwidth() if sigma is None else sigma
        return np.linspace(self.lambda_min - 6 * s, self.lambda_max + 6 * s, points)

    def density(self, grid: Sequence[float] | np.ndarray, sigma: float | None = None) -> np.ndarray:
        """The spectral density smoothed by a Gaussian of width ``sigma`` (default
        :meth:`bandwidth`), evaluated on ``grid``; it integrates to 1 over :meth:`grid`."""
        return gaussian_density(
            self.ritz_values, self.ritz_weights, grid, self.bandwidth() if sigma is None else sigma
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "numel": self.numel,
            "ritz_values": list(self.ritz_values),
            "ritz_weights": list(self.ritz_weights),
            "lambda_max": self.lambda_max,
            "lambda_min": self.lambda_min,
            "trace": self.trace,
            "steps": self.steps,
            "probes": self.probes,
            "status": self.status,
            "roundoff": self.roundoff,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "block") -> BlockSpectrum:
        """Read :meth:`to_dict`'s output back, checking every field, since it may come from a
        JSON file; ``where`` names the dict in errors (``ValueError`` naming the field)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} is a {type(data).__name__}, not a block spectrum dict")
        values = _field(data, "ritz_values", "numbers", where)
        weights = _field(data, "ritz_weights", "numbers", where)
        if len(values) != len(weights):
            raise ValueError(
                f"{where} has {len(values)} ritz_values but {len(weights)} ritz_weights; each "
                "Ritz value needs its weight"
            )
        numel = _field(data, "numel", "count", where)
        if numel < 1:
            raise ValueError(f"{where}['numel'] is {numel}; a block holds at least 1 coordinate")
        roundoff = data.get("roundoff")  # absent (written before it was recorded) or None
        if roundoff is not None:
            roundoff = float(_field(data, "roundoff", "number", where))
            if not (math.isfinite(roundoff) and roundoff >= 0.0):
                raise ValueError(
                    f"{where}['roundoff'] is {roundoff!r}; a round-off level is a finite number "
                    ">= 0, or None (not measured)"
                )
        return cls(
            name=_field(data, "name", "str", where),
            numel=int(numel),
            ritz_values=tuple(float(x) for x in values),
            ritz_weights=tuple(float(x) for x in weights),
            lambda_max=float(_field(data, "lambda_max", "number", where)),
            lambda_min=float(_field(data, "lambda_min", "number", where)),
            trace=float(_field(data, "trace", "number", where)),
            steps=int(_field(data, "steps", "count", where, 0)),
            probes=int(_field(data, "probes", "count", where, 1)),
            status=_field(data, "status", "str", where, "ok"),
            roundoff=roundoff,
        )

    @classmethod
    def from_runs(
        cls, name: str, numel: int, runs: Sequence[LanczosResult], status: str = "ok"
    ) -> BlockSpectrum:
        """Pool several Lanczos runs (unit start vectors) into one SLQ estimate; the round-off
        level is the largest any run measured, as ``lambda_max`` is the largest Ritz value."""
        values = [x for r in runs for x in r.ritz_values]
        weights = [w / len(runs) for r in runs for w in r.ritz_weights]
        measured = [r.roundoff for r in runs if r.roundoff is not None]
        return cls(
            name=name,
            numel=numel,
            ritz_values=tuple(values),
            ritz_weights=tuple(weights),
            lambda_max=max(values),
            lambda_min=min(values),
            trace=numel * math.fsum(r.alphas[0] for r in runs) / len(runs),
            steps=max(r.steps for r in runs),
            probes=len(runs),
            status=status,
            roundoff=max(measured) if measured else None,
        )


class Spectra(Mapping[str, BlockSpectrum]):
    """Block name -> :class:`BlockSpectrum`, in partition order, with the probe's settings.

    ``hvps`` counts the Hessian-vector products behind the spectra (the Lanczos steps of all
    runs), ``local_hvps`` those this process computed: ``hvps`` itself, except in a probe whose
    ranks shared the blocks (``block_spectra(..., share=True)``), where each rank computed its
    share and the ranks' ``local_hvps`` add up to ``hvps``. ``seconds`` is the probe's wall
    time, ``dtype`` the (widest) floating-point type the products were computed in (default
    :data:`DEFAULT_DTYPE`), which sets the relative round-off floor of blocks that did not
    measure their own round-off level (:func:`blockopt.heterogeneity`), and ``tol`` the Lanczos
    stopping tolerance (``None``: every block ran ``steps`` steps, or to its size or
    breakdown), ``backend`` how the products were taken (``"autograd"`` or ``"fd"``, finite
    differences; see :func:`block_spectra`).
    """

    def __init__(
        self,
        spectra: Sequence[BlockSpectrum],
        *,
        steps: int,
        probes: int,
        seed: int,
        hvps: int = 0,
        seconds: float = 0.0,
        dtype: str = DEFAULT_DTYPE,
        tol: float | None = None,
        local_hvps: int | None = None,
        backend: str = "autograd",
    ) -> None:
        self._items = {s.name: s for s in spectra}
        if len(self._items) != len(spectra):
            raise ValueError("block names in a Spectra must be unique")
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must name a torch floating-point type, got {dtype!r}")
        check_tol(tol)
        local_hvps = hvps if local_hvps is None else local_hvps
        if not 0 <= local_hvps <= hvps:
            raise ValueError(
                f"local_hvps must lie between 0 and hvps ({hvps}): a process computes at most "
                f"the products behind the spectra, got {local_hvps!r}"
            )
        self.steps, self.probes, self.seed = steps, probes, seed
        self.hvps, self.seconds, self.dtype, self.tol = hvps, seconds, dtype, tol
        self.local_hvps = local_hvps
        if backend not in ("autograd", "fd"):
            raise ValueError(f"backend must be 'autograd' or 'fd', got {backend!r}")
        self.backend = backend

    def __getitem__(self, name: str) -> BlockSpectrum:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Spectra({len(self)} blocks, steps={self.steps}, probes={self.probes})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` reads it back."""
        return {
            "format": FORMAT_VERSION,
            "steps": self.steps,
            "probes": self.probes,
            "seed": self.seed,
            "hvps": self.hvps,
            "local_hvps": self.local_hvps,
            "seconds": self.seconds,
            "dtype": self.dtype,
            "tol": self.tol,
            "backend": self.backend,
            "blocks": [s.to_dict() for s in self._items.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Spectra:
        """Read :meth:`to_dict`'s output back (e.g. ``json.load`` of a saved file), checking
        every field's type: malformed input raises ``ValueError`` naming the field."""
        if not isinstance(data, Mapping):
            raise ValueError(
                f"not a blockopt spectra dict: got a {type(data).__name__} (expected the output "
                "of Spectra.to_dict())"
            )
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"not a blockopt spectra dict of format {FORMAT_VERSION} (its format is "
                f"{data.get('format')!r}; expected the output of Spectra.to_dict())"
            )
        blocks = _field(data, "blocks", "list", "spectra")
        tol = data.get("tol")
        if tol is not None:
            tol = float(_field(data, "tol", "number", "spectra"))
            if not 0.0 < tol < 1.0:
                raise ValueError(f"spectra['tol'] is {tol!r}, not None or a number in (0, 1)")
        hvps = int(_field(data, "hvps", "count", "spectra", 0))
        local_hvps = int(_field(data, "local_hvps", "count", "spectra", hvps))
        if local_hvps > hvps:
            raise ValueError(
                f"spectra['local_hvps'] is {local_hvps}, more than spectra['hvps'] ({hvps})"
            )
        return cls(
            [BlockSpectrum.from_dict(b, where=f"blocks[{i}]") for i, b in enumerate(blocks)],
            steps=int(_field(data, "steps", "count", "spectra")),
            probes=int(_field(data, "probes", "count", "spectra")),
            seed=int(_field(data, "seed", "int", "spectra")),
            hvps=hvps,
            seconds=float(_field(data, "seconds", "number", "spectra", 0.0)),
            dtype=_field(data, "dtype", "str", "spectra", DEFAULT_DTYPE),
            tol=tol,
            local_hvps=local_hvps,
            backend=_backend(data),
        )


def _backend(data: Mapping[str, Any]) -> str:
    backend = _field(data, "backend", "str", "spectra", "autograd")
    if backend not in ("autograd", "fd"):
        raise ValueError(f"spectra['backend'] is {backend!r}, not 'autograd' or 'fd'")
    return backend


_REQUIRED: Any = object()
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an int", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    "count": (
        "a non-negative int",
        lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0,
    ),
    "number": ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "list": ("a list", lambda v: isinstance(v, (list, tuple))),
    "numbers": (
        "a list of numbers",
        lambda v: (
            isinstance(v, (list, tuple))
            and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v)
        ),
    ),
}


def _field(data: Mapping[str, Any], key: str, kind: str, where: str, default: Any = _REQUIRED):
    """``data[key]`` if it is of ``kind`` (see ``_KINDS``), else a ``ValueError`` naming the
    field: what ``from_dict`` reads may come from a JSON file written by anything."""
    if key not in data:
        if default is _REQUIRED:
            raise ValueError(f"{where} lacks {key!r} (expected the output of to_dict())")
        return default
    value = data[key]
    text, check = _KINDS[kind]
    if not check(value):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(f"{where}[{key!r}] is {shown}, not {text}")
    return value


def _refuse_arguments(probe: Callable[..., Any]) -> None:
    """Refuse a probe that needs arguments: blockopt calls it with none."""
    try:
        signature = inspect.signature(probe)
    except (TypeError, ValueError):  # a builtin or C callable: let the call say
        return
    needed = [
        name
        for name, p in signature.parameters.items()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if needed:
        raise TypeError(
            f"the probe takes arguments ({', '.join(needed)}), but blockopt calls it with none; "
            "make it a zero-argument closure over the batch, e.g. lambda: loss_fn(model(x), y)"
        )


def evaluate_probe(probe: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Call ``probe`` and check it returned a finite, differentiable scalar tensor."""
    if not callable(probe):
        raise TypeError(
            f"probe must be a zero-argument callable returning the loss, got {type(probe).__name__}"
        )
    _refuse_arguments(probe)
    loss = probe()
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"the probe returned {type(loss).__name__}, not a tensor; return the loss tensor "
            "itself (not loss.item())"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"the probe returned a tensor of shape {tuple(loss.shape)}; it must return a scalar "
            "loss (reduce it, e.g. with .mean())"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the probe's loss does not depend on any trainable parameter (requires_grad=False); "
            "compute it through the model, outside torch.no_grad(), and do not detach it"
        )
    if not loss.is_floating_point():
        raise TypeError(f"the probe returned a {loss.dtype} tensor; a loss must be floating point")
    if not torch.isfinite(loss.detach()).all():
        raise FloatingPointError(
            f"the probe's loss is {loss.item()}; curvature is undefined there. Check the batch and "
            "the model for NaN/Inf"
        )
    return loss.reshape(())


def check_lanczos_settings(steps: int, probes: int) -> None:
    """Refuse Lanczos step and start-vector counts that are not positive integers."""
    for label, value in (("steps", steps), ("probes", probes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")


def block_spectra(
    model: nn.Module,
    probe: Callable[[], torch.Tensor],
    blocks: Sequence[Block] | Strategy | None = None,
    *,
    steps: int = 30,
    probes: int = 1,
    seed: int = 0,
    tol: float | None = None,
    vectorize: bool = False,
    workers: int | None = None,
    reduce: Reduce | None = None,
    share: bool = False,
    backend: str = "auto",
    upcast: bool = True,
    stages: Sequence[Sequence[int]] | None = None,
    until: Callable[[Spectra], bool] | None = None,
) -> Spectra:
    """Estimate the spectrum of every diagonal Hessian block of ``probe()``'s loss.

    ``probe`` is a zero-argument callable returning a scalar loss computed through ``model`` on a
    batch of the caller's choosing. ``blocks`` is a list from :func:`partition`, a partition
    strategy, or ``None`` for ``partition(model)``. Each block gets ``probes`` Lanczos runs of up
    to ``steps`` steps; with ``tol``, a run stops earlier once its extreme Ritz values have
    settled to ``tol`` relative (see :func:`blockopt.curvature.lanczos.lanczos_many`): the curvature
    scales that decide the heterogeneity score and the block learning rates then cost a
    fraction of ``steps`` products per block, while ``tol=None`` gives the full ``steps``-point
    quadrature every block's density needs. Start vectors depend only on ``seed`` and the
    block's name, so a block's estimate does not change when other blocks are added or removed.
    ``vectorize`` and ``workers`` choose how the products are computed (see
    :class:`blockopt.BlockHessian`); results with any ``workers`` above one are the same, and agree
    with ``workers=1`` to round-off.

    ``reduce`` averages over data-parallel ranks (e.g. :class:`RankMean`,
    called on every rank at once): the probe's loss, and each Lanczos step's products of all
    blocks in one flat buffer, so every rank gets the spectra of the mean of the ranks' losses,
    identical on all ranks; a failure on any rank raises on all (docs/DISTRIBUTED.md).

    ``share=True`` (with a ``reduce`` that knows its group, :class:`RankMean`) splits the work
    instead: the blocks are dealt out among the ranks (:func:`blockopt.distributed.sharing.
    assign_blocks`, balancing each block's bound on its products, ``min(steps, numel)``, then
    its size), each rank runs Lanczos on its own blocks alone, with no per-step collective, and
    one ``all_reduce`` hands every rank every block's tridiagonal, so the per-rank cost falls as
    ``1/world`` and the spectra are identical to the bit on every rank. Each block's spectrum
    is then that of the rank that probed it, on that rank's probe batch, not of the mean of
    the ranks' losses: give each rank a full-size probe batch of its own. With the same batch
    on every rank, shared and unshared probes give the same spectra.

    ``backend`` chooses how the products are taken: ``"autograd"``, double backward through
    one gradient graph, under the math attention kernel and eager execution (0.5 to 0.7 of a
    training step per product); ``"fd"``, central finite differences of gradients
    (:class:`blockopt.curvature.fd_hvp.FiniteDifferenceHessian`), two forward and backward
    passes of the model as training runs it (flash attention, compiled modules, fused and
    ``once_differentiable`` ops, reentrant checkpointing), about 2.5 times autograd's cost and
    within about 1e-4 of it in float32; ``"auto"`` (default), autograd where it works and
    finite differences for a probe where double backward fails or an op without a second
    derivative cuts a block's graph (with a ``reduce``, only the latter: a double backward that
    fails on one rank fails the probe on all; pass ``backend="fd"`` for such models under data
    parallelism). ``Spectra.backend`` says which ran. ``upcast`` (default)
    probes a float16 or bfloat16 model in float32 (:func:`blockopt.curvature.precision.upcast`:
    the parameters come back bit for bit; a float32 copy of them is held meanwhile), which
    gives the float32 result of the model's own weights; ``upcast=False`` probes in the
    parameters' dtype, with its round-off.

    ``stages`` (indices into ``blocks``, each block in one stage) measures the blocks stage by
    stage through the one gradient graph, and ``until``, asked after every stage but the last
    with the spectra of the blocks measured so far, stops there when it returns ``True``: the
    result then holds only those blocks (in ``blocks``' order). A block's spectrum is the same
    whichever stage measures it. Under a ``reduce`` every rank must take the same stages and
    ``until`` must answer alike on identical spectra; an FSDP model measures every block.

    A model sharded by ``fully_shard`` (FSDP2) is probed on all its ranks at once by finite
    differences on Lanczos vectors sharded like its parameters (:mod:`blockopt.distributed.
    sharded`; whole-tensor blocks, no ``reduce``/``share``), the same spectra on every rank.

    The probe leaves ``.grad``, buffers, train/eval modes, global RNG states, the parameters and
    their gradient hooks as it found them; the hooks do not run during the probe.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be one of {BACKENDS} (autograd's double backward, finite "
            f"differences, or autograd with finite differences where it fails), got {backend!r}"
        )
    if not isinstance(upcast, bool):
        raise TypeError(f"upcast must be True or False, got {type(upcast).__name__} {upcast!r}")
    steps, probes, seed, tol = (plain(v) for v in (steps, probes, seed, tol))
    check_lanczos_settings(steps, probes)
    check_tol(tol)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    check_share(share, reduce)
    sharded = sharded_by_fsdp(model)
    if sharded:
        if not fully_sharded(model):
            refuse_sharded(model, "block_spectra")  # FSDP1's flat parameters: not probeable
        _check_sharded(backend, reduce, share)
        backend = "fd"
    if blocks is None or isinstance(blocks, (str, Mapping)) or callable(blocks):
        blocks = partition(model, "tensor" if blocks is None else blocks)
        if sharded:  # a slice would cut across FSDP's row shards: whole tensors instead
            blocks = whole_tensors(blocks)
    blocks = list(blocks)
    _check_blocks(model, blocks)
    stages = _check_stages(stages, len(blocks))
    start = time.perf_counter()
    half = upcast and half_precision(model)
    widen = precision_upcast(model) if half else contextlib.nullcontext()
    used = "fd" if backend == "fd" else "autograd"

    def spectra_of(measured: _Measured, kind: str) -> Spectra:
        order = sorted(measured.runs)
        runs = [run for i in order for run in measured.runs[i]]
        return Spectra(
            [
                BlockSpectrum.from_runs(
                    blocks[i].name, blocks[i].numel, measured.runs[i], measured.status[i]
                )
                for i in order
            ],
            steps=steps,
            probes=probes,
            seed=seed,
            hvps=sum(r.steps for r in runs),
            seconds=time.perf_counter() - start,
            dtype=str(measured.dtype).removeprefix("torch."),
            tol=tol,
            local_hvps=measured.local_hvps,
            backend=kind,
        )

    def measure(kind: str) -> _Measured:
        if sharded:
            from blockopt.distributed.sharded import sharded_runs

            runs, status, local, dtype = sharded_runs(
                model,
                probe,
                blocks,
                steps=steps,
                probes=probes,
                tol=tol,
                seed_of=lambda name: block_seed(seed, name),
            )
            return _Measured(
                {i: runs[i * probes : (i + 1) * probes] for i in range(len(blocks))},
                dict(enumerate(status)),
                local,
                dtype,
            )
        return _probe_blocks(
            _operator(kind, model, probe, blocks, vectorize, workers),
            blocks,
            reduce,
            share,
            steps=steps,
            probes=probes,
            seed=seed,
            tol=tol,
            stages=stages,
            done=None if until is None else (lambda m: bool(until(spectra_of(m, kind)))),
        )

    checked = not sharded  # FSDP swaps its registered parameters during a forward
    isolation = isolated(model, pin_kernels=used == "autograd", check_parameters=checked)
    with isolation, widen, _autocast_watch() as autocast_dtypes:
        try:
            measured = measure(used)
        except (DoubleBackwardError, ProbeFailedElsewhere) as err:
            # Under a reduce the other ranks may see a peer's failure, not this error: one rank
            # falling back alone would desynchronise their collectives. The reduction's flags,
            # the same on every rank, say whether each rank that failed lacked a second
            # derivative; then all take finite differences together (they need none).
            no_second_derivative = (
                isinstance(err, DoubleBackwardError)
                if reduce is None
                else failed_alike(err, "double_backward")
            )
            if backend != "auto" or not no_second_derivative:
                raise
            used = "fd"
        else:
            if backend == "auto" and "no_graph" in measured.status.values():
                used = "fd"  # an op without a second derivative cut some blocks' graph
        if used == "fd" and backend == "auto":
            measured = measure("fd")
    if autocast_dtypes:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in autocast_dtypes))
        warnings.warn(
            f"the probe closure runs the model under torch.autocast ({names}): its products are "
            "only as precise as that dtype, so blocks whose curvature lies within its round-off "
            "are left out as negligible, and finite-difference steps are lost in its rounding. "
            "Compute the probe's loss outside autocast: blockopt probes in the parameters' dtype",
            stacklevel=2,
        )
    cut = [blocks[i].name for i in sorted(measured.status) if measured.status[i] == "no_graph"]
    if cut:
        warnings.warn(
            f"the gradients of {len(cut)} block(s) ({', '.join(cut[:5])}"
            f"{', ...' if len(cut) > 5 else ''}) carry no graph, so their Hessian reads as zero. "
            "Either the loss is linear in them, or an operation without a second derivative "
            "(a custom autograd.Function marked once_differentiable, a .detach(), a no_grad "
            "region) cut it; compute the probe's loss with differentiable operations, or take "
            "finite-difference products (backend='fd', or the default backend='auto')",
            stacklevel=2,
        )
    return spectra_of(measured, used)


@contextlib.contextmanager
def _autocast_watch() -> Iterator[set[torch.dtype]]:
    """The lower-precision dtypes the probe's first module forward inside ran under
    ``torch.autocast``: a global forward pre-hook that removes itself after its first call,
    since every evaluation of the probe closure runs the same code (so the products' many
    forwards pay nothing for it)."""
    seen: set[torch.dtype] = set()
    handle: Any = None

    def hook(module: nn.Module, args: Any) -> None:
        seen.update(_autocast_dtype(d) for d in _AUTOCAST_DEVICES if _autocast_on(d))
        handle.remove()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_on(device: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device))
    except TypeError:  # torch before 2.4: no device argument
        if device == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


def _autocast_dtype(device: str) -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device)
    if device == "cpu":  # torch before 2.4
        return torch.get_autocast_cpu_dtype()
    return torch.get_autocast_gpu_dtype()


def _check_stages(stages: Sequence[Sequence[int]] | None, count: int) -> list[list[int]]:
    """``stages`` as lists of block indices (default: one stage of every block), refused
    unless they name each of the ``count`` blocks exactly once."""
    if stages is None:
        return [list(range(count))]
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        raise TypeError(f"stages must be a sequence of sequences of block indices, got {stages!r}")
    out = []
    for stage in stages:
        if isinstance(stage, (str, bytes)) or not isinstance(stage, Sequence) or not stage:
            raise TypeError(
                f"each stage must be a non-empty sequence of block indices, got {stage!r}"
            )
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in stage):
            raise TypeError(f"block indices in stages must be ints, got {list(stage)!r}")
        out.append(list(stage))
    flat = sorted(i for stage in out for i in stage)
    if flat != list(range(count)):
        raise ValueError(
            f"stages must name each of the {count} blocks (indices 0 to {count - 1}) exactly "
            f"once, got {[list(st) for st in out]!r}"
        )
    return out


def _check_sharded(backend: str, reduce: Any, share: bool) -> None:
    """An FSDP model is probed by sharded finite differences: refuse what cannot apply."""
    if backend == "autograd":
        raise TypeError(
            "block_spectra cannot take autograd products of a model sharded by FSDP: FSDP "
            "all-gathers its parameters outside autograd, so the loss has no second derivative "
            "with respect to them. Use backend='fd' (or the default 'auto'), which takes finite "
            "differences of FSDP's own gradients, rank by rank"
        )
    if reduce is not None or share:
        raise ValueError(
            "an FSDP model's probe already runs on all its ranks (each product is one FSDP "
            "forward and backward): drop reduce= and share="
        )


def _operator(
    backend: str,
    model: nn.Module,
    probe: Callable[[], torch.Tensor],
    blocks: Sequence[Block],
    vectorize: bool,
    workers: int | None,
) -> Callable[[], tuple[torch.Tensor, BlockHessian | FiniteDifferenceHessian]]:
    """What builds the probe's loss and its block-product operator, for ``backend``."""
    if backend == "fd":

        def finite() -> tuple[torch.Tensor, FiniteDifferenceHessian]:
            hessian = FiniteDifferenceHessian(model, probe, blocks)
            return hessian.loss, hessian

        return finite

    def autograd() -> tuple[torch.Tensor, BlockHessian]:
        loss = evaluate_probe(probe)
        return loss, BlockHessian(loss, blocks, vectorize=vectorize, workers=workers)

    return autograd


@dataclass
class _Measured:
    """A probe's runs so far, block index -> its runs and status (in the order measured), the
    products this process computed and the widest dtype of the products."""

    runs: dict[int, list[LanczosResult]]
    status: dict[int, str]
    local_hvps: int
    dtype: torch.dtype


def _probe_blocks(
    prepare: Callable[[], tuple[torch.Tensor, Any]],
    blocks: Sequence[Block],
    reduce: Reduce | None,
    share: bool,
    *,
    steps: int,
    probes: int,
    seed: int,
    tol: float | None,
    stages: Sequence[Sequence[int]],
    done: Callable[[_Measured], bool] | None,
) -> _Measured:
    """Run Lanczos on the blocks with the operator ``prepare`` builds, stage by stage (block
    indices), until ``done`` says after a stage that the blocks measured so far are enough."""
    if reduce is None:
        _loss, hessian = prepare()
    else:
        device = blocks[0].parts[0].param.device
        _loss, hessian = agree(prepare, reduce, lambda r: float(r[0].detach()), device)
    measured = _Measured({}, {}, 0, hessian.dtype(stages[0][0]))
    for n, stage in enumerate(stages):
        if share:
            runs, status, local = shared_runs(
                hessian,
                blocks,
                reduce,
                steps=steps,
                probes=probes,
                seed=seed,
                tol=tol,
                indices=stage,
            )
        else:
            runs, status = _local_runs(hessian, blocks, stage, reduce, steps, probes, seed, tol)
            local = sum(r.steps for r in runs)
        for k, i in enumerate(stage):
            measured.runs[i] = runs[k * probes : (k + 1) * probes]
            measured.status[i] = status[k]
            measured.dtype = torch.promote_types(measured.dtype, hessian.dtype(i))
        measured.local_hvps += local
        if done is not None and n + 1 < len(stages) and done(measured):
            break
    return measured


def _local_runs(
    hessian: BlockProducts,
    blocks: Sequence[Block],
    indices: Sequence[int],
    reduce: Reduce | None,
    steps: int,
    probes: int,
    seed: int,
    tol: float | None,
) -> tuple[list[LanczosResult], list[str]]:
    """Lanczos on the blocks at ``indices`` in this process (each product averaged over the
    ranks with a ``reduce``): their runs and status."""
    starts = start_vectors(hessian, blocks, indices, probes, seed)

    def matvec(ops: Sequence[int], vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return hessian.matvec_many([indices[op // probes] for op in ops], vs)

    check_lanczos_size(
        [v.numel() for v in starts],
        steps,
        starts,
        names=[blocks[i].name for i in indices for _ in range(probes)],
    )
    try:
        runs = lanczos_many(
            matvec if reduce is None else reduced_matvec(matvec, reduce), starts, steps, tol=tol
        )
    except FloatingPointError as err:
        raise FloatingPointError(_non_finite(err, blocks, indices, probes, hessian)) from err
    status = [hessian.status(i) for i in indices]
    if reduce is not None:
        status = agree_status(status, reduce, blocks[0].parts[0].param.device)
    return runs, status


def _non_finite(
    err: FloatingPointError,
    blocks: Sequence[Block],
    indices: Sequence[int],
    probes: int,
    hessian: BlockProducts,
) -> str:
    """The message for products of the blocks at ``indices`` that went non-finite: which
    block, and what to do."""
    text = str(err)
    words = text.split()
    if len(words) > 1 and words[0] == "operator" and words[1].isdigit():
        index = indices[int(words[1]) // probes]
        text = f"block {blocks[index].name!r}" + text[len(f"operator {words[1]}") :]
    dtypes = {hessian.dtype(i) for i in indices}
    if dtypes & {torch.float16, torch.bfloat16}:
        return (
            f"{text}: in {'/'.join(sorted(str(d).removeprefix('torch.') for d in dtypes))}, "
            "the double backward of attention and normalisation layers overflows; probe in "
            "float32 (upcast=True, the default)"
        )
    return (
        f"{text}: the loss or its curvature at these parameters is not finite; check the "
        "probe's batch and the model's weights for inf or NaN"
    )


def model_spectrum(
    model: nn.Module,
    probe: Callable[[], torch.Tensor],
    *,
    steps: int = 30,
    probes: int = 1,
    seed: int = 0,
) -> BlockSpectrum:
    """The spectrum of the whole Hessian (one block of all trainable parameters), comparable
    with full-Hessian tools."""
    return block_spectra(model, probe, "model", steps=steps, probes=probes, seed=seed)["model"]


def _check_blocks(model: nn.Module, blocks: Sequence[Block]) -> None:
    if not blocks:
        raise ValueError("no blocks to probe: the block list is empty")
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"parameter {meta!r} is on the meta device and holds no values to probe; "
            "materialise the model first (model.to_empty(device=...), then load its weights)"
        )
    owned = {id(p) for p in model.parameters()}
    names = set()
    for block in blocks:
        if not isinstance(block, Block):
            raise TypeError(
                "blocks must be Block objects from blockopt.partition(), "
                f"got {type(block).__name__}"
            )
        if block.name in names:
            raise ValueError(f"two blocks are named {block.name!r}; block names must be unique")
        names.add(block.name)
        for part in block.parts:
            if id(part.param) not in owned:
                raise ValueError(
                    f"block {block.name!r} holds {part.param_name!r}, which is not a parameter of "
                    "this model; partition the model you probe"
                )
            if not part.param.requires_grad:
                raise ValueError(
                    f"block {block.name!r} holds {part.param_name!r}, which is frozen "
                    "(requires_grad=False); re-partition after freezing"
                )
