"""Causal 3D convolutional VAE: spatial x8, temporal x4 (frames = 4k+1 -> latent frames k+1).

Causality: every temporal conv pads only the past (replicating frame 0), so output frame i depends on inputs <= i.
All norms are per position (RMS over channels), so decoding is local in time and temporal tiles with enough past
context reproduce the full decode exactly (see `decode_tiled`).
`Decoder.forward_2d` is the same decoder run on frames (B*T, C, H, W) with 2-D convolutions only (see `conv_frames`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vidrt.models.config import VAEConfig


class ChannelRMSNorm(nn.Module):
    def __init__(self, ch: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ch, 1, 1, 1))

    def forward(self, x):  # (B, C, T, H, W); frames (N, C, H, W) in forward_2d
        w = self.weight if x.dim() == 5 else self.weight[..., 0]
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * w


def time_taps(frames: int, kt: int, device=None) -> torch.Tensor:
    """(frames, kt) frame indices a causal kt-tap time kernel reads for each output frame: t - kt + 1 + i, clamped
    at 0 (the padding that replicates frame 0)."""
    t = torch.arange(frames, device=device)[:, None] + torch.arange(kt, device=device) - (kt - 1)
    return t.clamp(min=0)


def conv_frames(conv: nn.Conv3d, x: torch.Tensor, frames: int, taps: torch.Tensor | None = None) -> torch.Tensor:
    """A causal stride-1 Conv3d (kernel kt x kh x kw, frame 0 replicated kt - 1 times before the video) on frames
    x (B*frames, C, H, W), as ONE Conv2d: the kt input frames of each output frame are gathered onto the channel
    axis (kt*C channels; `taps` (T_out, kt) indexes them, default time_taps) and the weight is reshaped to match.
    The same sums as the Conv3d in another order. Why: onnxruntime's CPU Conv runs 2-D kernels in its blocked
    layout (and 2-D QLinearConv with its NHWC VNNI kernels), 3-D ones through a generic im2col."""
    kt = conv.kernel_size[0]
    if conv.stride != (1, 1, 1) or conv.padding[0] != 0:
        raise ValueError(f"conv_frames takes stride-1 convs without time padding, got {conv}")
    if kt > 1 or taps is not None:
        taps = time_taps(frames, kt, x.device) if taps is None else taps
        x = x.unflatten(0, (-1, frames))[:, taps].flatten(0, 1).flatten(1, 2)  # one Gather: (B*T, kt*C, H, W)
    w = conv.weight.transpose(1, 2).flatten(1, 2)  # (Cout, kt*Cin, kh, kw), tap-major like the gathered frames
    return F.conv2d(x, w, conv.bias, padding=conv.padding[1:])


class CausalConv3d(nn.Module):
    """Conv3d whose time axis is padded with (kt - 1) copies of the first frame; spatial 'same' zero padding."""

    def __init__(self, cin, cout, kernel=(3, 3, 3), stride=(1, 1, 1)):
        super().__init__()
        kt, kh, kw = kernel
        self.time_pad = kt - 1
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, kh // 2, kw // 2))

    def forward(self, x):
        if self.time_pad:
            x = torch.cat([x[:, :, :1]] * self.time_pad + [x], dim=2)
        return self.conv(x)

    def frames(self, x, T):
        return conv_frames(self.conv, x, T)


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = ChannelRMSNorm(cin), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = ChannelRMSNorm(cout), CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h

    def frames(self, x, T):  # forward on frames (B*T, C, H, W)
        h = self.conv1.frames(F.silu(self.norm1(x)), T)
        h = self.conv2.frames(F.silu(self.norm2(h)), T)
        return (x if isinstance(self.skip, nn.Identity) else conv_frames(self.skip, x, T)) + h, T


class Downsample(nn.Module):
    def __init__(self, ch, temporal: bool):
        super().__init__()
        self.spatial = nn.Conv3d(ch, ch, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.temporal = CausalConv3d(ch, ch, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x):  # T = 1 + 2m -> 1 + m when temporal
        x = self.spatial(x)
        return self.temporal(x) if self.temporal is not None else x


class Upsample(nn.Module):
    def __init__(self, ch, temporal: bool):
        super().__init__()
        self.spatial = nn.Conv3d(ch, ch, (1, 3, 3), padding=(0, 1, 1))
        self.temporal = CausalConv3d(ch, ch, (3, 1, 1)) if temporal else None

    def forward(self, x):  # T = 1 + m -> 1 + 2m when temporal (frame 0 maps to one frame)
        if self.temporal is not None:
            x = torch.repeat_interleave(x, 2, dim=2)[:, :, 1:]
            x = self.temporal(x)
        B, C, T, H, W = x.shape
        x = F.interpolate(x.transpose(1, 2).reshape(B * T, C, H, W), scale_factor=2.0, mode="nearest")
        x = x.reshape(B, T, C, 2 * H, 2 * W).transpose(1, 2)
        return self.spatial(x)

    def frames(self, x, T, hw=None):  # forward on frames (B*T, C, H, W); returns the frames and their new T
        # hw: (H, W) of x when known without reading x's shape (forward_2d: from the latents' shape)
        if self.temporal is not None:  # time x2 (repeat_interleave(2)[1:]) and the time conv in one gather
            taps = (time_taps(2 * T - 1, self.temporal.time_pad + 1, x.device) + 1) // 2
            x, T = conv_frames(self.temporal.conv, x, T, taps), 2 * T - 1
        return upsample_conv_frames(self.spatial, x, hw), T


def _subpixel_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per axis, the 3 taps (rows y-1, y, y+1 of the x2 nearest-upsampled input) of output row y = 2m - 1 + c read
    input rows m - 1 and m: c = 0 (y odd) as (w0 + w1, w2), c = 1 (y even) as (w0, w1 + w2). Slices and adds only
    (torch.onnx folds them into one weight initializer; it does not fold einsum)."""
    w0, w1, w2 = (w.narrow(dim, j, 1) for j in range(3))
    return torch.cat([w0 + w1, w2], dim), torch.cat([w0, w1 + w2], dim)


