"""Train DRAEM on MVTec-AD-style categories (METHOD.md §2, §4, §5).

    python train_draem.py --obj_id carpet --data_path datasets/mvtec --anomaly_source_path datasets/dtd
    python train_draem.py --demo      # makes a small dataset, trains a small model on CPU, tests it
    torchrun --nproc_per_node 4 train_draem.py --obj_id carpet --data_path ...   # one process per GPU (DDP)
    torchrun --nproc_per_node 4 train_draem.py --obj_id -1 --parallel categories ...   # categories per GPU

Defaults are the paper's: batch 8, Adam lr 1e-4 on both subnetworks, 700 epochs, learning rate ×0.2
at 80 % and 90 % of the epochs, loss = L2 + SSIM + focal. Under torchrun --bs is per process.
"""
import argparse
import json
import math
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from zipfile import BadZipFile

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data_loader import TrainDataset, TrainImageDataset, seed_everything, train_loader
from device_synthesis import device_generator, synthesize_batch
from engine import calibration, validation
from engine.evaluation import DraemScorer, evaluate_checkpoints
from engine.validation import SampleSet
from loss import DraemLoss
from model_unet import DraemModel, anomaly_map, check_image_size, deterministic_upsampling
from util import distributed
from util.atomic import (
    atomic_torch_save,
    atomic_write_text,
    check_output_files,
    check_output_folder,
    exclusive_lock,
)
from util.checkpoints import (
    checkpoint_paths,
    load_failure,
    load_state_dict_checked,
    run_base_name,
    save_checkpoint,
)
from util.cli import (
    ArgumentParser,
    add_dataset_flags,
    add_device_flags,
    add_fast_flags,
    add_image_size_flag,
    add_width_flags,
    at_least,
    fraction,
    non_negative_float,
    plain_name,
    positive_float,
)
from util.demo_data import make_demo_dataset
from util.errors import DraemInputError, Terminated, TrainingDiverged, interrupted, one_line_errors
from util.images import find_images, load_images
from util.layouts import (
    LAYOUTS,
    VALIDATION_LAYOUTS,
    categories_for,
    find_anomaly_sources,
    train_image_paths,
    validation_image_paths,
)
from util.pictures import save_png, save_training_curves, training_grid
from util.provenance import provenance
from util.runtime import autocast, model_input, prepare_model, set_deterministic, set_fp32_precision
from util.thresholds import (
    DEFAULT_K,
    RULES,
    TRAINING_SOURCE,
    VALIDATION_GOOD_SYNTHETIC_SOURCE,
    VALIDATION_SOURCE,
    threshold_path,
    write_thresholds,
)

