"""On a CUDA GPU: the GPU path against the CPU, each comparison with its tolerance and the reason for it.

Skipped without CUDA; about 4 minutes on one GPU (`python -m tools.device_check` runs them and the
benchmark). Tests needing two GPUs are skipped on one. "strict" means TF32 off for convolutions and
matmuls (full fp32, as --fp32_precision strict); "tf32" torch's default, TF32 convolutions. Modules with
new functions are imported as modules, so on an older checkout each test fails on its own.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from test_synthesis_gpu import assert_device_path_draws_like_the_cpu_path, raw_batch

import augment
import data_loader
import device_synthesis
import export_onnx
import predict
import test_draem
import train_draem
from engine import evaluation
from engine.evaluation import DraemScorer
from loss import DraemLoss
from model_unet import DraemModel, anomaly_map, model_from_checkpoint
from tools import calibrate
from util import runtime
from util.checkpoints import checkpoint_paths, run_base_name, save_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (python -m tools.device_check)")
# cuBLAS is deterministic only with a fixed workspace, read when it starts: before this module's first CUDA
# call (the value train_draem --deterministic sets).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
SUBPROCESS_TIMEOUT_S = 240


def relative_error(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    approximate, exact = approximate.detach().float().cpu(), exact.detach().float().cpu()
    return ((approximate - exact).norm() / exact.norm()).item()


@pytest.fixture
def fp32_policy(request):
    """TF32 for convolutions on ("tf32", torch's default) or off ("strict"); torch's defaults restored
    after."""
    torch.backends.cudnn.allow_tf32 = request.param == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    yield request.param
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False


@pytest.fixture
def strict():
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False


def synthetic_batch(n: int, seed: int, size: int = 32) -> dict[str, torch.Tensor]:
    """CPU training samples from smooth random images (noise sources)."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (n, 3, size // 8, size // 8), generator=generator).float()
    images = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")
    images = images.round().to(torch.uint8)
    return device_synthesis.synthesize_batch(images, None, generator)


def step(model, optimizer, batch, device, precision="fp32", channels_last=False):
    image, augmented, mask = (batch[key].to(device) for key in ("image", "augmented_image", "anomaly_mask"))
    return train_draem.train_step(model, model, DraemLoss(), optimizer, image, augmented, mask, precision,
                                  channels_last)


@pytest.fixture(scope="module")
def trained_state() -> dict[str, torch.Tensor]:
    """A width-8 model after 40 CPU steps. A fresh DRAEM is chaotic (40 conv-BN layers at N(0, 0.02) amplify
    any rounding difference); a few steps of training end that, so the comparisons below can be tight."""
    torch.manual_seed(0)
    model = DraemModel(8, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = synthetic_batch(64, seed=0)
    for start in range(0, 40 * 8, 8):
        step(model, optimizer, {key: value[start % 64 : start % 64 + 8] for key, value in train.items()}, CPU)
    return model.state_dict()


def trained(state: dict, device: torch.device) -> DraemModel:
    model = DraemModel(8, 8)
    model.load_state_dict(state)
    return model.to(device)


# (forward and loss, gradient) relative-error bounds. strict: fp32 on both devices, only the kernels'
# summation order differs; compiled vs eager on the CPU (test_fast_path) stays within these. tf32: TF32
# rounds every convolution input to 10 mantissa bits (2^-11 = 4.9e-4 relative per product), about 1e-3 on
# the outputs of a trained model, more on the gradients, which pass every layer twice.
PARITY = {"strict": (1e-5, 1e-4), "tf32": (1e-2, 5e-2)}


@pytest.mark.parametrize("fp32_policy", ["strict", "tf32"], indirect=True)
def test_forward_and_a_train_step_match_the_cpu(trained_state, fp32_policy):
    forward_bound, gradient_bound = PARITY[fp32_policy]
    models = {device: trained(trained_state, device) for device in (CPU, CUDA)}
    image = synthetic_batch(8, seed=1)["augmented_image"]
    for mode in ("train", "eval"):  # batch statistics and running statistics
        outputs = {}
        for device, model in models.items():
            with torch.no_grad():
                outputs[device] = getattr(model, mode)()(image.to(device))
        (cpu_rec, cpu_logits), (gpu_rec, gpu_logits) = outputs[CPU], outputs[CUDA]
        assert anomaly_map(cpu_logits).std() > 0.01  # a map that varies, so the comparison means something
        assert relative_error(gpu_rec, cpu_rec) < forward_bound, mode
        assert relative_error(anomaly_map(gpu_logits), anomaly_map(cpu_logits)) < forward_bound, mode
    batch, results = synthetic_batch(8, seed=2), {}
    for device, model in models.items():
        loss, *_ = step(model.train(), torch.optim.Adam(model.parameters(), lr=1e-4), batch, device)
        results[device] = (loss, torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert relative_error(results[CUDA][0], results[CPU][0]) < forward_bound
    assert relative_error(results[CUDA][1], results[CPU][1]) < gradient_bound


def sample_images() -> torch.Tensor:
    """8 uint8 images, 48 x 64: textured, flat (degenerate histograms) and noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:64]
    textured = [np.clip(np.stack([x * 4, y * 5, (x + y) * 2], -1) + rng.integers(0, 40, (48, 64, 3)), 0, 255)
                for _ in range(4)]
    flat = [np.full((48, 64, 3), level) for level in (0, 77)]
    noise = [rng.integers(0, 256, (48, 64, 3)) for _ in range(2)]
    images = np.stack([*textured, *flat, *noise]).astype(np.uint8)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def per_sample(seed: int) -> dict[str, torch.Tensor]:
    """One parameter set per sample (8) from augment.RANGES."""
    g = torch.Generator().manual_seed(seed)

    def uniform(name, *shape):
        low, high = augment.RANGES[name]
        return torch.empty(8, *shape).uniform_(low, high, generator=g)

    def integers(name):
        return torch.randint(*augment.RANGES[name], (8,), generator=g)

    return {"gamma": uniform("gamma", 3), "multiply": uniform("brightness_multiply"),
            "add": uniform("brightness_add"), "add_first": torch.rand(8, generator=g) < 0.5,
            "sharpness": uniform("sharpness"),
            "hue": integers("hue_shift"), "saturation": integers("saturation_shift"),
            "solarize": uniform("solarize_threshold"), "bits": integers("posterize_bits"),
            "cutoff": integers("autocontrast_cutoff"), "degrees": uniform("rotate_degrees"),
            "beta": torch.rand(8, generator=g) * 0.8}


def brightness_in(spaces: list[int]):
    return lambda x, p: device_synthesis.brightness(x, p["multiply"], p["add"],
                                                    torch.tensor(spaces, device=x.device), p["add_first"])


# Integer arithmetic, float64 tables, and float32 elementwise operations one rounding each (IEEE on both
# devices): the same bytes on CUDA as on the CPU, which the CPU tests tie to OpenCV/PIL/torchvision.
EXACT = {
    "brightness in YCrCb, HSV, HLS, YUV": brightness_in([0, 1, 2, 5, 0, 1, 2, 5]),
    "sharpness": lambda x, p: device_synthesis.sharpness(x, p["sharpness"]),
    "hue_saturation": lambda x, p: device_synthesis.hue_saturation(x, p["hue"], p["saturation"]),
    "solarize": lambda x, p: device_synthesis.solarize(x, p["solarize"]),
    "posterize": lambda x, p: device_synthesis.posterize(x, p["bits"]),
    "invert": lambda x, p: device_synthesis.invert(x),
    "autocontrast": lambda x, p: device_synthesis.autocontrast(x, p["cutoff"]),
    "equalize": lambda x, p: device_synthesis.equalize(x),
    "to_float": lambda x, p: device_synthesis.to_float(x),
    "blend": lambda x, p: data_loader.blend_anomaly(
        device_synthesis.to_float(x), device_synthesis.to_float(x.flip(0)), (x[:, :1] > 128).float(),
        p["beta"].to(x.device).view(-1, 1, 1, 1)),
}
# (largest level difference, fraction of values that may differ, why)
CLOSE = {
    "gamma_contrast": (lambda x, p: device_synthesis.gamma_contrast(x, p["gamma"]), 1, 1e-3,
                       ("x^gamma by CUDA's powf and the CPU's vectorised pow may differ in the last bit or "
                        "two; scaled by 255.999 and truncated, a level flips only within those ulps of an "
                        "integer")),
    "rotate": (lambda x, p: device_synthesis.rotate(x, p["degrees"]), 1, 1e-2,
               ("affine_grid's dot products and grid_sample's bilinear weights in float32, fused "
                "multiply-adds on CUDA: a level flips only where the interpolated value lies within ~1e-5 "
                "of a rounding boundary")),
}
LAB_LUV = brightness_in([3, 4, 3, 4, 3, 4, 3, 4])


def test_device_synthesis_gives_the_cpu_bytes_on_cuda():
    images = sample_images()
    for seed in (0, 1):
        params = per_sample(seed)
        on_gpu = {key: value.to(CUDA) for key, value in params.items()}
        for name, op in EXACT.items():
            expected, got = op(images, params), op(images.to(CUDA), on_gpu).cpu()
            assert got.dtype == expected.dtype and torch.equal(got, expected), f"{name} (parameters {seed})"
        for name, (op, most, share, why) in CLOSE.items():
            difference = (op(images.to(CUDA), on_gpu).cpu().int() - op(images, params).int()).abs()
            assert difference.max() <= most and (difference > 0).float().mean() <= share, f"{name}: {why}"
        # Lab and Luv: float formulas with cube roots, powers and divisions by numbers (a multiplication by
        # the reciprocal on CUDA), chained through two conversions and Luv's clamps: close on average, rarely
        # far.
        gpu = LAB_LUV(images.to(CUDA), on_gpu).cpu().int()
        difference = (gpu - LAB_LUV(images, params).int()).abs().float()
        assert difference.mean() <= 0.05 and (difference > 1).float().mean() <= 5e-3


def test_device_synthesis_on_cuda_draws_from_the_cpu_paths_distributions(tiny_mvtec, monkeypatch):
    """As test_synthesis_gpu's CPU comparison (same tolerances), with the batch synthesised on the GPU from
    a CUDA generator."""
    assert_device_path_draws_like_the_cpu_path(tiny_mvtec, monkeypatch, CUDA,
                                               device_synthesis.device_generator(CUDA, 0))
    # Each of the 10 operations is drawn uniformly (3 of 10 per sample) from the CUDA stream too.
    generator = device_synthesis.device_generator(CUDA, 1)
    chosen = device_synthesis.draw_augmentation_indices(3000, generator, CUDA).cpu()
    frequencies = torch.bincount(chosen.flatten(), minlength=10) / chosen.numel()
    assert (frequencies - 0.1).abs().max() < 0.02  # 5 standard errors of a share of 9000 near 0.1: 0.016


def test_the_synthesis_generator_lives_on_the_images_device(tiny_mvtec):
    """A CUDA generator is a seed and a Philox offset (16 bytes; a CPU one is a 5056-byte Mersenne Twister);
    seeded, it repeats its batch; on the wrong device it is refused with the fix, not a torch internals
    error."""
    generator = device_synthesis.device_generator(CUDA, 7)
    assert generator.device.type == "cuda" and generator.get_state().numel() == 16
    assert torch.Generator().get_state().numel() == 5056
    raw = {key: value[:8].to(CUDA) for key, value in raw_batch(tiny_mvtec, 8).items()}
    first, again, other = (device_synthesis.synthesize_batch(raw["image"], raw["source"],
                                                             device_synthesis.device_generator(CUDA, seed))
                           for seed in (7, 7, 8))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["augmented_image"], other["augmented_image"])
    with pytest.raises(ValueError, match="device_generator"):
        device_synthesis.synthesize_batch(raw["image"], raw["source"], torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="device_generator"):
        device_synthesis.synthesize_batch(raw["image"].cpu(), raw["source"].cpu(), generator)


def test_the_training_hot_loop_never_waits_for_the_device():
    """Device synthesis and a train step (fp32 and bf16) raise under sync debug mode "error" at any
    host-device synchronisation (a blocking copy, .item(), a data-dependent shape). The first iterations are
    warm-up: per-device tables are made then, and cuDNN/cuBLAS start."""
    generator = device_synthesis.device_generator(CUDA, 0)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, device=CUDA)
    sources = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, device=CUDA)
    torch.manual_seed(0)
    model = DraemModel(8, 8).to(CUDA)
    optimizer, criterion = torch.optim.Adam(model.parameters(), lr=1e-4), DraemLoss()

    def iteration(precision: str) -> None:
        batch = device_synthesis.synthesize_batch(images, sources, generator)
        train_draem.train_step(model, model, criterion, optimizer, batch["image"], batch["augmented_image"],
                               batch["anomaly_mask"], precision)

    for precision in ("fp32", "bf16", "fp32", "bf16"):
        iteration(precision)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for precision in ("fp32", "bf16", "fp32"):
            iteration(precision)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.usefixtures("strict")
def test_bf16_and_channels_last_forwards_match_fp32_on_cuda(trained_state):
    """bf16 keeps 8 mantissa bits (2^-9 = 2e-3 relative per operation): within 2e-2 on a trained model, as on
    the CPU (test_fast_path). channels_last changes only the kernels' summation order: the strict-fp32 bound,
    1e-5."""
    model = trained(trained_state, CUDA)
    image = synthetic_batch(8, seed=1)["augmented_image"].to(CUDA)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            reconstruction, logits = model(image)
            with runtime.autocast(CUDA, "bf16"):
                reconstruction_bf16, logits_bf16 = model(image)
        assert reconstruction_bf16.dtype == torch.bfloat16
        assert relative_error(reconstruction_bf16, reconstruction) < 2e-2
        assert relative_error(anomaly_map(logits_bf16), anomaly_map(logits)) < 2e-2
    # Fresh models, so both see the same batches (a training-mode forward updates BatchNorm's statistics).
    plain = trained(trained_state, CUDA)
    layout = runtime.prepare_model(trained(trained_state, CUDA), channels_last=True)
    for mode in ("train", "eval"):
        getattr(plain, mode)()
        getattr(layout, mode)()
        with torch.no_grad():
            expected = plain(image)
            got = layout(runtime.to_memory_format(image, True))
        for g, e in zip(got, expected):
            assert relative_error(g, e) < 1e-5, mode


@pytest.mark.usefixtures("strict")
def test_compiled_training_matches_eager_and_needs_one_graph_per_mode(trained_state):
    """inductor's fused kernels sum in another order: losses within 1e-5 and first-step gradients within 1e-4
    of eager, as on the CPU (test_fast_path). Batches 4, 3, 4 in training and 4, 3 in evaluation, then a
    second model (the next category): 2 graphs, training and evaluation (compiled static, training alone
    would take 2)."""
    inductor, graphs = torch._dynamo.lookup_backend("inductor"), []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return inductor(gm, example_inputs)

    torch._dynamo.reset()
    try:
        batch, results = synthetic_batch(4, seed=2), []
        for compile in (False, True):
            model = runtime.prepare_model(trained(trained_state, CUDA), compile=compile,
                                          compile_backend=counting)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            losses = [step(model, optimizer, batch, CUDA)[0]]
            gradients = torch.cat([p.grad.flatten() for p in model.parameters()])
            losses.append(step(model, optimizer, batch, CUDA)[0])
            results.append((torch.stack(losses).cpu(), gradients))
        (eager_losses, eager_gradients), (compiled_losses, compiled_gradients) = results
        torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
        assert relative_error(compiled_gradients, eager_gradients) < 1e-4
        for n in (3, 4):
            step(model, optimizer, synthetic_batch(n, seed=n), CUDA)
        with torch.no_grad():  # DraemScorer's call: runtime.model_input marks the batch dimension dynamic
            for n in (4, 3):
                model.eval()(runtime.model_input(model, torch.rand(n, 3, 32, 32, device=CUDA), False))
        second = runtime.prepare_model(trained(trained_state, CUDA), compile=True, compile_backend=counting)
        step(second, torch.optim.Adam(second.parameters(), lr=1e-4), synthetic_batch(4, seed=5), CUDA)
        with torch.no_grad():
            second.eval()(runtime.model_input(second, torch.rand(3, 3, 32, 32, device=CUDA), False))
        assert len(graphs) == 2
    finally:
        torch._dynamo.reset()


def tiny_args(data, out: Path, *extra: str) -> list[str]:
    return ["--obj_id", "brick", "--data_path", str(data.mvtec_root), "--anomaly_source_path",
            str(data.texture_root), "--image_size", "64", "--base_width", "4", "--seg_base_width", "4",
            "--bs", "4", "--workers", "0", "--calibration_samples", "16", "--checkpoint_path",
            str(out / "ckpt"), "--log_path", str(out / "logs"), *extra]


def read_states(folder: Path, base: str) -> list[dict]:
    return [torch.load(p, map_location="cpu", weights_only=True)
            for p in checkpoint_paths(folder / "ckpt", base, "brick")]


def assert_same_states(got: list[dict], expected: list[dict], what: str) -> None:
    for g, e in zip(got, expected, strict=True):
        assert list(g) == list(e)
        for key in e:
            assert torch.equal(g[key], e[key]), f"{what}: {key}"


@pytest.mark.parametrize("synthesis", ["cpu", "gpu"])
def test_deterministic_cuda_training_repeats_and_resumes_bit_for_bit(tiny_mvtec, tmp_path, monkeypatch,
                                                                    synthesis):
    """--deterministic on CUDA: a second run gives the first one's weights bit for bit, and so does a run
    killed after epoch 1 and resumed (model, Adam, scheduler and every random stream, the CUDA ones
    included)."""
    argv = tiny_args(tiny_mvtec, tmp_path, "--device", "cuda", "--deterministic", "--synthesis", synthesis,
                     "--epochs", "2", "--seed", "3")
    base = run_base_name(1e-4, 2, 4, seed=3)

    def run(name: str, *extra: str) -> None:
        train_draem.main([*argv, "--checkpoint_path", str(tmp_path / name / "ckpt"), "--log_path",
                          str(tmp_path / name / "logs"), *extra])

    try:
        run("full")
        run("again")
        real_write = train_draem.atomic_write_text

        def write_then_stop(path, text):
            real_write(path, text)
            if Path(path).name.endswith("_log.jsonl"):  # epoch 1's log, its last file: killed right after
                raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(train_draem, "atomic_write_text", write_then_stop)
            with pytest.raises(SystemExit):  # Ctrl-C: one line saying what was saved
                run("cut")
        run("cut", "--resume")
    finally:
        runtime.set_deterministic(False)
    full = read_states(tmp_path / "full", base)
    assert_same_states(read_states(tmp_path / "again", base), full, "second run")
    assert_same_states(read_states(tmp_path / "cut", base), full, "resumed run")


def test_a_device_synthesis_run_resumes_only_on_its_device_type(tiny_mvtec, tmp_path, capsys):
    """The synthesis stream of a --synthesis gpu run lives in the device's generator: continuing it on the
    other device type is one line naming the fix (resume on the device it was drawn on), with nothing
    written."""
    for written_on, resumed_on in (("cuda", "cpu"), ("cpu", "cuda")):
        out = tmp_path / written_on
        argv = tiny_args(tiny_mvtec, out, "--synthesis", "gpu", "--epochs", "1")
        train_draem.main([*argv, "--device", written_on])
        before = {p.name: p.read_bytes() for p in (out / "ckpt").iterdir()}
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            train_draem.main([*argv, "--device", resumed_on, "--resume"])
        err = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 1 and len(err) == 1, err
        assert f"resume it with --device {written_on}" in err[0], err
        assert {p.name: p.read_bytes() for p in (out / "ckpt").iterdir()} == before


def torchrun(nproc: int, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(ROOT / "train_draem.py"), *arguments]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                          check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_torchrun_with_nccl_trains_in_one_process(tiny_mvtec, tmp_path):
    result = torchrun(1, *tiny_args(tiny_mvtec, tmp_path, "--device", "cuda", "--epochs", "1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "on cuda:0" in result.stdout
    assert all(p.is_file() for p in checkpoint_paths(tmp_path / "ckpt", run_base_name(1e-4, 1, 4), "brick"))


@TWO_GPUS
def test_torchrun_gives_each_process_its_own_gpu_and_refuses_a_shared_one(tiny_mvtec, tmp_path):
    """DDP over 2 GPUs with --device cuda (nccl refuses two processes on one GPU); --parallel categories puts
    the two demo categories on cuda:0 and cuda:1; --device cuda:0 would put both processes on GPU 0: one
    line."""
    ddp = torchrun(2, *tiny_args(tiny_mvtec, tmp_path / "ddp", "--device", "cuda", "--epochs", "1"))
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    both = tiny_args(tiny_mvtec, tmp_path / "categories", "--device", "cuda", "--epochs", "1", "--parallel",
                     "categories", "--dataset", "folder")
    both[both.index("brick")] = "-1"
    categories = torchrun(2, *both)
    assert categories.returncode == 0, categories.stdout[-2000:] + categories.stderr[-2000:]
    summary_file = tmp_path / "categories" / "logs" / f"{run_base_name(1e-4, 1, 4)}_summary.json"
    runs = json.loads(summary_file.read_text())["runs"]
    assert sorted(run["device"] for run in runs) == ["cuda:0", "cuda:1"]
    shared = torchrun(2, *tiny_args(tiny_mvtec, tmp_path / "shared", "--device", "cuda:0", "--epochs", "1"))
    assert shared.returncode != 0 and "--device cuda:0 under torchrun with 2 processes" in shared.stderr


def run_python(script: str, *arguments: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *arguments], cwd=ROOT, capture_output=True,
                          text=True, check=False, timeout=SUBPROCESS_TIMEOUT_S,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


@TWO_GPUS
def test_training_on_gpu_1_opens_no_context_on_gpu_0(tiny_mvtec, tmp_path):
    """Pinned memory, cuBLAS/cuDNN handles and device-less torch.cuda calls use the current device: --gpu_id 1
    makes it cuda:1 before any of them, so GPU 0 (another user's, say) gets no context (~500 MB) from this
    run."""
    script = ("import sys, torch, train_draem; train_draem.main(sys.argv[1:]); "
              "print('context on GPU 0:', torch._C._cuda_hasPrimaryContext(0))")
    for synthesis in ("cpu", "gpu"):
        argv = tiny_args(tiny_mvtec, tmp_path / synthesis, "--device", "cuda", "--gpu_id", "1", "--epochs",
                         "1", "--synthesis", synthesis)
        result = run_python(script, *argv)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "context on GPU 0: False" in result.stdout


@pytest.fixture(scope="module")
def cuda_run(tiny_mvtec, tmp_path_factory) -> Path:
    """A tiny run trained on the GPU (2 epochs, default flags): its checkpoints, thresholds and resume
    file."""
    out = tmp_path_factory.mktemp("cuda_run")
    train_draem.main(tiny_args(tiny_mvtec, out, "--device", "cuda", "--epochs", "2"))
    return out


# Run in a process that sees no GPU: load the pair, test it, resume the run from its resume file.
ON_A_CPU_MACHINE = """
import sys, torch, test_draem, train_draem
from model_unet import model_from_checkpoint
ckpt, data, sources, base = sys.argv[1:5]
assert not torch.cuda.is_available()
model = model_from_checkpoint(ckpt, base, "brick")
test_draem.main(["--obj_id", "brick", "--data_path", data, "--checkpoint_path", ckpt, "--base_model_name",
                 base, "--image_size", "64", "--device", "cpu", "--output_dir", ckpt + "/results"])
train_draem.main(["--obj_id", "brick", "--data_path", data, "--anomaly_source_path", sources, "--image_size",
                  "64", "--base_width", "4", "--seg_base_width", "4", "--bs", "4", "--workers", "0",
                  "--calibration_samples", "16", "--checkpoint_path", ckpt, "--log_path", ckpt + "/../logs",
                  "--device", "cpu", "--epochs", "2", "--resume"])
print("loaded on", next(model.parameters()).device)
"""


def test_gpu_written_checkpoints_load_and_resume_on_a_machine_without_cuda(cuda_run, tiny_mvtec, tmp_path):
    """In a process that sees no GPU: the pair loads, the test program scores it, and --resume restores the
    run from its resume file on the CPU (pair and log rewritten, thresholds calibrated again). The files hold
    CUDA tensors; every reader maps them to the CPU."""
    work = tmp_path / "run"
    shutil.copytree(cuda_run, work)
    result = run_python(ON_A_CPU_MACHINE, str(work / "ckpt"), str(tiny_mvtec.mvtec_root),
                        str(tiny_mvtec.texture_root), run_base_name(1e-4, 2, 4), CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "loaded on cpu" in result.stdout and "resuming after epoch 2/2" in result.stdout


def scores_of(csv_path: Path) -> list[float]:
    with csv_path.open() as f:
        return [float(row["image_score"]) for row in csv.DictReader(f)]


# strict fp32 on both devices: anomaly maps are softmax probabilities in [0, 1] and image scores averages of
# them; logits that agree to ~1e-6 relative (the strict forward bound above) move them by ~1e-6. Bound: 1e-5.
SCORE_ATOL = 1e-5


def test_test_predict_and_calibrate_on_cuda_give_the_cpu_results(cuda_run, tiny_mvtec, tmp_path):
    """Scores and maps of the test protocol, predict's scores and the calibration's F1 agree within
    SCORE_ATOL. The metrics tables are not compared: a 2-epoch model's near-tied scores may swap order,
    which moves an AUROC by a step without any score being wrong."""
    base, ckpt = run_base_name(1e-4, 2, 4), cuda_run / "ckpt"
    strict = ["--fp32_precision", "strict"]
    try:
        results = {}
        for device in (CPU, CUDA):
            runtime.set_fp32_precision("strict")
            scorer = DraemScorer(model_from_checkpoint(ckpt, base, "brick").to(device))
            results[device] = evaluation.evaluate_category(scorer, tiny_mvtec.mvtec_root, "brick", 64, device,
                                                           batch_size=2)
        np.testing.assert_allclose(results[CUDA].scores, results[CPU].scores, rtol=0, atol=SCORE_ATOL)
        np.testing.assert_allclose(results[CUDA].maps, results[CPU].maps, rtol=0, atol=SCORE_ATOL)

        common = ["--obj_id", "brick", "--data_path", str(tiny_mvtec.mvtec_root), "--checkpoint_path",
                  str(ckpt), "--base_model_name", base, "--image_size", "64"]
        test_draem.main([*common, "--device", "cuda", *strict, "--output_dir", str(tmp_path / "test")])
        made_with = json.loads((tmp_path / "test" / f"results_{base}.json").read_text())["provenance"]
        assert made_with["device"].startswith("cuda:0") and made_with["fp32_precision"] == "strict"

        predicted = {}
        for device in ("cpu", "cuda"):
            csv_path = predict.main(["--checkpoint_path", str(ckpt), "--base_model_name", base, "--obj_id",
                                     "brick", "--input", str(tiny_mvtec.mvtec_root / "brick" / "test"),
                                     "--image_size", "64", "--output_dir", str(tmp_path / device), "--device",
                                     device, *strict])
            predicted[device] = scores_of(csv_path)
        np.testing.assert_allclose(predicted["cuda"], predicted["cpu"], rtol=0, atol=SCORE_ATOL)

        thresholds = {}
        for device in ("cpu", "cuda"):
            path = calibrate.main(["--checkpoint_path", str(ckpt), "--base_model_name", base, "--obj_id",
                                   "brick", "--data_path", str(tiny_mvtec.mvtec_root),
                                   "--anomaly_source_path", str(tiny_mvtec.texture_root), "--image_size",
                                   "64", "--samples", "16", "--device", device, *strict])
            thresholds[device] = json.loads(path.read_text())
        # F1-max over 16 images and 65536 pixels: near-tied scores swapping order move it by about one item
        # in n.
        for key, bound in (("image_f1", 1 / 16 + 1e-6), ("pixel_f1", 1e-3)):
            assert abs(thresholds["cuda"][key] - thresholds["cpu"][key]) <= bound, key
        counts = {device: (found["n_normal"], found["n_anomalous"]) for device, found in thresholds.items()}
        assert counts["cuda"] == counts["cpu"]
    finally:
        runtime.set_fp32_precision("tf32")


@pytest.mark.usefixtures("strict")
def test_the_onnx_graph_of_a_gpu_trained_model_gives_the_cuda_scores(cuda_run, tmp_path):
    """The export runs on the CPU from the GPU-written pair; onnxruntime's outputs against the model on CUDA,
    strict fp32 on both: within the export's own parity tolerance, 1e-4 (graph-level reordering of fp32
    sums)."""
    base, ckpt = run_base_name(1e-4, 2, 4), cuda_run / "ckpt"
    output = tmp_path / "draem.onnx"
    export_onnx.main(["--checkpoint_path", str(ckpt), "--base_model_name", base, "--obj_id", "brick",
                      "--image_size", "64", "--output", str(output)])
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    onnx_map, onnx_score = session.run(["anomaly_map", "image_score"], {"image": images.numpy()})[:2]
    scorer = DraemScorer(model_from_checkpoint(ckpt, base, "brick").to(CUDA)).eval()
    with torch.no_grad():
        cuda_map, cuda_score = (value.cpu().numpy() for value in scorer(images.to(CUDA)))
    np.testing.assert_allclose(onnx_map, cuda_map, rtol=0, atol=1e-4)
    np.testing.assert_allclose(onnx_score, cuda_score, rtol=0, atol=1e-4)


def test_gpu_memory_stays_flat_across_an_evaluation_of_several_categories(tiny_mvtec, tmp_path, monkeypatch):
    """Three categories evaluated in one call: the memory torch holds on the GPU after each category is the
    same, within half a model's weights (a leaked model per category would add a whole one each time)."""
    data = tmp_path / "data"
    for copy in ("brick", "brick2", "brick3"):
        shutil.copytree(tiny_mvtec.mvtec_root / "brick", data / copy)
        torch.manual_seed(len(copy))
        save_checkpoint(DraemModel(16, 16), tmp_path / "ckpt", "mem", copy)
    model_bytes = sum(v.numel() * v.element_size() for v in DraemModel(16, 16).state_dict().values())
    held, evaluate_category = [], evaluation.evaluate_category

    def measured(*args, **kwargs):
        result = evaluate_category(*args, **kwargs)
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated(CUDA))
        return result

    monkeypatch.setattr(evaluation, "evaluate_category", measured)
    evaluation.evaluate_checkpoints(checkpoint_path=tmp_path / "ckpt", base_model_names=["mem"],
                                    data_path=data, categories=["brick", "brick2", "brick3"], image_size=64,
                                    device=CUDA, output_dir=tmp_path / "results", batch_size=2,
                                    layout="folder")
    assert len(held) == 3 and max(held) - min(held) < model_bytes / 2, (held, model_bytes)
