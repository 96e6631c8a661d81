"""Lanczos with full reorthogonalisation and stochastic Lanczos quadrature (SLQ).

Pure numerics on abstract symmetric operators given as matrix-vector products; nothing here knows
about ``nn.Module``. Several operators (of different sizes) can run in lockstep, so that one call
of a batched matvec advances all of them by one step: this is how one gradient graph serves every
block of a model at once.

For a symmetric ``A`` (n x n) and a start vector ``v`` with ``|v| = 1``, m Lanczos steps give a
tridiagonal ``T`` (m x m) with ``V^T A V = T``. Its eigenvalues (Ritz values) ``theta_i`` and the
squared first components ``tau_i^2`` of its eigenvectors are the nodes and weights of a Gauss
quadrature for the spectral measure of ``A`` seen from ``v``: ``v^T f(A) v ~ sum_i tau_i^2
f(theta_i)``. Averaging over random ``v`` estimates the spectral density (SLQ).

Each run also measures the round-off of its own products, for free. For a symmetric ``A``,
``v_{j-1} . (A v_j) = v_j . (A v_{j-1})`` exactly; with ``y_j = A v_j + e_j`` the computed
products, the two sides differ by ``d_j = v_{j-1} . e_j - v_j . e_{j-1}``, round-off alone, and
``|d_j| <= |e_{j-1}| + |e_j|``. :attr:`LanczosResult.roundoff` is ``max_j |d_j|``: two dot
products per step (:func:`accurate_dot`). Both sides are computed; comparing ``v_{j-1} . y_j``
with ``beta_{j-1}`` instead would add the basis' loss of orthogonality, which in float32 grows
with the block's size: on a diagonal float32 operator of 10^7 coordinates, 4e-3 of its scale,
against 1e-10 for ``d_j`` itself. See :mod:`blockopt.analysis.heterogeneity` for how it tells a
block's curvature from round-off.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DEFAULT_BANDWIDTH",
    "LanczosResult",
    "accurate_dot",
    "available_memory",
    "check_lanczos_size",
    "check_tol",
    "gaussian_density",
    "lanczos",
    "lanczos_many",
    "random_start",
    "ritz",
]

# Matvec over several operators: (operator indices, vectors) -> products, one per index.
ManyMatvec = Callable[[Sequence[int], Sequence[torch.Tensor]], Sequence[torch.Tensor]]

SETTLED_STEPS = 2
"""With a tolerance, a run stops after this many steps in a row that moved its extreme Ritz
values by at most the tolerance: one calm step can be a pause before the next jump."""

DEFAULT_BANDWIDTH = 0.01
"""Gaussian smoothing width as a fraction of the spectrum's scale ``max |theta|`` (see
:func:`gaussian_density`)."""


def check_tol(tol: float | None) -> None:
    """Refuse a Lanczos stopping tolerance that is not ``None`` or a number in ``(0, 1)``."""
    if tol is None:
        return
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)):
        raise TypeError(f"tol must be None or a number in (0, 1), got {type(tol).__name__}")
    if not (math.isfinite(tol) and 0.0 < tol < 1.0):
        raise ValueError(f"tol must be None or a number in (0, 1), e.g. 0.03, got {tol!r}")


def _fresh_direction(stack: torch.Tensor, step: int) -> torch.Tensor | None:
    """A unit vector orthogonal to the rows of ``stack`` (an orthonormal basis), from a
    generator seeded by ``step`` alone, so that a run's result does not depend on the other
    runs beside it; ``None`` where the rows already span the space, numerically."""
    g = torch.Generator().manual_seed(0x5EED + step)
    r = torch.randn(stack.shape[1], generator=g, dtype=torch.float64)
    r = r.to(dtype=stack.dtype, device=stack.device)
    size = float(torch.linalg.vector_norm(r))
    for _ in range(2):  # twice is enough
        r = r - stack.T @ (stack @ r)
    norm = float(torch.linalg.vector_norm(r))
    if not (math.isfinite(norm) and norm > 1e-3 * size):
        return None
    return r / norm


def _settled(alphas: Sequence[float], betas: Sequence[float], previous: tuple[float, float]):
    """The extreme Ritz values of the tridiagonal, and whether both moved by at most what
    ``previous`` allows: returns ``((lo, hi), moved)`` with ``moved`` relative to the scale."""
    values, _ = ritz(alphas, betas)
    lo, hi = float(values[0]), float(values[-1])
    if math.isnan(previous[0]):  # the first step: nothing to have moved from
        return (lo, hi), math.nan
    scale = max(abs(lo), abs(hi))
    moved = max(abs(lo - previous[0]), abs(hi - previous[1]))
    return (lo, hi), (moved / scale if scale > 0 else 0.0)


@dataclass(frozen=True)
class LanczosResult:
    """The tridiagonal ``T`` of one Lanczos run and its Ritz pairs.

    ``alphas`` (length m) and ``betas`` (length m-1) define ``T``; ``ritz_values`` ascend and
    ``ritz_weights`` (squared first eigenvector components) sum to 1. ``breakdown`` is True when
    the run could take fewer than ``steps`` steps: it reached the operator's dimension (its Ritz
    values are then exact eigenvalues), or its Krylov space became invariant where it could not
    go on in a new direction (see :func:`lanczos_many`); ``settled`` when the run stopped early
    because its extreme Ritz values had settled to the tolerance asked for. ``roundoff`` is the
    round-off level of the run's products, the largest departure from symmetry ``|v_{j-1} . (A
    v_j) - v_j . (A v_{j-1})|`` over its steps (see the module docstring), in the operator's
    units; ``None`` for a run of one step, which has no pair of vectors to compare.
    """

    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    ritz_values: tuple[float, ...]
    ritz_weights: tuple[float, ...]
    breakdown: bool
    settled: bool = False
    roundoff: float | None = None

    @property
    def steps(self) -> int:
        return len(self.alphas)

    @classmethod
    def from_tridiagonal(
        cls,
        alphas: Sequence[float],
        betas: Sequence[float],
        *,
        breakdown: bool = False,
        settled: bool = False,
        roundoff: float | None = None,
    ) -> LanczosResult:
        """The run whose tridiagonal is ``alphas`` and ``betas``, with its Ritz pairs."""
        values, weights = ritz(alphas, betas)
        return cls(
            alphas=tuple(alphas),
            betas=tuple(betas),
            ritz_values=tuple(float(x) for x in values),
            ritz_weights=tuple(float(x) for x in weights),
            breakdown=breakdown,
            settled=settled,
            roundoff=roundoff,
        )


def ritz(alphas: Sequence[float], betas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and squared first eigenvector components of a tridiagonal."""
    a = torch.tensor(list(alphas), dtype=torch.float64)
    b = torch.tensor(list(betas), dtype=torch.float64)
    t = torch.diag(a)
    if b.numel():
        t += torch.diag(b, 1) + torch.diag(b, -1)
    # torch's eigh, not numpy's: numpy's BLAS may run its own threads, and on a busy machine a
    # 30 x 30 eigendecomposition then took milliseconds instead of tens of microseconds.
    values, vectors = torch.linalg.eigh(t)
    weights = vectors[0] ** 2
    return values.numpy(), (weights / weights.sum()).numpy()


