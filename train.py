"""Fine-tune Stable Diffusion v1 on a few photos of one subject: DreamBooth (Ruiz et al. 2022,
https://arxiv.org/abs/2208.12242).

    python make_prior.py --class dog --outdir prior/dog
    python train.py --instance examples/dog --prior prior/dog --class dog
    python sample.py --ckpt runs/dog-<date>/model.safetensors --prompt "a sks dog in the snow"

The idea: teach the model that a rare token ("sks") means this subject by fine-tuning the UNet on
"photo of a sks dog" with the subject's photos. Alone, that makes every dog look like the subject
("language drift"), so each step also trains on images the model itself made of "photo of a dog"
(the prior, written by make_prior.py): the class keeps its old meaning. This is the paper's eq. 2,
with the noise prediction of Stable Diffusion:

    L = || eps_theta(x_t, t, c_instance) - eps ||^2  +  lambda * || eps_theta(x'_t', t', c_prior) - eps' ||^2

x_t noises the VAE latent of a subject photo and x'_t' that of a prior image (DDPM eq. 4, see
`dreambooth.ddim.add_noise`); lambda is --prior-weight. The file reads top to bottom: settings,
the loss and the helpers of one step, then main(): setup, data, models, optimizer, the loop, saving.
"""
import argparse
import functools
import json
import math
import os
import random
import signal
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import dreambooth
from dreambooth.checkpoint import default_checkpoint
from dreambooth.ddim import add_noise
from dreambooth.generate import generate
from dreambooth.images import a1111_parameters, image_grid, list_images, load_image, save_png
from dreambooth.vae import LATENT_SCALE

# ----------------------------------------------------------------------------------------------------------------------
# Settings. Defaults follow the seed (the original DreamBooth fine-tuning of sd-v1-4): lr 1e-6, 800 steps, batch 1 + 1.


def parse_args(argv=None):
    """Returns (args, train_state or None). With --resume DIR, the run's saved settings become the defaults, so
    `--resume DIR` alone continues it; flags given again (e.g. a larger --steps) override them."""
    p = argparse.ArgumentParser(description="DreamBooth fine-tuning of Stable Diffusion v1.")
    p.add_argument("--instance", metavar="DIR", help="photos of the subject (3-5 are enough)")
    p.add_argument("--prior", metavar="DIR", help="class images from make_prior.py; without it, plain fine-tuning")
    p.add_argument("--class", dest="class_name", metavar="NAME", help='what the subject is, e.g. "dog"')
    p.add_argument("--token", default="sks", help="the rare token that comes to mean the subject")
    p.add_argument("--instance-prompt", help='default "photo of a {token} {class}"')
    p.add_argument("--prior-prompt", help="default: the prompt in the prior folder's manifest.jsonl, "
                                          'else "photo of a {class}"')
    p.add_argument("--ckpt", help="SD v1 .ckpt/.safetensors; default weights/sd-v1-4.*, else the built-in tiny model")
    p.add_argument("--ema", action="store_true", help="start from the EMA weights stored in the checkpoint")
    p.add_argument("--resolution", type=int, help="image size, a multiple of 8; default the model's (512, tiny 64)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=1, help="subject images per step, plus as many prior images")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up over N steps")
    p.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this; 0 = off")
    p.add_argument("--prior-weight", type=float, default=1.0, help="lambda of eq. 2: weight of the prior loss")
    p.add_argument("--train-text-encoder", action="store_true", help="fine-tune the CLIP text encoder too")
    p.add_argument("--seed", type=int, default=42, help="seed of all randomness: data order, flips, noise, t")
    p.add_argument("--device", help="default cuda if available, else cpu")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="autocast dtype; weights stay fp32. "
                                                                         "Default bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute UNet activations in backward to save memory; default on for CUDA")
    p.add_argument("--no-cache", action="store_true", help="encode the images with the VAE every step")
    p.add_argument("--no-step-in-backward", action="store_true",
                   help="plain optimizer loop instead of stepping each weight as soon as its gradient is ready")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--out", metavar="DIR", help="run folder; default runs/<class>-<date>")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly where it stopped")
    p.add_argument("--sample-every", type=int, default=200, help="write a preview grid every N steps; 0 = off")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the preview grids")
    p.add_argument("--save-every", type=int, default=400, help="save every N steps (and at the end); 0 = at the end")
    p.add_argument("--log-every", type=int, default=10, help="log the losses every N steps")
    args = p.parse_args(argv)
    state = None
    if args.resume:
        path = Path(args.resume) / "train_state.pt"
        if not path.is_file():
            p.error(f"--resume {args.resume}: no train_state.pt in it")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        p.set_defaults(**state["args"])
        args = p.parse_args(argv)
        args.out = args.resume
    if not args.instance:
        p.error("--instance DIR is required")
    if not args.class_name and not (args.instance_prompt and args.prior_prompt):
        p.error("--class NAME is required unless both --instance-prompt and --prior-prompt are given")
    for flag in ("steps", "batch_size", "log_every", "sample_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    for flag in ("lr", "warmup_steps", "clip_grad", "prior_weight", "sample_every", "save_every"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must not be negative")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if args.ckpt not in (None, "tiny") and not Path(args.ckpt).is_file():
        p.error(f"--ckpt {args.ckpt}: no such file")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        p.error(f"--resolution {args.resolution}: must be a positive multiple of 8 (the VAE downsamples by 8)")
    return args, state


