"""Prompt-faithfulness: generate held-out synthetic prompts and check object colour and motion direction."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vidrt.models.synthetic import Scene, detect, split_scenes


@dataclass
class FaithfulnessReport:
    color_accuracy: float
    direction_accuracy: float
    n: int
    rows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"faithfulness on {self.n} held-out videos: colour {100 * self.color_accuracy:.1f}%, "
                f"direction {100 * self.direction_accuracy:.1f}%")


def evaluate_faithfulness(pipe, scenes: list[Scene] | None = None, seeds: tuple[int, ...] = (0, 1),
                          progress: bool = False, **call_kwargs) -> FaithfulnessReport:
    """Generate each scene's prompt with each seed (all prompts of a seed in one batch) and score the frames."""
    scenes = scenes if scenes is not None else split_scenes()[1]
    rows = []
    for seed in seeds:
        out = pipe([s.prompt for s in scenes], seed=seed, progress=progress, **call_kwargs)
        for sc, frames in zip(scenes, out.frames):
            d = detect(frames)
            rows.append({"prompt": sc.prompt, "seed": seed, "color": d.color, "direction": d.direction,
                         "color_ok": d.color == sc.color, "direction_ok": d.direction == sc.direction})
    n = len(rows)
    return FaithfulnessReport(sum(r["color_ok"] for r in rows) / n, sum(r["direction_ok"] for r in rows) / n, n, rows)
