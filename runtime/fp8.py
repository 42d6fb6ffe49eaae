"""FP8 (E4M3) linear layers for the torch backend via torch._scaled_mm: weights quantized once (per tensor),
activations scaled per call from their absolute max (dynamic, so no calibration set is needed and CUDA graphs can
capture it). The same layers as the ONNX recipe stay in float (calibration.quantize.SENSITIVE).

    to_fp8(pipe.dit)   # in place; returns the names of the converted layers

On Hopper GPUs _scaled_mm runs FP8 tensor-core GEMMs; on CPU it is a slow reference path (tested for accuracy only).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# module-name form of calibration.quantize.SENSITIVE (ONNX node names are "/blocks.0/adaLN/..." there)
SENSITIVE_MODULES = (r"^patch_embed$", r"^t_embed\.", r"^text_embed\.", r"adaLN", r"^final$")


class Fp8Linear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        scale = w.abs().max().clamp(min=1e-12) / FP8_MAX
        self.register_buffer("w8", (w / scale).to(FP8))  # [N, K] row-major; .t() is the column-major B _scaled_mm wants
        self.register_buffer("w_scale", scale.reshape(()))
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        self.out_features = lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        a_scale = x2.abs().amax().float().clamp(min=1e-12) / FP8_MAX
        xq = (x2.float() / a_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        m = xq.shape[0]
        pad = (-m) % 16 if x.is_cuda else 0  # CUDA FP8 GEMMs want multiples of 16
        if pad:
            xq = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(FP8)
        out_dtype = dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        y = torch._scaled_mm(xq, self.w8.t(), scale_a=a_scale, scale_b=self.w_scale.float(), out_dtype=out_dtype)
        y = y[:m]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(dtype)


def to_fp8(module: nn.Module, skip: tuple[str, ...] = SENSITIVE_MODULES) -> list[str]:
    """Replace every nn.Linear whose dims are multiples of 16 and whose name matches no `skip` regex."""
    done = []
    for name, lin in list(module.named_modules()):
        if not isinstance(lin, nn.Linear) or any(re.search(p, name) for p in skip):
            continue
        if lin.in_features % 16 or lin.out_features % 16:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, Fp8Linear(lin).to(lin.weight.device))
        done.append(name)
    return done
