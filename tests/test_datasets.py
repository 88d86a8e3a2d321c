"""Contract tests for lmgen.datasets: procedural shapes and on-disk image folders.

The video datasets (moving_shapes, videofolder, frame_view) are in test_video_datasets.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmgen.config import load_config, run_config_hash
from lmgen.datasets import (
    DATASETS,
    ImageBatch,
    ImageDataset,
    ImageFolderDataset,
    ShapesConfig,
    ShapesDataset,
    build_dataset,
    collate_images,
    iter_batches,
)
from lmgen.datasets.render import render_scene
from lmgen.datasets.shapes import CLASS_NAMES, SceneParams, zipf_probs


def block(name: str, **values) -> dict:
    """A ``data`` block for dataset ``name``: the fields its Config has, out of a common set."""
    wanted = {"name": name, "train_size": 256, "val_size": 64, "val_fraction": 0.25, **values}
    return {k: v for k, v in wanted.items() if k in {f.name for f in dataclasses.fields(DATASETS[name].Config)}}


# --- registry ---------------------------------------------------------------------------


def test_registry_builds_every_dataset_and_rejects_unknown(tmp_path: Path) -> None:
    from test_video_datasets import write_video

    _write_tree(tmp_path / "images")
    for k in range(8):  # 4 per class: val_fraction 0.25 leaves one for val
        write_video(tmp_path / "videos" / f"c{k % 2}" / f"v{k}.mp4", seconds=1.0)
    for name, cls in DATASETS.items():
        assert isinstance(cls.video, bool) and isinstance(cls.procedural, bool)
        root = tmp_path / ("videos" if cls.video else "images")
        for split in ("train", "val"):
            ds = build_dataset(block(name, root=str(root), frames=3), split)
            assert isinstance(ds, cls) and isinstance(ds, ImageDataset)
            assert isinstance(ds.frames, int) and isinstance(ds.fps, float)
            assert (ds.frames > 0) == cls.video and (ds.frames == 3 or not cls.video)
            item = next(x for x in map(ds.__getitem__, range(len(ds))) if x is not None)
            assert item[0].shape == ((3,) if cls.video else ()) + (3, 32, 32)
    with pytest.raises(ValueError, match="imagefolder.*shapes"):
        build_dataset({"name": "cifar100"}, "train")
    with pytest.raises(ValueError, match="train.*val"):
        build_dataset(block("shapes"), "test")
    with pytest.raises(ValueError, match="root"):
        build_dataset({"name": "imagefolder"}, "train")
    with pytest.raises(ValueError, match="unknown field.*frames"):  # still images have no frames
        build_dataset({"name": "shapes", "frames": 3}, "train")


def test_build_from_the_datasets_own_config() -> None:
    """Each dataset owns its config (defaults and checks in one place), as tokenizers do."""
    cfg = ShapesConfig(train_size=10, num_classes=12)
    ds = build_dataset(cfg, "train")
    assert len(ds) == 10 and ds.num_classes == 12 and ds.class_names == list(CLASS_NAMES)
    assert build_dataset({"name": "shapes", "train_size": 10, "num_classes": 12}, "train").labels().tolist() == \
        ds.labels().tolist()
    for bad, needle in ((ShapesConfig(num_classes=1), "data.num_classes"), (ShapesConfig(image_size=2), "data.image_size"),
                        (ShapesConfig(train_size=0), "data.train_size"), (ShapesConfig(tail_alpha=float("nan")), "tail_alpha")):
        with pytest.raises(ValueError, match=needle):
            build_dataset(bad, "train")


# --- shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32, 64])
def test_shapes_item_shape_dtype(size: int) -> None:
    ds = ShapesDataset("train", 8, seed=0, image_size=size)
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, size, size) and image.dtype == torch.uint8
        assert isinstance(label, int) and 0 <= label < ds.num_classes


def test_shapes_deterministic_per_seed_split_index() -> None:
    a, b = ShapesDataset("train", 16, seed=3), ShapesDataset("train", 16, seed=3)
    other_seed, val = ShapesDataset("train", 16, seed=4), ShapesDataset("val", 16, seed=3)
    for i in range(len(a)):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
        assert not torch.equal(a[i][0], other_seed[i][0])
        assert not torch.equal(a[i][0], val[i][0])
    # an item does not depend on the split size or on what was rendered before
    assert torch.equal(ShapesDataset("train", 1000, seed=3)[7][0], a[7][0])
    assert a[-1][1] == a[15][1]
    with pytest.raises(IndexError):
        a[16]


def test_shapes_scene_is_resolution_independent() -> None:
    """The same item at 64 px, box-downsampled, matches it at 32 px up to grain and edges."""
    small, large = ShapesDataset("train", 16, seed=0, image_size=32), ShapesDataset("train", 16, seed=0, image_size=64)
    for i in range(len(small)):
        assert small.attributes(i) == large.attributes(i)
        down = torch.nn.functional.avg_pool2d(large[i][0].float()[None], 2)[0]
        assert (small[i][0].float() - down).abs().mean() < 6.0


def test_shapes_labels_match_items_without_rendering() -> None:
    ds = ShapesDataset("val", 64, seed=1)
    labels = ds.labels()
    assert labels.dtype == torch.int64 and labels.shape == (64,)
    assert labels.tolist() == [ds[i][1] for i in range(64)]
    counts = ds.class_counts()
    assert counts.dtype == torch.int64 and counts.shape == (10,) and int(counts.sum()) == 64


def test_shapes_long_tail() -> None:
    probs = zipf_probs(10, 1.5)
    ds = ShapesDataset("train", 20_000, seed=0)
    assert ds.num_classes >= 10 and len(set(ds.class_names)) == ds.num_classes
    assert torch.allclose(ds.class_probs, torch.from_numpy(probs))
    assert abs(float(ds.class_probs.sum()) - 1.0) < 1e-12
    assert torch.all(ds.class_probs[1:] < ds.class_probs[:-1])
    assert float(ds.class_probs.min()) <= 0.02
    freq = ds.class_counts().double() / len(ds)
    # within 5 standard errors of the binomial proportion, class by class
    se = torch.sqrt(ds.class_probs * (1 - ds.class_probs) / len(ds))
    assert torch.all((freq - ds.class_probs).abs() < 5 * se), (freq, ds.class_probs)
    assert float(freq.min()) < 0.025


def test_shapes_images_have_texture_and_colour() -> None:
    ds = ShapesDataset("train", 48, seed=0)
    for i in range(len(ds)):
        image = ds[i][0]
        assert image.float().std() > 10.0
        colours = torch.unique(image.reshape(3, -1).T, dim=0)
        assert len(colours) > 100, f"item {i}: only {len(colours)} colours"


def test_shapes_attributes_describe_the_scene() -> None:
    ds = ShapesDataset("train", 32, seed=0, scene=SceneParams(min_objects=2, max_objects=4))
    textures = set()
    for i in range(len(ds)):
        attrs = ds.attributes(i)
        assert json.loads(json.dumps(attrs)) == attrs
        assert attrs["label"] == ds[i][1] and attrs["class_name"] == ds.class_names[attrs["label"]]
        objects = attrs["objects"]
        assert 2 <= len(objects) <= 4
        main = [o for o in objects if o["role"] == "main"]
        assert len(main) == 1 and main[0]["shape"] == attrs["class_name"]
        assert 0.4 <= main[0]["size"] <= 0.7
        assert all(o["size"] < 0.2 for o in objects if o["role"] == "distractor")
        assert len(attrs["background_colors"]) == 2
        textures.add(main[0]["texture"])
    assert len(textures) >= 4


def test_shapes_fingerprint_stable_and_sensitive() -> None:
    base = dict(split="train", size=100, seed=0, image_size=32)
    fp = ShapesDataset(**base).fingerprint()
    assert fp == ShapesDataset(**base).fingerprint() and len(fp) == 16
    variants = [
        dict(base, split="val"),
        dict(base, size=101),
        dict(base, seed=1),
        dict(base, image_size=64),
        dict(base, scene=SceneParams(num_classes=12)),
        dict(base, scene=SceneParams(tail_alpha=1.0)),
        dict(base, scene=SceneParams(min_objects=1)),
        dict(base, scene=SceneParams(max_objects=6)),
        dict(base, scene=SceneParams(textures=("solid",))),
        dict(base, scene=SceneParams(background="flat")),
        dict(base, scene=SceneParams(color_levels=2)),
        dict(base, scene=SceneParams(max_rotation=0.0)),
    ]
    fps = {ShapesDataset(**v).fingerprint() for v in variants}
    assert len(fps) == len(variants) and fp not in fps
    # the default scene hashes as it did before data.textures/data.background existed: caches stay valid
    assert fp == "448f3fb510aac80c", fp


def test_shapes_plain_scene_is_one_flat_colour_and_one_solid_object() -> None:
    """background=flat, textures=[solid]: the same draws (labels, geometry, colours) as the default
    recipe, used for a flat background without grain and a one-colour object."""
    single = SceneParams(min_objects=1, max_objects=1)
    plain = ShapesDataset("train", 24, seed=0, scene=dataclasses.replace(single, textures=("solid",), background="flat"))
    rich = ShapesDataset("train", 24, seed=0, scene=single)
    assert torch.equal(plain.labels(), rich.labels())
    for i in range(len(plain)):
        p, r = plain.scene(i), rich.scene(i)
        main, main_rich = p.objects[-1], r.objects[-1]
        assert (main.shape, main.center, main.size, main.rotation) == (main_rich.shape, main_rich.center,
                                                                    main_rich.size, main_rich.rotation)
        assert main.texture == "solid" and p.background_noise_std == 0.0
        assert p.background_colors[0] == p.background_colors[1] == r.background_colors[0]
        image = plain[i][0].reshape(3, -1).T  # (H*W, 3)
        # away from the anti-aliased edge every pixel is the background or the object's colour
        near_bg, near_main = ((image - torch.tensor(c)).abs().max(dim=1).values <= 1
                              for c in (p.background_colors[0], main.colors[0]))
        share = (near_bg | near_main).float().mean()
        assert share > 0.85, (i, float(share))
    textures = {ShapesDataset("train", 64, seed=0, scene=SceneParams(textures=("stripes", "checker"))).scene(i).objects[-1].texture
                for i in range(64)}
    assert textures == {"stripes", "checker"}
    eight = ShapesDataset("train", 24, seed=0, scene=dataclasses.replace(single, color_levels=2, background="flat"))
    for i in range(len(eight)):
        scene = eight.scene(i)
        colours = {*scene.background_colors, *scene.objects[-1].colors}
        assert all(v in (0, 255) for c in colours for v in c), colours
        assert scene.objects[-1].colors[0] != scene.background_colors[0]  # still contrasting


def test_shapes_max_rotation_turns_only_the_main_object_by_at_most_that() -> None:
    """max_rotation=0: every class object upright, everything else drawn as before (the same
    uniforms, so labels, sizes, positions and colours are the default recipe's)."""
    turned = ShapesDataset("train", 48, seed=0)
    for limit in (0.0, 30.0):
        ds = ShapesDataset("train", 48, seed=0, scene=SceneParams(max_rotation=limit))
        assert torch.equal(ds.labels(), turned.labels())
        for i in range(len(ds)):
            s, t = ds.scene(i), turned.scene(i)
            main, main_t = s.objects[-1], t.objects[-1]
            assert main.rotation == pytest.approx(main_t.rotation * limit / 360.0)
            assert (main.center, main.size, main.colors) == (main_t.center, main_t.size, main_t.colors)
            assert s.objects[:-1] == t.objects[:-1]  # distractors still turn freely
    # runs logged before the knob existed keep their hash at its default; upright is another point
    base = load_config("experiments/findings.yaml")
    assert run_config_hash(load_config("experiments/findings.yaml", ["data.max_rotation=360"])) == run_config_hash(base)
    assert run_config_hash(load_config("experiments/findings.yaml", ["data.max_rotation=0"])) != run_config_hash(base)
    upright = ShapesDataset("train", 48, seed=0, scene=SceneParams(max_rotation=0.0))
    assert all(upright.scene(i).objects[-1].rotation == 0.0 for i in range(len(upright)))
    assert not torch.equal(upright[0][0], turned[0][0])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(split="test"),
        dict(size=0),
        dict(seed=-1),
        dict(scene=SceneParams(num_classes=13)),
        dict(scene=SceneParams(num_classes=1)),
        dict(scene=SceneParams(min_objects=3, max_objects=2)),
        dict(image_size=2),
        dict(scene=SceneParams(textures=())),
        dict(scene=SceneParams(textures=("solid", "plaid"))),
        dict(scene=SceneParams(textures=("solid", "solid"))),
        dict(scene=SceneParams(background="sky")),
        dict(scene=SceneParams(color_levels=1)),
        dict(scene=SceneParams(max_rotation=-1.0)),
        dict(scene=SceneParams(max_rotation=361.0)),
        dict(scene=SceneParams(color_levels=257)),
    ],
)
def test_shapes_rejects_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ShapesDataset(**{**dict(split="train", size=4, seed=0), **kwargs})


