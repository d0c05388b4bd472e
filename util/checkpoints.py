"""Checkpoint naming and I/O, in one place (METHOD.md §5).

Two plain state dicts per category, in the released naming:
`<dir>/<base_name>_<category>_.pckl` (reconstructive) and `<dir>/<base_name>_<category>__seg.pckl`
(discriminative). Our runs use the base name `DRAEM_test_<lr>_<epochs>_bs<bs>`; the authors'
pretrained set uses `DRAEM_seg_large_ae_large_0.0001_800_bs8`.
"""
import os
import pickle
import re
from pathlib import Path
from typing import NamedTuple
from zipfile import BadZipFile

import torch
from torch import nn

from util.atomic import atomic_torch_save
from util.errors import DraemInputError

RELEASED_BASE_NAME = "DRAEM_seg_large_ae_large_0.0001_800_bs8"
ANOMALIB_PREFIXES = {
    "reconstructive_subnetwork": "model.reconstructive_subnetwork.",
    "discriminative_subnetwork": "model.discriminative_subnetwork.",
}
# anomalib's SSPCAB block (its layers `masked_conv1..4`, `attention_module`) feeds the summed masked
# convolutions straight into squeeze-and-excite; ours, like Ristea et al.'s, applies a ReLU first. No weight
# rewrite can bridge that, so such checkpoints are refused rather than converted into a model that computes
# something else.
ANOMALIB_SSPCAB_MARKERS = (".masked_conv1.", ".attention_module.")
# anomalib reads RGB and feeds its discriminator cat([image, reconstruction]); we read BGR and feed
# cat((reconstruction, image)) (METHOD.md §1, §3). Each entry: (subnetwork, key, dim, index), where our
# channel j along `dim` takes anomalib's channel index[j]. The six discriminator inputs are anomalib's
# [img R, G, B, rec R, G, B] and ours [rec B, G, R, img B, G, R]: a full reversal.
ANOMALIB_CHANNEL_REWRITES = (
    ("reconstructive_subnetwork", "encoder.block1.0.weight", 1, (2, 1, 0)),  # RGB input -> BGR input
    ("reconstructive_subnetwork", "decoder.fin_out.0.weight", 0, (2, 1, 0)),  # RGB reconstruction -> BGR
    ("reconstructive_subnetwork", "decoder.fin_out.0.bias", 0, (2, 1, 0)),
    ("discriminative_subnetwork", "encoder_segment.block1.0.weight", 1, (5, 4, 3, 2, 1, 0)),
)


def run_base_name(lr: float, epochs: int, bs: int, seed: int = 0) -> str:
    """Base name of the checkpoints of a training run: the released program's, plus `_seed<N>` for a seed
    other than 0.

    So runs that differ only in --seed never overwrite each other, and the default run keeps the released
    name.
    """
    return f"DRAEM_test_{lr}_{epochs}_bs{bs}" + (f"_seed{seed}" if seed else "")


def checkpoint_paths(checkpoint_dir: str | os.PathLike, base_name: str, category: str) -> tuple[Path, Path]:
    """(reconstructive, discriminative) checkpoint paths of one category."""
    stem = f"{base_name}_{category}_"
    return Path(checkpoint_dir) / f"{stem}.pckl", Path(checkpoint_dir) / f"{stem}_seg.pckl"


def save_checkpoint(model: nn.Module, checkpoint_dir: str | os.PathLike, base_name: str,
                    category: str) -> tuple[Path, Path]:
    """Write both subnetworks' state dicts atomically in the released naming; return the paths."""
    rec_path, seg_path = checkpoint_paths(checkpoint_dir, base_name, category)
    atomic_torch_save(model.reconstructive_subnetwork.state_dict(), rec_path)
    atomic_torch_save(model.discriminative_subnetwork.state_dict(), seg_path)
    return rec_path, seg_path


def load_failure(exc: BaseException) -> str:
    """Why torch.load refused a file, in a few words: a pickled object that weights_only would not run, or the
    first sentence of the error (a truncated or foreign file)."""
    found = re.search(r"GLOBAL (\S+)", str(exc))
    if found:
        return f"it holds a pickled {found[1]}, not only tensors and plain values; it was not loaded"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:120]


def require_checkpoint(path: str | Path) -> Path:
    """`path` as a Path when the file is there, else the one-line "checkpoint not found" error."""
    path = Path(path)
    if not path.is_file():
        raise DraemInputError(f"checkpoint not found: {path} (check --checkpoint_path and --base_model_name)")
    return path


