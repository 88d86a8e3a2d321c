"""How a run reads in the MLflow UI: its name, params, description, dataset and source.

The runs table and a run's page show a handful of fields; lmgen fills them so that a sweep
reads without opening every run (DESIGN.md §5):

- **Name** (``display_name``): what varies first — the tokenizer preset (or family), the LM
  size and the seed, ``vq_1k · micro · s0`` — then a sweep point's other axes
  (``jpeg_q25 · nano · s0 · quality=10, restart_markers=false``). A name only shows a run:
  identity is the tag ``lmgen.config_hash``.
- **Params** (``lm_params``, ``stage1_params``): what a researcher filters by, each setting
  once, dotted keys; the whole resolved config is the run's ``config.yaml``.
- **Description** (tag ``mlflow.note.content``, the Description column): what the run is, with
  links to its stage-1 run, its sweep and the runs of its tokenizer, and the headline results
  once it has finished (``lm_description``, ``stage1_description``, ``sweep_description``).
- **Dataset** (``dataset_inputs``, the Dataset column): the train and val splits, named as
  the data preset, each with its fingerprint (the one lmgen keys its caches by) as digest.
- **Source** (``Filing.tags``, the Source column): ``lmgen run <experiment>`` or ``lmgen sweep
  <sweep>``; ``Tracker.start_run`` adds the git commit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag

from lmgen.config import ExperimentConfig, flatten, to_dict
from lmgen.tokenizers.learned import Stage1Config
from lmgen.tracking import MODEL_TRAINING_VIEW, TAG_VALUE_LIMIT

PARAM_BUDGET = 40  # params of an LM run: a runs table a researcher can read (test_e2e checks it)
# What an LM run is filed under, besides its tokenizer (``_tokenizer_params``), its sweep axes and
# the ``resolved.*`` budget: the comparison's knobs, and how its samples were drawn and scored.
LM_KEYS = ("preset.tokenizer", "preset.data", "seed", "data.name", "data.image_size", "data.frames", "lm.size",
           "lm.class_conditional", "lm.subcode_embed", "train.budget", "train.batch_size", "train.lr",
           "sample.num_samples", "sample.temperature", "sample.top_k", "sample.top_p", "sample.cfg_scale",
           "sample.cfg_schedule", "metrics.prefix_samples", "metrics.prefix_ratios", "metrics.bootstrap_resamples",
           "metrics.curve_samples")
STAGE1_DATA_KEYS = ("name", "image_size", "frames")
# The columns of a sweep parent's results table (those its points have: ``lmgen.sweep.SUMMARY_METRICS``).
SWEEP_TABLE_KEYS = ("gen/fd_probe", "lm/val_bits_per_image", "gen/decode_valid_rate", "tok/bits_per_image",
                    "tok/psnr", "lm/params")
# The leaves of the lead of a run's name: a sweep axis over one of these adds nothing to it.
LEAD_KEYS = ("seed", "lm.size", "preset.tokenizer", "tokenizer.name")
RECIPE = frozenset(f.name for f in dataclasses.fields(Stage1Config))


@dataclass(frozen=True)
class Filing:
    """Where a run is filed beyond its experiment: the command that made it (the Source column),
    its sweep (tag ``lmgen.sweep``) and the sweep's parent run (``mlflow.parentRunId``), and the
    presets it was composed from (a stage-1 run's name and its Dataset entry)."""

    command: str = "lmgen"
    sweep: str | None = None
    parent_run_id: str | None = None
    tokenizer_preset: str | None = None
    data_preset: str | None = None

    @classmethod
    def for_run(cls, cfg: ExperimentConfig) -> Filing:
        t = cfg.tracking
        command = f"lmgen sweep {t.sweep}" if t.sweep else f"lmgen run {cfg.name}"
        return cls(command, t.sweep, t.parent_run_id, cfg.preset.tokenizer, cfg.preset.data)

    def tags(self) -> dict[str, str]:
        """The MLflow tags this filing gives a new run."""
        tags = {"mlflow.source.name": self.command, "mlflow.source.type": "LOCAL"}
        if self.sweep:
            tags["lmgen.sweep"] = self.sweep
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags


# --- names --------------------------------------------------------------------------------------


def point_labels(point: str) -> list[str]:
    """A sweep point's name split into its labels (``lmgen.sweep.expand``: joined by ``,``
    outside brackets): ``"vq_1k,size=[1,2]"`` → ``["vq_1k", "size=[1,2]"]``."""
    labels, depth, start = [], 0, 0
    for i, char in enumerate(point):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            labels.append(point[start:i])
            start = i + 1
    return [label for label in [*labels, point[start:]] if label]


def axis_keys(label: str, flat: Mapping[str, Any]) -> list[str]:
    """The config keys a ``key=value`` label of a point names (its key, or a leaf of a key);
    one key per distinct value, so a learned tokenizer's copy of a ``stage1.*`` field is not
    named twice (the ``stage1`` key is). Empty for a preset or experiment label."""
    key = label.partition("=")[0] if "=" in label else ""
    if not key:
        return []
    found = [key] if key in flat else [k for k in flat if k.endswith(f".{key}")]
    found.sort(key=lambda k: k.startswith("tokenizer.") and k.removeprefix("tokenizer.") in RECIPE)  # copies last
    seen: set[str] = set()
    keys = []
    for k in found:
        if json.dumps(flat[k], default=str) not in seen:
            seen.add(json.dumps(flat[k], default=str))
            keys.append(k)
    return keys


def display_name(cfg: ExperimentConfig) -> str:
    """The LM run's name in the MLflow UI: ``<preset or tokenizer> · <lm.size> · s<seed>``, then
    the axes of a sweep point (``tracking.run_name``) that the lead does not already say. A run
    outside a sweep given ``tracking.run_name`` is named exactly that."""
    lead = f"{cfg.preset.tokenizer or cfg.tokenizer.name} · {cfg.lm.size} · s{cfg.seed}"
    t = cfg.tracking
    if not t.sweep:
        return t.run_name or lead
    flat = flatten(to_dict(cfg))

    def said(label: str) -> bool:  # by the lead: its preset, or an axis over seed or LM size
        keys = axis_keys(label, flat)
        return label in (cfg.preset.tokenizer, cfg.tokenizer.name) or bool(keys) and set(keys) <= set(LEAD_KEYS)

    extra = [label for label in point_labels(t.run_name or "") if not said(label)]
    return f"{lead} · {', '.join(extra)}" if extra else lead


def stage1_name(tokenizer_cfg: Any, key: str) -> str:
    """A stage-1 run's name: the tokenizer's own short name, then its key (``vq 1k f4 · stage 1 · 3f9a2c``)."""
    label = tokenizer_cfg.label() if hasattr(tokenizer_cfg, "label") else tokenizer_cfg.name
    return f"{label} · stage 1 · {key[:6]}"


# --- params -------------------------------------------------------------------------------------


def _present(value: Any) -> bool:
    return value is not None and value != ""


def _tokenizer_params(cfg: ExperimentConfig, room: int) -> dict[str, Any]:
    """``tokenizer.name``, the family's own fields, and any stage-1 recipe field its block sets
    apart from the experiment's ``stage1`` (a preset's own value); where more than ``room``,
    only the own fields that differ from the family's defaults."""
    block, recipe = to_dict(cfg.tokenizer), to_dict(cfg.stage1)
    own = {k: v for k, v in block.items() if k not in RECIPE and k != "name" and _present(v)}
    tuned = {k: v for k, v in block.items() if k in RECIPE and k in recipe and v != recipe[k]}
    if 1 + len(own) + len(tuned) > room:
        defaults = to_dict(type(cfg.tokenizer)())
        own = {k: v for k, v in own.items() if defaults.get(k) != v}
    return {"tokenizer.name": block["name"], **{f"tokenizer.{k}": v for k, v in {**own, **tuned}.items()}}


def lm_params(cfg: ExperimentConfig, resolved: Mapping[str, Any]) -> dict[str, Any]:
    """An LM run's params: ``LM_KEYS``, the tokenizer's (``_tokenizer_params``), the ``resolved``
    budget (``Budget.params``: steps, images, tokens, FLOPs; precision) and a sweep point's axes.
    About ``PARAM_BUDGET`` of them (a sweep's extra axes may add a few); the evaluation's own
    settings (``eval.*``) follow when it runs."""
    flat = flatten(to_dict(cfg))
    params = {k: flat[k] for k in LM_KEYS if _present(flat.get(k))}
    budget = {k: v for k, v in resolved.items() if k != "resolved.val_every"}  # follows from train.val_*
    params.update(_tokenizer_params(cfg, PARAM_BUDGET - len(params) - len(budget) - 2))  # 2: eval.*
    params.update(budget)
    if cfg.tracking.sweep:
        for label in point_labels(cfg.tracking.run_name or ""):
            params.update({k: flat[k] for k in axis_keys(label, flat) if k not in params})
    return params


def stage1_params(tokenizer_cfg: Any, data_cfg: Any, filing: Filing) -> dict[str, Any]:
    """A stage-1 run's params: its tokenizer block (what the run is), the data it saw, its presets."""
    params = {f"tokenizer.{k}": v for k, v in to_dict(tokenizer_cfg).items() if _present(v)}
    data = to_dict(data_cfg)
    params.update({f"data.{k}": data[k] for k in STAGE1_DATA_KEYS if _present(data.get(k))})
    presets = {"preset.tokenizer": filing.tokenizer_preset, "preset.data": filing.data_preset}
    return {**params, **{k: v for k, v in presets.items() if v}}


def eval_params(context: Mapping[str, str]) -> dict[str, str]:
    """The two settings every fidelity metric of a run shares, as params (the rest of a metric's
    ``FidelityResult.params`` goes to ``<scope>_fidelity.json``): the probe's feature space
    (``eval.probe``) and the Inception weights' (``eval.inception``; "unavailable" offline)."""
    probe = next((v for k, v in context.items() if k.endswith(".probe.space_id")), None)
    inception = next((v for k, v in context.items() if k.endswith(".inception.space_id")), None)
    inception = inception or next((v for k, v in context.items() if k.endswith(".inception.weights")), None)
    return {k: v for k, v in (("eval.probe", probe), ("eval.inception", inception)) if v}


# --- descriptions -------------------------------------------------------------------------------


def run_link(experiment_id: str, run_id: str, text: str) -> str:
    """A markdown link to a run's page, relative to the MLflow UI (works in a run's description),
    in the UI's model-training view (``tracking.runs_table_url``)."""
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW})"


