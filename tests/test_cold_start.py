"""Cold start: the embedded text encoder runs without transformers and matches it; --help imports no torch."""
import subprocess
import sys
import warnings

import pytest
import torch

from vidrt.export import onnx_export as ox
from vidrt.families.vidrt import export as vx
from vidrt.models.config import TextConfig
from vidrt.models.text import TextEncoder, resolve_text_encoder_path

PROMPTS = ["a red circle moving left on a blue background", "", "Ünïcödé café naïve 東京 🚀", "  tabs\tand\nnewlines ",
           "word " * 60, "A stylish woman walks down a Tokyo street filled with warm glowing neon and city signage.",
           "[CLS] [SEP] [PAD] [MASK] as text", "x"]


def _transformers_reference(cfg: TextConfig, prompts: list[str]):
    """What TextEncoder computed before it stopped importing transformers: AutoTokenizer + AutoModel."""
    from transformers import AutoModel, AutoTokenizer
    path = resolve_text_encoder_path(cfg.encoder)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    t = tok(prompts, padding="max_length", truncation=True, max_length=cfg.max_length, return_tensors="pt")
    with torch.no_grad():
        emb = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
    lengths = [len(ids) for ids in tok(prompts, truncation=False)["input_ids"]]
    return t, emb * t["attention_mask"][..., None], lengths


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(TextConfig())


@pytest.mark.parametrize("max_length", [32, 8])
def test_minilm_matches_transformers(max_length):
    cfg = TextConfig(max_length=max_length)
    te = TextEncoder(cfg)
    assert not te.transformers  # the embedded default takes the fast path
    ref_tok, ref, lengths = _transformers_reference(cfg, PROMPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = te.tokenize(PROMPTS)
        emb, mask = te.encode(PROMPTS)
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(tok[k], ref_tok[k]), k
    assert te.tokenizer._lengths(PROMPTS) == lengths  # the truncation warning counts the same tokens
    assert torch.equal(mask, ref_tok["attention_mask"].bool())
    assert emb.dtype == torch.float32 and emb.shape == ref.shape
    assert (emb - ref).abs().max().item() < 1e-5


def test_truncation_warning_counts_tokens(encoder):
    with pytest.warns(UserWarning, match="prompt 0 is 62 tokens but the text encoder reads 32: the last 30"):
        encoder.tokenize(["word " * 60])


def test_onnx_export_serves_other_lengths(encoder, tmp_path):
    tok = encoder.tokenize(PROMPTS[:2])
    path = ox.export_onnx(encoder, {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]},
                          vx.TEXT_IO, tmp_path / "text.onnx")
    assert ox.check_graph(path)["checker"] == "ok"
    short = encoder.tokenize(PROMPTS[2:4] + PROMPTS[5:6])
    cases = [{"input_ids": t["input_ids"][:, :n], "attention_mask": t["attention_mask"][:, :n]}
             for t, n in ((tok, 32), (short, 12))]
    for p in ox.parity(encoder, path, cases):
        assert p.max_abs < 1e-4 and p.cosine > 0.99999, p


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\nMODULES', *sorted(sys.modules))"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return set(out.rsplit("\nMODULES ", 1)[1].split())


def test_encoder_imports_no_transformers():
    mods = _modules_after("from vidrt.models.config import TextConfig\nfrom vidrt.models.text import TextEncoder\n"
                          "TextEncoder(TextConfig()).encode(['a red circle'])")
    assert "transformers" not in mods and "torch" in mods


@pytest.mark.parametrize("module", ["vidrt.app.cli", "vidrt.builder.cli"])
def test_help_imports_no_torch(module):
    mods = _modules_after(f"from {module} import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert "click" in mods
    assert not {"torch", "numpy", "transformers", "onnx"} & mods
