"""GPU benchmark: training steps/s and peak memory, and sampling seconds, for ours and for diffusers, same weights.

    python benchmarks/gpu.py              # on a CUDA machine: full-size SD v1 with random weights, at 512 px
    python benchmarks/gpu.py --cpu-smoke  # the same code at tiny sizes on the CPU, in seconds (CI runs this)

Training: one DreamBooth step at batch 1 instance + 1 prior from cached latents (random VAE posteriors and text
contexts stand in for train.py's cache), bf16 autocast, fp32 weights and plain fp32 AdamW; ours eager and
torch.compile'd, with gradient checkpointing on and off, and with the text encoder trained too. Ours is train.py's
own step (its loss, its StepInBackward optimizer, its latent sampling; the loop body is mirrored below). The
reference is the step of diffusers' train_dreambooth.py with diffusers' UNet2DConditionModel (and transformers'
CLIPTextModel) holding the same weights, and torch's fused AdamW after backward.

Sampling: 8 images x 50 DDIM steps, classifier-free guidance 7.5, 512 px, fp16 weights: our `generate` against
diffusers' StableDiffusionPipeline with a DDIMScheduler set up as SD v1, from the same starting noise.

Nothing is downloaded: the weights are seeded random numbers. Without diffusers (or transformers) installed, the
reference rows say so and the rest runs.
"""
import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: dreambooth/, train.py, benchmarks/

import train  # noqa: E402
from benchmarks import same_weights  # noqa: E402
from benchmarks.same_weights import random_model  # noqa: E402
from dreambooth import StableDiffusion, Tokenizer  # noqa: E402
from dreambooth.clip import CLIPConfig, CLIPTextModel  # noqa: E402
from dreambooth.ddim import sd_alphas_cumprod  # noqa: E402
from dreambooth.generate import generate  # noqa: E402
from dreambooth.unet import UNetConfig, UNetModel  # noqa: E402
from dreambooth.vae import AutoencoderKL, VAEConfig  # noqa: E402


@dataclass
class Sizes:
    unet: UNetConfig
    clip: CLIPConfig
    vae: VAEConfig
    resolution: int          # image side in pixels; latents are resolution // 8
    sample_dtype: torch.dtype
    n_images: int            # images per sampling run
    ddim_steps: int
    compile_backend: str     # torch.compile's backend


FULL = Sizes(UNetConfig(), CLIPConfig(), VAEConfig(), 512, torch.float16, 8, 50, "inductor")
# The smoke run checks the code paths, not speed: tiny models, fp32 sampling (fp16 kernels are patchy on CPUs) and
# torch.compile with the "eager" backend (Dynamo traces the model; compiling C++ kernels would take minutes).
SMOKE = Sizes(UNetConfig.tiny(), CLIPConfig.tiny(), VAEConfig.tiny(), 64, torch.float32, 2, 2, "eager")

