"""DDIM, the schedule and DDPM noising against diffusers' DDIMScheduler configured as Stable Diffusion v1, and the
whole text-to-image path (generate) against diffusers' StableDiffusionPipeline."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from dreambooth.ddim import add_noise, ddim_sample, ddim_timesteps, guided_eps_fn, sd_alphas_cumprod
from tests.references import sd_v1_ddim, single_file_pipeline


class ToyEps(torch.nn.Module):
    """Stands in for the UNet: the ideal noise prediction for latents x0 ~ N(0, 0.5^2), plus a small random conv
    net, so latents stay at realistic sizes (~1) over the run and eps depends on x and t nonlinearly."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv1 = torch.nn.Conv2d(4, 16, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(16, 4, 3, padding=1)
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod())

    def forward(self, x, t):
        a = self.alphas_cumprod[t]
        ideal = (1 - a).sqrt() * x / (0.25 * a + 1 - a)
        return ideal + 0.1 * self.conv2(torch.tanh(self.conv1(x)))


def test_alphas_cumprod_match_diffusers():
    ours = sd_alphas_cumprod()
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    torch.testing.assert_close(ours, sd_v1_ddim().alphas_cumprod, rtol=1e-5, atol=0)


@pytest.mark.parametrize("steps", [50, 20, 7, 1])
def test_timesteps_match_diffusers(steps):
    assert ddim_timesteps(steps).tolist() == sd_v1_ddim(steps).timesteps.tolist()


def test_timesteps_for_50_steps_are_offset_by_one():
    assert ddim_timesteps(50).tolist() == list(range(981, 0, -20))


def test_every_accepted_step_count_starts_near_the_top_and_never_repeats():
    """For each count --ddim_steps accepts: that many timesteps, strictly decreasing from near 999 to 1. SD's rule,
    k * (1000 // steps) + 1, started 600 steps at t = 600 (the stride is 1 above 500) and 334 steps at 667; the
    first timestep is now within a tenth of the schedule plus one spacing of the top."""
    for steps in range(1, 1000):
        t = ddim_timesteps(steps).tolist()
        assert len(t) == steps and t[-1] == 1 and t[0] <= 999, steps
        assert all(a > b for a, b in zip(t, t[1:])), steps
        assert 999 - t[0] < 100 + 1000 / steps, (steps, t[0])


@torch.no_grad()
def test_many_steps_sample_what_fewer_steps_do():
    """DDIM follows one ODE: 334 to 999 steps land close to where 500 do (a divisor of 1000, SD's own spacing). With
    600 steps started at t = 600, pure noise was taken for a far less noisy latent and the result drifted."""
    eps_fn = ToyEps()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = ddim_sample(eps_fn, x, sd_alphas_cumprod(), 500)
    for steps in (334, 600, 777, 999):  # within 0.005 of it now; 0.17 off at 600 steps before
        assert (ddim_sample(eps_fn, x, sd_alphas_cumprod(), steps) - reference).abs().max() < 0.02, steps


@pytest.mark.parametrize("steps", [0, 1000, -3])
def test_bad_step_counts_are_refused(steps):
    with pytest.raises(ValueError, match="DDIM steps"):
        ddim_timesteps(steps)


def test_add_noise_matches_diffusers():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    scheduler = sd_v1_ddim()
    torch.testing.assert_close(add_noise(x0, noise, t, sd_alphas_cumprod()), scheduler.add_noise(x0, noise, t),
                               rtol=1e-5, atol=1e-6)


def diffusers_ddim(eps_fn, x, eta, noise_generator):
    scheduler = sd_v1_ddim(50)
    for t in scheduler.timesteps:
        variance_noise = torch.randn(x.shape, generator=noise_generator) if eta > 0 else None
        x = scheduler.step(eps_fn(x, int(t)), t, x, eta=eta, variance_noise=variance_noise).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
