"""Hessian-vector products restricted to diagonal Hessian blocks, from one gradient graph.

``BlockHessian(loss, blocks)`` differentiates ``loss`` once with ``create_graph=True``; every
product afterwards is one more backward pass through that graph, never a new forward pass.
For block ``b`` with coordinates ``theta_b`` and a vector ``v_b`` it returns ``H_bb v_b =
d/d theta_b (g_b . v_b)``: the product is taken only over the block's own coordinates, so the
cross-block terms ``H_cb`` are never formed or returned. By default each product is its own
backward pass through the shared graph, and on CPU the products of different blocks run
concurrently on ``workers`` threads (the passes are independent and mostly small, memory-bound
kernels that one intra-op thread serves no faster than several); ``vectorize=True`` computes
many in one vmapped pass (``is_grads_batched``), trading memory for fewer, larger kernels; on
CPU it measured slower than the plain passes (see docs/BENCHMARKS.md), so it is off by default.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from blockopt.curvature.blocks import Block

__all__ = ["BlockHessian", "BlockProducts", "DoubleBackwardError"]


# Fragments of PyTorch's messages for operations that cannot be differentiated twice.
_NO_SECOND_DERIVATIVE = ("double backward", "differentiate twice", "is not implemented")


class DoubleBackwardError(RuntimeError):
    """An operation in the probe's graph cannot be differentiated twice."""


def _explain(err: RuntimeError) -> DoubleBackwardError:
    return DoubleBackwardError(
        "a Hessian-vector product needs a second derivative, and an operation in the probe's "
        f"graph has none ({err}). blockopt already forces the math attention kernel and disables "
        "cuDNN while probing; other fused kernels (custom CUDA/Triton ops, torch.compile'd "
        "modules, checkpointed segments) must be replaced by their eager, differentiable "
        "equivalents in the probe closure, e.g. probe the eager module (model._orig_mod), or "
        "take finite-difference products, which need no second derivative (backend='fd'; the "
        "default backend='auto' falls back to them by itself)"
    )


DEFAULT_WORKERS = 2
"""At most this many concurrent products by default, each on one intra-op thread."""


def refuse_freed_graph(err: RuntimeError) -> None:
    """Raise the error that names the cause when differentiating the probe's loss failed
    because its graph was already freed (the closure called ``.backward()`` on it)."""
    if "second time" in str(err) or "already been freed" in str(err):
        raise RuntimeError(
            "the probe's loss graph was already freed: the probe closure called .backward() on "
            "it. A probe must only compute and return the loss; blockopt differentiates it itself"
        ) from err


def refuse_delayed_errors(grads: Sequence[torch.Tensor | None]) -> None:
    """Raise :class:`DoubleBackwardError` when the gradients' graph holds the node an op
    without a second derivative leaves (an ``autograd.Function`` whose backward is
    ``once_differentiable``): it hangs off a leaf of its own, so products w.r.t. the
    parameters never reach it and silently miss that op's curvature."""
    seen: set[Any] = set()
    stack = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == _DELAYED_ERROR:
            raise _explain(
                RuntimeError(
                    "an autograd.Function whose backward is once_differentiable is in the graph; "
                    "its second derivative is missing, so autograd's products would leave its "
                    "curvature out"
                )
            )
        stack.extend(f for f, _ in node.next_functions)


_DELAYED_ERROR = "torch::autograd::Error"  # the node once_differentiable puts in the graph