def accurate_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``a . b`` accumulated in float64 (float32 on Apple's MPS, which has no float64), so that
    its own rounding stays below the round-off it helps measure: a half-precision dot loses
    digits at once, and a float32 BLAS dot more with every decade of length."""
    wide = torch.float32 if a.device.type == "mps" else torch.float64
    return float(torch.sum(a * b, dtype=wide))


MAX_REORTH_FLOPS = 1e13
"""The most floating-point operations a probe's reorthogonalisation may take, about ``4 n k^2``
for ``k`` steps on ``n`` coordinates summed over the runs: minutes on a CPU core. SLQ needs 10
to 100 steps; a request beyond this is a mistake (``steps=10**9``), refused before any
product."""
MEMORY_SHARE = 0.5
"""A probe's Lanczos bases may take at most this share of the memory available on their device
(``MemAvailable`` on Linux, free memory on CUDA)."""


def available_memory(device: torch.device) -> int | None:
    """Bytes available for new tensors on ``device``, or ``None`` where that is not known."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_lanczos_size(
    sizes: Sequence[int],
    steps: int,
    starts: Sequence[torch.Tensor],
    reorthogonalize: bool = True,
    names: Sequence[str] | None = None,
) -> None:
    """Refuse, before any product, Lanczos runs of ``steps`` steps on operators of ``sizes``
    coordinates (vectors like ``starts``) whose bases would take more than ``MEMORY_SHARE`` of
    the memory available or whose reorthogonalisation more than ``MAX_REORTH_FLOPS``; the
    message gives the numbers and the largest run (named by ``names``, else by its index)."""
    if not reorthogonalize or not sizes:
        return
    ks = [min(steps, n) for n in sizes]
    label = (
        [f"block {name!r}" for name in names]
        if names
        else [f"operator {i}" for i in range(len(sizes))]
    )
    big = max(range(len(sizes)), key=lambda i: ks[i] * sizes[i])
    where = f"the largest, {label[big]}, has {sizes[big]:,} coordinates"
    flops = sum(4.0 * n * k * k for n, k in zip(sizes, ks))
    if flops > MAX_REORTH_FLOPS:
        raise ValueError(
            f"{steps:,} Lanczos steps with full reorthogonalisation would take about "
            f"{flops:.1e} floating-point operations for the basis alone ({where}), hours on a "
            f"CPU; SLQ needs 10 to 100 steps: ask for fewer steps"
        )
    by_device: dict[torch.device, int] = {}
    for n, k, v in zip(sizes, ks, starts):
        by_device[v.device] = by_device.get(v.device, 0) + k * n * v.element_size()
    for device, need in by_device.items():
        have = available_memory(device)
        if have is not None and need > MEMORY_SHARE * have:
            raise ValueError(
                f"the Lanczos bases of {steps:,} steps need {need / 2**30:.2f} GiB on {device} "
                f"(one vector per step per block; {where}), more than half of the "
                f"{have / 2**30:.2f} GiB available: ask for fewer steps, probe fewer or "
                "smaller blocks at a time (blocks=), or split the largest (a finer partition)"
            )


