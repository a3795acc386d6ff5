"""Matrix-product FLOPs counted at the dispatch level: every mm / addmm / bmm / baddbmm / addbmm / matmul call that
reaches ATen, in-place (``addmm_``), ``out=`` and ``out_dtype`` variants included (torch's ``FlopCounterMode`` does not
see an in-place ``addmm_``). Import it with ``from matmul_flops import count_matmul_flops``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# overload packet -> (index of the first matrix operand, index of the second)
_PRODUCTS = {
    aten.mm: (0, 1),
    aten.addmm: (1, 2),
    aten.addmm_: (1, 2),
    aten.bmm: (0, 1),
    aten.baddbmm: (1, 2),
    aten.baddbmm_: (1, 2),
    aten.addbmm: (1, 2),
    aten.addbmm_: (1, 2),
}


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _PRODUCTS:
            i, j = _PRODUCTS[packet]
            a, b = args[i], args[j]
            # [.., M, K] @ [.., K, N]: 2·M·K·N per batch entry (addbmm sums its batch, same count)
            batch = math.prod(a.shape[:-2])
            self.flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
            self.calls.append(str(func))
        elif packet in (aten.matmul, aten.linear, aten.dot, aten.mv, aten.einsum):
            raise AssertionError(f"count_matmul_flops: {func} reached dispatch undecomposed; count it explicitly")
        return func(*args, **kwargs)


@contextmanager
def count_matmul_flops() -> Iterator[_Counter]:
    """``with count_matmul_flops() as c: ...`` then ``c.flops`` (and ``c.calls``, the ops counted)."""
    counter = _Counter()
    with counter:
        yield counter
