"""What a DreamBooth step trains on: the photos' VAE latents, drawn at random.

The subject's photos and the prior's class images are encoded by the VAE once (encode_posteriors), with their
mirror images; each step then draws photos, flips, a latent z ~ q(z|x) from each photo's posterior, timesteps and
noise, in a fixed order from one generator, so that a run, and a resumed run, draw the same batches.
"""
from dataclasses import dataclass

import torch


@torch.no_grad()
def encode_posteriors(vae, images, device, chunk=4):
    """The VAE posterior q(z|x) = N(mean, exp(logvar)) of each image and of its mirror image, computed once.
    images [N, 3, R, R] in [-1, 1] -> [N, 2 (flip), 8 (mean, logvar), R/8, R/8]."""
    out = []
    for x in images.split(chunk):
        x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1).to(device)  # (2n, 3, R, R): image, mirror, ...
        out.append(torch.cat(vae.encode(x), dim=1).unflatten(0, (-1, 2)))
    return torch.cat(out)


def sample_latents(posterior, generator, scale):
    """z ~ N(mean, exp(logvar)), times the model's latent scale (vae.py). posterior [B, 8, h, w] -> [B, 4, h, w]."""
    mean, logvar = posterior.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device)
    return (mean + torch.exp(0.5 * logvar) * noise) * scale


@dataclass
class Photos:
    """What a step draws from: the photos' VAE posteriors, cached by encode_posteriors, or with --no-cache the photos
    themselves and the VAE that encodes them at every step. Rows [0, n_instance) are the subject's photos, the rest
    the prior's."""
    posteriors: torch.Tensor | None  # [N, 2 (flip), 8, h, w]
    images: torch.Tensor | None      # [N, 3, R, R], with --no-cache
    vae: torch.nn.Module | None      # with --no-cache
    n_instance: int
    prior_rows: torch.Tensor         # [n_prior] each prior image's prompt, as a row of the step's contexts (1, 2, ...)
    batch_size: int                  # subject photos per step, and as many prior images if there are any
    latent_scale: float              # StableDiffusion.latent_scale
    timesteps: int = 1000            # t is drawn from [0, timesteps)
    noise_offset: float = 0.0        # std of a constant added to each latent channel's noise (offset noise)
    memory_format: torch.memory_format = torch.contiguous_format  # the UNet's

    def draw(self, generator):
        """The random part of a step, in a fixed order: which photos (batch_size of the subject's, as many of the
        prior's), their horizontal flips, z ~ q(z|x) from each photo's VAE posterior, the timesteps t, the noise
        (then, with noise_offset, its constants). Returns (latents, t, noise, rows): rows are the photos' prompts,
        as rows of the step's contexts: 0 for the subject's, prior_rows for the prior's."""
        device = generator.device
        idx = torch.randint(self.n_instance, (self.batch_size,), generator=generator, device=device)
        rows = torch.zeros_like(idx)
        if len(self.prior_rows):
            prior_idx = torch.randint(len(self.prior_rows), (self.batch_size,), generator=generator, device=device)
            idx = torch.cat([idx, self.n_instance + prior_idx])
            rows = torch.cat([rows, self.prior_rows[prior_idx]])
        flip = torch.randint(2, idx.shape, generator=generator, device=device)  # p = 0.5
        if self.posteriors is None:
            x = torch.where(flip.view(-1, 1, 1, 1).bool(), self.images[idx].flip(-1), self.images[idx])
            with torch.no_grad():
                latents = sample_latents(torch.cat(self.vae.encode(x), dim=1), generator, self.latent_scale)
        else:
            latents = sample_latents(self.posteriors[idx, flip], generator, self.latent_scale)
        t = torch.randint(self.timesteps, (len(idx),), generator=generator, device=device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        if self.noise_offset:  # offset noise: also noise each channel's mean, which eq. 4 leaves almost unnoised
            noise += self.noise_offset * torch.randn(*latents.shape[:2], 1, 1, generator=generator, device=device)
        layout = self.memory_format
        return latents.contiguous(memory_format=layout), t, noise.contiguous(memory_format=layout), rows
