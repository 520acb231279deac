"""GPU benchmark: train.py's training step and our sampler, each against diffusers with the same weights.

    python benchmarks/gpu.py              # on a CUDA machine: full-size SD v1 with random weights, at 512 px
    python benchmarks/gpu.py --quick      # the main rows, fewer steps: under 5 minutes on a fresh GPU machine
    python benchmarks/gpu.py --cpu-smoke  # the same code at tiny sizes on the CPU, in seconds (CI runs this)

Training, batch 1 subject + 1 prior photo, cached latents. Ours is train.py itself from its setup on: for each row,
train.py's flags go through its parse_args, then `train.make_step` sets up a StableDiffusion with random weights and
two random photos (VAE posteriors and contexts cached, channels_last, gradient checkpointing, the optimizer, the CUDA
graph) and the timed call is the loop's: `step.lr.fill_(lr); step(generator)`. Rows run eagerly or as one CUDA
graph (recorded during the warm-up steps), with gradient checkpointing on and off, with the text encoder trained.
Peak memory is torch.cuda.max_memory_allocated from the end of setup on, as train.py reports it "in the steps".
Each training row runs in a process of its own, as train.py does: run in one process, the rows' peaks added up
(on an H200 the second row peaked at 20.14 GiB after the first, 10.44 GiB alone), the earlier rows' models,
optimizers and CUDA graph pools still held.
The reference is the step of diffusers' train_dreambooth.py with diffusers' UNet2DConditionModel (and transformers'
CLIPTextModel) holding the same weights, its batches drawn by train.py's Batches.draw, bf16 autocast, and torch's
fused AdamW after backward.

Sampling: 8 images x 50 DDIM steps, classifier-free guidance 7.5, 512 px, fp16 weights: our `generate` (eager, or its
guided UNet call replayed from a CUDA graph) against diffusers' StableDiffusionPipeline with a DDIMScheduler set up
as SD v1, from the same starting noise.

Nothing is downloaded: the weights are seeded random numbers. Without diffusers (or transformers) installed, the
reference rows say so and the rest runs.
"""
import argparse
import contextlib
import functools
import gc
import io
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: dreambooth/, train.py, benchmarks/

import train  # noqa: E402
import train_settings  # noqa: E402
import train_setup  # noqa: E402
from dreambooth import StableDiffusion, Tokenizer  # noqa: E402
from dreambooth.clip import CLIPConfig, CLIPTextModel  # noqa: E402
from dreambooth.ddim import sd_alphas_cumprod  # noqa: E402
from dreambooth.generate import generate  # noqa: E402
from dreambooth.unet import UNetConfig, UNetModel  # noqa: E402
from dreambooth.vae import AutoencoderKL, VAEConfig  # noqa: E402
from tests.references import (random_model, random_batches, reference_clip, reference_pipeline,  # noqa: E402
                              reference_unet)


@dataclass
class Sizes:
    unet: UNetConfig
    clip: CLIPConfig
    vae: VAEConfig
    resolution: int          # image side in pixels; latents are resolution // 8
    sample_dtype: torch.dtype
    n_images: int            # images per sampling run
    ddim_steps: int


FULL = Sizes(UNetConfig(), CLIPConfig(), VAEConfig(), 512, torch.float16, 8, 50)
# The smoke run checks the code paths, not speed: tiny models and fp32 sampling (fp16 kernels are patchy on CPUs).
SMOKE = Sizes(UNetConfig.tiny(), CLIPConfig.tiny(), VAEConfig.tiny(), 64, torch.float32, 2, 2)

# Training rows: (trainer, CUDA graph, gradient checkpointing, text encoder trained, in --quick).
TRAIN_ROWS = [
    ("ours", False, True, False, True), ("ours", False, False, False, False),
    ("ours", True, True, False, True), ("ours", True, False, False, True),
    ("ours", False, True, True, False), ("ours", True, True, True, True), ("ours", True, False, True, False),
    ("lora-16", True, True, False, True), ("lora-16", False, True, False, False),  # train.py --lora 16
    ("diffusers", False, True, False, True), ("diffusers", False, False, False, False),
    ("diffusers", False, True, True, False),
]
SAMPLE_ROWS = [("ours", False), ("ours", True), ("diffusers", False)]  # (sampler, CUDA graph)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Training steps/s, peak memory and sampling time, ours and diffusers'.")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    p.add_argument("--quick", action="store_true", help="the main rows and fewer steps: under 5 minutes on a GPU")
    p.add_argument("--steps", type=int, help="timed training steps per row (default 30, quick 15, smoke 2)")
    p.add_argument("--warmup", type=int, help="untimed training steps first, the CUDA graph's recording included "
                                              "(default 5: train.py records after 3 eager steps)")
    p.add_argument("--repeats", type=int, help="timed sampling runs per row, after one warm-up (default 3, quick and "
                                               "smoke 1)")
    p.add_argument("--row", type=int, help=argparse.SUPPRESS)  # the child process of one training row (run_row)
    args = p.parse_args(argv)
    args.cpu_smoke = args.cpu_smoke or not torch.cuda.is_available()
    for name, full, quick, smoke in (("steps", 30, 15, 2), ("warmup", 5, 5, 1), ("repeats", 3, 1, 1)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.cpu_smoke else quick if args.quick else full)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be at least 1, --warmup at least 0")
    return args


