"""Train DRAEM on MVTec-AD-style categories (METHOD.md §2, §4, §5).

    python train_draem.py --obj_id carpet --data_path datasets/mvtec --anomaly_source_path datasets/dtd
    python train_draem.py --demo      # makes a small dataset, trains a small model on CPU, tests it
    torchrun --nproc_per_node 4 train_draem.py --obj_id carpet --data_path ...   # one process per GPU (DDP)

Defaults are the paper's: batch 8, Adam lr 1e-4 on both subnetworks, 700 epochs, learning rate ×0.2
at 80 % and 90 % of the epochs, loss = L2 + SSIM + focal. Under torchrun --bs is per process.
"""
import argparse
import json
import math
import pickle
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_loader import MVTecDRAEMTrainDataset, RawTrainDataset, seed_everything, train_loader
from device_synthesis import device_generator, synthesize_batch
from engine import calibration, validation
from engine.evaluation import DraemScorer, evaluate_checkpoints
from loss import DraemLoss
from model_unet import DraemModel, anomaly_map, check_image_size
from util import distributed
from util.atomic import atomic_torch_save, atomic_write_text
from util.checkpoints import checkpoint_paths, load_state_dict_checked, run_base_name, save_checkpoint
from util.cli import ArgumentParser, add_dataset_flags, add_fast_flags, at_least, positive_float
from util.demo_data import make_demo_dataset
from util.errors import DraemInputError, TrainingDiverged, one_line_errors
from util.images import load_images
from util.layouts import LAYOUTS, categories_for, train_image_paths
from util.pictures import save_png, save_training_curves, training_grid
from util.runtime import autocast, prepare_model, to_memory_format
from util.thresholds import TRAINING_SOURCE, VALIDATION_SOURCE, write_thresholds

