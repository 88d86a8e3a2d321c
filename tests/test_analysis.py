"""Figures and the report (`lmgen plot`): every figure draws from synthetic runs with known
answers and from a tiny real sweep, skips with a reason when the runs cannot support it,
and the whole report is byte-for-byte deterministic for the same runs."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from matplotlib.collections import PolyCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from scipy import stats

from analysis.compare import compare_experiment
from analysis.report import (
    FIGURES,
    FIGURES_BY_NAME,
    RunData,
    load_run_data,
    render,
    results_rows,
    results_table,
    write_reports,
)
from analysis.runs import load_runs, parse_param, tokenizer_label
from analysis.samples import first_grid_row
from analysis.scaling import power_law
from analysis.style import FigureSkipped, label_colors
from analysis.tradeoff import dominated, pareto_front
from analysis.vocab import label_vocab_ticks
from lmgen.cli import main
from lmgen.stage1 import to_grid
from lmgen.tokenizers import TOKENIZERS, tokenizer_config_class

ROOT = Path(__file__).resolve().parents[1]

# --- synthetic runs with known answers -----------------------------------------------------------

PRESETS = [("vq", "vq 1k f4", 1024), ("vq", "vq 4k f4", 4096), ("lfq", "lfq 10-bit f4", 1024),
           ("lfq", "lfq 12-bit f4", 4096), ("jpeg", "jpeg q25", 256), ("crt", "crt vq 1k f4 λ4", 1024)]
SIZES = [("nano", 1e5), ("micro", 1e6), ("mini", 1e7)]
EXPONENT = -0.3  # generation FD ∝ params^EXPONENT in the synthetic runs
FREQ = np.array([0.4, 0.2, 0.12, 0.09, 0.07, 0.05, 0.03, 0.02, 0.015, 0.005])


CURVE_HW = 0.05  # half-width of a synthetic run's own curve intervals
SPREAD = 2.0  # seeds s = 0, 1, 2 add (s − 1)·SPREAD to generation FD: mean unchanged, sample sd SPREAD


def _run_rows(seeds: tuple[int, ...] = (0,)) -> pd.DataFrame:
    rows = []
    for i, (family, label, vocab) in enumerate(PRESETS):
        tokens = 256 * 4 if family == "jpeg" else 64 * (1 + i % 2)
        for size, params in SIZES:
            for seed in seeds:
                fd = (40 + 5 * i) * (params / 1e5) ** EXPONENT + (seed - 1) * SPREAD * (len(seeds) > 1)
                rows.append({
                    "run_id": f"run{i}{size}s{seed}", "run_name": f"{label},{size},s{seed}", "tokenizer": family,
                    "tokenizer_label": label, "lm_size": size, "lm_params": params, "lm_flops": params * 6e6,
                    "seed": seed, "tokenizer_hash": f"tok{i}", "lm/params": params, "lm/flops": params * 6e6,
                    "lm/val_bits_per_image": 400 * (params / 1e5) ** -0.05 + seed,
                    "tok/vocab_size": float(vocab), "tok/tokens_per_image": float(tokens),
                    "tok/bits_per_image": tokens * np.log2(vocab), "tok/psnr": 20.0 + i, "tok/rfid_probe": 10.0 + 3 * i,
                    "tok/unigram_kl_uniform": 0.1 * (i + 1), "tok/unigram_tokens_per_cell": 100.0,
                    "tok/bigram_kl_uniform": 0.5 * (i + 1), "tok/bigram_pairs_per_cell": 0.5 if i % 2 else 2.0,
                    "gen/fd_probe": fd, "gen/kid_probe": fd / 1000, "gen/decode_valid_rate": 1.0,
                    "gen/class_accuracy": 0.5 + 0.01 * seed,
                    **{f"gen/prefix_r{r}/fd_probe": fd * (1 - r / 100) for r in (25, 50, 75)},
                    **{f"gen/prefix_r{r}/prompt_fraction": r / 100 for r in (25, 50, 75)}})
    return pd.DataFrame(rows)


def synthetic(seeds: tuple[int, ...] = (0,)) -> RunData:
    runs = _run_rows(seeds)
    ids = runs[["run_id", "run_name", "tokenizer", "tokenizer_label", "lm_size", "lm_params", "seed"]]
    histories, positions, per_class, samples = [], [], [], []
    gen = torch.Generator().manual_seed(0)
    for k, run in enumerate(ids.to_dict("records")):
        seed = run["seed"]
        for step in (100, 200, 300):
            histories.append({**run, "key": "lm/val_bits_per_image", "step": step, "value": 500 - step / 10 + k})
        for step in range(10, 310, 10):
            histories.append({**run, "key": "lm/train_loss", "step": step, "value": 6 - step / 100 + 0.1 * seed})
        for step in (100, 200, 300):  # generation curve: its own bootstrap interval ±CURVE_HW at each point
            accuracy, fd = 0.1 + step / 1000 + 0.01 * seed, 100 - step / 10 + seed
            for key, value in {"curve/images_seen": step * 32.0, "curve/class_accuracy": accuracy,
                               "curve/class_accuracy_ci_low": accuracy - CURVE_HW,
                               "curve/class_accuracy_ci_high": accuracy + CURVE_HW, "curve/fd_probe": fd,
                               "curve/fd_probe_ci_low": fd - 10 * CURVE_HW, "curve/fd_probe_ci_high": fd + 10 * CURVE_HW}.items():
                histories.append({**run, "key": key, "step": step, "value": value})
        length = 16 + 8 * (k // len(seeds) % 3)  # one length per tokenizer and size, whatever its seeds
        for pos in range(length):
            nats = 4.0 - pos / length + 0.05 * seed
            positions.append({**run, "step": 300, "position": pos, "loss_nats": nats, "bits": nats / np.log(2),
                              "count": 64})
        # Per-class FD: this tokenizer beats the reference by more on rare classes (ρ > 0).
        for c, f in enumerate(FREQ):
            per_class.append({**run, "class": c, "name": f"c{c}", "train_frequency": f, "num_samples": 8,
                              "class_accuracy": 0.5 + f, "fd_probe": 50 + seed + (0 if run["tokenizer"] == "vq" else
                                                                                  100 * f - 20), "num_reference": 20})
        images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=gen)
        samples.append({**run, "image": to_grid(images, nrow=5)})
    return RunData(runs=runs, histories=pd.DataFrame(histories), positions=pd.DataFrame(positions),
                   per_class=pd.DataFrame(per_class), samples=pd.DataFrame(samples))


@pytest.fixture(scope="module")
def data() -> RunData:
    return synthetic()


@pytest.mark.parametrize("spec", FIGURES, ids=lambda s: s.name)
def test_every_figure_draws_from_synthetic_runs(spec, data):
    fig = spec.make(getattr(data, spec.source))
    assert isinstance(fig, Figure) and fig.get_suptitle().startswith(spec.title)
    drawn = [ax for ax in fig.axes if ax.get_visible() and (ax.lines or ax.collections or ax.patches or ax.images)]
    assert drawn, "nothing was drawn"
    if spec.name != "samples":  # every data axis says what it shows
        assert all(ax.get_ylabel() and (ax.get_xlabel() or not ax.xaxis.get_visible()) for ax in drawn)  # twins share x
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    assert buffer.getvalue().startswith(b"\x89PNG")


def _legend_texts(fig: Figure) -> list[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def test_scaling_legend_prints_the_fitted_exponents(data):
    texts = _legend_texts(FIGURES_BY_NAME["model_scaling"].make(data.runs))
    fd_fits = [t for t in texts if t.startswith("vq 1k f4: b =")]
    assert f"vq 1k f4: b = {EXPONENT:+.3f}" in fd_fits  # FD vs params and vs FLOPs: both exactly −0.3
    assert "vq 1k f4: b = -0.050" in texts  # val bits ∝ params^−0.05


def test_long_tail_reports_the_correlation_with_frequency(data):
    texts = _legend_texts(FIGURES_BY_NAME["long_tail"].make(data.per_class))
    assert any(t.startswith("jpeg q25: ρ = +1.00 (p = ") for t in texts)  # Δ FD rises monotonically with frequency


def test_colours_are_per_family_and_consistent(data):
    colors = label_colors(data.runs)
    assert colors["vq 1k f4"] != colors["vq 4k f4"]  # two presets: two shades
    again = label_colors(data.runs[data.runs["tokenizer"].isin(["vq", "jpeg"])])
    assert again["jpeg q25"] == colors["jpeg q25"]  # a family's colour does not depend on who else is plotted


def test_vocab_ticks_name_powers_of_two_and_other_sizes_on_their_own_line():
    """FSQ's 1,000 and 15,360 codes sit beside 2^10 and 2^14: they are written as numbers on a
    second line (minor ticks), not rounded to a power of two over the first."""
    fig = Figure()
    ax = fig.add_subplot()
    ax.set_xscale("log", base=2)
    label_vocab_ticks(ax, np.array([1024.0, 64.0, 1000.0, 16384.0, 15360.0, 1024.0]))
    majors = {t.get_loc(): t.label1.get_text() for t in ax.xaxis.get_major_ticks()}
    minors = {t.get_loc(): t.label1.get_text() for t in ax.xaxis.get_minor_ticks()}
    assert majors == {64.0: "$2^{6}$", 1024.0: "$2^{10}$", 16384.0: "$2^{14}$"}
    assert minors == {1000.0: "1,000", 15360.0: "15,360"}
    minor_pad = ax.xaxis.get_minor_ticks()[0].get_pad()
    assert minor_pad > ax.xaxis.get_major_ticks()[0].get_pad()


def test_pareto_front_and_power_law_known_answers():
    x = np.array([1.0, 2.0, 3.0, 4.0, 2.5])
    y = np.array([5.0, 3.0, 4.0, 1.0, 3.0])
    assert list(pareto_front(x, y)) == [0, 1, 3]  # (2.5, 3) ties (2, 3) at a higher cost: dominated
    a, b = power_law(np.array([1.0, 10.0, 100.0]), np.array([8.0, 4.0, 2.0]))
    assert a == pytest.approx(8.0) and b == pytest.approx(-np.log10(2))
    with pytest.raises(ValueError):
        power_law(np.array([3.0, 3.0]), np.array([1.0, 2.0]))


def _only(frame: pd.DataFrame, **where) -> pd.DataFrame:
    mask = np.ones(len(frame), dtype=bool)
    for column, value in where.items():
        mask &= frame[column] == value
    return frame[mask]


INSUFFICIENT = {  # figure → data it cannot support, and a word its reason must contain
    "tradeoff": (lambda d: _only(d.runs, tokenizer="vq", tokenizer_label="vq 1k f4"), "≥2 tokenizers"),
    "vocab_scaling": (lambda d: _only(d.runs, tokenizer_label="vq 1k f4"), "vocabulary sizes"),
    "model_scaling": (lambda d: _only(d.runs, lm_size="micro"), "≥2 LM sizes"),
    "tokens_per_image": (lambda d: _only(d.runs, tokenizer_label="vq 1k f4"), "tokens per image"),
    "loss_curves": (lambda d: _only(d.histories, step=300), "≥2 validations"),
    "gen_curves": (lambda d: _only(d.histories, step=300), "≥2 generation-curve points"),
    "token_statistics": (lambda d: d.runs.drop(columns=["tok/unigram_kl_uniform"]), "unigram"),
    "position_loss": (lambda d: _only(d.positions, position=0), "≥2 positions"),
    "long_tail": (lambda d: d.per_class[d.per_class["tokenizer"] != "vq"], "reference"),
    "prefix_completion": (lambda d: d.runs.drop(columns=[c for c in d.runs if "prefix_r25" in c or "r75" in c]),
                          "≥2 prompt ratios"),
    "samples": (lambda d: d.samples.iloc[:0], "samples.png"),
}


@pytest.mark.parametrize("spec", FIGURES, ids=lambda s: s.name)
def test_figures_skip_with_a_reason_when_the_runs_cannot_support_them(spec, data):
    frame, needle = INSUFFICIENT[spec.name]
    with pytest.raises(FigureSkipped, match=needle):
        spec.make(frame(data))
    with pytest.raises(FigureSkipped):  # and no runs at all
        spec.make(getattr(data, spec.source).iloc[:0])


def test_render_writes_what_the_runs_support_and_lists_what_it_skipped(tmp_path, data):
    thin = RunData(runs=data.runs, histories=data.histories.iloc[:0], positions=data.positions,
                   per_class=data.per_class, samples=data.samples)
    report = render(thin, tmp_path, formats=("png",), dpi=30)
    assert list(report.skipped) == ["loss_curves", "gen_curves"] and not report.failed
    assert "≥2 validations" in report.skipped["loss_curves"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{s.name}.png" for s in FIGURES
                                                                if s.name not in report.skipped)


def test_no_runs_means_every_figure_skipped_and_a_report_that_says_so(tmp_path, data):
    empty = RunData(**{name: getattr(data, name).iloc[:0] for name in ("runs", "histories", "positions", "per_class",
                                                                     "samples")})
    report = render(empty, tmp_path, formats=("png",))
    assert not report.written and not report.failed and set(report.skipped) == set(FIGURES_BY_NAME)
    assert all(report.skipped.values())


def test_report_html_is_one_self_contained_page_with_the_markdown_report_s_content(tmp_path, seeded):
    """Every figure drawn is embedded as PNG data, nothing is fetched from anywhere, names are
    escaped, and the page says the same as report.md: its tables, verdicts and what was not drawn."""
    hostile = seeded.runs.assign(tokenizer_label=seeded.runs["tokenizer_label"].str.replace("vq 4k f4", "<b>vq</b>"))
    thin = RunData(runs=hostile, histories=seeded.histories.iloc[:0], positions=seeded.positions,
                   per_class=seeded.per_class, samples=seeded.samples)
    report = render(thin, tmp_path, formats=("png",), dpi=30)
    write_reports(report, thin, "synthetic", "sqlite:///store.db")
    page = report.html.read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == len(report.written) == len(FIGURES) - 2
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)|<link|@import|url\(""", page)
    assert "&lt;b&gt;vq&lt;/b&gt;" in page and "<b>vq</b>" not in page
    assert page.count('<table class="sortable">') == 2 and '<td class="worse">worse</td>' in page
    markdown = report.markdown.read_text()
    for heading in re.findall(r"^## (.+)$", markdown, flags=re.M):
        assert f"<h2>{heading.replace('&', '&amp;')}</h2>" in page
    assert "Loss curves" in markdown.split("## Not drawn")[1] and "≥2 validations" in page.split("Not drawn")[1]


