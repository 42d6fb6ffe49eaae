"""Export-time swaps: exact, ONNX-friendly stand-ins for the pieces of a model that the exporter cannot handle.

`exportable(module)` patches, for the duration of a `with` block, the `forward` of the submodules that block the
TorchScript ONNX exporter (`torch.onnx.export(..., dynamo=False)`, opset 18) with equivalents written in plain torch
ops, and restores every original on exit, also when the block raises. Nothing else in the module tree changes: no
submodule is added or removed, so parameters, buffers and state_dict keys stay as they are.

Swaps (each is exact: same ops in the same dtypes as the original, so outputs match bit for bit in float32):

- "rms_norm": `torch.nn.RMSNorm`. The exporter has no symbolic for `aten::rms_norm` at opset 18
  (UnsupportedOperatorError). Stand-in: x * rsqrt(mean(x^2) + eps) * weight with torch's own dtype handling
  (half/bfloat16 computed in float32, eps defaults to finfo(computation dtype).eps, result cast back to x's dtype).
- "wan_rope": the rotary embedding *application* in diffusers' `WanAttnProcessor`. It builds the rotated query/key
  with `torch.empty_like` and strided writes (`out[..., 0::2] = ...`); the exporter records those writes as index_put
  with the export shape baked into an Expand, so the graph fails at any other video shape ("invalid expand shape").
  The cos/sin tables themselves (`WanRotaryPosEmbed`) already export shape-generic (they are sliced from the
  precomputed buffers by the runtime grid size) and are left alone. The processor applies RoPE right after
  `norm_q`/`norm_k` and the split into heads; RoPE is per (token, channel pair) and the same for every head, so the
  stand-in applies it at the output of `norm_q`/`norm_k` with the same arithmetic, interleaving the two halves with
  stack + flatten instead of strided writes, and the processor is called with `rotary_emb=None`.
- "ltx_rope": diffusers' `LTXVideoRotaryPosEmbed` (LTX-Video's RoPE tables). It writes negative dims (transpose(-1,
  -2), repeat_interleave(dim=-1), cat(dim=-1) on the rank-3 tables). The TorchScript exporter pools equal constants
  into one node and resolves a negative dim by rewriting that shared constant to the rank of the op at hand, so the
  rope's -1 (rank 3 -> 2) becomes axis 2 in the timestep embedding's cat(dim=-1) of rank-2 tensors too: an invalid
  graph ("Concat axis must be in [-rank, rank-1]"; with other layouts a Transpose perm keeps a -1). Stand-in: the same
  arithmetic with explicit non-negative dims, repeat_interleave(2) as stack + flatten (exact), for the `video_coords`
  input (which the exporting wrapper passes; calls without video_coords keep the original).
- "ltx_movedim": diffusers' LTX-Video VAE (`AutoencoderKLLTXVideo`: its resnets and decoder normalise channels-last
  with `x.movedim(1, -1)` ... `.movedim(-1, 1)`). The exporter's movedim symbolic does not resolve a negative
  source dim: movedim(-1, 1) becomes Transpose perm (0, -1, 1, 2, 3), an invalid graph. Stand-in: while the block
  runs (and the module holds an LTX VAE), `torch.Tensor.movedim` is called with its dims made non-negative (x %
  x.dim()): the same op on the same dims.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterable, Iterator

import math

import torch
from torch import nn


def _set_forward(mod: nn.Module, fn: Callable, stack: ExitStack) -> None:
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
            _set_forward(m, lambda x, m=m: rms_norm(x, tuple(m.normalized_shape), m.weight, m.eps), stack)
            n += 1
    return n


# ---- wan_rope --------------------------------------------------------------------------------------------------

def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on x [..., head_dim] with its [..., head_dim] cos/sin tables (repeat-interleaved),
    without strided writes: the rotated pairs are stacked on a new last axis and flattened back."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def swap_wan_rope(module: nn.Module, stack: ExitStack) -> int:
    """Every diffusers WanAttention run by the stock WanAttnProcessor applies RoPE at its norm_q/norm_k outputs;
    returns how many attention modules were swapped (0 when diffusers is not installed)."""
    try:
        from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
    except ImportError:
        return 0
    n = 0
    for attn in module.modules():
        if not (isinstance(attn, WanAttention) and type(attn.processor) is WanAttnProcessor):
            continue  # another processor may apply RoPE elsewhere: leave it to fail loudly rather than guess
        tables: list = [None]  # the (cos, sin) of the call in progress, read by the norm stand-ins

        def attn_forward(hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, *,
                         _orig=attn.forward, _tables=tables, **kwargs):
            _tables[0] = rotary_emb
            try:
                return _orig(hidden_states, encoder_hidden_states, attention_mask, None, **kwargs)
            finally:
                _tables[0] = None

        for norm in (attn.norm_q, attn.norm_k):
            def norm_forward(x, *, _orig=norm.forward, _tables=tables, _heads=attn.heads):
                y = _orig(x)
                if _tables[0] is None:
                    return y
                return apply_rotary(y.unflatten(2, (_heads, -1)), *_tables[0]).flatten(2)
            _set_forward(norm, norm_forward, stack)
        _set_forward(attn, attn_forward, stack)
        n += 1
    return n


# ---- ltx_rope --------------------------------------------------------------------------------------------------

def ltx_rope_tables(rope: nn.Module, video_coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LTXVideoRotaryPosEmbed's (cos, sin) tables (B, S, dim) for video_coords (B, 3, S), op for op, with
    non-negative dims only."""
    grid = torch.stack([video_coords[:, 0] / rope.base_num_frames, video_coords[:, 1] / rope.base_height,
                        video_coords[:, 2] / rope.base_width], dim=2)  # (B, S, 3)
    freqs = rope.theta ** torch.linspace(math.log(1.0, rope.theta), math.log(rope.theta, rope.theta), rope.dim // 6,
                                         device=video_coords.device, dtype=torch.float32)
    freqs = freqs * math.pi / 2.0
    freqs = freqs * (grid.unsqueeze(3) * 2 - 1)  # (B, S, 3, dim // 6)
    freqs = freqs.transpose(2, 3).flatten(2)
    cos, sin = (torch.stack([f, f], dim=3).flatten(2) for f in (freqs.cos(), freqs.sin()))  # repeat_interleave(2)
    pad = rope.dim % 6
    if pad:
        cos = torch.cat([torch.ones_like(cos[:, :, :pad]), cos], dim=2)
        sin = torch.cat([torch.zeros_like(cos[:, :, :pad]), sin], dim=2)
    return cos, sin


