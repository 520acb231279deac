"""DreamBooth on the toy model, measured: does the base model draw what it is told, does DreamBooth teach it the
subject, and does the class keep its meaning?

    python make_toy.py --out dreambooth/toy.safetensors --subject-dir examples/toy --force   # once (it ships)
    python benchmarks/toy.py                    # about 8 minutes on 2 cores
    python benchmarks/toy.py --images docs/toy  # and the README's pictures
    python benchmarks/toy.py --subject lime-cross --skip-no-prior   # a held-out subject (benchmarks/subjects/)

The subject is the pink ring of examples/toy (dreambooth/toyworld.py: SUBJECT), its class "circle", or with
--subject one of the subjects in benchmarks/subjects/ that no setting was tuned on. The script runs the repo's real
programs as a user would (make_prior.py, then train.py twice: with and without --prior) and judges every picture
with the toy world's classical measure (benchmarks/measure.py: dominant_colour, shape_of, hue_family), which is
itself checked first on freshly drawn pictures. Figures printed:

  measure     accuracy of dominant_colour / shape_of on drawn pictures of the vocabulary (and of the subject)
  base        the toy model on "a <colour> <shape>": colour right, shape right
  prior       after DreamBooth with prior preservation: "a sks <class>" showing the subject (16 samples); the class
              kept (measure.class_kept on 32 samples of "a <class>", seeds 50-81, before and after: the distance of
              the colour mixes, the seeds that keep their colour family, the samples that show the subject); the
              colour accuracy of the vocabulary prompts
  no prior    the same after plain fine-tuning: the class drifts
"""
import argparse
import json
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
from benchmarks import measure  # noqa: E402
from dreambooth import toyworld  # noqa: E402
from dreambooth.generate import generate  # noqa: E402
from dreambooth.images import image_grid  # noqa: E402

VOCABULARY = [(c, s) for s in toyworld.SHAPES for c in toyworld.COLOURS]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="dreambooth/toy.safetensors", help="the toy model (make_toy.py)")
    p.add_argument("--subject", default="examples/toy", help="the subject: the shipped one's pictures, or the name of "
                                                             "a folder in benchmarks/subjects/")
    p.add_argument("--work", default="runs/toy-benchmark", help="folder for the prior and the runs (emptied first)")
    # train.py's settings for --ckpt toy (the README's command), parsed as train.py parses them
    toy, _ = train_settings.parse_args(["--ckpt", "toy", "--instance", "examples/toy", "--class", "circle"])
    p.add_argument("--steps", type=int, default=toy.steps, help="train.py --steps")
    p.add_argument("--lr", type=float, default=toy.lr, help="train.py --lr")
    p.add_argument("--batch-size", type=int, default=toy.batch_size, help="train.py --batch-size")
    p.add_argument("--prior-weight", type=float, default=toy.prior_weight, help="train.py --prior-weight")
    p.add_argument("--prior-loss", default=toy.prior_loss, help="train.py --prior-loss")
    p.add_argument("--noise-offset", type=float, default=toy.noise_offset, help="train.py --noise-offset")
    p.add_argument("--prior-num", type=int, default=cli.TOY_DEFAULTS["make_prior.py"]["num"],
                   help="class pictures made by make_prior.py")
    p.add_argument("--scale", type=float, default=cli.toy_sampling()["scale"],
                   help="guidance scale of all sampling (prior included)")
    p.add_argument("--sample-steps", type=int, default=cli.toy_sampling()["ddim_steps"],
                   help="DDIM steps of all sampling")
    p.add_argument("--n", type=int, default=16, help="samples per prompt for the DreamBooth figures")
    p.add_argument("--threads", type=int, default=2, help="torch threads, here and in the programs")
    p.add_argument("--device", default="cpu", help="where the programs and the sampling here run (cuda: in fp32, "
                                                   "as on the CPU)")
    p.add_argument("--skip-no-prior", action="store_true", help="only the run with prior preservation")
    p.add_argument("--class-prompt-only", action="store_true",
                   help='a prior of "a circle" alone (the paper\'s class prior), not make_prior.py\'s toy prompts')
    p.add_argument("--prior", metavar="DIR", help="class pictures made earlier by make_prior.py with this script's "
                                                  "settings (skips making them)")
    p.add_argument("--images", metavar="DIR", help="also write the README's pictures there (docs/toy): 8 samples "
                                                   "of 'a sks <class>' (seeds 200-207) before and after, and of 'a "
                                                   "<class>' (seeds 50-57, the first of the class figure's) before "
                                                   "and after training with and without the prior")
    return p.parse_args(argv)