def reference_missing() -> str | None:
    """Why the reference rows cannot run here, or None."""
    for name in ("diffusers", "transformers"):
        try:
            __import__(name)
        except ImportError:
            return f"skipped: {name} is not installed here (pip install {name} adds these rows)"
    return None


def why_skipped(who, graph, missing, device) -> str | None:
    """Why a row cannot run here: the reference is not installed, or a CUDA-graph row without CUDA."""
    if who == "diffusers" and missing:
        return missing
    return "skipped: CUDA graphs need CUDA" if graph and device.type != "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_sd(sizes, device, dtype) -> StableDiffusion:
    sd = StableDiffusion(Tokenizer(), random_model(CLIPTextModel, sizes.clip, device, seed=1).eval(),
                         random_model(UNetModel, sizes.unet, device, seed=0).eval(),
                         random_model(AutoencoderKL, sizes.vae, device, seed=2).eval(), sd_alphas_cumprod(),
                         name="random", resolution=sizes.resolution)
    return sd.to(device, dtype)


# ---- training ------------------------------------------------------------------------------------------------------

def ours_step(sizes, device, graph, checkpointing, train_text_encoder, lora=0):
    """train.py from its setup on, with this row's flags: make_step on random weights and two random photos."""
    args, _ = train_settings.parse_args([
        "--instance", "unused", "--class", "dog", "--ckpt", "tiny", "--device", str(device), "--lr", "1e-6",
        "--resolution", str(sizes.resolution), f"--{'' if checkpointing else 'no-'}grad-checkpointing",
        f"--{'' if graph else 'no-'}cuda-graph", *(["--train-text-encoder"] if train_text_encoder else []),
        "--lora", str(lora)])
    train_settings.resolve_defaults(args)
    sd = random_sd(sizes, device, torch.float32)
    photos = torch.rand(2, 3, sizes.resolution, sizes.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with contextlib.redirect_stdout(io.StringIO()):  # make_step's notices
        step, _ = train.make_step(sd, photos, train_setup.Photos([args.instance_prompt, args.prior_prompt], [0, 0], 1),
                                  args, device)
    generator = torch.Generator(device).manual_seed(args.seed)

    def run():  # the loop's call
        step.lr.fill_(args.lr)
        step(generator)

    return run


def diffusers_step(sizes, device, graph, checkpointing, train_text_encoder):
    """diffusers' train_dreambooth.py step with the same weights: DDPMScheduler.add_noise, UNet2DConditionModel,
    MSE per half, then torch's fused AdamW after backward."""
    import diffusers

    unet = reference_unet(random_model(UNetModel, sizes.unet, device, seed=0)).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    params = list(unet.parameters())
    if train_text_encoder:
        text_encoder = reference_clip(random_model(CLIPTextModel, sizes.clip, device, seed=1)).train()
        params += list(text_encoder.parameters())
    free_memory(device)  # our modules, whose tensors the references now hold, are gone
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear")
    batches = random_batches(sizes.resolution // 8, device)
    g = torch.Generator().manual_seed(1)
    contexts = torch.randn(2, 77, sizes.unet.context_dim, generator=g).to(device)
    ids = Tokenizer()(["photo of a sks dog", "photo of a dog"]).to(device)
    generator = torch.Generator(device).manual_seed(0)

    def step():
        latents, t, noise, _ = batches.draw(generator)  # one prior prompt: contexts[1]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            context = text_encoder(ids).last_hidden_state if train_text_encoder else contexts
            pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
        pred, prior_pred = pred.float().chunk(2)
        target, prior_target = noise.float().chunk(2)
        loss = F.mse_loss(pred, target) + 1.0 * F.mse_loss(prior_pred, prior_target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_row(index, args) -> tuple[float, float | None]:
    """Training row TRAIN_ROWS[index] timed in a child process of its own: (steps per second, peak GiB or None)."""
    cmd = [sys.executable, __file__, "--row", str(index), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    child = subprocess.run(cmd + (["--cpu-smoke"] if args.cpu_smoke else []), capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"gpu.py: training row {TRAIN_ROWS[index]} failed:\n{child.stderr[-3000:]}")
    return tuple(json.loads(child.stdout.splitlines()[-1]))


def time_training(make, args, sizes, device, **row) -> tuple[float, float | None]:
    """(steps per second, peak GiB or None on the CPU) over args.steps steps after args.warmup steps."""
    step = make(sizes, device, **row)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # from the end of setup on, as train.py counts
    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return args.steps / seconds, peak


# ---- sampling ------------------------------------------------------------------------------------------------------

def time_sampling(sampler, graph, args, sizes, device) -> float:
    """Median seconds of one run: prompts -> n_images PIL images."""
    free_memory(device)
    sd = random_sd(sizes, device, sizes.sample_dtype)
    n, size = sizes.n_images, sizes.resolution
    prompts, seeds = [f"photo of a sks dog, picture {k}" for k in range(n)], list(range(n))
    if sampler == "ours":
        def run():  # the VAE decodes the whole batch at once, as the pipeline does
            generate(sd, prompts, seeds, steps=sizes.ddim_steps, scale=7.5, slice_size=n, progress=False,
                     cuda_graph=graph)
    else:
        pipe = reference_pipeline(sd)
        del sd
        free_memory(device)
        # generate() draws image k's starting noise from torch.Generator().manual_seed(seeds[k]); so does this.
        latents = torch.stack([torch.randn(4, size // 8, size // 8, generator=torch.Generator().manual_seed(s))
                               for s in seeds]).to(device, sizes.sample_dtype)

        def run():
            pipe(prompts, height=size, width=size, num_inference_steps=sizes.ddim_steps, guidance_scale=7.5,
                 latents=latents)
    times = []
    for _ in range(1 + args.repeats):  # the first run warms up
        sync(device)
        start = time.perf_counter()
        run()  # returns PIL images: the GPU work is done
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


# ---- the report ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    sizes = SMOKE if args.cpu_smoke else FULL
    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny ops gain nothing from threads, and lose much when other jobs share the cores
    if args.row is not None:  # one training row, in its own process (run_row): its figures as JSON
        trainer, graph, checkpointing, text_encoder, _ = TRAIN_ROWS[args.row]
        make = diffusers_step if trainer == "diffusers" else \
            functools.partial(ours_step, lora=int(trainer.removeprefix("lora-")) if trainer != "ours" else 0)
        print(json.dumps(time_training(make, args, sizes, device, graph=graph, checkpointing=checkpointing,
                                       train_text_encoder=text_encoder)))
        return
    missing = reference_missing()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU smoke run (tiny models, no benchmark)"
    versions = f"torch {torch.__version__}" + ("" if missing else f", diffusers {__import__('diffusers').__version__}")
    print(f"GPU benchmark, {datetime.now():%Y-%m-%d %H:%M}: {name}; {versions}")
    side = sizes.resolution // 8
    print(f"\nTraining step: {sizes.resolution} px (latents [2, 4, {side}, {side}]), batch 1 subject + 1 prior, "
          f"cached latents, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, fp32 weights and AdamW; "
          f"{args.steps} steps timed after {args.warmup}")
    print(f"{'trainer':10} {'step':6} {'checkpointing':14} {'text encoder':13} {'steps/s':>8} {'peak GiB':>9}")
    for index, (trainer, graph, checkpointing, text_encoder, in_quick) in enumerate(TRAIN_ROWS):
        label = (f"{trainer:10} {'graph' if graph else 'eager':6} {'on' if checkpointing else 'off':14} "
                 f"{'trained' if text_encoder else 'frozen':13}")
        if args.quick and not in_quick:
            continue
        if skipped := why_skipped(trainer, graph, missing, device):
            print(f"{label} {skipped}")
            continue
        steps_per_s, peak = run_row(index, args)
        print(f"{label} {steps_per_s:8.2f} {'-' if peak is None else f'{peak:.2f}':>9}", flush=True)

    print(f"\nSampling: {sizes.n_images} images x {sizes.ddim_steps} DDIM steps, CFG 7.5, {sizes.resolution} px, "
          f"{str(sizes.sample_dtype).removeprefix('torch.')} weights, VAE decoding the whole batch; median of "
          f"{args.repeats} runs after 1 warm-up")
    print(f"{'sampler':10} {'UNet':6} {'seconds':>8}")
    for sampler, graph in SAMPLE_ROWS:
        label = f"{sampler:10} {'graph' if graph else 'eager':6}"
        if skipped := why_skipped(sampler, graph, missing, device):
            print(f"{label} {skipped}")
            continue
        print(f"{label} {time_sampling(sampler, graph, args, sizes, device):8.2f}", flush=True)


if __name__ == "__main__":
    main()
