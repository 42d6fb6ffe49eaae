"""What every diffusers-directory family (families/wan/, families/ltx/) shares: reading the directory's configs and
safetensors weights (local files only, never a pickle), dtype casting as diffusers loads models, random-init models
at real sizes built on the meta device, and the tiny word-level tokenizer of the tiny test directories."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vidrt.core.errors import ConfigError
from vidrt.models.config import SampleDefaults

TINY_WORDS = ("a red green blue yellow circle square moving left right up down on the background slowly fast over "
              "under bright dark small big").split()
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")  # a text-to-video pipeline directory's
TEXT_PROMPTS = ["a red circle moving left on a blue background", "a green square moving up", "", "blue"]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e


def read_configs(root: Path, what: str) -> tuple[dict, dict, dict, dict]:
    """The transformer, VAE, scheduler and text-encoder configs of a pipeline directory; ConfigError naming every
    missing subfolder first. `what`: the directory's kind for the message, e.g. "a Wan text-to-video"."""
    missing = [p for p in PARTS if not (root / p).is_dir()]
    if missing:
        raise ConfigError(f"diffusers directory {root} lacks {', '.join(p + '/' for p in missing)}: {what} "
                          f"directory has {', '.join(p + '/' for p in PARTS)} and model_index.json")
    return tuple(read_json(root / p / f) for p, f in (("transformer", "config.json"), ("vae", "config.json"),
                                                      ("scheduler", "scheduler_config.json"),
                                                      ("text_encoder", "config.json")))


class DirConfig:
    """to_dict / from_dict of a family's config dataclass (as stored in a bundle's manifest)."""

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{**d, "patch": tuple(d["patch"]), "sample": SampleDefaults(**d["sample"])})


def require_diffusers():
    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise ConfigError(f"loading a diffusers directory needs diffusers and transformers ({e}); install them with "
                          "pip install 'vidrt[diffusers]'") from e
    return diffusers, transformers


def load_pretrained(cls, path: Path, what: str, **kw):
    """cls.from_pretrained from local safetensors only; ConfigError naming the part and the cause otherwise."""
    try:
        return cls.from_pretrained(path, use_safetensors=True, local_files_only=True, **kw)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"cannot load the {what} from {path} (safetensors weights that match its config.json are "
                          f"needed; no pickle files are read): {first}") from e


