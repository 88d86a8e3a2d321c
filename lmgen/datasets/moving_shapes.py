"""``moving_shapes``: the procedural video twin of ``shapes``.

Clip ``i`` of a split is drawn from ``np.random.default_rng([seed, split_id, i, MOVE_SALT])``:
the salt gives clips their own streams, so a clip is not shapes item ``i`` set in motion.
In that stream, in a fixed order (part of ``MOVING_SHAPES_VERSION``):

- **Label**: one uniform mapped through the Zipf prior of ``shapes`` (same ``num_classes``
  and ``tail_alpha``), so class-conditional generation, the frame-level probe classifier
  and long-tail analyses see the same class frequencies as on stills.
- **Motion**: a uniform pick from ``MOTIONS``, also known without rendering (``motions()``).
- **Scene**: ``shapes``' own scene sampler (``sample_scene``): gradient background with
  grain, small static distractors, and the main object of the label's shape, drawn at its
  *home pose* (centre, size 40-70% of the side, rotation, texture, fully inside the frame).
- **Motion parameters**: the outline speed ``speed`` (fraction of the side per second,
  uniform in the ``speed`` range) and the motion's own draws (direction, orbit radius, ...).

Frame ``t`` is shown at time ``t / fps`` s and is the scene with the main object moved:

- ``translate``: straight line at ``speed`` in a random direction, bouncing off the borders
  (a pan of one object: the block motion a codec's motion compensation models best);
- ``rotate_cw`` / ``rotate_ccw``: spins in place, its outline moving at ``speed`` (clockwise
  on screen = rotation angle increasing); a solid circle or ring spins invisibly, as a
  uniform disc does in real video;
- ``grow`` / ``shrink``: zooms about its centre; the size changes exponentially at
  ``speed / size`` per second (the outline first moves at ``speed / 2``), never below
  ``MIN_SCALE`` of the home size, which is the largest (reached at the end of ``grow``, the
  start of ``shrink``), so the object stays inside the frame;
- ``orbit``: its centre circles (radius ``ORBIT_RADIUS``, either sense) at path speed ``speed``
  around the home centre, moved inwards just enough for the circle to fit;
- ``shake``: independent uniform offsets of up to ``speed · SHAKE_SECONDS`` per frame around
  the home centre (a handheld camera's jitter: motion vectors without coherence).

Positions are clamped or bounced so the main object's bounding circle is inside the frame in
every frame. The fill travels, turns and scales with the object (``texture_anchor`` /
``texture_spin`` in ``lmgen.datasets.render``). The background and the distractors are
static and every frame reuses the scene's noise seed, so the grain is identical from frame
to frame: P-frames of a codec have real work (the moving object and what it uncovers) but
never re-code noise. ``attributes(i)`` holds the scene, the motion with its parameters and
the main object's centre, size and rotation in every frame (``"trajectory"``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from lmgen.datasets.base import check_clip, short_hash
from lmgen.datasets.render import Scene, ShapeObject, render_scene
from lmgen.datasets.shapes import SHAPES_VERSION, SPLIT_IDS, SceneParams, ShapesConfig, ShapesDataset, sample_scene

MOVING_SHAPES_VERSION = 1
MOTIONS: tuple[str, ...] = ("translate", "rotate_cw", "rotate_ccw", "grow", "shrink", "orbit", "shake")
MOVE_SALT = 0x4D4F5645  # "MOVE": the 4th word of every clip's seed
SPEED = (0.04, 0.12)  # outline speed range, fraction of the side per second: ~1 px/frame at 32 px, 3 fps
MIN_SCALE = 0.4  # grow/shrink: smallest size, as a fraction of the home size
# The main object is at most 0.7 of the side, leaving >= 0.3 of room: any radius here fits.
ORBIT_RADIUS = (0.08, 0.15)
SHAKE_SECONDS = 0.5  # shake amplitude = speed x this


@dataclass
class MovingShapesConfig(ShapesConfig):
    """``data`` block of ``moving_shapes``: the ``shapes`` scene knobs, then the clips and the motion."""

    name: str = "moving_shapes"
    frames: int = 8  # frames per clip (AVC-LM: 15)
    fps: float = 3.0  # AVC-LM: 3
    # outline speed, fraction of the image side per second, uniform per clip:
    # ~1 px per frame at 32 px and 3 fps; the same clip at any image_size
    min_speed: float = SPEED[0]
    max_speed: float = SPEED[1]

    RANGES: ClassVar[dict[str, str]] = ShapesConfig.RANGES

    def check(self) -> None:
        super().check()
        check_clip(self.frames, self.fps, self.name)
        check_speed(self.min_speed, self.max_speed)


def check_speed(low: float, high: float) -> None:
    """ValueError naming ``data.min_speed``/``data.max_speed`` unless 0 <= low <= high and high > 0."""
    if not 0.0 <= low <= high or high <= 0.0:
        raise ValueError(f"data: need 0 <= min_speed <= max_speed and max_speed > 0 for 'moving_shapes', "
                         f"got {low}, {high}")


@dataclass(frozen=True)
class Clip:
    """Everything that determines one clip (no pixels).

    ``scene``: background, distractors and the main object at its home pose (last object);
    ``motion``: a name from ``MOTIONS``; ``params``: ``speed`` and the motion's own draws;
    ``main``: the main object in each frame, (frames,) ``ShapeObject``s.
    """

    scene: Scene
    motion: str
    params: dict[str, float]
    main: tuple[ShapeObject, ...]

    def frame_scene(self, t: int) -> Scene:
        """The still scene of frame ``t``: the shared scene with the main object moved."""
        return dataclasses.replace(self.scene, objects=(*self.scene.objects[:-1], self.main[t]))


def _bounce(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``x`` folded into [lo, hi] like a ball bouncing between two walls."""
    span = hi - lo
    if span <= 0:
        return np.full_like(x, lo)
    y = np.mod(x - lo, 2.0 * span)
    return lo + span - np.abs(y - span)


