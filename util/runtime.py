"""Where and how the networks run: device selection, the fp32 precision policy, determinism, and the fast-path
options (precision, memory layout, compilation)."""
import contextlib
import functools
import os
from collections.abc import Callable, Hashable

import torch
from torch import nn

from util.errors import DraemInputError


def _device_name(name: str) -> str:
    """`name` with `auto` resolved; a name that is no device is a one-line error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise DraemInputError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:<index>")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DraemInputError(f"--device {name} asked for, but no CUDA device is available (use --device "
                              f"cpu)")
    return name


def _use_cuda_device(index: int) -> torch.device:
    """cuda:<index>, made this process's current CUDA device before anything else touches CUDA.

    Without it, every call that uses "the current device" (pinned memory, cuBLAS and cuDNN handles, a
    device-less torch.cuda call) opens a context on GPU 0, even when training on GPU 3.
    """
    count = torch.cuda.device_count()
    if index >= count:
        raise DraemInputError(f"CUDA device {index} asked for, but this machine has {count} (cuda:0 .. "
                              f"cuda:{count - 1}); use another --device / --gpu_id, or check "
                              f"CUDA_VISIBLE_DEVICES")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def select_device(name: str = "auto", gpu_id: int = 0) -> torch.device:
    """`auto` picks CUDA when present; `cuda` means `cuda:<gpu_id>`; asking for CUDA without one is a clear
    error.

    A CUDA device becomes the current one (see `_use_cuda_device`), so nothing opens a context on GPU 0.
    """
    name = _device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    return _use_cuda_device(gpu_id if name == "cuda" else int(name[5:]))


def torchrun_device(name: str, gpu_id: int, local_rank: int, local_world_size: int) -> torch.device:
    """The device of process `local_rank` of `local_world_size` on this machine under torchrun:
    cuda:<local_rank>.

    All processes get the same flags, so an explicit index (`--device cuda:N`, `--gpu_id N` other than 0)
    would put every process on GPU N: refused when the machine runs more than one process, used as given
    when it runs one.
    """
    name = _device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        flag, index = f"--gpu_id {gpu_id}", gpu_id or None  # --gpu_id 0 is the default: no index asked for
    else:
        flag, index = f"--device {name}", int(name[5:])
    if index is None:
        return _use_cuda_device(local_rank)
    if local_world_size > 1:
        raise DraemInputError(f"{flag} under torchrun with {local_world_size} processes on this machine "
                              f"would put every process on GPU {index}: use --device cuda (process i trains "
                              f"on cuda:i) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    return _use_cuda_device(index)


@functools.cache
def _made_once(make: Callable[..., torch.Tensor], args: tuple) -> torch.Tensor:
    with torch.inference_mode(False):  # never an inference tensor: autograd could not save it for a backward
        return make(*args)


def device_constant(make: Callable[..., torch.Tensor], *args: Hashable) -> torch.Tensor:
    """`make(*args)`, a tensor that depends only on its arguments (among them the device), made once and then
    reused: building it on every call (a host-to-device copy waits for the device; a small table or matrix
    is many tiny kernels) would sit in the per-step path. Read-only for its users. Inside torch.compile it is
    made in the graph instead (a constant there; dynamo would trace past the cache anyway)."""
    if torch.compiler.is_compiling():
        return make(*args)
    return _made_once(make, args)


FP32_PRECISIONS = ("tf32", "strict")


def set_fp32_precision(policy: str = "tf32") -> None:
    """How float32 math runs on CUDA GPUs that have TF32 (Ampere and later); no effect on the CPU.

    tf32 (torch's default): cuDNN convolutions, all of DRAEM's heavy math, take TF32 inputs (10-bit
    mantissa, fp32 accumulation: about 1e-3 relative, several times faster); matmuls stay full fp32.
    strict: convolutions in full fp32 too (IEEE, CPU parity about 1e-6, slower). Set explicitly on every
    run, so a caller's or an earlier run's setting never leaks in.
    """
    if policy not in FP32_PRECISIONS:
        raise ValueError(f"--fp32_precision must be one of {', '.join(FP32_PRECISIONS)}, got {policy!r}")
    torch.backends.cudnn.allow_tf32 = policy == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False


# cuBLAS is deterministic only with a fixed workspace configuration, read when its first handle is made.
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def set_deterministic(on: bool) -> None:
    """--deterministic: deterministic algorithms only (cuDNN's deterministic kernels, cuBLAS with a fixed
    workspace), so a CUDA run repeats bit for bit; a model also needs its upsampling swapped
    (model_unet.deterministic_upsampling).

    Set both ways on every run (torch's defaults when off), so an earlier run in the same process never leaks
    in.
    Call before the first CUDA operation: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts.
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False


def precision_policy(device: torch.device | str | None) -> dict:
    """The fp32 precision policy and determinism in effect on `device`, for provenance records."""
    cuda = device is not None and torch.device(device).type == "cuda"
    policy = ("tf32" if torch.backends.cudnn.allow_tf32 else "strict") if cuda else "ieee (cpu)"
    return {"fp32_precision": policy, "deterministic": torch.are_deterministic_algorithms_enabled()}


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


_DYNAMIC_BATCH = "_draem_dynamic_batch"  # set by prepare_model on a model it compiled


def model_input(model: nn.Module, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The batch `x` as `model` takes it: channels-last when asked and, when prepare_model compiled the model,
    its batch dimension marked dynamic, so one compiled graph serves every batch size from 2 up (see
    prepare_model)."""
    x = to_memory_format(x, channels_last)
    if getattr(model, _DYNAMIC_BATCH, False):
        torch._dynamo.maybe_mark_dynamic(x, 0)
    return x


def prepare_model(
    model: nn.Module, channels_last: bool = False, compile: bool = False,
    compile_backend: str | Callable = "inductor",
) -> nn.Module:
    """Apply the fast-path options to `model` in place and return it.

    Both keep the checkpoint format: channels-last changes only the weights' strides (shapes and keys
    stay; loading copies into any layout), and `nn.Module.compile` compiles the forward in place, so
    `state_dict()` has no `_orig_mod.` prefix, unlike the wrapper `torch.compile(model)` returns.
    Compilation happens at the first forward. Inputs passed through `model_input` (the training step and
    the scorer do) have their batch dimension marked dynamic: one graph per mode (train, eval) serves the
    full batches, the last partial batch and every evaluation batch size; size 1 is specialised, as torch
    does. So a model needs at most four graphs, far below dynamo's recompile limit (past it, dynamo falls
    back to eager without a word), and models of the same widths (the next category) reuse them. Only the
    batch dimension: `dynamic=True` would also make BatchNorm's float attributes symbolic, which splits
    every forward into two graphs. `compile_backend="aot_eager"` traces and differentiates the same graphs
    without generating kernels: a quick check that the model compiles, or a way to tell an inductor bug.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile(backend=compile_backend)
        setattr(model, _DYNAMIC_BATCH, True)
    return model
