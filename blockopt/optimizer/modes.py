"""The optimizers blockopt switches between, and how state crosses a switch.

Three modes: ``"sgd"`` (torch.optim.SGD), ``"block_sgd"`` (:class:`BlockSGD`: SGD with one
learning-rate factor per block, blocks that are tensor slices included) and ``"adam"``
(torch.optim.AdamW). Each mode's class can be replaced by any ``torch.optim`` or
``torch_optimizer`` class, given by class or by name.

State mapping on a switch (per parameter, in the optimizer's own state keys):

- SGD momentum ``b`` (``b <- mu b + g``) and Adam's first moment ``m`` (``m <- beta1 m +
  (1 - beta1) g``) both track the gradient's running mean: ``m = (1 - mu) b`` and back.
- Adam's second moment starts at ``v = max(m^2, g^2)`` (the current gradient and the carried mean:
  no variance is known yet) and its step count at ``ceil(5 / (1 - beta2))``, where both bias
  corrections are within 1% of 1, so the carried moments are used as they are.
- Without a running mean to carry (SGD without momentum, or before its first step) Adam starts
  fresh, as a new Adam would, so that its first step is as long as its later ones.
- A class with other state keys starts fresh; its hyperparameters are still kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from blockopt.curvature.blocks import Block
from blockopt.optimizer.policy import MODES

__all__ = ["MODES", "BlockSGD", "resolve_optimizer_class", "transfer_state"]


# Classes that cannot serve as a mode, and why.
_REFUSED = {
    "Adahessian": (
        "Adahessian needs loss.backward(create_graph=True) on every training step (it takes its "
        "own Hessian-vector products), which a blockopt mode cannot provide; use "
        "torch_optimizer.Adahessian directly, or pick another class for this mode"
    ),
    "Lookahead": (
        "Lookahead wraps another optimizer instead of taking parameters; give the inner "
        "optimizer's class as the mode, or wrap blockopt's optimizer in Lookahead yourself"
    ),
    "LBFGS": (
        "LBFGS re-evaluates the loss several times per step through a closure it must be "
        "given, and a blockopt mode steps without one; use torch.optim.LBFGS directly, or "
        "pick a first-order class for this mode"
    ),
    "SparseAdam": (
        "SparseAdam takes only sparse gradients, and blockopt's parameters are dense (an "
        "embedding with sparse=True is refused); use AdamW (the default) or Adam for this mode"
    ),
}


def resolve_optimizer_class(spec: str | type) -> type[Optimizer]:
    """An optimizer class from a class or a name: ``torch.optim`` names first, then
    ``torch_optimizer`` (looked up with getattr, case-insensitively)."""
    if isinstance(spec, type):
        cls = spec
    elif isinstance(spec, str):
        cls = _lookup(spec)
    else:
        raise TypeError(
            f"an optimizer must be given as a class or a name, got {type(spec).__name__}"
        )
    if not issubclass(cls, Optimizer):
        raise TypeError(f"{cls.__name__} is not a torch.optim.Optimizer subclass")
    if cls.__name__ in _REFUSED:
        raise ValueError(f"{cls.__name__} cannot be a blockopt mode: {_REFUSED[cls.__name__]}")
    return cls


def _lookup(name: str) -> type:
    key = name.lower().replace("_", "")
    sources: list[Any] = [torch.optim]
    try:
        import torch_optimizer

        sources.append(torch_optimizer)
    except ImportError:  # pragma: no cover - torch-optimizer is a dependency
        pass
    for module in sources:
        for attr in dir(module):
            obj = getattr(module, attr)
            if attr.lower() == key and isinstance(obj, type) and issubclass(obj, Optimizer):
                return obj
    raise ValueError(
        f"unknown optimizer {name!r}: not a class in torch.optim or torch_optimizer "
        "(e.g. 'SGD', 'AdamW', 'Lamb', 'RAdam')"
    )


class BlockSGD(Optimizer):
    """SGD with momentum, weight decay and Nesterov as in ``torch.optim.SGD``, with each block's
    step multiplied by its own factor: the update of block ``b`` is ``lr * factor_b * d_p``.

    ``factors`` maps block names to positive factors (missing blocks: 1; parameters in no block
    too). ``maximize`` ascends, as in ``torch.optim.SGD``. Blocks that are slices
    of a tensor get their factor on their slice only. The momentum state is
    ``state[p]["momentum_buffer"]``, as in ``torch.optim.SGD``, so the two exchange state as is.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        blocks: Sequence[Block] = (),
        factors: Mapping[str, float] | None = None,
        *,
        lr: float = 0.1,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if momentum < 0 or weight_decay < 0:
            raise ValueError("momentum and weight_decay must be non-negative")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
        }
        super().__init__(params, defaults)
        self.blocks = list(blocks)
        self._scales: dict[int, float | torch.Tensor] = {}
        self.set_factors(factors or {})

    def set_blocks(self, blocks: Sequence[Block], factors: Mapping[str, float]) -> None:
        """Replace the blocks (parameters added since, say) and their factors."""
        self.blocks = list(blocks)
        self.set_factors(factors)

    def scale_of(self, p: torch.Tensor) -> float | torch.Tensor:
        """The factor applied to ``p``'s step: a number, or a tensor for sliced blocks."""
        return self._scales.get(id(p), 1.0)

    def scale_tensors(self) -> list[torch.Tensor]:
        """The per-coordinate factor tensors of parameters sliced into blocks (memory kept)."""
        return [s for s in self._scales.values() if isinstance(s, torch.Tensor)]

    def set_factors(self, factors: Mapping[str, float]) -> None:
        """Replace the per-block factors."""
        for name, f in factors.items():
            if not (math.isfinite(f) and f > 0):
                raise ValueError(f"the factor of block {name!r} must be positive, got {f!r}")
        unknown = set(factors) - {b.name for b in self.blocks}
        if unknown:
            raise ValueError(f"factors given for unknown blocks: {sorted(unknown)}")
        self.factors = {b.name: float(factors.get(b.name, 1.0)) for b in self.blocks}
        scales: dict[int, float | torch.Tensor] = {}
        for block in self.blocks:
            f = self.factors[block.name]
            for part in block.parts:
                p = part.param
                if part.dim is None:
                    scales[id(p)] = f
                    continue
                current = scales.get(id(p), 1.0)
                if not isinstance(current, torch.Tensor):
                    current = torch.full_like(p, current, memory_format=torch.preserve_format)
                    scales[id(p)] = current
                part.view(current).fill_(f)
        self._scales = scales

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = -p.grad if group.get("maximize") else p.grad
                if group["weight_decay"]:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                if mu:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d_p.detach().clone()
                    else:
                        buf.mul_(mu).add_(d_p, alpha=1 - group["dampening"])
                    d_p = d_p.add(buf, alpha=mu) if group["nesterov"] else buf
                scale = self._scales.get(id(p), 1.0)
                if isinstance(scale, torch.Tensor):
                    p.add_(d_p * scale, alpha=-lr)
                else:
                    p.add_(d_p, alpha=-lr * scale)
        return loss


