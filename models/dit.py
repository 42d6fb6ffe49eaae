"""Sora-style video diffusion transformer over spacetime patches.

Patchify (t, h, w) -> tokens; blocks of [adaLN-zero self-attention with 3D RoPE] -> [cross-attention to text tokens]
-> [adaLN-zero MLP]; adaLN final layer; unpatchify. Everything is real-valued and shape-derived from the input so it
exports to ONNX for any latent shape.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from vidrt.models.config import DiTConfig


def exporting() -> bool:
    """torch.onnx.is_in_onnx_export(), without importing torch.onnx (~20 ms, on `vidrt generate`'s first step)
    when nothing has: no export can be running then."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 like diffusion timesteps). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Split of the head dimension over (t, h, w); each part even (Wan-style split)."""
    d = 2 * (head_dim // 6)
    return head_dim - 2 * d, d, d


def rope_cos_sin(grid_t: torch.Tensor | int, grid_h: torch.Tensor | int, grid_w: torch.Tensor | int,
                 head_dim: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (N, head_dim // 2) for N = T*H*W tokens in (t, h, w) raster order."""
    parts = []
    for n, d in zip((grid_t, grid_h, grid_w), rope_dims(head_dim)):
        pos = torch.arange(n, dtype=torch.float32, device=device)
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
        parts.append(pos[:, None] * inv[None])  # (n, d/2)
    at, ah, aw = parts
    T, H, W = at.shape[0], ah.shape[0], aw.shape[0]
    ang = torch.cat([at[:, None, None, :].expand(T, H, W, -1),
                     ah[None, :, None, :].expand(T, H, W, -1),
                     aw[None, None, :, :].expand(T, H, W, -1)], dim=-1).reshape(T * H * W, head_dim // 2)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x (B, heads, N, head_dim) by the angles in cos/sin (N, head_dim // 2)."""
    # split/concat, not x[..., 0] / x[..., 1]: indexing exports as strided Gathers, which cost onnxruntime 18% of
    # the small DiT step (measured); the arithmetic is the same
    x1, x2 = x.float().unflatten(-1, (-1, 2)).split(1, dim=-1)
    cos, sin = cos[..., None], sin[..., None]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


def apply_rope_tokens(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n, heads: int, head_dim: int):
    """apply_rope for x in the projection layout (B, n, heads, head_dim), cos/sin as (n, 1, head_dim // 2, 1): the
    same arithmetic, with reshapes of constant sizes (unflatten/flatten of a traced shape export as shape arithmetic
    per call). n: the token count, shared by every block so that ONNX computes the reshape's shape once."""
    x1, x2 = x.float().reshape(-1, n, heads, head_dim // 2, 2).split([1, 1], dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).reshape(-1, n, heads, head_dim).type_as(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim; onnxruntime fuses the exported chain (Pow, ReduceMean,
    Add, Sqrt, Div, Mul, Mul) into one SimplifiedLayerNormalization at session time when the weight is a constant of
    the last dim's size (the stored ONNX stays standard ops)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RMSNorm(nn.Module):
    """rms_norm as a module; written out: exports to every opset (aten::rms_norm needs opset 23)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") in the op order onnxruntime's FastGeluFusion matches (one FastGelu at session
    time instead of 9 nodes); the same formula, so equal to rounding."""
    return (x * 0.5) * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3))))


class GELUTanh(nn.Module):
    def forward(self, x):
        return F.gelu(x, approximate="tanh") if not exporting() else gelu_tanh(x)


def modulate(x, shift, scale):
    """x (B, N, D); shift, scale (B, 1, D)."""
    return x * (1 + scale) + shift


def attention(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q @ kt [+ mask]) @ v with the 1/sqrt(head_dim) scale already in q: what SDPA exports to, minus its
    two scale Muls on q and k and its Transpose of k (kt comes transposed from the projection layout)."""
    s = q @ kt
    return torch.softmax(s if mask is None else s + mask, dim=-1) @ v


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        """cos/sin: rope_cos_sin's tables (N, head_dim // 2); while exporting to ONNX, see forward_export."""
        if exporting():
            return self.forward_export(x, cos, sin)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def forward_export(self, x, cos, sin):
        """forward as written to ONNX; the same function up to rounding. q and k are normalised and rotated together
        in the projection's (B, N, 2 * heads, head_dim) layout (one RoPE for both; the attention scale folded into
        q_norm's weight, a constant), then moved heads-first by one Transpose each, k straight to (B, heads,
        head_dim, N): no scale Muls and no Transpose of k inside the attention (as SDPA exports). cos/sin: the RoPE
        tables as (N, 1, head_dim // 2, 1)."""
        h, d = self.heads, self.head_dim  # Python ints: sizes and constants in ONNX, not shape arithmetic
        n = cos.shape[0]  # tokens, from the RoPE table every block shares
        qk, v = self.qkv(x).view(-1, n, 3 * h, d).split([2 * h, h], dim=2)
        # one RMSNorm over the 2h q/k heads (ones weight: fusable, exact), then each head's own weight
        w = torch.cat([(self.q_norm.weight / math.sqrt(d)).expand(h, d), self.k_norm.weight.expand(h, d)])
        assert self.q_norm.eps == self.k_norm.eps  # one norm for both
        qk = rms_norm(qk, qk.new_ones(d), self.q_norm.eps) * w
        q, k = apply_rope_tokens(qk, cos, sin, n, 2 * h, d).split([h, h], dim=2)
        out = attention(q.transpose(1, 2), k.permute(0, 2, 3, 1), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(-1, n, h * d))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx, attn_mask):
        if exporting():
            # as in SelfAttention.forward_export: normalised in the projection layout, the scale folded into
            # q_norm's weight, k transposed once; the batch from ctx, which every block shares
            h, d, B = self.heads, self.head_dim, ctx.shape[0]
            q = rms_norm(self.q(x).view(B, -1, h, d), self.q_norm.weight / math.sqrt(d), self.q_norm.eps)
            k, v = self.kv(ctx).view(B, -1, 2 * h, d).split([h, h], dim=2)
            out = attention(q.transpose(1, 2), self.k_norm(k).permute(0, 2, 3, 1), v.transpose(1, 2), attn_mask)
            return self.proj(out.transpose(1, 2).reshape(B, -1, h * d))
        B, N, D = x.shape
        L, h = ctx.shape[1], self.heads
        q = self.q_norm(self.q(x).view(B, N, h, D // h).transpose(1, 2))
        k, v = self.kv(ctx).view(B, L, 2, h, D // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, self.k_norm(k), v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = self.hidden = cfg.hidden
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, cfg.heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.cross = CrossAttention(d, cfg.heads)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_hidden), GELUTanh(),
                                 nn.Linear(cfg.mlp_hidden, d))
        if cfg.shared_adaln:
            self.adaLN_table = nn.Parameter(torch.zeros(1, 6, d))
        else:
            self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c, ctx, attn_mask, cos, sin):
        """c: (B, d) timestep embedding, or (B, 6, d) shared modulation when cfg.shared_adaln."""
        # (B, 6, d) split on the constant axis: one Reshape + one Split in ONNX, six (B, 1, d) that broadcast over
        # tokens as they are (chunk of the last axis exported as shape arithmetic + six Slices + six Unsqueezes)
        mod = c + self.adaLN_table if c.dim() == 3 else self.adaLN(c).view(-1, 6, self.hidden)
        sh1, sc1, g1, sh2, sc2, g2 = mod.split([1] * 6, dim=1)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), cos, sin)
        x = x + self.cross(self.norm2(x), ctx, attn_mask)
        return x + g2 * self.mlp(modulate(self.norm3(x), sh2, sc2))


