"""What the benchmarks report, with their clocks replaced: the arithmetic from measured seconds to
samples/s."""
import argparse
import itertools
import types

import pytest
import torch

from loss import DraemLoss
from model_unet import DraemModel
from tools import bench_draem, bench_synthesis
from train_draem import train_step

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread


class Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 100

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.zeros(1)


def test_synthesis_samples_per_second_times_the_samples_after_the_first_batch(monkeypatch):
    """12 samples in batches of 4 after an untimed first batch, between clock readings 10 s and 13 s: 4
    samples/s."""
    batches = []
    real_iter = torch.utils.data.DataLoader.__iter__

    def counting_iter(loader):
        for batch in real_iter(loader):
            batches.append(len(batch))
            yield batch

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", counting_iter)
    clock = itertools.chain([10.0, 13.0])
    # its clock only
    monkeypatch.setattr(bench_synthesis, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert bench_synthesis.samples_per_second(Items(), samples=12, workers=0, batch_size=4) == 4.0
    assert batches == [4, 4, 4, 4]  # the first, untimed, then the 12 timed samples


def test_training_row_reports_samples_per_second_from_the_seconds_per_step(monkeypatch):
    """A batch of 2 in 0.25 s per step is 8 samples/s and 250 ms per step; 1e12 FLOP per step is 4 TFLOP/s."""
    monkeypatch.setattr(bench_draem, "seconds_per_call", lambda fn, calls, device: (fn(), 0.25)[1])
    args = argparse.Namespace(seed=0, base_width=4, seg_base_width=4, warmup=1, steps=1, batch_size=2)
    torch.manual_seed(0)
    batch = {"image": torch.rand(2, 3, 32, 32), "augmented_image": torch.rand(2, 3, 32, 32),
             "anomaly_mask": (torch.rand(2, 1, 32, 32) > 0.5).float()}
    row = bench_draem.bench_training(args, torch.device("cpu"), bench_draem.Options(), batch, {}, 10**12,
                                     {"bf16": 8.0, "fp32": 2.0})
    assert row["config"] == "fp32 eager"
    assert row["samples_per_s"] == 8.0 and row["step_ms"] == 250.0 and row["achieved_tflops"] == 4.0
    assert (row["fraction_of_bf16_matmul"], row["fraction_of_fp32_matmul"]) == (0.5, 2.0)
    # The first of its two steps starts from the seed's weights: the loss a fresh model's train step gives.
    torch.manual_seed(0)
    model = DraemModel(4, 4)
    first, *_ = train_step(model, model, DraemLoss(), torch.optim.Adam(model.parameters(), lr=1e-4),
                           batch["image"], batch["augmented_image"], batch["anomaly_mask"])
    assert row["first_loss"] == pytest.approx(first.item(), rel=1e-6)
    assert row["loss_after"] > 0 and row["loss_after"] != row["first_loss"]  # the second step's, after one
