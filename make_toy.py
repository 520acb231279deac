"""Train the toy model from scratch: a tiny Stable Diffusion v1 (the architecture of `dreambooth.load("tiny")`) that
draws coloured shapes, so that DreamBooth can be run, and seen to work, on a CPU in minutes.

    python make_toy.py          # writes runs/toy-<date>/toy.safetensors and its subject's pictures beside it
    python train.py --ckpt runs/toy-<date>/toy.safetensors --instance runs/toy-<date>/subject --class circle ...

The shipped model, dreambooth/toy.safetensors, is `python make_toy.py` with its defaults; replacing it (and the
subject's pictures in examples/toy) takes --out dreambooth/toy.safetensors --subject-dir examples/toy --force.
The pictures come from dreambooth/toyworld.py; nothing is read from disk. Four phases, as Stable Diffusion was made:

1. The text encoder is the tiny model's random CLIP, frozen: seeded as dreambooth.load("tiny") seeds it. It need
   not understand anything; it only has to give different prompts different contexts, which the UNet learns to use.
   (Training it with the UNet failed: the contexts wandered before the UNet could learn to read them.)
2. The VAE (KL autoencoder, Rombach et al. 2022 sec. 3) learns to reconstruct pictures BROADER than the captions:
   any colour, rings, crosses, stripes, several shapes. A VAE that has only seen the four caption colours cannot
   draw anything else, and DreamBooth could then not teach the model a new subject. Loss: MSE + KL_WEIGHT * KL, a
   weak KL as in SD (it only keeps the latents from growing without bound). Its GroupNorms have 8 groups, not
   SD's 32 (toy_vae says why; the file's metadata says so, for the loader).
   The latent scale is 1 / std of the VAE latents (SD's scale_factor, sec. 4.3.2), stored in the file's metadata.
3. The UNet learns to denoise latents of captioned pictures of the vocabulary (DDPM loss, Ho et al. 2020 eq. 14;
   "a red circle" 70 %, "a circle" 20 %, "" 10 % for classifier-free guidance), with offset noise (train_unet
   says why) and an EMA of its weights.
4. The VAE's decoder alone is fine-tuned (encoder frozen, so the UNet's latents keep their meaning), as SD's
   ft-MSE VAE was, for truer colours. It learns to decode latents moved by a little noise too (finetune_decoder
   says why).

With --vae-from FILE, phases 2 and 4 are skipped: the VAE (fine-tuned decoder included) and its latent scale are an
earlier toy file's, and only the UNet is trained: a way to try UNet settings on a VAE known to be good.

Runs are deterministic for a given --seed and --threads on one kind of CPU; another CPU, or a GPU (--device
cuda), sums in another order and makes another model. Torch's generator is reseeded at the start of each training
phase (seed, seed + 2, seed + 4, as the numpy streams are numbered), so a phase's noise and timesteps do not depend
on how many numbers the phases before it drew. What the choices were measured to do: docs/toy-world.md.
"""
import startup  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads, and makes Ctrl-C exit 130)
import os
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

import cli
import dreambooth
from dreambooth import toyworld
from dreambooth.checkpoint import CheckpointError, vae_groups
from dreambooth.ddim import add_noise
from dreambooth.images import to_tensor
from dreambooth.stable_diffusion import device_of
from dreambooth.vae import AutoencoderKL, VAEConfig, sample_latent

KL_WEIGHT = 5e-5     # of the KL term, per latent element, against the per-pixel MSE of images in [-1, 1]
VAE_BATCH = 24
VAE_LR = 1e-3        # Adam, cosine decay to 0
VOCAB_SHARE = 0.3    # of the VAE's pictures drawn from the captions' vocabulary; the rest are toyworld.random_scene
UNET_BATCH = 64
UNET_LR = 1e-3       # AdamW, after a linear warm-up of WARMUP steps
WARMUP = 100
EMA_DECAY = 0.998    # the saved UNet is the exponential moving average of its weights
NOISE_OFFSET = 0.1   # offset noise: std of a constant added to each latent channel's noise (see train_unet)
DECODER_NOISE = 0.3  # std of the noise added to the latents (scaled as the UNet's) in the decoder's fine-tuning
VAE_GROUPS = 8       # GroupNorm groups of the VAE (toy_vae says why); written to the file's metadata by save
PER_CAPTION = 800    # pictures per (shape, colour) in the UNet's data set, encoded once
# How the toy is sampled where a program is not told, written to the file's metadata (StableDiffusion.sampling): the
# settings benchmarks/toy.py measures with. At SD's guidance 7.5 it drew its subject's pink purple; at 3, pink.
SAMPLING = {"scale": 3.0, "ddim_steps": 25}