def filter_link(experiment_id: str, search: str, text: str) -> str:
    """A markdown link to the experiment's runs table filtered by ``search`` (an MLflow filter)."""
    query = f"{MODEL_TRAINING_VIEW}&searchFilter={urllib.parse.quote(search, safe='')}"
    return f"[{text}](#/experiments/{experiment_id}/runs?{query})"


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:,.0f}" if value == round(value) and abs(value) >= 1000 else f"{value:.{digits}g}"


def _with_interval(metrics: Mapping[str, float], key: str) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    interval = f" (95% CI {_num(low)}–{_num(high)})" if low is not None and high is not None else ""
    return f"{_num(metrics[key])}{interval}"


def results_line(metrics: Mapping[str, float]) -> str:
    """The headline results of a finished LM run, in one line; "" before it has any."""
    parts = []
    if "lm/val_bits_per_image" in metrics:
        parts.append(f"val {_num(metrics['lm/val_bits_per_image'])} bits/image")
    if "gen/fd_probe" in metrics:
        parts.append(f"FD probe {_with_interval(metrics, 'gen/fd_probe')}")
    if "gen/fid" in metrics:
        parts.append(f"FID {_with_interval(metrics, 'gen/fid')}")
    if "gen/class_accuracy" in metrics:
        parts.append(f"class accuracy {_with_interval(metrics, 'gen/class_accuracy')}")
    if "gen/decode_valid_rate" in metrics:
        parts.append(f"decode-valid {metrics['gen/decode_valid_rate']:.0%}")
    return " · ".join(parts)