def resolve_defaults(args):
    """Fill in the defaults that depend on the machine, the files or the time, so train_state.pt records them."""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.grad_checkpointing = cuda if args.grad_checkpointing is None else args.grad_checkpointing
    args.ckpt = args.ckpt or default_checkpoint("train.py")
    args.instance_prompt = args.instance_prompt or f"photo of a {args.token} {args.class_name}"
    if not args.prior_prompt:
        manifest = Path(args.prior or "", "manifest.jsonl")
        lines = manifest.read_text().splitlines() if args.prior and manifest.is_file() else []
        args.prior_prompt = json.loads(lines[0]).get("prompt") if lines else None
        args.prior_prompt = args.prior_prompt or f"photo of a {args.class_name}"
    args.out = args.out or f"runs/{args.class_name or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"


# ----------------------------------------------------------------------------------------------------------------------
# One training step


def dreambooth_loss(unet, latents, context, noise, t, alphas_cumprod, n_instance, prior_weight):
    """DreamBooth eq. 2 on one batch: the first n_instance rows are subject images, the rest prior images.

    Each latent x0 is noised to its timestep t (DDPM eq. 4), the UNet predicts the noise, and the loss is the
    mean squared error of that prediction, per half: MSE(instance) + prior_weight * MSE(prior).
    Returns (loss, loss_instance, loss_prior); loss_prior is 0 without prior images.
    """
    x_t = add_noise(latents, noise, t, alphas_cumprod)
    eps = unet(x_t, t, context).float()
    loss_instance = F.mse_loss(eps[:n_instance], noise[:n_instance])
    loss_prior = F.mse_loss(eps[n_instance:], noise[n_instance:]) if len(eps) > n_instance else eps.new_zeros(())
    return loss_instance + prior_weight * loss_prior, loss_instance, loss_prior


@torch.no_grad()
def encode_posteriors(vae, images, device, chunk=4):
    """The VAE posterior q(z|x) = N(mean, exp(logvar)) of each image and of its mirror image, computed once.
    images [N, 3, R, R] in [-1, 1] -> [N, 2 (flip), 8 (mean, logvar), R/8, R/8]."""
    out = []
    for x in images.split(chunk):
        x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1).to(device)  # (2n, 3, R, R): image, mirror, ...
        out.append(torch.cat(vae.encode(x), dim=1).unflatten(0, (-1, 2)))
    return torch.cat(out)


def sample_latents(posterior, generator):
    """z ~ N(mean, exp(logvar)), scaled to the UNet's latent range. posterior [B, 8, h, w] -> [B, 4, h, w]."""
    mean, logvar = posterior.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device)
    return (mean + torch.exp(0.5 * logvar) * noise) * LATENT_SCALE


def blocks(modules):
    """The trained parameters grouped by block, the unit the optimizer steps inside backward: input_blocks.3,
    middle_block.1, output_blocks.11, time_embed.0 of the UNet; embeddings, encoder.layers.5 of CLIP."""
    groups = {}
    for module_name, module in modules.items():
        for name, param in module.named_parameters():
            parts = name.split(".")
            depth = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), 1)  # up to the first index
            groups.setdefault((module_name, *parts[:depth]), []).append(param)
    return list(groups.values())


