"""CPU benchmark: our UNet, training step and sampler against diffusers, same weights, same inputs, same process.

    python benchmarks/cpu.py              # mid-size UNet + tiny pipeline, about a minute on 2 cores
    python benchmarks/cpu.py --quick      # tiny sizes, a few seconds (CI runs this)

Both sides get the same numbers: our models get seeded random weights and diffusers' models are loaded strictly
from them through diffusers' own checkpoint converters (tests/references.py). Before timing, each race checks
that both sides compute the same thing (UNet outputs, images). The two sides are timed alternately, repeat by
repeat, so background load falls on both; the figures are medians after warm-up. Ratio < 1 means we are faster.
"""
import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: dreambooth/, train.py, benchmarks/

import dreambooth  # noqa: E402
from dreambooth import Tokenizer, speed  # noqa: E402
import train  # noqa: E402
from dreambooth.ddim import sd_alphas_cumprod  # noqa: E402
from dreambooth.generate import generate  # noqa: E402
from dreambooth.unet import UNetConfig, UNetModel  # noqa: E402
from tests.references import random_model, random_batches, reference_pipeline, reference_unet  # noqa: E402

# The mid-size UNet: SD v1's topology and text width with 64 instead of 320 channels (38 M instead of 860 M weights)
# and 2 heads (head sizes 32 / 64 / 128; SD v1's are 40 / 80 / 160), run at 32 x 32 latents (256 px).
MID = UNetConfig(model_channels=64, num_heads=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time our UNet, training step and sampler against diffusers on the CPU.")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (for CI): checks it runs")
    p.add_argument("--repeats", type=int, help="timed repeats per side (default 5, --quick 2)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    return args


def race(*fns, repeats: int, warmup: int = 1) -> list[float]:
    """Median seconds of each fn(). They take turns, the order rotating every round, so all share whatever else
    the machine is doing; the first `warmup` rounds are not counted."""
    times = [[] for _ in fns]
    for r in range(warmup + repeats):
        for k in range(len(fns)):
            k = (k + r) % len(fns)
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return [statistics.median(ts[warmup:]) for ts in times]


def unet_inputs(cfg: UNetConfig, latent: int, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, cfg.in_channels, latent, latent, generator=g),
            torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, 77, cfg.context_dim, generator=g))


def forward_backward(ours: UNetModel, ref, inputs, repeats: int):
    x, t, context = inputs
    with torch.no_grad():
        diff = (ours(x, t, context) - ref(x, t, encoder_hidden_states=context).sample).abs().max().item()

    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours(x, t, context).square().mean().backward()

    def ref_step():
        ref.zero_grad(set_to_none=True)
        ref(x, t, encoder_hidden_states=context).sample.square().mean().backward()

    return (*race(ours_step, ref_step, repeats=repeats), f"max |eps ours - eps diffusers| = {diff:.1e}")


