"""The GPU path's logic that a CPU can check: device choice (torchrun included), the fp32 precision policy,
--deterministic and its matrix upsampling, the exact uint8-to-float table, the resume refusal across device
types, the compiled-graph bound, the category-parallel job split and the device check's summary.
tests/test_cuda.py checks the same things on a GPU."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import device_synthesis
import model_unet
import train_draem
from loss import DraemLoss
from model_unet import DraemModel, MatrixUpsample, deterministic_upsampling
from tools import bench_draem, device_check
from util import distributed, runtime
from util.checkpoints import checkpoint_paths, run_base_name
from util.errors import DraemInputError
from util.images import to_float as cpu_to_float

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread
EPS32 = float(np.finfo(np.float32).eps)  # 2**-23


@pytest.fixture
def four_gpus(monkeypatch):
    """A pretend machine with 4 CUDA devices: availability and count patched, set_device recorded."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    return current


def test_a_cuda_device_becomes_current_before_anything_uses_cuda(four_gpus):
    """--gpu_id 2 must not leave GPU 0 as the current device: pinned memory, cuBLAS handles and device-less
    torch.cuda calls would open a context there."""
    assert runtime.select_device("cuda", 2) == torch.device("cuda", 2)
    assert four_gpus == [torch.device("cuda", 2)]
    assert runtime.select_device("cuda:3") == torch.device("cuda", 3)
    assert four_gpus[-1] == torch.device("cuda", 3)
    assert runtime.select_device("cpu", 3) == torch.device("cpu") and len(four_gpus) == 2
    # `auto` with a GPU present is `cuda`, so it follows --gpu_id; an index in --device wins over --gpu_id.
    assert runtime.select_device("auto", 2) == torch.device("cuda", 2)
    assert runtime.select_device("cuda:1", 3) == torch.device("cuda", 1)
    with pytest.raises(DraemInputError, match="this machine has 4"):
        runtime.select_device("cuda:4")


def test_under_torchrun_process_i_trains_on_gpu_i_and_a_fixed_index_is_refused(four_gpus):
    for name in ("cuda", "auto"):
        devices = [runtime.torchrun_device(name, 0, rank, 4) for rank in range(4)]
        assert devices == [torch.device("cuda", i) for i in range(4)]
    for name, gpu_id, flag in (("cuda:1", 0, "--device cuda:1"), ("cuda", 2, "--gpu_id 2")):
        for processes in (2, 4):  # two processes on one GPU collide as surely as four
            expected = f"{flag} under torchrun with {processes} processes.*CUDA_VISIBLE_DEVICES"
            with pytest.raises(DraemInputError, match=expected):
                runtime.torchrun_device(name, gpu_id, 0, processes)
        # One process on the machine: nothing to collide with, so the index is used as given.
        assert runtime.torchrun_device(name, gpu_id, 0, 1) == torch.device("cuda", int(flag[-1]))
    assert runtime.torchrun_device("cpu", 3, 1, 4) == torch.device("cpu")


def test_the_process_group_binds_each_process_to_its_local_gpu(four_gpus, monkeypatch):
    """DDP: nccl on cuda:LOCAL_RANK; --parallel categories: a gloo group that waits days, not minutes."""
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls.append((backend, kwargs)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    with distributed.process_group("cuda") as device:
        assert device == torch.device("cuda", 1) == four_gpus[-1]
    with distributed.process_group("auto", coordination_only=True) as device:
        assert device == torch.device("cuda", 1)
    assert calls[0] == ("nccl", {"device_id": torch.device("cuda", 1)})
    assert calls[1][0] == "gloo" and calls[1][1]["timeout"].total_seconds() >= 24 * 3600


def test_the_fp32_precision_policy_sets_tf32_for_convolutions_only_or_nowhere():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        runtime.set_fp32_precision("strict")
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
        assert runtime.precision_policy("cuda:0")["fp32_precision"] == "strict"  # what provenance records
        runtime.set_fp32_precision("tf32")  # torch's own defaults, written out
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, False)
        assert runtime.precision_policy("cuda:0")["fp32_precision"] == "tf32"
        assert runtime.precision_policy("cpu")["fp32_precision"] == "ieee (cpu)"  # no policy applies there
        with pytest.raises(ValueError, match="--fp32_precision"):
            runtime.set_fp32_precision("fp16")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert train_draem.parse_args(["--data_path", "x"]).fp32_precision == "tf32"