class StepInBackward:
    """AdamW stepped inside backward: each block has its own AdamW, and a hook on each parameter counts the
    gradients backward has finished (PyTorch calls it once the gradient is accumulated). When the last one of
    a block is in, that block's AdamW steps and frees its gradients. So only a few blocks' gradients exist at
    any time instead of a full copy of the weights (3.4 GB for the SD UNet in fp32), and the weights come out
    the same as stepping after backward, because AdamW updates each parameter from its own gradient alone.
    Not exact with gradient clipping (it needs the global norm first) or with fp16's GradScaler (it may skip
    the whole step), so those use the plain loop."""

    def __init__(self, groups, make_optimizer):
        self.optimizers = [make_optimizer(group) for group in groups]
        self.sizes = [len(group) for group in groups]
        self.waiting = list(self.sizes)
        for i, group in enumerate(groups):
            for param in group:
                param.register_post_accumulate_grad_hook(functools.partial(self.gradient_ready, i))

    def gradient_ready(self, i, param):
        self.waiting[i] -= 1
        if self.waiting[i] == 0:
            self.optimizers[i].step()
            self.optimizers[i].zero_grad(set_to_none=True)
            self.waiting[i] = self.sizes[i]

    def check(self):
        """After backward: every block has stepped (a parameter that got no gradient would hold its block back)."""
        if self.waiting != self.sizes:
            raise RuntimeError("some trained parameters got no gradient; train with --no-step-in-backward")


@torch.no_grad()
def preview(sd, prompts, seeds, args, path, autocast):
    """A row of images from fixed seeds: the subject should appear in the edits while the last image, from the
    prior prompt, should keep showing the class in general (if it turns into the subject, the class drifts)."""
    sd.text_encoder.to(sd.device)
    sd.vae.to(sd.device)
    sd.unet.eval()
    with autocast:
        images = generate(sd, prompts, seeds, steps=args.sample_steps, height=args.resolution,
                          width=args.resolution, progress=False)
    sd.unet.train()
    if not args.no_cache:
        sd.vae.to("cpu")
    if not args.train_text_encoder:
        sd.text_encoder.to("cpu")
    path.parent.mkdir(exist_ok=True)
    parameters = a1111_parameters(prompts[0], "", args.sample_steps, 7.5, seeds[0], args.resolution, args.resolution,
                                  Path(sd.name).stem)  # a grid is labelled by its first image, as A1111 does
    save_png(image_grid(images, cols=len(images)), path, parameters)


# ----------------------------------------------------------------------------------------------------------------------
# Saving and resuming. model.safetensors is the fp16 model for users (sample.py, A1111, ComfyUI, diffusers).
# train_state.pt holds everything else needed to continue exactly: the fp32 weights being trained (continuing from
# the fp16 copy would round them), the optimizer states, the step, every RNG state and the settings.


def rng_state(generator):
    numpy_state = list(np.random.get_state())
    numpy_state[1] = torch.from_numpy(numpy_state[1].astype(np.int64))  # so that torch.load(weights_only=True) works
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
            else [], "python": random.getstate(), "numpy": numpy_state, "data": generator.get_state()}


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    generator.set_state(state["data"])


