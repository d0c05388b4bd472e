"""export_onnx.py: one graph image → (anomaly map, image score[, decisions]) that matches PyTorch at any batch
size."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from data_loader import make_training_sample
from loss import DraemLoss
from model_unet import DraemModel, anomaly_map
from util.checkpoints import save_checkpoint
from util.metrics import image_scores
from util.thresholds import write_thresholds

ort = pytest.importorskip("onnxruntime",
                          reason="onnxruntime is not installed (pip install -r requirements.txt)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -r requirements.txt)")

# Imported after the skips: export_onnx itself imports onnx and onnxruntime.
import export_onnx
from engine.evaluation import DraemScorer
from export_onnx import ThresholdedScorer, float32_at_least, main, onnx_bytes, parity

SIZE = 64
WIDTH = 4
# Largest |ONNX - PyTorch| accepted (export_onnx's --tolerance default). Measured on the trained model below:
# 1.5e-7 (map) and 2.7e-7 (score), float32 rounding of other conv kernels: a 370x margin (other training
# seeds: up to 5e-7). An untrained model is chaotic instead (40 random conv-BN layers amplify rounding): with
# BatchNorm statistics fitted to random images (test_predict.calibrated_model) its maps differed by 2e-5 to
# 9.8e-5 (seeds 0-2).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model() -> DraemModel:
    """A small model trained for 40 steps (as any exported model is), on synthetic samples from smooth random
    images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model on a shared machine: one thread is fastest
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    size = 32  # trained small, exported at SIZE: the network is fully convolutional
    images = [cv2.resize(small, (size, size))
              for small in rng.integers(0, 256, (16, size // 8, size // 8, 3), dtype=np.uint8)]
    model = DraemModel(base_width=WIDTH, seg_base_width=WIDTH)
    optimizer, criterion = torch.optim.Adam(model.parameters(), lr=1e-3), DraemLoss()
    for _ in range(40):
        batch = default_collate([make_training_sample(rng, len(images), images.__getitem__, noise_source)
                                 for _ in range(8)])
        reconstruction, logits = model(batch["augmented_image"])
        loss, _ = criterion(reconstruction, batch["image"], logits, batch["anomaly_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval()


def noise_source(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(model: DraemModel) -> bytes:
    return onnx_bytes(DraemScorer(model), SIZE)


@pytest.fixture(scope="module")
def session(exported: bytes) -> "ort.InferenceSession":
    return ort.InferenceSession(exported, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnx_matches_the_test_protocol_at_any_batch_size(model, session, batch_size):
    images = torch.rand(batch_size, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch_size))
    with torch.no_grad():
        expected_map = anomaly_map(model(images)[1])
    expected_scores = image_scores(expected_map)
    # not a constant output
    assert expected_map.std() > 1e-3 and (batch_size == 1 or expected_scores.std() > 1e-4)

    amap, scores = session.run(["anomaly_map", "image_score"], {"image": images.numpy()})

    assert amap.shape == (batch_size, 1, SIZE, SIZE) and scores.shape == (batch_size,)
    assert np.abs(amap - expected_map.numpy()).max() < TOLERANCE
    assert np.abs(scores - expected_scores.numpy()).max() < TOLERANCE


def test_graph_has_dynamic_batch_and_the_protocol_pooling(session, exported):
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape == ["batch", 3, SIZE, SIZE]
    assert [o.shape for o in session.get_outputs()] == [["batch", 1, SIZE, SIZE], ["batch"]]
    graph = onnx.load_model_from_string(exported).graph
    (pool,) = [node for node in graph.node if node.op_type == "AveragePool"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in pool.attribute}
    # avg_pool2d(21, stride 1, padding 10) with zero padding counted, exactly as metrics.image_scores.
    assert attributes["kernel_shape"] == [21, 21] and attributes["strides"] == [1, 1]
    assert attributes["pads"] == [10, 10, 10, 10] and attributes["count_include_pad"] == 1


def test_cli_exports_from_checkpoint_and_reports_parity(model, tmp_path, capsys):
    save_checkpoint(model, tmp_path / "ckpt", "tiny", "widget")
    output = tmp_path / "out" / "draem.onnx"

    worst = main(["--checkpoint_path", str(tmp_path / "ckpt"), "--base_model_name", "tiny", "--obj_id",
                  "widget", "--output", str(output), "--image_size", str(SIZE)])

    assert set(worst) == {"anomaly_map", "image_score"} and max(worst.values()) < TOLERANCE
    assert "max |diff|" in capsys.readouterr().out
    written = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = image_scores(anomaly_map(model(images)[1]))
    (scores,) = written.run(["image_score"], {"image": images.numpy()})
    assert np.abs(scores - expected.numpy()).max() < TOLERANCE
    assert not [p for p in output.parent.iterdir() if p != output]  # no temporary file left beside it


@pytest.mark.parametrize("flags", [["--image_size", "48"], ["--base_model_name", "missing"]])
def test_bad_input_is_one_line_and_exit_1(model, tmp_path: Path, capsys, flags):
    save_checkpoint(model, tmp_path, "tiny", "widget")
    args = ["--checkpoint_path", str(tmp_path), "--base_model_name", "tiny", "--obj_id", "widget",
            "--output", str(tmp_path / "m.onnx"), "--image_size", str(SIZE)]
    with pytest.raises(SystemExit) as exc:
        main(args + flags)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "m.onnx").exists()


def test_threshold_rounds_up_to_float32_so_the_graph_decides_like_python():
    for value in (0.7, 0.9, 0.3, 0.5):  # float32's nearest is below 0.7 and 0.9, above 0.3, equal for 0.5
        rounded = float32_at_least(value)
        assert float(np.float32(rounded)) == rounded and rounded >= value
        assert float(np.nextafter(np.float32(rounded), np.float32(0))) < value  # the smallest such float32


def export_with_thresholds(model, tmp_path, thresholds: dict | None,
                           *flags: str) -> tuple[dict, "ort.InferenceSession", str]:
    save_checkpoint(model, tmp_path / "ckpt", "tiny", "widget")
    if thresholds is not None:
        write_thresholds(tmp_path / "ckpt", "tiny", "widget", {**thresholds, "image_size": SIZE})
    output = tmp_path / "draem.onnx"
    worst = main(["--checkpoint_path", str(tmp_path / "ckpt"), "--base_model_name", "tiny", "--obj_id",
                  "widget", "--output", str(output), "--image_size", str(SIZE), *flags])
    return worst, ort.InferenceSession(str(output), providers=["CPUExecutionProvider"]), str(output)


def test_threshold_file_adds_decisions_equal_to_pytorch(model, tmp_path, capsys):
    images = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected_map = anomaly_map(model(images)[1]).numpy()
    expected_scores = image_scores(torch.from_numpy(expected_map)).numpy()
    ranked = np.sort(expected_scores)
    # the widest gap between two scores, some below and some above
    gap = int(np.argmax(np.diff(ranked)[1:-1])) + 1
    image_threshold = float((ranked[gap] + ranked[gap + 1]) / 2)
    pixel_threshold = float(np.median(expected_map))

    worst, session, _ = export_with_thresholds(model, tmp_path, {"image_threshold": image_threshold,
                                                                 "pixel_threshold": pixel_threshold})

    assert ([o.name for o in session.get_outputs()]
            == ["anomaly_map", "image_score", "is_anomalous", "defect_mask"])
    assert worst["is_anomalous"] == 0 and worst["defect_mask"] == 0 and max(worst.values()) < TOLERANCE
    out = capsys.readouterr().out
    assert f"is_anomalous = image_score >= {image_threshold:.6g}" in out
    assert f"defect_mask = anomaly_map >= {pixel_threshold:.6g}" in out
    amap, _, is_anomalous, mask = session.run(None, {"image": images.numpy()})
    assert is_anomalous.dtype == bool and mask.dtype == bool and mask.shape == (6, 1, SIZE, SIZE)
    # The image threshold sits mid-gap, farther than the float tolerance from every score (checked): exact
    # equality.
    assert ranked[gap + 1] - ranked[gap] > 2 * TOLERANCE
    np.testing.assert_array_equal(is_anomalous, expected_scores >= image_threshold)
    assert is_anomalous.any() and not is_anomalous.all()
    # Pixels: the graph's mask is exactly its own map at the threshold, and equals PyTorch's except where the
    # two float maps (within TOLERANCE of each other) fall on opposite sides of it, which float rounding
    # decides.
    np.testing.assert_array_equal(mask, amap >= pixel_threshold)
    rounding_decides = (amap >= pixel_threshold) != (expected_map >= pixel_threshold)
    np.testing.assert_array_equal(mask[~rounding_decides],
                                  (expected_map >= pixel_threshold)[~rounding_decides])
    assert mask.any() and not mask.all()


def test_threshold_flag_overrides_the_file_and_works_without_one(model, tmp_path):
    worst, session, _ = export_with_thresholds(model, tmp_path / "with_file",
                                               {"image_threshold": 2.0, "pixel_threshold": 0.5},
                                               "--threshold", "-1")
    assert set(worst) == {"anomaly_map", "image_score", "is_anomalous", "defect_mask"}
    (is_anomalous,) = session.run(["is_anomalous"],
                                  {"image": np.random.default_rng(0).random((2, 3, SIZE, SIZE), np.float32)})
    assert is_anomalous.tolist() == [True, True]  # -1 from the flag, not 2.0 from the file

    worst, session, _ = export_with_thresholds(model, tmp_path / "flag_only", None, "--threshold", "2")
    assert [o.name for o in session.get_outputs()] == ["anomaly_map", "image_score", "is_anomalous"]
    (is_anomalous,) = session.run(["is_anomalous"],
                                  {"image": np.random.default_rng(0).random((2, 3, SIZE, SIZE), np.float32)})
    assert is_anomalous.tolist() == [False, False]


def test_parity_counts_decisions_that_differ_and_main_refuses_them(model, tmp_path, monkeypatch, capsys):
    # every image and pixel anomalous
    everything = onnx_bytes(ThresholdedScorer(DraemScorer(model), -1.0, -1.0), SIZE)
    # PyTorch: none anomalous
    worst = parity(ThresholdedScorer(DraemScorer(model), 2.0, 2.0), everything, SIZE)
    # batch sizes 1 and 3
    assert worst["is_anomalous"] == 1 + 3 and worst["defect_mask"] == (1 + 3) * SIZE * SIZE

    monkeypatch.setattr(export_onnx, "parity",
                        lambda *args, **kwargs: {**worst, "anomaly_map": 0.0, "image_score": 0.0})
    with pytest.raises(SystemExit) as exc:
        export_with_thresholds(model, tmp_path, None, "--threshold", "0.5")
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "is_anomalous 4 elements" in err


@pytest.mark.parametrize("failure", ["float outputs", "decisions"])
def test_a_graph_that_fails_the_parity_check_is_never_written(model, tmp_path, monkeypatch, capsys, failure):
    """Nothing under the requested name (a file already there stays as it was), and no temporary file beside
    it."""
    save_checkpoint(model, tmp_path / "ckpt", "tiny", "widget")
    bad = {"anomaly_map": 0.0, "image_score": 0.0, "is_anomalous": 0.0}
    bad.update({"image_score": 1.0} if failure == "float outputs" else {"is_anomalous": 2.0})
    monkeypatch.setattr(export_onnx, "parity", lambda *args, **kwargs: bad)
    args = ["--checkpoint_path", str(tmp_path / "ckpt"), "--base_model_name", "tiny", "--obj_id", "widget",
            "--image_size", str(SIZE), "--threshold", "0.5"]
    for output, before in ((tmp_path / "new" / "draem.onnx", None),
                           (tmp_path / "old" / "draem.onnx", b"a good old graph")):
        if before is not None:
            output.parent.mkdir()
            output.write_bytes(before)
        with pytest.raises(SystemExit) as exc:
            main([*args, "--output", str(output)])
        assert exc.value.code == 1 and capsys.readouterr().err.startswith("error: ")
        assert (output.read_bytes() if output.exists() else None) == before
        assert (not output.parent.exists()
                or [p.name for p in output.parent.iterdir()] == ([output.name] if before else []))
