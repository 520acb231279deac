"""DreamBooth on the toy model, measured: does the base model draw what it is told, does DreamBooth teach it the
subject, and does the prior keep the class from drifting?

    python make_toy.py                          # once: dreambooth/toy.safetensors and examples/toy/
    python benchmarks/toy.py                    # about 5 minutes on 2 cores
    python benchmarks/toy.py --images docs/toy  # and the README's pictures
    python benchmarks/toy.py --steps 300 --lr 2e-5 --skip-no-prior

The subject is the pink ring of examples/toy (dreambooth/toyworld.py: SUBJECT), its class "circle". The script
runs the repo's real programs as a user would (make_prior.py, then train.py twice: with and without --prior) and
judges every picture with toyworld's classical measure (dominant_colour, shape_of), which is itself checked first
on freshly drawn pictures. Figures printed:

  measure     accuracy of dominant_colour / shape_of on drawn pictures of the vocabulary (and of the subject)
  base        the toy model on "a <colour> <shape>": colour right, shape right
  prior       after DreamBooth with prior preservation: "a sks circle" showing the subject, "a circle" NOT showing
              it, and the colour accuracy of the vocabulary prompts
  no prior    the same after plain fine-tuning: "a circle" drifts toward the subject
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root: dreambooth/, the programs

import cli  # noqa: E402
import dreambooth  # noqa: E402
import train_settings  # noqa: E402
from dreambooth import toyworld  # noqa: E402
from dreambooth.generate import generate  # noqa: E402
from dreambooth.images import image_grid  # noqa: E402

VOCABULARY = [(c, s) for s in toyworld.SHAPES for c in toyworld.COLOURS]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="dreambooth/toy.safetensors", help="the toy model (make_toy.py)")
    p.add_argument("--instance", default="examples/toy", help="the subject's pictures")
    p.add_argument("--work", default="runs/toy-benchmark", help="folder for the prior and the runs (emptied first)")
    # train.py's settings for --ckpt toy (the README's command), parsed as train.py parses them
    toy, _ = train_settings.parse_args(["--ckpt", "toy", "--instance", "examples/toy", "--class", "circle"])
    p.add_argument("--steps", type=int, default=toy.steps, help="train.py --steps")
    p.add_argument("--lr", type=float, default=toy.lr, help="train.py --lr")
    p.add_argument("--batch-size", type=int, default=toy.batch_size, help="train.py --batch-size")
    p.add_argument("--prior-weight", type=float, default=toy.prior_weight, help="train.py --prior-weight")
    p.add_argument("--noise-offset", type=float, default=toy.noise_offset, help="train.py --noise-offset")
    p.add_argument("--prior-num", type=int, default=cli.TOY_DEFAULTS["make_prior.py"]["num"],
                   help="class pictures made by make_prior.py")
    p.add_argument("--scale", type=float, default=cli.TOY_SAMPLING["scale"],
                   help="guidance scale of all sampling (prior included)")
    p.add_argument("--sample-steps", type=int, default=cli.TOY_SAMPLING["ddim_steps"],
                   help="DDIM steps of all sampling")
    p.add_argument("--n", type=int, default=16, help="samples per prompt for the DreamBooth figures")
    p.add_argument("--threads", type=int, default=2, help="torch threads, here and in the programs")
    p.add_argument("--device", default="cpu", help="where the programs and the sampling here run (cuda: in fp32, "
                                                   "as on the CPU)")
    p.add_argument("--skip-no-prior", action="store_true", help="only the run with prior preservation")
    p.add_argument("--class-prompt-only", action="store_true",
                   help='a prior of "a circle" alone (the paper\'s class prior), not make_prior.py\'s toy prompts')
    p.add_argument("--images", metavar="DIR", help="also write the README's pictures there (docs/toy): 8 samples, "
                                                   "seeds 200-207, of 'a sks circle' before and after, and of 'a "
                                                   "circle' after training with and without the prior")
    return p.parse_args(argv)


def check_measure(n: int = 50) -> dict:
    """Accuracy of the measure on freshly drawn pictures: n per vocabulary pair, and n of the subject."""
    rng = np.random.default_rng(2024)
    colour = shape = 0
    for c, s in VOCABULARY:
        for _ in range(n):
            image = toyworld.draw(rng, s, c)
            colour += toyworld.dominant_colour(image) == c
            shape += toyworld.shape_of(image) == s
    subject = sum(toyworld.is_subject(toyworld.draw(rng, toyworld.SUBJECT["shape"], toyworld.SUBJECT["colour"]))
                  for _ in range(n))
    total = n * len(VOCABULARY)
    return {"colour": colour / total, "shape": shape / total, "subject": subject / n}


def sample(sd, prompt: str, n: int, args, seed: int = 1000) -> list:
    return generate(sd, [prompt] * n, list(range(seed, seed + n)), steps=args.sample_steps, scale=args.scale,
                    progress=False)


def save_row(sd, prompt: str, path: Path, args) -> None:
    """The README's pictures: one row of 8 samples, seeds 200-207."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(sample(sd, prompt, 8, args, seed=200), cols=8).save(path)


