"""FP8 (E4M3) linear layers for the torch backend via torch._scaled_mm: weights quantized once (per tensor),
activations scaled per call from their absolute max (dynamic, so no calibration set is needed and CUDA graphs can
capture it). The same layers as the ONNX recipe stay in float (QUANT_SKIP, the vidrt family's quant_skip).

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
# The default skip list (vidrt's own DiT's; a family declares its own as Family.quant_skip): kept in float by FP8 here
# and by the INT8/FP8 ONNX recipe (calibration/quantize.py): the patch embedding, timestep and caption embedders, adaLN
# modulation, final projection, which quantization hurts most (benchmarks/QUANTIZATION.md). Matched against module
# paths ("t_embed.mlp.0") and ONNX node names in the same dotted form ("/t_embed/mlp.0/Gemm" -> "t_embed.mlp.0.Gemm").
QUANT_SKIP = (r"^patch_embed(\.|$)", r"^t_embed\.", r"^text_embed\.", r"adaLN", r"^final(\.|$)")


def quantize_act(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor dynamic FP8 quantization in the activation's own dtype (no fp32 copy of the activation): the
    reciprocal scale is rounded to that dtype first, so the scale handed to _scaled_mm is exactly its inverse."""
    # computed in float32 and capped at the dtype's largest value: in float16 448 / amax overflows to inf once amax is
    # below ~0.007 (a zero scale, then zeros or NaN); a capped one under-uses the FP8 range but stays exact
    inv = (FP8_MAX / x2.abs().amax().float().clamp(min=1e-12)).clamp(max=torch.finfo(x2.dtype).max).to(x2.dtype)
    return (x2 * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8), inv.float().reciprocal()


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
        xq, a_scale = self.quantize(x.reshape(-1, shape[-1]))
        m = xq.shape[0]
        pad = (-m) % 16 if x.is_cuda else 0  # CUDA FP8 GEMMs want multiples of 16
        if pad:
            xq = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(FP8)
        out_dtype = dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        # the bias rides in the GEMM's epilogue where _scaled_mm takes it (CUDA, 16-bit out): a separate add was 8% of
        # the Wan-1.3B step on an H200 (benchmarks/results/gpu-h200)
        fused = self.bias is not None and x.is_cuda and out_dtype in (torch.bfloat16, torch.float16)
        y = torch._scaled_mm(xq, self.w8.t(), scale_a=a_scale, scale_b=self.w_scale.float(), out_dtype=out_dtype,
                             bias=self.bias.to(out_dtype) if fused else None)
        y = y[:m]
        if self.bias is not None and not fused:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    quantize = staticmethod(quantize_act)  # to_fp8(compile_quant=True) sets a fused (compiled) one per instance


def to_fp8(module: nn.Module, skip: tuple[str, ...] = QUANT_SKIP, compile_quant: bool = False) -> list[str]:
    """Replace every nn.Linear whose dims are multiples of 16 and whose name matches no `skip` regex.
    compile_quant: quantize activations with one torch.compile'd (Triton) kernel instead of eager ops (CUDA)."""
    quant = torch.compile(quantize_act, dynamic=True) if compile_quant else None
    done = []
    for name, lin in list(module.named_modules()):
        if not isinstance(lin, nn.Linear) or any(re.search(p, name) for p in skip):
            continue
        if lin.in_features % 16 or lin.out_features % 16:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        new = Fp8Linear(lin).to(lin.weight.device)
        if quant is not None:
            new.quantize = quant
        setattr(parent, child, new)
        done.append(name)
    return done
