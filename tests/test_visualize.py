"""The training grid, the heat-map overlay and PNG writing."""
import cv2
import numpy as np
import pytest
import torch

from util.pictures import GAP, heatmap_overlay, save_png, training_grid

SIZE = 16


def grid_inputs(n: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(n, 3, SIZE, SIZE, generator=generator) for _ in range(3)]
    masks = [(torch.rand(n, 1, SIZE, SIZE, generator=generator) > 0.5).float() for _ in range(2)]
    return (*images, *masks)


def test_training_grid_layout_and_content():
    augmented, reconstruction, target, true_mask, pred_mask = grid_inputs(6)
    grid = training_grid(augmented, reconstruction, target, true_mask, pred_mask)
    assert grid.dtype == np.uint8
    assert grid.shape == (4 * SIZE + 3 * GAP, 5 * SIZE + 4 * GAP, 3)  # max_rows=4 of 6 samples

    step = SIZE + GAP
    second_row = slice(step, step + SIZE)
    # BGR channel order is kept, values are rounded to 0..255.
    expected_target = np.round(target[1].numpy().transpose(1, 2, 0) * 255)
    assert np.array_equal(grid[second_row, 2 * step : 2 * step + SIZE], expected_target)
    true_mask_cell = grid[second_row, 3 * step : 3 * step + SIZE]
    assert np.array_equal(true_mask_cell, np.repeat(true_mask[1, 0].numpy()[..., None] * 255, 3, axis=2))
    assert (grid[:, SIZE : SIZE + GAP] == 255).all() and (grid[SIZE : SIZE + GAP] == 255).all()


def test_training_grid_with_fewer_samples_than_rows():
    grid = training_grid(*grid_inputs(2), max_rows=4)
    assert grid.shape[0] == 2 * SIZE + GAP


def test_training_grid_rejects_mismatched_tensors():
    augmented, reconstruction, target, true_mask, _ = grid_inputs(2)
    with pytest.raises(ValueError, match="equal N, H, W"):
        training_grid(augmented, reconstruction, target, true_mask, torch.zeros(2, 1, 8, 8))


def overlay_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = torch.full((3, SIZE, SIZE), 0.5)
    anomaly_map = torch.zeros(1, SIZE, SIZE)
    anomaly_map[0, :, SIZE // 2 :] = 1.0  # right half anomalous
    gt_mask = torch.zeros(1, SIZE, SIZE)
    gt_mask[0, 4:10, 4:10] = 1.0
    return image, anomaly_map, gt_mask


def panels(overlay: np.ndarray) -> list[np.ndarray]:
    count = (overlay.shape[1] + GAP) // (SIZE + GAP)
    return [overlay[:, i * (SIZE + GAP) : i * (SIZE + GAP) + SIZE] for i in range(count)]


def test_overlay_panels_shape_and_plain_image():
    image, anomaly_map, gt_mask = overlay_inputs()
    overlay = heatmap_overlay(image, anomaly_map, gt_mask)
    assert overlay.dtype == np.uint8 and overlay.shape == (SIZE, 3 * SIZE + 2 * GAP, 3)
    assert (panels(overlay)[0] == 128).all()


def test_contour_panel_differs_exactly_when_a_mask_is_given():
    image, anomaly_map, gt_mask = overlay_inputs()
    plain, contour, _ = panels(heatmap_overlay(image, anomaly_map, gt_mask))
    changed = (plain != contour).any(axis=2)
    outline = np.zeros((SIZE, SIZE), bool)
    outline[4:10, 4:10] = True
    outline[5:9, 5:9] = False
    assert np.array_equal(changed, outline)
    assert (contour[outline] == (0, 0, 255)).all()
    plain, contour, _ = panels(heatmap_overlay(image, anomaly_map, torch.zeros(SIZE, SIZE)))
    assert np.array_equal(plain, contour)


def test_without_a_mask_the_contour_panel_is_left_out():
    image, anomaly_map, gt_mask = overlay_inputs()
    with_mask, without = heatmap_overlay(image, anomaly_map, gt_mask), heatmap_overlay(image, anomaly_map)
    assert without.shape == (SIZE, 2 * SIZE + GAP, 3)
    assert np.array_equal(panels(without)[0], panels(with_mask)[0])
    assert np.array_equal(panels(without)[1], panels(with_mask)[2])


def test_heat_panel_is_red_where_anomalous_and_blue_where_normal():
    image, anomaly_map, _ = overlay_inputs()
    heat = panels(heatmap_overlay(image, anomaly_map))[-1].astype(int)
    normal, anomalous = heat[:, : SIZE // 2], heat[:, SIZE // 2 :]
    assert (normal[..., 0] > normal[..., 2]).all()  # B > R
    assert (anomalous[..., 2] > anomalous[..., 0]).all()  # R > B


def test_heat_map_is_not_stretched_unless_asked():
    image, anomaly_map, _ = overlay_inputs()
    half, full = heatmap_overlay(image, 0.5 * anomaly_map), heatmap_overlay(image, anomaly_map)
    assert not np.array_equal(half, full)
    assert np.array_equal(heatmap_overlay(image, 0.5 * anomaly_map, normalize=True), full)


def test_score_is_written_in_the_heat_panel_only():
    image, anomaly_map, gt_mask = overlay_inputs()
    without = heatmap_overlay(image, anomaly_map, gt_mask)
    with_score = heatmap_overlay(image, anomaly_map, gt_mask, score=0.87)
    changed_columns = np.flatnonzero((without != with_score).any(axis=(0, 2)))
    assert changed_columns.size and changed_columns.min() >= 2 * (SIZE + GAP)


def test_overlay_rejects_a_map_of_the_wrong_size():
    image, _, _ = overlay_inputs()
    with pytest.raises(ValueError, match="anomaly_map"):
        heatmap_overlay(image, torch.zeros(SIZE, SIZE + 1))


def test_save_png_reads_back_identically(tmp_path):
    image, anomaly_map, gt_mask = overlay_inputs()
    overlay = heatmap_overlay(image, anomaly_map, gt_mask, score=0.5)
    path = tmp_path / "pictures" / "overlay.png"
    save_png(path, overlay)
    assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), overlay)
    assert [p.name for p in path.parent.iterdir()] == ["overlay.png"]