def test_results_table_names_presets_and_scales_params(data):
    table = results_table(data.runs)
    assert list(table.columns[:3]) == ["tokenizer", "LM", "LM params (M)"]
    assert "FD probe" in table.columns and "rFD probe" in table.columns
    columns = list(table.columns)
    assert columns.index("KID probe") == columns.index("FD probe") + 1  # KID, unbiased at small n, beside FD
    assert table["LM params (M)"].iloc[0] == pytest.approx(0.1)
    assert table["FD probe"].iloc[0] == "40 (1)"  # one seed, no interval: the value and n


# --- several seeds: intervals in tables and figures ------------------------------------------------

_CELL = re.compile(r"^(?P<mean>[-\d.e+]+) ± (?P<hw>[-\d.e+]+) \((?P<n>\d+)\)$")


@pytest.fixture(scope="module")
def seeded() -> RunData:
    return synthetic(seeds=(0, 1, 2))


def test_a_three_seed_arm_reads_mean_plus_minus_half_width_and_n(seeded):
    table = results_table(seeded.runs)
    assert len(table) == len(PRESETS) * len(SIZES)  # one row per arm, not per run
    cell = _CELL.match(table["FD probe"].iloc[0])
    assert cell, table["FD probe"].iloc[0]
    half_width = stats.t.ppf(0.975, 2) * SPREAD / np.sqrt(3)  # sample sd of (−2, 0, 2) is SPREAD
    assert float(cell["mean"]) == pytest.approx(40.0, rel=1e-3) and int(cell["n"]) == 3
    assert float(cell["hw"]) == pytest.approx(half_width, rel=0.01)
    # a stage-1 metric is one measurement per tokenizer, however many LM seeds share it
    assert table["rFD probe"].iloc[0] == "10 (1)"
    # results.csv holds the same estimates in numbers
    rows = results_rows(seeded.runs).set_index(["arm", "metric"])
    first = rows.loc[rows.index[0][0]]
    fd = first.loc["gen/fd_probe"]
    assert fd["mean"] == pytest.approx(40.0, rel=1e-3) and fd["n"] == 3 and fd["interval"] == "seeds"
    assert (fd["high"] - fd["low"]) / 2 == pytest.approx(half_width, rel=0.01)
    assert len(fd["runs"].split()) == 3