class VideoDiT(nn.Module):
    """forward(latents (B,C,T,H,W), t (B,) in [0,1], text (B,L,text_dim), mask (B,L) bool) -> velocity like latents."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, (pt, ph, pw) = cfg.hidden, cfg.patch
        self.patch_embed = nn.Linear(cfg.in_channels * pt * ph * pw, d)
        self.t_embed = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.text_embed = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d),
                                        GELUTanh(), nn.Linear(d, d))
        self.adaLN_shared = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d)) if cfg.shared_adaln else None
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final = nn.Linear(d, cfg.in_channels * pt * ph * pw)
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # adaLN-zero: every residual branch starts closed
        mods = [self.adaLN_shared[-1]] if self.cfg.shared_adaln else [b.adaLN[-1] for b in self.blocks]
        for lin in mods:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.final_adaLN[-1].weight)
        nn.init.zeros_(self.final_adaLN[-1].bias)
        nn.init.zeros_(self.final.weight)

    def patchify(self, x):
        B, C, T, H, W = x.shape
        pt, ph, pw = self.cfg.patch
        x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)

    def unpatchify(self, x, T, H, W):
        B, C = x.shape[0], self.cfg.in_channels
        pt, ph, pw = self.cfg.patch
        x = x.reshape(B, T // pt, H // ph, W // pw, C, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(B, C, T, H, W)

    def forward(self, latents, t, text, mask):
        T, H, W = latents.shape[2], latents.shape[3], latents.shape[4]
        pt, ph, pw = self.cfg.patch
        x = self.patch_embed(self.patchify(latents))
        cos, sin = rope_cos_sin(T // pt, H // ph, W // pw, self.cfg.head_dim, self.cfg.rope_theta, latents.device)
        if exporting():  # SelfAttention.forward_export's form, made once for all blocks
            cos, sin = cos[:, None, :, None], sin[:, None, :, None]
        c = self.t_embed(timestep_embedding(t, self.cfg.freq_dim).to(x.dtype))
        ctx = self.text_embed(text.to(x.dtype))
        # additive mask in the activation dtype (B, 1, 1, L): a bool mask exports as a float32 bias that would
        # promote fp16/bf16 graphs to float32; -1e4 gives exactly zero attention weight after softmax
        attn_mask = torch.where(mask.bool(), 0.0, -1e4).to(x.dtype)[:, None, None, :]
        mod = self.adaLN_shared(c).view(-1, 6, self.cfg.hidden) if self.adaLN_shared is not None else c
        for blk in self.blocks:
            x = blk(x, mod, ctx, attn_mask, cos, sin)
        sh, sc = self.final_adaLN(c).view(-1, 2, self.cfg.hidden).split([1, 1], dim=1)
        x = self.final(modulate(self.final_norm(x), sh, sc))
        return self.unpatchify(x, T, H, W)