def test_shapes_main_object_is_visible_where_attributes_say() -> None:
    """The class lives in the pixels: the main object contrasts with what is behind it.

    Rendering the same scene without its main object changes exactly the pixels the
    object covers (all randomness is per scene), so the difference image is its silhouette.
    """
    ds = ShapesDataset("train", 64, seed=0)
    contrasts = []
    for i in range(len(ds)):
        scene = ds.scene(i)
        main = scene.objects[-1]
        with_main = render_scene(scene, 32).astype(np.float32)
        without = render_scene(dataclasses.replace(scene, objects=scene.objects[:-1]), 32).astype(np.float32)
        dist = np.linalg.norm(with_main - without, axis=-1)
        changed = dist > 2.0
        yy, xx = (np.mgrid[0:32, 0:32] + 0.5) / 32
        inside = np.hypot(xx - main.center[0], yy - main.center[1]) <= main.size / 2 + 1.5 / 32
        assert changed.mean() > 0.03 and not (changed & ~inside).any(), i
        contrasts.append(float(dist[changed].mean()))
    assert min(contrasts) > 30.0 and float(np.median(contrasts)) > 80.0, sorted(contrasts)[:5]


# --- imagefolder ------------------------------------------------------------------------

GOOD_PER_CLASS = {"cat": 5, "dog": 4, "fish": 3}
BAD_FILES = ("cat/corrupt.jpg", "dog/truncated.jpg", "fish/empty.png")


