"""Where and how the networks run: device selection (and, with the fast path, precision and compilation)."""
import torch

from errors import DraemInputError


def select_device(name: str = "auto", gpu_id: int = 0) -> torch.device:
    """`auto` picks CUDA when present; `cuda` means `cuda:<gpu_id>`; asking for CUDA without one is a clear error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DraemInputError(f"--device {name} asked for, but no CUDA device is available (use --device cpu)")
        return torch.device(f"cuda:{gpu_id}") if name == "cuda" else torch.device(name)
    return torch.device(name)
