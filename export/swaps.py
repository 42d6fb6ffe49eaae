"""Export-time swaps: exact, ONNX-friendly stand-ins for the pieces of a model that the exporter cannot handle.

`exportable(module, swaps)` patches, for the duration of a `with` block, the `forward` of the submodules that block the
TorchScript ONNX exporter (`torch.onnx.export(..., dynamo=False)`, opset 18) with equivalents written in plain torch
ops, and restores every original on exit, also when the block raises. Nothing else in the module tree changes: no
submodule is added or removed, so parameters, buffers and state_dict keys stay as they are.

Swaps (each is exact: same ops in the same dtypes as the original, so outputs match bit for bit in float32):

- "rms_norm": `torch.nn.RMSNorm`. The exporter has no symbolic for `aten::rms_norm` at opset 18
  (UnsupportedOperatorError). Stand-in: x * rsqrt(mean(x^2) + eps) * weight with torch's own dtype handling
  (half/bfloat16 computed in float32, eps defaults to finfo(computation dtype).eps, result cast back to x's dtype).

A family declares the swaps its graphs need as a {name: swap} mapping beside its export recipe
(families/wan/export.py, families/ltx/export.py); each swap returns how many modules it patched.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import nn


def set_forward(mod: nn.Module, fn: Callable, stack: ExitStack) -> None:
    """Make `fn` the instance's forward (nn.Module.__call__, hooks and tracing go through it) until `stack` closes."""
    had, old = "forward" in mod.__dict__, mod.__dict__.get("forward")

    def undo():
        if had:
            mod.forward = old
        else:
            del mod.forward
    mod.forward = fn
    stack.callback(undo)


# ---- rms_norm --------------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None,
             eps: float | None) -> torch.Tensor:
    """torch.nn.functional.rms_norm in plain ops (ReduceMean/Pow/Sqrt/Reciprocal in ONNX), same dtype rules."""
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    u = x.to(dtype)
    if eps is None:
        eps = torch.finfo(dtype).eps
    dims = tuple(range(-len(normalized_shape), 0))
    y = u * torch.rsqrt(u.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y.type_as(x)


def swap_rms_norm(module: nn.Module, stack: ExitStack) -> int:
    """Every torch.nn.RMSNorm in the tree computes with `rms_norm` above; returns how many were swapped."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.RMSNorm):
            set_forward(m, lambda x, m=m: rms_norm(x, tuple(m.normalized_shape), m.weight, m.eps), stack)
            n += 1
    return n


Swap = Callable[[nn.Module, ExitStack], int]  # patches a module tree inside the stack; returns the count


@contextmanager
def exportable(module: nn.Module, swaps: Mapping[str, Swap]) -> Iterator[dict[str, int]]:
    """Within the block, `module` exports with the TorchScript exporter; yields {swap name: modules swapped}.
    Originals are restored on exit, in reverse order, also when the block raises."""
    with ExitStack() as stack:
        yield {name: swap(module, stack) for name, swap in swaps.items()}