def _write_tree(root: Path, classes: dict[str, int] = GOOD_PER_CLASS, bad: bool = True) -> list[str]:
    """Write good images (mixed formats, modes, sizes, extension case) and bad files."""
    rng = np.random.default_rng(0)
    written = []
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ext, mode = [(".png", "RGB"), (".JPG", "RGB"), (".Jpeg", "L"), (".png", "RGBA"), (".bmp", "RGB")][k % 5]
            rel = f"{c}/img{k}{ext}"
            im.convert(mode).save(root / rel, format={"png": "PNG", "bmp": "BMP"}.get(ext[1:].lower(), "JPEG"))
            written.append(rel)
        (root / c / "notes.txt").write_text("not an image")
        (root / c / ".hidden.png").write_bytes(b"")
    if bad:
        (root / BAD_FILES[0]).write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
        (root / BAD_FILES[1]).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        (root / BAD_FILES[2]).write_bytes(b"")
        written += list(BAD_FILES)
    return sorted(written)


def test_folder_lists_classes_and_skips_exactly_the_bad_files(tmp_path: Path) -> None:
    written = _write_tree(tmp_path)
    ds = ImageFolderDataset(tmp_path, "train", image_size=16, val_fraction=0.0)
    assert ds.class_names == ["cat", "dog", "fish"] and ds.num_classes == 3
    assert sorted(ds.attributes(i)["path"] for i in range(len(ds))) == written
    assert ds.class_counts().tolist() == [6, 5, 4]  # from the listing: bad files included
    assert ds.labels().tolist() == [ds.attributes(i)["label"] for i in range(len(ds))]
    for num_workers in (0, 2):
        it = iter_batches(ds, batch_size=4, num_workers=num_workers)
        batches = list(it)
        assert it.skipped == 3 and it.seen == len(ds)
        images = torch.cat([b.images for b in batches])
        assert images.shape == (len(ds) - 3, 3, 16, 16) and images.dtype == torch.uint8
        kept = {ds.attributes(i)["path"] for b in batches for i in b.indices.tolist()}
        assert kept == set(written) - set(BAD_FILES)
        assert all(int(ds.labels()[i]) == lab for b in batches for i, lab in zip(b.indices.tolist(), b.labels.tolist()))