ERROR_BARS = ["tradeoff", "vocab_scaling", "model_scaling", "tokens_per_image", "long_tail"]
BANDS = ["loss_curves", "position_loss"]


def _intervals_drawn(fig: Figure) -> tuple[int, int]:
    """(error bars, bands) on the figure's axes."""
    bars = sum(isinstance(c, ErrorbarContainer) and c.has_yerr for ax in fig.axes for c in ax.containers)
    bands = sum(isinstance(c, PolyCollection) for ax in fig.axes for c in ax.collections)
    return bars, bands


@pytest.mark.parametrize("name", ERROR_BARS + BANDS)
def test_figures_draw_intervals_with_three_seeds_and_none_with_one(name, seeded, data):
    spec = FIGURES_BY_NAME[name]
    bars, bands = _intervals_drawn(spec.make(getattr(seeded, spec.source)))
    assert (bars if name in ERROR_BARS else bands) > 0, (bars, bands)
    assert _intervals_drawn(spec.make(getattr(data, spec.source))) == (0, 0)  # one seed: nothing to show


def _band_heights(fig: Figure) -> list[float]:
    """The vertical extent of every band on the figure's first axes (the synthetic curves rise by
    0.2 from first to last point, plus the interval's width)."""
    return [float(np.ptp(c.get_paths()[0].vertices[:, 1])) for c in fig.axes[0].collections
            if isinstance(c, PolyCollection)]


