"""Tiny random-init Wan diffusers directories, written by diffusers' own save_pretrained: the real configs' structure
with small widths, for tests, the GPU kit's parity check and the README demo; and a directory at a real geometry.

    save_wan("wan-tiny")      # Wan 2.1 T2V (two_experts: 2.2 A14B, ti2v: 2.2 TI2V-5B)
"""
from __future__ import annotations

from pathlib import Path

import torch

from vidrt.models.diffusers_io import random_init, require_diffusers, tiny_tokenizer


def save_wan(out: str | Path, scheduler: str = "unipc", seed: int = 0, two_experts: bool = False,
              ti2v: bool = False) -> Path:
    """A tiny random-init Wan text-to-video directory, as diffusers' save_pretrained writes it (tests, README demo):
    the real configs' structure with small widths, a word-level tokenizer, UMT5 text encoder. scheduler: "unipc"
    (what Wan checkpoints ship: flow prediction, flow_shift 3) or "euler" (FlowMatchEulerDiscreteScheduler, shift 5).
    two_experts: Wan 2.2 A14B's layout (transformer_2, boundary_ratio 0.875). ti2v: Wan 2.2 TI2V-5B's layout
    (expand_timesteps in model_index.json; the 48-channel residual VAE with patch_size 2, 12 in/out channels and
    scale_factor_spatial 16, as the 5B's vae/config.json; the transformer's in/out channels = the VAE's z_dim)."""
    diffusers, transformers = require_diffusers()
    torch.manual_seed(seed)
    tokenizer, vocab_size = tiny_tokenizer()
    text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))

    z = 48 if ti2v else 16

    def transformer():
        return diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                               in_channels=z, out_channels=z, text_dim=32, freq_dim=32, ffn_dim=32,
                                               num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                               rope_max_seq_len=32)
    if ti2v:  # per-channel statistics away from (0, 1), so a de-normalisation with the wrong ones shows
        g = torch.Generator().manual_seed(seed + 1)
        mean = [round(v, 4) for v in (torch.randn(z, generator=g) * 0.3).tolist()]
        std = [round(v, 4) for v in (0.5 + torch.rand(z, generator=g)).tolist()]
        vae = diffusers.AutoencoderKLWan(base_dim=4, decoder_base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2],
                                         num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True,
                                         in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                                         latents_mean=mean, latents_std=std)
    else:
        vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True, True])
    if scheduler == "unipc":
        sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0, num_train_timesteps=1000)
    else:
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0)
    extra = {"transformer_2": transformer(), "boundary_ratio": 0.875} if two_experts else {}
    if ti2v:
        extra["expand_timesteps"] = True
    pipe = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer(),
                                 scheduler=sched, **extra)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)


def save_wan_geometry(out: str | Path, transformer: dict, vae: dict, text_layers: int = 2, text_d_model: int = 4096,
                      flow_shift: float = 3.0, seed: int = 0) -> Path:
    """A random-init Wan directory at a given geometry (families/wan/config.py PRESETS' transformer/vae kwargs),
    written by WanPipeline.save_pretrained: the transformer as WanFamily.from_preset builds it (meta device, then
    N(0, 0.02): one copy, which safetensors writes from memory), the VAE with its class's init, a `text_layers`-deep
    UMT5 at width `text_d_model` (UMT5-XXL's 64-wide heads and FFN ratio) behind the tiny word-level tokenizer,
    save_wan's scheduler with `flow_shift`. For real-size benchmarks (benchmarks/real_size.py)."""
    diffusers, transformers = require_diffusers()
    torch.manual_seed(seed)
    tokenizer, vocab_size = tiny_tokenizer()
    text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=vocab_size, d_model=text_d_model, d_kv=64, d_ff=text_d_model * 5 // 2, num_layers=text_layers,
        num_heads=text_d_model // 64, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1))
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=flow_shift, num_train_timesteps=1000)
    pipe = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), scheduler=sched,
                                 vae=diffusers.AutoencoderKLWan(**vae).eval(),
                                 transformer=random_init(diffusers.WanTransformer3DModel, transformer, "cpu",
                                                         torch.float32, seed))
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)
