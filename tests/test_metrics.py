"""The evaluation protocol (METHOD.md §6), AUPRO, F1-max and the results tables."""
import csv
import itertools
import json
import math

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from util.metrics import (
    METRICS,
    PAPER_RESULTS,
    DraemEvaluator,
    FullResolutionEvaluator,
    aupro,
    f1_max_threshold,
    format_markdown,
    image_scores,
    results_rows,
    write_results,
)

SIZE = 32


def blurred_defect_masks(rng: np.random.Generator, n: int) -> np.ndarray:
    """N×SIZE×SIZE float masks like the loader's: a coarse 0/1 mask bilinearly upsampled, so borders are
    fractional."""
    coarse = (rng.random((n, 8, 8)) < 0.3).astype(np.float32)
    coarse[0] = 0  # one good image
    return np.stack([cv2.resize(m, (SIZE, SIZE)) for m in coarse])


def fake_batch(seed: int, n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maps that are higher inside defects (border included), float masks, image labels."""
    rng = np.random.default_rng(seed)
    masks = blurred_defect_masks(rng, n)
    maps = np.clip(0.6 * rng.random(masks.shape) + 0.5 * (masks > 0), 0, 1).astype(np.float32)
    labels = (masks.reshape(n, -1).max(axis=1) > 0).astype(np.int64)
    return (torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None],
            torch.from_numpy(labels)[:, None])


def box_mean_max(image: np.ndarray) -> float:
    """Max of the 21×21 zero-padded box sum / 441, by explicit windows."""
    padded = np.pad(image, 10)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (21, 21))
    return float((windows.sum(axis=(-1, -2)) / 441).max())


def test_image_score_is_max_of_21x21_average_pooled_map():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 1, SIZE, SIZE)).astype(np.float32)
    maps[1, 0, :6, :6] = 1.0  # a corner defect: the zero padding lowers its pooled value
    scores = image_scores(torch.from_numpy(maps))
    assert scores.shape == (2,)
    for i in range(2):
        assert scores[i].item() == pytest.approx(box_mean_max(maps[i, 0]), abs=1e-6)
        assert scores[i].item() < maps[i].max()


def test_image_scores_rejects_two_channel_maps():
    with pytest.raises(ValueError, match="N×1×H×W"):
        image_scores(torch.zeros(1, 2, 8, 8))


def test_pixel_metrics_equal_sklearn_with_uint8_mask_cast():
    maps, masks, labels = fake_batch(seed=1)
    evaluator = DraemEvaluator(2, SIZE, SIZE)
    evaluator.update(maps, masks, labels)
    result = evaluator.compute()

    flat_maps = maps.numpy().ravel()
    cast = (masks.numpy().ravel() == 1.0).astype(np.uint8)
    assert 0 < cast.sum() < (masks.numpy().ravel() > 0).sum()  # the border pixels really drop out
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(cast, flat_maps), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(cast, flat_maps), abs=1e-12)
    # Without the cast (border pixels anomalous) the numbers would differ: the quirk is in effect.
    uncast = (masks.numpy().ravel() > 0).astype(np.uint8)
    assert result["pixel_auroc"] != pytest.approx(roc_auc_score(uncast, flat_maps), abs=1e-4)


def test_image_metrics_equal_sklearn_on_pooled_scores():
    maps, masks, labels = fake_batch(seed=2, n=6)
    evaluator = DraemEvaluator(6, SIZE, SIZE)
    evaluator.update(maps, masks, labels)
    result = evaluator.compute()
    scores = [box_mean_max(m[0]) for m in maps.numpy()]
    y = labels.numpy().ravel()
    assert 0 < y.sum() < len(y)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-6)
    assert result["image_ap"] == pytest.approx(average_precision_score(y, scores), abs=1e-6)
    assert set(result) == set(METRICS)
    assert all(0 <= v <= 1 for v in result.values())


def test_streaming_updates_equal_one_shot():
    maps, masks, labels = fake_batch(seed=3, n=5)
    one_shot = DraemEvaluator(5, SIZE, SIZE)
    one_shot.update(maps, masks, labels.reshape(-1))
    streamed = DraemEvaluator(5, SIZE, SIZE)
    for batch in (slice(0, 2), slice(2, 4), slice(4, 5)):
        streamed.update(maps[batch], masks[batch], labels[batch])
    assert streamed.compute() == one_shot.compute()


def test_single_class_gives_nan_with_warning():
    maps, masks, labels = fake_batch(seed=4, n=1)  # image 0 is good: one class only
    evaluator = DraemEvaluator(1, SIZE, SIZE)
    evaluator.update(maps, masks, labels)
    with pytest.warns(RuntimeWarning, match="only class 0"):
        result = evaluator.compute()
    assert all(math.isnan(v) for v in result.values())


@pytest.mark.parametrize(
    "maps, masks, labels, message",
    [
        (torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, SIZE, SIZE), torch.zeros(1), "shape"),
        (torch.zeros(1, 1, SIZE, SIZE), torch.full((1, 1, SIZE, SIZE), 255.0), torch.zeros(1), "divide"),
        (torch.zeros(1, 1, SIZE, SIZE), torch.zeros(1, 1, SIZE, SIZE), torch.tensor([2]), "labels"),
        (torch.zeros(3, 1, SIZE, SIZE), torch.zeros(3, 1, SIZE, SIZE), torch.zeros(3), "sized for 2"),
    ],
)
def test_evaluator_rejects_bad_batches(maps, masks, labels, message):
    with pytest.raises(ValueError, match=message):
        DraemEvaluator(2, SIZE, SIZE).update(maps, masks, labels)


def test_aupro_perfect_is_one_and_constant_is_fpr_limit_over_two():
    masks = (blurred_defect_masks(np.random.default_rng(5), 3) == 1.0).astype(np.uint8)
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    assert aupro(np.full(masks.shape, 0.5, np.float32), masks) == pytest.approx(0.15)
    assert aupro(np.full(masks.shape, 0.5, np.float32), masks, fpr_limit=1.0) == pytest.approx(0.5)


def reference_aupro(maps, masks, structure: np.ndarray, limit: float = 0.3) -> float:
    """Straightforward AUPRO: loop over thresholds, scipy regions, trapezoids cut at `limit`. maps and masks:
    N×H×W arrays, or lists of images of any sizes."""
    regions = []
    for m, g in zip(maps, masks):
        ids, n = ndimage.label(g, structure=structure)
        regions += [m[ids == k] for k in range(1, n + 1)]
    normal = np.concatenate([m[g == 0] for m, g in zip(maps, masks)])
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        points.append(((normal >= t).mean(), np.mean([(r >= t).mean() for r in regions])))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= limit:
            break
        if x1 > limit:
            y1, x1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0), limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def test_aupro_matches_threshold_loop_with_8_connected_regions():
    rng = np.random.default_rng(6)
    masks = (rng.random((3, 12, 12)) < 0.25).astype(np.uint8)
    maps = np.round(rng.random(masks.shape) * 0.7 + 0.3 * masks, 2).astype(np.float32)  # ties included
    eight, four = np.ones((3, 3)), ndimage.generate_binary_structure(2, 1)
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks, eight), abs=1e-9)
    assert aupro(maps, masks) != pytest.approx(reference_aupro(maps, masks, four), abs=1e-4)


def full_resolution(images: list[tuple], thresholded: bool = True) -> dict[str, float]:
    """FullResolutionEvaluator over (float16 map, bool truth, label, predicted mask, called) per image."""
    evaluator = FullResolutionEvaluator()
    for amap, truth, label, predicted, called in images:
        evaluator.update(amap, truth, label, *((predicted, called) if thresholded else ()))
    return evaluator.compute()


def test_full_resolution_aupro_005_equals_the_threshold_loop_on_images_of_different_sizes():
    rng = np.random.default_rng(8)
    images = []
    for shape in ((9, 14), (12, 7), (6, 6)):
        truth = rng.random(shape) < 0.2
        # float16 maps with ties: 64 levels, higher inside the defects
        amap = (np.round((rng.random(shape) * 0.7 + 0.3 * truth) * 64) / 64).astype(np.float16)
        images.append((amap, truth, int(truth.any()), None, None))
    expected = reference_aupro([m.astype(np.float64) for m, *_ in images], [t for _, t, *_ in images],
                               np.ones((3, 3)), limit=0.05)
    # Sums of the same region weights in another order: equal to rounding (1e-12 of a value near 1).
    assert full_resolution(images, thresholded=False)["aupro_005"] == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 1


def test_full_resolution_aupro_005_literal_cases():
    truth = np.zeros((8, 10), dtype=bool)
    truth[2:5, 3:7] = True
    perfect = [(truth.astype(np.float16), truth, 1, None, None)]
    assert full_resolution(perfect, thresholded=False)["aupro_005"] == pytest.approx(1.0, abs=1e-12)
    # A constant map: the curve jumps from (0, 0) to (1, 1), so it is the diagonal; its area up to 0.05 is
    # 0.05² / 2, divided by 0.05: 0.025.
    constant = [(np.full(truth.shape, 0.25, np.float16), truth, 1, None, None)]
    assert full_resolution(constant, thresholded=False)["aupro_005"] == pytest.approx(0.025, abs=1e-12)


def test_seg_f1_pools_all_pixels_of_all_images_and_class_f1_counts_images():
    # A (2×3, anomalous): truth [[1,1,0],[0,0,0]], mask [[1,0,1],[0,0,0]]: TP 1, FP 1, FN 1; called (label 1).
    # B (3×2, normal): mask with one pixel: FP 1; called (label 0).
    # C (2×2, anomalous): truth one pixel, empty mask: FN 1; not called (label 1).
    # SegF1 pooled: TP 1, FP 2, FN 2 -> 2·1 / (2·1 + 2 + 2) = 1/3 (the mean of per-image F1s would be (0.5 + 0
    # + 0) / 3).
    # ClassF1: TP 1 (A), FP 1 (B), FN 1 (C) -> 2 / (2 + 1 + 1) = 0.5.
    a_truth, a_mask = np.array([[1, 1, 0], [0, 0, 0]], bool), np.array([[1, 0, 1], [0, 0, 0]], bool)
    b_truth, b_mask = np.zeros((3, 2), bool), np.array([[0, 0], [1, 0], [0, 0]], bool)
    c_truth, c_mask = np.array([[1, 0], [0, 0]], bool), np.zeros((2, 2), bool)
    images = [(m.astype(np.float16), t, label, m, called)
              for t, m, label, called in ((a_truth, a_mask, 1, True), (b_truth, b_mask, 0, True),
                                          (c_truth, c_mask, 1, False))]
    got = full_resolution(images)
    assert got["seg_f1"] == pytest.approx(1 / 3, abs=1e-15) and got["class_f1"] == 0.5
    untresholded = full_resolution(images, thresholded=False)
    assert math.isnan(untresholded["seg_f1"]) and math.isnan(untresholded["class_f1"])


def test_full_resolution_evaluator_refuses_float32_maps_and_negative_values():
    truth = np.zeros((2, 2), bool)
    with pytest.raises(ValueError, match="float16"):
        FullResolutionEvaluator().update(np.zeros((2, 2), np.float32), truth, 0)
    with pytest.raises(ValueError, match="non-negative"):
        FullResolutionEvaluator().update(np.full((2, 2), -1, np.float16), truth, 0)


def test_aupro_rejects_bad_limit_and_warns_without_defects():
    masks = np.zeros((1, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks.astype(np.float32), masks, fpr_limit=0)
    with pytest.warns(RuntimeWarning):
        assert math.isnan(aupro(masks.astype(np.float32), masks))


def test_f1_max_known_case():
    # Threshold 0.35 keeps 3 images, 2 of them anomalous: precision 2/3, recall 1, F1 0.8 (the best).
    assert f1_max_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))[1] == pytest.approx(0.8)
    assert f1_max_threshold(np.array([0, 1]), np.array([0.2, 0.9]))[1] == pytest.approx(1.0)


def metrics_of(value: float) -> dict[str, float]:
    return {m: value for m in METRICS}


def test_results_rows_have_paper_values_deltas_and_mean():
    rows = results_rows([{"carpet": metrics_of(0.99), "grid": metrics_of(0.95)}])
    carpet, grid, mean = rows
    assert [r["category"] for r in rows] == ["carpet", "grid", "mean"]
    assert carpet["image_auroc"] == 99.0
    assert carpet["image_auroc_paper"] == PAPER_RESULTS["paper"]["carpet"]["image_auroc"] == 97.0
    assert carpet["image_auroc_delta"] == pytest.approx(2.0)
    assert grid["pixel_ap_delta"] == pytest.approx(95.0 - 65.7)
    assert mean["aupro"] == pytest.approx(97.0)
    assert mean["pixel_auroc_paper"] == pytest.approx(round((95.5 + 99.7) / 2, 1))
    assert "aupro_paper" not in carpet  # the paper has no AUPRO


def test_mean_row_over_all_15_categories_is_the_published_mean():
    rows = results_rows([{c: metrics_of(0.9) for c in PAPER_RESULTS["paper"]}])
    mean = rows[-1]
    assert len(rows) == 16
    for metric, published in PAPER_RESULTS["paper_mean"].items():
        assert mean[f"{metric}_paper"] == published


def test_unknown_and_nan_values_give_empty_cells():
    rows = results_rows([{"carpet": metrics_of(0.9), "demo_squares": {**metrics_of(0.8), "aupro": math.nan}}])
    demo, mean = rows[1], rows[2]
    assert demo["image_auroc_paper"] is None and demo["image_auroc_delta"] is None
    assert demo["aupro"] is None and mean["aupro"] is None
    assert mean["image_auroc_paper"] is None  # a mean over categories the paper lacks has no paper value
    assert "| demo_squares | 80.00 |  |  |" in format_markdown(rows)


def test_markdown_table_shows_values_paper_and_delta():
    text = format_markdown(results_rows([{"carpet": metrics_of(0.9612)}]))
    lines = text.strip().splitlines()
    assert len(lines) == 4  # header, rule, carpet, mean
    assert "image_auroc paper" in lines[0] and "image_auroc Δ" in lines[0]
    assert lines[2].startswith("| carpet | 96.12 | 97.0 | -0.88 |")
    assert lines[3].startswith("| mean | 96.12 | 97.0 | -0.88 |")


def test_write_results_writes_complete_md_csv_json(tmp_path):
    rows = results_rows([{"carpet": metrics_of(0.9), "demo_squares": metrics_of(0.7)}])
    paths = write_results(rows, tmp_path / "out", "results_run1")
    assert {p.name for p in paths.values()} == {"results_run1.md", "results_run1.csv", "results_run1.json"}
    assert paths["md"].read_text() == format_markdown(rows)
    assert json.loads(paths["json"].read_text()) == {"rows": rows, "provenance": None}
    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert [r["category"] for r in table] == ["carpet", "demo_squares", "mean"]
    assert float(table[0]["pixel_ap_delta"]) == pytest.approx(90.0 - 53.5)
    assert table[1]["pixel_ap_paper"] == ""
    assert list(tmp_path.joinpath("out").iterdir()) and not list(tmp_path.joinpath("out").glob(".*tmp"))


def test_several_runs_give_mean_and_sample_std_per_category_and_for_the_mean_row():
    runs = [{"carpet": metrics_of(0.90), "grid": metrics_of(0.80)},
            {"carpet": metrics_of(0.94), "grid": metrics_of(0.84)}]
    carpet, grid, mean = results_rows(runs)
    # carpet: runs 90 and 94 -> mean 92, sample std sqrt(((90-92)^2 + (94-92)^2) / (2-1)) = 2.83
    assert (carpet["image_auroc"], carpet["image_auroc_std"]) == (92.0, 2.83)
    assert (grid["pixel_ap"], grid["pixel_ap_std"]) == (82.0, 2.83)
    # mean row: the runs' category means are 85 and 89 -> 87 ± 2.83; the delta is against the mean
    assert (mean["aupro"], mean["aupro_std"]) == (87.0, 2.83)
    assert carpet["image_auroc_delta"] == round(92.0 - carpet["image_auroc_paper"], 2)
    assert "| 92.00 ± 2.83 |" in format_markdown([carpet, grid, mean])
    assert "image_auroc_std" not in results_rows(runs[:1])[0]  # one run: plain values, no spread columns