def test_generation_curves_band_seeds_with_t_and_one_run_with_its_own_interval(seeded, data):
    """Three seeds: the band at each point is the t interval over the seeds (accuracies 0.01
    apart); one seed: the run's own bootstrap interval (±CURVE_HW) — and nothing without one."""
    spec = FIGURES_BY_NAME["gen_curves"]
    half_width = stats.t.ppf(0.975, 2) * 0.01 / np.sqrt(3)  # sample sd of seeds' (0, 0.01, 0.02) is 0.01
    heights = _band_heights(spec.make(seeded.histories))
    assert len(heights) == len(PRESETS) * len(SIZES) and max(heights) == pytest.approx(2 * half_width + 0.2, rel=1e-6)
    heights = _band_heights(spec.make(data.histories))
    assert len(heights) == len(PRESETS) * len(SIZES) and max(heights) == pytest.approx(2 * CURVE_HW + 0.2, rel=1e-6)
    bare = data.histories[~data.histories["key"].str.endswith(("_ci_low", "_ci_high"))]
    assert _intervals_drawn(spec.make(bare)) == (0, 0)
    ax = spec.make(data.histories).axes[0]
    assert list(ax.lines[0].get_xdata()) == [3200.0, 6400.0, 9600.0]  # images seen, not steps


