"""Reference graphs from NVIDIA ModelOpt's ONNX PTQ, on the same calibration samples vidrt uses, for
quant_compare. Runs in its own environment: ModelOpt pins onnxruntime-gpu, cupy and an older onnx.

    python -m venv --system-site-packages .venv-modelopt
    .venv-modelopt/bin/pip install "nvidia-modelopt[onnx]==0.47.0"
    .venv-modelopt/bin/python -m vidrt.benchmarks.modelopt_ptq --model tiny --calib CAL --out-prefix mo_tiny
"""
from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch

from vidrt.calibration import quantize as Q
from vidrt.calibration.capture import load_set
from vidrt.export import onnx_export as ox
from vidrt.models.checkpoint import load_model


@click.command()
@click.option("--model", default="tiny", show_default=True)
@click.option("--calib", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out-prefix", required=True, help="Writes PREFIX_fp32.onnx, PREFIX_int8.onnx, PREFIX_fp8.onnx")
def main(model, calib, out_prefix):
    from modelopt.onnx.quantization import quantize

    cfg, dit, _ = load_model(model)
    cal, val = Q.split_samples(load_set(calib, cfg).dit, n_val=20)  # the same split quant_compare uses
    fp32 = ox.export_onnx(dit, {k: torch.from_numpy(v) for k, v in val[0].items()}, ox.DIT_IO,
                          Path(f"{out_prefix}_fp32.onnx"))
    data = {k: np.concatenate([f[k] for f in cal]) for k in cal[0]}
    for mode in ("int8", "fp8"):
        quantize(str(fp32), quantize_mode=mode, calibration_data=data, calibration_method="max",
                 output_path=f"{out_prefix}_{mode}.onnx", calibration_eps=["cpu"], high_precision_dtype="fp32")


if __name__ == "__main__":
    main()
