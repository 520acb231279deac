"""Generate the class images for DreamBooth's prior-preservation loss.

    python make_prior.py --class dog             # 200 images of "photo of a dog" in prior/dog/
    python train.py --instance photos/ --prior prior/dog --class dog

DreamBooth trains on the subject's photos and, in the same batches, on images the model itself made of the bare
class ("photo of a dog"), so that "dog" keeps meaning dogs in general. This writes those images with the
settings of the original DreamBooth regularisation sets: guidance scale 10, 50 DDIM steps, eta 0.

Image i is always made from seed --seed + i and the (i mod n)-th of the n prompts, and named f"{i:05d}.png"; each
finished image gets a line in manifest.jsonl (file, prompt, seed, steps, scale, eta, checkpoint, height, width;
train.py trains each image with its prompt). So an interrupted run continues where it stopped when started again,
and the result is the same as an uninterrupted run: images are made in fixed batches (i // --batch-size), and a
batch with any image missing is made again in full, so every image is computed alongside the same neighbours. A
folder made with other settings is refused rather than mixed.

There is no safety checker: a checker blacks out the images it flags, and black images in the prior would
silently teach the model that black squares are dogs.
"""
import startup  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads, and makes Ctrl-C exit 130)
import json
import os
from pathlib import Path

from PIL import Image

import cli
from dreambooth.files import write_atomic
from dreambooth.generate import generate
from dreambooth.images import a1111_parameters, save_png

ETA = 0.0     # deterministic DDIM, as in the regularisation sets of the original DreamBooth runs
SCALE = 10.0  # their guidance scale (a model file may name its own: the toy's does)


def parse_args(argv=None):
    p = cli.parser("make_prior.py", "Generate class images for DreamBooth's prior preservation.", [
        "python make_prior.py --class dog                     # 200 images of \"photo of a dog\" in prior/dog/",
        "python make_prior.py --class circle                  # without weights: the toy model, \"a circle\", "
        "\"a red circle\", ...",
        'python make_prior.py --prompt "a photo of a corgi" --outdir prior/corgi --batch-size 8'],
        usage="make_prior.py --class NAME [options]  |  make_prior.py --prompt TEXT --outdir DIR [options]")
    p.add_argument("--class", dest="class_name", metavar="NAME", help='the class of the subject, e.g. "dog"')
    p.add_argument("--prompt", dest="prompts", action="append", metavar="PROMPT",
                   help='default "photo of a {class}" (toy: "a {class}" and "a red {class}", ... in its four colours); '
                        "repeat it for several: image i gets the (i mod their number)-th")
    p.add_argument("--num", type=cli.number(low=1), default=200, help="how many images the folder should hold")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=cli.number(low=1), default=4,
                   help="images made at once (8 fits a 16 GB GPU at 512 px)")
    p.add_argument("--outdir", help="default prior/<class>")
    p.add_argument("--seed", type=cli.SEED, default=42, help="image i uses seed + i")
    cli.add_sampling_flags(p, scale=SCALE)
    cli.show_toy_defaults(p, "make_prior.py")
    args = p.parse_args(argv)

    if not args.class_name and not args.prompts:
        p.error("--class NAME is required (or give --prompt and --outdir)")
    if not args.outdir and not args.class_name:
        p.error("--outdir DIR is required without --class")
    args = cli.with_toy_defaults(p, args, argv, "make_prior.py")
    args.prompts = args.prompts or cli.prior_prompts(args.ckpt, args.class_name)
    args.outdir = Path(args.outdir or Path("prior", args.class_name))
    cli.check_sampling_flags(p, args)
    return args


def prompt_of(prompts: list[str], i: int) -> str:
    """Image i's prompt: the prompts take turns, so a resumed run gives every image the one it had."""
    return prompts[i % len(prompts)]


def read_manifest(outdir: Path, settings: dict, prompts: list[str]) -> set[str]:
    """The files of outdir that manifest.jsonl records as finished (and that exist), after checking that every
    record was made with `settings` and its image's prompt. A last line cut short by an interruption is dropped."""
    manifest = outdir / "manifest.jsonl"
    if not manifest.exists():
        return set()
    try:
        text = manifest.read_bytes().decode()
    except UnicodeDecodeError as e:
        raise SystemExit(f"make_prior.py: error: {manifest} is not a manifest (not text: {e})") from None
    lines = text.splitlines()
    if text and not text.endswith("\n"):  # the run stopped while appending this line
        lines.pop()
        write_atomic(manifest, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))
    done, keys = set(), {*settings, "prompt", "vae", "lora"}  # vae, lora: recorded only when --vae, --lora were given
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            index = int(Path(record["file"]).stem)
            recorded = {key: record.get(key) for key in keys} | {"seed": record["seed"] - index}
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"make_prior.py: error: {manifest} line {n} is not a manifest record ({e})") from None
        for key in keys:
            value = prompt_of(prompts, index) if key == "prompt" else settings.get(key)
            if recorded[key] != value:
                raise SystemExit(f"make_prior.py: error: {outdir} holds images made with {key} {recorded[key]!r}, "
                                 f"not {value!r}; choose another --outdir or empty the folder")
        if (outdir / record["file"]).is_file():
            done.add(record["file"])
    return done