def test_deterministic_switches_torch_to_deterministic_kernels_and_back(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        runtime.set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        # one of the two settings cuBLAS documents as deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        runtime.set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 1, 1), (2, 4, 8, 8)])
def test_matrix_upsampling_is_nn_upsample_forward_and_backward(shape):
    """Same weights (1 - t, t) as nn.Upsample's bilinear align_corners=True, summed in another order: each
    output is 2 products per axis, each input gradient at most 3 x 3 of them, so both agree to a few float32
    roundings of their size (16 eps relative to the largest value)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = x.detach().clone().requires_grad_()
    expected = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)(x)
    got = MatrixUpsample(2)(y)
    assert got.shape == expected.shape == (*shape[:2], 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(got, expected, rtol=0, atol=16 * EPS32 * expected.abs().max().item())
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    expected.backward(upstream)
    got.backward(upstream)
    torch.testing.assert_close(y.grad, x.grad, rtol=0, atol=16 * EPS32 * x.grad.abs().max().item())
    # computed in float32 and handed back in the input's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert MatrixUpsample(2)(x.detach().bfloat16()).dtype == torch.bfloat16


def test_matrix_upsampling_builds_its_matrices_once_per_size_and_device(monkeypatch):
    """The interpolation matrices are constants of the input size: made at the first forward, not in every
    training step's (on a GPU each is a dozen tiny kernels)."""
    built, build = [], model_unet.interpolation_matrix

    def counted(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
        built.append((size_in, size_out))
        return build(size_in, size_out, device)

    monkeypatch.setattr(model_unet, "interpolation_matrix", counted)
    upsample = MatrixUpsample(2)
    for _ in range(3):
        upsample(torch.rand(1, 2, 4, 6))
    assert sorted(built) == [(4, 8), (6, 12)]


def test_deterministic_upsampling_keeps_the_checkpoint_and_the_forward():
    """9 upsamplings (4 reconstructive, 5 discriminative) swapped; keys and values unchanged; forward equal to
    float rounding through the network (1e-5 relative: a small untrained model in eval mode)."""
    torch.manual_seed(0)
    model = DraemModel(4, 4).eval()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(image)
        assert deterministic_upsampling(model) is model
        got = model(image)
    assert sum(isinstance(m, MatrixUpsample) for m in model.modules()) == 9
    assert not any(isinstance(m, nn.Upsample) for m in model.modules())
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    for g, e in zip(got, expected):
        assert ((g - e).norm() / e.norm()).item() < 1e-5


def test_device_float_table_is_the_cpu_division_for_all_256_levels():
    """The device path looks every uint8 level up in a table; it must hold the correctly rounded float32
    k/255, which float64 division rounded once gives (float64 has more than 2·24 + 2 bits, so the double
    rounding is harmless). Multiplying by a float32 1/255, as CUDA does for `x / 255`, misses 126 levels."""
    levels = np.arange(256)
    correctly_rounded = (levels / 255.0).astype(np.float32)
    table = device_synthesis.to_float(torch.arange(256, dtype=torch.uint8)).numpy()
    np.testing.assert_array_equal(table, correctly_rounded)
    np.testing.assert_array_equal(table, cpu_to_float(levels.astype(np.uint8)))
    reciprocal = levels.astype(np.float32) * (np.float32(1) / np.float32(255))
    assert (reciprocal != correctly_rounded).sum() == 126
    image = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(device_synthesis.to_float(image).numpy(), cpu_to_float(image.numpy()))


def tiny_training(data, out: Path, *extra: str) -> list[str]:
    return ["--obj_id", "brick", "--data_path", str(data.mvtec_root), "--anomaly_source_path",
            str(data.texture_root), "--image_size", "64", "--base_width", "4", "--seg_base_width", "4",
            "--bs", "4", "--workers", "0", "--device", "cpu", "--calibration_samples", "16",
            "--checkpoint_path", str(out / "ckpt"), "--log_path", str(out / "logs"), *extra]


def test_a_synthesis_generator_on_another_device_than_the_images_is_refused():
    """The generator-device contract, checked before any draw (on a GPU machine, test_cuda checks a CUDA
    generator with CPU images and back): here images on the meta device and a CPU generator."""
    images = torch.empty(2, 3, 8, 8, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match=r"generator lives on cpu, the images on meta.*device_generator"):
        device_synthesis.synthesize_batch(images, None, torch.Generator())


def test_resuming_a_device_synthesis_run_on_the_other_device_type_is_one_line(tiny_mvtec, tmp_path, capsys):
    """A CUDA generator's state is 16 bytes (seed and offset), a CPU one's 5056 (Mersenne Twister): a
    --synthesis gpu run written on a GPU cannot continue its stream on the CPU. One line naming the fix, and
    nothing written."""
    argv = tiny_training(tiny_mvtec, tmp_path, "--synthesis", "gpu", "--epochs", "1")
    train_draem.main(argv)
    resume_file = train_draem.resume_path(tmp_path / "ckpt", run_base_name(1e-4, 1, 4), "brick")
    state = torch.load(resume_file, weights_only=False)
    assert state["rng"][0]["synthesis"].numel() == torch.Generator().get_state().numel() == 5056
    # what a CUDA generator's get_state() holds
    state["rng"][0]["synthesis"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, resume_file)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        train_draem.main([*argv, "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 1 and len(err) == 1, err
    assert "drawn on cuda" in err[0] and "resume it with --device cuda" in err[0]
    assert str(resume_file) in err[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before


def test_deterministic_seeds_train_one_run_each_and_one_summary_lists_them(tiny_mvtec, tmp_path, monkeypatch):
    """--seed 0 1 trains two runs (names <base> and <base>_seed1); --deterministic swaps the model's
    upsampling during training and keeps the released checkpoint keys; the summary's provenance records
    the precision policy and determinism."""
    swapped = []
    monkeypatch.setattr(train_draem, "deterministic_upsampling",
                        lambda model: swapped.append(deterministic_upsampling(model)))
    try:
        train_draem.main(tiny_training(tiny_mvtec, tmp_path, "--epochs", "1", "--seed", "0", "1",
                                       "--deterministic"))
    finally:
        runtime.set_deterministic(False)
    assert len(swapped) == 2
    keys = list(DraemModel(4, 4).reconstructive_subnetwork.state_dict())
    for seed in (0, 1):
        rec, seg = checkpoint_paths(tmp_path / "ckpt", run_base_name(1e-4, 1, 4, seed), "brick")
        assert list(torch.load(rec, weights_only=True)) == keys and seg.is_file()
    summary = json.loads((tmp_path / "logs" / f"{run_base_name(1e-4, 1, 4)}_2seeds_summary.json").read_text())
    assert [(run["seed"], run["epochs"]) for run in summary["runs"]] == [(0, 1), (1, 1)]
    made_with = summary["provenance"]
    assert made_with["deterministic"] is True and made_with["fp32_precision"] == "ieee (cpu)"
    assert summary["processes"] == 1 and made_with["program"] == "train_draem.py"


def count_compiled_graphs(make_model, train_sizes, eval_sizes, image_size: int) -> tuple[int, int, int]:
    """(graphs compiled, forwards run through a compiled graph, forwards) over two models (two categories)
    trained on batches of `train_sizes` and evaluated on `eval_sizes`; the backend runs the captured graph
    eagerly."""
    graphs, compiled_runs, calls = [], [0], 0

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            compiled_runs[0] += 1
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    try:
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = runtime.prepare_model(make_model(), compile=True, compile_backend=backend)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            for n in train_sizes:
                image = torch.rand(n, 3, image_size, image_size)
                mask = (torch.rand(n, 1, image_size, image_size) > 0.5).float()
                if isinstance(model, DraemModel):
                    train_draem.train_step(model, model, DraemLoss(), optimizer, image, image, mask)
                else:  # the way train_step and the scorer call a model
                    model(runtime.model_input(model, image, False)).square().mean().backward()
                calls += 1
            model.eval()
            with torch.no_grad():
                for n in eval_sizes:
                    model(runtime.model_input(model, torch.rand(n, 3, image_size, image_size), False))
                    calls += 1
    finally:
        torch._dynamo.reset()
    return len(graphs), compiled_runs[0], calls


def test_a_compiled_model_needs_one_graph_per_mode_for_every_batch_size():
    """Batch sizes 4, 3, 4 (a last partial batch) in training and 4, 3, 2 in evaluation, on two models: a
    dynamic batch dimension gives one graph per mode, and every forward runs compiled, none falls back to
    eager. (Compiled static, as before, the training graph is compiled twice: for size 4, then again,
    dynamic, at the first other size.) A conv-BN-upsampling stack, quick to trace; the full model's run is
    opt-in below (~15 s more on 2 cores)."""
    def small():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))

    graphs, compiled_runs, calls = count_compiled_graphs(small, (4, 3, 4), (4, 3, 2), 8)
    assert (graphs, compiled_runs) == (2, calls)


def test_a_compiled_draem_needs_one_graph_per_mode_for_every_batch_size():
    graphs, compiled_runs, calls = count_compiled_graphs(lambda: DraemModel(4, 4), (4, 3, 4), (4, 3, 2), 32)
    assert (graphs, compiled_runs) == (2, calls)


def test_category_jobs_go_longest_first_to_the_least_loaded_process():
    # 5 -> p0; 4 -> p1; 3 -> p1 (4 < 5); 3 -> p0 (5 < 7); 3 -> p1 (7 < 8): loads 8 and 10
    assert distributed.assign_jobs([5, 4, 3, 3, 3], 2) == [0, 1, 1, 0, 1]
    assert distributed.assign_jobs([1, 2], 1) == [0, 0]
    assert distributed.assign_jobs([2, 1], 4) == [0, 1]  # more processes than jobs: the others stay idle
    # MVTec's 15 categories on 4 GPUs, by hand: 391 | 320 | 280 | 267, then 264 -> p3, 247 -> p2, 245 -> p1,
    # 240 -> p0, 230 -> p2, 224 -> p3, 220 -> p1, 219 -> p0, 213 -> p3, 209 -> p2, 60 -> p1:
    # 850, 845, 966, 968.
    counts = list(bench_draem.MVTEC_TRAIN_IMAGES.values())
    loads = np.bincount(distributed.assign_jobs(counts, 4), weights=counts, minlength=4)
    assert sum(counts) == 3629 and loads.tolist() == [850, 845, 966, 968]


def test_the_table_estimate_is_700_epochs_of_mvtec_at_the_rate():
    """28.5 samples/s (the public fp32 L40S figure) -> 700 x 3629 / 28.5 s = 24.76 h; 4 GPUs: 700 x 968 /
    28.5 s."""
    assert bench_draem.table_hours(28.5) == pytest.approx(700 * 3629 / 28.5 / 3600)
    assert bench_draem.table_hours(28.5) == pytest.approx(24.76, abs=0.01)
    assert bench_draem.table_hours(28.5, 4) == pytest.approx(700 * 968 / 28.5 / 3600)


def fake_bench() -> dict:
    rows = [{"config": config, "samples_per_s": rate, "fraction_of_bf16_matmul": fraction}
            for config, rate, fraction in (("fp32 eager", 100.0, 0.1),
                                           ("bf16 + channels_last + compile", 400.0, 0.4))]
    return {"device": "NVIDIA H200", "train": rows, "matmul_tflops": {"bf16": 700.0, "fp32": 50.0},
            "synthesis": {"cpu_path_samples_per_s": 90.0, "device_path_samples_per_s": 900.0,
                          "device_synthesis_only_samples_per_s": 5000.0},
            "table_estimate": bench_draem.table_estimates(rows, 8),
            "skipped": {"CPU bf16": "the CPU has no AMX-BF16"}}


def test_the_device_check_summary_names_failures_speeds_and_the_table_time(tmp_path):
    report = tmp_path / "cuda.xml"
    case = '<testcase classname="tests.test_cuda" name="{}">{}</testcase>'
    report.write_text("<testsuites><testsuite>" + case.format("test_a", "")
                      + case.format("test_b", '<failure message="assert 3 == 2">x</failure>')
                      + case.format("test_c", '<skipped message="needs 2 GPUs"/>')
                      + "</testsuite></testsuites>")
    tests = {**device_check.read_junit(report), "seconds": 12.0}  # as run_cuda_tests adds
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 1, 1)
    assert tests["failures"] == {"test_b": "assert 3 == 2"}
    text = "\n".join(device_check.summary_lines(tests, fake_bench(), 400.0))
    assert "FAILED test_b: assert 3 == 2" in text and "NVIDIA H200" in text
    hours = 700 * 3629 / 100 / 3600  # fp32 eager, the paper's configuration, one GPU
    assert f"{hours:.1f} h on one GPU" in text and "8 GPUs" in text
    assert "4.00x" in text  # the fastest row against fp32 eager


def test_the_device_check_runs_end_to_end_in_quick_mode(tmp_path):
    summary = device_check.main(["--quick", "--skip_tests", "--output_dir", str(tmp_path)])
    assert summary["bench"]["train"] and (tmp_path / "device_check.json").is_file()


def test_the_device_check_explains_itself(capsys):
    with pytest.raises(SystemExit) as stopped:
        device_check.parse_args(["--help"])
    out = capsys.readouterr().out
    assert stopped.value.code == 0 and "--quick" in out and "8 minutes" in out and "test_cuda.py" in out