def subject_of(name: str) -> dict:
    """The subject's pictures, class and measure: the shipped pink ring (toyworld.SUBJECT), or a held-out subject of
    benchmarks/subjects/ (its subject.json: class, shape, colours)."""
    folder = ROOT / "benchmarks" / "subjects" / name
    if not (folder / "subject.json").is_file():
        return {"name": "the pink ring", "instance": name, "class": toyworld.SUBJECT["class"],
                "shows": measure.is_subject}
    spec = json.loads((folder / "subject.json").read_text())
    return {"name": name, "instance": str(folder), "class": spec["class"],
            "shows": lambda image: measure.shows(image, spec["shape"], spec["colours"])}


def check_measure(n: int = 50) -> dict:
    """Accuracy of the measure on freshly drawn pictures: n per vocabulary pair, and n of the subject."""
    rng = np.random.default_rng(2024)
    colour = shape = 0
    for c, s in VOCABULARY:
        for _ in range(n):
            image = toyworld.draw(rng, s, c)
            colour += measure.dominant_colour(image) == c
            shape += measure.shape_of(image) == s
    subject = sum(measure.is_subject(toyworld.draw(rng, toyworld.SUBJECT["shape"], toyworld.SUBJECT["colour"]))
                  for _ in range(n))
    total = n * len(VOCABULARY)
    return {"colour": colour / total, "shape": shape / total, "subject": subject / n}


def sample(sd, prompt: str, n: int, args, seed: int = 1000) -> list:
    return generate(sd, [prompt] * n, list(range(seed, seed + n)), steps=args.sample_steps, scale=args.scale,
                    progress=False)


