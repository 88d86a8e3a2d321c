"""``lmgen plot``: every figure the runs support, a results table, ``report.md`` and ``report.html``.

``FIGURES`` lists the figures in report order; each names the tidy frame it draws from
(``RunData``) and is a plain function frame → matplotlib figure that raises
``FigureSkipped`` when the runs cannot support it. Output is deterministic for the same
runs: runs are sorted, PDFs carry no dates and nothing reads a clock.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from analysis import (
    gen_curves,
    longtail,
    loss_curves,
    page,
    position_loss,
    prefix,
    samples,
    scaling,
    token_stats,
    tokens,
    tradeoff,
    vocab,
)
from analysis.arms import fmt_estimate, markdown_table, summarize, with_arms
from analysis.compare import compare_runs, comparison_table, explanation
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
    FigureSpec("gen_curves", gen_curves.TITLE, "histories", gen_curves.gen_curves_figure),
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
                   histories=load_histories(runs, (*loss_curves.KEYS, *gen_curves.KEYS), tracking_uri),
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

    @property
    def html(self) -> Path:
        return self.out_dir / "report.html"


# Columns that describe an arm rather than measure it: shown as the mean over its runs, no interval.
DESCRIPTORS = {"lm/params", "tok/tokens_per_image", "tok/bits_per_image", "lm/flops"}


def _columns(runs: pd.DataFrame) -> dict[str, str]:
    """metric key → column name of the results table, in order, present ones only."""
    columns = {"lm/params": "LM params (M)", "tok/tokens_per_image": "tokens/img",
               "tok/bits_per_image": "code bits/img", "tok/psnr": "PSNR dB",
               "tok/class_accuracy": "recon class acc"}
    short = {"tok/rfid": "rFID", "tok/rfid_probe": "rFD probe", "gen/fid": "gFID", "gen/fd_probe": "FD probe"}
    for pick in (reconstruction_metric, generation_metric):  # the metrics the figures use
        try:
            column, _ = pick(runs)
        except FigureSkipped:
            continue
        columns.setdefault(column, short.get(column, column))  # PSNR is already a column
        if column in ("gen/fid", "gen/fd_probe"):  # KID, unbiased at small n, beside FD in its feature space
            kid = "gen/kid" if column == "gen/fid" else "gen/kid_probe"
            columns[kid] = "KID" if column == "gen/fid" else "KID probe"
    columns.update({"lm/val_bits_per_image": "val bits/img", "gen/decode_valid_rate": "valid", "gen/class_accuracy": "class acc",
                    "lm/val_label_bits": "label bits/img",
                    "gen/prefix_r50/fd_probe": "prefix FD r=.5", "lm/flops": "train FLOPs"})
    return {k: v for k, v in columns.items() if k in runs.columns}


def results_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The main results, one row per arm (runs that differ only in seed): tokenizer, LM size,
    any other setting that varies, the arm's descriptors (``DESCRIPTORS``: their mean) and
    every metric the papers report as ``mean ± half-width (n)`` (``analysis.arms.fmt_estimate``)."""
    runs = with_arms(runs)
    columns = _columns(runs)
    summaries = summarize(runs, [k for k in columns if k not in DESCRIPTORS])
    groups = dict(tuple(runs.groupby("arm", sort=False)))
    settings = {a.arm: a.context.split(", ", 1)[1] if ", " in a.context else "" for a in summaries}
    rows = []
    for arm in summaries:
        group = groups[arm.arm]
        row = {"tokenizer": arm.tokenizer, "LM": group["lm_size"].iloc[0]}
        if any(settings.values()):
            row["setting"] = settings[arm.arm]
        for key, name in columns.items():
            if key in DESCRIPTORS:
                value = pd.to_numeric(group[key], errors="coerce").mean()
                row[name] = value / 1e6 if key == "lm/params" else value
            else:
                row[name] = fmt_estimate(arm.estimates.get(key))
        rows.append(row)
    return pd.DataFrame(rows)


def results_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """The results table in numbers, for other tools and for documents that cite it (``results.csv``):
    one row per arm and metric with its mean, interval (NaN where none), n and the interval's source
    (``analysis.stats.Estimate``), and the arm's runs."""
    runs = with_arms(runs)
    columns = _columns(runs)
    rows = []
    for arm in summarize(runs, list(columns)):
        group = runs[runs["run_id"].isin(arm.run_ids)]
        for key, name in columns.items():
            if (e := arm.estimates.get(key)) is not None:
                rows.append({"arm": arm.arm, "tokenizer": arm.tokenizer, "lm": group["lm_size"].iloc[0],
                             "metric": key, "column": name, "mean": e.mean, "low": e.low, "high": e.high, "n": e.n,
                             "interval": e.source, "runs": " ".join(arm.run_ids)})
    return pd.DataFrame(rows, columns=["arm", "tokenizer", "lm", "metric", "column", "mean", "low", "high", "n",
                                       "interval", "runs"])


TABLE_NOTE = ("Cells read `mean ± half-width (n)`: the mean over an arm's n seeds and the half-width of its 95% "
              "Student-t interval; `value [low, high] (1)`: one run with its own 95% bootstrap interval over its "
              "samples (FD's is bias-corrected, so it can sit below the value, which is biased high at small sample "
              "counts); `value (1)`: one run, no interval. Reconstruction metrics count each stage-1 tokenizer once.")


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


