"""docs/findings/contrasts.py: the verdict rows docs/findings.md quotes (paired over seeds, or one
run against several by Crawford–Howell when an arm was run once)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from analysis.stats import paired_difference, single_case_difference

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "findings" / "contrasts.py"


@pytest.fixture(scope="module")
def contrasts_module():
    spec = importlib.util.spec_from_file_location("findings_contrasts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(levels_and_seeds: list[tuple[int, int]], module) -> pd.DataFrame:
    rows = []
    for level, seed in levels_and_seeds:
        row = {"lm_size": "micro", "num_subcodes": level, "seed": seed}
        row.update({metric: 10.0 * level + seed * (1.0 + 0.5 * level) + i for i, metric in enumerate(module.COMPARED)})
        rows.append(row)
    return pd.DataFrame(rows)


def test_one_run_against_three_seeds_is_crawford_howell_either_way(contrasts_module) -> None:
    table = _table([(2, 0), (2, 1), (2, 2), (1, 0)], contrasts_module)
    many = table[table.num_subcodes == 2]["fd_probe"].to_numpy(float)
    single = float(table[table.num_subcodes == 1]["fd_probe"].iloc[0])
    expected = single_case_difference(single, many)
    forward = contrasts_module.contrasts(table, "num_subcodes", (1, 2), "lm_size")
    row = forward[forward.metric == "fd_probe"].iloc[0]
    assert row.test == "Crawford–Howell t" and row.n_seeds == "1 vs 3"
    assert (row.delta, row.low, row.high, row.p) == pytest.approx(
        (expected.estimate, expected.low, expected.high, expected.p_value))
    back = contrasts_module.contrasts(table, "num_subcodes", (2, 1), "lm_size")
    row = back[back.metric == "fd_probe"].iloc[0]
    assert (row.delta, row.low, row.high) == pytest.approx((-expected.estimate, -expected.high, -expected.low))
    assert row.n_seeds == "3 vs 1" and row.low < row.high


def test_levels_run_on_the_same_seeds_are_paired(contrasts_module) -> None:
    table = _table([(2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2)], contrasts_module)
    out = contrasts_module.contrasts(table, "num_subcodes", (4, 2), "lm_size")
    row = out[out.metric == "kid_probe"].iloc[0]
    a, b = (table[table.num_subcodes == k]["kid_probe"].to_numpy(float) for k in (4, 2))
    expected = paired_difference(a, b)
    assert row.test == "paired t" and row.n_seeds == 3
    assert (row.delta, row.low, row.high) == pytest.approx((expected.estimate, expected.low, expected.high))


def test_a_group_without_both_levels_is_left_out_of_the_rows_and_the_interaction(contrasts_module) -> None:
    """findings_vocab: VQ and LFQ ran 2^10 and 2^14, FSQ 1000 and 15360 codes — FSQ gets no rows,
    and the interaction is VQ's Δ − LFQ's whichever family's runs come first."""
    table = pd.concat([_table([(k, s) for k in (3, 5) for s in range(3)], contrasts_module).assign(family="fsq"),
                       _table([(k, s) for k in (2, 4) for s in range(3)], contrasts_module).assign(family="vq"),
                       _table([(k, s) for k in (2, 4) for s in range(3)], contrasts_module).assign(family="lfq")])
    out = contrasts_module.contrasts(table, "num_subcodes", (4, 2), "family")
    assert list(dict.fromkeys(out.within)) == ["vq", "lfq", "interaction"]
    assert out.delta.notna().all() and len(out) == 3 * len(contrasts_module.COMPARED)