def parameters(args, settings, i):
    """Image i's PNG info, as A1111 writes it."""
    return a1111_parameters(cli.with_loras(prompt_of(args.prompts, i), args.lora), "", args.ddim_steps, args.scale,
                            args.seed + i, settings["width"], settings["height"], cli.model_name(args.ckpt), ETA,
                            settings.get("vae"))


def check_unlisted(args, settings, paths):
    """Files about to be written that manifest.jsonl does not list may only be this command's own: a PNG whose
    line the run did not live to write (its PNG info is what this run writes). Anything else is not replaced."""
    for i, path in paths.items():
        try:
            with Image.open(path, formats=["PNG"]) as img:
                ours = img.text.get("parameters") == parameters(args, settings, i)
        except (OSError, ValueError, SyntaxError):
            ours = False
        if not ours:
            raise SystemExit(f"make_prior.py: error: {path} is not in {args.outdir / 'manifest.jsonl'} nor an image "
                             "this command makes; move it away or choose another --outdir")


def write_batches(sd, args, todo, names, done, settings, remaining):
    """Generate the batches still to do; each image is finished once its manifest line is on the disk."""
    outdir, path = args.outdir, args.outdir / "manifest.jsonl"
    kept = f"the images finished so far are in {outdir}/; the same command goes on from there"
    with open(path, "a") as manifest, \
            cli.progress(total=args.num, initial=args.num - remaining, desc="prior", unit="image") as bar:
        for batch in todo:
            prompts = [prompt_of(args.prompts, i) for i in batch]
            try:
                images = generate(sd, prompts, [args.seed + i for i in batch], steps=args.ddim_steps,
                                  scale=args.scale, eta=ETA, height=settings["height"], width=settings["width"],
                                  progress=False, precision=args.precision)
            except ValueError as e:  # latents that are not finite: black images, which must not enter a prior
                raise SystemExit(f"make_prior.py: error: {e}; {kept}") from None
            for i, prompt, image in zip(batch, prompts, images):
                if names[i] in done:
                    continue
                record = {"file": names[i], "prompt": prompt} | settings | {"seed": args.seed + i}
                target = outdir / names[i]
                try:  # a full disk, say: one line naming the file
                    save_png(image, target, parameters(args, settings, i))
                    target = path
                    manifest.write(json.dumps(record) + "\n")
                    manifest.flush()
                    os.fsync(manifest.fileno())
                except OSError as e:
                    raise SystemExit(f"make_prior.py: error: writing {target} failed ({e.strerror or e}); {kept}") \
                        from None
                bar.update(1)


def main(argv=None):
    args = parse_args(argv)
    cli.check_outdir("make_prior.py", "--outdir", args.outdir)
    sd = cli.load_model(args, "make_prior.py")
    cli.sampling_defaults(args, sd, scale=SCALE)
    height, width = args.H or sd.resolution, args.W or sd.resolution
    cli.note_long_prompts(sd.tokenizer, args.prompts)

    # What is already there: a resumed run must use the same settings. ("seed" here is the base seed; a manifest
    # line records seed + i, and read_manifest subtracts i again.)
    settings = {"seed": args.seed, "steps": args.ddim_steps, "scale": args.scale, "eta": ETA,
                "checkpoint": sd.name, "height": height, "width": width}
    if args.vae:  # recorded only when given, so that folders made before --vae existed still match
        settings["vae"] = Path(args.vae).name
    if args.lora:  # likewise
        settings["lora"] = [[Path(path).name, scale] for path, scale in args.lora]
    outdir = args.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    done = read_manifest(outdir, settings, args.prompts)
    names = [f"{i:05d}.png" for i in range(args.num)]
    batches = [range(start, min(start + args.batch_size, args.num)) for start in range(0, args.num, args.batch_size)]
    todo = [batch for batch in batches if any(names[i] not in done for i in batch)]
    remaining = sum(names[i] not in done for batch in todo for i in batch)
    check_unlisted(args, settings, {i: outdir / names[i] for batch in todo for i in batch
                                    if names[i] not in done and (outdir / names[i]).exists()})

    # Generate batch by batch; an image counts as finished once its manifest line is written.
    try:
        write_batches(sd, args, todo, names, done, settings, remaining)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the images finished so far are in {outdir}/; the same command goes on from there")
        raise SystemExit(130) from None

    class_flag = f"--class {args.class_name}" if args.class_name else f'--prior-prompt "{args.prompts[0]}"'
    print(f"{args.num} class images of {' / '.join(map(repr, args.prompts))} in {outdir}/ (manifest.jsonl lists "
          f"them); use them with: python train.py --instance <photos> --prior {outdir} {class_flag}")


if __name__ == "__main__":
    cli.run(main)