def _kind(optimizer: Optimizer) -> str:
    """ "momentum" for SGD-like state, "adam" for Adam-like state, "other" otherwise."""
    if isinstance(optimizer, (torch.optim.SGD, BlockSGD)):
        return "momentum"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    return "other"


def transfer_state(src: Optimizer, dst: Optimizer) -> int:
    """Carry per-parameter state from ``src`` into ``dst`` (see the module docstring).

    Returns the number of parameters whose state was carried. ``dst``'s existing state for those
    parameters is replaced.
    """
    src_kind, dst_kind = _kind(src), _kind(dst)
    carried = 0
    for group in dst.param_groups:
        for p in group["params"]:
            old = src.state.get(p, {})
            new = _convert(old, src, src_kind, dst_kind, group, p)
            if new is None:
                dst.state.pop(p, None)
                continue
            dst.state[p] = new
            carried += 1
    return carried


def _first_moment(old: Mapping[str, Any], src: Optimizer, src_kind: str, p: torch.Tensor):
    """The running gradient mean implied by ``old`` state, or None."""
    if src_kind == "momentum" and old.get("momentum_buffer") is not None:
        mu = _group_of(src, p).get("momentum", 0.0)
        return old["momentum_buffer"] * (1.0 - mu) if mu else None
    if src_kind == "adam" and "exp_avg" in old:
        return old["exp_avg"]
    return None


def _convert(old, src, src_kind, dst_kind, group, p):
    if src_kind == dst_kind == "momentum" or src_kind == dst_kind == "adam":
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in old.items()}
    mean = _first_moment(old, src, src_kind, p)
    if dst_kind == "momentum":
        mu = group.get("momentum", 0.0)
        if mean is None or not mu:
            return None
        return {"momentum_buffer": (mean / (1.0 - mu)).detach().clone()}
    if dst_kind == "adam":
        if mean is None:
            # Nothing to carry: Adam's own start, whose bias correction makes the first step a
            # full one. A zero first moment at a corrected step count would make the first ten
            # or so steps up to ten times shorter than later ones, and the step-norm match at
            # the switch would then pick a learning rate ten times too large.
            return None
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        m = mean.detach().clone()
        v = torch.maximum(m * m, grad * grad)
        beta2 = group["betas"][1]
        state: dict[str, Any] = {
            "step": torch.tensor(float(math.ceil(5.0 / (1.0 - beta2)))),
            "exp_avg": m,
            "exp_avg_sq": v,
        }
        if group.get("amsgrad"):
            state["max_exp_avg_sq"] = v.clone()
        return state
    return None


def _group_of(optimizer: Optimizer, p: torch.Tensor) -> Mapping[str, Any]:
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return group
    raise KeyError("parameter not managed by the optimizer")