def upsample_conv_frames(conv: nn.Conv3d, x: torch.Tensor, hw=None) -> torch.Tensor:
    """conv (kernel 1 x 3 x 3, padding (0, 1, 1)) after a x2 nearest upsample of frames x (N, C, H, W), computed on
    the low-resolution frames ("sub-pixel" form): ONE 2x2 Conv2d, padding 1, with 4 * Cout channels (the 2 x 2 output
    phases' kernels, each the 3x3 weight with its taps summed per axis: _subpixel_taps) gives (H + 1, W + 1) windows;
    channels last, they interleave to (2H + 2, 2W + 2) by block moves and the 1-pixel border is cut (a DepthToSpace
    on NCHW, or transposes that move single elements, cost onnxruntime more than the convs' saving).
    The same sums up to float rounding, 16 taps at (H + 1)(W + 1) instead of 9 at 4HW (~2.25x fewer MACs)."""
    if conv.kernel_size != (1, 3, 3) or conv.stride != (1, 1, 1) or conv.padding != (0, 1, 1):
        raise ValueError(f"upsample_conv_frames takes 1x3x3 stride-1 'same' convs, got {conv}")
    w = conv.weight[:, :, 0]  # (Cout, Cin, 3, 3)
    C = conv.out_channels
    k = torch.cat([kc for r in _subpixel_taps(w, 2) for kc in _subpixel_taps(r, 3)])  # (4 * Cout, Cin, 2, 2)
    b = None if conv.bias is None else torch.cat([conv.bias] * 4)  # channels (row phase, column phase, Cout)
    y = F.conv2d(x, k, b, padding=1)  # (N, 4 * Cout, H + 1, W + 1)
    # hw from the caller: in onnxruntime's int8 graph a Shape of x or y makes one more full DequantizeLinear of it
    H, W = x.shape[2:] if hw is None else hw
    y = y.permute(0, 2, 3, 1).reshape(-1, W + 1, 2, 2 * C)  # channels last (onnxruntime's QLinearConv layout)
    y = y.transpose(1, 2).reshape(-1, 2 * H + 2, 2 * W + 2, C)  # rows phase under the rows: blocks of 2 * Cout
    return y[:, 1:-1, 1:-1].permute(0, 3, 1, 2)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.ch_mult]
        self.conv_in = CausalConv3d(3, chs[0])
        layers, cin = [], chs[0]
        for i, ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, ch))
                cin = ch
            if i < len(chs) - 1:
                layers.append(Downsample(ch, cfg.temporal_down[i]))
        self.down = nn.Sequential(*layers)
        self.mid = ResBlock(cin, cin)
        self.norm_out = ChannelRMSNorm(cin)
        self.conv_out = CausalConv3d(cin, 2 * cfg.z_channels)

    def forward(self, x):
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.ch_mult][::-1]
        temporal_up = cfg.temporal_down[::-1]
        self.conv_in = CausalConv3d(cfg.z_channels, chs[0])
        self.mid = ResBlock(chs[0], chs[0])
        layers, cin = [], chs[0]
        for i, ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, ch))
                cin = ch
            if i < len(chs) - 1:
                layers.append(Upsample(ch, temporal_up[i]))
        self.up = nn.Sequential(*layers)
        self.norm_out = ChannelRMSNorm(cin)
        self.conv_out = CausalConv3d(cin, 3)

    def forward(self, z):
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward_2d(self, z):
        """forward(z) on frames (B*T, C, H, W) with 2-D convolutions only: same weights, same function (max abs
        ~1e-6 in float32), and what the exported decoder runs (onnxruntime CPU: Conv2d in its NCHWc layout)."""
        T = z.shape[2]
        H, W = z.shape[3:]  # read off the input: shapes of inner tensors cost a DequantizeLinear in int8 graphs
        x, T = self.mid.frames(self.conv_in.frames(z.transpose(1, 2).flatten(0, 1), T), T)
        for m in self.up:
            if isinstance(m, Upsample):
                x, T = m.frames(x, T, (H, W))
                H, W = 2 * H, 2 * W
            else:
                x, T = m.frames(x, T)
        x = self.conv_out.frames(F.silu(self.norm_out(x)), T)
        return x.unflatten(0, (-1, T)).transpose(1, 2)

    def temporal_receptive_field(self) -> int:
        """Latent frames of past context that can influence an output frame (an upper bound)."""
        rate, lookback = 1, 0.0
        for m in self.modules():
            if isinstance(m, Upsample) and m.temporal is not None:
                rate *= 2
            if isinstance(m, CausalConv3d):
                lookback += m.time_pad / rate
        return math.ceil(lookback)

    def tile_context(self) -> int:
        """Past latent frames a temporal tile needs to decode exactly like the full video."""
        return self.temporal_receptive_field() + 1


