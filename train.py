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
`dreambooth.ddim.add_noise`); lambda is --prior-weight. The file reads top to bottom: one training step
(the loss, what a step draws, the step as a call, replayed from a CUDA graph on a GPU); previews and
saving; setup; then main() and the loop. The settings (flags, their defaults, --resume's) are in
train_settings.py; the optimizer and the CUDA graph in dreambooth/speed.py.
"""
import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its threads: README, "Two jobs on one CPU"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import SafetensorError  # noqa: E402

import cli  # noqa: E402
import dreambooth  # noqa: E402
from dreambooth import speed  # noqa: E402
from dreambooth.data import Photos, encode_posteriors  # noqa: E402
from dreambooth.ddim import add_noise  # noqa: E402
from dreambooth.files import replace_all, why_write_failed, write_atomic  # noqa: E402
from dreambooth.generate import generate  # noqa: E402
from dreambooth.images import (a1111_parameters, image_grid, list_images, load_images, save_png,  # noqa: E402
                               skipped_images)
from dreambooth.lora import LoRA, kohya_metadata, save_lora  # noqa: E402
from dreambooth.runlog import Log, Stopped  # noqa: E402
from dreambooth.torchfile import first_line  # noqa: E402
from train_settings import claim_run_folder, manifest_prompts, parse_args, resolve_defaults  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# One training step: the loss, what a step draws, and the step itself.


def dreambooth_loss(unet, x_t, t, context, target, n_instance, prior_weight):
    """DreamBooth eq. 2 on one noised batch x_t: the first n_instance rows are subject images, the rest prior images.

    The UNet predicts the noise in each row, and the loss is the mean squared error against the target, per half:
    MSE(instance) + prior_weight * MSE(prior). The target is the noise that made x_t (DDPM eq. 4, the paper's loss);
    with --prior-loss base the prior rows' target is the base model's prediction instead (base_prior_targets).
    Returns (loss, loss_instance, loss_prior); loss_prior is 0 without prior images.
    """
    eps = unet(x_t, t, context).float()
    loss_instance = F.mse_loss(eps[:n_instance], target[:n_instance])
    loss_prior = F.mse_loss(eps[n_instance:], target[n_instance:]) if len(eps) > n_instance else eps.new_zeros(())
    return loss_instance + prior_weight * loss_prior, loss_instance, loss_prior


@torch.no_grad()
def base_prior_targets(base_unet, base_contexts, x_t, t, rows, noise, n_instance, uncond_row):
    """--prior-loss base: keep the class as the base model draws it, guidance included.

    Classifier-free guidance extrapolates from the unconditional prediction (the empty prompt) toward the prompt's,
    so a class keeps its pictures only if both predictions keep their difference. The paper's prior loss fits the
    class prompt to the noise of a few hundred sampled images, which moves it by itself, and leaves the empty prompt,
    whose context lies as near "a sks dog" as "a dog" does, free to follow the subject. Here each prior row comes
    twice, with its prompt and with the empty one, and the target of both is what the frozen base UNet predicts for
    them: the prior keeps the base model's function itself, not a sample of it (as "Learning without Forgetting",
    Li & Hoiem 2016, keeps a network's old outputs). The subject's rows keep the noise as their target.
    Returns (x_t, t, rows, target) of the longer batch: n_instance + 2 x the prior rows."""
    prior = slice(n_instance, None)
    x_t, t = torch.cat([x_t, x_t[prior]]), torch.cat([t, t[prior]])
    rows = torch.cat([rows, torch.full_like(rows[prior], uncond_row)])
    base_eps = base_unet(x_t[prior], t[prior], base_contexts[rows[prior]]).float()
    return x_t, t, rows, torch.cat([noise[:n_instance], base_eps])


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # --precision


def autocast(args):
    """The --precision of the networks: bf16/fp16 autocast keeps the fp32 weights and casts them where it pays.
    Without its cache of those casts: a CUDA graph cannot keep it, and each weight is used once per forward anyway."""
    return torch.autocast(torch.device(args.device).type, dtype=PRECISIONS[args.precision],
                          enabled=args.precision != "fp32", cache_enabled=False)


@dataclass
class TrainStep:
    """One DreamBooth step as a call: step(generator) draws a batch from the run's generator, computes eq. 2, runs
    backward and updates the weights, and returns the losses [3] (eq. 2, instance, prior) on the device, unread.

    Its two halves are methods: photos.draw() is the random part, learn() the rest. With cuda_graph, learn() is
    recorded once as a CUDA graph after 3 eager steps and replayed from then on (speed.CUDAGraph says why); the
    draws stay outside the graph, so a replayed run trains on exactly what an eager run draws."""
    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None  # trained with the UNet; None: frozen, and `contexts` holds its output
    ids: torch.Tensor                     # [K, 77] token ids: the instance prompt, the prior's prompts (, "")
    contexts: torch.Tensor | None         # [K, 77, C] their contexts from the text encoder before training
    photos: Photos
    alphas_cumprod: torch.Tensor
    prior_weight: float                   # lambda of eq. 2
    optimizer: speed.AdamW
    autocast: torch.autocast
    base_unet: object = None              # --prior-loss base: the frozen base UNet (base_prior_targets)
    cuda_graph: bool = False

    def __post_init__(self):
        self.compute = speed.CUDAGraph(self.learn, 3, self.recording_failed) if self.cuda_graph else self.learn

    def learn(self, latents, t, noise, rows):
        """Eq. 2 on the drawn batch (rows: each photo's prompt), backward, and the weight update."""
        n_instance = self.photos.batch_size
        with self.autocast:
            contexts = self.text_encoder(self.ids) if self.text_encoder else self.contexts
            x_t, target = add_noise(latents, noise, t, self.alphas_cumprod), noise  # DDPM eq. 4
            if self.base_unet is not None and len(latents) > n_instance:
                x_t, t, rows, target = base_prior_targets(self.base_unet, self.contexts, x_t, t, rows, noise,
                                                          n_instance, uncond_row=len(self.ids) - 1)
            losses = dreambooth_loss(self.unet, x_t, t, contexts[rows], target, n_instance, self.prior_weight)
        self.optimizer.backward(losses[0])
        return torch.stack(losses).detach()

    def __call__(self, generator):
        return self.compute(*self.photos.draw(generator))

    def recording_failed(self, why):
        print(f"\nstep: recording the CUDA graph failed ({why}); the run goes on eagerly (--no-cuda-graph skips it)")
        self.optimizer.reset()  # the recorded backward did not run


def why_eager(args, device):
    """Why the step cannot be one CUDA graph here (a line), or None."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if not args.cuda_graph:
        return "--no-cuda-graph"
    if args.precision == "fp16":
        return "fp16's loss scaler checks the gradients on the host and may skip a step; bf16 runs as one CUDA graph"
    if args.clip_grad:
        return "--clip-grad is not recorded in the graph; without it the step runs as one CUDA graph"
    return None


def choose_grad_checkpointing(args, unet, params, images_per_step, after_backward, device):
    """Gradient checkpointing keeps only each UNet block's input in forward and recomputes the block in backward:
    a fraction of the activation memory, for more time per step. --grad-checkpointing / --no-grad-checkpointing
    decide; by default it is on only where the GPU could not hold the run without it.
    Returns (on, one line saying which and why)."""
    if args.grad_checkpointing is not None:
        return args.grad_checkpointing, f"gradient checkpointing {'on' if args.grad_checkpointing else 'off'} (asked)"
    if device.type != "cuda":
        return False, "gradient checkpointing off: memory is not the limit on a CPU (--grad-checkpointing turns it on)"
    need = speed.training_memory_gib(unet, params, images_per_step, args.resolution, args.precision == "fp32",
                                     after_backward)
    free = speed.free_gpu_memory_gib(device)
    on = need > 0.85 * free
    return on, (f"gradient checkpointing {'on' if on else 'off'}: without it the run needs about {need:.1f} GiB more "
                f"and {free:.1f} GiB of GPU memory are free (--{'no-' if on else ''}grad-checkpointing forces it)")


# ----------------------------------------------------------------------------------------------------------------------
# Previews, saving and resuming. model.safetensors is the fp16 model for users (sample.py, A1111, ComfyUI,
# diffusers). train_state.pt holds everything else needed to continue exactly: the fp32 weights being trained
# (continuing from the fp16 copy would round them), the optimizer states, the step, the data generator's state
# and the settings.


@torch.no_grad()
def preview(sd, prompts, seeds, args, path):
    """A row of images from fixed seeds: the subject should appear in the edits while the last image, from the
    prior prompt, should keep showing the class in general (if it turns into the subject, the class drifts)."""
    sd.text_encoder.to(sd.device)
    sd.vae.to(sd.device)
    sd.unet.eval()
    with autocast(args):
        images = generate(sd, prompts, seeds, steps=args.sample_steps, height=args.resolution,
                          width=args.resolution, scale=cli.default_scale(sd, 7.5), progress=False)  # SD's 7.5
    sd.unet.train()
    if not (args.no_cache and not args.vae):  # --no-cache encodes with the model's own VAE at every step
        sd.vae.to("cpu")
    if not args.train_text_encoder:
        sd.text_encoder.to("cpu")
    path.parent.mkdir(exist_ok=True)
    parameters = a1111_parameters(prompts[0], "", args.sample_steps, 7.5, seeds[0], args.resolution, args.resolution,
                                  Path(args.out).name, vae=args.vae and Path(args.vae).name)  # labelled by image 1
    save_png(image_grid(images, cols=len(images)), path, parameters)


# ----------------------------------------------------------------------------------------------------------------------
# Setup: the photos and the model, then the step as main() runs it (benchmarks/gpu.py sets it up the same way).


def load_model_and_photos(args, device):
    """Returns (sd, images [N, 3, R, R], n_instance, prior_prompts); rows are the subject's photos, then the prior's,
    each with its prompt (train_settings.manifest_prompts, else --prior-prompt).
    The folders are checked before the model loads, so mistakes show in seconds; bad input (a folder, an image, a
    checkpoint) stops the run with one line naming it."""
    if not args.prior:
        print("warning: no --prior: plain fine-tuning without prior preservation; the class may drift to the subject")
    try:
        instance_paths = list_images(args.instance)
        prior_paths = list_images(args.prior) if args.prior else []
        for path in skipped_images(args.instance) + (skipped_images(args.prior) if args.prior else []):
            print(f"note: {path}: skipped; photos are read as JPEG, PNG, WebP or BMP only")
        if args.prior and len(prior_paths) < len(instance_paths):
            raise ValueError(f"--prior {args.prior} has {len(prior_paths)} images, fewer than the {len(instance_paths)}"
                             f" in --instance; make more with: python make_prior.py --class {args.class_name} "
                             f"--outdir {args.prior}")
        sd = dreambooth.load(args.ckpt, device=device, dtype=torch.float32, ema=args.ema)  # fp32 master weights
        args.resolution = args.resolution or sd.resolution
        images, notes = load_images(instance_paths + prior_paths, args.resolution)
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    for note in notes:
        print(f"note: {note}")
    listed = manifest_prompts(args.prior)
    return sd, images, len(instance_paths), [listed.get(path.name, args.prior_prompt) for path in prior_paths]


def frozen_base(unet, lora, dtype):
    """The base UNet for --prior-loss base, frozen: with --lora the UNet itself with its adapters off (its weights are
    the base's), else a copy taken before training, held in the autocast dtype (the dtype its forward runs in)."""
    if lora is not None:
        return lora.off(unet)
    return copy.deepcopy(unet).requires_grad_(False).eval().to(dtype)


def make_step(sd, images, n_instance, prior_prompts, args, device):
    """Everything a step needs, made once: the VAE posteriors of the photos and the CLIP contexts of the prompts
    (then the VAE and a frozen text encoder leave the GPU), the UNet's memory layout and gradient checkpointing,
    the optimizer, and the step, recorded as one CUDA graph where it can be. Returns (step, optimizer, trained)."""
    if args.lora:  # only the adapters train; the base weights are frozen, held in fp16 on a GPU (no gradients anyway)
        trained = {"lora": LoRA(sd, args.lora, args.lora_alpha, args.train_text_encoder, args.seed).attach()}
        if device.type == "cuda" and args.precision != "fp32":
            sd.unet.half()
            sd.text_encoder.half()
    else:
        trained = {"unet": sd.unet} | ({"text_encoder": sd.text_encoder} if args.train_text_encoder else {})
    sd.vae.requires_grad_(False).eval()
    sd.unet.requires_grad_(not args.lora).train()
    sd.text_encoder.requires_grad_(args.train_text_encoder and not args.lora).train(args.train_text_encoder)
    base_prior = args.prior_loss == "base" and bool(prior_prompts)
    prompts = [args.instance_prompt, *dict.fromkeys(prior_prompts)]  # each prompt once: the rows of ids, contexts
    cli.note_long_prompts(sd.tokenizer, prompts)
    ids = sd.tokenizer(prompts + [""] * base_prior).to(device)  # --prior-loss base: the empty prompt last
    prior_rows = torch.tensor([prompts.index(p) for p in prior_prompts], dtype=torch.long, device=device)
    posteriors = contexts = None
    if args.no_cache:
        images = images.to(device)
    else:
        posteriors, images = encode_posteriors(sd.vae, images, device), None
        sd.vae.to("cpu")
    if not args.train_text_encoder or base_prior:  # the contexts before training: the base model's
        with torch.no_grad():
            contexts = sd.text_encoder(ids)
    if not args.train_text_encoder:
        sd.text_encoder.to("cpu")

    # channels_last (NHWC) is the layout cuDNN's convolutions work in; in the default NCHW layout, a fifth of the
    # step's GPU time went into converting to it and back. On the CPU it was slower, so there it stays NCHW.
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    sd.unet.to(memory_format=memory_format)
    params = [p for m in trained.values() for p in m.parameters()]
    images_per_step = args.batch_size * (1 + bool(prior_prompts) + base_prior)
    # made before the free GPU memory is measured, so the estimate below counts it
    base_unet = frozen_base(sd.unet, trained.get("lora"), PRECISIONS[args.precision]) if base_prior else None
    # Stepping inside backward saves a whole gradient buffer, which LoRA's small adapters do not need: one AdamW for
    # all of them launches less than one per adapter (toy model, CPU: 9.4 steps/s against 6.6).
    after_backward = args.lora or args.no_step_in_backward or args.clip_grad or args.precision == "fp16"
    checkpointing, why = choose_grad_checkpointing(args, sd.unet, params, images_per_step, after_backward, device)
    sd.unet.set_grad_checkpointing(checkpointing)
    eager = why_eager(args, device)
    if after_backward:
        optimizer = speed.AdamWAfterBackward(params, args.lr, device, args.clip_grad, args.precision == "fp16",
                                             capturable=not eager)
    else:
        optimizer = speed.AdamWInBackward(speed.blocks(trained), args.lr, device, capturable=not eager)
    photos = Photos(posteriors, images, sd.vae if args.no_cache else None, n_instance, prior_rows, args.batch_size,
                    sd.latent_scale, len(sd.alphas_cumprod), args.noise_offset, memory_format)
    step = TrainStep(sd.unet, sd.text_encoder if args.train_text_encoder else None, ids, contexts, photos,
                     sd.alphas_cumprod, args.prior_weight, optimizer, autocast(args), base_unet, cuda_graph=not eager)
    print(f"{why}\nstep: {f'eager ({eager})' if eager else 'one CUDA graph, recorded after 3 eager steps'}; "
          f"optimizer stepped {'after' if isinstance(optimizer, speed.AdamWAfterBackward) else 'inside'} backward")
    return step, optimizer, trained


# ----------------------------------------------------------------------------------------------------------------------
# main(): the run folder is this run's alone (train_settings.claim_run_folder), then setup, resume, the loop.

def main(argv=None):
    args, state = parse_args(argv)
    resolve_defaults(args)
    with claim_run_folder(args, state):
        setup_and_train(args, state)


def setup_and_train(args, state):
    out, device = Path(args.out), torch.device(args.device)
    generator = torch.Generator(device).manual_seed(args.seed)  # data order, flips, z, timesteps, noise
    sd, images, n_instance, prior_prompts = load_model_and_photos(args, device)
    cli.one_thread_for_small_models(sd, device)
    preview_sd = cli.with_vae(sd, args.vae, "train.py", device="cpu") if args.vae else sd  # the grids' decoder
    step, optimizer, trained = make_step(sd, images, n_instance, prior_prompts, args, device)
    start = resume(args, state, trained, optimizer, generator) if state else 0
    if start >= args.steps:
        print(f"{out} is already at step {start} of --steps {args.steps}; give a larger --steps to continue")
        return
    print(f"training {sum(p.numel() for m in trained.values() for p in m.parameters()) / 1e6:.1f}M parameters of "
          f"{args.ckpt} on {device}, {args.precision}, {n_instance} subject + {len(prior_prompts)} prior images at "
          f"{args.resolution} px; run folder {out}")
    log = Log(out, start, args.steps, device, state.get("log") if state else None, plain_lines=not cli.interactive())
    del state
    try:
        train(args, sd, preview_sd, step, optimizer, trained, generator, log)
    except Stopped as e:
        raise SystemExit(f"train.py: error: {e}") from None


def resume(args, state, trained, optimizer, generator):
    """The trained weights, the optimizer and the data generator where the run stopped; returns its step."""
    try:
        for name, weights in state["weights"].items():
            trained[name].load_state_dict(weights)
        generator.set_state(state["data_rng"])  # nothing else draws: the networks have no dropout
    except (KeyError, RuntimeError, TypeError) as e:
        raise SystemExit(f"train.py: error: --resume {args.resume}: train_state.pt does not fit this run "
                         f"({first_line(e)})") from None
    try:
        optimizer.load_state_dict(state)
    except ValueError as e:
        raise SystemExit(f"train.py: error: --resume {args.resume}: {e}; keep the run's --precision, --clip-grad "
                         "and --no-step-in-backward, which decide whether the optimizer steps inside backward")
    return state["step"]


def lr_at(step, args):
    """Linear warm-up over --warmup-steps, then constant as in the seed."""
    return args.lr * min(1.0, step / args.warmup_steps) if args.warmup_steps else args.lr


def save(out, sd, trained, optimizer, step, args, generator, log):
    """model.safetensors (fp16, the original CompVis key layout) or lora.safetensors, and train_state.pt, all of one
    step: each is written whole into the staging folder out/.saving, then all are renamed into place
    (files.replace_all). So a failed write (a full disk, said in one line) leaves the folder as the last good save
    left it, and a folder never holds a model of one step beside the train state of another."""
    state = {"step": step, "args": vars(args), "weights": {name: m.state_dict() for name, m in trained.items()},
             **optimizer.state_dict(), "data_rng": generator.get_state(), "log": log.state()}
    staging = out / ".saving"
    try:
        shutil.rmtree(staging, ignore_errors=True)  # what a run killed while saving left
        staging.mkdir()
        if not args.lora:
            dreambooth.save(sd, staging / "model.safetensors")
        else:
            comment = (f"DreamBooth: {args.instance_prompt!r}, prior {args.prior_prompt!r}"
                       f"{'' if args.prior else ' (none)'}, {args.batch_size} + {args.batch_size} a step")
            save_lora(trained["lora"], staging / "lora.safetensors", kohya_metadata(
                args.lora, args.lora_alpha, Path(args.ckpt).name, learning_rate=args.lr, steps=step,
                max_train_steps=args.steps, seed=args.seed, resolution=args.resolution, training_comment=comment))
            if args.save_merged:
                with trained["lora"].merged():
                    dreambooth.save(sd, staging / "model.safetensors")
        write_atomic(staging / "train_state.pt", lambda tmp: torch.save(state, tmp))
        replace_all(staging, out)
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        params = sum(p.numel() for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters())
        trained_params = sum(p.numel() for m in trained.values() for p in m.parameters())
        need = 2 * params + 12 * trained_params  # the fp16 model; the fp32 trained weights and their two moments
        raise log.stop(f"saving step {step} failed: {why_write_failed(e, out, need)}") from None
    log.saved_step = step


def train(args, sd, preview_sd, step_fn, optimizer, trained, generator, log):
    """The loop: one step, then logging, previews and saves when they are due. Ctrl-C stops it after the step, saved."""
    out, start = Path(args.out), log.start
    subject = f"{args.token} {args.class_name}" if args.class_name else args.instance_prompt
    sample_prompts = [args.instance_prompt, f"a {subject} in the snow", f"a {subject} on the beach",
                      f"a painting of a {subject}", args.prior_prompt]
    sample_seeds = [args.seed + k for k in range(len(sample_prompts))]
    with cli.ctrl_c_asks_to_stop() as stop, cli.progress(total=args.steps, initial=start, unit="step") as bar, log:
        try:
            for step in range(start + 1, args.steps + 1):
                optimizer.set_lr(lr_at(step, args))
                log.pending.append(step_fn(generator))
                bar.update()
                if step % args.log_every == 0 or step == args.steps:
                    bar.set_postfix(loss=f"{log.write(step, lr_at(step, args)):.4f}")
                if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
                    with log.peak_not_counted():
                        grid = out / "samples" / f"step-{step:05d}.png"
                        try:
                            preview(preview_sd, sample_prompts, sample_seeds, args, grid)
                        except ValueError as e:  # generate's non-finite latents: the weights have diverged
                            raise log.stop(f"the preview after step {step} failed: {e}", diverged=True) from None
                if (args.save_every and step % args.save_every == 0) or step == args.steps or stop:
                    log.check(step)
                    if not all(p.isfinite().all() for m in trained.values() for p in m.parameters()):
                        raise log.stop(f"the weights are not finite after step {step}", diverged=True)
                    save(out, sd, trained, optimizer, step, args, generator, log)
                if stop:
                    print(f"\ninterrupted: saved step {step} in {out}; continue with: python train.py --resume {out}")
                    raise SystemExit(130)
        except OSError as e:  # writing the log or a preview: a full disk, say
            raise log.stop(f"writing in {out} failed at step {step} ({e.strerror or e})") from None
    log.summary(args.steps - start)
    lora = f"--ckpt {args.ckpt} --lora {out / 'lora.safetensors'}" if args.lora else ""
    print(f"{'lora' if args.lora else 'model'}: {out / ('lora' if args.lora else 'model')}.safetensors  (python "
          f"sample.py {lora or '--ckpt ' + str(out / 'model.safetensors')} --prompt \"{sample_prompts[1]}\")")
    print(f"log: {out / 'log.jsonl'}, previews: {out / 'samples'}, train state for --resume: {out / 'train_state.pt'}")


if __name__ == "__main__":
    cli.run(main)
