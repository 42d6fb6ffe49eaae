"""A tiny random-init LTX-Video diffusers directory, written by diffusers' own save_pretrained (tests, demos)."""
from __future__ import annotations

from pathlib import Path

import torch

from vidrt.families.ltx.config import TEXT_LEN
from vidrt.models.diffusers_io import require_diffusers, tiny_tokenizer


def save_ltx(out: str | Path, seed: int = 0, timestep_conditioning: bool = False) -> Path:
    """A tiny random-init LTX-Video directory, as diffusers' save_pretrained writes it (tests, demos): the real
    configs' structure (VAE x32 space, x8 time; patch 1; dynamic-shifting flow-match Euler) with small widths, a
    word-level tokenizer, a T5 encoder, and random latents_mean/std and scaling_factor 0.9 so de-normalisation is
    exercised. timestep_conditioning: a 0.9.1-style decoder."""
    diffusers, transformers = require_diffusers()
    torch.manual_seed(seed)
    tokenizer, vocab_size = tiny_tokenizer(TEXT_LEN)
    text_encoder = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    # inner dim 2 x 8 = 16 is not a multiple of 6, like the real 2048: RoPE's padding branch runs
    transformer = diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=32)
    vae = diffusers.AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1), scaling_factor=0.9,
        timestep_conditioning=timestep_conditioning)
    vae.latents_mean.copy_(torch.randn(8) * 0.5)
    vae.latents_std.copy_(torch.rand(8) + 0.5)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(  # LTX-Video 0.9's scheduler_config
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096,
        shift_terminal=0.1)
    pipe = diffusers.LTXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                 scheduler=sched)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)