class CausalVAE(nn.Module):
    """Videos in [-1, 1], (B, 3, 4k+1, H, W) <-> latents (B, z, k+1, H/8, W/8)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x, sample: bool = False, generator: torch.Generator | None = None):
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30, 20))
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    def encode_stats(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z):
        return self.decoder(z)

    def num_frames(self, latent_frames: int) -> int:
        return (latent_frames - 1) * self.cfg.temporal_factor + 1

    @torch.no_grad()
    def decode_tiled(self, z, tile: int = 4, context: int | None = None, decode_fn=None):
        """Decode `tile` latent frames at a time with `context` latent frames of past context per tile.

        Memory is bounded by tile + context latent frames. With context >= the decoder's temporal receptive field + 1
        (the default), the result equals `decode(z)` up to float rounding: no seams, no blending needed.
        `decode_fn` replaces the PyTorch decoder for each tile (an ONNX/TensorRT session of the same graph).
        """
        decode_fn = decode_fn or self.decoder
        T, f = z.shape[2], self.cfg.temporal_factor
        if tile < 1:
            raise ValueError(f"tile must be >= 1 latent frame, got {tile}")
        context = self.decoder.tile_context() if context is None else context
        if (T - 1) // tile * tile <= context:
            # the last tile would start its context at latent frame 0, i.e. hold every frame: one call of all T has
            # the same peak memory and recomputes nothing (small, 17 frames: 471 -> 262 ms on CPU)
            tile = T
        out = []
        for s in range(0, T, tile):
            e, a = min(T, s + tile), max(0, s - context)
            frames = decode_fn(z[:, :, a:e])
            keep = 0 if s == a else 1 + f * (s - a - 1)  # tile-local index of latent s's first output frame
            out.append(frames[:, :, keep:])
        return torch.cat(out, dim=2)