def parse_args(argv=None):
    p = cli.parser("make_toy.py", "Train the toy model (tiny SD v1 drawing coloured shapes) from scratch, and draw "
                   "the toy DreamBooth subject (a pink ring).", [
                       "python make_toy.py                     # runs/toy-<date>/toy.safetensors and subject/",
                       "python make_toy.py --vae-from dreambooth/toy.safetensors --out runs/toy-unet/toy.safetensors"
                       "   # a new UNet on the shipped VAE",
                       "python make_toy.py --vae-steps 50 --unet-steps 50 --decoder-steps 50 "
                       "--out runs/toy-quick/toy.safetensors   # a smoke run",
                       "python make_toy.py --out dreambooth/toy.safetensors --subject-dir examples/toy --force"
                       "   # replace the shipped model"])
    p.add_argument("--out", help="the model file to write; default runs/toy-<date>/toy.safetensors")
    p.add_argument("--subject-dir", help="where the subject's pictures go; default the folder of --out, /subject")
    p.add_argument("--force", action="store_true", help="replace an existing --out and the pictures in --subject-dir")
    p.add_argument("--vae-steps", type=int, default=1500, help="VAE optimizer steps")
    p.add_argument("--unet-steps", type=int, default=3200, help="UNet optimizer steps")
    p.add_argument("--decoder-steps", type=int, default=600, help="optimizer steps of the decoder's fine-tuning")
    p.add_argument("--vae-from", metavar="FILE", help="take the VAE and its latent scale from an earlier toy file "
                   "instead of training them (phases 2 and 4): only the UNet is trained, in under half the time")
    p.add_argument("--seed", type=int, default=4, help="seed of the pictures, noise and timesteps (4 made the "
                   "shipped file)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (2 made the shipped file)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: a GPU's random numbers are another draw than a "
                   "CPU run's, so it makes another model (the shipped file is a CPU run)")
    args = p.parse_args(argv)
    args.out = Path(args.out or f"runs/toy-{datetime.now():%Y%m%d-%H%M%S}/toy.safetensors")
    args.subject_dir = Path(args.subject_dir or args.out.parent / "subject")
    if not args.force:  # checked now, not after 20 minutes of training
        if args.out.exists():
            p.error(f"--out {args.out} exists; give another --out, or --force to replace it")
        if args.subject_dir.is_dir() and any(args.subject_dir.glob("*.png")):
            p.error(f"--subject-dir {args.subject_dir} holds pictures; give another, or --force to replace them")
    return args


def vae_batch(rng: np.random.Generator, n: int, device, vocab_share: float = VOCAB_SHARE) -> torch.Tensor:
    """n training pictures of the VAE: vocab_share of them captioned shapes, the rest broad random scenes."""
    images = []
    for _ in range(n):
        if rng.random() < vocab_share:
            images.append(toyworld.draw(rng, str(rng.choice(toyworld.SHAPES)), str(rng.choice(list(toyworld.COLOURS)))))
        else:
            images.append(toyworld.random_scene(rng))
    return to_tensor(images).to(device)