DEMO_ROOT = Path("datasets/demo")
DEMO_RESULTS = Path("results/demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    released = parser.add_argument_group("flags of the released program")
    released.add_argument("--obj_id", default="-1", type=plain_name,
                          help="category name, released integer id (0 capsule .. 14 wood), "
                               "or -1 for all of the layout's categories")
    released.add_argument("--bs", type=at_least(1), default=8, help="batch size (paper: 8)")
    released.add_argument("--lr", type=positive_float, default=1e-4,
                          help="Adam learning rate of both subnetworks (paper: 1e-4)")
    released.add_argument("--epochs", type=at_least(1), default=700,
                          help="training epochs per category (paper: 700)")
    released.add_argument("--gpu_id", type=at_least(0), default=0,
                          help="CUDA device index when training on a GPU")
    released.add_argument("--data_path",
                          help="dataset root: for mvtec, the folder holding <category>/train/good")
    released.add_argument("--anomaly_source_path",
                          help="texture folder (DTD) searched recursively for images; "
                               "omitted: random-noise anomalies (weaker than DTD)")
    released.add_argument("--checkpoint_path", default="checkpoints",
                          help="folder for the .pckl checkpoints and the resume files")
    released.add_argument("--log_path", default="logs",
                          help="folder for the per-epoch JSONL log and the sample grids")
    released.add_argument("--visualize", action="store_true",
                          help="save a PNG grid (input, reconstruction, target, true and predicted mask) "
                               "every --visualize_every steps")
    extra = parser.add_argument_group("additions")
    add_dataset_flags(extra, LAYOUTS)
    extra.add_argument("--visualize_every", type=at_least(1), default=200,
                       help="steps between sample grids with --visualize")
    add_device_flags(extra, gpu_id=False)  # --gpu_id is among the released flags above
    extra.add_argument("--seed", type=at_least(0), nargs="+", default=[0],
                       help="seed of every random stream (model init, sampling, synthesis); a seed other "
                            "than 0 is added to the run name (<base>_seed<N>), so several seeds never "
                            "overwrite each other; several (--seed 0 1 2) train one run per seed")
    extra.add_argument("--workers", type=at_least(0), default=4,
                       help="DataLoader worker processes (0: load in the main process)")
    extra.add_argument("--resume", action="store_true",
                       help="continue each category from its resume file in --checkpoint_path, which must "
                            "exist and hold the same settings (refused otherwise, naming the setting)")
    extra.add_argument("--overwrite", action="store_true",
                       help="train anew over a run of the same name in --checkpoint_path / --log_path, "
                            "replacing its files (without it, or --resume, such a run is never touched)")
    add_image_size_flag(extra)
    add_width_flags(extra)
    extra.add_argument("--sspcab", action="store_true",
                       help="replace the reconstructive encoder's last block by SSPCAB")
    extra.add_argument("--sspcab_lambda", type=non_negative_float, default=0.1,
                       help="weight of the SSPCAB loss")
    extra.add_argument("--calibration_samples", type=at_least(2), default=64,
                       help="synthetic samples (the training mix) the deployment thresholds are calibrated "
                            "on after the last epoch, written to <base>_<category>_threshold.json (with "
                            "--val_every: the validation set)")
    extra.add_argument("--good_dir",
                       help="a folder of extra known-good images, counted as normal when calibrating the "
                            "thresholds")
    extra.add_argument("--threshold_rule", choices=tuple(RULES), default="f1",
                       help="how the thresholds are calibrated after the last epoch: f1 (F1-max on synthetic "
                            "anomalies and normal images) or mean_std (mean + k·std of the scores on normal "
                            "images only: the layout's validation/good, the --val_every held-out images, + "
                            "--good_dir)")
    extra.add_argument("--threshold_k", type=at_least(0, float), default=DEFAULT_K,
                       help="k of the mean_std rule")
    extra.add_argument("--demo", action="store_true",
                       help="make the demo dataset if absent, train small models on CPU and test them; "
                            "other flags keep their meaning")
    fast = parser.add_argument_group("fast path (off by default; checkpoints keep the released format)")
    fast.add_argument("--synthesis", choices=("cpu", "gpu"), default="cpu",
                      help="cpu: the faithful per-sample synthesis in the loader workers; gpu: batched on "
                           "the training device (same distributions; workers only decode; persistent "
                           "workers, so --resume is seeded but not bitwise)")
    add_fast_flags(fast)
    fast.add_argument("--deterministic", action="store_true",
                      help="deterministic algorithms only, so a CUDA run repeats bit for bit: cuDNN's "
                           "deterministic kernels, cuBLAS with a fixed workspace, the upsampling as matrix "
                           "products (same math, a backward without atomic adds); slower (see "
                           "tools.bench_draem). CPU training is bit-exact without it")
    val = parser.add_argument_group("validation during training "
                                    "(off by default: then every training image is trained on, as in the "
                                    "paper)")
    val.add_argument("--val_every", type=at_least(0), default=0,
                     help="evaluate on held-out synthetic anomalies every N epochs and after the last; 0: "
                          "off")
    val.add_argument("--val_fraction", type=fraction, default=0.1,
                     help="fraction of the training images held out, never trained on (at least 1; chosen by "
                          "--seed)")
    val.add_argument("--val_samples", type=at_least(1), default=64,
                     help="synthetic samples made once from the held-out images, the training mix (about "
                          "half anomalous)")
    val.add_argument("--val_test", action="store_true",
                     help="also report the test-set metrics (released protocol) when "
                          "<data_path>/<category>/test exists")
    val.add_argument("--save_best", action="store_true",
                     help="also keep the checkpoint pair with the best validation pixel AP, base name "
                          "<base>_best")
    ddp = parser.add_argument_group("multi-GPU: run under torchrun --nproc_per_node N (process i on cuda:i)")
    ddp.add_argument("--parallel", choices=("ddp", "categories"), default="ddp",
                     help="ddp: the processes train each category together (DDP, gradients averaged, --bs "
                          "per process); categories: each process trains whole categories (and seeds) alone, "
                          "exactly as a single process would, balanced by training-image count; process 0 "
                          "writes the summary")
    ddp.add_argument("--sync_bn", action="store_true",
                     help="synchronise BatchNorm statistics across the processes (SyncBatchNorm; CUDA only)")
    args = parser.parse_args(argv)
    if args.demo:
        apply_demo_defaults(args, parser.typed(argv))
    if args.data_path is None:
        parser.error("--data_path is required (or use --demo)")
    if args.resume and args.overwrite:
        parser.error("--resume continues a run, --overwrite starts it anew: give one of them")
    check_validation_args(args, parser)
    return args


def check_validation_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if (args.save_best or args.val_test) and not args.val_every:
        parser.error("--save_best and --val_test need validation: add --val_every N")


def apply_demo_defaults(args: argparse.Namespace, typed: set[str]) -> None:
    """Small-and-quick settings for the demo, for every flag the user did not type."""
    demo = {"dataset": "folder", "data_path": str(DEMO_ROOT / "mvtec"),
            "anomaly_source_path": str(DEMO_ROOT / "textures"), "epochs": 32, "image_size": (128, 128),
            "base_width": 16, "seg_base_width": 16, "workers": 0, "lr": 5e-4, "bs": 8,
            "checkpoint_path": "checkpoints/demo", "log_path": "logs/demo"}
    for name, value in demo.items():
        if name not in typed:
            setattr(args, name, value)
    if Path(args.data_path) == DEMO_ROOT / "mvtec" and not Path(args.data_path).is_dir():
        make_demo_dataset(DEMO_ROOT)


@dataclass
class Run:
    """One category's training run: its settings, data, model and optimiser, and how far it has come."""

    args: argparse.Namespace
    category: str
    device: torch.device
    base_name: str
    dataset: TrainDataset
    val_set: SampleSet | None  # with --val_every, on rank 0
    loader: DataLoader
    generator: torch.Generator  # the loader's: shuffling and every worker's seed
    synthesis_rng: torch.Generator | None  # --synthesis gpu: the device synthesis stream
    model: DraemModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0  # epochs done
    saved: int = 0  # the epoch the resume file holds: what --resume continues from
    log_lines: list[str] = field(default_factory=list)
    best: float | None = None  # best validation pixel AP so far (--save_best)


def make_datasets(args: argparse.Namespace, category: str) -> tuple[TrainDataset, SampleSet | None]:
    """The training dataset and, with --val_every, the validation set made from images held out of it (rank 0
    only); in the layouts with a validation/good set (mvtec_ad2, mvtec_loco) from that set, and every training
    image trains."""
    paths, held_paths = train_image_paths(args.dataset, args.data_path, category), []
    if args.val_every and args.dataset in VALIDATION_LAYOUTS:
        held_paths = validation_image_paths(args.dataset, args.data_path, category)
    elif args.val_every:  # on every rank, before the dataset is built: no rank trains on the held-out images
        paths, held_paths = validation.split_paths(paths, args.val_fraction, args.seed)
    dataset_class = TrainImageDataset if args.synthesis == "gpu" else TrainDataset
    shape = args.image_size
    dataset = dataset_class(anomaly_source_path=args.anomaly_source_path, resize_shape=shape,
                            image_paths=paths)
    if not held_paths or not distributed.is_main():
        return dataset, None
    val_set = validation.synthesize(load_images(held_paths, shape), dataset.draw_source, args.val_samples,
                                    args.seed)
    held = "validation/good" if args.dataset in VALIDATION_LAYOUTS else "held-out training"
    print(f"{category}: validating on {len(val_set.labels)} samples ({int(val_set.labels.sum())} anomalous) "
          f"made from {len(held_paths)} {held} images ({', '.join(p.name for p in held_paths)})")
    return dataset, val_set


def start_run(args: argparse.Namespace, category: str, device: torch.device, resume: bool) -> Run:
    """Seed this process, build the data, the model and its optimiser; with `resume`, continue from the resume
    file.

    Before the weights change (a run anew, or a resumed one with epochs left), the pair's threshold file goes:
    it was calibrated for other weights. A run anew also drops the resume file of the run it replaces
    (--overwrite).
    """
    # each rank its own random streams; a single process uses --seed itself
    seed = args.seed + distributed.rank()
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    base_name = run_base_name(args.lr, args.epochs, args.bs, args.seed)
    resume_file = resume_path(args.checkpoint_path, base_name, category)
    resumed = read_resume_file(resume_file) if resume else None
    if distributed.is_main():
        if resumed is None:
            resume_file.unlink(missing_ok=True)
        if resumed is None or resumed["epoch"] < args.epochs:
            threshold_path(args.checkpoint_path, base_name, category).unlink(missing_ok=True)
        if resumed is None and args.resume:
            print(f"{category}: no resume file yet, training from the start")
    dataset, val_set = make_datasets(args, category)
    # A fresh worker per epoch, reseeded from `generator`, makes --resume bitwise exact; the device path keeps
    # its workers.
    loader = train_loader(dataset, args.bs, args.workers, generator, device,
                          sampler=distributed.rank_sampler(dataset),
                          persistent_workers=args.synthesis == "gpu")
    synthesis_rng = device_generator(device, seed) if args.synthesis == "gpu" else None
    model = DraemModel(args.base_width, args.seg_base_width, sspcab=args.sspcab).to(device)
    if args.deterministic:
        deterministic_upsampling(model)  # after the initialisation, which draws no number for the upsampling
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # Released milestones: 80 % and 90 % of the epochs. The released float milestones are never reached when
    # fractional (e.g. 22.5); rounding up keeps them reachable and changes nothing when they are whole
    # numbers.
    milestones = [math.ceil(args.epochs * 0.8), math.ceil(args.epochs * 0.9)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.2)
    run = Run(args, category, device, base_name, dataset, val_set, loader, generator, synthesis_rng, model,
              optimizer, scheduler)
    if resumed is not None:
        load_epoch(run, resumed)
        if distributed.is_main():
            print(f"{category}: resuming after epoch {run.epoch}/{args.epochs}")
    return run


def training_batch(batch: dict, device: torch.device,
                   synthesis_rng: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """(image, augmented image, mask) on the device: moved from the loader, or synthesised there with
    --synthesis gpu."""
    if synthesis_rng is not None:
        source = batch["source"].to(device, non_blocking=True) if "source" in batch else None
        batch = synthesize_batch(batch["image"].to(device, non_blocking=True), source, synthesis_rng)
    return tuple(batch[key].to(device, non_blocking=True)
                 for key in ("image", "augmented_image", "anomaly_mask"))


def rng_state(run: Run) -> dict:
    """Every random stream this process draws from, to continue it exactly on --resume: tensors and plain
    values only, so the resume file loads with torch.load(weights_only=True)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "loader": run.generator.get_state(),
             "numpy": {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(position), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "python": [version, list(python_state), gauss_next]}
    if run.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(run.device)
    if run.synthesis_rng is not None:
        state["synthesis"] = run.synthesis_rng.get_state()
    return state


def set_rng_state(run: Run, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["bit_generator"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    version, python_state, gauss_next = state["python"]
    random.setstate((version, tuple(python_state), gauss_next))
    run.generator.set_state(state["loader"])
    if "cuda" in state and run.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], run.device)
    if run.synthesis_rng is not None and "synthesis" in state:
        run.synthesis_rng.set_state(state["synthesis"])


def resume_path(checkpoint_dir: str | Path, base_name: str, category: str) -> Path:
    """The file with everything needed to continue a run (weights, optimizer, RNG states of every rank,
    log)."""
    return checkpoint_paths(checkpoint_dir, base_name, category)[0].with_suffix(".resume.pt")


# The resume file is the record of a run; per epoch it is written first, then the checkpoint pair, then the
# log. A crash between these writes leaves the pair one epoch behind (or, between its two files, mixed) and
# the log short; --resume rewrites the pair and the log from the resume file before training on, so they
# agree again. A resume file that cannot be read is refused, and nothing is written.
# It holds tensors and plain values only and is read with weights_only=True: a resume file from elsewhere is
# data, never code. Its settings must equal this run's (RESUME_SETTINGS).
RESUME_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "log_lines", "best_val_pixel_ap",
               "settings")
# What changes the computation of a run: --resume refuses a resume file written with other values. The run's
# name already fixes --lr, --epochs, --bs and --seed. Paths (a moved dataset), the device, --workers and the
# pictures may change: the seeded streams do not depend on them (README, "Reproducibility and provenance").
# The fp32 policy and --deterministic are kept too: the provenance of a run says which it was trained with.
RESUME_SETTINGS = ("dataset", "mask_suffix", "lr", "epochs", "bs", "seed", "image_size", "base_width",
                   "seg_base_width", "sspcab", "sspcab_lambda", "synthesis", "precision", "channels_last",
                   "compile", "fp32_precision", "deterministic", "calibration_samples", "val_every",
                   "val_fraction", "val_samples", "val_test", "save_best", "sync_bn", "threshold_rule",
                   "threshold_k")


def run_settings(args: argparse.Namespace, category: str) -> dict:
    """The settings a resume file records and --resume compares: the category (a renamed file is not that
    category's run), RESUME_SETTINGS, and which kinds of data are used."""
    settings = {"obj_id": category, **{name: getattr(args, name) for name in RESUME_SETTINGS}}
    settings["anomaly_source_path"] = ("a folder" if args.anomaly_source_path is not None
                                       else "none (random noise)")
    settings["good_dir"] = "a folder" if args.good_dir is not None else "none"
    return settings


def log_file(args: argparse.Namespace, base_name: str, category: str) -> Path:
    return Path(args.log_path) / f"{base_name}_{category}_log.jsonl"


def curves_file(args: argparse.Namespace, base_name: str, category: str) -> Path:
    return Path(args.log_path) / f"{base_name}_{category}_curves.png"


def run_files(args: argparse.Namespace, base_name: str, category: str) -> list[Path]:
    """The files a category's run writes: the pair, the resume file, the threshold file, the log and its
    curves."""
    files = [*checkpoint_paths(args.checkpoint_path, base_name, category),
             resume_path(args.checkpoint_path, base_name, category),
             threshold_path(args.checkpoint_path, base_name, category), log_file(args, base_name, category),
             curves_file(args, base_name, category)]
    if args.save_best:
        files += checkpoint_paths(args.checkpoint_path, f"{base_name}_best", category)
    return files


def run_locks(args: argparse.Namespace, base_name: str, categories: list[str]) -> list[tuple[Path, str]]:
    """The lock files of a run, one per category in each output folder (util.atomic.exclusive_lock)."""
    return [(Path(folder) / f"{base_name}_{category}.lock", f"{base_name} for {category} in {folder}")
            for category in categories for folder in (args.checkpoint_path, args.log_path)]


def write_outputs(run: Run) -> None:
    """The checkpoint pair, the JSONL log of the run so far and its training curves (each file atomically)."""
    args = run.args
    save_checkpoint(run.model, args.checkpoint_path, run.base_name, run.category)
    atomic_write_text(log_file(args, run.base_name, run.category), "\n".join(run.log_lines) + "\n")
    save_training_curves([json.loads(line) for line in run.log_lines],
                         curves_file(args, run.base_name, run.category))


def save_epoch(run: Run, rng_states: list[dict]) -> None:
    """Write the resume file, then the checkpoint pair and the log, for the epoch just finished."""
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "rng": rng_states, "epoch": run.epoch,
             "log_lines": run.log_lines, "best_val_pixel_ap": run.best,
             "settings": run_settings(run.args, run.category),
             "provenance": provenance("train_draem.py", run.args, run.device)}
    atomic_torch_save(state, resume_path(run.args.checkpoint_path, run.base_name, run.category))
    run.saved = run.epoch
    write_outputs(run)


def read_resume_file(path: Path, mmap: bool = False) -> dict:
    """The state a resume file holds, loaded as data only (weights_only); an unreadable, foreign or edited
    file is a one-line error naming it and the fix. `mmap`: map the tensors instead of reading them (for a
    quick look)."""
    fix = "restore it, or delete it and start this category over without --resume"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, TypeError, AttributeError,
            ImportError, BadZipFile) as exc:
        # a truncated, foreign or code-carrying file fails inside torch, pickle or zipfile in any of these
        # ways
        raise DraemInputError(f"cannot read resume file {path} ({load_failure(exc)}): {fix}") from None
    missing = ([key for key in RESUME_KEYS if key not in state] if isinstance(state, dict)
               else list(RESUME_KEYS))
    if missing:
        raise DraemInputError(f"cannot read resume file {path}: it has no {', '.join(missing)} (not a resume "
                              f"file of this train_draem.py?): {fix}")
    epoch, log_lines, best = state["epoch"], state["log_lines"], state["best_val_pixel_ap"]
    problems = {
        "epoch": not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0,
        "log_lines": not isinstance(log_lines, list) or not all(isinstance(line, str) for line in log_lines)
        or len(log_lines) != epoch,
        "best_val_pixel_ap": best is not None and not isinstance(best, float),
        "rng": not isinstance(state["rng"], list) or not all(isinstance(rng, dict) for rng in state["rng"]),
        "settings": not isinstance(state["settings"], dict),
        "model": not isinstance(state["model"], dict),
    }
    wrong = [key for key, bad in problems.items() if bad]
    if wrong:
        raise DraemInputError(f"resume file {path}: {wrong[0]} is not what train_draem.py writes (edited?): "
                              f"{fix}")
    return state


def check_resume_settings(state: dict, args: argparse.Namespace, path: Path, category: str) -> None:
    """A resume file continues only the run it was written by: the first setting that differs is a one-line
    error."""
    def as_flag(value):  # (64, 96) as the flag reads "64 96", a square (64, 64) as "64"
        return " ".join(map(str, dict.fromkeys(value))) if isinstance(value, tuple) else value

    for name, value in run_settings(args, category).items():
        stored = state["settings"].get(name, "(not recorded)")
        stored = tuple(stored) if isinstance(stored, list) else stored
        if stored != value:
            if str(stored) == str(value):  # equal as text, not in type (an edited file): show the types
                stored, value = repr(stored), repr(value)
            stored, value = as_flag(stored), as_flag(value)
            raise DraemInputError(f"resume file {path} was written with --{name} {stored}, this run has "
                                  f"--{name} {value}: resume with the settings it was started with, or train "
                                  f"anew with --overwrite")


def load_epoch(run: Run, state: dict) -> None:
    """Restore a run from its resume state (epochs done, log, best value) and rewrite its pair and log."""
    path = resume_path(run.args.checkpoint_path, run.base_name, run.category)
    check_resume_settings(state, run.args, path, run.category)
    load_state_dict_checked(run.model, state["model"], str(path))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if len(state["rng"]) != distributed.world_size():
        raise DraemInputError(f"{path} was written by {len(state['rng'])} training process(es), this run has "
                              f"{distributed.world_size()}: resume with the same number of processes, or "
                              f"leave out --resume")
    set_rng_state(run, state["rng"][distributed.rank()])  # each rank continues its own stream
    run.epoch, run.log_lines, run.best = state["epoch"], state["log_lines"], state["best_val_pixel_ap"]
    run.saved = run.epoch
    if distributed.is_main():
        write_outputs(run)


def epoch_record(run: Run, step: int, losses: list[torch.Tensor], part_sums: dict, started: float) -> dict:
    """The log record of the epoch just trained (losses averaged over steps and ranks); a non-finite loss
    stops the run with one line naming its step (one device sync for the whole epoch)."""
    # per step, over the ranks: every rank sees the same values
    losses = distributed.average(torch.stack(losses))
    part_means = distributed.average(torch.stack(list(part_sums.values()))) / len(losses)
    bad = ~torch.isfinite(losses)
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise TrainingDiverged(
            f"{run.category}: loss became {losses[index].item()} at epoch {run.epoch + 1}, step "
            f"{step - len(losses) + index + 1}; stopped, the last good checkpoint (epoch {run.epoch}) is "
            f"kept in {run.args.checkpoint_path} (try a lower --lr)"
        )
    return {"category": run.category, "epoch": run.epoch + 1, "step": step,
            "lr": run.optimizer.param_groups[0]["lr"],  # the rate this epoch trained with (the log and the
                                                        # curves show it)
            "loss": losses.mean().item(), **dict(zip(part_sums, part_means.tolist())),
            "seconds": round(time.time() - started, 2)}


def validation_due(epoch: int, every: int, epochs: int) -> bool:
    """Whether to validate after (1-based) `epoch`: every `every` epochs and after the last; never when
    `every` is 0."""
    return every > 0 and (epoch % every == 0 or epoch == epochs)


def validate(run: Run, record: dict) -> None:
    """When due, add the validation metrics (`val_*`; `test_*` too with --val_test) and their seconds to
    `record`; with --save_best keep the pair with the best validation pixel AP (NaN never improves)."""
    args = run.args
    if not validation_due(record["epoch"], args.val_every, args.epochs):
        return
    started = time.time()
    scorer = DraemScorer(run.model, args.precision, args.channels_last)
    record.update(validation.evaluate_synthetic(scorer, run.val_set, run.device, args.bs))
    if args.val_test:
        record.update(validation.evaluate_test_set(scorer, args.data_path, run.category, args.image_size,
                                                   run.device, args.bs, args.dataset, args.mask_suffix))
    record["val_seconds"] = round(time.time() - started, 2)
    value = record["val_pixel_ap"]
    if args.save_best and not math.isnan(value) and (run.best is None or value > run.best):
        run.best = value
        save_checkpoint(run.model, args.checkpoint_path, f"{run.base_name}_best", run.category)


def held_out_fraction(args: argparse.Namespace) -> float | None:
    """The share of the training images this run holds out (validation), or None when it trains on all of
    them."""
    return args.val_fraction if args.val_every and args.dataset not in VALIDATION_LAYOUTS else None


def calibrate_thresholds(run: Run) -> None:
    """Write the pair's deployment thresholds, calibrated on data the test never sees (util/thresholds.py).
    The f1 rule: on the validation set with validation on, else on synthetic anomalies on the layout's
    validation/good images or, without one, on the training images the dataset holds; plus --good_dir's images
    as normals. The mean_std rule: on the normal images the model never trained on (`calibration.normal_set`)
    and --good_dir's."""
    args, dataset = run.args, run.dataset
    scorer = DraemScorer(run.model, args.precision, args.channels_last)
    if args.threshold_rule == "mean_std":
        paths, source = calibration.normal_set(args.dataset, args.data_path, run.category,
                                               held_out_fraction(args), args.seed)
        images, source = calibration.normal_images(paths, source, args.good_dir, args.image_size)
        thresholds = calibration.calibrate_normal_only(scorer, images, run.device, args.bs,
                                                       k=args.threshold_k, source=source)
    else:
        if run.val_set is not None:
            samples = run.val_set
            source = (VALIDATION_GOOD_SYNTHETIC_SOURCE if args.dataset in VALIDATION_LAYOUTS
                      else VALIDATION_SOURCE)
        elif args.dataset in VALIDATION_LAYOUTS:
            held = load_images(validation_image_paths(args.dataset, args.data_path, run.category),
                               args.image_size)
            samples = validation.synthesize(held, dataset.draw_source, args.calibration_samples, args.seed)
            source = VALIDATION_GOOD_SYNTHETIC_SOURCE
        else:
            samples = validation.synthesize(dataset.images, dataset.draw_source, args.calibration_samples,
                                            args.seed)
            source = TRAINING_SOURCE
        samples, source = calibration.with_good_images(samples, source, args.good_dir, args.image_size)
        thresholds = calibration.calibrate(scorer, samples.images, samples.masks, samples.labels, run.device,
                                           args.bs, source=source)
    path = write_thresholds(args.checkpoint_path, run.base_name, run.category, thresholds,
                            provenance("train_draem.py", args, run.device))
    rule = " (mean_std rule)" if args.threshold_rule == "mean_std" else ""
    print(f"{run.category}: image threshold {thresholds['image_threshold']:.4g}, pixel threshold "
          f"{thresholds['pixel_threshold']:.4g}{rule}, from {source} -> {path}")


def train_step(net: torch.nn.Module, model: DraemModel, criterion: DraemLoss,
               optimizer: torch.optim.Optimizer, image: torch.Tensor, augmented: torch.Tensor,
               mask: torch.Tensor, precision: str = "fp32", channels_last: bool = False) -> tuple[
                   torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One optimisation step: forward the augmented batch, L2 + SSIM + focal loss, backward, Adam step.

    `net` is what is called (the model, or DDP around it); `model` the DraemModel itself. The forward runs
    under autocast with --precision bf16, the loss outside it in fp32. Returns the detached loss, its parts,
    reconstruction and logits.
    """
    with autocast(image.device, precision):
        reconstruction, logits = net(model_input(model, augmented, channels_last))
    loss, parts = criterion(reconstruction, image, logits, mask, model.sspcab_io)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), parts, reconstruction.detach(), logits.detach()


def check_synthesis_state(state: dict, device: torch.device, path: Path) -> None:
    """A --synthesis gpu run continues only on the device type whose generator drew its synthesis stream (a
    CUDA generator's state is a seed and an offset, a CPU one's a Mersenne Twister): else one line naming the
    fix."""
    expected = device_generator(device, 0).get_state().numel()
    cpu_size = torch.Generator().get_state().numel()
    for rank_state in state["rng"]:
        written = rank_state.get("synthesis")
        if written is not None and written.numel() != expected:
            where = "cpu" if written.numel() == cpu_size else "cuda"
            raise DraemInputError(f"{path} continues a --synthesis gpu run whose synthesis random stream was "
                                  f"drawn on {where} ({written.numel()}-byte generator state), this run is "
                                  f"on {device.type}: resume it with --device {where}, or train it anew "
                                  f"with --overwrite")


def plan_category(args: argparse.Namespace, base_name: str, category: str, device: torch.device) -> bool:
    """Whether the category resumes (its resume file read and its settings checked) or starts anew; a run of
    the same name that would be lost, or cannot be resumed, is a one-line error. Before any slow work."""
    path = resume_path(args.checkpoint_path, base_name, category)
    if args.resume and path.is_file():
        state = read_resume_file(path, mmap=True)
        check_resume_settings(state, args, path, category)
        if args.synthesis == "gpu":
            check_synthesis_state(state, device, path)
        return True
    found = [file for file in (path, *checkpoint_paths(args.checkpoint_path, base_name, category),
                               log_file(args, base_name, category)) if file.exists()]
    if found and not args.overwrite:
        if args.resume:
            raise DraemInputError(f"{found[0]} exists but there is no resume file {path.name} beside the "
                                  f"checkpoints: {category} cannot be resumed; train it anew with "
                                  f"--overwrite instead of --resume")
        raise DraemInputError(f"{found[0]} exists: a run named {base_name} for {category} is there; add "
                              f"--resume to continue it, --overwrite to train it anew (replacing its files), "
                              f"or choose other folders")
    return False


def preflight(args: argparse.Namespace, base_name: str, categories: list[str],
              device: torch.device) -> dict[str, bool]:
    """Check everything the run will read and write before the first epoch (the output folders are checked
    before, for the lock files); per category, whether it resumes."""
    if args.anomaly_source_path is not None:
        find_anomaly_sources(args.anomaly_source_path)  # listed, and each file's first bytes checked
    if args.good_dir is not None:
        find_images(args.good_dir, "--good_dir", check="--good_dir image")
    plans = {}
    for category in categories:
        train_image_paths(args.dataset, args.data_path, category)
        if args.threshold_rule == "mean_std":  # the normal-only rule's images exist
            paths, _ = calibration.normal_set(args.dataset, args.data_path, category, held_out_fraction(args),
                                              args.seed)
            calibration.require_normal_set(paths, args.good_dir)
        check_output_files(run_files(args, base_name, category), "a file of this run")
        plans[category] = plan_category(args, base_name, category, device)
    if args.resume and not any(plans.values()):
        path = resume_path(args.checkpoint_path, base_name, categories[0])
        raise DraemInputError(f"--resume: there is no resume file {path} (the run's name {base_name} comes "
                              f"from --lr, --epochs, --bs and --seed): check them and --checkpoint_path, or "
                              f"leave out --resume")
    return plans


def train_category(args: argparse.Namespace, category: str, device: torch.device,
                   resume: bool) -> dict | None:
    """Train one category from scratch (or, with `resume`, from its resume file) and write its checkpoints
    every epoch (rank 0). Ctrl-C or SIGTERM ends it with one line saying what was saved. Returns, on rank 0,
    the run's line of the training summary (category, seed, epochs, last loss, seconds, device, process)."""
    started_run = time.time()
    run = start_run(args, category, device, resume)
    criterion = DraemLoss(args.sspcab_lambda)
    # in place: the state-dict keys stay the released ones
    prepare_model(run.model, args.channels_last, args.compile)
    # what the loop calls; `run.model` is what is saved
    net = distributed.wrap_model(run.model, device, args.sync_bn)

    try:
        step = run.epoch * len(run.loader)
        for epoch in range(run.epoch, args.epochs):
            net.train()
            started, losses, part_sums = time.time(), [], {}
            progress = tqdm(run.loader, desc=f"{category} {epoch + 1}/{args.epochs}", leave=False,
                            dynamic_ncols=True,
                            disable=distributed.process_index()[0] != 0)  # one progress bar on the terminal
            for batch in progress:
                image, augmented, mask = training_batch(batch, device, run.synthesis_rng)
                loss, parts, reconstruction, logits = train_step(net, run.model, criterion, run.optimizer,
                                                                 image, augmented, mask, args.precision,
                                                                 args.channels_last)
                losses.append(loss)  # a tensor: calling .item() here would stall the GPU every step
                for name, value in parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + value
                step += 1
                if args.visualize and distributed.is_main() and step % args.visualize_every == 0:
                    grid = training_grid(augmented, reconstruction.float(), image, mask, anomaly_map(logits))
                    save_png(Path(args.log_path) / f"{run.base_name}_{category}_step{step:07d}.png", grid)
                if len(losses) % 10 == 0:
                    progress.set_postfix(loss=f"{losses[-1].item():.4f}")
            record = epoch_record(run, step, losses, part_sums, started)
            run.scheduler.step()
            run.epoch = epoch + 1
            rng_states = distributed.gather_objects(rng_state(run))  # all ranks', each resumes its own
            if distributed.is_main():
                validate(run, record)
                run.log_lines.append(json.dumps(record))
                save_epoch(run, rng_states)
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in record.items()))
        if distributed.is_main():
            calibrate_thresholds(run)
    except (KeyboardInterrupt, Terminated) as stop:
        message = (f"{category}: interrupted after epoch {run.saved} of {args.epochs}; resume with --resume"
                   if run.saved
                   else f"{category}: interrupted before its first epoch was saved; start it again (without "
                        f"--resume)")
        raise interrupted(stop, message) from None
    distributed.barrier()  # rank 0's last files are written before any rank moves on
    if not distributed.is_main():
        return None
    last = json.loads(run.log_lines[-1]) if run.log_lines else {}
    return {"category": category, "seed": args.seed, "base_name": run.base_name, "device": str(device),
            "process": distributed.process_index()[0], "epochs": run.epoch, "loss": last.get("loss"),
            "seconds": round(time.time() - started_run, 2)}


