import math

import pytest
import torch

from vidrt.core.errors import ConfigError
from vidrt.models.checkpoint import load_model
from vidrt.models.config import ModelConfig, preset
from vidrt.models.dit import SelfAttention, VideoDiT, apply_rope, rope_cos_sin, rope_dims
from vidrt.models.vae import CausalVAE


@pytest.mark.parametrize("frames,h,w,msg", [
    (8, 32, 32, r"4k\+1.*try 5 or 9"), (10, 32, 32, "try 9 or 13"), (9, 24, 32, "height=24 must be a positive multiple of 16"),
    (9, 32, 40, "width=40"), (0, 32, 32, r"4k\+1")])
def test_bad_shapes_name_the_fix(frames, h, w, msg):
    with pytest.raises(ConfigError, match=msg):
        preset("tiny").latent_shape(frames, h, w)


def test_latent_shape_and_presets():
    assert preset("tiny").latent_shape(9, 32, 32) == (8, 3, 4, 4)
    assert preset("vidrt-wan2.1-1.3b").latent_shape(81, 480, 832) == (16, 21, 60, 104)
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny, small"):
        preset("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_model("/nonexistent/ckpt")


def test_config_roundtrip(tmp_path):
    cfg = preset("small")
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg


def test_preset_sizes():
    def n(name):
        with torch.device("meta"):  # counts without allocating 1.4B parameters
            return sum(p.numel() for p in VideoDiT(preset(name).dit).parameters())
    assert 30e6 <= n("small") <= 60e6
    # Published DiT sizes: Wan2.1-T2V-1.3B has 1.42B parameters (its name rounds down).
    assert 1.38e9 <= n("vidrt-wan2.1-1.3b") <= 1.46e9
    # 28 layers of one full-3D-attention block: 0.61B. STDiT3-XL (1.1B) runs a spatial and a temporal block per layer.
    assert 0.55e9 <= n("opensora-1.2") <= 0.7e9


def test_shared_adaln_dit_runs_and_conditions_on_time():
    cfg = preset("small").dit
    cfg.shared_adaln = True
    torch.manual_seed(0)
    dit = VideoDiT(cfg)
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, text, mask = torch.randn(1, 16, 1, 4, 4), torch.randn(1, 8, 384), torch.ones(1, 8, dtype=torch.bool)
    with torch.no_grad():
        a, b = dit(x, torch.tensor([0.2]), text, mask), dit(x, torch.tensor([0.8]), text, mask)
    assert a.shape == x.shape and (a - b).abs().max() > 1e-3


def _complex_rope_reference(x, T, H, W, theta=10000.0):
    """Naive RoPE with complex numbers, position by position (the form most papers write)."""
    B, h, N, D = x.shape
    out = torch.empty_like(x)
    dims = rope_dims(D)
    n = 0
    for t in range(T):
        for i in range(H):
            for j in range(W):
                ang = []
                for pos, d in zip((t, i, j), dims):
                    ang += [pos / theta ** (2 * k / d) for k in range(d // 2)]
                rot = torch.polar(torch.ones(D // 2, dtype=torch.float64), torch.tensor(ang, dtype=torch.float64))
                xc = torch.view_as_complex(x[:, :, n].double().reshape(B, h, D // 2, 2).contiguous())
                out[:, :, n] = torch.view_as_real(xc * rot).reshape(B, h, D).float()
                n += 1
    return out


def test_rope_matches_complex_reference_and_preserves_norm():
    torch.manual_seed(0)
    T, H, W, D = 3, 2, 4, 32
    x = torch.randn(2, 4, T * H * W, D)
    cos, sin = rope_cos_sin(T, H, W, D)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y, _complex_rope_reference(x, T, H, W), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)
    # relative: <R(p)q, R(p')k> depends only on p - p' (shift both by one frame)
    q, k = torch.randn(D), torch.randn(D)
    cos, sin = rope_cos_sin(4, 1, 1, D)
    qs = apply_rope(q.expand(1, 1, 4, D), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, 4, D), cos, sin)[0, 0]
    assert abs(qs[1] @ ks[0] - qs[3] @ ks[2]) < 1e-4


def test_self_attention_matches_naive_softmax():
    torch.manual_seed(0)
    attn = SelfAttention(64, 4)
    x = torch.randn(2, 12, 64)
    cos, sin = rope_cos_sin(3, 2, 2, 16)
    B, N, D = x.shape
    q, k, v = attn.qkv(x).view(B, N, 3, 4, 16).permute(2, 0, 3, 1, 4)
    q, k = apply_rope(attn.q_norm(q), cos, sin), apply_rope(attn.k_norm(k), cos, sin)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(B, N, D))
    torch.testing.assert_close(attn(x, cos, sin), ref, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def random_dit():
    cfg, dit, _ = load_model("small", seed=0)  # random init with open adaLN gates
    return cfg, dit


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 8), (5, 8, 4)])
def test_dit_shapes_and_text_mask(random_dit, shape):
    cfg, dit = random_dit
    torch.manual_seed(1)
    x = torch.randn(2, cfg.dit.in_channels, *shape)
    t = torch.tensor([0.3, 0.9])
    text = torch.randn(2, 16, cfg.dit.text_dim)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        v = dit(x, t, text, mask)
        assert v.shape == x.shape and torch.isfinite(v).all()
        text2 = text.clone()
        text2[:, 5:] = 100.0  # padded tokens must not matter
        torch.testing.assert_close(dit(x, t, text2, mask), v)
        text2[:, 0] += torch.randn(cfg.dit.text_dim)  # a real token must
        assert (dit(x, t, text2, mask) - v).abs().max() > 1e-4


def test_vae_causal_and_tiled_decode_is_exact():
    torch.manual_seed(0)
    vae = CausalVAE(preset("tiny").vae).eval()
    x = torch.randn(1, 3, 17, 32, 32)
    with torch.no_grad():
        z = vae.encode(x)
        assert z.shape == (1, 8, 5, 4, 4)
        x2 = x.clone()
        x2[:, :, 9:] = 0  # change frames >= 9: latents 0..2 (frames 0..8) must not change
        z2 = vae.encode(x2)
        torch.testing.assert_close(z2[:, :, :3], z[:, :, :3])
        assert (z2[:, :, 3:] - z[:, :, 3:]).abs().max() > 1e-3
        zz = torch.randn(1, 8, 20, 4, 4)
        full = vae.decode(zz)
        assert full.shape == (1, 3, 77, 32, 32)
        for tile in (1, 3, 8):
            torch.testing.assert_close(vae.decode_tiled(zz, tile=tile), full, atol=1e-5, rtol=1e-5)
        # too little context is visibly wrong: the default context is what makes tiles seamless
        assert (vae.decode_tiled(zz, tile=1, context=1) - full).abs().max() > 1e-2


def test_object_weights_mark_exactly_the_object():
    import numpy as np

    from vidrt.models.synthetic import BACKGROUNDS, Scene, render, to_tensor_range
    from vidrt.models.train import object_weights
    frames = render(Scene("white", "square", "up", "gray"))
    x = torch.from_numpy(to_tensor_range(frames))[None]
    w = object_weights(x, 9.0)
    assert w.shape == (1, 1, 9, 32, 32) and set(w.unique().tolist()) == {1.0, 10.0}
    is_bg = torch.from_numpy((frames == np.array(BACKGROUNDS["gray"], np.uint8)).all(-1))
    assert torch.equal(w[0, 0] == 1.0, is_bg)