def cast_like_diffusers(model: nn.Module, device, dtype) -> None:
    """model.to(device, dtype), except the parameters diffusers keeps in float32 when it loads the model in a 16-bit
    dtype (the model's _keep_in_fp32_modules: Wan's time embedder, norms, modulation table), so vidrt computes what
    the family's pipeline computes after from_pretrained(torch_dtype=...)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if p.is_meta and device != "meta":
            continue  # a skeleton's blocks (load_skeleton): read when exported, never run here
        want = torch.float32 if p.is_floating_point() and any(k in name.split(".") for k in keep) else dtype
        p.data = p.data.to(device, want if p.is_floating_point() else p.dtype)


def random_init(cls, kw: dict, device, dtype, seed: int):
    """cls(**kw) built on the meta device and materialised on `device` in `dtype` (a 14B model never exists in fp32
    on the host); weights N(0, 0.02), norms 1, biases 0; buffers (RoPE tables) from a one-layer CPU twin."""
    with torch.device("meta"):
        m = cls(**kw)
    cast_like_diffusers(m, "meta", dtype)
    m = m.to_empty(device=device)
    twin = cls(**{**kw, "num_layers": 1}) if "num_layers" in kw else cls(**kw)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        for name, b in m.named_buffers():
            b.copy_(dict(twin.named_buffers())[name])
    cast_like_diffusers(m, device, dtype)  # the float32 modules back to float32, as diffusers loads them
    return m.eval()


def tiny_tokenizer(max_length: int | None = None):
    """A word-level tokenizer over TINY_WORDS with T5's special tokens (<pad> 0, </s> 1, <unk> 2), built locally."""
    _, transformers = require_diffusers()
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(TINY_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    kw = {} if max_length is None else {"model_max_length": max_length}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>", **kw), len(vocab)


def load_text(root: Path, encoder: str):
    """(tokenizer, text encoder in eval mode) of a directory; `encoder` names the transformers class."""
    _, transformers = require_diffusers()
    tokenizer = load_pretrained(transformers.AutoTokenizer, root / "tokenizer", "tokenizer")
    return tokenizer, load_pretrained(getattr(transformers, encoder), root / "text_encoder", "text encoder").eval()


def move(fam, modules, text: nn.Module | None, device, dtype) -> None:
    """A family's torch parts to `device` in `dtype` (diffusers' float32 modules stay float32); its `text` encoder
    moves and stays float32. Bundles (fam.vae is None) keep their parts in their backend."""
    if fam.vae is None:
        return
    fam.device = torch.device(device)
    for m in modules:
        cast_like_diffusers(m, fam.device, dtype)
    if text is not None:  # presets have none
        text.to(fam.device)


class SafetensorsFolder:
    """The safetensors weights of one diffusers model folder (one file, or shards with their index), read a module
    at a time (safetensors maps the file: a block's tensors are all that is read)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open
        self.folder = Path(folder)
        index = self.folder / "diffusion_pytorch_model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(read_json(index).get("weight_map", {}).values()))
        else:
            files = sorted(f.name for f in self.folder.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{self.folder} has no safetensors weights (no pickle files are read)")
        if bad := [f for f in files if Path(f).name != f or not f.endswith(".safetensors")]:
            raise ConfigError(f"{index}: the weight map names {bad[0]!r}, not a .safetensors file in {self.folder}")
        self.key_file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            try:
                with safe_open(self.folder / name, framework="pt") as f:
                    for k in f.keys():
                        if k in self.key_file:  # e.g. an fp16 variant file beside the fp32 one
                            raise ConfigError(f"{self.folder}: {k} is in both {self.key_file[k].name} and {name}")
                        self.key_file[k], self.shapes[k] = self.folder / name, tuple(f.get_slice(k).get_shape())
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file: safetensors' own error types
                raise ConfigError(f"cannot read {self.folder / name}: {e}") from e

    def subset(self, keep) -> "SafetensorsFolder":
        """The same folder with only the keys for which keep(key) is true."""
        sub = SafetensorsFolder.__new__(SafetensorsFolder)
        sub.folder = self.folder
        sub.key_file = {k: f for k, f in self.key_file.items() if keep(k)}
        sub.shapes = {k: self.shapes[k] for k in sub.key_file}
        return sub

    def check(self, module: nn.Module, prefix: str) -> None:
        """ConfigError naming the keys when the tensors under `prefix` are not exactly `module`'s parameters and
        persistent buffers with their shapes (checked on the meta device, before anything is read)."""
        want = {prefix + k: tuple(t.shape) for k, t in module.state_dict().items()}
        have = {k: s for k, s in self.shapes.items() if k.startswith(prefix)}
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        for what, keys in (("lack", missing), ("have unexpected", extra), ("have other shapes for", wrong)):
            if keys:
                raise ConfigError(f"{self.folder}: the weights {what} {', '.join(keys[:3])}"
                                  f"{f' and {len(keys) - 3} more' if len(keys) > 3 else ''} (the model's config "
                                  "and its weights do not match)")

    def load_into(self, module: nn.Module, prefix: str, dtype: torch.dtype, strict: bool = True) -> None:
        """The tensors under `prefix` ("blocks.3.") become `module`'s parameters and buffers (in `dtype` if float),
        replacing meta ones; strict: every one of its keys must be there and nothing else under the prefix
        (load_skeleton checked every block's keys and shapes up front, with `check`)."""
        from safetensors import safe_open
        by_file: dict[Path, list[str]] = {}
        for k, f in self.key_file.items():
            if k.startswith(prefix):
                by_file.setdefault(f, []).append(k)
        state = {}
        for f, keys in by_file.items():
            with safe_open(f, framework="pt") as fh:
                for k in keys:
                    t = fh.get_tensor(k)
                    state[k[len(prefix):]] = t.to(dtype) if t.is_floating_point() else t
        module.load_state_dict(state, strict=strict, assign=True)


def load_skeleton(cls, folder: Path, blocks: str, what: str):
    """A diffusers model (`cls`) from `folder`'s config with the weights outside its `blocks` ModuleList loaded and
    the blocks' parameters left on the meta device (buffers, e.g. RoPE tables, are built as the class builds them);
    returns (model, SafetensorsFolder) for export/streamed.py to read the blocks from."""
    from accelerate import init_empty_weights
    try:
        config = cls.load_config(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the {what} config in {folder}: {e}") from e
    with init_empty_weights():  # parameters on meta, buffers real
        model = cls.from_config(config)
    weights = SafetensorsFolder(folder)
    weights.check(model, "")  # every block's keys and shapes too, before any export work
    weights.subset(lambda k: not k.startswith(f"{blocks}.")).load_into(model, "", torch.float32, strict=False)
    return model.eval(), weights
