"""``shapes``: the suite's embedded, procedural, long-tailed image dataset.

Nothing is downloaded or stored: item ``i`` of a split is drawn from
``np.random.default_rng([seed, split_id, i])`` (train = 0, val = 1, so the splits never
share a stream) and rendered on the fly, identically on every machine.

What an image contains (all geometry is in fractions of the image side, so any
``image_size`` — 16, 32, 64, 256 — shows the same scene):

- **Label**: the first draw of the item's stream, from a Zipf distribution
  ``p_k ∝ (k + 1) ** -tail_alpha`` over ``num_classes`` classes (``class_probs``). With the
  defaults (10 classes, alpha 1.5) class 0 ("circle") is ~50% of images and the rarest
  ("arrow") ~1.6%: ground truth for long-tail analyses.
- **Background**: a linear gradient between two uniformly random RGB colours at a random
  angle, plus Gaussian grain with std U[0, 4] (0-255 scale); ``background="flat"``: the
  first colour alone, no grain. ``color_levels`` = L rounds every colour drawn (background and
  fills) to L evenly spaced values per channel (2: the 8 corners of the RGB cube).
- **Distractors** (``min_objects - 1`` to ``max_objects - 1`` of them, drawn first, so
  behind): small dots or bars, diameter 10-18% of the side, anywhere in the image,
  solid or gradient fill. No class shape is drawn that small, so they never look like
  the main object.
- **Main object** (the class, drawn last, on top): one of ``CLASS_NAMES`` with a bounding
  circle of 40-70% of the side, fully inside the image, random rotation (up to
  ``max_rotation`` degrees; 0 = upright), filled with one of
  the textures solid / linear gradient / stripes (random angle, period 8-20% of the side) /
  checkerboard / low-frequency value noise (``textures`` narrows the choice), in two colours
  chosen to contrast with the background (best of 12 random candidates), so the outline stays
  visible.
- Edges are anti-aliased (supersampled coverage, see ``lmgen.datasets.render``).

``attributes(i)`` returns the full scene description; ``SHAPES_VERSION`` changes whenever
the recipe changes, and is part of ``fingerprint()``, so caches keyed on it invalidate.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from lmgen.datasets.base import DataConfig, short_hash
from lmgen.datasets.render import (
    DISTRACTOR_SHAPES,
    MAIN_SHAPES,
    TEXTURES,
    Scene,
    ShapeObject,
    render_scene,
)

SHAPES_VERSION = 1
SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1}
# Class k is the k-th most frequent class, so the default 10 classes end at "arrow".
CLASS_NAMES: tuple[str, ...] = tuple(MAIN_SHAPES)
MAIN_SIZE = (0.4, 0.7)  # bounding-circle diameter, fraction of the side
DISTRACTOR_SIZE = (0.1, 0.18)
TEXTURE_PERIOD = (0.08, 0.2)
MAX_NOISE_STD = 4.0
BACKGROUNDS: tuple[str, ...] = ("gradient", "flat")
_COLOR_CANDIDATES = 12


def zipf_probs(num_classes: int, tail_alpha: float) -> np.ndarray:
    """Class probabilities ``p_k ∝ (k + 1) ** -tail_alpha``, float64 (num_classes,), sum 1."""
    w = np.arange(1, num_classes + 1, dtype=np.float64) ** -float(tail_alpha)
    return w / w.sum()


def quantize_colors(colors: np.ndarray, levels: int) -> np.ndarray:
    """Each channel rounded to the nearest of ``levels`` evenly spaced values in [0, 255]
    (``levels`` = 2: the 8 corners of the RGB cube); 0 leaves every value as drawn."""
    if levels == 0:
        return colors
    step = 255 / (levels - 1)
    return (np.rint(np.rint(colors / step) * step)).astype(colors.dtype)


def _contrasting_colors(candidates: np.ndarray, avoid: np.ndarray) -> np.ndarray:
    """Per row, the candidate farthest (RGB Euclidean) from every colour to avoid.

    candidates: (n, k, 3) int64; avoid: (n, m, 3) int64 -> (n, 3) int64.
    """
    d2 = ((candidates[:, :, None, :] - avoid[:, None, :, :]) ** 2).sum(axis=-1).min(axis=2)
    return candidates[np.arange(len(candidates)), d2.argmax(axis=1)]


def _object(role: str, shape: str, u: list[float], c0: list[int], c1: list[int],
            fills: tuple[str, ...] = TEXTURES, max_rotation: float = 360.0) -> ShapeObject:
    """An object from 7 uniforms ``u`` in [0, 1) and its two colours; a main object is filled
    with one of ``fills``; either is turned by up to ``max_rotation`` degrees (distractors by any)."""
    lo, hi = MAIN_SIZE if role == "main" else DISTRACTOR_SIZE
    size = lo + (hi - lo) * u[0]
    # the main object stays inside the frame; distractors may be cut by the border
    margin = size / 2 if role == "main" else 0.0
    textures = fills if role == "main" else ("solid", "gradient")
    lo_p, hi_p = TEXTURE_PERIOD
    return ShapeObject(
        role=role,
        shape=shape,
        center=(margin + (1 - 2 * margin) * u[1], margin + (1 - 2 * margin) * u[2]),
        size=size,
        rotation=max_rotation * u[3],
        colors=((c0[0], c0[1], c0[2]), (c1[0], c1[1], c1[2])),
        texture=textures[int(u[4] * len(textures))],
        texture_angle=180.0 * u[5],
        texture_period=lo_p + (hi_p - lo_p) * u[6],
    )


def sample_scene(rng: np.random.Generator, label: int, params: SceneParams) -> Scene:
    """Draw a scene whose main object has class ``label`` under the knobs ``params``.

    All randomness is drawn in a few vectorised calls, in a fixed order (part of
    ``SHAPES_VERSION``): counts, background, per-object uniforms, colour candidates. The style
    knobs (fills, background, colour levels) change what the draws are used for, never how
    many there are.
    """
    num_distractors = (params.min_objects - 1, params.max_objects - 1)
    n = int(rng.integers(num_distractors[0], num_distractors[1] + 1)) + 1  # last = main
    bg = quantize_colors(rng.integers(0, 256, size=(2, 3)), params.color_levels)
    bg_angle, noise_u = rng.random(2)
    if params.background == "flat":
        bg[1], noise_u = bg[0], 0.0
    u = rng.random((n, 8))  # per object: size, cx, cy, rotation, texture, angle, period, shape
    cand = quantize_colors(rng.integers(0, 256, size=(2, n, _COLOR_CANDIDATES, 3)), params.color_levels)
    avoid = np.broadcast_to(np.stack([bg[0], bg[1], (bg[0] + bg[1]) // 2]), (n, 3, 3))
    c0 = _contrasting_colors(cand[0], avoid)
    # the second colour also avoids the first, so stripes and checkers stay visible
    c1 = _contrasting_colors(cand[1], np.concatenate([avoid, c0[:, None, :]], axis=1))
    uu, cc0, cc1 = u.tolist(), c0.tolist(), c1.tolist()  # Python scalars: JSON-ready, fast
    names = tuple(DISTRACTOR_SHAPES)
    objects = [_object("distractor", names[int(uu[j][7] * len(names))], uu[j], cc0[j], cc1[j]) for j in range(n - 1)]
    objects.append(_object("main", CLASS_NAMES[label], uu[-1], cc0[-1], cc1[-1], params.textures,
                           params.max_rotation))
    (r0, g0, b0), (r1, g1, b1) = bg.tolist()
    return Scene(
        label=label,
        class_name=CLASS_NAMES[label],
        background_colors=((r0, g0, b0), (r1, g1, b1)),
        background_angle=360.0 * float(bg_angle),
        background_noise_std=MAX_NOISE_STD * float(noise_u),
        objects=tuple(objects),
        noise_seed=int(rng.integers(2**31)),
    )


@dataclass(frozen=True)
class SceneParams:
    """What a scene holds, apart from its size: the ``data`` knobs shared by ``shapes`` and
    ``moving_shapes`` (see ``ShapesConfig``)."""

    num_classes: int = 10
    tail_alpha: float = 1.5
    min_objects: int = 2
    max_objects: int = 5
    textures: tuple[str, ...] = TEXTURES
    background: str = "gradient"
    color_levels: int = 0
    max_rotation: float = 360.0

    @classmethod
    def from_config(cls, cfg: ShapesConfig) -> SceneParams:
        return cls(cfg.num_classes, float(cfg.tail_alpha), cfg.min_objects, cfg.max_objects, tuple(cfg.textures),
                   cfg.background, cfg.color_levels, float(cfg.max_rotation))

    def hashed(self) -> dict[str, Any]:
        """The knobs as a fingerprint holds them: the style knobs only where they differ from the
        default recipe, so a default scene hashes as it did before they existed (caches stay valid)."""
        out: dict[str, Any] = {"num_classes": self.num_classes, "tail_alpha": self.tail_alpha,
                               "min_objects": self.min_objects, "max_objects": self.max_objects}
        if self.textures != TEXTURES:
            out["textures"] = list(self.textures)
        if self.background != "gradient":
            out["background"] = self.background
        if self.color_levels:
            out["color_levels"] = self.color_levels
        if self.max_rotation != 360.0:
            out["max_rotation"] = self.max_rotation
        return out


@dataclass
class ShapesConfig(DataConfig):
    """``data`` block of ``shapes`` (and, extended, of ``moving_shapes``): the scene knobs."""

    name: str = "shapes"
    num_classes: int = 10
    tail_alpha: float = 1.5  # Zipf exponent of class frequencies: rarest of 10 classes ≈ 1.6%
    min_objects: int = 2  # objects per image, the class object included: 1 = no distractors
    max_objects: int = 5
    # the main object's fills, drawn uniformly (default: all of render.TEXTURES)
    textures: list[str] = field(default_factory=lambda: list(TEXTURES))
    # "gradient": two random colours at a random angle plus grain; "flat": one colour, no grain
    background: str = field(default="gradient", metadata={"choices": BACKGROUNDS})
    # colours per RGB channel: 0 = any of 0-255; L >= 2 = L evenly spaced values (2: 8 colours)
    color_levels: int = 0
    # the main object turns by U[0, max_rotation) degrees: 360 = any angle, 0 = always upright
    max_rotation: float = 360.0

    # generated data has no "all": both splits need a size
    RANGES: ClassVar[dict[str, str]] = {**DataConfig.RANGES, "train_size": "[1, inf)", "val_size": "[1, inf)",
                                        "tail_alpha": "[0, inf)", "color_levels": "[0, 256]",
                                        "max_rotation": "[0, 360]"}

    def check(self) -> None:
        super().check()
        check_scene(self.image_size, SceneParams.from_config(self), self.name)


def check_scene(image_size: int, scene: SceneParams, name: str = "shapes") -> None:
    """ValueError naming the ``data.*`` knob the renderer of dataset ``name`` cannot draw."""
    if image_size < 4:  # the renderer's smallest canvas
        raise ValueError(f"data.image_size must be >= 4 for {name!r}, got {image_size}")
    if not 2 <= scene.num_classes <= len(CLASS_NAMES):
        raise ValueError(f"data.num_classes must be in [2, {len(CLASS_NAMES)}] (the shapes drawn) for {name!r}, "
                         f"got {scene.num_classes}")
    if not 1 <= scene.min_objects <= scene.max_objects:
        raise ValueError(f"data: need 1 <= min_objects <= max_objects for {name!r}, got {scene.min_objects}, "
                         f"{scene.max_objects}")
    unknown = [t for t in scene.textures if t not in TEXTURES]
    if not scene.textures or unknown or len(set(scene.textures)) != len(scene.textures):
        raise ValueError(f"data.textures must be a non-empty list of distinct fills from {list(TEXTURES)} "
                         f"for {name!r}, got {list(scene.textures)}")
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"data.background must be one of {list(BACKGROUNDS)} for {name!r}, got {scene.background!r}")
    if scene.color_levels == 1 or not 0 <= scene.color_levels <= 256:
        raise ValueError(f"data.color_levels must be 0 (any colour) or in [2, 256] for {name!r}, got {scene.color_levels}")
    if not 0.0 <= scene.max_rotation <= 360.0:
        raise ValueError(f"data.max_rotation must be in [0, 360] degrees for {name!r}, got {scene.max_rotation}")


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural long-tailed shapes; items are ``(uint8 (3, H, W) in [0, 255], label)``.

    See the module docstring for the recipe. ``size`` is the number of items in ``split``.
    """

    frames = 0  # still images (see ImageDataset)
    fps = 0.0
    Config = ShapesConfig
    video = False  # still images
    procedural = True  # generated, so no data.root, and both split sizes > 0

    def __init__(self, split: str, size: int, seed: int, image_size: int = 32, scene: SceneParams | None = None) -> None:
        scene = scene or SceneParams()
        if split not in SPLIT_IDS:
            raise ValueError(f"shapes: unknown split {split!r}; valid: {sorted(SPLIT_IDS)}")
        if size <= 0:
            raise ValueError(f"shapes: size must be > 0 (procedural data has no 'all'), got {size}")
        if seed < 0:
            raise ValueError(f"shapes: seed must be >= 0, got {seed}")
        check_scene(image_size, scene)
        self.split, self.size, self.seed, self.image_size = split, int(size), int(seed), int(image_size)
        self.scene_params = scene
        self.num_classes = scene.num_classes
        self.class_names: list[str] = list(CLASS_NAMES[: self.num_classes])
        probs = zipf_probs(self.num_classes, scene.tail_alpha)
        self.class_probs: Tensor = torch.from_numpy(probs)  # float64 (num_classes,), exact
        self._cdf = np.cumsum(probs)
        self._labels: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: ShapesConfig, split: str) -> ShapesDataset:
        """The ``split`` of the dataset a ``data`` block describes (``{split}_size`` items)."""
        return cls(split=split, size=getattr(cfg, f"{split}_size"), seed=cfg.seed, image_size=cfg.image_size,
                   scene=SceneParams.from_config(cfg))

    def __len__(self) -> int:
        return self.size

    def _check_index(self, index: int) -> int:
        if not -self.size <= index < self.size:
            raise IndexError(f"shapes {self.split}: index {index} out of range for size {self.size}")
        return index % self.size

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])

    def draw_label(self, rng: np.random.Generator) -> int:
        """A class index from the Zipf prior, using one uniform draw of ``rng``."""
        return min(int(np.searchsorted(self._cdf, rng.random(), side="right")), self.num_classes - 1)

    def scene(self, index: int) -> Scene:
        """The full description of item ``index`` (no pixels rendered)."""
        rng = self._rng(self._check_index(index))
        label = self.draw_label(rng)
        return sample_scene(rng, label, self.scene_params)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        scene = self.scene(index)
        img = render_scene(scene, self.image_size)  # (H, W, 3) uint8
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), scene.label

    def labels(self) -> Tensor:
        """All labels, int64 (N,); draws only the label of each item (no rendering), cached."""
        if self._labels is None:
            self._labels = torch.tensor([self.draw_label(self._rng(i)) for i in range(self.size)], dtype=torch.int64)
        return self._labels

    def class_counts(self) -> Tensor:
        """Items per class in this split, int64 (num_classes,)."""
        return torch.bincount(self.labels(), minlength=self.num_classes)

    def attributes(self, index: int) -> dict[str, Any]:
        """JSON-serialisable scene description: class, background, and every object."""
        scene = dataclasses.asdict(self.scene(index))
        scene["index"] = self._check_index(index)
        # round-trip so tuples become lists: what a consumer gets back from a JSON file
        return json.loads(json.dumps(scene))

    def fingerprint(self) -> str:
        """Short stable hash of the generation parameters and ``SHAPES_VERSION``."""
        return short_hash(
            {
                "dataset": "shapes",
                "version": SHAPES_VERSION,
                "split": self.split,
                "size": self.size,
                "seed": self.seed,
                "image_size": self.image_size,
                **self.scene_params.hashed(),
            }
        )
