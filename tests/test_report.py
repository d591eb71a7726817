"""The report on synthetic run folders (no training): grid sweeps, the differs table, honest "best"
marks, label placement in the trade-off figure, and the page in headless Chromium."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import chromium_figures  # noqa: I001  (tests/ is on the path)

from mage_bench.report import build_report, figures, grid, labels, tables
from mage_bench.results import ResultRecord, write_records

HOSTILE = "<i>trunc</i>norm"  # a user label that must appear as text, never as markup
REASON = '<b onclick="alert(1)">clamp follows the drop share</b>'


def _record(sweep: str, run: str, seed: int, evaluator: str, metric: str, value: float, higher: bool,
            extractor: str = "digits-cnn", **extra) -> ResultRecord:
    return ResultRecord(sweep=sweep, run=run, evaluator=evaluator, metric=metric, value=float(value),
                        higher_is_better=higher, n_samples=64, dataset="digits", split="test",
                        feature_extractor=extractor, seed=seed, config_hash="0" * 64, git_commit="abc123",
                        versions={"numpy": np.__version__}, created_at="2024-01-01T00:00:00Z", extra=extra)


def write_grid_sweep(root: Path, axes: list[tuple[str, list[str]]], seeds=(0, 1), effects=None,
                     noise: float = 0.002, name: str = "grid") -> Path:
    """A sweep folder as `mage-bench sweep` writes it for a grid: sweep.json with axes, points, runs
    and differs, and per run eval/*.json records. A cell's metric is the sum of its labels' effects
    (default: the label's index times 0.05) plus seeded noise."""
    effects = effects or {}
    rng = np.random.default_rng(0)
    runs, points, table = [], [], []
    for cell in itertools.product(*[range(len(labels_)) for _, labels_ in axes]):
        chosen = {parameter: labels_[i] for (parameter, labels_), i in zip(axes, cell, strict=True)}
        label = " × ".join(chosen.values())
        value = {parameter: f"value-{i}" for (parameter, _), i in zip(axes, cell, strict=True)}
        points.append({"label": label, "value": value, "axes": chosen})
        table.append({"point": label, "values": {**value, "masking.clamp_to_drop": bool(cell[0])},
                      "derived": {"drop share": 0.5, "encoder length": 9 + cell[0], "mean masking ratio": 0.694,
                                  "augmentation": "affine", "steps": 300}})
        shift = sum(effects.get(labels_[i], 0.05 * i) for (_, labels_), i in zip(axes, cell, strict=True))
        for seed in seeds:
            run = "c" + "".join(map(str, cell)) + f"-s{seed}"
            runs.append({"sweep": name, "run": run, "point": label, "parameter": " × ".join(p for p, _ in axes),
                         "value": value, "seed": seed, "axes": chosen})
            linear, knn, fid = 0.5 + shift, 0.4 + shift, 30 - 10 * shift
            write_records(root / run / "eval" / "linear.json",
                          [_record(name, run, seed, "linear", "top1", linear + rng.normal(0, noise), True)])
            write_records(root / run / "eval" / "knn.json",
                          [_record(name, run, seed, "knn", "top1", knn + rng.normal(0, noise), True, k=20)])
            write_records(root / run / "eval" / "fid.json",
                          [_record(name, run, seed, "fid", "fid", fid + rng.normal(0, noise), False, n_real=64)])
    sweep = {
        "sweep": name, "description": "a synthetic grid", "parameter": " × ".join(p for p, _ in axes),
        "axes": [{"parameter": p, "points": [{"label": a, "value": f"v-{a}"} for a in labels_]} for p, labels_ in axes],
        "points": points, "seeds": list(seeds), "runs": runs,
        "differs": {"swept": [p for p, _ in axes], "coupled": [{"key": "masking.clamp_to_drop", "reason": REASON}],
                    "table": table},
    }
    (root / "sweep.json").write_text(json.dumps(sweep))
    return root


GRID_2X2 = [("masking.spec", [HOSTILE, "uniform"]), ("contrastive.weight", ["w=0", "w=1"])]


@pytest.fixture(scope="module")
def grid_report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grid")
    write_grid_sweep(root / "runs", GRID_2X2)
    build_report([root / "runs"], root / "report")
    return root / "report"


# --------------------------------------------------------------------------------------------
# Grids


def test_results_csv_has_one_axis_column_per_parameter(grid_report):
    results = pd.read_csv(grid_report / "results.csv")
    runs = results[results["role"] == "run"]
    assert {"axis:masking.spec", "axis:contrastive.weight"} <= set(results.columns)
    assert set(runs["axis:masking.spec"]) == {HOSTILE, "uniform"}
    assert set(runs["axis:contrastive.weight"]) == {"w=0", "w=1"}
    # The axis columns pivot into the grid without parsing the combined labels.
    linear = runs[runs["evaluator"] == "linear"]
    pivot = linear.pivot_table(index="axis:masking.spec", columns="axis:contrastive.weight", values="value")
    assert pivot.shape == (2, 2) and pivot.loc["uniform", "w=1"] > pivot.loc[HOSTILE, "w=0"]


def test_two_axes_draw_a_heat_map_per_headline_and_main_effects(grid_report):
    html = (grid_report / "index.html").read_text()
    assert html.count('alt="heat map of') == 3  # linear, kNN, FD: the headline metrics present
    assert html.count('alt="main effect of') == 2  # one per axis
    assert "heat maps are drawn for two" not in html  # the >2-axes note is for larger grids only


def test_differs_table_is_present_and_escaped(grid_report):
    html = (grid_report / "index.html").read_text()
    table = html.split("<h2>What differs between points</h2>")[1].split("<h2>")[0]
    assert "<i>trunc</i>" not in html and "&lt;i&gt;trunc&lt;/i&gt;norm" in table
    assert "<b onclick" not in html and "&lt;b onclick=&#34;alert(1)&#34;&gt;" in table
    assert "(coupled<sup>1</sup>)" in table and "masking.clamp_to_drop" in table
    for derived in ("drop share", "encoder length", "mean masking ratio", "augmentation", "steps"):
        assert derived in table
    assert table.count("<tr>") == 4 + 1  # one row per grid point, and the header


def test_differs_table_marks_keys_under_a_declared_section():
    entry = {"values": {"contrastive.weight": 0.0, "masking.mask_ratio_min": 0.5}, "derived": {"steps": 300}}
    other = {"values": {"contrastive.weight": 1.0, "masking.mask_ratio_min": 0.55}, "derived": {"steps": 300}}
    sweep = {"differs": {"swept": ["contrastive"], "table": [{"point": "a", **entry}, {"point": "b", **other}],
                         "coupled": [{"key": "masking", "reason": "r"}, {"key": "train.augment", "reason": "q"}]}}
    table = tables.differs_table(sweep)
    assert [(c["key"], c["kind"], c["note"], c["varies"]) for c in table["columns"]] == [
        ("contrastive.weight", "swept", None, True), ("masking.mask_ratio_min", "coupled", 1, True),
        ("steps", "derived", None, False)]
    assert table["notes"] == [{"note": 1, "key": "masking", "reason": "r"}]
    assert table["coupled_same"] == ["train.augment"]  # declared, yet equal on every point: said so
    assert [r["cells"] for r in table["rows"]] == [["0.0", "0.5", "300"], ["1.0", "0.55", "300"]]
    assert tables.differs_table({"points": []}) is None  # a sweep.json from before: no table


def test_the_heat_map_reads_brighter_is_better_for_either_direction():
    axes = [grid.Axis("a", ("a0", "a1")), grid.Axis("b", ("b0", "b1"))]
    data = pd.DataFrame({"axis:a": ["a0", "a0", "a1", "a1"], "axis:b": ["b0", "b1", "b0", "b1"],
                         "value": [1.0, 2.0, 3.0, 4.0]})
    for higher in (True, False):
        fig = grid.heat_map_figure(data, axes[0], axes[1], "m", higher)
        image = fig.axes[0].images[0]
        luminance = [np.dot(image.cmap(image.norm(v))[:3], [0.299, 0.587, 0.114]) for v in (1.0, 4.0)]
        best, worst = (luminance[1], luminance[0]) if higher else (luminance[0], luminance[1])
        assert best > worst
        texts = [t.get_text() for t in fig.axes[0].texts]
        assert texts == ["1.000", "2.000", "3.000", "4.000"]  # one seed per cell: no ± std
        figures.pyplot().close(fig)
    # A cell whose runs all failed is drawn empty and says so; seeds give the ± std.
    data = pd.concat([data.iloc[:3], data.iloc[:1]]).assign(value=[1.0, 2.0, 3.0, 1.5])
    fig = grid.heat_map_figure(data, axes[0], axes[1], "m", True)
    assert [t.get_text() for t in fig.axes[0].texts] == ["1.250 ± 0.354", "2.000", "3.000", "no runs"]
    figures.pyplot().close(fig)


def test_main_effect_averages_cell_means_over_the_other_axes():
    axes = [grid.Axis("a", ("a1", "a0")), grid.Axis("b", ("b0", "b1", "b2"))]
    rows = []
    for (i, a), (j, b) in itertools.product(enumerate(("a0", "a1")), enumerate(("b0", "b1", "b2"))):
        seeds = 1 if (a, b) == ("a1", "b2") else 3  # unequal seed counts: each cell still weighs the same
        rows += [{"axis:a": a, "axis:b": b, "value": 10 * i + j + s * 0.1 - 0.1} for s in range(seeds)]
    data = pd.DataFrame(rows)
    effect = grid.main_effect(data, axes, axes[0])
    assert list(effect.index) == ["a1", "a0"]  # the spec's order
    np.testing.assert_allclose(effect.to_numpy(), [10 + 1 - 0.1 / 3, 1.0])
    assert grid.cell_spread(data, axes) == pytest.approx(0.1)


def test_three_axes_draw_main_effects_only_with_a_note(tmp_path):
    axes = [("a", ["a0", "a1"]), ("b", ["b0", "b1"]), ("c", ["c0", "c1", "c2"])]
    write_grid_sweep(tmp_path / "runs", axes, seeds=(0, 1))
    html = build_report([tmp_path / "runs"], tmp_path / "report").read_text()
    assert 'alt="heat map of' not in html and html.count('alt="main effect of') == 3
    assert "This grid has 3 axes" in html
    assert {"axis:a", "axis:b", "axis:c"} <= set(pd.read_csv(tmp_path / "report" / "results.csv").columns)


def test_an_old_sweep_json_still_renders(tmp_path):
    root = write_grid_sweep(tmp_path / "runs", [("masking.spec", ["x", "y", "z"])])
    sweep = json.loads((root / "sweep.json").read_text())
    for key in ("axes", "differs"):
        del sweep[key]
    for entry in sweep["points"] + sweep["runs"]:
        del entry["axes"]
    (root / "sweep.json").write_text(json.dumps(sweep))
    html = build_report([root], tmp_path / "report").read_text()
    assert "What differs between points" not in html and "<h2>Grid</h2>" not in html
    assert 'alt="metrics against the swept parameter"' in html
    assert not any(c.startswith("axis:") for c in pd.read_csv(tmp_path / "report" / "results.csv").columns)


def test_the_grid_report_never_imports_torch(tmp_path):
    write_grid_sweep(tmp_path / "runs", GRID_2X2)
    code = ("import sys; from mage_bench.report import build_report; "
            f"build_report([{str(tmp_path / 'runs')!r}], {str(tmp_path / 'report')!r}); "
            "assert 'torch' not in sys.modules, 'report imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# "Best" only beyond the seed spread


def _column(means: dict[str, float], noise: float, seeds: int = 3, higher: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame([{"evaluator": "linear", "metric": "top1", "point": p, "role": "run",
                          "value": m + rng.normal(0, noise), "higher_is_better": higher,
                          "feature_extractor": "digits-cnn", "n_samples": 64}
                         for p, m in means.items() for _ in range(seeds)])


def _best(results: pd.DataFrame, points: list[str]) -> list[str]:
    table = tables.summary_table(results, points, [])
    return [row["label"] for row in table["rows"] if row["cells"][0]["best"]]


def test_a_clear_winner_is_marked_best():
    means = {"a": 0.50, "b": 0.52, "c": 0.70}
    assert _best(_column(means, noise=0.005), list(means)) == ["c"]
    assert _best(_column(means, noise=0.005, higher=False), list(means)) == ["a"]  # lower is better


def test_noise_level_differences_mark_nothing():
    means = {"a": 0.500, "b": 0.501, "c": 0.502}
    assert _best(_column(means, noise=0.02), list(means)) == []
    # A winner over some points but not beyond the spread from the runner-up is no winner either.
    means = {"a": 0.50, "b": 0.70, "c": 0.701}
    assert _best(_column(means, noise=0.01), list(means)) == []
    # One seed per point: the spread is unknown, so nothing can be told apart.
    assert _best(_column({"a": 0.1, "b": 0.9}, noise=0.0, seeds=1), ["a", "b"]) == []


def test_the_grid_page_marks_best_only_where_a_point_stands_out(grid_report):
    html = (grid_report / "index.html").read_text()
    summary = html.split("<h2>Summary</h2>")[1].split("</table>")[0]
    # The uniform × w=1 cell is best on every metric by 0.05 over the next (noise 0.002): marked.
    assert summary.count('class="best"') == 3
    assert "differs from every other point's mean by more than the seed spread" in html


# --------------------------------------------------------------------------------------------
# Trade-off figure labels


def _crowded(count: int, spread: float) -> tuple[pd.DataFrame, list[str]]:
    """count points whose coordinates nearly coincide, with long labels."""
    points = [f"truncnorm mean=0.{i} × contrastive w={i / 10}" for i in range(count)]
    rng = np.random.default_rng(2)
    rows = []
    for p in points:
        fid, top1 = 20 + spread * rng.normal(), 0.6 + spread * 0.01 * rng.normal()
        for seed in (0, 1):
            rows.append({"evaluator": "fid", "metric": "fid", "point": p, "role": "run", "value": fid + 0.01 * seed,
                         "higher_is_better": False, "feature_extractor": "digits-cnn", "n_samples": 64})
            rows.append({"evaluator": "linear", "metric": "top1", "point": p, "role": "run",
                         "value": top1 + 0.001 * seed, "higher_is_better": True,
                         "feature_extractor": "digits-cnn", "n_samples": 64})
    return pd.DataFrame(rows), points


def _assert_disjoint(boxes) -> None:
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)


@pytest.mark.parametrize("count,spread,numbered", [(9, 1.0, False), (12, 0.05, True), (30, 3.0, True)])
def test_tradeoff_labels_never_overlap(count, spread, numbered):
    results, points = _crowded(count, spread)
    fig = figures.tradeoff_figure(results, points)
    ax = fig.axes[0]
    fig.canvas.draw()
    boxes = labels.label_boxes(ax)
    assert len(boxes) == count  # every point is named or numbered on the plot
    _assert_disjoint(boxes)
    frame = ax.get_window_extent()
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    texts = [t.get_text() for t in ax.texts if t.get_gid() == labels.LABEL_GID]
    if numbered:  # too crowded for names: numbers on the plot, and a key beside it names every point
        assert texts == [str(i) for i in range(1, count + 1)]
        key = next(t.get_text() for t in ax.texts if t.get_text().startswith("key"))
        assert all(f"{i}  {p}" in key for i, p in enumerate(points, 1))
    else:
        assert texts == [figures.short(p, 24) for p in points]
    figures.pyplot().close(fig)


def test_names_that_shorten_alike_are_numbered():
    results, points = _crowded(3, 30.0)
    points = [f"{'a very long common prefix ' * 2}{i}" for i in range(3)]
    results["point"] = results["point"].map(dict(zip(sorted(set(results["point"])), points, strict=True)))
    fig = figures.tradeoff_figure(results, points)
    assert [t.get_text() for t in fig.axes[0].texts if t.get_gid() == labels.LABEL_GID] == ["1", "2", "3"]
    figures.pyplot().close(fig)


def test_place_labels_separates_labels_of_coinciding_points():
    plt = figures.pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=figures.DPI)
    ax.scatter([0.0, 1.0], [0.0, 1.0])
    placed = labels.place_labels(ax, [(0.5, 0.5)] * 6, [f"label number {i}" for i in range(6)])
    assert placed is not None and len(placed) == 6
    _assert_disjoint(labels.label_boxes(ax))
    # Far too many for the axes: nothing is added, and the caller falls back (numbers and a key).
    assert labels.place_labels(ax, [(0.5, 0.5)] * 400, ["a long label that fills the plot"] * 400) is None
    assert len(labels.label_boxes(ax)) == 6
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The page in a browser


def test_grid_report_renders_in_headless_chromium(tmp_path):
    write_grid_sweep(tmp_path / "runs", [("masking.spec", [HOSTILE, "uniform", "cosine"]),
                                         ("contrastive.weight", ["w=0", "w=0.1", "w=1"])])
    index = build_report([tmp_path / "runs"], tmp_path / "report")
    outcome = chromium_figures(index, tmp_path / "profile")
    if outcome is None:
        pytest.skip("no Chromium here (Debian: apt install chromium)")
    loaded, total, console = outcome
    # 3 heat maps, 2 main effects, the trade-off and the metrics figure: all decode.
    assert loaded == total >= 7
    assert not console, console
