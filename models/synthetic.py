"""Synthetic text-to-video world: "a red circle moving left on a blue background".

Renders clips, splits prompts into train / held-out combinations, and detects object colour and motion direction
in generated frames: the project's semantic faithfulness metric.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

COLORS = {"red": (230, 40, 40), "green": (40, 200, 70), "blue": (50, 90, 240), "yellow": (245, 215, 40),
          "white": (245, 245, 245)}
BACKGROUNDS = {"black": (15, 15, 20), "gray": (120, 120, 120), "blue": (30, 50, 150), "green": (20, 90, 40)}
SHAPES = ("circle", "square")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
PROMPT = "a {color} {shape} moving {direction} on a {background} background"
_PROMPT_RE = re.compile(r"^a (\w+) (\w+) moving (\w+) on a (\w+) background$")


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    direction: str
    background: str

    @property
    def prompt(self) -> str:
        return PROMPT.format(**self.__dict__)

    @classmethod
    def parse(cls, prompt: str) -> "Scene":
        m = _PROMPT_RE.match(prompt.strip().lower())
        if not m:
            raise ValueError(f"not a synthetic-world prompt: {prompt!r} (expected {PROMPT!r})")
        return cls(*m.groups())


def all_scenes() -> list[Scene]:
    return [Scene(c, s, d, b) for c, s, d, b in itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS) if c != b]


def split_scenes() -> tuple[list[Scene], list[Scene]]:
    """(train, held_out): held-out scenes are unseen combinations of attributes that all occur in training."""
    train, held = [], []
    for sc in all_scenes():
        key = (list(COLORS).index(sc.color) + 2 * SHAPES.index(sc.shape) + 3 * list(DIRECTIONS).index(sc.direction)
               + 5 * list(BACKGROUNDS).index(sc.background))
        (held if key % 7 == 0 else train).append(sc)
    return train, held


def render(scene: Scene, num_frames: int = 9, size: int = 32, rng: np.random.Generator | None = None,
           radius: float = 6.0, speed: float = 1.5) -> np.ndarray:
    """uint8 video (T, H, W, 3) with an anti-aliased object moving at `speed` px/frame."""
    rng = rng or np.random.default_rng(0)
    dx, dy = DIRECTIONS[scene.direction]
    travel = speed * (num_frames - 1)
    lo, hi = radius + 1, size - radius - 1
    along = rng.uniform(lo, max(lo, hi - travel))
    across = rng.uniform(lo, hi)
    start = np.array([along if dx else across, along if dy else across])
    if dx < 0:
        start[0] = size - start[0]
    if dy < 0:
        start[1] = size - start[1]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    bg, fg = np.array(BACKGROUNDS[scene.background], np.float32), np.array(COLORS[scene.color], np.float32)
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for i in range(num_frames):
        cx, cy = start[0] + dx * speed * i, start[1] + dy * speed * i
        if scene.shape == "circle":
            d = np.hypot(xx - cx, yy - cy)
        else:
            d = np.maximum(np.abs(xx - cx), np.abs(yy - cy)) + 0.5  # square of the circle's area-ish size
        a = np.clip(radius + 0.5 - d, 0.0, 1.0)[..., None]
        frames[i] = np.round(bg * (1 - a) + fg * a).astype(np.uint8)
    return frames


def to_tensor_range(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W) in [-1, 1]."""
    return (frames.astype(np.float32) / 127.5 - 1.0).transpose(3, 0, 1, 2)


@dataclass
class Detection:
    color: str | None
    direction: str | None
    displacement: tuple[float, float]


def detect(frames: np.ndarray, threshold: float = 60.0, min_pixels: int = 4) -> Detection:
    """Find the object in uint8 frames (T, H, W, 3): colour = nearest palette colour of its pixels; direction = the
    dominant axis of its centroid's motion from the first to the last frame (None if it barely moves)."""
    f = frames.astype(np.float32)
    bg = np.median(f.reshape(f.shape[0], -1, 3), axis=1)  # object covers well under half of the frame
    dist = np.linalg.norm(f - bg[:, None, None, :], axis=-1)
    mask = dist > threshold
    counts = mask.sum(axis=(1, 2))
    if counts.sum() < min_pixels or counts[0] < min_pixels or counts[-1] < min_pixels:
        return Detection(None, None, (0.0, 0.0))
    pix = f[mask]
    names = list(COLORS)
    pal = np.array([COLORS[n] for n in names], np.float32)
    color = names[int(np.argmin(np.linalg.norm(pal - pix.mean(0), axis=1)))]
    yy, xx = np.mgrid[0:f.shape[1], 0:f.shape[2]]

    def centroid(i):
        w = mask[i]
        return np.array([xx[w].mean(), yy[w].mean()])

    d = centroid(f.shape[0] - 1) - centroid(0)
    if np.abs(d).max() < 2.0:
        return Detection(color, None, (float(d[0]), float(d[1])))
    if abs(d[0]) >= abs(d[1]):
        direction = "right" if d[0] > 0 else "left"
    else:
        direction = "down" if d[1] > 0 else "up"
    return Detection(color, direction, (float(d[0]), float(d[1])))