def test_folder_bad_file_returns_none_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_tree(tmp_path)
    ds = ImageFolderDataset(tmp_path, "train", image_size=16, val_fraction=0.0)
    index = next(i for i in range(len(ds)) if ds.attributes(i)["path"] == BAD_FILES[1])
    with caplog.at_level(logging.WARNING, logger="lmgen.datasets.folder"):
        assert ds[index] is None and ds[index] is None
    warnings = [r for r in caplog.records if "truncated.jpg" in r.getMessage()]
    assert len(warnings) == 1


def test_folder_center_crop_and_resize(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    x = np.zeros((40, 60, 3), dtype=np.uint8)
    x[:, :10] = (255, 0, 0)
    x[:, 10:50] = (0, 200, 0)
    x[:, 50:] = (0, 0, 255)
    Image.fromarray(x).save(tmp_path / "a" / "wide.png")
    image, label = ImageFolderDataset(tmp_path, "train", image_size=8, val_fraction=0.0)[0]
    assert label == 0 and image.shape == (3, 8, 8)
    assert image[0].max() <= 2 and image[2].max() <= 2 and image[1].min() >= 198


def test_folder_hash_split_is_deterministic_disjoint_and_per_class(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"a": 20, "b": 8}, bad=False)

    def paths(split: str) -> list[str]:
        ds = ImageFolderDataset(tmp_path, split, val_fraction=0.25)
        return [ds.attributes(i)["path"] for i in range(len(ds))]

    train, val = paths("train"), paths("val")
    assert train == paths("train") and val == paths("val")
    assert not set(train) & set(val) and len(train) + len(val) == 28
    assert sum(p.startswith("a/") for p in val) == 5 and sum(p.startswith("b/") for p in val) == 2
    assert ImageFolderDataset(tmp_path, "val", val_fraction=0.25).class_counts().tolist() == [5, 2]


