"""MLflow → pandas: the one loader every figure and table reads (STYLE.md rule 15).

``load_runs(name)`` returns one row per FINISHED LM run of an experiment or sweep: tags as
named columns, every metric under its MLflow key (``gen/fd_probe``), every setting of the run's
resolved config (its ``config.yaml``, flattened: the params show only a curated part of it)
and every param, under dotted keys, as Python values (``lm.size`` → "micro",
``tokenizer.codebook_size`` → 1024, ``resolved.steps`` → 150), and the columns the figures
group by:

- ``tokenizer``: the family (the registry name: jpeg, vq, lfq, ...);
- ``tokenizer_label``: the preset-style name the tokenizer's config gives itself
  (``vq 1k f4``, ``jpeg q25``), so two VQ presets are two series;
- ``lm_size``, ``lm_params``, ``lm_flops`` (training FLOPs), ``seed``;
- ``arm``, ``arm_tokenizer``, ``arm_context``: what a run is a replicate of. Runs that differ
  only in their seeds (``SEED_COLUMNS``: the LM's ``seed``, the tokenizer's ``stage1.seed`` /
  ``tokenizer.seed``) share an arm; ``arm_tokenizer`` is the tokenizer preset
  (``preset.tokenizer``, tag ``lmgen.tokenizer_preset``) or else ``tokenizer_label``, and
  ``arm_context`` the LM size plus ``key=value`` for any other param that varies between runs
  of one tokenizer and size (``assign_arms``).

``lmgen eval`` re-scorings (``lmgen.stage=eval`` runs) are folded into the run they
re-score: the one with the most samples supplies every ``gen/*`` metric and its run id is
in ``scored_by``. ``load_histories`` gives metric curves, ``load_table``/``load_images``
the per-run CSV and PNG artifacts, all as tidy frames keyed by ``run_id``.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from lmgen.config import flatten
from lmgen.llama import LLAMA_SIZES
from lmgen.tokenizers import TOKENIZERS
from lmgen.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs and reports

# Columns that identify a run in every tidy frame (histories, tables, images).
ID_COLUMNS = ["run_id", "run_name", "tokenizer", "tokenizer_label", "lm_size", "lm_params", "seed", "arm"]
# Params that seed a run: runs differing only in these are replicates of one arm. The LM's
# seed, and the tokenizer's stage-1 seed (``stage1.seed``; a learned tokenizer's resolved
# block also carries it as ``tokenizer.seed``).
SEED_COLUMNS = ("seed", "stage1.seed", "tokenizer.seed")
# Params that say where a run was logged or how a metric was computed, not what was compared.
# ``resolved.*`` (what a run's budget came to) follows from its config: never an arm of its own;
# ``eval.*`` names the feature spaces its metrics were computed in (older runs: ``gen.*``, ``tok.*``).
_NOT_ARM_PREFIXES = ("tracking.", "eval.", "gen.", "gen/", "tok.", "tok/", "sweep.", "metrics.bootstrap", "resolved.")
_TAGS = {"lmgen.stage": "stage", "lmgen.sweep": "sweep", "lmgen.tokenizer": "tokenizer",
         "lmgen.tokenizer_hash": "tokenizer_hash", "lmgen.config_hash": "config_hash",
         "lmgen.git_sha": "git_sha", "mlflow.parentRunId": "parent_run_id", "lmgen.eval_of": "eval_of",
         "lmgen.tokenizer_preset": "tokenizer_preset"}
# Columns the loader makes itself: never params, so never part of an arm's identity.
_DERIVED = {"run_id", "run_name", "status", "start_time", *_TAGS.values(), "tokenizer_label", "lm_size",
            "lm_params", "lm_flops", "scored_by", "arm", "arm_tokenizer", "arm_context"}


def parse_param(value: str) -> Any:
    """An MLflow param string back to the value it was logged from: "1024" → 1024,
    "True" → True, "None" → None, "[0.25, 0.5]" → [0.25, 0.5]; anything else stays a string."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return value


def tokenizer_label(params: dict[str, Any]) -> str:
    """The tokenizer's own short name for its config (``vq 1k f4``), from a run's parsed params.

    Fields the run did not log keep their defaults; a run from an older schema that cannot
    build its config falls back to the family name.
    """
    name = params.get("tokenizer.name")
    if name not in TOKENIZERS:
        return str(name)
    config_cls = TOKENIZERS[name].Config
    valid = {f.name for f in dataclasses.fields(config_cls)}
    fields = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("tokenizer.")}
    try:
        return config_cls(**{k: v for k, v in fields.items() if k in valid}).label()
    except (TypeError, ValueError, AttributeError):
        return str(name)