def test_pareto_front_runs_through_means_and_overlap_is_not_dominance():
    points = pd.DataFrame({"x": [1.0, 2.0, 3.0, 3.0], "y": [5.0, 3.0, 3.5, 9.0],
                           "x_low": np.nan, "x_high": np.nan,
                           "y_low": [4.0, 2.0, 2.9, 8.0], "y_high": [6.0, 4.0, 4.1, 10.0]})
    assert list(pareto_front(points["x"].to_numpy(), points["y"].to_numpy())) == [0, 1]
    # (3, 3.5) is off the front of the means, but its interval overlaps (2, 3)'s: not dominated;
    # (3, 9) is beaten by (2, 3) even at the ends of both intervals
    assert list(dominated(points)) == [False, False, False, True]
    no_interval = points.assign(y_low=np.nan, y_high=np.nan)
    assert not dominated(no_interval).any()  # without intervals the noise is unknown: nobody is called dominated
    assert list(dominated(points.assign(x=[3.0, 2.0, 1.0, 1.0]), x_lower_is_better=False)) == [False, False, False,
                                                                                               True]


# --- the loader's pieces --------------------------------------------------------------------------


def test_params_parse_back_to_their_types():
    assert parse_param("1024") == 1024 and parse_param("0.002") == 0.002 and parse_param("True") is True
    assert parse_param("None") is None and parse_param("[0.25, 0.5]") == [0.25, 0.5]
    assert parse_param("4:2:0") == "4:2:0" and parse_param("vq") == "vq" and parse_param("32x32") == "32x32"


def test_every_tokenizer_preset_has_its_own_label():
    labels = {}
    for path in sorted((ROOT / "experiments/tokenizers").glob("*.yaml")):
        block = yaml.safe_load(path.read_text())["tokenizer"]
        label = tokenizer_config_class(block["name"])(**block).label()
        assert label.startswith(block["name"]), (path.name, label)
        labels[path.stem] = label
    assert len(set(labels.values())) == len(labels), labels
    assert all(callable(getattr(TOKENIZERS[n].Config, "label", None)) for n in TOKENIZERS)
    params = {"tokenizer.name": "vq", "tokenizer.codebook_size": 4096, "tokenizer.downsample": 8}
    assert tokenizer_label(params) == "vq 4k f8"
    assert tokenizer_label({"tokenizer.name": "vq", "tokenizer.gone_field": 3}) == "vq 1k f4"  # older schema