def save_row(sd, prompt: str, path: Path, args, seed: int = 200) -> None:
    """The README's pictures: one row of 8 samples, seeds 200-207 unless told."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(sample(sd, prompt, 8, args, seed=seed), cols=8).save(path)


def vocabulary_accuracy(sd, args, per_prompt: int) -> dict:
    """Colour and shape accuracy over per_prompt samples of every "a <colour> <shape>"."""
    colour = shape = 0
    for c, s in VOCABULARY:
        images = sample(sd, f"a {c} {s}", per_prompt, args)
        colour += sum(measure.dominant_colour(im) == c for im in images)
        shape += sum(measure.shape_of(im) == s for im in images)
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


CLASS_SEEDS = range(50, 82)  # the class figure's 32 seeds


def dreambooth_run(args, work: Path, subject: dict, class_before: list, prior: bool) -> dict:
    """train.py on the subject (with or without the prior), then the DreamBooth figures of the result."""
    out, name = work / ("prior" if prior else "no-prior"), subject["class"]
    cmd = ["train.py", "--ckpt", args.ckpt, "--instance", subject["instance"], "--class", name, "--token", "sks",
           "--instance-prompt", f"a sks {name}", "--steps", str(args.steps), "--lr", str(args.lr),
           "--batch-size", str(args.batch_size), "--noise-offset", str(args.noise_offset), "--sample-every", "0",
           "--save-every", "0", "--device", args.device, "--precision", "fp32", "--out", str(out)]
    seconds = run(cmd + (["--prior", str(args.prior), "--prior-weight", str(args.prior_weight), "--prior-loss",
                          args.prior_loss] if prior else []), args)
    sd = dreambooth.load(out / "model.safetensors", device=args.device)
    if args.images:
        if prior:
            save_row(sd, f"a sks {name}", Path(args.images, "after.png"), args)
        save_row(sd, f"a {name}", Path(args.images, f"class-with{'' if prior else 'out'}-prior.png"), args,
                 seed=CLASS_SEEDS[0])
    shown = sum(map(subject["shows"], sample(sd, f"a sks {name}", args.n, args)))
    kept = measure.class_kept(class_before, sample(sd, f"a {name}", len(CLASS_SEEDS), args, seed=CLASS_SEEDS[0]),
                               subject["shows"])
    return {"seconds": seconds, "subject": shown, **kept, **vocabulary_accuracy(sd, args, per_prompt=4)}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = ROOT / args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    subject = subject_of(args.subject)
    name = subject["class"]

    measure = check_measure()
    print(f"measure on drawn pictures: colour {measure['colour']:.1%}, shape {measure['shape']:.1%}, "
          f"subject {measure['subject']:.1%}", flush=True)

    sd = dreambooth.load(ROOT / args.ckpt, device=args.device)
    if args.images:
        save_row(sd, f"a sks {name}", Path(args.images, "before.png"), args)
        save_row(sd, f"a {name}", Path(args.images, "class-before.png"), args, seed=CLASS_SEEDS[0])
    base = vocabulary_accuracy(sd, args, per_prompt=8)
    class_before = sample(sd, f"a {name}", len(CLASS_SEEDS), args, seed=CLASS_SEEDS[0])
    print(f"base model, {8 * len(VOCABULARY)} samples at scale {args.scale}: colour {base['colour']:.1%} "
          f"(target 90 %), shape {base['shape']:.1%} (target 80 %); 'a {name}' shows the subject "
          f"{sum(map(subject['shows'], class_before))}/{len(CLASS_SEEDS)}; subject: {subject['name']}", flush=True)

    if not args.prior:
        # make_prior.py --class's prompts with --ckpt toy, given as --prompt: --ckpt here may be a remade file
        prompts = [flag for p in ([f"a {name}"] if args.class_prompt_only else cli.prior_prompts("toy", name))
                   for flag in ("--prompt", p)]
        args.prior = work / "class"
        prior_seconds = run(["make_prior.py", "--ckpt", args.ckpt, *prompts, "--outdir", str(args.prior),
                             "--num", str(args.prior_num), "--scale", str(args.scale), "--ddim_steps",
                             str(args.sample_steps), "--batch-size", "20", "--device", args.device, "--precision",
                             "fp32"], args)
        print(f"make_prior.py: {args.prior_num} pictures of {' / '.join(prompts[1::2])} in {prior_seconds:.0f} s",
              flush=True)
    settings = (f"--steps {args.steps} --lr {args.lr} --batch-size {args.batch_size} --prior-weight "
                f"{args.prior_weight} --prior-loss {args.prior_loss} --noise-offset {args.noise_offset}")
    for prior in (True, False) if not args.skip_no_prior else (True,):
        r = dreambooth_run(args, work, subject, class_before, prior)
        print(f"train.py {settings} {'with' if prior else 'without'} --prior: {r['seconds']:.0f} s (target 180 s); "
              f"'a sks {name}' shows the subject {r['subject']}/{args.n} (target >= 12); 'a {name}' (32 seeds): "
              f"colour mix distance {r['distance']:.2f} (target <= 0.25), same colour family {r['kept']}/32 "
              f"(target >= 20), shows the subject {r['shown']}/32 (target <= 2), families after "
              f"{measure.family_counts(r['after'])}; vocabulary colour {r['colour']:.1%} (target 90 %), "
              f"shape {r['shape']:.1%}", flush=True)


if __name__ == "__main__":
    main()
