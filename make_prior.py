"""Generate the class images for DreamBooth's prior-preservation loss.

    python make_prior.py --class dog             # 200 images of "photo of a dog" in prior/dog/
    torchrun --nproc_per_node 4 make_prior.py --class dog  # the same folder, made by 4 GPUs
    python train.py --instance photos/ --prior prior/dog --class dog

DreamBooth trains on the subject's photos and, in the same batches, on images the model itself made of the bare
class ("photo of a dog"), so that "dog" keeps meaning dogs in general. This writes those images with the
settings of the original DreamBooth regularisation sets: guidance scale 10, 50 DDIM steps, eta 0.

Image i is always made from seed --seed + i and the (i mod n)-th of the n prompts, and named f"{i:05d}.png"; each
finished image gets a line in manifest.jsonl (manifest.py; train.py trains each image with its prompt). So an
interrupted run continues where it stopped when started again, and the result is the same as an uninterrupted run:
images are made in fixed batches (i // --batch-size), and a batch with any image missing is made again in full, so
every image is computed alongside the same neighbours. A folder made with other settings is refused rather than mixed.

Under torchrun (ranks.py) the batches still to do are dealt out in rounds, one to each process, which makes its
images and encodes them as PNG files (at 512 px encoding takes about a quarter of the time a fast GPU takes to make
an image: too long for one process to do for all). Rank 0 alone writes the folder, file by file in index order: the
folder one process writes, and an interrupted run continues with any number of processes.

There is no safety checker: a checker blacks out the images it flags, and black images in the prior would
silently teach the model that black squares are dogs.
"""
import startup  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads, and makes Ctrl-C exit 130)
import contextlib
from pathlib import Path

from PIL import Image

import cli
import manifest
import ranks
from dreambooth.files import write_atomic
from dreambooth.generate import generate
from dreambooth.images import a1111_parameters, png_bytes

ETA = 0.0     # deterministic DDIM, as in the regularisation sets of the original DreamBooth runs
SCALE = 10.0  # their guidance scale (a model file may name its own: the toy's does)


def parse_args(argv=None):
    p = cli.parser("make_prior.py", "Generate class images for DreamBooth's prior preservation.", [
        "python make_prior.py --class dog                     # 200 images of \"photo of a dog\" in prior/dog/",
        "python make_prior.py --class circle                  # without weights: the toy model, \"a circle\", "
        "\"a red circle\", ...",
        'python make_prior.py --prompt "a photo of a corgi" --outdir prior/corgi --batch-size 8',
        "torchrun --nproc_per_node 4 make_prior.py --class dog --num-class-images 400   # 4 GPUs, one folder"],
        usage="make_prior.py --class NAME [options]  |  make_prior.py --prompt TEXT --outdir DIR [options]")
    p.add_argument("--class", dest="class_name", metavar="NAME", help='the class of the subject, e.g. "dog"')
    p.add_argument("--prompt", dest="prompts", action="append", metavar="PROMPT",
                   help='default "photo of a {class}" (toy: "a {class}" and "a red {class}", ... in its four colours); '
                        "repeat it for several: image i gets the (i mod their number)-th")
    p.add_argument("--num", "--num-class-images", "--num_class_images", dest="num", type=cli.number(low=1),
                   default=200, help="how many images the folder should hold (under torchrun write "
                                     "--num-class-images: torchrun takes --num for its own --numa-binding)")
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
    record was made with `settings` and its image's prompt."""
    done, keys = set(), {*settings, "prompt", "vae", "lora"}  # vae, lora: recorded only when --vae, --lora were given
    for n, record in enumerate(manifest.read(outdir, "make_prior.py", repair=True), start=1):
        try:
            index = int(Path(record["file"]).stem)
            recorded = {key: record.get(key) for key in keys} | {"seed": record["seed"] - index}
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"make_prior.py: error: {outdir / manifest.NAME} line {n} is not make_prior.py's "
                             f"manifest ({e!r})") from None
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
            raise SystemExit(f"make_prior.py: error: {path} is not in {args.outdir / manifest.NAME} nor an image "
                             "this command makes; move it away or choose another --outdir")


def plan(args, settings, names, batches):
    """The images of the folder that are finished, and the batches with any image still to make, after checking
    that the folder holds nothing else this command would replace."""
    outdir = args.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    done = read_manifest(outdir, settings, args.prompts)
    todo = [batch for batch in batches if any(names[i] not in done for i in batch)]
    check_unlisted(args, settings, {i: outdir / names[i] for batch in todo for i in batch
                                    if names[i] not in done and (outdir / names[i]).exists()})
    return todo, done