def train_vae(vae, steps: int, rng: np.random.Generator) -> None:
    """MSE + KL_WEIGHT * KL(q(z|x) || N(0, I)) on fresh pictures every step."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=VAE_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    t0 = time.time()
    for step in range(1, steps + 1):
        x = vae_batch(rng, VAE_BATCH, device_of(vae))
        mean, logvar = vae.encode(x)
        z = sample_latent(mean, logvar)  # the reparameterisation trick
        mse = F.mse_loss(vae.decode(z, VAE_BATCH), x)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        optimizer.zero_grad(set_to_none=True)
        (mse + KL_WEIGHT * kl).backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            print(f"vae step {step}/{steps}: rmse {mse.sqrt().item() * 127.5:.1f}/255, kl {kl.item():.2f}, "
                  f"{time.time() - t0:.0f} s", flush=True)
    vae.eval().requires_grad_(False)


def finetune_decoder(vae, latent_scale: float, steps: int, rng: np.random.Generator) -> None:
    """Fine-tune the decoder alone, on MSE, with the encoder frozen: sharper and truer colours, while the latents,
    which the UNet has learned, stay exactly as they were. (SD's own improved VAEs, ft-EMA and ft-MSE, were made
    the same way: only the decoder was fine-tuned.) Half the pictures are of the captions' vocabulary.

    Unlike SD's, the decoder learns to draw the picture from its latent plus noise of std DECODER_NOISE (in the
    UNet's units, after the latent scale): the UNet's samples land near the latents of pictures, not on them, and
    a decoder that has only seen exact latents may draw a near one in another colour. On one VAE, decoding the
    vocabulary's latents plus noise of std 0.6 gave the right colour in 70 % of pictures before, 88 % after."""
    decoder = [vae.post_quant_conv, vae.decoder]
    for m in decoder:
        m.train().requires_grad_(True)
    optimizer = torch.optim.Adam([p for m in decoder for p in m.parameters()], lr=VAE_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    t0 = time.time()
    for step in range(1, steps + 1):
        x = vae_batch(rng, VAE_BATCH, device_of(vae), vocab_share=0.5)
        with torch.no_grad():
            z = sample_latent(*vae.encode(x))
            z += DECODER_NOISE / latent_scale * torch.randn_like(z)
        mse = F.mse_loss(vae.decode(z, VAE_BATCH), x)
        optimizer.zero_grad(set_to_none=True)
        mse.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            print(f"decoder step {step}/{steps}: rmse {mse.sqrt().item() * 127.5:.1f}/255, {time.time() - t0:.0f} s",
                  flush=True)
    for m in decoder:
        m.eval().requires_grad_(False)


@torch.no_grad()
def recon_rmse(vae, images) -> float:
    """Root-mean-square reconstruction error (from the posterior mean) in 0..255 units."""
    x = to_tensor(images).to(device_of(vae))
    return ((vae.decode(vae.encode(x)[0], len(x)) - x).pow(2).mean().sqrt() * 127.5).item()


def vocabulary_images(rng: np.random.Generator):
    """The UNet's data set: PER_CAPTION pictures of each (shape, colour). Returns (images, [(shape, colour)])."""
    labels = [(s, c) for s in toyworld.SHAPES for c in toyworld.COLOURS for _ in range(PER_CAPTION)]
    return [toyworld.draw(rng, s, c) for s, c in labels], labels


@torch.no_grad()
def encode(vae, images, chunk: int = 200) -> torch.Tensor:
    """The VAE posteriors of the pictures: [N, 8 (mean, logvar), 8, 8]."""
    return torch.cat([torch.cat(vae.encode(to_tensor(images[i:i + chunk]).to(device_of(vae))), dim=1)
                      for i in range(0, len(images), chunk)])


def toy_vae(tiny_vae):
    """The tiny model's random VAE, its GroupNorms in VAE_GROUPS groups (the same weights: a GroupNorm starts at
    1 and 0, whatever its groups). VAEConfig.tiny() has SD's 32 groups, and at its 32 channels each group is then
    one channel: every norm takes away each channel's mean over the picture, which is where a flat shape's colour
    is. VAEs trained so gave back at most 81 % of drawn pictures in their colour; with 8 groups of 4 channels (as
    SD's 128 channels are in 32), most gave back 95 % to 100 % (docs/toy-world.md, "Why some VAEs fail")."""
    with torch.device("meta"):
        vae = AutoencoderKL(replace(tiny_vae.config, norm_groups=VAE_GROUPS))
    vae.load_state_dict(tiny_vae.state_dict(), assign=True)
    return vae.eval().requires_grad_(False)


def earlier_vae(path: str):
    """The VAE of an earlier toy file, its latent scale and how it was made (--vae-from). The file's UNet may be of
    another size: only its first_stage_model.* weights and metadata are read."""
    try:
        with safe_open(path, "pt") as f:
            made = f.metadata() or {}
            weights = {k.removeprefix("first_stage_model."): f.get_tensor(k).float()
                       for k in f.keys() if k.startswith("first_stage_model.")}
    except (OSError, SafetensorError) as e:
        raise SystemExit(f"make_toy.py: --vae-from {path}: cannot read it as .safetensors ({e})")
    if made.get("made_by") != "make_toy.py" or "latent_scale" not in made:
        raise SystemExit(f"make_toy.py: --vae-from {path}: not a file make_toy.py wrote (its metadata has no made_by "
                         "make_toy.py and latent_scale)")
    try:  # files made before VAE_GROUPS name no groups: SD's 32
        vae = AutoencoderKL(replace(VAEConfig.tiny(), **vae_groups(Path(path), weights)))
    except CheckpointError as e:
        raise SystemExit(f"make_toy.py: --vae-from {e}")
    try:
        vae.load_state_dict(weights)
    except RuntimeError as e:
        raise SystemExit(f"make_toy.py: --vae-from {path}: its VAE is not the toy's ({str(e).splitlines()[1].strip()})")
    return vae.eval().requires_grad_(False), float(made["latent_scale"]), made


def caption_contexts(sd):
    """Every caption the UNet is trained on, and their frozen CLIP contexts: (index of caption, [K, 77, CLIP width])."""
    captions = [""] + [f"a {s}" for s in toyworld.SHAPES]
    captions += [f"a {c} {s}" for s in toyworld.SHAPES for c in toyworld.COLOURS]
    return {text: k for k, text in enumerate(captions)}, sd.encode_text(captions)


def train_unet(sd, posteriors, labels, steps: int, rng: np.random.Generator) -> None:
    """The DDPM loss || eps - eps_theta(x_t, t, c) ||^2 with x_t from eq. 4 (ddim.add_noise); then the EMA
    weights are copied into the UNet.

    With offset noise (Guttenberg 2023): each channel's noise also gets a random constant, NOISE_OFFSET * N(0, 1).
    SD's schedule leaves sqrt(alpha-bar) = 0.068 of the signal at t = 999, and a picture's colour is mostly the mean
    of its 8 x 8 latent, which plain noise hardly hides (the mean of 64 noise values has std 1/8). So the UNet
    learned to read the colour from that mean instead of from the caption, and at sampling, where x_T is pure
    noise, the noise's mean chose it: 67.7 % of the samples had the prompted colour (85.4 % with the mean removed
    from x_T). Trained with offset noise, the same UNet on the same VAE drew it in 96.9 % as sampled normally.
    train.py's toy defaults use the same offset (cli.TOY_DEFAULTS)."""
    unet = sd.unet.train().requires_grad_(True)
    ema = [p.detach().clone() for p in unet.parameters()]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=UNET_LR)
    index, contexts = caption_contexts(sd)
    t0 = time.time()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = UNET_LR * min(1.0, step / WARMUP)
        rows = torch.from_numpy(rng.integers(len(labels), size=UNET_BATCH))
        captions = [index[toyworld.caption(rng, *labels[i])] for i in rows.tolist()]
        x0 = sample_latent(*posteriors[rows].chunk(2, dim=1)) * sd.latent_scale
        t = torch.randint(len(sd.alphas_cumprod), (UNET_BATCH,), device=x0.device)
        noise = torch.randn_like(x0) + NOISE_OFFSET * torch.randn(*x0.shape[:2], 1, 1, device=x0.device)
        loss = F.mse_loss(unet(add_noise(x0, noise, t, sd.alphas_cumprod), t, contexts[captions]), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - EMA_DECAY)
        if step % 100 == 0 or step == steps:
            print(f"unet step {step}/{steps}: loss {loss.item():.4f}, {time.time() - t0:.0f} s", flush=True)
    with torch.no_grad():
        for p, e in zip(unet.parameters(), ema):
            p.copy_(e)
    unet.eval().requires_grad_(False)


