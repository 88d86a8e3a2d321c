"""``lmgen plot``: every figure the runs support, a results table and ``report.md``.

``FIGURES`` lists the figures in report order; each names the tidy frame it draws from
(``RunData``) and is a plain function frame → matplotlib figure that raises
``FigureSkipped`` when the runs cannot support it. Output is deterministic for the same
runs: runs are sorted, PDFs carry no dates and nothing reads a clock.
"""

from __future__ import annotations

import logging
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from analysis import (
    longtail,
    loss_curves,
    position_loss,
    prefix,
    samples,
    scaling,
    token_stats,
    tokens,
    tradeoff,
    vocab,
)
from analysis.runs import load_histories, load_images, load_runs, load_table, sweep_parent
from analysis.style import FigureSkipped, generation_metric, reconstruction_metric
from lmgen.tracking import lmgen_home, resolve_tracking_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FigureSpec:
    name: str  # file stem
    title: str
    source: str  # the RunData field it draws from
    make: Callable[[pd.DataFrame], Figure]


FIGURES = [
    FigureSpec("tradeoff", tradeoff.TITLE, "runs", tradeoff.tradeoff_figure),
    FigureSpec("vocab_scaling", vocab.TITLE, "runs", vocab.vocab_figure),
    FigureSpec("model_scaling", scaling.TITLE, "runs", scaling.scaling_figure),
    FigureSpec("tokens_per_image", tokens.TITLE, "runs", tokens.tokens_figure),
    FigureSpec("loss_curves", loss_curves.TITLE, "histories", loss_curves.loss_curves_figure),
    FigureSpec("token_statistics", token_stats.TITLE, "runs", token_stats.token_stats_figure),
    FigureSpec("position_loss", position_loss.TITLE, "positions", position_loss.position_loss_figure),
    FigureSpec("long_tail", longtail.TITLE, "per_class", longtail.longtail_figure),
    FigureSpec("prefix_completion", prefix.TITLE, "runs", prefix.prefix_figure),
    FigureSpec("samples", samples.TITLE, "samples", samples.samples_figure),
]
FIGURES_BY_NAME = {spec.name: spec for spec in FIGURES}


@dataclass(frozen=True)
class RunData:
    """Everything the figures draw from, as tidy frames keyed by ``run_id``."""

    runs: pd.DataFrame
    histories: pd.DataFrame
    positions: pd.DataFrame
    per_class: pd.DataFrame
    samples: pd.DataFrame


def load_run_data(name: str, tracking_uri: str | None = None) -> RunData:
    """The FINISHED LM runs of experiment or sweep ``name``, their curves and their artifacts."""
    runs = load_runs(name, tracking_uri)
    return RunData(runs=runs,
                   histories=load_histories(runs, loss_curves.KEYS, tracking_uri),
                   positions=load_table(runs, "val_loss_per_position.csv", tracking_uri),
                   per_class=load_table(runs, "per_class.csv", tracking_uri),
                   samples=load_images(runs, "samples.png", tracking_uri))


@dataclass(frozen=True)
class Report:
    out_dir: Path
    written: dict[str, list[Path]] = field(default_factory=dict)  # figure name → files
    skipped: dict[str, str] = field(default_factory=dict)  # figure name → why
    failed: dict[str, str] = field(default_factory=dict)  # figure name → the error (a bug, not the data)

    @property
    def markdown(self) -> Path:
        return self.out_dir / "report.md"