def read_state_dict(path: str | os.PathLike, trusted: bool = False,
                    trust_flag: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict as data (weights_only); a missing or unreadable file is a one-line DraemInputError.

    Only tensors and plain values are unpickled unless `trusted` (a Lightning checkpoint also pickles its
    hyper-parameters, which can run code). `trust_flag`: the program has --trust, so the error may suggest it.
    """
    path = require_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trusted)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, BadZipFile) as exc:
        hint = (" (if it is a Lightning checkpoint you trust, pass --trust)" if trust_flag and not trusted
                else "")
        raise DraemInputError(f"cannot read checkpoint {path} ({load_failure(exc)}){hint}") from None
    if not isinstance(state, dict):
        raise DraemInputError(f"checkpoint {path} holds a {type(state).__name__}, expected a state dict")
    return state


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module` strictly; the first missing, unexpected or mis-shaped key is a one-line
    error."""
    expected = module.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise DraemInputError(f"{source}: missing key '{key}' (the model expects shape "
                                  f"{tuple(tensor.shape)})")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise DraemInputError(
                f"{source}: key '{key}' has shape {tuple(state[key].shape)} but the model expects "
                f"{tuple(tensor.shape)} (was it trained with another --base_width / --seg_base_width or "
                f"--sspcab?)"
            )
    for key in state:
        if key not in expected:
            raise DraemInputError(f"{source}: unexpected key '{key}' (not a DRAEM checkpoint of this model "
                                  f"configuration?)")
    module.load_state_dict(state)


def load_checkpoint(model: nn.Module, checkpoint_dir: str | os.PathLike, base_name: str,
                    category: str) -> None:
    """Load a category's checkpoint pair (ours or the authors' released files) into a DraemModel."""
    load_checkpoint_pair(model, read_checkpoint_pair(checkpoint_dir, base_name, category))


class CheckpointPair(NamedTuple):
    """A checkpoint pair read as tensors, and the network configuration its keys and shapes imply."""

    rec_path: Path
    rec_state: dict[str, torch.Tensor]
    seg_path: Path
    seg_state: dict[str, torch.Tensor]
    config: dict  # DraemModel keyword arguments: base_width, seg_base_width, sspcab


def read_checkpoint_pair(checkpoint_dir: str | os.PathLike, base_name: str, category: str) -> CheckpointPair:
    """Read a category's pair and the widths and SSPCAB option off it.

    The released format stores no configuration, but the first conv of each network fixes its width and
    SSPCAB is recognised by its own keys, so test and predict need no width flags.
    """
    rec_path, seg_path = checkpoint_paths(checkpoint_dir, base_name, category)
    rec_state, seg_state = read_state_dict(rec_path), read_state_dict(seg_path)
    first_convs = ((rec_path, rec_state, "encoder.block1.0.weight"),
                   (seg_path, seg_state, "encoder_segment.block1.0.weight"))
    for path, state, key in first_convs:
        if key not in state:
            raise DraemInputError(f"{path}: missing key '{key}' (not a DRAEM checkpoint, or the two files "
                                  f"are swapped?)")
    config = {
        "base_width": rec_state["encoder.block1.0.weight"].shape[0],
        "seg_base_width": seg_state["encoder_segment.block1.0.weight"].shape[0],
        "sspcab": any(key.startswith("encoder.block5.corners.") for key in rec_state),
    }
    return CheckpointPair(rec_path, rec_state, seg_path, seg_state, config)


def load_checkpoint_pair(model: nn.Module, pair: CheckpointPair) -> None:
    """Load a read pair into a DraemModel's two subnetworks, refusing missing keys and wrong shapes."""
    load_state_dict_checked(model.reconstructive_subnetwork, pair.rec_state, str(pair.rec_path))
    load_state_dict_checked(model.discriminative_subnetwork, pair.seg_state, str(pair.seg_path))


def split_anomalib_state_dict(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Split an anomalib DRAEM state dict into our two subnetworks' state dicts by key prefix.

    Keys only: the tensors still expect anomalib's RGB channel order (see `anomalib_to_released`).
    An anomalib SSPCAB checkpoint is refused (see ANOMALIB_SSPCAB_MARKERS).
    """
    state = state.get("state_dict", state)  # a Lightning checkpoint nests the weights
    if any(marker in key for key in state for marker in ANOMALIB_SSPCAB_MARKERS):
        raise DraemInputError("this anomalib checkpoint uses SSPCAB, whose anomalib block has no ReLU after "
                              "its masked convolutions (ours has one): it cannot be converted exactly, so it "
                              "is not converted")
    parts = {}
    for name, prefix in ANOMALIB_PREFIXES.items():
        parts[name] = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if not parts[name]:
            raise DraemInputError(f"no '{prefix}*' keys: this is not an anomalib DRAEM checkpoint")
    return parts


def anomalib_to_released(state: dict, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Our two state dicts computing, on a BGR image, exactly what anomalib computed on the RGB image.

    Splits and renames the keys, then permutes the channels listed in ANOMALIB_CHANNEL_REWRITES: the
    first reconstructive conv's inputs, the reconstruction's output channels (weight and bias) and the
    first discriminative conv's six inputs. Everything between them is colour-order agnostic.
    """
    parts = split_anomalib_state_dict(state)
    for name, key, dim, index in ANOMALIB_CHANNEL_REWRITES:
        tensor = parts[name].get(key)
        if tensor is None or tensor.dim() <= dim or tensor.shape[dim] != len(index):
            found = "missing" if tensor is None else f"shape {tuple(tensor.shape)}"
            raise DraemInputError(f"{source} ({name}): key '{key}' is {found}, expected {len(index)} "
                                  f"channels along dim {dim}")
        parts[name][key] = tensor.index_select(dim, torch.tensor(index))
    return parts


def load_anomalib_checkpoint(model: nn.Module, path: str | os.PathLike, trusted: bool = False) -> None:
    """Load an anomalib DRAEM checkpoint (keys `model.<subnetwork>.*`) into `model`, converted for BGR
    input."""
    for name, state in anomalib_to_released(read_state_dict(path, trusted, trust_flag=True),
                                            str(path)).items():
        load_state_dict_checked(getattr(model, name), state, f"{path} ({name})")


def convert_anomalib_checkpoint(
    path: str | os.PathLike, checkpoint_dir: str | os.PathLike, base_name: str, category: str,
    trusted: bool = False
) -> tuple[Path, Path]:
    """Rewrite an anomalib DRAEM checkpoint as a released-format pair for BGR input; return the two paths."""
    parts = anomalib_to_released(read_state_dict(path, trusted, trust_flag=True), str(path))
    rec_path, seg_path = checkpoint_paths(checkpoint_dir, base_name, category)
    atomic_torch_save(parts["reconstructive_subnetwork"], rec_path)
    atomic_torch_save(parts["discriminative_subnetwork"], seg_path)
    return rec_path, seg_path