def save_checkpoint(out, sd, trained, optimizers, scaler, step, args, generator):
    dreambooth.save(sd, out / "model.safetensors")  # fp16, original CompVis key layout; atomic
    state = {"step": step, "args": vars(args), "weights": {name: m.state_dict() for name, m in trained.items()},
             "optimizers": [o.state_dict() for o in optimizers], "scaler": scaler.state_dict(),
             "rng": rng_state(generator)}
    torch.save(state, out / "train_state.pt.tmp")
    os.replace(out / "train_state.pt.tmp", out / "train_state.pt")


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args, state = parse_args(argv)
    resolve_defaults(args)
    out, device = Path(args.out), torch.device(args.device)
    if not args.resume and out.exists() and any(out.iterdir()):
        raise SystemExit(f"train.py: error: --out {out} exists and is not empty; "
                         "choose another folder, or continue that run with --resume")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    generator = torch.Generator(device).manual_seed(args.seed)  # data order, flips, timesteps, noise

    # Data and model. The folders are checked before the model loads, so mistakes show in seconds; bad input
    # (a folder, an image, a checkpoint) stops the run with one line naming it.
    if not args.prior:
        print("warning: no --prior: plain fine-tuning without prior preservation; the class may drift to the subject")
    try:
        instance_paths = list_images(args.instance)
        prior_paths = list_images(args.prior) if args.prior else []
        if args.prior and len(prior_paths) < len(instance_paths):
            raise ValueError(f"--prior {args.prior} has {len(prior_paths)} images, fewer than the {len(instance_paths)}"
                             f" in --instance; make more with: python make_prior.py --class {args.class_name} "
                             f"--outdir {args.prior}")
        sd = dreambooth.load(args.ckpt, device=device, dtype=torch.float32, ema=args.ema)  # fp32 master weights
        args.resolution = args.resolution or sd.resolution
        images = torch.stack([load_image(p, args.resolution) for p in instance_paths + prior_paths])
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    trained = {"unet": sd.unet} | ({"text_encoder": sd.text_encoder} if args.train_text_encoder else {})
    if state:
        for name, module in trained.items():
            module.load_state_dict(state["weights"][name])
    sd.vae.requires_grad_(False).eval()
    sd.text_encoder.requires_grad_(args.train_text_encoder).train(args.train_text_encoder)
    sd.unet.train()
    sd.unet.set_grad_checkpointing(args.grad_checkpointing)
    unet = torch.compile(sd.unet) if args.compile else sd.unet
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32")

    # Images -> VAE posteriors and prompts -> CLIP contexts, once; then the VAE and a frozen text encoder leave
    # the GPU. Rows are the subject's images, then the prior's.
    n_inst, n_prior, batch = len(instance_paths), len(prior_paths), args.batch_size
    ids = sd.tokenizer([args.instance_prompt, args.prior_prompt]).to(device)
    which_prompt = torch.tensor([0] * batch + [1] * (batch if n_prior else 0), device=device)
    if args.no_cache:
        images = images.to(device)
    else:
        posteriors = encode_posteriors(sd.vae, images, device)
        del images
        sd.vae.to("cpu")
    if not args.train_text_encoder:
        with torch.no_grad():
            contexts = sd.text_encoder(ids)
        sd.text_encoder.to("cpu")

    # Optimizer: torch's AdamW (weight decay 0.01, its default, as in the seed), fused: one kernel per update, on
    # CUDA and on the CPU (4x faster there than the loop). Stepped inside backward where that is exact (see
    # StepInBackward), else one optimizer stepped after backward.
    params = [p for m in trained.values() for p in m.parameters()]
    in_backward = not (args.no_step_in_backward or args.clip_grad or args.precision == "fp16")
    if in_backward:
        stepper = StepInBackward(blocks(trained), lambda group: torch.optim.AdamW(group, lr=args.lr, fused=True))
        optimizers = stepper.optimizers
    else:
        optimizers = [torch.optim.AdamW(params, lr=args.lr, fused=True)]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    start = 0
    if state:
        if len(state["optimizers"]) != len(optimizers):  # one AdamW per block, or one for all
            raise SystemExit(f"train.py: error: --resume {args.resume}: keep its --precision, --clip-grad and "
                             "--no-step-in-backward, which decide whether the optimizer steps inside backward")
        for o, s in zip(optimizers, state["optimizers"]):
            o.load_state_dict(s)
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], generator)
        start = state["step"]
        del state
    if start >= args.steps:
        print(f"{out} is already at step {start} of --steps {args.steps}; give a larger --steps to continue")
        return

    def lr_at(step):  # linear warm-up, then constant as in the seed
        return args.lr * min(1.0, step / args.warmup_steps) if args.warmup_steps else args.lr

    out.mkdir(parents=True, exist_ok=True)
    subject = f"{args.token} {args.class_name}" if args.class_name else args.instance_prompt
    sample_prompts = [args.instance_prompt, f"a {subject} in the snow", f"a {subject} on the beach",
                      f"a painting of a {subject}", args.prior_prompt]
    sample_seeds = [args.seed + k for k in range(len(sample_prompts))]
    print(f"training {sum(p.numel() for p in params) / 1e6:.1f}M parameters of {args.ckpt} on {device}, "
          f"{args.precision}, {n_inst} subject + {n_prior} prior images at {args.resolution} px; "
          f"optimizer {'stepped in backward' if in_backward else 'after backward'}; run folder {out}")

    # The loop. Losses stay on the device and are read every --log-every steps: no host-device sync per step.
    log = open(out / "log.jsonl", "a")
    pending, saved_step, t0 = [], start or None, time.time()
    stop = []  # Ctrl-C asks to stop; the loop finishes its step first, so the saved state is a whole step

    def on_ctrl_c(signum, frame):
        stop.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    bar = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True)

    def diverged(what):
        last = f"the last good checkpoint (step {saved_step}) is in {out}" if saved_step else "nothing was saved"
        return SystemExit(f"train.py: error: {what}; stopped, {last}. Try a lower --lr or --precision fp32")

    def flush(step):
        """Check and log the losses since the last flush. A non-finite loss stops the run before anything is saved."""
        values = torch.stack(pending).tolist()
        for k, (loss, *_) in enumerate(values):
            if not math.isfinite(loss):
                raise diverged(f"loss is {loss} at step {step - len(values) + k + 1}")
        loss, loss_instance, loss_prior = (sum(column) / len(values) for column in zip(*values))
        log.write(json.dumps({"step": step, "loss": loss, "loss_instance": loss_instance, "loss_prior": loss_prior,
                              "lr": lr_at(step), "time": round(time.time() - t0, 3)}) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{loss:.4f}")
        pending.clear()

    try:
        for step in range(start + 1, args.steps + 1):
            for o in optimizers:
                for group in o.param_groups:
                    group["lr"] = lr_at(step)
            idx = torch.randint(n_inst, (batch,), generator=generator, device=device)
            if n_prior:
                prior_idx = torch.randint(n_prior, (batch,), generator=generator, device=device)
                idx = torch.cat([idx, n_inst + prior_idx])
            flip = torch.randint(2, idx.shape, generator=generator, device=device)  # horizontal flip, p = 0.5
            if args.no_cache:
                x = torch.where(flip.view(-1, 1, 1, 1).bool(), images[idx].flip(-1), images[idx])
                with torch.no_grad():
                    latents = sample_latents(torch.cat(sd.vae.encode(x), dim=1), generator)
            else:
                latents = sample_latents(posteriors[idx, flip], generator)
            t = torch.randint(len(sd.alphas_cumprod), (len(idx),), generator=generator, device=device)
            noise = torch.randn(latents.shape, generator=generator, device=device)
            with autocast:
                context = (sd.text_encoder(ids) if args.train_text_encoder else contexts)[which_prompt]
                loss, loss_instance, loss_prior = dreambooth_loss(unet, latents, context, noise, t, sd.alphas_cumprod,
                                                                  batch, args.prior_weight)
            scaler.scale(loss).backward()  # with in_backward, the weights are updated during this call
            if in_backward:
                stepper.check()
            else:
                if args.clip_grad:
                    scaler.unscale_(optimizers[0])
                    torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
                scaler.step(optimizers[0])
                scaler.update()
                optimizers[0].zero_grad(set_to_none=True)
            pending.append(torch.stack([loss, loss_instance, loss_prior]).detach())
            bar.update()

            sample_now = args.sample_every and (step % args.sample_every == 0 or step == args.steps)
            save_now = (args.save_every and step % args.save_every == 0) or step == args.steps or stop
            if step % args.log_every == 0 or sample_now or save_now:
                flush(step)
            if sample_now:
                preview(sd, sample_prompts, sample_seeds, args, out / "samples" / f"step-{step:05d}.png", autocast)
            if save_now:
                if not all(p.isfinite().all() for p in params):
                    raise diverged(f"the weights are not finite after step {step}")
                save_checkpoint(out, sd, trained, optimizers, scaler, step, args, generator)
                saved_step = step
            if stop:
                print(f"\ninterrupted: saved step {step} in {out}; continue with: python train.py --resume {out}")
                return
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        log.close()

    seconds = time.time() - t0
    memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"done: {args.steps - start} steps in {seconds:.0f} s ({(args.steps - start) / seconds:.2f} steps/s{memory})")
    print(f"model: {out / 'model.safetensors'}  (python sample.py --ckpt {out / 'model.safetensors'} "
          f"--prompt \"{sample_prompts[1]}\")")
    print(f"log: {out / 'log.jsonl'}, previews: {out / 'samples'}, train state for --resume: {out / 'train_state.pt'}")


if __name__ == "__main__":
    main()
