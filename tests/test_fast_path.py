"""The fast-path options (bf16 autocast, channels_last, torch.compile): same numbers within rounding, same
checkpoints."""
import os
import shutil

import pytest
import torch

from data_loader import train_loader
from device_synthesis import synthesize_batch
from loss import DraemLoss
from model_unet import DraemModel, anomaly_map, model_from_checkpoint
from train_draem import train_step
from util.checkpoints import load_checkpoint, save_checkpoint
from util.runtime import autocast, prepare_model, to_memory_format

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small tensors, one thread

CPU = torch.device("cpu")
SIZE = 32


def relative_error(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approximate.float() - exact).norm() / exact.norm()).item()


def synthetic_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Training samples synthesised from smooth random images (noise sources), at SIZE px."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (n, 3, SIZE // 8, SIZE // 8), generator=generator).float()
    images = torch.nn.functional.interpolate(small, size=(SIZE, SIZE),
                                             mode="bilinear").round().to(torch.uint8)
    return synthesize_batch(images, None, generator)


def step(model, optimizer, batch, precision="fp32", channels_last=False):
    return train_step(model, model, DraemLoss(), optimizer, batch["image"], batch["augmented_image"],
                      batch["anomaly_mask"], precision, channels_last)


def test_autocast_is_bf16_only_when_asked():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.rand(1, 3, 8, 8)
    with autocast(CPU, "fp32"):
        assert conv(x).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="--precision"):
        autocast(CPU, "fp16")


@pytest.fixture(scope="module")
def trained_state() -> dict[str, torch.Tensor]:
    """Weights of a small SSPCAB model trained for 40 steps.

    A freshly initialised DRAEM is chaotic: 40 conv-BN layers at N(0, 0.02) amplify any rounding
    difference (bf16 gives a 40 % different reconstruction in training mode, a compiled graph's other
    summation order a 2 % different gradient). A few steps of training end that, as for any model that
    bf16 or a compiled graph runs on in practice, so the comparisons below can be tight.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DraemModel(base_width=4, seg_base_width=4, sspcab=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = synthetic_batch(64, seed=0)
    for start in range(0, 40 * 8, 8):
        step(model, optimizer, {key: value[start % 64 : start % 64 + 8] for key, value in train.items()})
    torch.set_num_threads(threads)
    return model.state_dict()


def trained_model(state: dict[str, torch.Tensor]) -> DraemModel:
    model = DraemModel(base_width=4, seg_base_width=4, sspcab=True)
    model.load_state_dict(state)
    return model


def test_bf16_forward_of_a_trained_model_is_within_2e_2_of_fp32(trained_state):
    model = trained_model(trained_state)
    image = synthetic_batch(8, seed=1)["augmented_image"]
    for mode in ("train", "eval"):  # batch statistics (the training forward) and running statistics
        getattr(model, mode)()
        with torch.no_grad():
            reconstruction, logits = model(image)
            with autocast(CPU, "bf16"):
                reconstruction_bf16, logits_bf16 = model(image)
        assert reconstruction_bf16.dtype == torch.bfloat16
        assert anomaly_map(logits).std() > 0.01  # a map that varies, so the comparison means something
        assert relative_error(reconstruction_bf16, reconstruction) < 2e-2
        assert relative_error(anomaly_map(logits_bf16), anomaly_map(logits)) < 2e-2


def test_a_channels_last_bf16_step_saves_a_checkpoint_the_plain_path_loads(tmp_path):
    torch.manual_seed(0)
    model = prepare_model(DraemModel(base_width=4, seg_base_width=4), channels_last=True)
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    assert model.reconstructive_subnetwork.encoder.block1[0].weight.is_contiguous(
        memory_format=torch.channels_last)
    loss, parts, reconstruction, _ = step(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                                          synthetic_batch(4, seed=0), precision="bf16", channels_last=True)
    assert torch.isfinite(loss) and not loss.requires_grad and set(parts) == {"l2", "ssim", "focal"}
    assert reconstruction.dtype == torch.bfloat16
    assert any(not torch.equal(initial[key], value) for key, value in model.state_dict().items())
    save_checkpoint(model, tmp_path, "fast", "widget")

    plain = DraemModel(base_width=4, seg_base_width=4)
    assert list(plain.state_dict()) == list(model.state_dict())
    load_checkpoint(plain, tmp_path, "fast", "widget")
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value)
    rebuilt = model_from_checkpoint(tmp_path, "fast", "widget")
    image = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model.eval()(to_memory_format(image, True))[1]
        torch.testing.assert_close(plain.eval()(image)[1], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rebuilt.eval()(image)[1], expected, rtol=1e-4, atol=1e-5)


def test_compile_keeps_the_state_dict_keys(tmp_path):
    torch.manual_seed(0)
    compiled = prepare_model(DraemModel(base_width=4, seg_base_width=4), compile=True)
    assert list(compiled.state_dict()) == list(DraemModel(base_width=4, seg_base_width=4).state_dict())
    save_checkpoint(compiled, tmp_path, "compiled", "widget")
    load_checkpoint(DraemModel(base_width=4, seg_base_width=4), tmp_path, "compiled", "widget")


def compiled_steps_match_eager(state: dict[str, torch.Tensor], backend: str) -> None:
    """A compiled model's first-step gradients and two-step losses are the eager model's (SSPCAB on: its loss
    reads a module attribute that the compiled forward sets)."""
    batch = synthetic_batch(4, seed=2)
    results = []
    for compile in (False, True):
        model = prepare_model(trained_model(state), compile=compile, compile_backend=backend)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        losses = [step(model, optimizer, batch)[0]]
        gradients = torch.cat([p.grad.flatten() for p in model.parameters()])
        losses.append(step(model, optimizer, batch)[0])
        results.append((torch.stack(losses), gradients))
    (eager_losses, eager_gradients), (compiled_losses, compiled_gradients) = results
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    assert relative_error(compiled_gradients, eager_gradients) < 1e-4


def test_a_compiled_train_step_runs_on_cpu_and_matches_eager(trained_state):
    """Graph capture and autograd of the compiled model, without inductor's kernel build (minutes, cold, on 2
    cores)."""
    compiled_steps_match_eager(trained_state, "aot_eager")


@pytest.mark.skipif(not os.environ.get("DRAEM_SLOW_TESTS"),
                    reason="inductor's cold C++ build takes ~2.5 min on 2 cores; set DRAEM_SLOW_TESTS=1")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="inductor needs a C++ compiler on CPU")
def test_an_inductor_compiled_train_step_runs_on_cpu_and_matches_eager(trained_state):
    compiled_steps_match_eager(trained_state, "inductor")


def test_train_loader_pins_memory_for_cuda_and_keeps_workers_only_when_asked():
    data, generator = list(range(8)), torch.Generator()
    plain = train_loader(data, 2, 0, generator, CPU)
    assert (plain.num_workers, plain.pin_memory, plain.persistent_workers) == (0, False, False)
    fresh = train_loader(data, 2, 2, generator, torch.device("cuda"))
    assert (fresh.num_workers, fresh.pin_memory, fresh.persistent_workers) == (2, True, False)
    kept = train_loader(data, 2, 2, generator, torch.device("cuda"), persistent_workers=True)
    assert (kept.persistent_workers, kept.prefetch_factor) == (True, 4)
