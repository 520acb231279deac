"""Generate images from text with a Stable Diffusion v1 checkpoint, for example one that train.py fine-tuned.

    python sample.py --ckpt runs/dog-<date>/model.safetensors --prompt "a sks dog in the snow"
    python sample.py --ckpt runs/dog-<date>/model.safetensors --from-file prompts.txt --n_samples 4 --n_iter 2

The flags are those of the CompVis scripts/stable_txt2img.py (dashed spellings work too). Each image is a numbered
PNG in --outdir, continuing after the highest number already there (nothing is overwritten), and carries
AUTOMATIC1111's 'parameters' text (prompt, negative prompt, steps, sampler, CFG scale, seed, size, model), so
A1111's "PNG Info" tab can read it. Image k of a run is made from seed --seed + k: the same flags give the same
images, and `--seed <its seed> --n_samples 1` makes one of them again (equal up to the last bits of the floating-
point arithmetic, which can depend on the batch size).
"""
import startup  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads, and makes Ctrl-C exit 130)
from pathlib import Path

import cli
from dreambooth.generate import generate
from dreambooth.images import a1111_parameters, image_grid, next_index

SCALE = 7.5  # the guidance scale of SD's txt2img (a model file may name its own: the toy's does)


def parse_args(argv=None):
    p = cli.parser("sample.py", "Text to image with a Stable Diffusion v1 checkpoint (DDIM sampler).", [
        'python sample.py --prompt "a red circle"                            # weights/sd-v1-4.ckpt, else the toy',
        'python sample.py --ckpt runs/demo/model.safetensors --prompt "a sks circle" --n_samples 8   # the README\'s '
        "first run",
        'python sample.py --ckpt toy --prompt "a blue square" --n_samples 4 --n_iter 2 --seed 7 --outdir outputs/toy'])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to draw")
    what.add_argument("--from-file", "--from_file", dest="from_file", metavar="FILE",
                      help="a text file with one prompt a line, instead of --prompt")
    p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default="",
                   help='what to steer away from (the "unconditional" prompt of guidance)')
    cli.add_sampling_flags(p, scale=SCALE)
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights (the -full-ema files)")
    p.add_argument("--outdir", default="outputs/samples", help="where the PNGs go")
    p.add_argument("--ddim_eta", "--ddim-eta", dest="ddim_eta", type=cli.number(float), default=0.0,
                   help="0 = deterministic DDIM, 1 = as much fresh noise per step as DDPM")
    p.add_argument("--n_samples", "--n-samples", dest="n_samples", type=cli.number(low=1), default=1,
                   help="batch size: images made at once (1 is light enough for a CPU; 3-4 on a GPU)")
    p.add_argument("--n_iter", "--n-iter", dest="n_iter", type=cli.number(low=1), default=1,
                   help="how many times to go through the prompts")
    p.add_argument("--seed", type=cli.SEED, default=42, help="image k of the run uses seed + k")
    p.add_argument("--skip_grid", "--skip-grid", dest="skip_grid", action="store_true",
                   help="do not write the grid of all the run's images")
    cli.show_toy_defaults(p, "sample.py")
    args = p.parse_args(argv)

    if args.from_file:
        if not Path(args.from_file).is_file():
            p.error(f"--from-file {args.from_file}: no such file")
        try:
            text = Path(args.from_file).read_bytes().decode()
        except UnicodeDecodeError as e:
            p.error(f"--from-file {args.from_file}: not text ({e})")
        args.prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not args.prompts:
            p.error(f"--from-file {args.from_file}: no prompts in it")
    else:
        args.prompts = [args.prompt] * args.n_samples  # as in stable_txt2img.py: one batch of the same prompt
    cli.check_sampling_flags(p, args)
    return args


def written(outdir, n):
    """What a failed run leaves, for its one-line error."""
    if not n:
        return "no image was written"
    return f"the image before it is in {outdir}" if n == 1 else f"the {n} images before it are in {outdir}"


def main(argv=None):
    args = parse_args(argv)
    cli.check_outdir("sample.py", "--outdir", args.outdir)
    sd = cli.load_model(args, "sample.py")
    cli.sampling_defaults(args, sd, scale=SCALE)
    height, width = args.H or sd.resolution, args.W or sd.resolution
    model, vae = cli.model_name(args.ckpt), args.vae and Path(args.vae).name

    def parameters(prompt, seed):  # PNG info as A1111 writes it
        return a1111_parameters(cli.with_loras(prompt, args.lora), args.negative_prompt, args.ddim_steps, args.scale,
                                seed, width, height, model, args.ddim_eta, vae)

    # The run: --n_iter passes over the prompts, in batches of --n_samples; image k gets seed + k.
    cli.note_long_prompts(sd.tokenizer, args.prompts)
    prompts = [prompt for _ in range(args.n_iter) for prompt in args.prompts]
    seeds = [args.seed + k for k in range(len(prompts))]
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    first = next_index(outdir)
    images = []
    with cli.progress(total=len(prompts), desc="sampling", unit="image") as bar:
        for start in range(0, len(prompts), args.n_samples):
            batch, batch_seeds = prompts[start:start + args.n_samples], seeds[start:start + args.n_samples]
            try:
                batch_images = generate(sd, batch, batch_seeds, args.negative_prompt, args.ddim_steps, args.scale,
                                        args.ddim_eta, height, width, progress=cli.interactive(),
                                        precision=args.precision)
            except ValueError as e:  # latents that are not finite: black images
                raise SystemExit(f"sample.py: error: {e}; {written(outdir, start)}") from None
            for k, (prompt, seed, image) in enumerate(zip(batch, batch_seeds, batch_images), start=start):
                cli.save_image("sample.py", image, outdir / f"{first + k:05d}.png", parameters(prompt, seed),
                               written(outdir, k))
            images += batch_images
            bar.update(len(batch))

    where = f"{outdir}/{first:05d}.png" + (f" .. {first + len(images) - 1:05d}.png" if len(images) > 1 else "")
    if not args.skip_grid and len(images) > 1:
        grid = outdir / f"grid-{next_index(outdir, prefix='grid-'):04d}.png"
        # A1111 labels a grid by its first image
        cli.save_image("sample.py", image_grid(images, cols=args.n_samples), grid, parameters(prompts[0], seeds[0]),
                       written(outdir, len(images)))
        where += f" and the grid {grid}"
    print(f"wrote {len(images)} image{'s' * (len(images) > 1)}: {where}")


if __name__ == "__main__":
    cli.run(main)