def test_folder_train_val_layout(tmp_path: Path) -> None:
    _write_tree(tmp_path / "train", {"a": 4, "b": 3}, bad=False)
    _write_tree(tmp_path / "val", {"a": 2, "b": 1, "c": 1}, bad=False)
    train = ImageFolderDataset(tmp_path, "train", val_fraction=0.5)
    val = ImageFolderDataset(tmp_path, "val", val_fraction=0.5)
    assert train.class_names == val.class_names == ["a", "b", "c"]
    assert train.class_counts().tolist() == [4, 3, 0] and val.class_counts().tolist() == [2, 1, 1]
    assert all(train.attributes(i)["path"].startswith("train/") for i in range(len(train)))


def test_folder_cap_is_deterministic_subset(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"a": 10, "b": 10}, bad=False)
    full = ImageFolderDataset(tmp_path, "train", val_fraction=0.0)
    capped = [ImageFolderDataset(tmp_path, "train", val_fraction=0.0, max_items=7) for _ in range(2)]
    listed = [[d.attributes(i)["path"] for i in range(len(d))] for d in capped]
    assert len(capped[0]) == 7 and listed[0] == listed[1]
    assert set(listed[0]) <= {full.attributes(i)["path"] for i in range(len(full))}
    cfg = {"name": "imagefolder", "root": str(tmp_path), "train_size": 0, "val_fraction": 0.0}
    assert len(build_dataset(cfg, "train")) == 20


