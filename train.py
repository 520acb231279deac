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
`dreambooth.ddim.add_noise`); lambda is --prior-weight. The file holds the whole method, top to bottom: the loss,
the batch of subject and prior images, the step (TrainStep.learn: eq. 2, loss.backward(), optimizer.step()), then
main() and the loop. The flags and their defaults are in train_settings.py; setting up the models and the
optimizer, saving, resuming and the preview grids in train_setup.py; the two wrappers that make the step fast in
dreambooth/speed.py.
"""
import startup  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads, and makes Ctrl-C exit 130)
import contextlib
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import cli
import ranks
import train_setup as setup
from dreambooth import speed
from dreambooth.ddim import add_noise
from dreambooth.runlog import Log, Stopped
from dreambooth.vae import sample_latent
from train_settings import claim_run_folder, parse_args, resolve_defaults, run_concepts

# ----------------------------------------------------------------------------------------------------------------------
# The loss.


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


# ----------------------------------------------------------------------------------------------------------------------
# The batch: subject photos and as many prior images, as VAE latents, with their timesteps and noise.


@torch.no_grad()
def encode_posteriors(vae, images, device, chunk=4):
    """The VAE posterior q(z|x) = N(mean, exp(logvar)) of each image and of its mirror image, computed once, so that a
    step samples a latent from it: the same distribution as encoding the photo at every step, for no VAE per step.
    images [N, 3, R, R] in [-1, 1] -> [N, 2 (flip), 8 (mean, logvar), R/8, R/8]."""
    out = []
    for x in images.split(chunk):
        x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1).to(device)  # (2n, 3, R, R): image, mirror, ...
        out.append(torch.cat(vae.encode(x), dim=1).unflatten(0, (-1, 2)))
    return torch.cat(out)


@dataclass
class Batches:
    """What a step draws from: the photos' VAE posteriors (encode_posteriors), or with --no-cache the photos themselves
    and the VAE that encodes them at every step. Rows [0, n_photos) are the subject photos of every concept, the
    rest the class images, each concept's together. All randomness comes from the generator passed to draw(), in a
    fixed order, so that a run, and a resumed run, draw the same batches."""
    posteriors: torch.Tensor | None  # [N, 2 (flip), 8, h, w]
    images: torch.Tensor | None      # [N, 3, R, R], with --no-cache
    vae: torch.nn.Module | None      # with --no-cache
    instance_rows: torch.Tensor      # [n_photos] each subject photo's prompt, as a row of the step's contexts
    instance_concepts: torch.Tensor  # [n_photos] each subject photo's concept: 0, 1, ...
    prior_rows: torch.Tensor         # [n_prior] each class image's prompt, as a row of the step's contexts
    prior_first: torch.Tensor        # [concepts] the index of each concept's first class image among them
    prior_counts: list[int]          # [concepts] how many class images each concept has; [] without a prior
    batch_size: int                  # subject photos per step, and as many prior images if there are any
    latent_scale: float              # StableDiffusion.latent_scale
    timesteps: int = 1000            # t is drawn from [0, timesteps)
    noise_offset: float = 0.0        # std of a constant added to each latent channel's noise (offset noise)
    memory_format: torch.memory_format = torch.contiguous_format  # the UNet's
    share: tuple[int, int] = (0, 1)  # torchrun: (this rank, the number of ranks); each trains on its share of a batch

    @property
    def subject_rows(self):
        """The subject photos in the rows draw() returns: all of them, or under torchrun this rank's share."""
        return self.batch_size // self.share[1]

    def draw(self, generator):
        """One batch, drawn in a fixed order: which photos (batch_size of the subject's, as many of the prior's), their
        horizontal flips, z ~ q(z|x) from each photo's VAE posterior, the timesteps t, the noise (then, with
        noise_offset, its constants). Subject photos are drawn from all concepts alike, so each photo is seen as often
        as any other (a concept with more photos gets more steps), and each brings a class image of its own concept.
        Returns (latents, t, noise, rows): rows are the photos' prompts, as rows of the step's contexts. Under
        torchrun every rank draws the same batch and returns its share (share_of)."""
        device, n_photos = generator.device, len(self.instance_rows)
        idx = torch.randint(n_photos, (self.batch_size,), generator=generator, device=device)
        rows = self.instance_rows[idx]
        if self.prior_counts:  # for every concept a draw among its class images; each photo takes its concept's
            within = torch.stack([torch.randint(n, (self.batch_size,), generator=generator, device=device)
                                  for n in self.prior_counts])
            concept = self.instance_concepts[idx]
            prior_idx = self.prior_first[concept] + within[concept, torch.arange(self.batch_size, device=device)]
            idx = torch.cat([idx, n_photos + prior_idx])
            rows = torch.cat([rows, self.prior_rows[prior_idx]])
        flip = torch.randint(2, idx.shape, generator=generator, device=device)  # p = 0.5
        if self.posteriors is None:
            x = torch.where(flip.view(-1, 1, 1, 1).bool(), self.images[idx].flip(-1), self.images[idx])
            with torch.no_grad():
                posterior = self.vae.encode(x)
        else:
            posterior = self.posteriors[idx, flip].chunk(2, dim=1)
        latents = sample_latent(*posterior, generator) * self.latent_scale
        t = torch.randint(self.timesteps, (len(idx),), generator=generator, device=device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        if self.noise_offset:  # offset noise: also noise each channel's mean, which eq. 4 leaves almost unnoised
            noise += self.noise_offset * torch.randn(*latents.shape[:2], 1, 1, generator=generator, device=device)
        latents, t, noise, rows = self.share_of(latents, t, noise, rows)
        layout = self.memory_format
        return latents.contiguous(memory_format=layout), t, noise.contiguous(memory_format=layout), rows

    def share_of(self, *batch):
        """torchrun: this rank's rows of each tensor of the batch, an equal share of the subject rows and of the prior
        rows. With the gradients averaged over the ranks, the ranks' shares make the step of the whole batch."""
        rank, ranks = self.share
        if ranks == 1:
            return batch
        k = self.subject_rows
        mine = torch.arange(rank * k, (rank + 1) * k, device=batch[0].device)
        keep = torch.cat([mine, self.batch_size + mine]) if self.prior_counts else mine
        return tuple(x[keep] for x in batch)


# ----------------------------------------------------------------------------------------------------------------------
# The step: a batch, eq. 2, backward, the optimizer.


@dataclass
class TrainStep:
    """One DreamBooth step as a call: step(generator) draws a batch, computes eq. 2, runs backward and updates the
    weights, and returns the losses [3] (eq. 2, instance, prior) on the device, unread (the log reads them later, so
    no step waits for the GPU). learn() is the textbook step of nanoGPT's train.py, GradScaler included (it is off
    except under --precision fp16). Made by make_step, which may wrap its parts to make them fast (dreambooth/speed.py):
    the optimizer may step inside backward, and learn() may be replayed from a CUDA graph."""
    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None  # trained with the UNet; None: frozen, and `contexts` holds its output
    ids: torch.Tensor                     # [K, 77] token ids: the instance prompt, the prior's prompts (, "")
    contexts: torch.Tensor | None         # [K, 77, C] their contexts from the text encoder before training
    batches: Batches
    alphas_cumprod: torch.Tensor
    prior_weight: float                   # lambda of eq. 2
    optimizer: torch.optim.Optimizer      # AdamW, or speed.StepInBackward
    lr: torch.Tensor                      # the learning rate, one tensor on the device that the optimizer reads
    autocast: torch.autocast              # --precision
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler(enabled=False))
    clip_grad: float = 0.0
    base_unet: object = None              # --prior-loss base: the frozen base UNet (base_prior_targets)
    group: object = None                  # torchrun: the ranks.Group that trains as one

    def __call__(self, generator):
        losses = self.learn(*self.batches.draw(generator))
        if self.group is not None:  # torchrun: the losses of the whole batch, as one process would log them
            self.group.average([losses])
        return losses

    def learn(self, latents, t, noise, rows):
        """Eq. 2 on the drawn batch, backward, and the weight update. rows: each image's prompt, as its index into
        self.ids (the step's prompts, each once)."""
        n_instance = self.batches.subject_rows
        with self.autocast:
            x_t, target = add_noise(latents, noise, t, self.alphas_cumprod), noise  # DDPM eq. 4
            if self.base_unet is not None:  # --prior-loss base (set only where there are prior images)
                x_t, t, rows, target = base_prior_targets(self.base_unet, self.contexts, x_t, t, rows, noise,
                                                          n_instance, uncond_row=len(self.ids) - 1)
            if self.text_encoder is None:
                contexts = self.contexts[rows]
            elif len(self.ids) <= len(rows):  # each prompt once
                contexts = self.text_encoder(self.ids)[rows]
            else:  # more prompts than rows (a caption per image): only the rows' own
                contexts = self.text_encoder(self.ids[rows])
            loss, loss_instance, loss_prior = dreambooth_loss(self.unet, x_t, t, contexts, target, n_instance,
                                                              self.prior_weight)
        # loss.backward(), optimizer.step(), optimizer.zero_grad(), through the GradScaler, which is off (it passes each
        # call through) except under --precision fp16: there it scales the loss up, so that small gradients do not
        # round to 0, and skips a step whose gradients overflowed. (With speed.StepInBackward each block's weights are
        # updated inside backward as soon as its gradients are ready, and its step() only checks that all were.)
        self.scaler.scale(loss).backward()
        if self.group is not None:  # torchrun: every rank's gradients averaged, the whole batch's, on all ranks
            # (stepped inside backward, each block's were averaged before its step, and none are left here)
            self.group.average([p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None])
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack([loss, loss_instance, loss_prior]).detach()

    def recording_failed(self, why):
        print(f"\nstep: recording the CUDA graph failed ({why}); the run goes on eagerly (--no-cuda-graph skips it)")
        self.optimizer.zero_grad(set_to_none=True)  # the recorded backward did not run


