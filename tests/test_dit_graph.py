"""The DiT as written to ONNX (models/dit.py's export form) against a straightforward reference written here, and the
shape of the exported graph: standard ops only, what onnxruntime fuses, the layers INT8 quantizes."""
import math
from collections import Counter
from unittest import mock

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from vidrt.calibration.quantize import QuantRecipe, targets
from vidrt.export import onnx_export as ox
from vidrt.models.checkpoint import load_model
from vidrt.models.config import DiTConfig
from vidrt.models.dit import VideoDiT, apply_rope_tokens, gelu_tanh, rope_cos_sin, rope_dims, timestep_embedding


def exporting():
    """Run the modules' export form in eager torch (what torch.onnx.export traces)."""
    return mock.patch("torch.onnx.is_in_onnx_export", return_value=True)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ---- a reference DiT: the textbook formulas, position by position where it matters -------------------------------

def ref_rms_norm(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_rope(x, T, H, W, theta=10000.0):
    """x (B, heads, N, D): each consecutive pair (2i, 2i+1) of token (t, h, w) rotated as a complex number."""
    B, h, N, D = x.shape
    ang = torch.zeros(N, D // 2, dtype=torch.float64)
    n = 0
    for t in range(T):
        for i in range(H):
            for j in range(W):
                a = []
                for pos, d in zip((t, i, j), rope_dims(D)):
                    a += [pos / theta ** (2 * k / d) for k in range(d // 2)]
                ang[n] = torch.tensor(a, dtype=torch.float64)
                n += 1
    xc = torch.view_as_complex(x.double().reshape(B, h, N, D // 2, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)).reshape(B, h, N, D).float()


def ref_attention(q, k, v, mask=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s if mask is None else s + mask, dim=-1) @ v


def ref_dit(m: VideoDiT, latents, t, text, mask):
    """VideoDiT's forward from its parameters, written out: chunk, complex RoPE, naive softmax."""
    cfg = m.cfg
    B, C, T, H, W = latents.shape
    pt, ph, pw = cfg.patch
    Tp, Hp, Wp = T // pt, H // ph, W // pw
    x = m.patch_embed(m.patchify(latents))
    c = m.t_embed(timestep_embedding(t, cfg.freq_dim))
    ctx = m.text_embed[3](F.gelu(m.text_embed[1](m.text_embed[0](text)), approximate="tanh"))
    bias = torch.where(mask, 0.0, -1e4)[:, None, None, :]
    h = cfg.heads
    for blk in m.blocks:
        mod = (m.adaLN_shared(c).reshape(B, 6, -1) + blk.adaLN_table) if cfg.shared_adaln else \
            blk.adaLN(c).reshape(B, 6, -1)
        sh1, sc1, g1, sh2, sc2, g2 = (mod[:, i, None] for i in range(6))
        y = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + sc1) + sh1
        q, k, v = blk.attn.qkv(y).reshape(B, -1, 3, h, cfg.head_dim).permute(2, 0, 3, 1, 4)
        q = ref_rope(ref_rms_norm(q, blk.attn.q_norm.weight), Tp, Hp, Wp, cfg.rope_theta)
        k = ref_rope(ref_rms_norm(k, blk.attn.k_norm.weight), Tp, Hp, Wp, cfg.rope_theta)
        x = x + g1 * blk.attn.proj(ref_attention(q, k, v).transpose(1, 2).reshape(B, -1, cfg.hidden))
        y = blk.norm2(x)
        q = ref_rms_norm(blk.cross.q(y).reshape(B, -1, h, cfg.head_dim).transpose(1, 2), blk.cross.q_norm.weight)
        k, v = blk.cross.kv(ctx).reshape(B, -1, 2, h, cfg.head_dim).permute(2, 0, 3, 1, 4)
        o = ref_attention(q, ref_rms_norm(k, blk.cross.k_norm.weight), v, bias)
        x = x + blk.cross.proj(o.transpose(1, 2).reshape(B, -1, cfg.hidden))
        y = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + sc2) + sh2
        x = x + g2 * blk.mlp[2](F.gelu(blk.mlp[0](y), approximate="tanh"))
    sh, sc = m.final_adaLN(c)[:, None].chunk(2, dim=-1)
    x = m.final(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + sc) + sh)
    return m.unpatchify(x, T, H, W)


def inputs(cfg: DiTConfig, shape=(3, 4, 6), L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, :3], mask[1, :5] = True, True
    return (torch.randn(2, cfg.in_channels, *shape, generator=g), torch.rand(2, generator=g),
            torch.randn(2, L, cfg.text_dim, generator=g), mask)


@pytest.fixture(scope="module")
def tiny():
    _, dit, _ = load_model("tiny")  # the embedded trained checkpoint
    return dit


# ---- numerics ----------------------------------------------------------------------------------------------------

def test_pieces_match_their_reference():
    torch.manual_seed(0)
    T, H, W, heads, D = 2, 3, 4, 3, 16
    x = torch.randn(2, T * H * W, heads, D)
    cos, sin = rope_cos_sin(T, H, W, D)
    y = apply_rope_tokens(x, cos[:, None, :, None], sin[:, None, :, None], T * H * W, heads, D)
    torch.testing.assert_close(y.transpose(1, 2), ref_rope(x.transpose(1, 2), T, H, W), atol=1e-5, rtol=1e-5)
    z = torch.randn(1000) * 4
    torch.testing.assert_close(gelu_tanh(z), F.gelu(z, approximate="tanh"), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shared_adaln", [False, True], ids=["adaLN", "adaLN-single"])
def test_export_form_equals_reference_dit(shared_adaln):
    """Random weights with open gates, both adaLN flavours, patch 1x2x2: eager and export form vs ref_dit."""
    cfg = DiTConfig(in_channels=4, hidden=48, depth=2, heads=4, mlp_hidden=96, patch=(1, 2, 2), text_dim=24,
                    shared_adaln=shared_adaln)
    torch.manual_seed(0)
    m = VideoDiT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        args = inputs(cfg, shape=(3, 4, 6))
        ref = ref_dit(m, *args)
        eager = m(*args)
        with exporting():
            exp = m(*args)
    assert rel(eager, ref) < 1e-5 and rel(exp, ref) < 1e-5


def test_tiny_checkpoint_output_unchanged(tiny):
    """The embedded trained tiny model: same output as the reference (and as before the export rewrite: the eager
    path is the original code) within 1e-5 relative, in eager and export form."""
    args = inputs(tiny.cfg, shape=(3, 4, 4), L=32)
    with torch.no_grad():
        ref = ref_dit(tiny, *args)
        eager = tiny(*args)
        with exporting():
            exp = tiny(*args)
    assert rel(eager, ref) < 1e-5 and rel(exp, ref) < 1e-5 and rel(exp, eager) < 1e-5


# ---- the exported graph ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "dit.onnx"
    args = inputs(tiny.cfg, shape=(3, 4, 4), L=32)
    ox.export_onnx(tiny, dict(zip(ox.DIT_IO[0], args)), ox.DIT_IO, path)
    return path


def ort_optimized(path, tmp_path) -> onnx.ModelProto:
    """The graph onnxruntime runs on CPU after its session-time fusions (default level, as core/ort.py opens)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "opt.onnx"))


def test_exported_graph_is_standard_onnx_and_fuses_on_cpu(tiny, tiny_onnx, tmp_path):
    depth = tiny.cfg.depth
    m = onnx.load(str(tiny_onnx))
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}, "com.microsoft ops must stay out of the stored graph"
    assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"}
    ops = Counter(n.op_type for n in m.graph.node)
    # SDPA's export (a Transpose of k and two scale Muls fed by Sqrt of the shape) is gone: the scale lives in
    # q_norm's weight and k leaves the projection transposed once; 4 Transposes per attention (q, k, v, output)
    # + patchify/unpatchify
    assert ops["Transpose"] == 8 * depth + 2 and ops["Softmax"] == 2 * depth
    assert ops["Slice"] == 0 and ops["Tanh"] == depth + 1
    opt = Counter(n.op_type for n in ort_optimized(tiny_onnx, tmp_path).graph.node)
    # every RMSNorm (one for self-attention q+k, one each for cross q and k) and every GELU fuse at session time
    assert opt["SimplifiedLayerNormalization"] == 3 * depth and opt["FastGelu"] == depth + 1
    assert opt["Tanh"] == opt["Pow"] == opt["ReduceMean"] == 0
    assert sum(opt.values()) < 90 * depth  # before the rewrite: 1110 nodes (tiny), 185 per block


def test_int8_finds_the_same_layers(tiny, tiny_onnx):
    """calibration/quantize.targets: every block Linear (q/k/v, projections, MLP: 7) quantized under its module
    path, the 13 sensitive layers of tiny (embedders, adaLN, final) kept in float, qkv's weight stored unpermuted."""
    m = onnx.load(str(tiny_onnx))
    tg, skipped = targets(m, QuantRecipe("int8"))
    assert len(tg) == 7 * tiny.cfg.depth and len(skipped) == 13
    qkv = next(t for t in tg if t.node == "/blocks.0/attn/qkv/MatMul")
    w = onnx.numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == qkv.weight))
    np.testing.assert_array_equal(w, tiny.blocks[0].attn.qkv.weight.detach().numpy().T)


def test_exported_graph_serves_other_shapes(tiny, tiny_onnx):
    """Exported at 3x4x4 latents, 32 text tokens; run at other frame/size/batch/text lengths against torch."""
    from vidrt.core.ort import ort_session
    sess = ort_session(tiny_onnx)
    for shape, L, b in (((5, 6, 8), 32, 2), ((1, 2, 2), 12, 1), ((2, 8, 4), 20, 3)):
        args = inputs(tiny.cfg, shape=shape, L=L, seed=1)
        args = tuple(a[:1].expand(b, *a.shape[1:]).contiguous() if b != 2 else a for a in args)
        with torch.no_grad():
            ref = tiny(*args).numpy()
        out = sess.run(None, {n: a.numpy() for n, a in zip(ox.DIT_IO[0], args)})[0]
        assert out.shape == ref.shape
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5, shape


def test_bucket_graphs_recompute_the_step(tiny, tiny_onnx):
    """benchmarks/dit_graph --unprofiled: the optimized graph cut per bucket holds every node once (fused
    com.microsoft kernels included), and each bucket's graph alone (optimizations off) computes exactly what the
    whole step computes."""
    from vidrt.benchmarks import dit_graph as dg
    from vidrt.core.ort import ort_session
    args = inputs(tiny.cfg, shape=(3, 4, 4), L=32, seed=2)
    feed = {n: a.numpy() for n, a in zip(ox.DIT_IO[0], args)}
    model = dg.optimized_model(tiny_onnx)
    parts = dg.bucket_graphs(model, feed)
    assert {"weight GEMM", "attention", "norm", "elementwise", "layout"} <= set(parts) <= set(dg.BUCKETS)
    subs = {b: onnx.load_from_string(blob) for b, (blob, _, _) in parts.items()}
    assert sorted(n.name for m in subs.values() for n in m.graph.node) == sorted(n.name for n in model.graph.node)
    assert any(n.domain == "com.microsoft" for m in subs.values() for n in m.graph.node)  # fused kernels kept
    for b, (blob, f, want) in parts.items():
        got = dg.as_is(blob).run(list(want), f)
        for o, g in zip(want, got):
            np.testing.assert_array_equal(g, want[o], err_msg=f"{b}: {o}")
    # the values fed and checked are the step's own: its output among them, as the runtime's session computes it
    out = model.graph.output[0].name
    last = next(want[out] for _, _, want in parts.values() if out in want)
    ref = ort_session(tiny_onnx).run(None, feed)[0]
    assert np.linalg.norm(last - ref) / np.linalg.norm(ref) < 1e-6