def _data_line(cfg_data: Any, preset: str | None, metrics: Mapping[str, float]) -> str:
    frames = getattr(cfg_data, "frames", 0)
    shape = f"{cfg_data.image_size} px" + (f", {frames}-frame clips" if frames else "")
    counts = ""
    if "data/train_items" in metrics:
        counts = f": {_num(metrics['data/train_items'])} train items, {_num(metrics.get('data/skipped', 0.0))} unreadable skipped"
    return f"`{preset or cfg_data.name}` ({cfg_data.name}, {shape}){counts}"


def lm_description(cfg: ExperimentConfig, resolved: Mapping[str, Any], experiment_id: str, stage1_run_id: str,
                   metrics: Mapping[str, float]) -> str:
    """An LM run's description: a one-line summary (the Description column), then the tokenizer
    (with a link to its stage-1 run), data, LM and the resolved budget; the results once
    ``metrics`` has them (stage-1 metrics, ``lm/params``, and the run's own)."""
    tok = cfg.tokenizer
    label = tok.label() if hasattr(tok, "label") else tok.name
    size = f"{cfg.lm.size} ({_num(metrics['lm/params'])} params)" if "lm/params" in metrics else cfg.lm.size
    results = results_line(metrics)
    headline = [f"FD probe {_num(metrics['gen/fd_probe'])}"] if "gen/fd_probe" in metrics else []
    headline += [f"val {_num(metrics['lm/val_bits_per_image'])} bits/image"] if "lm/val_bits_per_image" in metrics else []
    summary = " · ".join([label, size, *headline])  # the Description column shows this line
    rate = ""
    if "tok/tokens_per_image" in metrics:
        rate = (f": {_num(metrics.get('tok/vocab_size'))} ids, {_num(metrics['tok/tokens_per_image'])} tokens/image, "
                f"{_num(metrics.get('tok/bits_per_image'))} bits/image")
    stage1 = run_link(experiment_id, stage1_run_id, "stage-1 run") if stage1_run_id else "stage-1 run unknown"
    preset = f"preset `{cfg.preset.tokenizer}` — " if cfg.preset.tokenizer else ""
    budget = (f"`{cfg.train.budget}` budget → {_num(resolved['resolved.steps'])} steps × batch {cfg.train.batch_size}"
              f" = {_num(resolved['resolved.images'])} images, {_num(resolved['resolved.tokens'])} tokens, "
              f"{_num(resolved['resolved.flops'])} FLOPs")
    conditional = "class-conditional" if cfg.lm.class_conditional else "unconditional"
    lines = [summary, "",
             f"- **Tokenizer**: {preset}{label} (family `{tok.name}`){rate}; {stage1}",
             f"- **Data**: {_data_line(cfg.data, cfg.preset.data, metrics)}",
             f"- **LM**: `{cfg.lm.size}` Llama, {_num(metrics.get('lm/params'))} params, {conditional}, seed {cfg.seed}",
             f"- **Budget**: {budget}",
             f"- **Results**: {results or 'written here when the run finishes'}"]
    if cfg.tracking.sweep:
        lines.append(f"- **Sweep**: `{cfg.tracking.sweep}`, point `{cfg.tracking.run_name}`")
    return "\n".join(lines)


