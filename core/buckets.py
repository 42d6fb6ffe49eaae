"""Buckets: the video shapes an export serves, and the TensorRT profile types built from them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    """A video shape the bundle serves: frames (4k+1), height, width."""
    frames: int
    height: int
    width: int

    @classmethod
    def parse(cls, s: str) -> "Bucket":
        try:
            f, h, w = (int(v) for v in s.lower().split("x"))
        except ValueError as e:
            raise ValueError(f"bucket {s!r} must be FRAMESxHEIGHTxWIDTH, e.g. 9x32x32") from e
        return cls(f, h, w)

    def __str__(self):
        return f"{self.frames}x{self.height}x{self.width}"


Shape = tuple[int, ...]


Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)
