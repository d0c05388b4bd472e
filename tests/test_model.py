"""The networks: exact released state-dict layout, forward shapes, initialisation, SSPCAB."""
import json
from pathlib import Path

import pytest
import torch

from model_unet import SSPCAB, DiscriminativeSubNetwork, DraemModel, ReconstructiveSubNetwork, anomaly_map

# Every parameter's key and shape in the authors' released checkpoints (a manifest shipped with the tests).
MANIFEST = Path(__file__).resolve().parent / "data" / "draem_state_dict_manifest.json"


def released_layout(name: str) -> list[tuple[str, list[int]]]:
    return list(json.loads(MANIFEST.read_text())[name].items())


def layout(module: torch.nn.Module) -> list[tuple[str, list[int]]]:
    return [(key, list(value.shape)) for key, value in module.state_dict().items()]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_reconstructive_matches_released_checkpoint_layout():
    net = ReconstructiveSubNetwork()
    assert layout(net) == released_layout("reconstructive")
    assert n_params(net) == 69_048_579


def test_discriminative_matches_released_checkpoint_layout():
    net = DiscriminativeSubNetwork()
    assert layout(net) == released_layout("discriminative")
    assert n_params(net) == 28_374_146


def test_draem_model_submodules_are_the_released_networks():
    model = DraemModel(base_width=8, seg_base_width=8)
    assert ([k for k, _ in layout(model.reconstructive_subnetwork)]
            == [k for k, _ in released_layout("reconstructive")])
    assert ([k for k, _ in layout(model.discriminative_subnetwork)]
            == [k for k, _ in released_layout("discriminative")])


def test_positional_channels_as_released():
    """As in the released classes, positional arguments are (in_channels, out_channels, base_width): the first
    convolution reads in_channels, the last writes out_channels, the widths follow base_width, and every input
    channel reaches the output."""
    for net, widths in ((DiscriminativeSubNetwork(4, 3, 5), (5, 40)),
                        (ReconstructiveSubNetwork(4, 3, 5), (5, 40))):
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert (convs[0].weight.shape == (widths[0], 4, 3, 3)
                and convs[-1].weight.shape == (3, widths[0], 3, 3))
        assert max(c.out_channels for c in convs) == widths[1]  # 8 * base_width at the bottom
        torch.manual_seed(0)
        x = torch.rand(2, 4, 32, 32, requires_grad=True)
        out = net.train()(x)  # batch statistics: fresh eval-mode BatchNorm can let a deep signal vanish
        assert out.shape == (2, 3, 32, 32)
        out.square().sum().backward()
        assert (x.grad.abs().sum(dim=(0, 2, 3)) > 1e-3).all()


@torch.no_grad()
def test_full_size_forward_shapes():
    model = DraemModel().eval()
    reconstruction, logits = model(torch.rand(1, 3, 256, 256))
    assert reconstruction.shape == (1, 3, 256, 256)
    assert logits.shape == (1, 2, 256, 256)


@torch.no_grad()
def test_small_forward_shapes_and_anomaly_map():
    model = DraemModel(base_width=8, seg_base_width=8).eval()
    reconstruction, logits = model(torch.rand(2, 3, 64, 96))
    assert reconstruction.shape == (2, 3, 64, 96)
    assert logits.shape == (2, 2, 64, 96)
    amap = anomaly_map(logits)
    assert amap.shape == (2, 1, 64, 96)
    assert torch.allclose(amap, torch.softmax(logits, 1)[:, 1:2])
    assert amap.min() >= 0 and amap.max() <= 1


@pytest.mark.parametrize("size", [(64, 80), (100, 64), (48, 48)])
def test_size_not_divisible_by_32_is_a_clear_error(size):
    model = DraemModel(base_width=4, seg_base_width=4)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.rand(1, 3, *size))


def test_weight_initialisation_follows_release():
    torch.manual_seed(0)
    model = DraemModel(base_width=16, seg_base_width=16)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    conv_w = torch.cat([m.weight.flatten() for m in convs])
    bn_w = torch.cat([m.weight.flatten() for m in bns])
    assert abs(conv_w.mean().item()) < 2e-3 and abs(conv_w.std().item() - 0.02) < 1e-3
    assert abs(bn_w.mean().item() - 1.0) < 5e-3 and abs(bn_w.std().item() - 0.02) < 5e-3
    assert all(torch.all(m.bias == 0) for m in bns)


def test_sspcab_replaces_last_encoder_block_and_exposes_its_io():
    model = DraemModel(base_width=8, seg_base_width=4, sspcab=True)
    assert isinstance(model.reconstructive_subnetwork.encoder.block5, SSPCAB)
    assert DraemModel(base_width=8, seg_base_width=4).sspcab_io is None
    model(torch.rand(2, 3, 64, 64))
    block_in, block_out = model.sspcab_io
    assert block_in.shape == block_out.shape == (2, 64, 4, 4)
    assert block_out.requires_grad


def test_sspcab_hides_the_centre_pixel():
    """The masked convolution must not see the pixel it is asked to predict (nor its d-neighbourhood)."""
    torch.manual_seed(0)
    block = SSPCAB(4, kernel_dim=1, dilation=1, reduction_ratio=2)
    x = torch.rand(1, 4, 9, 9, requires_grad=True)
    block.masked_conv(x)[0, :, 4, 4].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0
    assert not seen[3:6, 3:6].any()
    # The four 1×1 corner taps sit dilation+1 = 2 pixels away diagonally.
    assert seen[2, 2] and seen[2, 6] and seen[6, 2] and seen[6, 6]
    assert seen.sum() == 4
    assert block(x).shape == x.shape
