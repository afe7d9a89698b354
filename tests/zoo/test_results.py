"""The results table: exact CSV round trip, crash-safe unit files, accuracy lookup."""
import csv
import math
import os

import pytest

from harmonizer_fast.zoo.results import (
    COLUMNS,
    ResultStore,
    SweepRow,
    load_accuracy_csv,
    lookup_accuracy,
    model_table,
    read_table,
    rows_equal,
    unit_key,
    write_table,
)


def _row(model="m", layer="l0", index=0, score=0.123456789012345, selected=False, top1=float("nan")):
    return SweepRow(model=model, benchmark="b", layer=layer, layer_index=index, score=score,
                    score_error=1e-17, ceiling=0.7, ceiled_score=score / 0.7, selection_score=-0.25,
                    selected=selected, choice_rule="pca1000-own-stimuli", n_features=64, imagenet_top1=top1, harmonized=False,
                    extraction_s=1.5, readout_s=0.25, layer_method="hooks")


def test_csv_round_trip_is_exact(tmp_path):
    rows = [_row(), _row(layer="l1", index=1, score=1 / 3, selected=True, top1=76.7)]
    path = tmp_path / "t.csv"
    write_table(rows, str(path))
    back = read_table(str(path))
    assert back[0].score == rows[0].score and back[1].ceiled_score == rows[1].ceiled_score
    assert math.isnan(back[0].imagenet_top1) and back[1].imagenet_top1 == 76.7
    assert back[1].selected is True and back[0].selected is False
    with open(path, newline="") as handle:
        assert next(csv.reader(handle)) == COLUMNS
    assert model_table(back) == [back[1]]


def test_truncated_part_is_not_done_and_is_redone(tmp_path):
    store = ResultStore(str(tmp_path))
    store.save_unit("a", [_row()])
    assert store.is_done("a")
    with open(store.part_path("a"), "rb") as handle:
        data = handle.read()
    with open(store.part_path("a"), "wb") as handle:  # what a non-atomic writer could leave
        handle.write(data[: len(data) - 20])
    assert not store.is_done("a")
    store.save_unit("a", [_row()])
    assert store.is_done("a")


def test_merge_keeps_sweep_order_and_ignores_missing_units(tmp_path):
    store = ResultStore(str(tmp_path))
    store.save_unit("second", [_row(model="y", selected=True)])
    store.save_unit("first", [_row(model="x"), _row(model="x", layer="l1", index=1, selected=True)])
    rows = store.merge(["first", "missing", "second"])
    assert [r.model for r in rows] == ["x", "x", "y"]
    assert rows_equal(read_table(store.table_path), rows)
    assert not rows_equal(rows, rows[:2]) and not rows_equal(rows[:1], rows[1:2])
    assert [r.model for r in read_table(store.models_path)] == ["x", "y"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_parquet_matches_csv_when_pyarrow_is_installed(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    store = ResultStore(str(tmp_path))
    store.save_unit("u", [_row(), _row(layer="l1", index=1, selected=True)])
    rows = store.merge(["u"])
    table = pq.read_table(store.parquet_path).to_pylist()
    assert [t["score"] for t in table] == [r.score for r in rows]


def test_empty_unit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        ResultStore(str(tmp_path)).save_unit("u", [])


def test_unit_key_changes_with_configuration():
    assert unit_key("m", "b", {"seed": 0}) == unit_key("m", "b", {"seed": 0})
    assert unit_key("m", "b", {"seed": 0}) != unit_key("m", "b", {"seed": 1})
    assert "/" not in unit_key("a/b", "c d", {})


def test_accuracy_csv(tmp_path):
    path = tmp_path / "acc.csv"
    path.write_text("model,top1,top5\nresnet18.a1_in1k,71.5,90\nconvnext_atto,75.7,93\n")
    table = load_accuracy_csv(str(path))
    assert lookup_accuracy("resnet18", table) == 71.5  # a timm tag suffix is dropped
    assert lookup_accuracy("resnet18.a1_in1k", table) == 71.5
    assert math.isnan(lookup_accuracy("vgg11", table))
    bad = tmp_path / "bad.csv"
    bad.write_text("name,acc\nx,1\n")
    with pytest.raises(ValueError, match="model, top1"):
        load_accuracy_csv(str(bad))


@pytest.mark.parametrize("label", ["=SUM(1;2)", "+1", "-2", "@cmd", "\tx", "\rx", "'=quoted", "'plain", "ok"])
def test_formula_prefixes_are_neutralised_and_round_trip(tmp_path, label):
    path = tmp_path / "t.csv"
    write_table([_row(model=label, layer=label)], str(path))
    with open(path, newline="") as handle:
        records = list(csv.reader(handle))
    cell = records[1][COLUMNS.index("model")]
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell  # inert in a spreadsheet
    assert cell == (label if label == "ok" else "'" + label)
    back = read_table(str(path))[0]
    assert back.model == label and back.layer == label


def test_timm_results_imagenet_csv(tmp_path):
    """timm's own results-imagenet.csv (its columns, pretrained tags, best tag first)."""
    path = tmp_path / "results-imagenet.csv"
    path.write_text(
        "model,img_size,top1,top1_err,top5,top5_err,param_count,crop_pct,interpolation\n"
        "resnet50.fb_swsl_ig1b_ft_in1k,224,81.180,18.820,95.986,4.014,25.56,0.875,bilinear\n"
        "resnet50.a1_in1k,288,81.214,18.786,95.104,4.896,25.56,1.000,bicubic\n"
        "efficientnet_lite0.ra_in1k,224,75.484,24.516,92.512,7.488,4.65,0.875,bicubic\n")
    table = load_accuracy_csv(str(path))
    assert lookup_accuracy("resnet50.a1_in1k", table) == 81.214
    assert lookup_accuracy("mine", table, aliases=["resnet50.a1_in1k"]) == 81.214
    assert lookup_accuracy("resnet50", table, aliases=["resnet50.a1_in1k"]) == 81.214  # the default tag first
    assert lookup_accuracy("efficientnet_lite0", table) == 75.484
