"""Parity of dreambooth.vae.AutoencoderKL with diffusers.AutoencoderKL, loaded from the same weights.

Our model's state dict is written in the original CompVis layout ('first_stage_model.' + our keys)
and converted with diffusers' own LDM -> diffusers converter, then loaded strictly into diffusers:
that checks our module tree is the real sd-v1-4 layout without any key table in this test.
"""
import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

from benchmarks.same_weights import diffusers_vae_config, random_weights_  # noqa: E402
from dreambooth import vae as vae_module  # noqa: E402
from dreambooth.vae import LATENT_SCALE, AutoencoderKL, VAEConfig  # noqa: E402

PREFIX = "first_stage_model."


def build_pair(cfg: VAEConfig):
    ours = AutoencoderKL(cfg).eval()
    random_weights_(ours)
    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    ref = diffusers.AutoencoderKL(**diffusers_vae_config(cfg)).eval()
    converted = convert_ldm_vae_checkpoint(checkpoint, dict(ref.config))
    assert len(converted) == len(checkpoint), "diffusers' converter dropped or merged keys"
    ref.load_state_dict(converted, strict=True)
    return ours, ref


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol:.3g}"


def check_parity(ours, ref, batch=2, size=64):
    gen = torch.Generator().manual_seed(1)
    img = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    z = torch.randn(batch, ours.config.z_channels, size // 8, size // 8, generator=gen)
    with torch.no_grad():
        mean, logvar = ours.encode(img)
        dist = ref.encode(img).latent_dist
        assert mean.shape == (batch, 4, size // 8, size // 8)
        assert mean.std() > 0.01 and logvar.std() > 0.01  # not a degenerate, constant output
        assert_close(mean, dist.mean)
        assert_close(logvar, dist.logvar)
        out = ours.decode(z, slice_size=batch)
        assert out.shape == (batch, 3, size, size)
        assert out.std() > 0.01
        assert_close(out, ref.decode(z).sample)


@pytest.fixture(scope="module")
def full_pair():
    return build_pair(VAEConfig())


def test_latent_scale():
    assert LATENT_SCALE == 0.18215


def test_full_size_parity(full_pair):
    check_parity(*full_pair)


def test_full_size_layout(full_pair):
    ours, _ = full_pair
    sd = ours.state_dict()
    # The attention q/k/v/proj_out are 1x1 convolutions in sd-v1-4 (diffusers' converter would
    # also accept Linear weights, so check the shape here).
    for part in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            assert sd[f"{part}.mid.attn_1.{name}.weight"].shape == (512, 512, 1, 1)
    # up[0] is the highest resolution: 128 channels, no upsample; up[3] is the lowest.
    assert sd["decoder.up.0.block.2.conv2.weight"].shape[0] == 128
    assert "decoder.up.0.upsample.conv.weight" not in sd
    assert "decoder.up.3.upsample.conv.weight" in sd
    assert "encoder.down.3.downsample.conv.weight" not in sd
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in full_pair[1].parameters())


def test_decode_slices_match_whole_batch():
    ours = AutoencoderKL(VAEConfig.tiny()).eval()
    random_weights_(ours)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = ours.decode(z, slice_size=3)
        assert_close(ours.decode(z, slice_size=1), whole)
        assert_close(ours.decode(z, slice_size=2), whole)  # uneven split: 2 + 1
    with pytest.raises(ValueError, match="slice_size"):
        ours.decode(z, slice_size=0)


def test_tiny_parity():
    check_parity(*build_pair(VAEConfig.tiny()))


def test_symmetric_padding_breaks_parity(monkeypatch):
    """padding=1 gives the same shapes but a shifted latent: the parity check must catch it."""
    ours, ref = build_pair(VAEConfig.tiny())
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def symmetric(self, x):
        return F.conv2d(x, self.conv.weight, self.conv.bias, stride=2, padding=1)

    monkeypatch.setattr(vae_module.Downsample, "forward", symmetric)
    with torch.no_grad():
        mean, _ = ours.encode(img)
        expected = ref.encode(img).latent_dist.mean
    assert mean.shape == expected.shape
    assert (mean - expected).abs().max() > 1e-2