# Training rows: (trainer, torch.compile, gradient checkpointing, train the text encoder too, in the smoke run).
# The smoke run keeps one compiled row per table, ours: compiling is its slow part and the rest repeats code paths.
TRAIN_ROWS = [
    ("ours", False, True, False, True), ("ours", False, False, False, True), ("ours", True, True, False, True),
    ("ours", True, False, False, False), ("ours", False, True, True, True),
    ("diffusers", False, True, False, True), ("diffusers", False, False, False, True),
    ("diffusers", True, False, False, False), ("diffusers", False, True, True, True),
]
SAMPLE_ROWS = [("ours", False, True), ("ours", True, True), ("diffusers", False, True), ("diffusers", True, False)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Training steps/s, peak memory and sampling time, ours and diffusers'.")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    p.add_argument("--steps", type=int, help="timed training steps per row (default 20, smoke 2)")
    p.add_argument("--warmup", type=int, help="untimed training steps first, compilation included (default 3, smoke 1)")
    p.add_argument("--repeats", type=int, help="timed sampling runs per row, after one warm-up (default 3, smoke 1)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = p.parse_args(argv)
    args.cpu_smoke = args.cpu_smoke or not torch.cuda.is_available()
    for name, full, smoke in (("steps", 20, 2), ("warmup", 3, 1), ("repeats", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.cpu_smoke else full)
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---- training ------------------------------------------------------------------------------------------------------

def ours_step(sizes, device, compiled, checkpointing, train_text_encoder):
    """train.py's step, set up as its main() sets it up (cached latents, fused AdamW stepped inside backward)."""
    unet = random_model(UNetModel, sizes.unet, device, seed=0).train()
    unet.set_grad_checkpointing(checkpointing)
    trained = {"unet": unet}
    if train_text_encoder:
        trained["text_encoder"] = random_model(CLIPTextModel, sizes.clip, device, seed=1).train()
    model = torch.compile(unet, backend=sizes.compile_backend) if compiled else unet
    stepper = train.StepInBackward(train.blocks(trained), lambda group: torch.optim.AdamW(group, lr=1e-6, fused=True))
    inputs = step_inputs(sizes, device)
    alphas_cumprod = sd_alphas_cumprod().to(device)
    pending = []

    def step():
        latents, t, noise, context = sample_batch(inputs, device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if train_text_encoder:
                context = trained["text_encoder"](inputs["ids"])[inputs["which_prompt"]]
            loss, loss_instance, loss_prior = train.dreambooth_loss(model, latents, context, noise, t, alphas_cumprod,
                                                                    1, 1.0)
        loss.backward()  # the weights are updated during this call
        stepper.check()
        pending.append(torch.stack([loss, loss_instance, loss_prior]).detach())  # read every N steps: no sync

    return step


def diffusers_step(sizes, device, compiled, checkpointing, train_text_encoder):
    """diffusers' train_dreambooth.py step with the same weights: DDPMScheduler.add_noise, UNet2DConditionModel,
    MSE per half, then torch's fused AdamW after backward."""
    import diffusers

    unet = same_weights.reference_unet(random_model(UNetModel, sizes.unet, device, seed=0)).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    params = list(unet.parameters())
    if train_text_encoder:
        text_encoder = same_weights.reference_clip(random_model(CLIPTextModel, sizes.clip, device, seed=1)).train()
        params += list(text_encoder.parameters())
    free_memory(device)  # our copies, from which the references were loaded, are gone
    model = torch.compile(unet, backend=sizes.compile_backend) if compiled else unet
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear")
    inputs = step_inputs(sizes, device)

    def step():
        latents, t, noise, context = sample_batch(inputs, device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if train_text_encoder:
                context = text_encoder(inputs["ids"]).last_hidden_state[inputs["which_prompt"]]
            pred = model(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
        pred, prior_pred = pred.float().chunk(2)
        target, prior_target = noise.float().chunk(2)
        loss = F.mse_loss(pred, target) + 1.0 * F.mse_loss(prior_pred, prior_target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_inputs(sizes, device) -> dict:
    """What train.py caches before its loop, for 1 subject and 1 prior image: VAE posteriors (mean, logvar) of each
    image and its mirror image, the CLIP contexts of the two prompts, and their token ids."""
    g = torch.Generator().manual_seed(0)
    side = sizes.resolution // 8
    posteriors = torch.randn(2, 2, 8, side, side, generator=g)
    posteriors[:, :, 4:] = posteriors[:, :, 4:] - 8  # logvar around -8: posterior sigmas ~0.02, like a real VAE
    return dict(posteriors=posteriors.to(device),
                contexts=torch.randn(2, 77, sizes.unet.context_dim, generator=g).to(device),
                ids=Tokenizer()(["photo of a sks dog", "photo of a dog"]).to(device),
                which_prompt=torch.tensor([0, 1], device=device),
                generator=torch.Generator(device).manual_seed(0))


def sample_batch(inputs, device):
    """train.py's per-step draws: one image of each kind, flips, z from the cached posterior, timesteps, noise."""
    g = inputs["generator"]
    idx = torch.cat([torch.randint(1, (1,), generator=g, device=device),
                     1 + torch.randint(1, (1,), generator=g, device=device)])
    flip = torch.randint(2, idx.shape, generator=g, device=device)
    latents = train.sample_latents(inputs["posteriors"][idx, flip], g)
    t = torch.randint(1000, (len(idx),), generator=g, device=device)
    noise = torch.randn(latents.shape, generator=g, device=device)
    return latents, t, noise, inputs["contexts"][inputs["which_prompt"]]


def time_training(make_step, args, sizes, device, **row) -> tuple[float, float | None]:
    """(steps per second, peak GiB or None on the CPU) over args.steps steps after args.warmup steps."""
    free_memory(device)
    step = make_step(sizes, device, **row)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak from here on counts the weights already in place
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

def random_sd(sizes, device) -> StableDiffusion:
    sd = StableDiffusion(Tokenizer(), random_model(CLIPTextModel, sizes.clip, device, seed=1).eval(),
                         random_model(UNetModel, sizes.unet, device, seed=0).eval(),
                         random_model(AutoencoderKL, sizes.vae, device, seed=2).eval(), sd_alphas_cumprod(),
                         name="random", resolution=sizes.resolution)
    return sd.to(device, sizes.sample_dtype)


def time_sampling(trainer, compiled, args, sizes, device) -> float:
    """Median seconds of one run: prompts -> n_images PIL images."""
    free_memory(device)
    sd = random_sd(sizes, device)
    n, size = sizes.n_images, sizes.resolution
    prompts, seeds = [f"photo of a sks dog, picture {k}" for k in range(n)], list(range(n))
    if trainer == "ours":
        if compiled:
            sd.unet = torch.compile(sd.unet, backend=sizes.compile_backend)

        def run():  # the VAE decodes the whole batch at once, as the pipeline does
            generate(sd, prompts, seeds, steps=sizes.ddim_steps, scale=7.5, slice_size=n, progress=False)
    else:
        pipe = same_weights.reference_pipeline(sd)
        del sd
        free_memory(device)
        if compiled:
            pipe.unet = torch.compile(pipe.unet, backend=sizes.compile_backend)
        # generate() draws image k's starting noise from torch.Generator().manual_seed(seeds[k]); so does this.
        latents = torch.stack([torch.randn(4, size // 8, size // 8, generator=torch.Generator().manual_seed(s))
                               for s in seeds]).to(device, sizes.sample_dtype)

        def run():
            pipe(prompts, height=size, width=size, num_inference_steps=sizes.ddim_steps, guidance_scale=7.5,
                 latents=latents)
    times = []
    for _ in range(1 + args.repeats):  # the first run warms up (and compiles)
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
    missing = reference_missing()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU smoke run (tiny models, no benchmark)"
    versions = f"torch {torch.__version__}" + ("" if missing else f", diffusers {__import__('diffusers').__version__}")
    print(f"GPU benchmark, {datetime.now():%Y-%m-%d %H:%M}: {name}; {versions}")
    side = sizes.resolution // 8
    print(f"\nTraining step: {sizes.resolution} px (latents [2, 4, {side}, {side}]), batch 1 instance + 1 prior, "
          f"cached latents, bf16 autocast, fp32 weights and AdamW; {args.steps} steps timed after {args.warmup}")
    print(f"{'trainer':10} {'mode':9} {'checkpointing':14} {'text encoder':13} {'steps/s':>8} {'peak GiB':>9}")
    for trainer, compiled, checkpointing, text_encoder, in_smoke in TRAIN_ROWS:
        label = (f"{trainer:10} {'compiled' if compiled else 'eager':9} {'on' if checkpointing else 'off':14} "
                 f"{'trained' if text_encoder else 'frozen':13}")
        if (compiled and args.no_compile) or (args.cpu_smoke and not in_smoke):
            continue
        if trainer == "diffusers" and missing:
            print(f"{label} {missing}")
            continue
        steps_per_s, peak = time_training(ours_step if trainer == "ours" else diffusers_step, args, sizes, device,
                                          compiled=compiled, checkpointing=checkpointing,
                                          train_text_encoder=text_encoder)
        print(f"{label} {steps_per_s:8.2f} {'-' if peak is None else f'{peak:.2f}':>9}", flush=True)

    print(f"\nSampling: {sizes.n_images} images x {sizes.ddim_steps} DDIM steps, CFG 7.5, {sizes.resolution} px, "
          f"{str(sizes.sample_dtype).removeprefix('torch.')} weights, VAE decoding the whole batch; median of "
          f"{args.repeats} runs after 1 warm-up")
    print(f"{'sampler':10} {'mode':9} {'seconds':>8}")
    for trainer, compiled, in_smoke in SAMPLE_ROWS:
        label = f"{trainer:10} {'compiled' if compiled else 'eager':9}"
        if (compiled and args.no_compile) or (args.cpu_smoke and not in_smoke):
            continue
        if trainer == "diffusers" and missing:
            print(f"{label} {missing}")
            continue
        print(f"{label} {time_sampling(trainer, compiled, args, sizes, device):8.2f}", flush=True)


if __name__ == "__main__":
    main()