def make_step(sd, images, photos, args, device, group=None):
    """The step as main() runs it (benchmarks/gpu.py and the tests make it so too): the photos' VAE posteriors and the
    prompts' contexts computed once (then the VAE and a frozen text encoder leave the GPU), the optimizer, and the
    wrappers that pay here. photos: train_setup.Photos; group: torchrun's (ranks.py). Returns (train_step, trained)."""
    trained = setup.trained_modules(sd, args, device)
    n, has_prior = photos.n_instance, len(photos.prompts) > photos.n_instance
    base_prior = args.prior_loss == "base" and has_prior
    ids, contexts, rows = setup.encode_prompts(sd, args, photos, base_prior, device)
    posteriors = None
    if args.no_cache:
        images = images.to(device)
    else:
        posteriors, images = encode_posteriors(sd.vae, images, device), None
        sd.vae.to("cpu")
    # channels_last (NHWC) is the layout cuDNN's convolutions work in; in the default NCHW layout, a fifth of the
    # step's GPU time went into converting to it and back. On the CPU it was slower, so there it stays NCHW.
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    sd.unet.to(memory_format=memory_format)
    # made before the free GPU memory is measured, so the estimate below counts it
    base_unet = setup.frozen_base(sd.unet, trained.get("lora"), args.precision) if base_prior else None
    images_per_step = args.batch_size * (1 + has_prior + base_prior) // (group.size if group else 1)
    optimizer, lr, scaler, graph = setup.make_optimizer(args, sd, trained, images_per_step, device, group)
    concepts = torch.tensor(photos.concepts, device=device)
    prior_counts = torch.bincount(concepts[n:], minlength=max(photos.concepts) + 1).tolist() if has_prior else []
    batches = Batches(posteriors, images, sd.vae if args.no_cache else None, rows[:n], concepts[:n], rows[n:],
                      torch.tensor([0, *prior_counts], device=device).cumsum(0)[:-1], prior_counts, args.batch_size,
                      sd.latent_scale, len(sd.alphas_cumprod), args.noise_offset, memory_format,
                      (group.rank, group.size) if group else (0, 1))
    train_step = TrainStep(sd.unet, sd.text_encoder if args.train_text_encoder else None, ids, contexts, batches,
                           sd.alphas_cumprod, args.prior_weight, optimizer, lr, setup.autocast(args), scaler,
                           args.clip_grad, base_unet, group)
    # learn() recorded once as a CUDA graph after 3 eager steps and replayed; the draws stay outside the graph, so a
    # replayed run trains on exactly what an eager run draws
    if graph:
        train_step.learn = speed.CUDAGraphReplay(train_step.learn, warmup=3, on_failure=train_step.recording_failed)
    return train_step, trained