def run_args(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    """The flags of one run: `args` with its single seed."""
    return argparse.Namespace(**{**vars(args), "seed": seed})


def process_jobs(args: argparse.Namespace, jobs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """This process's share of the (category, seed) runs under --parallel categories: balanced by the number
    of training images (a run's time is proportional to it), the same assignment computed in every
    process."""
    index, count = distributed.process_index()
    images = {category: len(train_image_paths(args.dataset, args.data_path, category))
              for category in dict.fromkeys(category for category, _ in jobs)}  # each folder listed once
    costs = [images[category] for category, _ in jobs]
    return [job for job, owner in zip(jobs, distributed.assign_jobs(costs, count)) if owner == index]


def summary_path(args: argparse.Namespace) -> Path:
    """<log_path>/<base of the first seed>[_<N>seeds]_summary.json."""
    seeds = args.seed
    stem = run_base_name(args.lr, args.epochs, args.bs, seeds[0]) + (f"_{len(seeds)}seeds" if len(seeds) > 1
                                                                     else "")
    return Path(args.log_path) / f"{stem}_summary.json"


def write_summary(args: argparse.Namespace, device: torch.device, records: list[dict],
                  seconds: float) -> Path:
    """The training summary: one line per run, and what produced them (provenance: flags, device, versions,
    the fp32 precision policy in effect, determinism)."""
    summary = {"parallel": args.parallel if distributed.launched_by_torchrun() else "single process",
               "processes": distributed.process_index()[1], "seconds": round(seconds, 2), "runs": records,
               "provenance": provenance("train_draem.py", args, device)}
    path = summary_path(args)
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return path


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_image_size(args.image_size)
    categories = categories_for(args.dataset, args.obj_id, args.data_path)
    set_deterministic(args.deterministic)  # before any CUDA work: cuBLAS reads its workspace setting once
    set_fp32_precision(args.fp32_precision)
    started = time.time()
    by_category = args.parallel == "categories"
    runs = {seed: run_args(args, seed) for seed in args.seed}
    bases = {seed: run_base_name(args.lr, args.epochs, args.bs, seed) for seed in args.seed}
    jobs = [(category, seed) for seed in args.seed for category in categories]
    with distributed.process_group(args.device, args.gpu_id, coordination_only=by_category) as device:
        check_output_folder(args.checkpoint_path, "--checkpoint_path")
        check_output_folder(args.log_path, "--log_path")
        if args.demo:
            check_output_folder(DEMO_RESULTS, "the demo's results folder")
        # Taken before the files are looked at: a second run with the same names is refused, not told to
        # --resume.
        locks = [lock for seed in args.seed for lock in run_locks(runs[seed], bases[seed], categories)]
        with exclusive_lock(locks if distributed.is_main() else []):
            plans = {seed: preflight(runs[seed], bases[seed], categories, device) for seed in args.seed}
            if distributed.is_main():
                if args.anomaly_source_path is None:
                    print("warning: no --anomaly_source_path: anomalies are cut from random noise, "
                          "which the paper found weaker than DTD textures")
                if args.synthesis == "gpu" and device.type == "cpu":
                    print("warning: --synthesis gpu on a CPU is about 10x slower than the default CPU "
                          "synthesis in loader workers")
                processes = (f" in {distributed.world_size()} processes" if distributed.world_size() > 1
                             else "")
                print(f"training {', '.join(categories)} on {device} for {args.epochs} epochs{processes}")
            if by_category:
                mine = process_jobs(args, jobs)
                index, count = distributed.process_index()
                print(f"process {index + 1}/{count} on {device}: "
                      + (", ".join(f"{category} (seed {seed})" for category, seed in mine)
                         or "nothing to train"))
                with distributed.solo():  # each run exactly as a single process trains it
                    mine_records = [train_category(runs[seed], category, device, plans[seed][category])
                                    for category, seed in mine]
                gathered = [record for part in distributed.gather_objects(mine_records) for record in part]
                records = sorted(gathered, key=lambda job: jobs.index((job["category"], job["seed"])))
            else:
                records = [train_category(runs[seed], category, device, plans[seed][category])
                           for category, seed in jobs]
            if not distributed.is_main():
                return
            print(f"training summary: {write_summary(args, device, records, time.time() - started)}")
        if args.demo:
            evaluate_checkpoints(checkpoint_path=args.checkpoint_path,
                                 base_model_names=[bases[seed] for seed in args.seed],
                                 data_path=args.data_path, categories=categories, image_size=args.image_size,
                                 device=device, output_dir=DEMO_RESULTS, layout=args.dataset,
                                 mask_suffix=args.mask_suffix,
                                 provenance=provenance("train_draem.py", args, device))


if __name__ == "__main__":
    main()