def draw_subject(folder: Path, rng: np.random.Generator, n: int = 5) -> None:
    """The DreamBooth subject's pictures: the same pink ring (one colour, one band width) at different places
    and sizes, on different light backgrounds, as photos of one object would be."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        centre, width = toyworld.random_place(rng, 28, 44)
        toyworld.draw(rng, toyworld.SUBJECT["shape"], toyworld.SUBJECT["colour"], centre=centre,
                      width=width).save(folder / f"{k:02d}.png")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # numpy streams: VAE data, UNet data, captions, subject, decoder data
    rngs = [np.random.default_rng([args.seed, k]) for k in range(5)]
    t0 = time.time()
    # the random tiny model: its CLIP stays as it is, the VAE and UNet are trained
    sd = dreambooth.load("tiny", device=args.device)
    if args.vae_from:
        vae, sd.latent_scale, made = earlier_vae(args.vae_from)
        sd.vae = vae.to(args.device)
        vae_metadata = {"vae": f"from {Path(args.vae_from).name}, made by make_toy.py --seed {made.get('seed')} in "
                               f"{made.get('seconds')} s with torch {made.get('torch')}",
                        "vae_steps": made.get("vae_steps", "?"), "decoder_steps": made.get("decoder_steps", "?")}
    else:
        sd.vae = toy_vae(sd.vae)
        train_vae(sd.vae, args.vae_steps, rngs[0])
        vae_metadata = {"vae_steps": str(args.vae_steps), "decoder_steps": str(args.decoder_steps),
                        "decoder_noise": str(DECODER_NOISE)}
    images, labels = vocabulary_images(rngs[1])
    posteriors = encode(sd.vae, images)
    if not args.vae_from:
        std = sample_latent(*posteriors.chunk(2, dim=1)).std().item()
        sd.latent_scale = 1.0 / std  # unit-variance latents for the UNet, as SD's scale_factor
    print(f"latent scale {sd.latent_scale:.4f}; {time.time() - t0:.0f} s so far", flush=True)

    torch.manual_seed(args.seed + 2)
    train_unet(sd, posteriors, labels, args.unet_steps, rngs[2])
    if not args.vae_from:  # an earlier file's decoder was fine-tuned already
        torch.manual_seed(args.seed + 4)
        finetune_decoder(sd.vae, sd.latent_scale, args.decoder_steps, rngs[4])
    check = np.random.default_rng([args.seed, 9])
    rmse = {"vocabulary": recon_rmse(sd.vae, vocabulary_images(check)[0][::200]),
            "broad": recon_rmse(sd.vae, [toyworld.random_scene(check) for _ in range(48)]),
            "subject": recon_rmse(sd.vae, [toyworld.draw(check, "ring", toyworld.SUBJECT["colour"])
                                           for _ in range(48)])}
    print("vae reconstruction rmse (0..255): " + ", ".join(f"{k} {v:.1f}" for k, v in rmse.items()), flush=True)
    seconds = time.time() - t0
    sd.name, sd.sampling = "toy", SAMPLING
    metadata = {"made_by": "make_toy.py", "seed": str(args.seed), "threads": str(args.threads),
                **({"device": str(sd.device)} if sd.device.type != "cpu" else {}), **vae_metadata,
                "unet_steps": str(args.unet_steps), "noise_offset": str(NOISE_OFFSET),
                "seconds": f"{seconds:.0f}", "torch": torch.__version__,
                "vae_rmse": ", ".join(f"{k} {v:.1f}" for k, v in rmse.items()),
                "captions": "a <colour> <shape> 70 %, a <shape> 20 %, empty 10 %; shapes " +
                            ", ".join(toyworld.SHAPES) + "; colours " + ", ".join(toyworld.COLOURS)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dreambooth.save(sd.to("cpu"), args.out, metadata=metadata)
    draw_subject(args.subject_dir, rngs[3])
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB) and {args.subject_dir}/ in {seconds:.0f} s")


if __name__ == "__main__":
    cli.run(main)