def make_batch(sd, args, settings, batch, names, done):
    """(a batch's PNG files as bytes, None for its images already finished, None), or (None, why not): latents that
    are not finite, which would decode to black images, and black images must not enter a prior."""
    try:
        images = generate(sd, [prompt_of(args.prompts, i) for i in batch], [args.seed + i for i in batch],
                          steps=args.ddim_steps, scale=args.scale, eta=ETA, height=settings["height"],
                          width=settings["width"], progress=False, precision=args.precision)
    except ValueError as e:
        return None, str(e)
    return [None if names[i] in done else png_bytes(image, parameters(args, settings, i))
            for i, image in zip(batch, images)], None


def write_batch(args, batch, pngs, names, done, settings, manifest_file, bar):
    """Write a batch's PNG files that are not finished yet, each with its manifest line; None, or why a write
    failed."""
    for i, png in zip(batch, pngs):
        if names[i] in done:
            continue
        record = {"file": names[i], "prompt": prompt_of(args.prompts, i)} | settings | {"seed": args.seed + i}
        target = args.outdir / names[i]
        try:  # a full disk, say: one line naming the file
            write_atomic(target, lambda tmp: tmp.write_bytes(png))
            target = Path(manifest_file.name)
            manifest.append(manifest_file, record)
        except OSError as e:
            return f"writing {target} failed ({e.strerror or e})"
        bar.update(1)
        if bar.disable and (i + 1) % max(1, args.num // 10) == 0:  # no bar (the output goes to a file): a line a tenth
            print(f"prior: {i + 1}/{args.num} images", flush=True)
    return None


def write_batches(sd, args, todo, names, done, settings, group):
    """Generate the batches still to do; each image is finished once its manifest line is on the disk. Under
    torchrun the batches are dealt out in rounds, batch k of a round to rank k, which encodes it too, and rank 0
    writes the round's files in index order: the folder one process would write."""
    size, rank = (group.size, group.rank) if group else (1, 0)
    remaining = sum(names[i] not in done for batch in todo for i in batch)
    kept = f"the images finished so far are in {args.outdir}/; the same command goes on from there"
    with (open(args.outdir / manifest.NAME, "a") if rank == 0 else contextlib.nullcontext()) as manifest_file, \
            cli.progress(total=args.num, initial=args.num - remaining, desc="prior", unit="image") as bar:
        for start in range(0, len(todo), size):
            batches = todo[start:start + size]  # the last round may leave some ranks without one
            made = make_batch(sd, args, settings, batches[rank], names, done) if rank < len(batches) else None
            made = ranks.gather(group, made)  # on rank 0 each rank's (PNG files, error), in rank order: in index order
            error = None
            for batch, (pngs, failed) in zip(batches, made if rank == 0 else []):
                error = failed or write_batch(args, batch, pngs, names, done, settings, manifest_file, bar)
                if error:
                    break
            stop = group.any(error is not None) if group else error is not None  # all ranks stop in one round
            if stop:
                raise SystemExit(f"make_prior.py: error: {error}; {kept}" if rank == 0 else 1)


def main(argv=None):
    args = parse_args(argv)
    group, args.device = ranks.join(args.device, "make_prior.py")
    try:
        make(args, group)
    finally:
        ranks.leave(group)


def make(args, group):
    """The folder of class images, on the device of this process."""
    ranks.on_main(group, lambda: cli.check_outdir("make_prior.py", "--outdir", args.outdir))
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
    names = [f"{i:05d}.png" for i in range(args.num)]
    batches = [range(start, min(start + args.batch_size, args.num)) for start in range(0, args.num, args.batch_size)]
    todo, done = ranks.on_main(group, lambda: plan(args, settings, names, batches))

    # Generate batch by batch; an image counts as finished once its manifest line is written.
    try:
        with cli.interrupts_raise():
            write_batches(sd, args, todo, names, done, settings, group)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the images finished so far are in {args.outdir}/; the same command goes on from there")
        raise SystemExit(130) from None

    class_flag = f"--class {args.class_name}" if args.class_name else f'--prior-prompt "{args.prompts[0]}"'
    print(f"{args.num} class images of {' / '.join(map(repr, args.prompts))} in {args.outdir}/ (manifest.jsonl lists "
          f"them); use them with: python train.py --instance <photos> --prior {args.outdir} {class_flag}")


if __name__ == "__main__":
    cli.run(main)