def swap_ltx_rope(module: nn.Module, stack: ExitStack) -> int:
    """Every diffusers LTXVideoRotaryPosEmbed computes its tables with `ltx_rope_tables` when given video_coords;
    returns how many were swapped (0 when diffusers is not installed)."""
    try:
        from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed
    except ImportError:
        return 0
    n = 0
    for rope in module.modules():
        if isinstance(rope, LTXVideoRotaryPosEmbed):
            def forward(hidden_states, num_frames=None, height=None, width=None, rope_interpolation_scale=None,
                        video_coords=None, *, _rope=rope, _orig=rope.forward):
                if video_coords is None:
                    return _orig(hidden_states, num_frames, height, width, rope_interpolation_scale, video_coords)
                return ltx_rope_tables(_rope, video_coords)
            _set_forward(rope, forward, stack)
            n += 1
    return n


# ---- ltx_movedim -----------------------------------------------------------------------------------------------

def swap_ltx_movedim(module: nn.Module, stack: ExitStack) -> int:
    """If `module` holds an LTX-Video VAE, torch.Tensor.movedim gets non-negative dims until `stack` closes; returns
    how many LTX VAE modules are in the tree (0: nothing patched)."""
    try:
        from diffusers.models.autoencoders.autoencoder_kl_ltx import AutoencoderKLLTXVideo, LTXVideoDecoder3d
    except ImportError:
        return 0
    n = sum(isinstance(m, (AutoencoderKLLTXVideo, LTXVideoDecoder3d)) for m in module.modules())
    if n:
        orig = torch.Tensor.movedim

        def movedim(self, source, destination):
            def fix(d):
                return tuple(i % self.dim() for i in d) if isinstance(d, (tuple, list)) else d % self.dim()
            return orig(self, fix(source), fix(destination))
        torch.Tensor.movedim = movedim
        stack.callback(setattr, torch.Tensor, "movedim", orig)
    return n


SWAPS: dict[str, Callable[[nn.Module, ExitStack], int]] = {"rms_norm": swap_rms_norm, "wan_rope": swap_wan_rope}
# by name only (not in the default set): LTX-Video's; LTX = what models/ltx.py exports its graphs with
NAMED_SWAPS: dict[str, Callable[[nn.Module, ExitStack], int]] = {"ltx_rope": swap_ltx_rope,
                                                                 "ltx_movedim": swap_ltx_movedim}
LTX = ("rms_norm", "ltx_rope", "ltx_movedim")


@contextmanager
def exportable(module: nn.Module, swaps: Iterable[str] | None = None) -> Iterator[dict[str, int]]:
    """Within the block, `module` exports with the TorchScript exporter; yields {swap name: modules swapped}.

    `swaps` picks swaps of SWAPS or NAMED_SWAPS by name (default: all of SWAPS). Originals are restored on exit, in
    reverse order, also when the block raises."""
    known = {**SWAPS, **NAMED_SWAPS}
    names = list(SWAPS) if swaps is None else list(swaps)
    unknown = set(names) - set(known)
    if unknown:
        raise ValueError(f"unknown swaps {sorted(unknown)}; known: {sorted(known)}")
    with ExitStack() as stack:
        yield {name: known[name](module, stack) for name in names}