def _fmt(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
            return f"{value:.2e}"
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def results_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The main results: one row per run, the metrics every paper reports, present ones only."""
    columns = {"tokenizer_label": "tokenizer", "lm_size": "LM", "lm/params": "LM params (M)",
               "tok/tokens_per_image": "tokens/img", "tok/bits_per_image": "code bits/img", "tok/psnr": "PSNR dB"}
    short = {"tok/rfid": "rFID", "tok/rfid_probe": "rFD probe", "gen/fid": "gFID", "gen/fd_probe": "FD probe"}
    for pick in (reconstruction_metric, generation_metric):  # the metrics the figures use
        try:
            column, _ = pick(runs)
        except FigureSkipped:
            continue
        columns.setdefault(column, short.get(column, column))  # PSNR is already a column
    columns.update({"lm/val_bits_per_image": "val bits/img", "gen/decode_valid_rate": "valid", "gen/class_accuracy": "class acc",
                    "gen/prefix_r50/fd_probe": "prefix FD r=.5", "lm/flops": "train FLOPs"})
    present = [c for c in columns if c in runs.columns]
    table = runs[present].copy()
    if "lm/params" in table:
        table["lm/params"] = table["lm/params"] / 1e6
    return table.rename(columns=columns)


def markdown_table(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    rows = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def _caption(spec: FigureSpec) -> str:
    module = spec.make.__module__
    doc = sys.modules[module].__doc__ or ""
    return " ".join(doc.split())


def render(data: RunData, out_dir: Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 150) -> Report:
    """Write every supported figure as ``out_dir/<name>.<format>`` and return what was made."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(out_dir)
    for spec in FIGURES:
        try:
            fig = spec.make(getattr(data, spec.source))
        except FigureSkipped as why:
            report.skipped[spec.name] = str(why)
            continue
        except Exception as err:  # a bug in one figure must not cost the others
            log.error("figure %s failed:\n%s", spec.name, traceback.format_exc())
            report.failed[spec.name] = f"{type(err).__name__}: {err}"
            continue
        files = []
        for fmt in formats:
            path = out_dir / f"{spec.name}.{fmt}"
            metadata = {"CreationDate": None, "ModDate": None} if fmt == "pdf" else None
            fig.savefig(path, dpi=dpi, metadata=metadata)
            files.append(path)
        report.written[spec.name] = files
    return report


def write_markdown(report: Report, data: RunData, name: str, tracking_uri: str) -> None:
    """``report.md``: where the runs came from, the results table, each figure, what was skipped."""
    lines = [f"# lmgen report: {name}", "",
             f"{len(data.runs)} finished LM runs of `{name}` (tracking store `{tracking_uri}`). "
             f"Regenerate with `lmgen plot --experiment {name}`.", "", "## Main results", ""]
    lines += [markdown_table(results_table(data.runs)) if len(data.runs) else "No finished LM runs.", ""]
    for spec in FIGURES:
        if spec.name in report.written:
            lines += [f"## {spec.title}", "", f"![{spec.title}]({spec.name}.png)", "", _caption(spec), ""]
    if report.skipped or report.failed:
        lines += ["## Not drawn", ""]
        lines += [f"- **{FIGURES_BY_NAME[n].title}** (`{n}`): {why}" for n, why in report.skipped.items()]
        lines += [f"- **{FIGURES_BY_NAME[n].title}** (`{n}`): failed — {why}" for n, why in report.failed.items()]
        lines.append("")
    report.markdown.write_text("\n".join(lines))



def plot_experiment(name: str, out_dir: Path | None = None, tracking_uri: str | None = None,
                    formats: Sequence[str] = ("png", "pdf"), dpi: int = 150, log_to_mlflow: bool = True) -> Report:
    """Load, render, write ``report.md`` (into ``out_dir``, default ``$LMGEN_HOME/reports/NAME``);
    log it all under ``report/`` of the sweep's parent run."""
    uri = resolve_tracking_uri(tracking_uri)
    data = load_run_data(name, uri)
    report = render(data, Path(out_dir) if out_dir else lmgen_home() / "reports" / name, formats, dpi)
    write_markdown(report, data, name, uri)
    parent = sweep_parent(name, uri) if log_to_mlflow else None
    if parent is not None:
        MlflowClient(uri).log_artifacts(parent, str(report.out_dir), "report")
        log.info("report logged to the sweep's parent run %s (artifacts/report)", parent)
    return report