DEMO_ROOT = Path("datasets/demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    released = parser.add_argument_group("flags of the released program")
    released.add_argument("--obj_id", default="-1",
                          help="category name, released integer id (0 capsule .. 14 wood), "
                               "or -1 for all of the layout's categories")
    released.add_argument("--bs", type=at_least(1), default=8, help="batch size (paper: 8)")
    released.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate of both subnetworks (paper: 1e-4)")
    released.add_argument("--epochs", type=at_least(1), default=700, help="training epochs per category (paper: 700)")
    released.add_argument("--gpu_id", type=at_least(0), default=0, help="CUDA device index when training on a GPU")
    released.add_argument("--data_path", help="dataset root: for mvtec, the folder holding <category>/train/good")
    released.add_argument("--anomaly_source_path",
                          help="texture folder (DTD) searched recursively for images; "
                               "omitted: random-noise anomalies (weaker than DTD)")
    released.add_argument("--checkpoint_path", default="checkpoints",
                          help="folder for the .pckl checkpoints and the resume files")
    released.add_argument("--log_path", default="logs", help="folder for the per-epoch JSONL log and the sample grids")
    released.add_argument("--visualize", action="store_true",
                          help="save a PNG grid (input, reconstruction, target, true and predicted mask) "
                               "every --visualize_every steps")
    extra = parser.add_argument_group("additions")
    add_dataset_flags(extra, LAYOUTS)
    extra.add_argument("--visualize_every", type=at_least(1), default=200, help="steps between sample grids with --visualize")
    extra.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, or cuda")
    extra.add_argument("--seed", type=at_least(0), default=0,
                       help="seed of every random stream (model init, sampling, synthesis); a seed other than 0 is added "
                            "to the run name (<base>_seed<N>), so several seeds never overwrite each other")
    extra.add_argument("--workers", type=at_least(0), default=4, help="DataLoader worker processes (0: load in the main process)")
    extra.add_argument("--resume", action="store_true", help="continue each category from its resume file in --checkpoint_path")
    extra.add_argument("--image_size", type=int, default=256, help="side of the square training images; a multiple of 32")
    extra.add_argument("--base_width", type=int, default=128, help="reconstructive network width (released: 128)")
    extra.add_argument("--seg_base_width", type=int, default=64, help="discriminative network width (released: 64)")
    extra.add_argument("--sspcab", action="store_true", help="replace the reconstructive encoder's last block by SSPCAB")
    extra.add_argument("--sspcab_lambda", type=float, default=0.1, help="weight of the SSPCAB loss")
    extra.add_argument("--calibration_samples", type=at_least(2), default=64,
                       help="synthetic samples (the training mix) the deployment thresholds are calibrated on after the last "
                            "epoch, written to <base>_<category>_threshold.json (with --val_every: the validation set)")
    extra.add_argument("--good_dir",
                       help="a folder of extra known-good images, counted as normal when calibrating the thresholds")
    extra.add_argument("--demo", action="store_true",
                       help="make the demo dataset if absent, train small models on CPU and test them; "
                            "other flags keep their meaning")
    fast = parser.add_argument_group("fast path (off by default; checkpoints keep the released format)")
    fast.add_argument("--synthesis", choices=("cpu", "gpu"), default="cpu",
                      help="cpu: the faithful per-sample synthesis in the loader workers; gpu: batched on the training device "
                           "(same distributions; workers only decode; persistent workers, so --resume is seeded but not bitwise)")
    add_fast_flags(fast)
    val = parser.add_argument_group("validation during training "
                                    "(off by default: then every training image is trained on, as in the paper)")
    val.add_argument("--val_every", type=at_least(0), default=0,
                     help="evaluate on held-out synthetic anomalies every N epochs and after the last; 0: off")
    val.add_argument("--val_fraction", type=float, default=0.1,
                     help="fraction of the training images held out, never trained on (at least 1; chosen by --seed)")
    val.add_argument("--val_samples", type=at_least(1), default=64,
                     help="synthetic samples made once from the held-out images, the training mix (about half anomalous)")
    val.add_argument("--val_test", action="store_true",
                     help="also report the test-set metrics (released protocol) when <data_path>/<category>/test exists")
    val.add_argument("--save_best", action="store_true",
                     help="also keep the checkpoint pair with the best validation pixel AP, base name <base>_best")
    ddp = parser.add_argument_group("multi-GPU: run under torchrun --nproc_per_node N "
                                    "(one process per GPU, DDP; --bs is per process)")
    ddp.add_argument("--sync_bn", action="store_true",
                     help="synchronise BatchNorm statistics across the processes (SyncBatchNorm; CUDA only)")
    args = parser.parse_args(argv)
    if args.demo:
        apply_demo_defaults(args, parser)
    if args.data_path is None:
        parser.error("--data_path is required (or use --demo)")
    check_validation_args(args, parser)
    return args


def check_validation_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if (args.save_best or args.val_test) and not args.val_every:
        parser.error("--save_best and --val_test need validation: add --val_every N")


def apply_demo_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Small-and-quick settings for the demo, unless the user gave the flag explicitly."""
    demo = {"dataset": "folder", "data_path": str(DEMO_ROOT / "mvtec"), "anomaly_source_path": str(DEMO_ROOT / "textures"),
            "epochs": 32, "image_size": 128, "base_width": 16, "seg_base_width": 16, "workers": 0, "lr": 5e-4, "bs": 8,
            "checkpoint_path": "checkpoints/demo", "log_path": "logs/demo"}
    for name, value in demo.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    if Path(args.data_path) == DEMO_ROOT / "mvtec" and not Path(args.data_path).is_dir():
        make_demo_dataset(DEMO_ROOT)


def make_datasets(args: argparse.Namespace, category: str) -> tuple[MVTecDRAEMTrainDataset, validation.ValidationSet | None]:
    """The training dataset and, with --val_every, the validation set made from images held out of it (rank 0 only)."""
    paths, held_paths = train_image_paths(args.dataset, args.data_path, category), []
    if args.val_every:  # on every rank, before the dataset is built: no rank trains on the held-out images
        paths, held_paths = validation.split_paths(paths, args.val_fraction, args.seed)
    dataset_class = RawTrainDataset if args.synthesis == "gpu" else MVTecDRAEMTrainDataset
    shape = (args.image_size, args.image_size)
    dataset = dataset_class(anomaly_source_path=args.anomaly_source_path, resize_shape=shape, image_paths=paths)
    if not held_paths or not distributed.is_main():
        return dataset, None
    val_set = validation.synthesize(load_images(held_paths, shape), dataset.draw_source, args.val_samples, args.seed)
    print(f"{category}: validating on {len(val_set.labels)} samples ({int(val_set.labels.sum())} anomalous) made from "
          f"{len(held_paths)} held-out training images ({', '.join(p.name for p in held_paths)})")
    return dataset, val_set


def training_batch(batch: dict, device: torch.device, synthesis_rng: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """(image, augmented image, mask) on the device: moved from the loader, or synthesised there with --synthesis gpu."""
    if synthesis_rng is not None:
        source = batch["source"].to(device, non_blocking=True) if "source" in batch else None
        batch = synthesize_batch(batch["image"].to(device, non_blocking=True), source, synthesis_rng)
    return tuple(batch[key].to(device, non_blocking=True) for key in ("image", "augmented_image", "anomaly_mask"))


def rng_state(generator: torch.Generator, device: torch.device, synthesis_rng: torch.Generator | None) -> dict:
    """Every random stream this process draws from, to continue it exactly on --resume."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "loader": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if synthesis_rng is not None:
        state["synthesis"] = synthesis_rng.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device, synthesis_rng: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["loader"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if synthesis_rng is not None and "synthesis" in state:
        synthesis_rng.set_state(state["synthesis"])


def resume_path(checkpoint_dir: str | Path, base_name: str, category: str) -> Path:
    """The file with everything needed to continue a run (weights, optimizer, RNG states of every rank, log)."""
    return checkpoint_paths(checkpoint_dir, base_name, category)[0].with_suffix(".resume.pt")


# The resume file is the record of a run; per epoch it is written first, then the checkpoint pair, then the
# log. A crash between these writes leaves the pair one epoch behind (or, between its two files, mixed) and
# the log short; --resume rewrites the pair and the log from the resume file before training on, so they
# agree again. A resume file that cannot be read is refused, and nothing is written.
RESUME_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "log_lines", "best_val_pixel_ap")


def write_outputs(args: argparse.Namespace, model: DraemModel, log_lines: list[str], base_name: str, category: str) -> None:
    """The checkpoint pair, the JSONL log of the run so far and its training curves (each file atomically)."""
    save_checkpoint(model, args.checkpoint_path, base_name, category)
    atomic_write_text(Path(args.log_path) / f"{base_name}_{category}_log.jsonl", "\n".join(log_lines) + "\n")
    save_training_curves([json.loads(line) for line in log_lines], Path(args.log_path) / f"{base_name}_{category}_curves.png")


def save_epoch(
    args: argparse.Namespace, model: DraemModel, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, rng_states: list[dict], epoch: int, log_lines: list[str],
    best: float | None, base_name: str, category: str,
) -> None:
    """Write the resume file, then the checkpoint pair and the log, for the epoch just finished."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_states, "epoch": epoch, "log_lines": log_lines, "best_val_pixel_ap": best, "args": vars(args)}
    atomic_torch_save(state, resume_path(args.checkpoint_path, base_name, category))
    write_outputs(args, model, log_lines, base_name, category)


def read_resume_file(path: Path) -> dict:
    """The state a resume file holds; an unreadable or foreign file is a one-line error naming it and the fix."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        missing = [key for key in RESUME_KEYS if key not in state]
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError, TypeError, AttributeError, ImportError) as exc:
        # a truncated or foreign file fails inside torch, pickle or zipfile in any of these ways
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:120]
        raise DraemInputError(f"cannot read resume file {path} ({reason}): restore it, or delete it and leave out --resume "
                              f"to start this category over") from None
    if missing:
        raise DraemInputError(f"cannot read resume file {path}: it has no {', '.join(missing)} (not a resume file of "
                              f"train_draem.py?); delete it and leave out --resume to start over")
    return state