def test_folder_fingerprint_tracks_files_and_settings(tmp_path: Path) -> None:
    written = _write_tree(tmp_path, {"a": 3, "b": 3}, bad=False)
    fp = ImageFolderDataset(tmp_path, "train", val_fraction=0.0).fingerprint()
    assert fp == ImageFolderDataset(tmp_path, "train", val_fraction=0.0).fingerprint()
    assert fp != ImageFolderDataset(tmp_path, "train", image_size=64, val_fraction=0.0).fingerprint()
    st = os.stat(tmp_path / written[0])
    os.utime(tmp_path / written[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fp != ImageFolderDataset(tmp_path, "train", val_fraction=0.0).fingerprint()


def test_folder_empty_roots_raise_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        ImageFolderDataset(tmp_path, "train")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        ImageFolderDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="missing"):
        ImageFolderDataset(tmp_path / "missing", "train")


def test_folder_with_no_readable_image_fails_naming_the_root(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Corrupt, truncated and zero-byte files only: the split fails at construction, naming the
    root, each file warned about; one good image in the split is enough to build it."""
    _write_tree(tmp_path / "val", {"cat": 2}, bad=False)
    for rel in BAD_FILES:
        (tmp_path / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
    _write_tree(tmp_path / "train", {}, bad=True)
    with caplog.at_level(logging.WARNING, logger="lmgen.datasets.folder"), \
            pytest.raises(ValueError, match=f"no readable image in split 'train' of {re.escape(str(tmp_path))}"):
        ImageFolderDataset(tmp_path, "train")
    assert all(any(b in r.getMessage() for r in caplog.records) for b in BAD_FILES)
    assert len(ImageFolderDataset(tmp_path, "val")) == 2  # the other split is fine
    _write_tree(tmp_path / "train", {"dog": 1}, bad=False)
    assert len(ImageFolderDataset(tmp_path, "train")) == 4  # three bad files still listed, skipped on read


def _links_loops_and_fifos(root: Path, outside: Path) -> list[str]:
    """A class tree with two good images per class, and what broke the listing before (a
    traceback, or a hang at the first read): the paths the listing must pass over, sorted."""
    _write_tree(root, {"cat": 2, "dog": 2}, bad=False)
    _write_tree(outside, {"more": 2}, bad=False)
    (root / "cat" / "dangling.jpg").symlink_to(root / "missing.jpg")
    (root / "cat" / "self.png").symlink_to("self.png")  # a link to itself: ELOOP
    (root / "cat" / "gone").symlink_to(root / "nowhere")  # no extension: it may have been a directory
    (root / "cat" / "loop").symlink_to("..")  # back to the root: a directory loop
    (root / "cat" / "here").symlink_to(".")
    os.mkfifo(root / "dog" / "fifo.jpg")  # reading it would block until a writer comes
    (root / "dog" / "ext").symlink_to(outside / "more")  # outside the tree: followed, once
    (root / "dog" / "ext2").symlink_to(outside / "more")
    (outside / "more" / "back").symlink_to(".")  # a loop inside the linked directory
    return sorted(["cat/dangling.jpg", "cat/self.png", "cat/gone", "cat/loop", "cat/here", "dog/fifo.jpg",
                   "dog/ext2", "dog/ext/back"])


@pytest.mark.timeout(60)  # a FIFO opened for reading would hang here
def test_folder_listing_skips_and_counts_links_loops_and_special_files(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Before: a dangling link or a link to itself was a traceback while listing, a directory
    loop recursed until the path was too long, and a FIFO named ``.jpg`` hung the first read.
    Now each is passed over, warned about once with its path and counted (``skipped_files``,
    which stage 1 adds to ``data/skipped``); a directory link outside the tree is followed
    once; without split folders each skipped path counts in exactly one split."""
    root = tmp_path / "root"
    with caplog.at_level(logging.WARNING, logger="lmgen.datasets.folder"):
        skipped = _links_loops_and_fifos(root, tmp_path / "outside")
        ds = ImageFolderDataset(root, "train", image_size=8, val_fraction=0.0)
    assert ds.skipped_files == len(skipped) == 8
    assert sorted(ds.attributes(i)["path"] for i in range(len(ds))) == sorted(
        [f"cat/img{k}{e}" for k, e in ((0, ".png"), (1, ".JPG"))] + [f"dog/img{k}{e}" for k, e in ((0, ".png"), (1, ".JPG"))]
        + ["dog/ext/img0.png", "dog/ext/img1.JPG"])
    assert all(ds[i] is not None for i in range(len(ds)))
    for rel in skipped:
        assert len([r for r in caplog.records if r.getMessage().startswith(f"imagefolder: skipping {root / rel}:")]) == 1
    split = [ImageFolderDataset(root, s, image_size=8, val_fraction=0.5).skipped_files for s in ("train", "val")]
    assert sum(split) == 8 and min(split) > 0
    # A file swapped for a FIFO after listing: None when read, never a hang.
    index = next(i for i in range(len(ds)) if ds.attributes(i)["path"] == "cat/img0.png")
    (root / "cat" / "img0.png").unlink()
    os.mkfifo(root / "cat" / "img0.png")
    assert ds[index] is None


def _png16(path: Path, pixels: np.ndarray) -> None:
    """A real 16-bit PNG (greyscale (H, W) or RGB (H, W, 3) uint16), written chunk by chunk."""
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if pixels.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_folder_16_bit_images_are_scaled_to_8_bits(tmp_path: Path) -> None:
    """Before: a 16-bit greyscale PNG (Pillow mode "I;16") came out clipped at 255, ~99% white.
    Now 16-bit values v become v >> 8: a gradient over 0..65535 is the 8-bit gradient 0..255
    exactly, for greyscale and 48-bit RGB PNGs and a 16-bit PGM (Pillow mode "I") alike."""
    gradient = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257  # 0, 257, ... 65535: k·257 is k in 8 bits
    (tmp_path / "a").mkdir()
    _png16(tmp_path / "a" / "grey.png", gradient)
    _png16(tmp_path / "a" / "rgb.png", np.stack([gradient, gradient[::-1], 65535 - gradient], -1))
    (tmp_path / "a" / "grey.pgm").write_bytes(b"P5 16 16 65535\n" + gradient.astype(">u2").tobytes())
    assert Image.open(tmp_path / "a" / "grey.png").mode == "I;16" and Image.open(tmp_path / "a" / "grey.pgm").mode == "I"
    ds = ImageFolderDataset(tmp_path, "train", image_size=16, val_fraction=0.0)
    images = {ds.attributes(i)["path"]: ds[i][0] for i in range(len(ds))}
    eight = torch.arange(256, dtype=torch.uint8).view(16, 16)
    for name in ("a/grey.png", "a/grey.pgm"):
        assert torch.equal(images[name], eight.expand(3, 16, 16)), name
    assert torch.equal(images["a/rgb.png"], torch.stack([eight, eight.flip(0), 255 - eight]))


def test_collate_drops_and_counts_none() -> None:
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    batch = collate_images([(0, (image, 1)), (1, None), (2, (image + 1, 2))])
    assert isinstance(batch, ImageBatch) and batch.skipped == 1 and len(batch) == 2
    assert batch.indices.tolist() == [0, 2] and batch.labels.tolist() == [1, 2]
    assert batch.images.shape == (2, 3, 4, 4) and batch.images.dtype == torch.uint8
    empty = collate_images([(5, None)])
    assert len(empty) == 0 and empty.skipped == 1


def test_iter_batches_covers_shapes_in_order() -> None:
    ds = ShapesDataset("val", 10, seed=0)
    it = iter_batches(ds, batch_size=4)
    batches = list(it)
    assert [len(b) for b in batches] == [4, 4, 2] and it.skipped == 0 and it.seen == 10
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(10))
    assert torch.equal(batches[1].images[0], ds[4][0])
