"""The report's inpainting section on synthetic run folders (no training): summary.csv keeps masks apart,
the metrics-against-ratio figure, the triplet table and its guard against grid paths leaving a run."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import chromium_figures
from PIL import Image
from test_report import _record, write_grid_sweep  # noqa: I001  (tests/ is on the path)

from mage_bench.report import build_report, figures
from mage_bench.report import inpaint as report_inpaint
from mage_bench.report.collate import summarise
from mage_bench.results import write_records

POINTS = ("ratio=0.5", "ratio=0.75")
SEEDS = (0, 1)
MASKS = {"random:0.25": ("random", 0.25), "random:0.5": ("random", 0.5), "random:0.75": ("random", 0.75),
         "box:center": ("box", 0.3125)}
SECTION = "<h2>Masked reconstruction (inpainting)</h2>"
TRIPLET = '<img class="triplet"'


def _run_name(point: int, seed: int) -> str:
    return f"p{point}-s{seed}"


def _values(point: int, seed: int, ratio: float) -> dict[str, float]:
    """Each metric worsening with the ratio; the points and seeds shifted a little."""
    shift = 0.02 * point + 0.004 * seed
    return {"token_accuracy": 0.9 - 0.6 * ratio + shift, "psnr": 30 - 12 * ratio + 10 * shift,
            "fd": 4 + 20 * ratio - 10 * shift}


def _grid_png(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 24, 3), shade, dtype=np.uint8)).save(path)


def _inpaint_records(run: str, seed: int, point: int, grids: dict[str, str | None],
                     fd_extractors: tuple[str, ...], steps: int) -> list:
    records = []
    for mask, (family, ratio) in MASKS.items():
        common = {"mask": mask, "mask_family": family, "mask_ratio": ratio, "steps": steps, "temperature": 1.0,
                  "argmax": False, "paste_back": True, "dilate": 0, "grid": grids.get(mask)}
        values = _values(point, seed, ratio)
        records += [_record("inpaint", run, seed, "inpaint", "token_accuracy", values["token_accuracy"], True,
                            extractor="none", **common),
                    _record("inpaint", run, seed, "inpaint", "psnr", values["psnr"], True, extractor="none",
                            psnr_ceiling=60.0, **common)]
        for i, extractor in enumerate(fd_extractors):
            records.append(_record("inpaint", run, seed, "inpaint", "fd", values["fd"] + 50 * i, False,
                                   extractor=extractor, n_real=64, standard_extractor=extractor == "inception-v3",
                                   **common))
    return records


def write_inpaint_sweep(root: Path, fd_extractors: tuple[str, ...] = ("digits-cnn",),
                        grid_override: dict[tuple[str, str], str | None] | None = None,
                        steps: dict[str, int] | None = None) -> Path:
    """A sweep folder: 2 points x 2 seeds with linear, FID and inpaint records, and a triplet PNG per
    (run, mask) at its record's `grid` path (seed 0 shade 0, seed 1 shade 255, so a cell tells its run).
    grid_override: (run, mask) -> the `grid` value its records carry instead."""
    grid_override = grid_override or {}
    runs = []
    for i, point in enumerate(POINTS):
        for seed in SEEDS:
            run = _run_name(i, seed)
            runs.append({"sweep": "inpaint", "run": run, "point": point, "parameter": "masking.ratio",
                         "value": 0.5 + 0.25 * i, "seed": seed})
            grids = {}
            for mask in MASKS:
                grids[mask] = f"inpaint/{mask.replace(':', '-')}/grid.png"
                _grid_png(root / run / grids[mask], 255 * seed)
                grids[mask] = grid_override.get((run, mask), grids[mask])
            write_records(root / run / "eval" / "inpaint.json",
                          _inpaint_records(run, seed, i, grids, fd_extractors, (steps or {}).get(run, 8)))
            write_records(root / run / "eval" / "linear.json",
                          [_record("inpaint", run, seed, "linear", "top1", 0.6 + 0.01 * i + 0.001 * seed, True)])
            write_records(root / run / "eval" / "fid.json",
                          [_record("inpaint", run, seed, "fid", "fid", 30 - i + 0.1 * seed, False, n_real=64)])
    sweep = {"sweep": "inpaint", "parameter": "masking.ratio", "seeds": list(SEEDS), "runs": runs,
             "points": [{"label": p, "value": 0.5 + 0.25 * i} for i, p in enumerate(POINTS)]}
    (root / "sweep.json").write_text(json.dumps(sweep))
    return root


@pytest.fixture(scope="module")
def inpaint_report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inpaint")
    write_inpaint_sweep(root / "runs")
    build_report([root / "runs"], root / "report")
    return root / "report"


def _section(html: str) -> str:
    return html.split(SECTION)[1].split("<h2>")[0]


# --------------------------------------------------------------------------------------------
# summary.csv


def test_summary_keeps_every_mask_of_a_metric_apart(inpaint_report):
    summary = pd.read_csv(inpaint_report / "summary.csv")
    rows = summary[summary["evaluator"] == "inpaint"]
    assert len(rows) == len(POINTS) * len(MASKS) * 3  # one row per (point, mask, metric)
    assert not rows.duplicated(["point", "mask", "metric"]).any()
    assert (rows["count"] == len(SEEDS)).all()
    for i, point in enumerate(POINTS):
        for mask, (_, ratio) in MASKS.items():
            for metric in ("token_accuracy", "psnr", "fd"):
                row = rows[(rows["point"] == point) & (rows["mask"] == mask) & (rows["metric"] == metric)]
                expected = np.mean([_values(i, seed, ratio)[metric] for seed in SEEDS])
                assert row["mean"].item() == pytest.approx(expected)
    # The other evaluators group as before: no mask, one row per point with both seeds.
    others = summary[summary["evaluator"] != "inpaint"]
    assert others["mask"].isna().all() and len(others) == 2 * len(POINTS) and (others["count"] == 2).all()


def test_summarise_without_a_mask_column_is_unchanged():
    results = pd.DataFrame([{"role": "run", "point": "a", "evaluator": "knn", "metric": "top1",
                             "feature_extractor": "mage-probe", "k": k, "value": v, "higher_is_better": True}
                            for k, v in ((20, 0.5), (20, 0.7), (None, 0.1))])
    summary = summarise(results)
    assert "mask" not in summary
    assert summary["count"].tolist() == [2, 1] and summary["mean"].tolist() == pytest.approx([0.6, 0.1])
    assert summary["k"].iloc[0] == 20 and np.isnan(summary["k"].iloc[1])


# --------------------------------------------------------------------------------------------
# The page


def test_the_page_has_the_section_figure_and_one_triplet_per_cell(inpaint_report):
    html = (inpaint_report / "index.html").read_text()
    assert SECTION in html
    section = _section(html)
    assert 'src="data:image/png;base64,' in section and 'alt="inpainting metrics against the mask ratio"' in section
    assert section.count(TRIPLET) == len(MASKS) * len(POINTS)
    # Rows: random masks by ratio, then the geometric ones; columns: the points' lowest seeds.
    order = [section.index(f"<td><code>{m}</code></td>") for m in ("random:0.25", "random:0.5", "random:0.75",
                                                                   "box:center")]
    assert order == sorted(order)
    assert "p0-s0" in section and "p1-s0" in section and "p0-s1" not in section
    seed0 = inpaint_report.parent / "runs" / "p0-s0" / "inpaint" / "box-center" / "grid.png"
    assert base64.b64encode(seed0.read_bytes()).decode() in section
    assert "Each value is over 64 images." in section and "decoding: 8 steps, temperature 1, sampled" in section
    # After the metrics figures, before the sample grids.
    assert html.index('alt="metrics against the swept parameter"') < html.index(SECTION)
    # The Summary's note lists feature networks only ("none": token accuracy and PSNR use none).
    assert "Feature extractors: digits-cnn." in html


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "/etc/passwd", "../p0-s1/inpaint/random-0.5/grid.png"])
def test_grid_paths_leaving_the_run_folder_are_ignored(tmp_path, hostile):
    root = write_inpaint_sweep(tmp_path / "runs", grid_override={("p0-s0", "random:0.5"): hostile,
                                                                  ("p1-s0", "box:center"): None})
    html = build_report([root], tmp_path / "report").read_text()
    section = _section(html)
    assert section.count(TRIPLET) == len(MASKS) * len(POINTS) - 2  # those two cells are empty


def test_grid_path_guard(tmp_path):
    run = tmp_path / "run"
    _grid_png(run / "inpaint" / "ok.png", 0)
    _grid_png(tmp_path / "outside.png", 0)
    (run / "inpaint" / "link.png").symlink_to(tmp_path / "outside.png")
    assert report_inpaint.grid_path(run, "inpaint/ok.png") == (run / "inpaint" / "ok.png").resolve()
    for value in ("../outside.png", str(tmp_path / "outside.png"), "inpaint/link.png", None, float("nan"), ""):
        assert report_inpaint.grid_path(run, value) is None
    (run / "inpaint" / "text.png").write_text("not a png")
    assert report_inpaint.read_png(run / "inpaint" / "text.png") is None
    assert report_inpaint.read_png(run / "inpaint" / "missing.png") is None


def test_no_inpaint_records_no_section(tmp_path):
    write_grid_sweep(tmp_path / "runs", [("masking.spec", ["x", "y"])])
    html = build_report([tmp_path / "runs"], tmp_path / "report").read_text()
    assert SECTION not in html and TRIPLET not in html
    assert "mask" not in pd.read_csv(tmp_path / "report" / "summary.csv").columns


# --------------------------------------------------------------------------------------------
# The figure


def _frame(root: Path) -> pd.DataFrame:
    from mage_bench.report.collate import collect

    return collect([root]).results


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_each_fd_extractor_gets_its_own_panel(tmp_path):
    results = _frame(write_inpaint_sweep(tmp_path / "runs", fd_extractors=("digits-cnn", "inception-v3")))
    fig = report_inpaint.inpaint_figure(results, list(POINTS))
    titles = _titles(fig)
    assert titles == ["token accuracy (unknown tokens) ↑", "PSNR of the unknown pixels (dB) ↑",
                      "FD of completed images (digits-cnn; not Inception) ↓", "FID of completed images ↓"]
    # One fd panel per extractor, each with only its own values (the inception ones are 50 higher here).
    fd_digits, fd_inception = (fig.axes[titles.index(t)] for t in titles[2:])
    assert max(fd_digits.get_ylim()) < 40 < min(fd_inception.get_ylim())
    figures.pyplot().close(fig)


def test_the_figure_draws_lines_for_random_masks_and_states_the_decoding(tmp_path):
    results = _frame(write_inpaint_sweep(tmp_path / "runs"))
    fig = report_inpaint.inpaint_figure(results, list(POINTS))
    assert len(_titles(fig)) == 3
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_linestyle() == "-" and len(line.get_xdata()) == 3]
    assert len(lines) == len(POINTS)  # one line per point through its three random masks, sorted by ratio
    assert [list(line.get_xdata()) for line in lines] == [[0.25, 0.5, 0.75]] * len(POINTS)
    np.testing.assert_allclose(lines[0].get_ydata(), [np.mean([_values(0, s, r)["token_accuracy"] for s in SEEDS])
                                                      for r in (0.25, 0.5, 0.75)])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [*POINTS, "box:center"]
    assert "decoding: 8 steps, temperature 1, sampled" in fig._suptitle.get_text()
    figures.pyplot().close(fig)

    results = _frame(write_inpaint_sweep(tmp_path / "other", steps={"p1-s1": 12}))
    fig = report_inpaint.inpaint_figure(results, list(POINTS))
    assert "decoding settings differ between records (steps)" in fig._suptitle.get_text()
    figures.pyplot().close(fig)


def test_the_inpaint_report_never_imports_torch(tmp_path):
    write_inpaint_sweep(tmp_path / "runs")
    code = ("import sys; from mage_bench.report import build_report; "
            f"build_report([{str(tmp_path / 'runs')!r}], {str(tmp_path / 'report')!r}); "
            "assert 'torch' not in sys.modules, 'report imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_inpaint_page_renders_in_headless_chromium(inpaint_report, tmp_path):
    outcome = chromium_figures(inpaint_report / "index.html", tmp_path / "profile")
    if outcome is None:
        pytest.skip("no Chromium here (Debian: apt install chromium)")
    loaded, total, console = outcome
    assert loaded == total >= 1 + len(MASKS) * len(POINTS)  # the figure and every triplet decode
    assert not console, console


def test_the_untrained_reference_is_drawn_dashed_and_odd_records_are_skipped(tmp_path):
    results = _frame(write_inpaint_sweep(tmp_path / "runs"))
    reference = results[(results["evaluator"] == "inpaint") & (results["run"] == "p0-s0")].copy()
    reference["role"], reference["point"], reference["value"] = "reference", "reference: untrained model", 0.01
    odd = results[results["evaluator"] == "inpaint"].head(2).copy()
    odd["mask"], odd["point"] = np.nan, POINTS[0]  # a record that cannot be placed: left out, no error
    fig = report_inpaint.inpaint_figure(pd.concat([results, reference, odd], ignore_index=True), list(POINTS))
    dashed = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_xdata()) == [0.25, 0.5, 0.75]
    assert list(dashed[0].get_ydata()) == [0.01] * 3
    assert "reference: untrained model" in [t.get_text() for t in fig.legends[0].get_texts()]
    figures.pyplot().close(fig)
    no_mask_column = results.drop(columns=["mask"])
    assert report_inpaint.section(no_mask_column, list(POINTS), {}) is None