@torch.no_grad()
def test_ddim_matches_diffusers(eta):
    eps_fn = ToyEps()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = ddim_sample(eps_fn, x, sd_alphas_cumprod(), steps=50, eta=eta, generator=torch.Generator().manual_seed(3))
    theirs = diffusers_ddim(eps_fn, x, eta, torch.Generator().manual_seed(3))
    assert 0.1 < theirs.abs().max() < 10  # a realistic run, not a degenerate or exploding one
    # Relative error of the whole latent: the two schedules differ by ~1e-6 relative (diffusers computes its betas
    # in float32, the CompVis code in float64), which elementwise comparison near zero would magnify.
    assert (ours - theirs).norm() / theirs.norm() < 1e-5
    # Given diffusers' own schedule, the sampler arithmetic agrees elementwise.
    ours_same_schedule = ddim_sample(eps_fn, x, sd_v1_ddim().alphas_cumprod, steps=50, eta=eta,
                                     generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours_same_schedule, theirs, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_per_sample_generators_make_samples_independent_of_the_batch():
    eps_fn = ToyEps()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    batch = ddim_sample(eps_fn, x, sd_alphas_cumprod(), steps=5, eta=1.0,
                        generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    alone = ddim_sample(eps_fn, x[1:2], sd_alphas_cumprod(), steps=5, eta=1.0,
                        generator=[torch.Generator().manual_seed(11)])
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-6)


class ContextUNet(torch.nn.Module):
    """Stands in for the UNet's call signature: eps = f(x) + (mean of the context) per sample."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t, context):
        assert t.dtype == torch.long and t.shape == (len(x),)
        return self.conv(x) + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


@torch.no_grad()
def test_guidance_is_eps_uncond_plus_scale_times_difference():
    unet = ContextUNet()
    cond, uncond = torch.randn(2, 77, 8), torch.randn(1, 77, 8)
    x = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 981)
    eps_cond, eps_uncond = unet(x, t, cond), unet(x, t, uncond.expand(2, -1, -1))
    expected = eps_uncond + 7.5 * (eps_cond - eps_uncond)
    torch.testing.assert_close(guided_eps_fn(unet, cond, uncond, 7.5)(x, 981), expected)


# ---- the whole sampler against diffusers' StableDiffusionPipeline ---------------------------------------------

@pytest.fixture(scope="module")
def tiny_and_pipeline(tmp_path_factory):
    """The tiny model written by dreambooth.save in the original layout, loaded by us and by diffusers'
    StableDiffusionPipeline.from_single_file (config from a local folder, no download)."""
    import dreambooth

    folder = tmp_path_factory.mktemp("pipeline")
    path = folder / "tiny.safetensors"
    dreambooth.save(dreambooth.load("tiny"), path, dtype=torch.float32)
    sd = dreambooth.load(path)
    pipe = single_file_pipeline(path, sd, folder / "config")
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.steps_offset == 1
    return sd, pipe


@pytest.mark.parametrize("eta", [0.0, 1.0])
@torch.no_grad()
def test_generate_matches_diffusers_pipeline(tiny_and_pipeline, eta):
    """Our generate() and diffusers' pipeline, from the same file, make the same images from the same seeds,
    prompts and guidance scale."""
    from dreambooth.generate import generate

    sd, pipe = tiny_and_pipeline
    prompts, seeds, steps, scale = ["photo of a dog", "a sks dog in the snow"], [3, 4], 10, 7.5
    ours = generate(sd, prompts, seeds, steps=steps, scale=scale, eta=eta, progress=False)
    # The same per-image noise: each generator first draws the initial latent, then (eta > 0) the step noise.
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = torch.stack([torch.randn(4, 8, 8, generator=g) for g in generators])
    theirs = pipe(prompts, height=64, width=64, num_inference_steps=steps, guidance_scale=scale, eta=eta,
                  generator=generators, latents=latents, output_type="np").images  # (B, H, W, 3) in [0, 1]
    assert 0.05 < theirs.std() and ((theirs > 0.01) & (theirs < 0.99)).mean() > 0.5  # not saturated
    for image, reference in zip(ours, theirs):
        # ours are 8-bit: half a level of rounding, plus the float noise of two implementations through 10 steps at
        # guidance 7.5, which reached 0.14 of a level with eta 1 on an AMD EPYC (2 threads). So: within one level.
        # A wrong step is far off: sampling with eta 0.9 against the reference's 1.0 was 11 and 17 levels off.
        assert np.abs(np.asarray(image) / 255 - reference).max() < 1 / 255
