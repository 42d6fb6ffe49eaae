"""What export-engines writes: the precisions, the parts, the rel L2 each graph must meet, and its one error type.
Shared by engines.py, torch_side.py and quantized.py (none imports another for these)."""
from __future__ import annotations

FLOAT = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # torch dtype names
QUANT = ("int8", "fp8")
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2,  # rel L2 vs the fp32 PyTorch part
             "int8": 0.15, "fp8": 0.25}  # quantized: on held-out captured inputs (tiny measures 0.07 / 0.14)
PARTS = ("text_encoder", "dit", "vae_decoder")


class ExportError(RuntimeError):
    pass


def is_dit(part: str) -> bool:
    """A DiT part (exported at every precision, int8/fp8 included): "dit", or one of a family's several DiT graphs
    ("dit_2": Wan 2.2 A14B's low-noise expert)."""
    return part == "dit" or part.startswith("dit_")
