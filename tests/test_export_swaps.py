"""export/swaps.py and families/wan/export.py: exact export-time swaps that let diffusers' WanTransformer3DModel
export with the TorchScript exporter (opset 18) as one shape-generic graph. Tiny random model, float32, CPU only."""
import pytest

pytest.importorskip("diffusers")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402
from torch import nn  # noqa: E402

from vidrt.export import onnx_export as ox  # noqa: E402
from vidrt.export.swaps import exportable, rms_norm, swap_rms_norm  # noqa: E402
from vidrt.families.wan.export import WAN_SWAPS, apply_rotary  # noqa: E402

CFG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
           text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
IO = (["latents", "timestep", "text"], ["velocity"], {
    "latents": {0: "batch", 2: "frames", 3: "height", 4: "width"}, "timestep": {0: "batch"},
    "text": {0: "batch", 1: "text_len"}, "velocity": {0: "batch", 2: "frames", 3: "height", 4: "width"}})
# (batch, latent frames, height, width, text length): export shape first, then shapes where all of them differ
SHAPES = [(2, 3, 8, 8, 12), (1, 2, 12, 16, 7), (3, 1, 6, 10, 5)]


class WanPart(nn.Module):
    """The call contract the exporter sees: forward(latents, timestep, text) -> velocity."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, timestep, text):
        return self.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                                return_dict=False)[0]


def inputs(b, f, h, w, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(b, CFG["in_channels"], f, h, w, generator=g),
            "timestep": torch.rand(b, generator=g) * 1000,
            "text": torch.randn(b, L, CFG["text_dim"], generator=g)}


@pytest.fixture(scope="module")
def part():
    torch.manual_seed(0)
    return WanPart(WanTransformer3DModel(**CFG).float().eval()).eval()


def run(module, x):
    with torch.no_grad():
        return module(**x)


def max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("swaps", [["rms_norm"], ["wan_rope"], None], ids=["rms_norm", "wan_rope", "all"])
def test_swaps_are_exact(part, swaps):
    cases = [inputs(*s, seed=i) for i, s in enumerate(SHAPES[:2])]
    refs = [run(part, x) for x in cases]
    with exportable(part, {k: WAN_SWAPS[k] for k in swaps or WAN_SWAPS}) as counts:
        # 2 blocks x (self + cross attention): 8 RMSNorms (norm_q, norm_k), 4 attention modules
        assert counts == {k: {"rms_norm": 8, "wan_rope": 4}[k] for k in (swaps or WAN_SWAPS)}
        outs = [run(part, x) for x in cases]
    for ref, out in zip(refs, outs):
        assert max_diff(ref, out) <= 1e-6


def test_pieces_match_torch():
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for eps in (None, 1e-6):
            m = nn.RMSNorm((3, 16), eps=eps).to(dtype)
            nn.init.normal_(m.weight)
            x = torch.randn(2, 5, 3, 16).to(dtype)
            assert torch.equal(m(x), rms_norm(x, (3, 16), m.weight, eps))
    # RoPE against the strided-write formulation it replaces
    x, cos, sin = torch.randn(2, 6, 2, 16), torch.randn(1, 6, 1, 16, dtype=torch.float64), torch.randn(1, 6, 1, 16)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    ref = torch.empty_like(x)
    ref[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    ref[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    assert torch.equal(apply_rotary(x, cos, sin), ref)


def test_onnx_export_is_shape_generic(part, tmp_path):
    cases = [inputs(*s, seed=i) for i, s in enumerate(SHAPES)]
    refs = [run(part, x).numpy() for x in cases]  # unpatched
    with exportable(part, WAN_SWAPS):
        path = ox.export_onnx(part, cases[0], IO, tmp_path / "wan.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs = [max_diff(sess.run(None, {k: v.numpy() for k, v in x.items()})[0], ref) for x, ref in zip(cases, refs)]
    print("onnxruntime vs torch max abs diff per shape:", dict(zip(map(str, SHAPES), diffs)))
    assert all(d <= 1e-4 for d in diffs), diffs


def test_blockers_without_swaps(part, tmp_path):
    """Each swap is needed: without rms_norm the exporter refuses; without wan_rope the graph only runs at the
    export shape."""
    a, b = inputs(*SHAPES[0]), inputs(*SHAPES[1], seed=1)
    with pytest.raises(Exception, match="rms_norm"):
        ox.export_onnx(part, a, IO, tmp_path / "plain.onnx")
    with exportable(part, {"rms_norm": swap_rms_norm}):
        path = ox.export_onnx(part, a, IO, tmp_path / "baked.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert max_diff(sess.run(None, {k: v.numpy() for k, v in a.items()})[0], run(part, a)) <= 1e-4
    with pytest.raises(Exception, match="[Ee]xpand"):
        sess.run(None, {k: v.numpy() for k, v in b.items()})


def test_restored_after_exit_and_on_exception(part):
    x = inputs(*SHAPES[1])
    ref, keys = run(part, x), list(part.state_dict())
    sentinel = part.transformer.blocks[0].attn1.norm_q.forward  # an instance-level forward set by someone else
    part.transformer.blocks[0].attn1.norm_q.forward = sentinel

    def untouched():
        for m in part.modules():
            if m is part.transformer.blocks[0].attn1.norm_q:
                assert m.__dict__["forward"] is sentinel
            else:
                assert "forward" not in m.__dict__, m
        assert list(part.state_dict()) == keys and torch.equal(run(part, x), ref)

    try:
        with exportable(part, WAN_SWAPS):
            assert sum("forward" in m.__dict__ for m in part.modules()) == 8 + 4
        untouched()
        with pytest.raises(RuntimeError, match="boom"):
            with exportable(part, WAN_SWAPS):
                raise RuntimeError("boom")
        untouched()
        def failing(module, stack):  # a swap that fails after rms_norm patched its modules
            raise ValueError("cannot swap")
        with pytest.raises(ValueError, match="cannot swap"):
            with exportable(part, {"rms_norm": swap_rms_norm, "failing": failing}):
                pass
        untouched()
    finally:
        del part.transformer.blocks[0].attn1.norm_q.forward
