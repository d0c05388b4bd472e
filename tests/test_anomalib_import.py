"""anomalib checkpoints convert to a model that computes anomalib's anomaly map (METHOD.md §1, §3).

anomalib (2.x) feeds its DRAEM RGB images in [0, 1] and its discriminator cat([image, reconstruction]);
we read BGR and feed cat((reconstruction, image)). The reference below follows anomalib's documented
forward with the unconverted weights, so anomalib itself need not be installed: an "anomalib" model is a
seeded small DraemModel whose keys get anomalib's `model.` prefix. anomalib's SSPCAB block differs from
ours (no ReLU after the masked convolutions), so SSPCAB checkpoints are refused.
"""
import pytest
import torch
from torch import nn

from model_unet import DraemModel, model_from_checkpoint
from tools import convert_anomalib
from util.checkpoints import convert_anomalib_checkpoint, load_anomalib_checkpoint

# Conversion reorders the channel sums of three convolutions. In float32 this random small net amplifies
# that rounding to ~2e-4 in the map, so the maps are compared in float64 (weights stay float32 values, as
# in a real checkpoint), where it measures ~1e-12: 1e-5 is loose for a faithful conversion and far below
# a wrong one (measured > 0.7; the power check asserts > 0.1).
TOLERANCE = 1e-5
SIZE = 64


def anomalib_map(model: nn.Module, rgb: torch.Tensor) -> torch.Tensor:
    """anomalib's DRAEM forward: rec = rec_net(rgb); map = softmax(disc_net(cat([rgb, rec])))[:, 1]."""
    reconstruction = model.reconstructive_subnetwork(rgb)
    logits = model.discriminative_subnetwork(torch.cat([rgb, reconstruction], dim=1))
    return torch.softmax(logits, dim=1)[:, 1]


def anomalib_case() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(anomalib-style state dict, anomalib's map of the RGB picture, the same picture in BGR)."""
    torch.manual_seed(0)
    model = DraemModel(base_width=4, seg_base_width=4)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            # PyTorch's default init instead of DRAEM's N(0, 0.02): larger, distinct biases and weights make
            # the output conv's bias and every channel order visible in the map.
            module.reset_parameters()
        if isinstance(module, nn.BatchNorm2d):
            # One train-mode pass with momentum None stores exactly that batch's statistics, so eval-mode
            # activations stay near unit scale instead of saturating or ignoring the input.
            module.momentum = None
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    bgr = torch.rand(2, 3, SIZE, SIZE, dtype=torch.float64)
    rgb = bgr[:, [2, 1, 0]]
    with torch.no_grad():
        anomalib_map(model.double().train(), torch.rand(4, 3, SIZE, SIZE, dtype=torch.float64))
        model.float()  # a float32 checkpoint, like anomalib's; the reference runs on exactly these values
        state = {f"model.{key}": value.clone() for key, value in model.state_dict().items()}
        reference = anomalib_map(model.double().eval(), rgb)
    return state, reference, bgr


def our_map(model: DraemModel, bgr: torch.Tensor) -> torch.Tensor:
    """Our anomaly map of the BGR picture, in float64 like the reference (the loaded weights are float32)."""
    with torch.no_grad():
        _, logits = model.double().eval()(bgr)
    return torch.softmax(logits, dim=1)[:, 1]


def blank_model() -> DraemModel:
    torch.manual_seed(123)  # weights unrelated to the checkpoint's, so a key that fails to load shows
    return DraemModel(base_width=4, seg_base_width=4)


def test_loaded_anomalib_checkpoint_gives_anomalib_map_on_bgr(tmp_path):
    state, reference, bgr = anomalib_case()
    torch.save(state, tmp_path / "draem.pt")
    model = blank_model()
    load_anomalib_checkpoint(model, tmp_path / "draem.pt")
    assert (our_map(model, bgr) - reference).abs().max() < TOLERANCE


def test_converted_lightning_checkpoint_gives_anomalib_map_on_bgr(tmp_path):
    state, reference, bgr = anomalib_case()
    # A Lightning .ckpt nests the weights, next to other modules' buffers and bookkeeping.
    state["post_processor.image_threshold"] = torch.tensor(0.5)
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120}, tmp_path / "draem.ckpt")
    convert_anomalib_checkpoint(tmp_path / "draem.ckpt", tmp_path / "out", "DRAEM_anomalib", "carpet")
    model = model_from_checkpoint(tmp_path / "out", "DRAEM_anomalib", "carpet")
    assert (our_map(model, bgr) - reference).abs().max() < TOLERANCE


def test_prefix_strip_alone_gives_a_different_map():
    """Power check: without the channel rewrite the same weights give a clearly different map."""
    state, reference, bgr = anomalib_case()
    model = blank_model()
    model.load_state_dict({key.removeprefix("model."): value for key, value in state.items()})
    assert (our_map(model, bgr) - reference).abs().max() > 0.1


def test_an_anomalib_sspcab_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    """anomalib's SSPCAB has no ReLU after its masked convolutions, ours has: refused, nothing written."""
    state, _, _ = anomalib_case()
    state["model.reconstructive_subnetwork.encoder.block5.masked_conv1.weight"] = torch.zeros(32, 32, 1, 1)
    state["model.reconstructive_subnetwork.encoder.block5.attention_module.fc1.weight"] = torch.zeros(4, 32)
    torch.save({"state_dict": state}, tmp_path / "draem.ckpt")
    with pytest.raises(SystemExit) as stopped:
        convert_anomalib.main([str(tmp_path / "draem.ckpt"), "--checkpoint_path", str(tmp_path / "out"),
                               "--obj_id", "carpet"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SSPCAB" in err[0] and "no ReLU" in err[0]
    assert not (tmp_path / "out").exists()


def test_converting_over_a_pair_removes_the_thresholds_calibrated_for_the_old_weights(tmp_path, capsys):
    """A threshold file never sits beside weights it was not calibrated for."""
    state, _, _ = anomalib_case()
    torch.save(state, tmp_path / "draem.pt")
    stale = tmp_path / "out" / "DRAEM_anomalib_carpet_threshold.json"
    stale.parent.mkdir()
    stale.write_text('{"image_threshold": 0.5, "pixel_threshold": 0.5}')
    convert_anomalib.main([str(tmp_path / "draem.pt"), "--checkpoint_path", str(tmp_path / "out"), "--obj_id",
                           "carpet"])
    assert not stale.exists()
    assert model_from_checkpoint(tmp_path / "out", "DRAEM_anomalib", "carpet") is not None