def default_workers() -> int:
    """``DEFAULT_WORKERS`` when the machine has that many cores and training uses at most that
    many intra-op threads: small kernels, which one thread serves as fast as several, then run
    side by side (on 2 cores, a tiny GPT's probe took 0.75 s so against 1.3 s in one thread).
    With more intra-op threads the products run one by one in the caller's thread, on all of
    them: large kernels gain more from those than from running side by side."""
    cores = os.cpu_count() or 1
    if cores >= DEFAULT_WORKERS and torch.get_num_threads() <= DEFAULT_WORKERS:
        return DEFAULT_WORKERS
    return 1


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _one_intra_op_thread() -> None:
    """Run a worker's kernels on one intra-op thread. Otherwise each worker starts a thread team
    of its own beside the training thread's: on 2 cores with 2 intra-op threads, the tiny GPT's
    training steps after one probe then took 2.3 times as long as before it, for good. Reading
    the count first settles this thread's own setting, which the one set next then replaces."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, created once and reused by every probe. Its
    threads run on one intra-op thread each; every one is started at once (a barrier holds
    them), and the caller's thread count is then set again, since setting a thread's count
    also sets the count that threads started later take: the caller's own setting, and that of
    threads yet to come, stay as they were."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(
                workers, thread_name_prefix="blockopt-hvp", initializer=_one_intra_op_thread
            )
            barrier = threading.Barrier(workers)
            list(pool.map(lambda _: barrier.wait(), range(workers)))
            torch.set_num_threads(threads)
            _POOLS[workers] = pool
        return _POOLS[workers]


class BlockProducts:
    """What every block-product operator shares: ``blocks``, each block's dtype (the widest of
    its parts') and device, and ``matvec`` for one product; an operator implements
    ``matvec_many(indices, vectors)`` and ``status(index)``."""

    blocks: list[Block]

    def dtype(self, index: int) -> torch.dtype:
        dtype = self.blocks[index].parts[0].param.dtype
        for part in self.blocks[index].parts[1:]:
            dtype = torch.promote_types(dtype, part.param.dtype)
        return dtype

    def device(self, index: int) -> torch.device:
        return self.blocks[index].parts[0].param.device

    def local_numel(self, index: int) -> int:
        """The length of block ``blocks[index]``'s vectors in this process: the block's size
        (an operator on sharded parameters holds this rank's shard)."""
        return self.blocks[index].numel

    def matvec(self, index: int, vector: torch.Tensor) -> torch.Tensor:
        """``H_bb v`` for block ``blocks[index]``."""
        return self.matvec_many([index], [vector])[0]

    def matvec_many(
        self, indices: Sequence[int], vectors: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    def check_vectors(self, indices: Sequence[int], vectors: Sequence[torch.Tensor]) -> None:
        """Refuse vectors that do not pair with ``indices`` or do not fit their block."""
        if len(indices) != len(vectors):
            raise ValueError(f"{len(indices)} block indices but {len(vectors)} vectors")
        for i, v in zip(indices, vectors):
            n = self.local_numel(i)
            if v.shape != (n,):
                raise ValueError(
                    f"block {self.blocks[i].name!r} has {n} coordinates, got a vector of shape "
                    f"{tuple(v.shape)}"
                )


class BlockHessian(BlockProducts):
    """Products ``H_bb v`` for the diagonal Hessian blocks of ``loss`` over ``blocks``.

    Vectors are flat, of length ``blocks[i].numel``, laid out part by part, each part in the
    row-major order of its (slice of the) parameter. With ``vectorize``, ``max_batch`` bounds how
    many products share one backward pass (memory grows with it: activations and parameters times
    the batch); operations without a batching rule make it fall back to one pass per product.
    Without it, ``workers`` threads (default :func:`default_workers`) run the
    separate passes of one :meth:`matvec_many` call concurrently when the parameters live on the
    CPU, each pass on one intra-op thread: the results are the same whatever the number of
    workers above one, and agree with ``workers=1`` (the caller's thread, with the caller's
    intra-op threads) to round-off, since kernels on several threads sum in another order.
    ``workers=1`` runs them one after another.
    """

    def __init__(
        self,
        loss: torch.Tensor,
        blocks: Sequence[Block],
        *,
        vectorize: bool = False,
        max_batch: int = 32,
        workers: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if workers is None:
            workers = default_workers()
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
        self.blocks = list(blocks)
        self.max_batch = max_batch if vectorize else 1
        self.products = 0
        params: dict[int, torch.Tensor] = {}
        for block in self.blocks:
            for p in block.params:
                params.setdefault(id(p), p)
        self._params = list(params.values())
        try:
            grads = torch.autograd.grad(
                loss, self._params, create_graph=True, allow_unused=True, materialize_grads=False
            )
        except RuntimeError as err:
            refuse_freed_graph(err)
            if "use_reentrant" in str(err):  # reentrant checkpointing: no autograd.grad at all
                raise _explain(err) from err
            raise
        refuse_delayed_errors(grads)
        # A parameter the loss does not use, or whose gradient carries no graph, has a zero row
        # and column in the Hessian as autograd sees it: its products are exactly zero.
        self._grads = {
            id(p): g for p, g in zip(self._params, grads) if g is not None and g.requires_grad
        }
        self._unused = {id(p) for p, g in zip(self._params, grads) if g is None}
        if len(self._unused) == len(self._params):
            raise ValueError(
                "the probe's loss does not depend on any parameter of the blocks probed; compute "
                "it through the model being probed (not a copy of it or another model)"
            )
        self._batched = vectorize
        on_cpu = all(p.device.type == "cpu" for p in self._params)
        self.workers = workers if on_cpu else 1

    def status(self, index: int) -> str:
        """``"ok"``; ``"unused"`` when the loss does not depend on any of the block's parameters;
        ``"no_graph"`` when their gradients carry no graph, so autograd sees a zero Hessian: the
        loss is linear in them, or an operation without a second derivative (a custom
        ``autograd.Function`` marked ``once_differentiable``, a ``.detach()``, a ``no_grad``
        region in the forward) cut it."""
        params = self.blocks[index].params
        if any(id(p) in self._grads for p in params):
            return "ok"
        if all(id(p) in self._unused for p in params):
            return "unused"
        return "no_graph"

    def matvec_many(
        self, indices: Sequence[int], vectors: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``H_bb v`` for each pair (block index, vector); indices may repeat."""
        self.check_vectors(indices, vectors)
        out: list[torch.Tensor] = []
        if not self._batched and self.workers > 1 and len(indices) > 1:
            out = list(worker_pool(self.workers).map(self._single, zip(indices, vectors)))
        else:
            for start in range(0, len(indices), self.max_batch):
                stop = start + self.max_batch
                chunk = list(zip(indices[start:stop], vectors[start:stop]))
                out.extend(self._products(chunk))
        self.products += len(indices)
        return out

    def _single(self, item: tuple[int, torch.Tensor]) -> torch.Tensor:
        return self._backward([item], batched=False)[0]

    def _products(self, chunk: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        if self._batched and len(chunk) > 1:
            try:
                with warnings.catch_warnings():
                    # vmap warns when it falls back to a loop for an op; that is still correct.
                    warnings.filterwarnings("ignore", message=".*batching rule.*")
                    return self._backward(chunk, batched=True)
            except DoubleBackwardError:
                raise
            except RuntimeError:
                self._batched = False  # some op has no batching rule: one pass per product
        return [r for item in chunk for r in self._backward([item], batched=False)]

    def _backward(
        self, chunk: list[tuple[int, torch.Tensor]], *, batched: bool
    ) -> list[torch.Tensor]:
        k = len(chunk)
        involved: dict[int, torch.Tensor] = {}
        for i, _ in chunk:
            for p in self.blocks[i].params:
                if id(p) in self._grads:
                    involved.setdefault(id(p), p)
        results: dict[int, torch.Tensor | None] = {}
        if involved:
            seeds = {
                pid: torch.zeros(
                    (k, *p.shape) if batched else p.shape, dtype=p.dtype, device=p.device
                )
                for pid, p in involved.items()
            }
            for j, (i, v) in enumerate(chunk):
                offset = 0
                for part in self.blocks[i].parts:
                    n = part.numel
                    if id(part.param) in seeds:
                        target = seeds[id(part.param)]
                        part.view(target[j] if batched else target).copy_(
                            v[offset : offset + n].reshape(part.shape)
                        )
                    offset += n
            pids = list(involved)
            try:
                grads = torch.autograd.grad(
                    [self._grads[pid] for pid in pids],
                    [involved[pid] for pid in pids],
                    grad_outputs=[seeds[pid] for pid in pids],
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=batched,
                )
            except RuntimeError as err:
                text = str(err)
                if "double backward" in text or (
                    "derivative" in text and "not implemented" in text
                ):
                    raise _explain(err) from err
                raise
            results = dict(zip(pids, grads))
        out = []
        for j, (i, v) in enumerate(chunk):
            pieces = []
            for part in self.blocks[i].parts:
                r = results.get(id(part.param))
                if r is None:
                    pieces.append(torch.zeros(part.numel, dtype=v.dtype, device=v.device))
                else:
                    pieces.append(part.view(r[j] if batched else r).reshape(-1).to(v.dtype))
            out.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces))
        return out