# ----------------------------------------------------------------------------------------------------------------------
# main() and the loop: the run folder is this run's alone (train_settings.claim_run_folder), then setup, resume, the
# loop, which logs, draws previews and saves.

def main(argv=None):
    args, state = parse_args(argv)
    resolve_defaults(args)
    concepts = run_concepts(args)
    group, device = ranks.join(args.device, "train.py")  # torchrun: this process's place and GPU; else (None, device)
    try:  # rank 0 alone writes the run folder
        with claim_run_folder(args, state) if ranks.writes(group) else contextlib.nullcontext():
            run(args, state, concepts, group, torch.device(device))
    finally:
        ranks.leave(group)


def run(args, state, concepts, group, device):
    """Setup, resume and the loop, in a run folder that is this run's alone."""
    out = Path(args.out)
    generator = torch.Generator(device).manual_seed(args.seed)  # data order, flips, z, timesteps, noise
    sd, images, photos = setup.load_model_and_photos(args, concepts, device)
    preview_sd = cli.with_vae(sd, args.vae, "train.py", device="cpu") if args.vae else sd  # the grids' decoder
    train_step, trained = make_step(sd, images, photos, args, device, group)
    start = setup.resume(args, state, trained, train_step, generator) if state else 0
    if start >= args.steps:
        print(f"{out} is already at step {start} of --steps {args.steps}; give a larger --steps to continue")
        return
    n_prior = len(photos.prompts) - photos.n_instance
    print(f"training {sum(p.numel() for m in trained.values() for p in m.parameters()) / 1e6:.1f}M parameters of "
          f"{args.ckpt} on {device}{f' (rank 0 of {group.size} processes)' if group else ''}, {args.precision}, lr "
          f"{args.lr:g}, {photos.n_instance} subject + {n_prior} prior images at {args.resolution} px"
          f"{f' of {len(concepts)} concepts' if len(concepts) > 1 else ''}; run folder {out}")
    log = Log(out, start, args.steps, device, state.get("log") if state else None,
              plain_lines=not cli.interactive(), writes=ranks.writes(group))
    if state:  # its weights and moments, gigabytes with SD, are in the model and optimizer now: let them go
        state.clear()
    previews = [setup.preview_prompts(args, concept) for concept in concepts]  # a row of the grids per concept
    try:
        train(args, sd, preview_sd, train_step, trained, generator, log, previews)
    except Stopped as e:
        raise SystemExit(f"train.py: error: {e}") from None