def _client(tracking_uri: str | None) -> MlflowClient:
    return MlflowClient(resolve_tracking_uri(tracking_uri))


def _search(client: MlflowClient, name: str, where: str = "") -> list:
    """Every run of experiment ``name``, or, failing that, of sweep ``name`` in any experiment;
    ``where`` narrows the search (an MLflow filter clause)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        ids, query = [experiment.experiment_id], where
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
        query = " and ".join(filter(None, [f"tags.`lmgen.sweep` = '{name}'", where]))
    runs, token = [], None
    while True:
        page = client.search_runs(ids, query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def run_config(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """Run ``run_id``'s resolved config (its ``config.yaml``) flattened to dotted keys; {} for a
    run without one (logged by other code)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tree = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text())
    except (OSError, MlflowException, yaml.YAMLError):
        return {}
    return flatten(tree) if isinstance(tree, dict) else {}


def _row(run, config: dict[str, Any]) -> dict[str, Any]:
    """A run's row: ``config`` (``run_config``) under its params, tags, metrics and the derived columns."""
    params = {**config, **{k: parse_param(v) for k, v in run.data.params.items()}}
    row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name,
                           "status": run.info.status, "start_time": run.info.start_time}
    row.update({column: run.data.tags.get(tag) for tag, column in _TAGS.items()})
    row.update(params)
    row.update(run.data.metrics)
    row["tokenizer"] = row["tokenizer"] or params.get("tokenizer.name")
    row["tokenizer_label"] = tokenizer_label(params)
    row["tokenizer_preset"] = params.get("preset.tokenizer") or row["tokenizer_preset"]
    row["lm_size"] = params.get("lm.size")
    row["seed"] = params.get("seed")
    row["lm_params"] = run.data.metrics.get("lm/params")
    row["lm_flops"] = run.data.metrics.get("lm/flops")
    return row


# How a model is sampled: a re-scoring that changed any of these is another experiment, not the run's score.
SAMPLING_KEYS = ("sample.temperature", "sample.top_k", "sample.top_p", "sample.cfg_scale", "sample.cfg_schedule")


def _same_sampling(evals: pd.DataFrame, lm: pd.DataFrame) -> pd.Series:
    """Per eval row: True unless it logged a ``SAMPLING_KEYS`` value that differs from its run's."""
    runs = lm.set_index("run_id")
    keep = pd.Series(True, index=evals.index)
    for i, row in evals.iterrows():
        if row["eval_of"] not in runs.index:
            continue
        mine = runs.loc[row["eval_of"]]
        for key in SAMPLING_KEYS:
            if key in row and key in mine and not pd.isna(row[key]) and not pd.isna(mine[key]):
                keep[i] &= _equal(row[key], mine[key])
    return keep