def eval_description(original: Any, checkpoint: str, step: int, cfg: ExperimentConfig) -> str:
    """An ``lmgen eval`` child's description: which run it re-scores (linked), from which
    checkpoint, with how many samples and which seed."""
    info = original.info
    link = run_link(info.experiment_id, info.run_id, info.run_name)
    return (f"`lmgen eval` re-scoring of {link} from {checkpoint} (step {step}): "
            f"{cfg.sample.num_samples} samples, seed {cfg.seed}")


def stage1_description(tokenizer_cfg: Any, data_cfg: Any, filing: Filing, experiment_id: str, run_id: str,
                       metrics: Mapping[str, float]) -> str:
    """A stage-1 run's description: the tokenizer, the data, a link to the LM runs trained on its
    tokens (every run whose tag ``lmgen.tokenizer_run_id`` is this run), and its reconstruction
    and rate once ``metrics`` has them."""
    label = tokenizer_cfg.label() if hasattr(tokenizer_cfg, "label") else tokenizer_cfg.name
    preset = f"preset `{filing.tokenizer_preset}`, " if filing.tokenizer_preset else ""
    users = filter_link(experiment_id, f"tags.`lmgen.tokenizer_run_id` = '{run_id}'", "LM runs on these tokens")
    lines = [f"Stage 1 of {label}" + (f" · PSNR {_num(metrics['tok/psnr'])} dB" if "tok/psnr" in metrics else ""), "",
             f"- **Tokenizer**: {label} ({preset}family `{tokenizer_cfg.name}`); {users}",
             f"- **Data**: {_data_line(data_cfg, filing.data_preset, metrics)}"]
    if "tok/tokens_per_image" in metrics:
        lines.append(f"- **Rate**: {_num(metrics.get('tok/vocab_size'))} ids, {_num(metrics['tok/tokens_per_image'])} "
                     f"tokens/image, {_num(metrics.get('tok/bits_per_image'))} bits/image")
        recon = [f"PSNR {_num(metrics['tok/psnr'])} dB", f"SSIM {_num(metrics.get('tok/ssim'), 3)}"]
        recon += [f"rFD probe {_with_interval(metrics, 'tok/rfid_probe')}"] if "tok/rfid_probe" in metrics else []
        recon += [f"code usage {metrics['tok/codebook_usage']:.0%}"] if "tok/codebook_usage" in metrics else []
        lines.append(f"- **Reconstruction** (val): {' · '.join(recon)}")
    else:
        lines.append("- **Results**: written here when stage 1 ends")
    if filing.sweep:
        lines.append(f"- **Sweep**: `{filing.sweep}` (made by its first point that needed this tokenizer)")
    return "\n".join(lines)


