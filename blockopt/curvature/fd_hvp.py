"""Hessian-vector products of diagonal Hessian blocks by finite differences of gradients.

``FiniteDifferenceHessian(model, probe, blocks)`` has :class:`blockopt.BlockHessian`'s interface
but takes only first derivatives: for block ``b`` and a vector ``v`` it moves the block's own
coordinates, and no others, to ``theta_b +- s`` with ``s = h v / |v|``, runs the probe's
forward and ``loss.backward()`` there, and returns

- ``scheme="central"`` (default): ``|v| (g_b(theta + s) - g_b(theta - s)) / (2 h)``, two
  gradients per product;
- ``scheme="forward"``: ``|v| (g_b(theta + s) - g_b(theta)) / h``, one gradient per product,
  ``g_b(theta)`` computed once at construction.

Only ``.backward()`` is ever called, never ``torch.autograd.grad`` nor a double backward, so the
probe runs the model as training does: flash and memory-efficient attention, ``torch.compile``'d
modules, custom ``autograd.Function``s marked ``once_differentiable`` and reentrant activation
checkpointing (which supports ``.backward()`` only) all work. Nothing here pins kernels: run it
outside :func:`blockopt.curvature.isolation.second_order_kernels`.

Step size. Along a unit direction ``u`` with ``s = h u``, the central quotient is ``H u +
(h^2 / 6) D3g[u, u, u] + ...`` (``D3g`` the gradient's third derivative), and the gradients'
round-off, ``eps G`` (``eps`` the dtype's machine epsilon, ``G`` the scale of the terms summed
into the gradient; rounding ``theta + s`` to the parameter adds as much), enters divided by
``h``: the error ``h^2 T / 6 + eps G / h`` is smallest at ``h = (3 eps G / T)^(1/3)``. Where the
loss varies on a length scale ``L`` in parameter space (``T ~ |H| / L^2``, ``G ~ |H| L``), that
is ``h ~ cbrt(eps) L``, with a relative error of about ``eps^(2/3)``; the forward quotient's
error ``h |D2g[u, u]| / 2 + eps G / h`` gives ``h ~ sqrt(eps) L`` and ``sqrt(eps)``. Weights
vary the loss on the scale of their own norm, so ``L`` is the norm of the coordinates the step
moves:

    h = cbrt(eps) * max(1, L)        (central)
    h = sqrt(eps) * max(1, L)        (forward)
    L = sqrt(sum_i u_i^2 theta_i^2 / sum_i u_i^4)

which is ``|theta_b|``, the block's 2-norm, for a ``u`` spread evenly over the block (a
Rademacher start vector), and the norm of one row for a ``u`` spread over one row of an
embedding or a weight matrix (later Lanczos vectors can concentrate so: with the block's norm,
the embedding of the tiny GPT read its ``lambda_max`` 2e-3 off, 1.2e-3 with this ``L``). A spread
out ``u`` thus moves each coordinate by about ``cbrt(eps)`` of its size; ``max(1, .)`` keeps the
step from vanishing for blocks at zero (biases at initialisation). The expected relative accuracy
is then ``eps^(2/3)`` (central) and ``eps^(1/2)`` (forward): about ``2e-5`` and ``3e-4`` in
float32, ``4e-11`` and ``1e-8`` in float64 (measured against dense Hessians on the models of
tests/test_fd_hvp.py, median over blocks: 1.5e-5 central in float32; 2e-11 to 2e-10 central,
2e-8 to 1e-7 forward in float64). ``eps`` is that of the block's least precise parameter;
``eps=`` sets ``h`` directly (the step's length).

Kinks. Where the loss is only piecewise smooth (ReLU, max-pooling), a step that crosses a kink
sees the gradient jump, and the difference quotient is off by ``jump / h``, however small the
step (on the BatchNorm CNN of the demo, 8 to 40 times the autograd product). The central scheme
detects it for free, from the unperturbed gradient ``g0`` kept from construction: the ratio
``|g+ + g- - 2 g0| / |g+ - g-|`` is about ``h / length scale`` (below 0.1 on the smooth test
models) where the loss is smooth between the two points and of order 1 where the step crossed a
kink; above ``KINK_RATIO`` the product is recomputed with a step ``SHRINK`` times shorter, down
to ``eps^(2/3) |theta_b|`` (round-off then limits the accuracy to about ``eps^(1/3)``), and the
block keeps the shorter step for its later products. A block of nearly zero curvature (a key
bias, a bias before BatchNorm) reads as pure round-off, with a ratio of order 1 at every step;
where no step down to the shortest passes the test, the block keeps the step it started from
and is not tested again (that search costs ``2 log_4(eps^(-1/3))`` evaluations once: 8 in
float32, 18 in float64). Autograd's Hessian of such a loss is that
of the smooth piece the point lies in; finite differences agree with it only where no kink lies
within the step, so on piecewise-linear networks prefer autograd where it runs. The forward
scheme has no such test, and even its short ``sqrt(eps)`` step crosses kinks: on the demo's CNN
its ``lambda_max`` of the convolutions read 10 to 40 times too large (central: within 2e-3). An
``eps=`` step is used as given.

bfloat16 and float16 parameters get nothing special: their ``eps`` (``2^-7`` and ``2^-10``) makes
``h`` a fifth and a tenth of ``|theta_b|``, and ``theta_b + s`` is itself rounded to the
parameter's precision, so expect a few percent (bfloat16) and about one percent (float16)
relative error, and probe a float32 copy of the model where that is not enough. Likewise a
probe computed under autocast has the round-off of the autocast dtype, not of the parameters':
pass ``eps=`` (``cbrt(eps_autocast) * |theta_b|``) there.

What each evaluation leaves behind, and what it sees:

- parameters: the block's coordinates are cloned before a product and copied back after each
  perturbed evaluation (never ``theta + s - s``, which rounds): bit for bit as before, also when
  the probe raises. The perturbation itself runs under ``torch.no_grad()``.
- ``.grad``: every evaluation sets the ``.grad`` of the model's parameters (and of the blocks')
  to ``None``, reads the fresh gradients and puts the previous ``.grad`` tensors back: the
  operator leaves ``.grad`` as it found it on its own, without the caller's ``isolated()``. A
  probe that calls ``backward()`` itself is detected by a ``.grad`` that is set when it returns.
- buffers (BatchNorm running statistics, counters): copied at the start of each call and put
  back after every evaluation, so every evaluation sees the same buffers and each call leaves
  them bit for bit as before. BatchNorm in train mode normalises by the batch's statistics, so
  its forward does not depend on them anyway.
- randomness: torch's CPU RNG state (and CUDA's, when initialised) is saved at construction and
  set before every evaluation, so dropout draws the same masks at every point (a finite
  difference of two different random functions is noise); the caller's state is restored after
  each call. numpy's and Python's ``random`` are not touched: a probe drawing from them needs
  the caller's :func:`blockopt.curvature.isolation.isolated` and gets different draws per
  evaluation.

Gradient hooks on parameters act on ``.grad`` and so on these products too (``loss.backward``
runs them, as training does), and a hook that steps an optimizer inside backward
(``register_post_accumulate_grad_hook``) would change the parameters; data-parallel wrappers
(DDP) synchronise each evaluation's gradients, so every rank must make the same calls.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import nn

from blockopt.curvature.blocks import Block, BlockPart
from blockopt.curvature.hvp import BlockProducts, refuse_freed_graph

__all__ = ["KINK_RATIO", "SCHEMES", "SHRINK", "FiniteDifferenceHessian"]

SCHEMES = ("central", "forward")
"""The finite-difference schemes: two gradients per product, or one and the unperturbed one."""

KINK_RATIO = 0.2
"""A central difference whose :meth:`FiniteDifferenceHessian._kink_ratio` exceeds this crossed a
kink of the loss: it is recomputed with a step ``SHRINK`` times shorter."""

SHRINK = 4.0


def _check_eps(eps: object) -> float | None:
    if eps is None:
        return None
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be None or a positive number (the step length), got {eps!r}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"eps must be None or a positive finite number (the step), got {eps!r}")
    return value


class FiniteDifferenceHessian(BlockProducts):
    """Products ``H_bb v`` for the diagonal Hessian blocks of ``probe()``'s loss over ``blocks``,
    by finite differences of gradients (see the module doc for the step and what is restored).

    ``probe`` is a zero-argument callable returning the scalar loss through ``model``; it is
    called once at construction (the unperturbed gradient ``g0``: statuses, the forward
    scheme's base point and the kink test's centre) and then once (forward) or twice (central)
    per product, twice more for each shortening of the step by the kink test (module doc).
    Vectors are flat, of length ``blocks[i].numel``, laid out part by part as in
    :class:`blockopt.BlockHessian`. ``products`` counts the products computed, ``evaluations``
    the probe's forward and backward passes; a product of a zero vector, or of an unused block,
    is zero and costs none. ``g0`` is kept: build a new operator once the parameters changed.
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Callable[[], torch.Tensor],
        blocks: Sequence[Block],
        *,
        scheme: str = "central",
        eps: float | None = None,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
        self.eps = _check_eps(eps)
        self.blocks = list(blocks)
        if not self.blocks:
            raise ValueError("no blocks to probe: the block list is empty")
        for block in self.blocks:
            if not isinstance(block, Block):
                raise TypeError(
                    f"blocks must be Block objects from blockopt.partition(), got "
                    f"{type(block).__name__}"
                )
        self.model, self.probe, self.scheme = model, probe, scheme
        # Sharded parameters (FSDP's DTensors): vectors hold this rank's shard of each block,
        # and every norm and dot product is a partial sum that ``reduce_sum`` adds over ranks.
        self._sum = reduce_sum if reduce_sum is not None else (lambda t: t)
        self._fsdp = [
            m
            for m in model.modules()
            if any(c.__name__ == "FSDPModule" for c in type(m).__mro__)
            and callable(getattr(m, "reshard", None))
        ]
        for block in self.blocks:
            if any(is_sharded(part.param) and part.dim is not None for part in block.parts):
                raise ValueError(
                    f"block {block.name!r} is a slice of a sharded parameter, which would cut "
                    "across its row shards; probe sharded models with whole-tensor blocks: "
                    "a strategy name (a sharded model's partition keeps fused tensors whole) "
                    "or blocks of whole parameters"
                )
        self.products = 0
        self.evaluations = 0
        params: dict[int, torch.Tensor] = {}
        for p in model.parameters():
            params.setdefault(id(p), p)
        for block in self.blocks:
            for p in block.params:
                params.setdefault(id(p), p)
        self._all = list(params.values())  # whose .grad every evaluation saves and restores
        self._rng = self._rng_state()
        buffers = self._buffers()
        try:
            loss, grads = self._gradient(buffers)
        finally:
            self._set_rng(self._rng)
        self.loss = loss
        """The unperturbed loss (detached), from the construction's evaluation."""
        probed = {id(p) for block in self.blocks for p in block.params}
        self._used = {pid for pid in probed if pid in grads}
        if not self._used:
            raise ValueError(
                "the probe's loss does not depend on any parameter of the blocks probed; compute "
                "it through the model being probed (not a copy of it or another model)"
            )
        self._base = grads  # g(theta): the forward scheme's base point, the kink test's centre
        # Central steps start at the cbrt(eps) step and shrink where a kink is detected, at
        # most down to eps^(2/3) |theta_b|; each block keeps the step it reached.
        self._factor = [1.0] * len(self.blocks)
        self._floor = [  # eps^(2/3) / eps^(1/3), eps that of the block's least precise part
            1.0 if scheme == "forward" else self._eps(i) ** (1.0 / 3.0)
            for i in range(len(self.blocks))
        ]

    # The interface shared with BlockHessian.

    def status(self, index: int) -> str:
        """``"ok"``, or ``"unused"`` when the loss does not depend on any of the block's
        parameters (their ``.grad`` stayed ``None`` after the construction's backward pass)."""
        params = self.blocks[index].params
        return "ok" if any(id(p) in self._used for p in params) else "unused"

    def local_numel(self, index: int) -> int:
        """The block's coordinates on this rank: all of them, unless its parameters are
        sharded (FSDP), then this rank's shard."""
        return sum(_local_numel(part) for part in self.blocks[index].parts)

    def step(self, index: int, direction: torch.Tensor | None = None) -> float:
        """The step length ``h`` of block ``blocks[index]`` at the current parameters: ``eps``
        if given, else ``cbrt(eps)`` (central) or ``sqrt(eps)`` (forward) times ``max(1, L)``
        times the kink test's factor, with ``eps`` that of the block's least precise part and
        ``L`` the norm of the coordinates that ``direction`` moves (module doc), the block's
        norm ``|theta_b|`` when no direction is given."""
        if self.eps is not None:
            return self.eps
        with torch.no_grad():
            theta = torch.cat(
                [
                    _view(part, part.param.detach()).reshape(-1).double()
                    for part in self.blocks[index].parts
                ]
            )
            if direction is None:
                length = math.sqrt(float(self._sum(torch.sum(theta**2))))
            else:
                u2 = direction.detach().double().to(theta.device) ** 2
                sums = self._sum(torch.stack([torch.sum(u2 * theta**2), torch.sum(u2**2)]))
                length = math.sqrt(float(sums[0]) / float(sums[1]))
        eps = self._eps(index)
        root = eps ** (1.0 / 3.0) if self.scheme == "central" else math.sqrt(eps)
        return self._factor[index] * root * max(1.0, length)

    def _eps(self, index: int) -> float:
        """The machine epsilon of the block's least precise part."""
        return max(torch.finfo(part.param.dtype).eps for part in self.blocks[index].parts)

    def matvec_many(
        self, indices: Sequence[int], vectors: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``H_bb v`` for each pair (block index, vector), one after another; indices may
        repeat. Each product is in the vector's dtype and on its device."""
        self.check_vectors(indices, vectors)
        for v in vectors:
            if not v.is_floating_point():
                raise TypeError(f"vectors must be floating point, got {v.dtype}")
        caller = self._rng_state()
        buffers = self._buffers()
        try:
            out = [self._product(i, v, buffers) for i, v in zip(indices, vectors)]
        finally:
            self._set_rng(caller)
        self.products += len(indices)
        return out

    # One product.

    def _product(self, index: int, v: torch.Tensor, buffers: list) -> torch.Tensor:
        block = self.blocks[index]
        norm = math.sqrt(float(self._sum(torch.sum(v.detach().double() ** 2))))
        if self.status(index) == "unused" or norm == 0.0:
            return torch.zeros_like(v)
        if not math.isfinite(norm):
            raise FloatingPointError(f"the vector for block {block.name!r} is not finite")
        direction = v.detach() / norm
        saved = [_view(part, part.param.detach()).clone() for part in block.parts]
        h = self.step(index, direction)
        if self.scheme == "forward":
            plus = self._moved(block, saved, direction, h, buffers)
            return self._quotient(index, plus, self._base, norm / h, v)
        plus, minus = (self._moved(block, saved, direction, s, buffers) for s in (h, -h))
        out = self._quotient(index, plus, minus, norm / (2.0 * h), v)
        # The kink test (module doc): where the two sides disagree, shorten the step until they
        # agree and keep that step for the block. Where they agree at no step down to the
        # shortest, the disagreement is round-off (a block of nearly zero curvature: a key bias,
        # a bias before BatchNorm), not a kink: the block keeps the step it started from.
        start = self._factor[index]
        if (
            self.eps is None
            and start > self._floor[index]
            and self._kink_ratio(block, plus, minus) > KINK_RATIO
        ):
            while self._factor[index] > self._floor[index]:
                self._factor[index] = max(self._factor[index] / SHRINK, self._floor[index])
                h = self.step(index, direction)
                plus, minus = (self._moved(block, saved, direction, s, buffers) for s in (h, -h))
                if self._kink_ratio(block, plus, minus) <= KINK_RATIO:
                    return self._quotient(index, plus, minus, norm / (2.0 * h), v)
            self._factor[index] = self._floor[index] = start
        return out

    def _quotient(
        self,
        index: int,
        plus: dict[int, torch.Tensor],
        minus: dict[int, torch.Tensor],
        scale: float,
        v: torch.Tensor,
    ) -> torch.Tensor:
        """``scale (g+ - g-)`` over the block's parts, flat, in ``v``'s dtype and device."""
        block = self.blocks[index]
        work = torch.promote_types(self.dtype(index), torch.float32)
        pieces = [
            (a - b).mul_(scale).to(v.device)
            for a, b in zip(self._flat(block, plus, work), self._flat(block, minus, work))
        ]
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out.to(v.dtype)

    @staticmethod
    def _flat(
        block: Block, grads: dict[int, torch.Tensor], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Each part's gradient, flat, in ``dtype``; zeros where the gradient is None (the loss
        does not reach the parameter at that point)."""
        return [
            _view(part, grads[id(part.param)]).to(dtype).reshape(-1)
            if id(part.param) in grads
            else torch.zeros(_local_numel(part), dtype=dtype, device=part.param.device)
            for part in block.parts
        ]

    def _kink_ratio(
        self, block: Block, plus: dict[int, torch.Tensor], minus: dict[int, torch.Tensor]
    ) -> float:
        """``|g+ + g- - 2 g0| / |g+ - g-|``: about ``h / length scale`` (1e-3 to 1e-1 on the
        test models) where the loss is smooth between the two points, of order 1 where the step
        crossed a kink (ReLU, max-pooling) and the gradient jumped."""
        wide = torch.float64 if self.device(0).type != "mps" else torch.float32
        second = first = 0.0
        parts = zip(
            self._flat(block, plus, wide),
            self._flat(block, minus, wide),
            self._flat(block, self._base, wide),
        )
        for a, b, z in parts:
            second += float(torch.sum((a + b - 2 * z) ** 2))
            first += float(torch.sum((a - b) ** 2))
        sums = self._sum(torch.tensor([second, first], dtype=wide, device=self.device(0)))
        second, first = float(sums[0]), float(sums[1])
        return math.sqrt(second / first) if first > 0 else 0.0

    def _moved(
        self,
        block: Block,
        saved: list[torch.Tensor],
        direction: torch.Tensor,
        h: float,
        buffers: list,
    ) -> dict[int, torch.Tensor]:
        """The gradients at ``theta_b + h direction``, the block's coordinates put back after."""
        try:
            with torch.no_grad():
                offset = 0
                for part, base in zip(block.parts, saved):
                    n = base.numel()
                    piece = direction[offset : offset + n].reshape(base.shape)
                    offset += n
                    # theta + h u in float64 (float32 on MPS), rounded once to the parameter.
                    wide = torch.promote_types(base.dtype, torch.float32)
                    if base.device.type != "mps":
                        wide = torch.promote_types(wide, torch.float64)
                    moved = base.to(wide) + h * piece.to(device=base.device, dtype=wide)
                    _view(part, part.param.detach()).copy_(moved)
            self._set_rng(self._rng)
            return self._gradient(buffers, block.params)[1]
        finally:
            with torch.no_grad():
                for part, base in zip(block.parts, saved):
                    _view(part, part.param.detach()).copy_(base)

    # One evaluation: forward, backward, gradients read; .grad and buffers put back.

    def _gradient(
        self, buffers: list, params: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The probe's loss (detached) and the gradients of ``params`` (default: every probed
        parameter) that the loss depends on, by ``id``; ``.grad`` and the buffers as they were
        before. The other gradients are dropped at once."""
        from blockopt.curvature.spectra import evaluate_probe  # spectra may import this module

        previous = [p.grad for p in self._all]
        try:
            for p in self._all:
                p.grad = None
            self._reshard()
            with torch.enable_grad():
                loss = evaluate_probe(self.probe)
                early = next((p for p in self._all if p.grad is not None), None)
                if early is not None:
                    raise RuntimeError(
                        "the probe closure called backward() itself: a parameter's .grad was set "
                        "when it returned. A probe must only compute and return the loss; "
                        "blockopt differentiates it itself"
                    )
                try:
                    loss.backward()
                except RuntimeError as err:
                    refuse_freed_graph(err)
                    raise
            self.evaluations += 1
            wanted = [p for b in self.blocks for p in b.params] if params is None else params
            grads = {id(p): _local(p.grad) for p in wanted if p.grad is not None}
        finally:
            for p, g in zip(self._all, previous):
                p.grad = g
            _restore(buffers)
        return loss.detach(), grads

    def _reshard(self) -> None:
        """Drop FSDP's gathered copies of the parameters (a root ``fully_shard`` module keeps
        its own after a backward), so that the next forward gathers the moved shards."""
        for module in self._fsdp:
            module.reshard()

    def _buffers(self) -> list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]:
        return [
            (module, name, buf, buf.detach().clone())
            for module in self.model.modules()
            for name, buf in module.named_buffers(recurse=False)
            if buf is not None
        ]

    @staticmethod
    def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda

    @staticmethod
    def _set_rng(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])


def _restore(buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]]) -> None:
    """Put each buffer back, the tensor itself (a forward may have replaced it) and its values."""
    with torch.no_grad():
        for module, name, buf, saved in buffers:
            if module._buffers.get(name) is not buf:
                module._buffers[name] = buf
            buf.copy_(saved)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter sharded by ``fully_shard``)."""
    return type(tensor).__name__ == "DTensor" and callable(getattr(tensor, "to_local", None))


def whole_tensors(blocks: Sequence[Block]) -> list[Block]:
    """``blocks`` with every block that slices a sharded parameter (sharded by rows, which a
    Q/K/V or per-head slice would cut across) replaced by one block per parameter it touches,
    the whole tensor, named for it, where the first such block stood; each parameter once."""
    out: list[Block] = []
    taken: set[int] = set()
    for block in blocks:
        if not any(part.dim is not None and is_sharded(part.param) for part in block.parts):
            out.append(block)
            continue
        for part in block.parts:
            if id(part.param) not in taken:
                taken.add(id(part.param))
                out.append(Block(part.param_name, (BlockPart(part.param_name, part.param),)))
    return out


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) tensor, in place; any other tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def _view(part: BlockPart, tensor: torch.Tensor) -> torch.Tensor:
    """The part's coordinates in ``tensor`` that this rank holds, as a view."""
    return part.view(_local(tensor))


def _local_numel(part: BlockPart) -> int:
    return _local(part.param).numel() if part.dim is None else part.numel
