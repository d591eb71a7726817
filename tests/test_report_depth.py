"""The report's depth profile on synthetic records: probe accuracy against the block, best block, ranking."""

from __future__ import annotations

import pandas as pd
from test_report import _record  # noqa: I001  (tests/ is on the path)

from mage_bench.report import depth, figures
from mage_bench.report.collate import HEADLINES, official_view, select, summarise

POINTS = ["truncnorm", "fixed 0.75"]
DEPTH = 4


def _value(p: int, layer: int, pooling: str, seed: int) -> float:
    """Point 1 is better at block 1 only; every point peaks at block 2; cls pooling is worse."""
    return 0.5 + 0.1 * (layer == 2) + (0.05 if (p == 1) == (layer == 1) else 0) + 0.001 * seed - 0.2 * (pooling == "cls")


def _frame(rows_per_layer=True) -> pd.DataFrame:
    """2 points x 2 seeds; kNN top-1 at every block with mean and cls pooling. The points swap rank at block 1."""
    rows = []
    for p, point in enumerate(POINTS):
        for seed in (0, 1):
            run = f"p{p}-s{seed}"
            for layer in range(DEPTH) if rows_per_layer else [DEPTH - 1]:
                for pooling in ("mean", "cls"):
                    record = _record("s", run, seed, "knn", "top1", _value(p, layer, pooling, seed), True, extractor="mage-probe", k=20,
                                     layer=layer, pooling=pooling, depth=DEPTH)
                    rows.append({**record.as_dict(), "point": point, "role": "run"})
            rows.append({**_record("s", run, seed, "fid", "fid", 10.0 + p, False).as_dict(), "point": point,
                         "role": "run"})
    return pd.DataFrame(rows)


def test_headlines_and_the_summary_keep_the_official_feature_apart():
    frame = _frame()
    knn = select(frame, HEADLINES[1])
    assert len(knn) == 4 and set(knn["layer"]) == {DEPTH - 1} and set(knn["pooling"]) == {"mean"}
    assert len(select(frame, HEADLINES[4])) == 4  # records without a view (FID) stay
    assert official_view(frame.drop(columns=["layer", "pooling", "depth"])).all()
    summary = summarise(frame)
    knn_rows = summary[summary["evaluator"] == "knn"]
    assert len(knn_rows) == len(POINTS) * DEPTH * 2 and set(knn_rows["count"]) == {2}


def test_the_depth_profile_names_the_best_block_and_a_ranking_that_flips():
    frame = _frame()
    section = depth.section(frame, POINTS)
    tables = {t["metric"]: t for t in section["tables"]}
    mean = next(t for name, t in tables.items() if name.endswith("(mean)"))
    assert {b["point"]: b["layer"] for b in mean["best"]} == {"truncnorm": 2, "fixed 0.75": 2}
    assert not mean["stable"]  # block 1 puts the points the other way round
    orders = {o["layer"]: o["order"] for o in mean["orders"]}
    assert orders[1] == "fixed 0.75 > truncnorm" and orders[3] == "truncnorm > fixed 0.75"
    assert section["figure"]
    fig = depth.depth_figure(frame, POINTS)
    assert len([ax for ax in fig.axes if ax.get_title()]) == 2  # kNN (mean) and kNN (cls)
    figures.pyplot().close(fig)


def test_no_profile_without_two_blocks():
    assert depth.section(_frame(rows_per_layer=False), POINTS) is None
    assert depth.section(_frame().drop(columns=["layer"]), POINTS) is None


def _write_depth_sweep(root) -> None:
    """`_frame`'s records as a sweep folder (per run eval/knn.json and eval/fid.json) plus a fine-tuning
    record per run, so the page is built the way a sweep's is."""
    import json

    from mage_bench.results import write_records

    runs = []
    for p, point in enumerate(POINTS):
        for seed in (0, 1):
            run = f"p{p}-s{seed}"
            runs.append({"sweep": "s", "run": run, "point": point, "parameter": "masking.spec", "value": point,
                         "seed": seed})
            knn = [_record("s", run, seed, "knn", "top1", _value(p, layer, pooling, seed), True,
                           extractor="mage-probe", k=20, layer=layer, pooling=pooling, depth=DEPTH)
                   for layer in range(DEPTH) for pooling in ("mean", "cls")]
            write_records(root / run / "eval" / "knn.json", knn)
            write_records(root / run / "eval" / "fid.json", [_record("s", run, seed, "fid", "fid", 10.0 + p, False)])
            write_records(root / run / "eval" / "finetune.json",
                          [_record("s", run, seed, "finetune", "top1", 0.9 + 0.01 * seed, True,
                                   extractor="finetuned-encoder")])
    points = [{"label": p, "value": p} for p in POINTS]
    (root / "sweep.json").write_text(json.dumps({"sweep": "s", "parameter": "masking.spec", "points": points,
                                                 "seeds": [0, 1], "runs": runs}))


def test_the_page_shows_the_depth_section_and_fine_tuning_beside_the_official_feature(tmp_path):
    from conftest import chromium_figures  # noqa: I001

    from mage_bench.report import build_report

    _write_depth_sweep(tmp_path / "runs")
    index = build_report([tmp_path / "runs"], tmp_path / "report")
    html = index.read_text()
    section = html.split("<h2>Representation against depth</h2>")[1].split("<h2>")[0]
    text = " ".join(section.split())
    assert 'alt="probe accuracy against the encoder block"' in section
    assert "depends on the block probed" in text and "block 1: fixed 0.75 &gt; truncnorm" in text
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert {"layer", "pooling"} <= set(summary.columns)
    table = html.split("<h2>Summary</h2>")[1].split("<h2>")[0]
    assert "fine-tuning top-1" in table  # the finetune headline column
    # the table's kNN cell is the official view alone (last block, mean): point 0 = 0.55 + 0.001 x seed, point 1 = 0.5 + ...
    assert "0.550 ± 0.001" in table and "0.500 ± 0.001" in table  # (all views mixed: 0.463, 0.438)
    shown = chromium_figures(index, tmp_path / "chromium")
    if shown is not None:
        decoded, total, console = shown
        assert decoded == total and not console, shown