def sweep_description(name: str, path: str, axes: Sequence[str], points: Sequence[str], experiment_id: str,
                      results: Sequence[Any] = ()) -> str:
    """A sweep parent's description: what it varies and its points; once it ends, a table of
    ``results`` (``lmgen.sweep.PointResult``: name, status, run_id, metrics), each point linked
    to its run."""
    lines = [f"Sweep **{name}** over {', '.join(f'`{a}`' for a in sorted(axes)) or 'nothing'}: {len(points)} points", "",
             f"- **File**: `{path}`",
             "- **Runs**: the points' LM runs and the stage-1 tokenizer runs they made are nested under this one",
             f"- **Points**: {', '.join(f'`{p}`' for p in points)}"]
    if results:
        keys = [k for k in SWEEP_TABLE_KEYS if any(k in r.metrics for r in results)]
        lines += ["", "| point | status | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for r in results:
            point = run_link(experiment_id, r.run_id, r.name) if r.run_id else r.name
            lines.append(f"| {point} | {r.status} | " + " | ".join(_num(r.metrics.get(k)) for k in keys) + " |")
    return _fit("\n".join(lines))


def _fit(text: str, limit: int = TAG_VALUE_LIMIT) -> str:
    """``text`` cut to MLflow's limit on a tag value, saying so."""
    return text if len(text) <= limit else text[: limit - 40].rsplit("\n", 1)[0] + "\n\n… (cut: see summary.md)"


# --- datasets -----------------------------------------------------------------------------------


def dataset_inputs(data_cfg: Any, preset: str | None, splits: Mapping[str, Any]) -> list[DatasetInput]:
    """The MLflow dataset inputs of a run: one per split (``{"training": train_ds, ...}``, the
    context MLflow shows), named as the data preset (else the dataset), its ``fingerprint()`` as
    digest (what lmgen keys token caches by), its folder (``data.root``) or, for a generated
    dataset, lmgen's generator as source, and its items and classes as profile."""
    root = getattr(data_cfg, "root", None)
    if root:
        source_type, source = "local", json.dumps({"uri": str(root)})
    else:
        source_type, source = "code", json.dumps({"tags": {"lmgen.dataset": data_cfg.name}})
    inputs = []
    for context, ds in splits.items():
        profile = {"num_rows": len(ds), "num_classes": int(ds.num_classes), "image_size": int(data_cfg.image_size)}
        frames = getattr(data_cfg, "frames", 0)
        if frames:
            profile["frames"] = int(frames)
        entity = Dataset(name=preset or data_cfg.name, digest=ds.fingerprint()[:36], source_type=source_type,
                         source=source, profile=json.dumps(profile))
        inputs.append(DatasetInput(entity, [InputTag("mlflow.data.context", context)]))
    return inputs
