"""Where and how the networks run: device selection and the fast-path options (precision, memory layout,
compilation)."""
import contextlib

import torch
from torch import nn

from util.errors import DraemInputError


def select_device(name: str = "auto", gpu_id: int = 0) -> torch.device:
    """`auto` picks CUDA when present; `cuda` means `cuda:<gpu_id>`; asking for CUDA without one is a clear
    error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise DraemInputError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:<index>")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DraemInputError(f"--device {name} asked for, but no CUDA device is available (use --device "
                                  f"cpu)")
        return torch.device(f"cuda:{gpu_id}") if name == "cuda" else torch.device(name)
    return torch.device(name)


PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Mixed-precision context for the model's forward: bf16 autocast on CUDA or CPU; fp32 is a no-op.

    Compute the loss outside this context: under autocast even an fp32 `conv2d` (SSIM's Gaussian
    window) would run in bf16, and the loss statistics are meant to stay in fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An N×C×H×W batch in channels-last layout when asked (what cuDNN's fastest kernels want); else
    unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def prepare_model(
    model: nn.Module, channels_last: bool = False, compile: bool = False, compile_backend: str = "inductor"
) -> nn.Module:
    """Apply the fast-path options to `model` in place and return it.

    Both keep the checkpoint format: channels-last changes only the weights' strides (shapes and keys
    stay; loading copies into any layout), and `nn.Module.compile` compiles the forward in place, so
    `state_dict()` has no `_orig_mod.` prefix, unlike the wrapper `torch.compile(model)` returns.
    Compilation happens at the first forward (and again when the train/eval mode or the input shape
    changes). `compile_backend="aot_eager"` traces and differentiates the same graphs without
    generating kernels: a quick check that the model compiles, or a way to tell an inductor bug.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile(backend=compile_backend)
    return model