def vocabulary_accuracy(sd, args, per_prompt: int) -> dict:
    """Colour and shape accuracy over per_prompt samples of every "a <colour> <shape>"."""
    colour = shape = 0
    for c, s in VOCABULARY:
        images = sample(sd, f"a {c} {s}", per_prompt, args)
        colour += sum(toyworld.dominant_colour(im) == c for im in images)
        shape += sum(toyworld.shape_of(im) == s for im in images)
    total = per_prompt * len(VOCABULARY)
    return {"colour": colour / total, "shape": shape / total}


def run(cmd: list[str], args) -> float:
    """Run one of the repo's programs; returns its wall time in seconds. Stops the benchmark if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.time()
    result = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.time() - t0


def dreambooth_run(args, work: Path, prior: bool) -> dict:
    """train.py on the subject (with or without the prior), then the DreamBooth figures of the result."""
    out = work / ("prior" if prior else "no-prior")
    cmd = ["train.py", "--ckpt", args.ckpt, "--instance", args.instance, "--class", "circle", "--token", "sks",
           "--instance-prompt", "a sks circle", "--steps", str(args.steps), "--lr", str(args.lr),
           "--batch-size", str(args.batch_size), "--noise-offset", str(args.noise_offset), "--sample-every", "0",
           "--save-every", "0", "--device", args.device, "--precision", "fp32", "--out", str(out)]
    seconds = run(cmd + (["--prior", str(work / "class"), "--prior-weight", str(args.prior_weight)] if prior else []),
                  args)
    sd = dreambooth.load(out / "model.safetensors", device=args.device)
    if args.images:
        if prior:
            save_row(sd, "a sks circle", Path(args.images, "after.png"), args)
        save_row(sd, "a circle", Path(args.images, f"class-with{'' if prior else 'out'}-prior.png"), args)
    subject = sum(map(toyworld.is_subject, sample(sd, "a sks circle", args.n, args)))
    class_images = sample(sd, "a circle", args.n, args)
    drift = sum(map(toyworld.is_subject, class_images))
    in_colour = sum(toyworld.dominant_colour(im) == toyworld.SUBJECT["colour_name"] for im in class_images)
    return {"seconds": seconds, "subject": subject, "class_drift": drift, "class_in_colour": in_colour,
            **vocabulary_accuracy(sd, args, per_prompt=4)}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = ROOT / args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    measure = check_measure()
    print(f"measure on drawn pictures: colour {measure['colour']:.1%}, shape {measure['shape']:.1%}, "
          f"subject {measure['subject']:.1%}", flush=True)

    sd = dreambooth.load(ROOT / args.ckpt, device=args.device)
    if args.images:
        save_row(sd, "a sks circle", Path(args.images, "before.png"), args)
    base = vocabulary_accuracy(sd, args, per_prompt=8)
    base_drift = sum(map(toyworld.is_subject, sample(sd, "a circle", args.n, args)))
    print(f"base model, {8 * len(VOCABULARY)} samples at scale {args.scale}: colour {base['colour']:.1%} "
          "(target 90 %), "
          f"shape {base['shape']:.1%} (target 80 %); 'a circle' shows the subject {base_drift}/{args.n}", flush=True)

    # make_prior.py --class circle's prompts with --ckpt toy, given as --prompt: --ckpt here may be a remade file
    prompts = [flag for p in (["a circle"] if args.class_prompt_only else cli.prior_prompts("toy", "circle"))
               for flag in ("--prompt", p)]
    prior_seconds = run(["make_prior.py", "--ckpt", args.ckpt, *prompts, "--outdir", str(work / "class"),
                         "--num", str(args.prior_num), "--scale", str(args.scale), "--ddim_steps",
                         str(args.sample_steps), "--batch-size", "20", "--device", args.device, "--precision", "full"],
                        args)
    print(f"make_prior.py: {args.prior_num} pictures of {' / '.join(prompts[1::2])} in {prior_seconds:.0f} s",
          flush=True)
    settings = (f"--steps {args.steps} --lr {args.lr} --batch-size {args.batch_size} "
                f"--prior-weight {args.prior_weight} --noise-offset {args.noise_offset}")
    for prior in (True, False) if not args.skip_no_prior else (True,):
        r = dreambooth_run(args, work, prior)
        print(f"train.py {settings} {'with' if prior else 'without'} --prior: {r['seconds']:.0f} s (target 180 s); "
              f"'a sks circle' shows the subject {r['subject']}/{args.n} (target >= 12); 'a circle' shows it "
              f"{r['class_drift']}/{args.n} ({toyworld.SUBJECT['colour_name']} {r['class_in_colour']}/{args.n}; "
              f"target <= 2 with the prior); vocabulary colour {r['colour']:.1%} (target 90 %), "
              f"shape {r['shape']:.1%}", flush=True)


if __name__ == "__main__":
    main()
