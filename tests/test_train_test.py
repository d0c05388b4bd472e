"""train_draem.py and test_draem.py end to end on a tiny generated dataset, provenance, resume, interruption,
bad input."""
import json
import os
import signal
import subprocess
from pathlib import Path

import cv2
import pytest
import torch
from test_predict import calibrated_model

import test_draem
import train_draem
from util.checkpoints import checkpoint_paths, run_base_name, save_checkpoint
from util.metrics import METRICS, TABLE_METRICS

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--image_size", "64", "--base_width", "4", "--seg_base_width", "4", "--bs", "4", "--workers", "0",
         "--seed", "0"]


def train_args(data, out: Path, epochs: int = 2, category: str = "brick") -> list[str]:
    return ["--obj_id", category, "--data_path", str(data.mvtec_root), "--anomaly_source_path",
            str(data.texture_root), "--epochs", str(epochs), "--checkpoint_path", str(out / "ckpt"),
            "--log_path", str(out / "logs"), *SMALL]


def read_states(folder: Path, epochs: int = 2, category: str = "brick") -> list[dict]:
    return [torch.load(p, weights_only=True)
            for p in checkpoint_paths(folder, run_base_name(1e-4, epochs, 4), category)]


def test_train_then_test_end_to_end(tiny_mvtec, tmp_path, monkeypatch):
    steps, real_step = [], train_draem.train_step

    def recording_step(*args, **kwargs):
        loss, parts, *rest = real_step(*args, **kwargs)
        steps.append({"loss": loss.item(), **{name: value.item() for name, value in parts.items()}})
        return (loss, parts, *rest)

    monkeypatch.setattr(train_draem, "train_step", recording_step)
    train_draem.main([*train_args(tiny_mvtec, tmp_path), "--visualize", "--visualize_every", "2"])
    base = run_base_name(1e-4, 2, 4)
    assert base == "DRAEM_test_0.0001_2_bs4"
    rec, seg = checkpoint_paths(tmp_path / "ckpt", base, "brick")
    assert rec.name == "DRAEM_test_0.0001_2_bs4_brick_.pckl" and rec.is_file()
    assert seg.name == "DRAEM_test_0.0001_2_bs4_brick__seg.pckl" and seg.is_file()
    log = [json.loads(line)
           for line in (tmp_path / "logs" / f"{base}_brick_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    # 6 images in batches of 4: 2 steps per epoch; the log holds each epoch's mean of its steps
    # (float32: 1e-6).
    assert len(steps) == 4 and steps[0]["loss"] != steps[1]["loss"]
    for epoch, record in enumerate(log):
        for key in ("loss", "l2", "ssim", "focal"):
            mean = (steps[2 * epoch][key] + steps[2 * epoch + 1][key]) / 2
            assert record[key] == pytest.approx(mean, rel=1e-6), key
    assert list((tmp_path / "logs").glob("*_step*.png")), "--visualize wrote no sample grid"

    results = test_draem.main(["--obj_id", "brick", "--data_path", str(tiny_mvtec.mvtec_root),
                               "--checkpoint_path", str(tmp_path / "ckpt"), "--base_model_name", base,
                               "--image_size", "64", "--output_dir", str(tmp_path / "results"),
                               "--save_images"])
    assert (tmp_path / "ckpt" / f"{base}_brick_threshold.json").is_file(), "training calibrated no thresholds"
    assert set(results["brick"]) == set(TABLE_METRICS)  # the _at_t ones: training wrote a threshold file
    # precision is NaN if none is called
    assert all(0.0 <= results["brick"][m] <= 1.0 for m in (*METRICS, "image_recall_at_t"))
    table = json.loads((tmp_path / "results" / f"results_{base}.json").read_text())
    assert [row["category"] for row in table["rows"]] == ["brick", "mean"]
    assert all(table["rows"][0][m] is not None for m in METRICS)
    n_test = len(list((tiny_mvtec.mvtec_root / "brick" / "test").glob("*/*.png")))
    assert len(list((tmp_path / "results" / "overlays" / "brick").glob("*.png"))) == n_test
    assert not list(tmp_path.rglob("*.lock")), "the run left its lock files behind"

    # Provenance: the results, the thresholds and the resume file say what produced them; the report shows it.
    thresholds = json.loads((tmp_path / "ckpt" / f"{base}_brick_threshold.json").read_text())
    resume = torch.load(train_draem.resume_path(tmp_path / "ckpt", base, "brick"), weights_only=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=False).stdout.strip()
    for record, program in ((table["provenance"], "test_draem.py"),
                            (thresholds["provenance"], "train_draem.py"),
                            (resume["provenance"], "train_draem.py")):
        assert record["program"] == program
        assert record["commit"].startswith(head or "unknown")
        assert {"torch", "torchvision", "numpy", "opencv", "scikit-learn"} <= set(record["versions"])
        assert record["versions"]["torch"] == str(torch.__version__)
        assert record["device"].startswith("cpu") and record["threads"] == torch.get_num_threads()
        assert tuple(record["flags"]["image_size"]) == (64, 64)  # --image_size 64: (height, width)
    assert table["provenance"]["flags"]["base_model_name"] == [base]
    assert thresholds["provenance"]["flags"]["epochs"] == 2
    report = (tmp_path / "results" / "report.html").read_text()
    assert f"torch {torch.__version__}" in report and table["provenance"]["commit"] in report


def stop_in_epoch_2(monkeypatch, stop: str) -> None:
    """Seam: the third training step (the first of epoch 2: 6 images, batch 4) is interrupted by Ctrl-C, or
    SIGTERM arrives there (the real signal, handled by the program's own handler)."""
    real_step, calls = train_draem.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            if stop == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_draem, "train_step", step)


def assert_resume_reproduces_an_uninterrupted_run(argv: list[str], tmp_path: Path, monkeypatch, capsys,
                                                  stop: str = "ctrl-c") -> None:
    """Train 2 epochs straight; train again but stop it in epoch 2 (Ctrl-C or SIGTERM): one line, exit 130 or
    143; then --resume: same final weights."""
    train_draem.main([*argv, "--checkpoint_path", str(tmp_path / "full" / "ckpt"), "--log_path",
                      str(tmp_path / "full" / "logs")])
    cut = [*argv, "--checkpoint_path", str(tmp_path / "cut" / "ckpt"), "--log_path",
           str(tmp_path / "cut" / "logs")]
    capsys.readouterr()
    with monkeypatch.context() as patch:
        stop_in_epoch_2(patch, stop)
        with pytest.raises(SystemExit) as stopped:
            train_draem.main(cut)
    assert stopped.value.code == (143 if stop == "sigterm" else 130)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: brick: interrupted after epoch 1 of 2; resume with --resume", err[-3:]
    assert not [line for line in err if "Traceback" in line]
    assert not list((tmp_path / "cut").rglob("*.lock")), "an interrupted run left its lock behind"
    train_draem.main([*cut, "--resume"])
    for full, resumed in zip(read_states(tmp_path / "full" / "ckpt"), read_states(tmp_path / "cut" / "ckpt")):
        assert list(full) == list(resumed)
        for key in full:
            torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_resume_reproduces_an_uninterrupted_run(tiny_mvtec, tmp_path, monkeypatch, capsys, stop):
    assert_resume_reproduces_an_uninterrupted_run(train_args(tiny_mvtec, tmp_path), tmp_path, monkeypatch,
                                                  capsys, stop)
    logged = (tmp_path / "cut" / "logs" / "DRAEM_test_0.0001_2_bs4_brick_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in logged] == [1, 2]


def test_fast_options_train_and_their_checkpoints_load_in_the_plain_path(tiny_mvtec, tmp_path):
    fast = ["--synthesis", "gpu", "--precision", "bf16", "--channels_last"]
    train_draem.main([*train_args(tiny_mvtec, tmp_path), *fast])
    log = [json.loads(line) for line in (
        tmp_path / "logs" / "DRAEM_test_0.0001_2_bs4_brick_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(0 < r["loss"] < 10 for r in log)
    results = test_draem.main(["--obj_id", "brick", "--data_path", str(tiny_mvtec.mvtec_root),
                               "--checkpoint_path", str(tmp_path / "ckpt"), "--base_model_name",
                               "DRAEM_test_0.0001_2_bs4", "--image_size", "64", "--output_dir",
                               str(tmp_path / "results")])
    assert all(0.0 <= results["brick"][m] <= 1.0 for m in METRICS)


def test_device_synthesis_resumes_exactly_without_workers(tiny_mvtec, tmp_path, monkeypatch, capsys):
    argv = [*train_args(tiny_mvtec, tmp_path), "--synthesis", "gpu"]
    assert_resume_reproduces_an_uninterrupted_run(argv, tmp_path, monkeypatch, capsys)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        tiny_mvtec, tmp_path, monkeypatch, capsys):
    class LossThatExplodes(train_draem.DraemLoss):
        calls = 0

        def forward(self, *args, **kwargs):
            total, parts = super().forward(*args, **kwargs)
            LossThatExplodes.calls += 1
            return (total * float("nan") if LossThatExplodes.calls == 3 else total), parts

    monkeypatch.setattr(train_draem, "DraemLoss", LossThatExplodes)
    with pytest.raises(SystemExit) as stopped:
        train_draem.main(train_args(tiny_mvtec, tmp_path))  # 6 images, batch 4: 2 steps per epoch
    assert stopped.value.code == 1
    assert "loss became nan at epoch 2, step 3" in capsys.readouterr().err.strip().splitlines()[-1]
    log = (tmp_path / "logs" / "DRAEM_test_0.0001_2_bs4_brick_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1]
    for state in read_states(tmp_path / "ckpt"):
        assert all(torch.isfinite(v.float()).all() for v in state.values())


@pytest.mark.usefixtures("one_thread")
def test_save_images_writes_every_runs_overlays_when_several_base_names_are_tested(tiny_mvtec, tmp_path):
    for seed, base in enumerate(("run_a", "run_b")):
        save_checkpoint(calibrated_model(4, seed=seed), tmp_path / "ckpt", base, "brick")
    test_draem.main(["--obj_id", "brick", "--data_path", str(tiny_mvtec.mvtec_root), "--checkpoint_path",
                     str(tmp_path / "ckpt"), "--base_model_name", "run_a", "run_b", "--image_size", "64",
                     "--device", "cpu", "--output_dir", str(tmp_path / "results"), "--save_images"])
    names = sorted(f"{p.parent.name}_{p.stem}.png"
                   for p in (tiny_mvtec.mvtec_root / "brick" / "test").glob("*/*.png"))
    overlays = {base: sorted(p.name
                             for p in (tmp_path / "results" / "overlays" / base / "brick").glob("*.png"))
                for base in ("run_a", "run_b")}
    assert overlays == {"run_a": names, "run_b": names}
    # Each run's own maps: the two models score the images differently, so their pictures differ.
    first, second = (cv2.imread(str(tmp_path / "results" / "overlays" / base / "brick" / names[0]))
                     for base in overlays)
    assert first.shape == second.shape and (first != second).any()
