"""Parity of dreambooth.vae.AutoencoderKL with diffusers.AutoencoderKL, loaded from the same weights.

Our model's state dict is written in the original CompVis layout ('first_stage_model.' + our keys)
and converted with diffusers' own LDM -> diffusers converter, then loaded strictly into diffusers:
that checks our module tree is the real sd-v1-4 layout without any key table in this test. And the latent scale:
what training feeds the UNet, generate() decodes back.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dreambooth
from dreambooth import vae as vae_module
from dreambooth.generate import generate
from dreambooth.images import to_pil
from dreambooth.vae import AutoencoderKL, VAEConfig, sample_latent
from tests.references import assert_close, random_model, random_weights_, reference_vae
from train import encode_posteriors


def build_pair(cfg: VAEConfig):
    """Ours with random weights, and diffusers' holding the same tensors, loaded strictly through diffusers'
    LDM converter."""
    pytest.importorskip("diffusers")  # only the tests that compare with it need it
    ours = random_model(AutoencoderKL, cfg).eval()
    return ours, reference_vae(ours)


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


@torch.no_grad()
def test_generate_decodes_the_latents_training_learns_from(monkeypatch):
    """train.py feeds the UNet the VAE's latents times the model's latent scale, and generate() divides the sampler's
    latents by it before decoding: the two must undo each other. A sampler that returns exactly the latent a training
    step drew from a photo's posterior must give the VAE's own decoding of that photo's latent. The scale is the
    model's (the toy model has its own), not SD's 0.18215."""
    sd = dreambooth.load("tiny")
    sd.latent_scale = 0.4
    random_weights_(sd.vae, seed=4)
    photo = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    posterior = encode_posteriors(sd.vae, photo, "cpu")[:, 0]  # not mirrored: [1, 8 (mean, logvar), 8, 8]
    posterior[:, 4:] = -30  # sigma 3e-7: the drawn latent is the mean
    latents = sample_latent(*posterior.chunk(2, dim=1), torch.Generator().manual_seed(6)) * sd.latent_scale
    monkeypatch.setattr("dreambooth.generate.ddim_sample", lambda *args: latents)  # the sampler's result
    image = np.asarray(generate(sd, ["a photo"], [0], steps=1, progress=False)[0], np.int16)
    expected = np.asarray(to_pil(sd.vae.decode(posterior[:, :4])[0]), np.int16)
    assert ((expected > 2) & (expected < 253)).mean() > 0.5  # not saturated: a wrong scale would show
    assert np.abs(image - expected).max() <= 1  # 8-bit rounding


def test_full_size_parity(full_pair):
    check_parity(*full_pair)


def test_toy_norm_groups_parity():
    """The toy model's VAE: the tiny width with 8 GroupNorm groups (make_toy.py), against diffusers'
    norm_num_groups=8; and the groups matter: the same weights in SD's 32 groups give another picture."""
    ours, ref = build_pair(replace(VAEConfig.tiny(), norm_groups=8))
    check_parity(ours, ref)
    in_32 = AutoencoderKL(VAEConfig.tiny()).eval()
    in_32.load_state_dict(ours.state_dict())
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (in_32.decode(z) - ours.decode(z)).abs().max() > 0.01


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
    ours = random_model(AutoencoderKL, VAEConfig.tiny()).eval()
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