def _trajectory(
    motion: str, obj: ShapeObject, speed: float, u: np.ndarray, jitter: np.ndarray, times: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Per-frame centres (T, 2), scales (T,) and spins (T,) (degrees) of the main object.

    ``u``: 3 uniforms for the motion's own parameters; ``jitter``: (T, 2) uniforms (shake);
    ``times``: (T,) seconds. Also returns the motion's parameters for ``attributes``.
    """
    r = obj.size / 2
    home = np.array(obj.center, dtype=np.float64)
    centres = np.broadcast_to(home, (len(times), 2)).copy()
    scales, spins = np.ones(len(times)), np.zeros(len(times))
    params: dict[str, float] = {"speed": speed}
    if motion == "translate":
        angle = 360.0 * float(u[0])
        velocity = speed * np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
        centres = _bounce(home + times[:, None] * velocity, r, 1.0 - r)
        params["direction"] = angle
    elif motion in ("rotate_cw", "rotate_ccw"):
        rate = math.degrees(speed / r) * (1.0 if motion == "rotate_cw" else -1.0)
        spins = rate * times
        params["degrees_per_second"] = rate
    elif motion in ("grow", "shrink"):
        rate = speed / obj.size
        elapsed = times[-1] - times if motion == "grow" else times
        scales = np.maximum(MIN_SCALE, np.exp(-rate * elapsed))
        params["log_scale_per_second"] = rate if motion == "grow" else -rate
    elif motion == "orbit":
        radius = ORBIT_RADIUS[0] + (ORBIT_RADIUS[1] - ORBIT_RADIUS[0]) * float(u[1])
        centre = np.clip(home, r + radius, 1.0 - r - radius)
        sense = 1.0 if u[2] < 0.5 else -1.0
        phase = math.radians(360.0 * float(u[0])) + sense * (speed / radius) * times
        centres = centre + radius * np.stack([np.cos(phase), np.sin(phase)], axis=1)
        params.update(radius=radius, centre_x=float(centre[0]), centre_y=float(centre[1]),
                      start_degrees=360.0 * float(u[0]), degrees_per_second=math.degrees(sense * speed / radius))
    elif motion == "shake":
        amplitude = speed * SHAKE_SECONDS
        centres = np.clip(home + amplitude * (2.0 * jitter - 1.0), r, 1.0 - r)
        params["amplitude"] = amplitude
    else:
        raise ValueError(f"moving_shapes: unknown motion {motion!r}; valid: {MOTIONS}")
    return centres, scales, spins, params


def _moved(obj: ShapeObject, centre: np.ndarray, scale: float, spin: float) -> ShapeObject:
    """``obj`` at ``centre``, scaled and spun, carrying its fill (anchored at its centre)."""
    cx, cy = float(centre[0]), float(centre[1])
    return dataclasses.replace(
        obj,
        center=(cx, cy),
        size=obj.size * scale,
        rotation=(obj.rotation + spin) % 360.0,
        texture_period=obj.texture_period * scale,
        texture_anchor=(cx, cy),
        texture_spin=spin,
    )


class MovingShapesDataset(torch.utils.data.Dataset):
    """Procedural long-tailed clips; items are ``(uint8 (frames, 3, H, W) in [0, 255], label)``.

    See the module docstring for the recipe. ``size`` clips per split, ``frames`` frames per
    clip at ``fps``; ``speed`` is the (lo, hi) outline-speed range in sides per second;
    ``scene`` the knobs shared with ``shapes``.
    """

    Config = MovingShapesConfig
    video = True  # clips of data.frames frames
    procedural = True  # generated, so no data.root, and both split sizes > 0

    def __init__(
        self,
        split: str,
        size: int,
        seed: int,
        image_size: int = 32,
        frames: int = 8,
        fps: float = 3.0,
        speed: tuple[float, float] = SPEED,
        scene: SceneParams | None = None,
    ) -> None:
        scene = scene or SceneParams()
        try:  # the still twin checks the shared knobs and holds the Zipf label prior
            self.still = ShapesDataset(split, size, seed, image_size, scene)
        except ValueError as err:
            raise ValueError(str(err).replace("shapes:", "moving_shapes:", 1).replace("'shapes'", "'moving_shapes'")) from None
        check_clip(frames, fps, "moving_shapes")
        lo, hi = (float(s) for s in speed)
        check_speed(lo, hi)
        self.split, self.size, self.seed, self.image_size = split, int(size), int(seed), int(image_size)
        self.frames, self.fps, self.speed, self.scene_params = int(frames), float(fps), (lo, hi), scene
        self.num_classes = self.still.num_classes
        self.class_names: list[str] = self.still.class_names
        self.class_probs: Tensor = self.still.class_probs  # float64 (num_classes,)
        self._labels: Tensor | None = None
        self._motions: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: MovingShapesConfig, split: str) -> MovingShapesDataset:
        """The ``split`` of the dataset a ``data`` block describes (``{split}_size`` clips)."""
        return cls(split=split, size=getattr(cfg, f"{split}_size"), seed=cfg.seed, image_size=cfg.image_size,
                   frames=cfg.frames, fps=cfg.fps, speed=(cfg.min_speed, cfg.max_speed),
                   scene=SceneParams.from_config(cfg))

    def __len__(self) -> int:
        return self.size

    def _check_index(self, index: int) -> int:
        if not -self.size <= index < self.size:
            raise IndexError(f"moving_shapes {self.split}: index {index} out of range for size {self.size}")
        return index % self.size

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_IDS[self.split], index, MOVE_SALT])

    def clip(self, index: int) -> Clip:
        """The full description of clip ``index`` (no pixels rendered)."""
        rng = self._rng(self._check_index(index))
        label = self.still.draw_label(rng)
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        scene = sample_scene(rng, label, self.scene_params)
        speed_u, *u = rng.random(4)
        jitter = rng.random((self.frames, 2))
        speed = self.speed[0] + (self.speed[1] - self.speed[0]) * float(speed_u)
        times = np.arange(self.frames, dtype=np.float64) / self.fps
        home = scene.objects[-1]
        centres, scales, spins, params = _trajectory(motion, home, speed, np.array(u), jitter, times)
        main = tuple(_moved(home, centres[t], float(scales[t]), float(spins[t])) for t in range(self.frames))
        return Clip(scene=scene, motion=motion, params=params, main=main)

    def _image(self, clip: Clip, t: int) -> np.ndarray:
        return render_scene(clip.frame_scene(t), self.image_size)  # (H, W, 3) uint8

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        clip = self.clip(index)
        video = np.stack([self._image(clip, t) for t in range(self.frames)])  # (T, H, W, 3)
        return torch.from_numpy(np.ascontiguousarray(video.transpose(0, 3, 1, 2))), clip.scene.label

    def frame(self, index: int, t: int) -> tuple[Tensor, int]:
        """Frame ``t`` of clip ``index``: ``(uint8 (3, H, W), label)``; renders that frame only."""
        if not -self.frames <= t < self.frames:
            raise IndexError(f"moving_shapes: frame {t} out of range for {self.frames} frames")
        clip = self.clip(index)
        image = self._image(clip, t % self.frames)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), clip.scene.label

    def labels(self) -> Tensor:
        """All labels, int64 (N,); draws only the label of each clip (no rendering), cached."""
        if self._labels is None:
            self._labels = torch.tensor([self.still.draw_label(self._rng(i)) for i in range(self.size)], dtype=torch.int64)
        return self._labels

    def motions(self) -> Tensor:
        """All motions as indices into ``MOTIONS``, int64 (N,); no rendering, cached."""
        if self._motions is None:
            out = []
            for i in range(self.size):
                rng = self._rng(i)
                rng.random()  # the label's draw
                out.append(int(rng.integers(len(MOTIONS))))
            self._motions = torch.tensor(out, dtype=torch.int64)
        return self._motions

    def class_counts(self) -> Tensor:
        """Clips per class in this split, int64 (num_classes,)."""
        return torch.bincount(self.labels(), minlength=self.num_classes)

    def attributes(self, index: int) -> dict[str, Any]:
        """JSON-serialisable clip description: the scene (main object at its home pose), the
        motion with its parameters, and the main object's geometry per frame (``trajectory``)."""
        clip = self.clip(index)
        out = dataclasses.asdict(clip.scene)
        out.update(
            index=self._check_index(index),
            motion=clip.motion,
            motion_id=MOTIONS.index(clip.motion),
            motion_params=clip.params,
            fps=self.fps,
            trajectory=[{"center": o.center, "size": o.size, "rotation": o.rotation} for o in clip.main],
        )
        # round-trip so tuples become lists: what a consumer gets back from a JSON file
        return json.loads(json.dumps(out))

    def fingerprint(self) -> str:
        """Short stable hash of the generation parameters and both recipe versions."""
        return short_hash(
            {
                "dataset": "moving_shapes",
                "version": MOVING_SHAPES_VERSION,
                "shapes_version": SHAPES_VERSION,
                "split": self.split,
                "size": self.size,
                "seed": self.seed,
                "image_size": self.image_size,
                "frames": self.frames,
                "fps": self.fps,
                "speed": list(self.speed),
                "scene": self.scene_params.hashed(),
            }
        )
