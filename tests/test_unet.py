"""UNet parity against diffusers' UNet2DConditionModel, with the key layout checked by diffusers' own converter.

Our model gets random weights; its state dict, under the checkpoint prefix 'model.diffusion_model.', goes through
`convert_ldm_unet_checkpoint` (the function diffusers uses on real sd-v1-4 files) and loads strictly into diffusers.
That proves our module names and shapes are the original CompVis layout; the outputs then prove the math.
"""
import pytest
import torch

from dreambooth.unet import UNetConfig, UNetModel
from tests.references import assert_close, random_model, reference_unet


def build_pair(cfg: UNetConfig):
    """Ours with random weights, and diffusers' holding the same tensors (no second copy in RAM), loaded strictly
    through diffusers' LDM converter."""
    pytest.importorskip("diffusers")  # only the tests that compare with it need it
    ours = random_model(UNetModel, cfg).eval()
    return ours, reference_unet(ours)


def check_parity(ours, ref, cfg: UNetConfig, size: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    assert got.shape == x.shape
    assert expected.abs().max() > 1e-2  # not a degenerate all-zero output
    assert_close(got, expected)


@pytest.fixture(scope="module")
def full_pair():
    ours, ref = build_pair(UNetConfig())
    yield ours, ref
    del ours, ref


@pytest.fixture(scope="module")
def tiny_pair():
    return build_pair(UNetConfig.tiny())


def test_full_size_layout_and_parity(full_pair):
    ours, ref = full_pair
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964  # the sd-v1-4 UNet
    assert len(ours.state_dict()) == 686
    check_parity(ours, ref, UNetConfig(), size=32)


def test_tiny_layout_and_parity(tiny_pair):
    check_parity(*tiny_pair, UNetConfig.tiny(), size=32)


@pytest.mark.parametrize("size", [9, 13])
def test_latent_sides_not_multiple_of_8(tiny_pair, size):
    # 72 px and 104 px images: each Upsample must meet its skip activation's size, as diffusers does.
    check_parity(*tiny_pair, UNetConfig.tiny(), size=size)


def test_timestep_forms_agree(tiny_pair):
    ours, _ = tiny_pair
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, UNetConfig.tiny().context_dim, generator=g)
    with torch.no_grad():
        long_t = ours(x, torch.tensor([500, 500]), context)
        float_t = ours(x, torch.tensor([500.0, 500.0]), context)
        scalar_t = ours(x, torch.tensor(500), context)
    torch.testing.assert_close(float_t, long_t, rtol=0, atol=0)
    torch.testing.assert_close(scalar_t, long_t, rtol=0, atol=0)


def test_gradient_checkpointing_gives_same_grads(monkeypatch):
    model = random_model(UNetModel, UNetConfig.tiny(), seed=3).train()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([3, 900])
    context = torch.randn(2, 77, UNetConfig.tiny().context_dim, generator=g, requires_grad=True)
    calls = []
    middle_forward = model.middle_block.forward
    monkeypatch.setattr(model.middle_block, "forward", lambda *a: calls.append(1) or middle_forward(*a))

    def grads(enabled: bool):
        model.set_grad_checkpointing(enabled)
        model.zero_grad()
        context.grad = None
        calls.clear()
        loss = model(x, t, context).square().mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()] + [context.grad.clone()], len(calls)

    plain, plain_calls = grads(False)
    checkpointed, checkpointed_calls = grads(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # checkpointing re-ran the block in backward
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