def load_epoch(
    args: argparse.Namespace, state: dict, model: DraemModel, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator, device: torch.device,
    synthesis_rng: torch.Generator | None, base_name: str, category: str,
) -> tuple[int, list[str], float | None]:
    """Restore a run from its resume state, rewrite its pair and log; return (epochs done, log lines, best val pixel AP)."""
    path = resume_path(args.checkpoint_path, base_name, category)
    load_state_dict_checked(model, state["model"], str(path))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if len(state["rng"]) != distributed.world_size():
        raise DraemInputError(f"{path} was written by {len(state['rng'])} training process(es), this run has "
                              f"{distributed.world_size()}: resume with the same number of processes, or leave out --resume")
    set_rng_state(state["rng"][distributed.rank()], generator, device, synthesis_rng)  # each rank continues its own stream
    if distributed.is_main():
        write_outputs(args, model, state["log_lines"], base_name, category)
    return state["epoch"], state["log_lines"], state["best_val_pixel_ap"]


def check_finite(losses: torch.Tensor, category: str, epoch: int, step: int, checkpoint_path: str) -> None:
    """Stop with one line naming the first non-finite step of the epoch (one device sync for all its steps)."""
    bad = ~torch.isfinite(losses)
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise TrainingDiverged(
            f"{category}: loss became {losses[index].item()} at epoch {epoch + 1}, step {step - len(losses) + index + 1}; "
            f"stopped, the last good checkpoint (epoch {epoch}) is kept in {checkpoint_path} (try a lower --lr)"
        )