def _equal(a: Any, b: Any) -> bool:
    """Param values equal as numbers where both are numbers ("1" and 1.0), else as text."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return _key(a) == _key(b)


def _fold_rescorings(lm: pd.DataFrame, evals: pd.DataFrame) -> pd.DataFrame:
    """gen/* of each LM run from its ``lmgen eval`` re-scoring with the most samples, if any, among
    those that sampled it as it was sampled (``SAMPLING_KEYS``): an eval at another temperature or
    guidance scale measured something else, and its numbers must not be read as the run's."""
    lm = lm.copy()
    lm["scored_by"] = lm["run_id"]
    if evals.empty:
        return lm
    same = _same_sampling(evals, lm)
    if not same.all():
        log.info("%d lmgen eval re-scoring(s) with other sampling settings left out of the run table", int((~same).sum()))
    evals = evals[same]
    if evals.empty:
        return lm
    evals = evals.assign(_n=evals.get("gen/num_samples", pd.Series(float("nan"), index=evals.index)))
    evals = evals.sort_values(["_n", "start_time"], ascending=False, na_position="last").drop(columns="_n")
    best = evals.drop_duplicates("eval_of").set_index("eval_of")
    gen_columns = [c for c in evals.columns if c.startswith("gen/")]
    for i, run_id in lm["run_id"].items():
        if run_id in best.index:
            lm.loc[i, gen_columns] = best.loc[run_id, gen_columns].to_numpy()
            lm.loc[i, "scored_by"] = best.loc[run_id, "run_id"]
    return lm


def _sort(df: pd.DataFrame) -> pd.DataFrame:
    """Registry order of tokenizer families, then vocabulary and tokens per image (small →
    large), label, LM size (small → large), seed, name: a stable order for every table."""
    families = {name: i for i, name in enumerate(TOKENIZERS)}
    sizes = {name: i for i, name in enumerate(LLAMA_SIZES)}
    number = lambda column: df[column].astype(float).fillna(-1.0) if column in df else 0.0  # noqa: E731
    keys = pd.DataFrame({"family": df["tokenizer"].map(lambda t: families.get(t, len(families))),
                         "name": df["tokenizer"].astype(str), "vocab": number("tok/vocab_size"),
                         "tokens": number("tok/tokens_per_image"), "label": df["tokenizer_label"].astype(str),
                         "size": df["lm_size"].map(lambda s: sizes.get(s, len(sizes))),
                         "seed": df["seed"].astype(str), "run": df["run_name"].astype(str),
                         "id": df["run_id"]}, index=df.index)
    return df.loc[keys.sort_values(list(keys.columns)).index].reset_index(drop=True)


def load_runs(name: str, tracking_uri: str | None = None, *, statuses: Iterable[str] = ("FINISHED",)) -> pd.DataFrame:
    """One row per LM run of experiment (or sweep) ``name`` whose status is in ``statuses``.

    When one config (``config_hash``) has several such runs, only the newest is kept. Empty
    frame (with the id columns) when there are none; ValueError when ``name`` matches nothing.
    """
    client = _client(tracking_uri)
    runs = _search(client, name)
    if not runs:
        raise ValueError(f"no MLflow experiment or sweep named {name!r} at {resolve_tracking_uri(tracking_uri)}")
    statuses = set(statuses)
    configs = {r.info.run_id: run_config(client, r.info.run_id) for r in runs
               if r.data.tags.get("lmgen.stage") == "lm" and r.info.status in statuses}
    rows = pd.DataFrame([_row(r, configs.get(r.info.run_id, {})) for r in runs])
    lm = rows[(rows["stage"] == "lm") & rows["status"].isin(statuses)]
    evals = rows[(rows["stage"] == "eval") & (rows["status"] == "FINISHED")]
    if lm.empty:
        return pd.DataFrame(columns=[*ID_COLUMNS, "lm_flops", "scored_by", "arm_tokenizer", "arm_context"])
    lm = lm.sort_values("start_time", ascending=False).drop_duplicates("config_hash")
    lm = _fold_rescorings(lm.dropna(axis=1, how="all"), evals)
    params = sorted(({k for r in runs for k in r.data.params} | {k for c in configs.values() for k in c}) & set(lm.columns))
    # Nullable dtypes keep a param's type where some runs lack it (codebook_size: Int64, not float).
    lm[params] = lm[params].convert_dtypes(convert_string=False, convert_floating=False)
    return assign_arms(_sort(lm), params)


def _arm_params(runs: pd.DataFrame, params: Iterable[str] | None) -> list[str]:
    """The param columns that make an arm: every logged param but seeds and bookkeeping.
    ``params`` None: columns that look like params (no "/" of a metric key, not derived)."""
    names = [c for c in runs.columns if "/" not in c and c not in _DERIVED] if params is None else list(params)
    return [c for c in names if c in runs.columns and c not in SEED_COLUMNS and not c.startswith(_NOT_ARM_PREFIXES)]


def _key(value: Any) -> str:
    """A hashable, printable stand-in for a param value (lists, NA) to group on."""
    return "–" if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) else str(value)


def assign_arms(runs: pd.DataFrame, params: Iterable[str] | None = None) -> pd.DataFrame:
    """``runs`` with ``arm_tokenizer``, ``arm_context`` and ``arm`` (``"vq_1k · micro"``) columns.

    Two runs share an arm when every param in ``params`` (default: the columns that look like
    params) but the ``SEED_COLUMNS`` and bookkeeping (``tracking.*``, metric settings) is equal.
    The label is the tokenizer preset (else — no preset, or one overridden into several
    tokenizers — ``tokenizer_label``) and the LM size, plus
    ``key=value`` for each param that still varies between arms of one preset and size, so
    two arms never share a label.
    """
    runs = runs.copy()
    preset = runs["tokenizer_preset"] if "tokenizer_preset" in runs else pd.Series(None, index=runs.index)
    # a preset overridden into several tokenizers (vq_1k at codebook 32 and 64) is named by its labels
    labels_per_preset = runs["tokenizer_label"].groupby(preset.map(_key)).transform("nunique")
    runs["arm_tokenizer"] = [str(p) if isinstance(p, str) and p and n == 1 else str(label)
                             for p, label, n in zip(preset, runs["tokenizer_label"], labels_per_preset)]
    columns = _arm_params(runs, params)
    keys = pd.DataFrame({c: runs[c].map(_key) for c in columns}, index=runs.index)
    base = runs["arm_tokenizer"] + "\x00" + runs["lm_size"].map(_key)
    varying = [c for c in columns if (keys[c].groupby(base).nunique() > 1).any()]
    context = runs["lm_size"].map(_key)
    for c in varying:
        context = context + f", {c}=" + keys[c]
    runs["arm_context"] = context
    runs["arm"] = runs["arm_tokenizer"] + " · " + context
    return runs


def _ids(runs: pd.DataFrame) -> pd.DataFrame:
    """The ``ID_COLUMNS`` of ``runs`` (``arm`` assigned where a frame does not have it yet)."""
    return (runs if "arm" in runs else assign_arms(runs))[ID_COLUMNS]


def load_histories(runs: pd.DataFrame, keys: Iterable[str], tracking_uri: str | None = None) -> pd.DataFrame:
    """Tidy metric curves: one row per (run, key, step) with the runs' ``ID_COLUMNS``."""
    client = _client(tracking_uri)
    rows = []
    for run in _ids(runs).itertuples(index=False):
        for key in keys:
            for m in client.get_metric_history(run.run_id, key):
                rows.append({**run._asdict(), "key": key, "step": m.step, "value": m.value})
    frame = pd.DataFrame(rows, columns=[*ID_COLUMNS, "key", "step", "value"])
    order = {run_id: i for i, run_id in enumerate(runs["run_id"])}  # keep the runs' order
    frame["_order"] = frame["run_id"].map(order)
    return frame.sort_values(["_order", "key", "step"], kind="stable").drop(columns="_order").reset_index(drop=True)


def _download(client: MlflowClient, run_id: str, path: str, into: Path) -> Path | None:
    """The artifact ``path`` of ``run_id`` as a local file, or None when the run has none."""
    parent = str(Path(path).parent) if Path(path).parent != Path(".") else None
    if path not in {a.path for a in client.list_artifacts(run_id, parent)}:
        return None
    return Path(client.download_artifacts(run_id, path, str(into)))


def load_table(runs: pd.DataFrame, path: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """The CSV artifact ``path`` of every run, stacked, with the runs' ``ID_COLUMNS``."""
    client, frames = _client(tracking_uri), []
    with tempfile.TemporaryDirectory() as tmp:
        for run in _ids(runs).itertuples(index=False):
            local = _download(client, run.run_id, path, Path(tmp) / run.run_id)
            if local is None:
                continue
            table = pd.read_csv(local)
            for column, value in run._asdict().items():
                table[column] = value
            frames.append(table)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ID_COLUMNS)


def load_images(runs: pd.DataFrame, path: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """The PNG artifact ``path`` of every run as an ``image`` column of (H, W, 3) uint8 arrays."""
    client, rows = _client(tracking_uri), []
    with tempfile.TemporaryDirectory() as tmp:
        for run in _ids(runs).itertuples(index=False):
            local = _download(client, run.run_id, path, Path(tmp) / run.run_id)
            if local is not None:
                rows.append({**run._asdict(), "image": np.asarray(Image.open(local).convert("RGB"))})
    return pd.DataFrame(rows, columns=[*ID_COLUMNS, "image"])


def sweep_parent(name: str, tracking_uri: str | None = None) -> str | None:
    """The newest parent run of sweep ``name`` (``lmgen.stage=sweep``), where figures are logged."""
    client = _client(tracking_uri)
    parents = _search(client, name, "tags.`lmgen.stage` = 'sweep'")
    return max(parents, key=lambda r: r.info.start_time).info.run_id if parents else None