def random_start(
    n: int, *, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A Rademacher vector scaled to unit norm: ``|v|^2 = 1`` and ``n E[v v^T] = I``."""
    signs = torch.randint(0, 2, (n,), generator=generator, device="cpu", dtype=torch.int8)
    v = signs.to(dtype=dtype, device=device).mul_(2).sub_(1)
    return v.div_(math.sqrt(n))


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    steps: int,
    *,
    reorthogonalize: bool = True,
    tol: float | None = None,
) -> LanczosResult:
    """Run ``steps`` Lanczos iterations of the symmetric operator ``matvec`` from ``v0`` (fewer
    with ``tol``; see :func:`lanczos_many`)."""
    return lanczos_many(
        lambda _, vs: [matvec(vs[0])], [v0], steps, reorthogonalize=reorthogonalize, tol=tol
    )[0]


def lanczos_many(
    matvec: ManyMatvec,
    starts: Sequence[torch.Tensor],
    steps: int,
    *,
    reorthogonalize: bool = True,
    tol: float | None = None,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sizes: Sequence[int] | None = None,
) -> list[LanczosResult]:
    """Lanczos on several symmetric operators in lockstep.

    ``matvec(indices, vectors)`` returns ``A_i v`` for each operator index ``i`` still running;
    operator ``i`` starts from ``starts[i]`` (normalised here). Each run stops after ``steps``
    iterations or at its own dimension, whichever comes first. At breakdown (``beta_j <= 100
    eps sqrt(n) * |T|``: the Krylov space is invariant, and the operator's other eigenvalues lie
    outside it) a reorthogonalised run goes on from a random unit vector orthogonal to its
    basis, with ``beta_j = 0``: ``T`` becomes block diagonal, its Ritz values are exact
    eigenvalues once the run reaches the operator's dimension, and the new directions carry no
    quadrature weight, so the start vector's spectral measure is unchanged. Without
    reorthogonalisation, or with sharded vectors, a run stops at breakdown.

    With ``tol``, a run also stops once its extreme Ritz values have settled: after
    ``SETTLED_STEPS`` (2) steps in a row, from the second on, that moved neither the largest nor
    the smallest Ritz value by more than ``tol`` times the larger of their magnitudes. Extreme
    Ritz values approach the extreme eigenvalues from inside, fastest where the spectrum's edge
    stands out, so a block whose curvature scale is all that matters stops as soon as it is
    known to about that tolerance (docs/BENCHMARKS.md, "Probe cost").

    With ``reorthogonalize`` (the default) every new vector is orthogonalised twice against all
    previous ones (classical Gram-Schmidt, "twice is enough"), so Ritz values do not repeat as
    ghosts. Memory: the basis, ``min(steps, n)`` vectors per operator in one tensor allocated at
    the start (pages the run never reaches are never touched), plus a handful of vectors in
    flight (the product, the residual and its Gram-Schmidt temporaries, two ``(steps,)``
    coefficient vectors); without reorthogonalisation, the handful alone.
    :func:`check_lanczos_size` refuses a run whose basis could not fit or whose
    reorthogonalisation could not finish in reasonable time, before any product.

    Each run's ``roundoff`` (see the module docstring) costs two dot products per step and no
    stored vector: ``v_j . (A v_{j-1})`` once ``v_j`` is formed, ``v_{j-1} . (A v_j)`` when the
    next product comes.

    Sharded vectors (each process holds a slice of every operator's coordinates, as FSDP shards
    parameters): ``reduce_sum`` adds a tensor of partial sums over the processes (an
    ``all_reduce``), and is applied to every dot product, norm and reorthogonalisation
    coefficient, so all processes build the same tridiagonal; ``sizes`` are the operators' whole
    sizes (default: the vectors' lengths).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    check_tol(tol)
    total = reduce_sum if reduce_sum is not None else (lambda t: t)

    def dot(a: torch.Tensor, b: torch.Tensor) -> float:
        if reduce_sum is None:
            return accurate_dot(a, b)
        kind = torch.float32 if a.device.type == "mps" else torch.float64
        return float(total(torch.sum(a * b, dtype=kind)))

    k = len(starts)
    if sizes is not None and len(sizes) != k:
        raise ValueError(f"{len(sizes)} sizes for {k} start vectors")
    if k == 0:
        return []
    check_lanczos_size([v0.numel() for v0 in starts], steps, starts, reorthogonalize)
    wide = torch.float32 if starts[0].device.type == "mps" else torch.float64  # for norms
    # Run i's Lanczos vectors, one row per step, in one tensor allocated up front: the
    # reorthogonalisation reads its rows as a view, so no step copies the basis.
    basis: list[torch.Tensor] = []
    filled: list[int] = []  # rows of basis[i] in use
    current: list[torch.Tensor] = []
    previous: list[torch.Tensor | None] = []  # v_{j-1} of run i
    limits: list[int] = []
    tols: list[float] = []
    for v0 in starts:
        # a sharded run's shard may be empty on some process (a parameter of fewer rows than
        # processes): its partial sums are zero, and the others' carry the run
        if v0.dim() != 1 or (v0.numel() == 0 and reduce_sum is None):
            raise ValueError(
                f"start vectors must be non-empty 1-D tensors, got shape {tuple(v0.shape)}"
            )
        if not v0.is_floating_point():
            raise TypeError(f"start vectors must be floating point, got {v0.dtype}")
        norm = (
            torch.linalg.vector_norm(v0, dtype=wide)
            if reduce_sum is None
            else torch.sqrt(total(torch.sum(torch.square(v0.to(wide)))))
        )
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError("a start vector is zero or not finite")
        v = (v0 / norm).to(v0.dtype)
        n = v0.numel() if sizes is None else int(sizes[len(limits)])
        limit = min(steps, n)
        rows = limit if reorthogonalize else 1
        basis.append(torch.empty((rows, v.numel()), dtype=v.dtype, device=v.device))
        basis[-1][0] = v
        filled.append(1)
        current.append(basis[-1][0])
        previous.append(None)
        limits.append(limit)
        eps = torch.finfo(v0.dtype).eps
        tols.append(100.0 * eps * math.sqrt(n))
    alphas: list[list[float]] = [[] for _ in range(k)]
    betas: list[list[float]] = [[] for _ in range(k)]
    scale = [0.0] * k  # running estimate of |T| for the breakdown test
    extremes = [(math.nan, math.nan)] * k  # the extreme Ritz values after the previous step
    done = [False] * k
    broke = [False] * k
    settled = [False] * k
    calm = [0] * k  # steps in a row that moved the extreme Ritz values by at most tol
    # v_j . (A v_{j-1}) of each run's current v_j, and the largest |v_{j-1} . (A v_j) - that|
    lower: list[float] = [0.0] * k
    roundoff: list[float | None] = [None] * k
    active = list(range(k))
    while active:
        products = matvec(active, [current[i] for i in active])
        if len(products) != len(active):
            raise ValueError(f"matvec returned {len(products)} products for {len(active)} vectors")
        still = []
        for i, w in zip(active, products):
            v = current[i]
            w = product = w.reshape(-1).to(v.dtype)
            alpha = (
                float(total(torch.dot(w, v))) if reduce_sum is not None else float(torch.dot(w, v))
            )
            if not math.isfinite(alpha):
                raise FloatingPointError(
                    f"operator {i} produced a non-finite value at Lanczos step {len(alphas[i]) + 1}"
                )
            alphas[i].append(alpha)
            w = w - alpha * v
            if previous[i] is not None:
                w = w - betas[i][-1] * previous[i]
                defect = abs(dot(previous[i], product) - lower[i])
                roundoff[i] = defect if roundoff[i] is None else max(roundoff[i], defect)
            if reorthogonalize:
                stack = basis[i][: filled[i]]  # a view
                for _ in range(2):
                    w = w - stack.T @ total(stack @ w)
            beta = (  # accumulated wide: |w|^2 of a float32 product can exceed float32's range
                math.sqrt(float(total(torch.sum(torch.square(w.to(wide))))))
                if reduce_sum is not None
                else float(torch.linalg.vector_norm(w, dtype=wide))
            )
            scale[i] = max(scale[i], abs(alpha) + beta + (betas[i][-1] if betas[i] else 0.0))
            if len(alphas[i]) >= limits[i]:
                done[i] = True
                continue
            if not math.isfinite(beta):
                raise FloatingPointError(f"operator {i} produced a non-finite Lanczos vector")
            if tol is not None:
                extremes[i], moved = _settled(alphas[i], betas[i], extremes[i])
                calm[i] = calm[i] + 1 if moved <= tol else 0  # NaN (the first step): False
                if calm[i] >= SETTLED_STEPS:
                    done[i] = settled[i] = True
                    continue
            restarted = beta <= tols[i] * scale[i] or beta == 0.0
            if restarted:  # the Krylov space is invariant: go on in a new direction, if any
                fresh = (
                    _fresh_direction(basis[i][: filled[i]], len(alphas[i]))
                    if reorthogonalize and reduce_sum is None
                    else None
                )
                if fresh is None:
                    done[i] = broke[i] = True
                    continue
                beta, w = 0.0, fresh
            betas[i].append(beta)
            if reorthogonalize:
                v_next = basis[i][filled[i]]
                if restarted:
                    v_next.copy_(w)
                else:
                    torch.div(w, beta, out=v_next)
                filled[i] += 1
            else:
                v_next = w / beta
            lower[i] = dot(v_next, product)
            previous[i] = v
            current[i] = v_next
            still.append(i)
        active = still
    return [
        LanczosResult.from_tridiagonal(
            alphas[i],
            betas[i],
            breakdown=broke[i] or limits[i] < steps,
            settled=settled[i],
            roundoff=roundoff[i],
        )
        for i in range(k)
    ]


def gaussian_density(
    nodes: Sequence[float] | np.ndarray,
    weights: Sequence[float] | np.ndarray,
    grid: Sequence[float] | np.ndarray,
    sigma: float,
) -> np.ndarray:
    """Smoothed spectral density ``sum_i w_i N(x; theta_i, sigma^2)`` evaluated on ``grid``.

    With weights summing to 1 this is a probability density on the real line: it integrates to
    1 over any grid that extends a few ``sigma`` beyond the extreme nodes.
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    x = np.asarray(grid, dtype=np.float64)[:, None]
    t = np.asarray(nodes, dtype=np.float64)[None, :]
    w = np.asarray(weights, dtype=np.float64)
    kernel = np.exp(-0.5 * ((x - t) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return kernel @ w