@dataclass(frozen=True)
class Block:
    """One piece of the report, rendered alike as markdown (``report.md``) and HTML (``report.html``).

    ``kind``: "heading" (``text``, ``level``), "text" (a paragraph; ``**bold**`` and
    ```code``` inline), "table" (``table``, cells through ``fmt_number``), "figure" (``text``
    the title, ``file`` the PNG's name in the report folder, ``caption``) or "bullets" (``items``).
    """

    kind: str
    text: str = ""
    level: int = 2
    table: pd.DataFrame | None = None
    file: str = ""
    caption: str = ""
    items: tuple[str, ...] = ()


def _verdicts_blocks(runs: pd.DataFrame, reference: str | None) -> list[Block]:
    """"Paired verdicts": every arm against the reference tokenizer (``analysis.compare``)."""
    comparison = compare_runs(runs, reference)
    table = comparison_table(comparison)
    blocks = [Block("heading", "Paired verdicts"), Block("text", explanation(comparison)),
              Block("table", table=table) if len(table) else Block("text", "No arm has a reference to be compared with.")]
    if comparison.notes:
        blocks.append(Block("bullets", items=comparison.notes))
    if comparison.verdicts:
        tally = Counter(v.verdict for v in comparison.verdicts)
        counts = ", ".join(f"{n} {what}" for what, n in tally.items())
        blocks.append(Block("text", f"Of {len(comparison.verdicts)} comparisons: {counts}."))
    return blocks


def report_blocks(report: Report, data: RunData, name: str, tracking_uri: str,
                  reference: str | None = None) -> list[Block]:
    """The report: where the runs came from, the results table (arms over seeds), the paired
    verdicts against ``reference`` (default: the first ``vq`` arm), each figure drawn with its
    caption, and each figure not drawn with the reason."""
    blocks = [Block("heading", f"lmgen report: {name}", level=1),
              Block("text", f"{len(data.runs)} finished LM runs of `{name}` (tracking store `{tracking_uri}`). "
                            f"Regenerate with `lmgen plot --experiment {name}`."),
              Block("heading", "Main results")]
    if len(data.runs):
        blocks += [Block("table", table=results_table(data.runs)), Block("text", TABLE_NOTE)]
        blocks += _verdicts_blocks(data.runs, reference)
    else:
        blocks.append(Block("text", "No finished LM runs."))
    for spec in FIGURES:
        if spec.name in report.written:
            blocks += [Block("heading", spec.title),
                       Block("figure", spec.title, file=f"{spec.name}.png", caption=_caption(spec))]
    if report.skipped or report.failed:
        blocks += [Block("heading", "Not drawn"), Block("bullets", items=(
            *(f"**{FIGURES_BY_NAME[n].title}** (`{n}`): {why}" for n, why in report.skipped.items()),
            *(f"**{FIGURES_BY_NAME[n].title}** (`{n}`): failed — {why}" for n, why in report.failed.items())))]
    return blocks


def markdown(blocks: Sequence[Block]) -> str:
    """The blocks as markdown, figures linked by file name."""
    lines: list[str] = []
    for block in blocks:
        if block.kind == "heading":
            lines += ["#" * block.level + " " + block.text, ""]
        elif block.kind == "text":
            lines += [block.text, ""]
        elif block.kind == "table":
            lines += [markdown_table(block.table), ""]
        elif block.kind == "figure":
            lines += [f"![{block.text}]({block.file})", "", block.caption, ""]
        elif block.kind == "bullets":
            lines += [*(f"- {item}" for item in block.items), ""]
    return "\n".join(lines)


def write_reports(report: Report, data: RunData, name: str, tracking_uri: str, reference: str | None = None) -> None:
    """``report.md`` and ``report.html`` (self-contained, ``analysis.html``) from one set of blocks,
    and the results table in numbers, ``results.csv`` (``results_rows``)."""
    blocks = report_blocks(report, data, name, tracking_uri, reference)
    results_rows(data.runs).to_csv(report.out_dir / "results.csv", index=False, float_format="%.6g")
    report.markdown.write_text(markdown(blocks))
    report.html.write_text(page.page(blocks, f"lmgen report: {name}", report.out_dir), encoding="utf-8")


def plot_experiment(name: str, out_dir: Path | None = None, tracking_uri: str | None = None,  # noqa: PLR0913
                    formats: Sequence[str] = ("png", "pdf"), dpi: int = 150, log_to_mlflow: bool = True,
                    reference: str | None = None) -> Report:
    """Load, render, write ``report.md`` and ``report.html`` (into ``out_dir``, default ``$LMGEN_HOME/reports/NAME``);
    log it all under ``report/`` of the sweep's parent run. ``reference``: the tokenizer the
    paired verdicts compare against (``analysis.compare.resolve_reference``)."""
    uri = resolve_tracking_uri(tracking_uri)
    data = load_run_data(name, uri)
    report = render(data, Path(out_dir) if out_dir else lmgen_home() / "reports" / name, formats, dpi)
    write_reports(report, data, name, uri, reference)
    parent = sweep_parent(name, uri) if log_to_mlflow else None
    if parent is not None:
        MlflowClient(uri).log_artifacts(parent, str(report.out_dir), "report")
        log.info("report logged to the sweep's parent run %s (artifacts/report)", parent)
    return report
