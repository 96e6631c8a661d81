"""Measure the loss's Hessian, not the gradient hooks': ``without_gradient_hooks(model)``.

A hook on a parameter (``p.register_hook(fn)``) rewrites every gradient that reaches it: a
probe's first gradient and then every Hessian-vector product, which are gradients too, so a hook
``g -> 0.5 g`` made ``lambda_max`` read a quarter of the truth, and a hook with state (a
counter, a running norm, gradient compression's error feedback) ran on every product. Inside
``without_gradient_hooks``, the model's parameters' gradient hooks (``register_hook``,
``register_post_accumulate_grad_hook``) and its modules' backward hooks
(``register_full_backward_hook``, ``register_full_backward_pre_hook``) are set aside; on exit
they are back, in their order, and their handles still remove them. Forward hooks stay: they
are part of the model's function (pruning masks, weight normalisation), and the probe's loss
is the model's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping

from torch import nn

__all__ = ["without_gradient_hooks"]


def _hook_dicts(model: nn.Module) -> list[MutableMapping]:
    dicts: list[MutableMapping] = []
    for p in model.parameters():
        for attribute in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            hooks = getattr(p, attribute, None)
            if hooks:
                dicts.append(hooks)
    for module in model.modules():
        for attribute in ("_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(module, attribute, None)
            if hooks:
                dicts.append(hooks)
    return dicts


@contextlib.contextmanager
def without_gradient_hooks(model: nn.Module) -> Iterator[None]:
    """Run the body with ``model``'s gradient hooks set aside (see the module docstring).

    Each hook dictionary is emptied in place and refilled on exit: autograd holds the
    dictionary itself, not a copy, so an empty one means no hook runs, and the handles that
    ``register_hook`` returned (which remember the dictionary and their key) keep working.
    """
    saved = [(hooks, list(hooks.items())) for hooks in _hook_dicts(model)]
    for hooks, _ in saved:
        hooks.clear()
    try:
        yield
    finally:
        for hooks, items in saved:
            added = list(hooks.items())  # hooks the body registered go after the old ones
            hooks.clear()
            hooks.update(items)
            hooks.update(added)