def validate(args: argparse.Namespace, model: DraemModel, val_set: validation.ValidationSet, category: str,
             device: torch.device) -> dict[str, float]:
    """Validation metrics of the model now (`val_*`; `test_*` too with --val_test) and the seconds they took."""
    started = time.time()
    scorer = DraemScorer(model, args.precision, args.channels_last)
    record = validation.evaluate_synthetic(scorer, val_set, device, args.bs)
    if args.val_test:
        record.update(validation.evaluate_test_set(scorer, args.data_path, category, args.image_size, device, args.bs,
                                                   args.dataset, args.mask_suffix))
    record["val_seconds"] = round(time.time() - started, 2)
    return record


def calibrate_thresholds(
    args: argparse.Namespace, model: DraemModel, dataset: MVTecDRAEMTrainDataset, val_set: validation.ValidationSet | None,
    base_name: str, category: str, device: torch.device,
) -> None:
    """Write the pair's deployment thresholds, calibrated on data the test never sees (calibration.py): the
    validation set with validation on, else synthetic anomalies on the training images the dataset holds;
    plus --good_dir's images as normals."""
    if val_set is not None:
        samples, source = val_set, VALIDATION_SOURCE
    else:
        samples = validation.synthesize(dataset.images, dataset.draw_source, args.calibration_samples, args.seed)
        source = TRAINING_SOURCE
    samples, source = calibration.with_good_images(samples, source, args.good_dir, args.image_size)
    scorer = DraemScorer(model, args.precision, args.channels_last)
    thresholds = calibration.calibrate(scorer, samples.images, samples.masks, samples.labels, device, args.bs, source=source)
    path = write_thresholds(args.checkpoint_path, base_name, category, thresholds)
    print(f"{category}: image threshold {thresholds['image_threshold']:.4g}, pixel threshold "
          f"{thresholds['pixel_threshold']:.4g}, from {source} -> {path}")


