"""The noise schedule, DDPM noising, the DDIM sampler and classifier-free guidance of Stable Diffusion v1.

Notation follows the papers. alpha-bar_t = alphas_cumprod[t] is the share of signal variance left at training
timestep t (t = 0..999); it falls from ~1 (almost clean) to ~0.005 (almost pure noise).

- DDPM (Ho et al. 2020, https://arxiv.org/abs/2006.11239) noises a clean latent x0 in one jump (eq. 4) and trains
  the UNet to predict the noise eps that was added.
- DDIM (Song et al. 2021, https://arxiv.org/abs/2010.02502) samples with the same trained UNet in far fewer steps:
  from x_t it predicts x0, then re-noises it to the level of an earlier timestep (eq. 12). eta = 0 makes that
  deterministic; eta = 1 adds as much fresh noise as DDPM ancestral sampling would (eq. 16).
- Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598) pushes each prediction away from
  the unconditional one, towards the prompt.

Randomness comes from CPU `torch.Generator`s and is moved to the latents' device afterwards, so a seed gives the
same noise on every device.
"""
import torch
from tqdm import tqdm


def sd_alphas_cumprod(num_train_steps=1000, beta_start=0.00085, beta_end=0.012) -> torch.Tensor:
    """alpha-bar_t of SD v1's "scaled linear" schedule: sqrt(beta_t) rises linearly from sqrt(beta_start) to
    sqrt(beta_end). Computed in float64 as the CompVis code does (its checkpoints store the result in the
    'alphas_cumprod' buffer) and returned as float32."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise clean latents x0 [B, ...] to timesteps t [B] in one jump.

    DDPM eq. 4: q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I), i.e.
        x_t = sqrt(alpha-bar_t) * x0 + sqrt(1 - alpha-bar_t) * noise
    """
    a = alphas_cumprod.to(x0.device)[t.to(x0.device)].to(x0.dtype)
    a = a.view(-1, *[1] * (x0.ndim - 1))  # (B, 1, 1, 1): one alpha-bar per sample
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_timesteps(steps: int, num_train_steps: int = 1000) -> torch.Tensor:
    """The training timesteps a DDIM run of `steps` steps visits, in the order it visits them.

    Evenly spaced and offset by one, as in the CompVis code and diffusers' `steps_offset=1`:
    981, 961, ..., 21, 1 for 50 steps, k * (1000 // steps) + 1 for k = 0..steps-1.

    That rule spaces the steps by a whole number, so it spans steps * (1000 // steps) of the 1000 timesteps: all of
    them for 50 steps, 990 for 30, but 600 for 600 steps (the stride is 1), which would start sampling pure noise
    as if it were the far less noisy x_600. Where it spans less than nine tenths, the steps are spaced by the exact
    fraction instead, floor(k * 1000 / steps) + 1, whose first timestep is within one spacing of 999.
    """
    if not 1 <= steps < num_train_steps:
        raise ValueError(f"the number of DDIM steps must be between 1 and {num_train_steps - 1}, got {steps}")
    stride = num_train_steps // steps
    k = torch.arange(steps)
    if steps * stride >= 0.9 * num_train_steps:
        return (k * stride + 1).flip(0)
    return (k * num_train_steps // steps + 1).flip(0)


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the CPU. `generator` is one torch.Generator for the whole
    batch, a list with one per sample (so sample k depends only on generator k), or None (torch's global RNG)."""
    if isinstance(generator, (list, tuple)):
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator])
    else:
        noise = torch.randn(x.shape, generator=generator)
    return noise.to(x.device, x.dtype)


@torch.no_grad()
def ddim_sample(eps_fn, x: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int = 50, eta: float = 0.0,
                generator=None, progress: bool = False) -> torch.Tensor:
    """Run DDIM from pure-noise latents x [B, 4, h, w] to clean latents x0 [B, 4, h, w].

    eps_fn(x, t) predicts the noise in x at training timestep t (a Python int), e.g. `guided_eps_fn(...)`.
    With eta > 0, fresh noise is drawn from `generator` at every step (see `_randn_like`).

    Each step goes from timestep t to the previous visited timestep t' (for the last step, t' = 0: the "previous
    alpha-bar" is alphas_cumprod[0], not 1, as in SD v1). DDIM eq. 12, with a = alpha-bar:
        x_t' = sqrt(a_t') * x0_pred + sqrt(1 - a_t' - sigma_t^2) * eps + sigma_t * noise,
        x0_pred = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)                 ("predicted x0")
    and eq. 16:
        sigma_t = eta * sqrt((1 - a_t') / (1 - a_t)) * sqrt(1 - a_t / a_t')
    """
    alphas = alphas_cumprod.detach().float().cpu()
    timesteps = ddim_timesteps(steps, len(alphas)).tolist()
    x = x.float()
    for i, t in enumerate(tqdm(timesteps, desc="DDIM", unit="step", leave=False, disable=not progress)):
        a_t = alphas[t]
        a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else alphas[0]
        eps = eps_fn(x, t).float()
        x0_pred = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * x0_pred + (1 - a_prev - sigma**2).sqrt() * eps
        if eta > 0:
            x = x + sigma * _randn_like(x, generator)
    return x


def guided_eps_fn(unet, cond: torch.Tensor, uncond: torch.Tensor, scale: float):
    """An eps_fn for `ddim_sample` that applies classifier-free guidance.

    cond is the prompts' context [B, 77, C]; uncond is the context of "" (CompVis convention) or of a negative
    prompt, [B or 1, 77, C]. Ho & Salimans eq. 6 with guidance weight w = scale - 1:
        eps = eps(x, uncond) + scale * (eps(x, cond) - eps(x, uncond))
    Both predictions come from one UNet call on the doubled batch.
    """
    dtype = next(unet.parameters()).dtype
    context = torch.cat([uncond.expand_as(cond), cond]).to(dtype)

    def eps_fn(x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        x_in = torch.cat([x, x]).to(dtype)
        t_in = torch.as_tensor(t, device=x.device).expand(len(x_in))  # t: an int, or a tensor a CUDA graph refills
        eps_uncond, eps_cond = unet(x_in, t_in, context).float().chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return eps_fn
