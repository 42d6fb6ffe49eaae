"""Run vidrt's onnxruntime session in a child process on an emulated AVX2-only x86 CPU (no AVX-512, no VNNI).

onnxruntime picks its kernels from CPUID. Under `valgrind --tool=none` (default) CPUID reports the host with AVX-512,
VNNI and AMX masked; under `qemu-x86_64 -cpu EPYC-Milan` it reports an AMD Zen 3 (AVX2, no VNNI). Either way the child
computes exactly what an AVX2 machine's kernels compute, integer saturation included, so an AVX-512/VNNI machine can
measure AVX2 accuracy. Its speed means nothing (valgrind: ~15 s per small DiT step; qemu is slower still).

    part = EmulatedOrtPart("dit", "bundle/dit.int8.onnx")      # the Part protocol: torch tensors in, one out
    velocity = part(latents, timestep, text, text_mask)

The child imports numpy, onnx and onnxruntime only (not torch). Messages are length-prefixed .npz archives read with
allow_pickle=False.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from vidrt.core.ort import int8_saturates, ort_session

EMULATORS = {"valgrind": ["valgrind", "--tool=none", "-q"],
             "qemu": ["qemu-x86_64", "-cpu", "EPYC-Milan"]}  # AMD Zen 3: AVX2, FMA, no AVX-512, no VNNI


def emulator_unavailable_reason(emulator: str = "valgrind") -> str | None:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "x86-64 Linux is needed to emulate an AVX2 CPU"
    if emulator not in EMULATORS:
        return f"unknown emulator {emulator!r}; choose {' or '.join(EMULATORS)}"
    if shutil.which(EMULATORS[emulator][0]) is None:
        return f"{EMULATORS[emulator][0]} is not installed (Debian/Ubuntu: apt-get install " + \
            {"valgrind": "valgrind", "qemu": "qemu-user"}[emulator] + ")"
    return None


def _send(f, arrays: dict) -> None:
    import numpy as np
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _recv(f) -> dict | None:
    import numpy as np
    head = f.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    with np.load(io.BytesIO(f.read(n)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class EmulatedOrtPart:
    """An OrtPart whose session lives in a child on an emulated AVX2 CPU. `exact_int8` is passed to
    vidrt.core.ort.ort_session: None lets the runtime decide as it would on that machine."""
    backend = "onnxruntime"

    def __init__(self, name: str, path: str | Path, emulator: str = "valgrind", basic_opt: bool = False,
                 exact_int8: bool | None = None):
        reason = emulator_unavailable_reason(emulator)
        if reason:
            raise RuntimeError(reason)
        self.name, self.emulator = name, emulator
        cmd = [*EMULATORS[emulator], sys.executable, "-m", "vidrt.benchmarks.isa_emulate", str(path),
               "basic" if basic_opt else "all", {None: "auto", True: "exact", False: "default"}[exact_int8]]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        hello = _recv(self.proc.stdout)
        if hello is None:
            raise RuntimeError(f"the emulated onnxruntime session ({' '.join(cmd)}) did not start")
        self.inputs = [str(x) for x in hello["inputs"]]
        self.int8_saturates = bool(hello["int8_saturates"])  # what the runtime's probe saw on the emulated CPU
        self.exact_int8 = bool(hello["exact_int8"])          # what the session uses

    def __call__(self, *inputs):
        import torch
        _send(self.proc.stdin, {n: x.detach().cpu().numpy() for n, x in zip(self.inputs, inputs)})
        out = _recv(self.proc.stdout)
        if out is None:
            raise RuntimeError(f"the emulated onnxruntime session of {self.name} died")
        return torch.from_numpy(out["y"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # never leave a valgrind child behind
                self.proc.kill()
                self.proc.wait()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _serve(path: str, opt: str, int8: str) -> None:
    """Child: open the session the way the runtime does, then answer requests until stdin closes."""
    import numpy as np

    exact = {"auto": None, "exact": True, "default": False}[int8]
    sess = ort_session(path, basic_opt=opt == "basic", exact_int8=exact)
    sat = int8_saturates()
    out = sys.stdout.buffer
    _send(out, {"inputs": np.array([i.name for i in sess.get_inputs()]), "int8_saturates": np.array(sat),
                "exact_int8": np.array(sat if exact is None else exact)})
    while (req := _recv(sys.stdin.buffer)) is not None:
        _send(out, {"y": sess.run(None, req)[0]})


if __name__ == "__main__":
    _serve(*sys.argv[1:4])