def train_step(net: torch.nn.Module, model: DraemModel, criterion: DraemLoss, optimizer: torch.optim.Optimizer,
               image: torch.Tensor, augmented: torch.Tensor, mask: torch.Tensor, precision: str = "fp32",
               channels_last: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One optimisation step: forward the augmented batch, L2 + SSIM + focal loss, backward, Adam step.

    `net` is what is called (the model, or DDP around it); `model` the DraemModel itself. The forward runs
    under autocast with --precision bf16, the loss outside it in fp32. Returns the detached loss, its parts,
    reconstruction and logits.
    """
    with autocast(image.device, precision):
        reconstruction, logits = net(to_memory_format(augmented, channels_last))
    loss, parts = criterion(reconstruction, image, logits, mask, model.sspcab_io)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), parts, reconstruction.detach(), logits.detach()


def train_category(args: argparse.Namespace, category: str, device: torch.device) -> None:
    """Train one category from scratch (or from its resume file) and write its checkpoints every epoch (rank 0)."""
    seed = args.seed + distributed.rank()  # each rank its own random streams; a single process uses --seed itself
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    base_name = run_base_name(args.lr, args.epochs, args.bs, args.seed)
    resume_file = resume_path(args.checkpoint_path, base_name, category)
    # Read before any slow work, so a bad resume file is one line at once.
    resumed = read_resume_file(resume_file) if args.resume and resume_file.is_file() else None
    dataset, val_set = make_datasets(args, category)
    # A fresh worker per epoch, reseeded from `generator`, makes --resume bitwise exact; the device path keeps its workers.
    loader = train_loader(dataset, args.bs, args.workers, generator, device, sampler=distributed.rank_sampler(dataset),
                          persistent_workers=args.synthesis == "gpu")
    synthesis_rng = device_generator(device, seed) if args.synthesis == "gpu" else None
    model = DraemModel(args.base_width, args.seg_base_width, sspcab=args.sspcab).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # Released milestones: 80 % and 90 % of the epochs. The released float milestones are never reached when
    # fractional (e.g. 22.5); rounding up keeps them reachable and changes nothing when they are whole numbers.
    milestones = [math.ceil(args.epochs * 0.8), math.ceil(args.epochs * 0.9)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.2)
    criterion = DraemLoss(args.sspcab_lambda)
    start_epoch, log_lines, best = 0, [], None
    if resumed is not None:
        start_epoch, log_lines, best = load_epoch(args, resumed, model, optimizer, scheduler, generator, device, synthesis_rng,
                                                  base_name, category)
        if distributed.is_main():
            print(f"{category}: resuming after epoch {start_epoch}/{args.epochs}")
    prepare_model(model, args.channels_last, args.compile)  # in place: the state-dict keys stay the released ones
    net = distributed.wrap_model(model, device, args.sync_bn)  # what the loop calls; `model` is what is saved

    step = start_epoch * len(loader)
    for epoch in range(start_epoch, args.epochs):
        net.train()
        started, losses, part_sums = time.time(), [], {}
        progress = tqdm(loader, desc=f"{category} {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True,
                        disable=not distributed.is_main())
        for batch in progress:
            image, augmented, mask = training_batch(batch, device, synthesis_rng)
            loss, parts, reconstruction, logits = train_step(net, model, criterion, optimizer, image, augmented, mask,
                                                             args.precision, args.channels_last)
            losses.append(loss)  # a tensor: calling .item() here would stall the GPU every step
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0.0) + value
            step += 1
            if args.visualize and distributed.is_main() and step % args.visualize_every == 0:
                grid = training_grid(augmented, reconstruction.float(), image, mask, anomaly_map(logits))
                save_png(Path(args.log_path) / f"{base_name}_{category}_step{step:07d}.png", grid)
            if len(losses) % 10 == 0:
                progress.set_postfix(loss=f"{losses[-1].item():.4f}")
        losses = distributed.average(torch.stack(losses))  # per step, over the ranks: every rank sees the same values
        part_means = distributed.average(torch.stack(list(part_sums.values()))) / len(losses)
        check_finite(losses, category, epoch, step, args.checkpoint_path)
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained with (the log and the curves show it)
        scheduler.step()
        rng_states = distributed.gather_objects(rng_state(generator, device, synthesis_rng))  # all ranks', each resumes its own
        if not distributed.is_main():
            continue
        record = {"category": category, "epoch": epoch + 1, "step": step, "lr": lr,
                  "loss": losses.mean().item(), **dict(zip(part_sums, part_means.tolist())),
                  "seconds": round(time.time() - started, 2)}
        if validation.due(epoch + 1, args.val_every, args.epochs):
            record.update(validate(args, model, val_set, category, device))
            if args.save_best and validation.improves(record["val_pixel_ap"], best):
                best = record["val_pixel_ap"]
                save_checkpoint(model, args.checkpoint_path, validation.best_base_name(base_name), category)
        log_lines.append(json.dumps(record))
        save_epoch(args, model, optimizer, scheduler, rng_states, epoch + 1, log_lines, best, base_name, category)
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    if distributed.is_main():
        calibrate_thresholds(args, model, dataset, val_set, base_name, category, device)
    distributed.barrier()  # rank 0's last files are written before any rank moves on


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_image_size(args.image_size)
    if not Path(args.data_path).is_dir():
        raise DraemInputError(f"--data_path {args.data_path} does not exist (point it at the dataset root folder)")
    categories = categories_for(args.dataset, args.obj_id, args.data_path)
    if args.good_dir is not None:
        calibration.good_image_paths(args.good_dir)  # now, not after training
    with distributed.process_group(args.device, args.gpu_id) as device:
        if distributed.is_main():
            if args.anomaly_source_path is None:
                print("warning: no --anomaly_source_path: anomalies are cut from random noise, "
                      "which the paper found weaker than DTD textures")
            if args.synthesis == "gpu" and device.type == "cpu":
                print("warning: --synthesis gpu on a CPU is about 10x slower than the default CPU synthesis in loader workers")
            processes = f" in {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
            print(f"training {', '.join(categories)} on {device} for {args.epochs} epochs{processes}")
        for category in categories:
            train_category(args, category, device)
        if args.demo and distributed.is_main():
            evaluate_checkpoints(checkpoint_path=args.checkpoint_path,
                                 base_model_names=[run_base_name(args.lr, args.epochs, args.bs, args.seed)],
                                 data_path=args.data_path, categories=categories, image_size=args.image_size, device=device,
                                 output_dir="results/demo", layout=args.dataset, mask_suffix=args.mask_suffix)


if __name__ == "__main__":
    main()