def lr_at(step, args):
    """Linear warm-up over --warmup-steps, then constant, as in the original DreamBooth fine-tuning."""
    return args.lr * min(1.0, step / args.warmup_steps) if args.warmup_steps else args.lr


def train(args, sd, preview_sd, train_step, trained, generator, log, previews):
    """The loop: one step, then logging, previews and saves when they are due. Ctrl-C or SIGTERM stops it after the
    step, saved. previews: the prompts of each row of the preview grids. Under torchrun every rank runs it, and rank
    0 alone draws the previews and writes the files."""
    out, start, group = Path(args.out), log.start, train_step.group
    writes = ranks.writes(group)
    seeds = [args.seed + k for k in range(len(previews[0]))]
    with cli.stop_requests() as stop_asked, cli.progress(total=args.steps, initial=start, unit="step") as bar, log:
        try:
            for step in range(start + 1, args.steps + 1):
                train_step.lr.fill_(lr_at(step, args))  # one write on the device, which a replayed graph reads too
                log.pending.append(train_step(generator))
                bar.update()
                stop = bool(stop_asked) if group is None else group.any(bool(stop_asked))  # all ranks stop at one step
                if step % args.log_every == 0 or step == args.steps:
                    bar.set_postfix(loss=f"{log.write(step, lr_at(step, args)):.4f}")
                if writes and args.sample_every and (step % args.sample_every == 0 or step == args.steps):
                    with log.peak_not_counted():
                        try:
                            setup.preview(preview_sd, previews, seeds, args, out / "samples" / f"step-{step:05d}.png")
                        except ValueError as e:  # generate's non-finite latents: the weights have diverged
                            raise log.stop(f"the preview after step {step} failed: {e}", diverged=True) from None
                if (args.save_every and step % args.save_every == 0) or step == args.steps or stop:
                    log.check(step)
                    if not all(p.isfinite().all() for m in trained.values() for p in m.parameters()):
                        raise log.stop(f"the weights are not finite after step {step}", diverged=True)
                    if writes:
                        setup.save(out, sd, trained, train_step, step, args, generator, log)
                    if group is not None:  # the others wait for the save: none ends the group while rank 0 writes
                        group.barrier()
                if stop:  # exit status 130 for Ctrl-C, 143 for SIGTERM, as shells report them
                    again = "torchrun <its options> train.py" if group else "python train.py"
                    print(f"\ninterrupted: saved step {step} in {out}; continue with: {again} --resume {out}")
                    raise SystemExit(143 if signal.SIGTERM in stop_asked else 130)
        except OSError as e:  # writing the log or a preview: a full disk, say
            raise log.stop(f"writing in {out} failed at step {step} ({e.strerror or e})") from None
    log.summary()
    model = f"--ckpt {args.ckpt} --lora {out / 'lora.safetensors'}" if args.lora else \
        f"--ckpt {out / 'model.safetensors'}"
    print(f"{'lora' if args.lora else 'model'}: {out / ('lora' if args.lora else 'model')}.safetensors  (python "
          f"sample.py {model} --prompt \"{previews[0][0] if args.ckpt == 'toy' else previews[0][1]}\")")
    grids = f", previews: {out / 'samples'}" if args.sample_every else ""
    print(f"log: {out / 'log.jsonl'}{grids}, train state for --resume: {out / 'train_state.pt'}")


if __name__ == "__main__":
    cli.run(main)