def test_first_grid_row_cuts_one_row_of_tiles():
    images = torch.randint(0, 250, (10, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grid = to_grid(images, nrow=4)  # 3 rows of 64-px tiles, white 2-px padding
    strip = first_grid_row(grid)
    assert strip.shape == (64 + 4, grid.shape[1], 3)
    assert np.array_equal(strip, grid[: 64 + 4])


# --- a tiny real sweep ----------------------------------------------------------------------------

TINY = ["data.train_size=48", "data.val_size=16", "data.image_size=16", "train.budget=steps", "train.max_steps=4",
        "train.val_every=2",
        "train.batch_size=8", "train.warmup_steps=2", "sample.num_samples=20", "sample.batch_size=20",
        "metrics.prefix_samples=4", "train.log_every=1"]
LEARNED_TINY = ["stage1.steps=4", "stage1.channels=8", "stage1.batch_size=8", "stage1.val_every=2",
                "stage1.val_images=8"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """5 points: pixels and VQ-32 at nano/micro, VQ-64 at nano; the sweep writes its report."""
    tmp = tmp_path_factory.mktemp("plot")
    home = tmp / "home"
    sweep = {"name": "tinyplot", "experiment": str(ROOT / "experiments/base.yaml"), "overrides": [*TINY, *LEARNED_TINY],
             "max_parallel": 2, "blocks": [
                 {"overrides": ["tokenizer=pixels_palette64"], "grid": {"lm.size": ["nano", "micro"]}},
                 {"overrides": ["tokenizer=vq_1k"],
                  "zip": [{"lm.size": ["nano", "micro", "nano"], "tokenizer.codebook_size": [32, 32, 64]}]}]}
    path = tmp / "tinyplot.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    mp = pytest.MonkeyPatch()
    mp.setenv("LMGEN_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        assert main(["sweep", str(path)]) == 0
        yield home, f"sqlite:///{home / 'mlflow.db'}"
    finally:
        mp.undo()


def test_the_sweep_logs_its_report_to_the_parent_run(tiny_sweep):
    home, uri = tiny_sweep
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tinyplot")
    parent = client.search_runs([experiment.experiment_id], "tags.`lmgen.stage` = 'sweep'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/tradeoff.png", "report/tradeoff.pdf", "report/samples.png"} <= logged
    assert (home / "reports" / "tinyplot" / "report.md").is_file()


def test_point_logs_read_as_plain_text_with_steps_counted_to_the_end(tiny_sweep):
    """A sweep point's log is what its console said: plain lines (no progress-bar control
    characters), training counted in steps to max_steps, stage 1 and sampling announced."""
    home, _ = tiny_sweep
    logs = sorted((home / "sweeps" / "tinyplot").glob("*.log"))
    assert len(logs) == 5
    for path in logs:
        text = path.read_text()
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text), f"{path.name} has control characters"
        steps = re.findall(r"lm: step (\d+)/(\d+)", text)
        assert steps and steps[-1][0] == steps[-1][1], f"{path.name}: no step count to the end"
        assert "sampling and scoring" in text
    assert any("stage 1: step" in p.read_text() for p in logs)  # the learned tokenizer's stage 1


def test_real_runs_load_typed_and_every_figure_draws_or_says_why(tiny_sweep):
    _, uri = tiny_sweep
    data = load_run_data("tinyplot", uri)
    runs = data.runs
    assert len(runs) == 5 and list(runs["tokenizer"]) == ["pixels", "pixels", "vq", "vq", "vq"]
    assert list(runs["lm_size"]) == ["nano", "micro", "nano", "micro", "nano"]  # family, label, then size
    assert set(runs["tokenizer_label"]) == {"pixels palette64", "vq 32 f4", "vq 64 f4"}
    # one seed each: five arms, named by their preset — or, where one preset (vq_1k) was overridden
    # into several tokenizers, by the label each config gives itself
    assert list(runs["arm"]) == ["pixels_palette64 · nano", "pixels_palette64 · micro", "vq 32 f4 · nano",
                                 "vq 32 f4 · micro", "vq 64 f4 · nano"]
    assert str(runs["tokenizer.codebook_size"].dtype) == "Int64"  # ints, missing where a tokenizer has none
    assert list(runs["tokenizer.codebook_size"].iloc[2:]) == [32, 32, 64]
    assert runs["train.lr"].dtype == float and str(runs["lm.class_conditional"].dtype) == "boolean"
    assert set(runs["tokenizer.name"]) == {"pixels", "vq"} and str(runs["sample.top_k"].dtype) == "Int64"
    assert (runs["lm/params"] > 0).all() and (runs["lm/flops"] > 0).all()
    assert set(data.histories["key"]) == {"lm/val_bits_per_image", "lm/train_loss"}
    drawn, skipped = [], {}
    for spec in FIGURES:
        try:
            spec.make(getattr(data, spec.source))
            drawn.append(spec.name)
        except FigureSkipped as why:
            skipped[spec.name] = str(why)
    assert {"tradeoff", "vocab_scaling", "model_scaling", "tokens_per_image", "loss_curves", "token_statistics",
            "position_loss", "prefix_completion", "samples"} <= set(drawn), skipped


def test_lmgen_plot_is_deterministic_for_the_same_runs(tiny_sweep, tmp_path, capsys):
    _, uri = tiny_sweep
    for out in ("a", "b"):
        assert main(["plot", "--experiment", "tinyplot", "--uri", uri, "--out", str(tmp_path / out), "--no-log",
                     "--dpi", "50"]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert {"report.md", "tradeoff.pdf", "results.csv"} <= set(files)
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| pixels_palette64 | nano |" in report and "![Compression–generation trade-off](tradeoff.png)" in report
    assert "## Paired verdicts" in report and "against the reference tokenizer **vq 32 f4**" in report
    assert main(["plot", "--experiment", "no-such-sweep", "--uri", uri, "--out", str(tmp_path / "c")]) == 2
    assert "no MLflow experiment or sweep named 'no-such-sweep'" in capsys.readouterr().err


def test_report_html_in_a_real_browser(tiny_sweep, browser):
    """The sweep's own report.html in headless Chromium: it loads with no console error and no
    request beyond itself, every figure decodes, and a click on a header sorts by its numbers."""
    home, uri = tiny_sweep
    path = home / "reports" / "tinyplot" / "report.html"
    page = browser.new_page()
    problems, requests = [], []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda err: problems.append(str(err)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri(), wait_until="load")
    images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
    assert len(images) >= 9 and all(ok for _, ok in images), images
    column = page.evaluate("""Array.from(document.querySelectorAll('table.sortable')[0].tHead.rows[0].cells)
                              .map(c => c.textContent).indexOf('LM params (M)')""")
    assert column >= 0
    cells = f"Array.from(document.querySelectorAll('table.sortable')[0].tBodies[0].rows).map(r => r.cells[{column}].textContent)"
    page.click(f"table.sortable >> nth=0 >> th >> nth={column}")
    ascending = [float(v) for v in page.evaluate(cells)]
    page.click(f"table.sortable >> nth=0 >> th >> nth={column}")
    descending = [float(v) for v in page.evaluate(cells)]
    assert ascending == sorted(ascending) and descending == sorted(ascending, reverse=True) and ascending[0] < ascending[-1]
    assert not problems and requests == [path.as_uri()], (problems, requests)
    page.close()
    parent = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("tinyplot").experiment_id],
                                           "tags.`lmgen.stage` = 'sweep'")[0]
    assert "report/report.html" in {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "report")}


def test_eval_rescorings_replace_gen_metrics_of_the_run_they_rescore(tiny_sweep):
    """An `lmgen eval` child (lmgen.stage=eval) with more samples supplies the run's gen/*, unless it
    sampled at other settings (then it is left out, however many samples it drew)."""
    _, uri = tiny_sweep
    before = load_runs("tinyplot", uri)
    target = before.iloc[0]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tinyplot")
    hotter = str(float(target["sample.temperature"]) + 0.5)
    for samples, fd, temperature in ((1000, 12.5, None), (50, 99.0, None), (5000, 1.0, hotter)):
        child = client.create_run(experiment.experiment_id, tags={
            "lmgen.stage": "eval", "lmgen.eval_of": target["run_id"], "mlflow.parentRunId": target["run_id"],
            "lmgen.config_hash": target["config_hash"]})
        if temperature is not None:  # sampled otherwise: another experiment, never the run's score
            client.log_param(child.info.run_id, "sample.temperature", temperature)
        client.log_metric(child.info.run_id, "gen/fd_probe", fd)
        client.log_metric(child.info.run_id, "gen/num_samples", samples)
        client.set_terminated(child.info.run_id, "FINISHED")
    after = load_runs("tinyplot", uri)
    assert len(after) == len(before)  # a re-scoring is not a run of its own
    row = after[after["run_id"] == target["run_id"]].iloc[0]
    assert row["gen/fd_probe"] == 12.5 and row["gen/num_samples"] == 1000 and row["scored_by"] != target["run_id"]
    other = after[after["run_id"] != target["run_id"]]
    assert (other["scored_by"] == other["run_id"]).all()
    assert other["tok/psnr"].equals(before[before["run_id"] != target["run_id"]]["tok/psnr"])


# --- seeds in a real store: arms, intervals, verdicts -------------------------------------------------


def _log_run(client: MlflowClient, experiment_id: str, params: dict, metrics: dict) -> str:
    """One FINISHED LM run, logged as lmgen logs it: resolved-config params, lmgen tags, metrics."""
    name = f"{params['tokenizer.name']}-{params['lm.size']}-s{params['seed']}"
    run = client.create_run(experiment_id, run_name=name, tags={
        "lmgen.stage": "lm", "lmgen.tokenizer": params["tokenizer.name"],
        "lmgen.config_hash": f"{name}-t{params.get('tokenizer.seed', '')}",
        "lmgen.tokenizer_hash": f"{params['tokenizer.name']}-t{params.get('tokenizer.seed', 0)}"})
    for key, value in {**params, "tracking.run_name": name}.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.fixture(scope="module")
def seeded_store(tmp_path_factory):
    """A SQLite store with 3 seeds of VQ (LM and stage-1 seed varied together), 3 LM seeds of JPEG
    (lower FD by 10 ± noise) and one LFQ run that logged its own bootstrap interval."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('seeds') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("seeded")
    rng = np.random.default_rng(0)
    lm_noise = rng.normal(size=3)
    for seed in range(3):
        bookkeeping = {"metrics.bootstrap_resamples": 200} if seed == 0 else {}  # how, not what: one arm still
        _log_run(client, experiment, {"tokenizer.name": "vq", "tokenizer.codebook_size": 1024, "lm.size": "micro",
                                      "seed": seed, "tokenizer.seed": seed, **bookkeeping},
                 {"gen/fd_probe": 50 + lm_noise[seed], "gen/kid_probe": 0.05, "tok/rfid_probe": 10.0 + seed})
        _log_run(client, experiment, {"tokenizer.name": "jpeg", "tokenizer.quality": 25, "lm.size": "micro",
                                      "seed": seed},
                 {"gen/fd_probe": 40 + lm_noise[seed] + 0.1 * rng.normal(), "gen/kid_probe": 0.04,
                  "tok/rfid_probe": 5.0})
    _log_run(client, experiment, {"tokenizer.name": "lfq", "tokenizer.bits": 10, "lm.size": "micro", "seed": 0,
                                  "tokenizer.seed": 0, "metrics.bootstrap_resamples": 200},
             {"gen/fd_probe": 45.0, "gen/fd_probe_ci_low": 43.0, "gen/fd_probe_ci_high": 48.0})
    return uri


def test_runs_differing_only_in_seed_are_one_arm_with_an_interval(seeded_store):
    runs = load_runs("seeded", seeded_store)
    assert len(runs) == 7 and runs["arm"].nunique() == 3
    assert list(dict.fromkeys(runs["arm"])) == ["jpeg q25 · micro", "vq 1k f4 · micro", "lfq 10-bit f4 · micro"]
    table = results_table(runs).set_index("tokenizer")
    fd = runs[runs["tokenizer"] == "vq"]["gen/fd_probe"].to_numpy()
    ci = stats.ttest_1samp(fd, 0).confidence_interval(0.95)
    cell = _CELL.match(table.loc["vq 1k f4", "FD probe"])
    assert cell and int(cell["n"]) == 3 and float(cell["mean"]) == pytest.approx(fd.mean(), abs=0.05)
    assert float(cell["hw"]) == pytest.approx((ci.high - ci.low) / 2, rel=0.01)
    assert table.loc["lfq 10-bit f4", "FD probe"] == "45 [43, 48] (1)"  # one run: its own interval
    assert table.loc["vq 1k f4", "rFD probe"].endswith("(3)")  # three stage-1 seeds: three tokenizers
    assert table.loc["jpeg q25", "rFD probe"] == "5 (1)"  # three LM seeds on one tokenizer: one measurement


def test_paired_verdicts_from_a_real_store(seeded_store):
    comparison = compare_experiment("seeded", tracking_uri=seeded_store)
    assert comparison.reference == "vq 1k f4"
    rows = {(v.arm, v.metric.key): v for v in comparison.verdicts}
    jpeg = rows[("jpeg q25 · micro", "gen/fd_probe")]
    assert jpeg.difference.test == "paired t" and jpeg.verdict == "better"  # LM seeds pair: the noise cancels
    lfq = rows[("lfq 10-bit f4 · micro", "gen/fd_probe")]
    assert lfq.difference.test == "Crawford–Howell t" and lfq.difference.n_a == 1
    assert comparison.tests == sum(v.difference.tested for v in comparison.verdicts)


def test_lmgen_compare_prints_the_verdicts(seeded_store, capsys):
    assert main(["compare", "seeded", "--uri", seeded_store]) == 0
    out = capsys.readouterr().out
    assert "reference tokenizer vq 1k f4" in out and "Holm's step-down correction" in out
    line = next(t for t in out.splitlines() if t.startswith("jpeg q25 · micro") and "FD probe" in t)
    assert "paired t, n=3/3" in line and line.rstrip().endswith("better")
    assert main(["compare", "seeded", "--uri", seeded_store, "--reference", "jpeg", "--markdown"]) == 0
    assert "| vq 1k f4 · micro | FD probe ↓ |" in capsys.readouterr().out  # VQ against JPEG now
    assert main(["compare", "seeded", "--uri", seeded_store, "--reference", "h264"]) == 2
    assert "no arm matches reference 'h264'" in capsys.readouterr().err
