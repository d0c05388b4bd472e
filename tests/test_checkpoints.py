"""Checkpoint I/O: released naming, bit-exact round trip, clear errors, anomalib conversion."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_unet import DraemModel, model_from_checkpoint
from tools import convert_anomalib
from util.checkpoints import (
    RELEASED_BASE_NAME,
    checkpoint_paths,
    convert_anomalib_checkpoint,
    load_anomalib_checkpoint,
    load_checkpoint,
    run_base_name,
    save_checkpoint,
)
from util.errors import DraemInputError

ROOT = Path(__file__).resolve().parents[1]


def small_model(seed: int) -> DraemModel:
    torch.manual_seed(seed)
    model = DraemModel(base_width=4, seg_base_width=4)
    model.train()(torch.rand(2, 3, 32, 32))  # move BatchNorm running statistics off their defaults
    return model


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_released_names():
    assert run_base_name(0.0001, 700, 8) == "DRAEM_test_0.0001_700_bs8"
    # the default seed keeps the released name
    assert run_base_name(0.0001, 700, 8, seed=0) == "DRAEM_test_0.0001_700_bs8"
    # other seeds never overwrite it
    assert run_base_name(0.0001, 700, 8, seed=2) == "DRAEM_test_0.0001_700_bs8_seed2"
    rec, seg = checkpoint_paths("ckpt", RELEASED_BASE_NAME, "carpet")
    assert rec == Path("ckpt/DRAEM_seg_large_ae_large_0.0001_800_bs8_carpet_.pckl")
    assert seg == Path("ckpt/DRAEM_seg_large_ae_large_0.0001_800_bs8_carpet__seg.pckl")


def test_round_trip_is_bit_exact(tmp_path):
    model = small_model(0)
    rec, seg = save_checkpoint(model, tmp_path, "DRAEM_test_0.0001_2_bs8", "carpet")
    assert rec.is_file() and seg.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([rec.name, seg.name])  # no temp files left
    loaded = small_model(1)
    load_checkpoint(loaded, tmp_path, "DRAEM_test_0.0001_2_bs8", "carpet")
    assert_same_state(model, loaded)


def test_saved_files_are_plain_state_dicts(tmp_path):
    rec, seg = save_checkpoint(small_model(0), tmp_path, "b", "tile")
    state = torch.load(rec, weights_only=True)
    assert next(iter(state)) == "encoder.block1.0.weight"
    assert next(iter(torch.load(seg, weights_only=True))) == "encoder_segment.block1.0.weight"


def test_missing_key_is_named(tmp_path):
    rec, _ = save_checkpoint(small_model(0), tmp_path, "b", "tile")
    state = torch.load(rec, weights_only=True)
    del state["decoder.db2.3.weight"]
    torch.save(state, rec)
    with pytest.raises(DraemInputError, match=r"missing key 'decoder\.db2\.3\.weight'") as info:
        load_checkpoint(small_model(1), tmp_path, "b", "tile")
    assert "\n" not in str(info.value)


def test_wrong_shape_is_named(tmp_path):
    _, seg = save_checkpoint(small_model(0), tmp_path, "b", "tile")
    state = torch.load(seg, weights_only=True)
    state["decoder_segment.fin_out.0.weight"] = torch.zeros(2, 5, 3, 3)
    torch.save(state, seg)
    with pytest.raises(DraemInputError,
                       match=r"'decoder_segment\.fin_out\.0\.weight' has shape \(2, 5, 3, 3\)"):
        load_checkpoint(small_model(1), tmp_path, "b", "tile")


def test_width_mismatch_and_missing_file_are_clear(tmp_path):
    save_checkpoint(small_model(0), tmp_path, "b", "tile")
    with pytest.raises(DraemInputError, match="--base_width"):
        load_checkpoint(DraemModel(base_width=8, seg_base_width=4), tmp_path, "b", "tile")
    with pytest.raises(DraemInputError, match="checkpoint not found"):
        load_checkpoint(small_model(0), tmp_path, "b", "wood")


def test_garbage_file_is_a_clear_error(tmp_path):
    rec, _ = checkpoint_paths(tmp_path, "b", "tile")
    rec.write_bytes(b"not a checkpoint")
    with pytest.raises(DraemInputError, match="cannot read checkpoint"):
        load_checkpoint(small_model(0), tmp_path, "b", "tile")


def anomalib_file(model: DraemModel, path: Path) -> Path:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, path)
    return path


def test_anomalib_checkpoint_loads_and_converts(tmp_path):
    """Loading and converting give the same weights: anomalib's, with only the colour-facing tensors
    rewritten.

    That the rewrite reproduces anomalib's anomaly map is tested in test_anomalib_import.py.
    """
    model = small_model(0)
    path = anomalib_file(model, tmp_path / "draem.ckpt")
    loaded = small_model(1)
    load_anomalib_checkpoint(loaded, path)
    convert_anomalib_checkpoint(path, tmp_path / "out", "DRAEM_anomalib", "bottle")
    converted = small_model(2)
    load_checkpoint(converted, tmp_path / "out", "DRAEM_anomalib", "bottle")
    assert_same_state(loaded, converted)
    rewritten = {"reconstructive_subnetwork.encoder.block1.0.weight",
                 "reconstructive_subnetwork.decoder.fin_out.0.weight",
                 "reconstructive_subnetwork.decoder.fin_out.0.bias",
                 "discriminative_subnetwork.encoder_segment.block1.0.weight"}
    source, result = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(source[k], result[k]) != (k in rewritten) for k in source)


def test_non_anomalib_file_is_rejected(tmp_path):
    torch.save({"weight": torch.zeros(1)}, tmp_path / "x.ckpt")
    with pytest.raises(DraemInputError, match="not an anomalib DRAEM checkpoint"):
        load_anomalib_checkpoint(small_model(0), tmp_path / "x.ckpt")


def test_convert_cli_reports_one_line_on_bad_input(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tools.convert_anomalib", str(tmp_path / "absent.ckpt"), "--checkpoint_path",
         str(tmp_path), "--category", "x"],
        check=False, capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "checkpoint not found" in result.stderr


def test_model_from_checkpoint_infers_widths_and_sspcab(tmp_path):
    torch.manual_seed(0)
    model = DraemModel(base_width=8, seg_base_width=4, sspcab=True)
    save_checkpoint(model, tmp_path, "b", "grid")
    rebuilt = model_from_checkpoint(tmp_path, "b", "grid")
    assert rebuilt.reconstructive_subnetwork.encoder.block1[0].out_channels == 8
    assert rebuilt.discriminative_subnetwork.encoder_segment.block1[0].out_channels == 4
    assert (rebuilt.sspcab_io is None
            and type(rebuilt.reconstructive_subnetwork.encoder.block5).__name__ == "SSPCAB")
    assert_same_state(model, rebuilt)


def test_convert_unpickles_objects_only_with_trust(tmp_path, capsys):
    """A Lightning checkpoint pickles its hyper-parameters (here a Namespace): refused with the hint unless
    --trust."""
    model = small_model(0)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": argparse.Namespace(lr=1e-4)}, tmp_path / "lightning.ckpt")
    args = [str(tmp_path / "lightning.ckpt"), "--checkpoint_path", str(tmp_path / "out"), "--obj_id",
            "bottle"]
    with pytest.raises(SystemExit) as exc:
        convert_anomalib.main(args)
    assert exc.value.code == 1 and "--trust" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    convert_anomalib.main([*args, "--trust"])
    converted = small_model(1)
    load_checkpoint(converted, tmp_path / "out", "DRAEM_anomalib", "bottle")
    loaded = small_model(2)
    load_anomalib_checkpoint(loaded, tmp_path / "lightning.ckpt", trusted=True)
    assert_same_state(converted, loaded)