def training_steps(cfg: UNetConfig, latent: int, repeats: int):
    """One DreamBooth step on batch 1 subject + 1 prior from cached latents: draw, loss, backward, AdamW.

    Ours is train.py's TrainStep, called as its loop calls it: Batches.draw, `dreambooth_loss` (paper eq. 2),
    backward and fused AdamW, either stepped inside backward, block by block (train.py's default, the
    speed.StepInBackward wrapper), or after backward (train.py --no-step-in-backward, the textbook AdamW). The
    reference is the step of diffusers' train_dreambooth.py on batches from the same draws: DDPMScheduler.add_noise,
    the UNet, MSE per half, AdamW after backward (fused too, so that both sides run the same update kernel; the
    script itself uses torch's unfused default)."""
    import diffusers

    cpu, alphas_cumprod = torch.device("cpu"), sd_alphas_cumprod()
    lr = torch.tensor(1e-6)
    batches = random_batches(latent, cpu)
    contexts = torch.randn(2, 77, cfg.context_dim, generator=torch.Generator().manual_seed(1))
    ids = Tokenizer()(["photo of a sks dog", "photo of a dog"])
    in_backward, after, ref = (random_model(UNetModel, cfg).train() for _ in range(3))
    ref = reference_unet(ref)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-6, fused=True)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear")

    def adamw(params):
        return torch.optim.AdamW(params, lr=lr, fused=True)

    def ours(unet, optimizer):
        step = train.TrainStep(unet, None, ids, contexts, batches, alphas_cumprod, 1.0, optimizer, lr,
                               torch.autocast("cpu", enabled=False))
        generator = torch.Generator().manual_seed(0)
        return lambda: step(generator)

    ref_generator = torch.Generator().manual_seed(0)

    def diffusers_step():
        latents, t, noise, _ = batches.draw(ref_generator)  # one prior prompt: contexts[1]
        pred = ref(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=contexts).sample
        pred, prior_pred = pred.chunk(2)
        target, prior_target = noise.chunk(2)
        loss = F.mse_loss(pred.float(), target.float()) + 1.0 * F.mse_loss(prior_pred.float(), prior_target.float())
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    s_in, s_after, s_ref = race(ours(in_backward, speed.StepInBackward(speed.blocks({"unet": in_backward}), adamw)),
                                ours(after, adamw(list(after.parameters()))), diffusers_step, repeats=repeats)
    return [("training step, AdamW in backward", s_in, s_ref, "train.py's default"),
            ("training step, AdamW after backward", s_after, s_ref, "")]


def sampling(n_images: int, steps: int, repeats: int):
    """The tiny built-in model: our generate() against StableDiffusionPipeline + DDIMScheduler, CFG 7.5, same seeds."""
    sd = dreambooth.load("tiny")
    pipe = reference_pipeline(sd)
    prompts = [f"photo of a sks dog, picture {k}" for k in range(n_images)]
    seeds = list(range(n_images))
    size = sd.resolution
    # generate() draws image k's starting noise from torch.Generator().manual_seed(seeds[k]); the pipeline gets it too.
    latents = torch.stack([torch.randn(4, size // 8, size // 8, generator=torch.Generator().manual_seed(s))
                           for s in seeds])
    images = {}

    def ours():
        images["ours"] = generate(sd, prompts, seeds, steps=steps, scale=7.5, slice_size=n_images, progress=False)

    def ref():
        images["ref"] = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                             latents=latents).images

    timings = race(ours, ref, repeats=repeats)
    diff = max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
               for a, b in zip(images["ours"], images["ref"]))
    return (*timings, f"max pixel difference = {diff} / 255")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    cfg, latent = (UNetConfig.tiny(), 8) if args.quick else (MID, 32)
    n_images, steps = (2, 3) if args.quick else (2, 50)
    ours = random_model(UNetModel, cfg).train()
    print(f"CPU benchmark, {date.today()}: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}; medians of {args.repeats} repeats after 1 warm-up, in seconds")
    print(f"UNet: {'tiny' if args.quick else 'mid-size'}, model_channels {cfg.model_channels}, "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.0f} M weights, fp32, input [2, 4, {latent}, {latent}] + "
          f"context [2, 77, {cfg.context_dim}]. Sampling: the tiny model, {n_images} images x {steps} DDIM steps, "
          "CFG 7.5, 64 px")

    inputs = unet_inputs(cfg, latent)
    rows = [("UNet forward+backward", *forward_backward(ours, reference_unet(ours), inputs, args.repeats))]
    del ours
    rows += training_steps(cfg, latent, args.repeats)
    rows.append(("sampling (tiny model)", *sampling(n_images, steps, args.repeats)))

    print(f"\n{'':36} {'ours':>9} {'diffusers':>10} {'ours/diffusers':>15}  check")
    for name, ours_s, ref_s, check in rows:
        print(f"{name:36} {ours_s:9.3f} {ref_s:10.3f} {ours_s / ref_s:15.2f}  {check}")


if __name__ == "__main__":
    main()
