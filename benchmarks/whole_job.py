"""The whole DreamBooth job as a user runs it, timed: make_prior.py, train.py, sample.py, each a process of its own.

    python benchmarks/whole_job.py              # one GPU: full-size SD v1 with random weights, 512 px
    python benchmarks/whole_job.py --cpu-smoke  # the same programs on a tiny model on the CPU, in seconds (CI)

The job (the README's three commands on the example dog photos):
  1. make_prior.py --class dog --num 200: 200 class images, 50 DDIM steps, batch 4;
  2. train.py with its defaults (800 steps, batch 1 + 1, bf16, a preview grid every 200 steps) and --save-every 400,
     so two saves (step 400 and step 800);
  3. sample.py: 8 images of "a sks dog in the snow" from the trained model.
Each phase's wall time is taken around its process, so Python's and CUDA's start, loading the checkpoint and writing
the PNGs count, as they do for a user. Beside it, diffusers doing the same where the package can: its
StableDiffusionPipeline (from_single_file on the same checkpoint, fp16) making the class images and the samples, in a
process of its own too. diffusers' DreamBooth trainer is an example script (examples/dreambooth/train_dreambooth.py),
not part of the package, so its training row says so. Without diffusers installed, its rows are skipped.

The checkpoint is seeded random weights written once before anything is timed: nothing is downloaded. The figures
are not a test: tests/test_benchmarks.py runs --cpu-smoke only to see that every phase runs and prints its row.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo root: dreambooth/, benchmarks/, tests/

import dreambooth  # noqa: E402
from benchmarks.gpu import FULL, SMOKE, random_sd, reference_missing  # noqa: E402

# (full run, smoke run) settings of each phase
JOB = {
    "prior": dict(num=(200, 5), batch=(4, 5), steps=(50, 2)),  # train.py wants as many as the 5 photos
    "train": dict(steps=(800, 2), save_every=(400, 1), sample_every=(200, 1), sample_steps=(50, 2)),
    "sample": dict(n=(8, 2), steps=(50, 2)),
}
PROMPT, CLASS_PROMPT = "a sks dog in the snow", "photo of a dog"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The whole job (make_prior.py, train.py, sample.py) timed.")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU, a few steps: checks it runs")
    p.add_argument("--workdir", help="where the checkpoint, the prior, the run and the samples go (default: a "
                                     "temporary folder, removed after)")
    p.add_argument("--diffusers-phase", choices=["prior", "sample"], help=argparse.SUPPRESS)  # the child process
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--outdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available() and not args.diffusers_phase:
        p.error("no CUDA device: the whole job is timed on a GPU; --cpu-smoke runs it small on the CPU")
    return args


def setting(phase, name, smoke):
    return JOB[phase][name][1 if smoke else 0]


def ours(phase, ckpt, work, smoke):
    """The command line of one of our programs, as the README gives it."""
    device = ["--device", "cpu"] if smoke else []
    if phase == "prior":
        return ["make_prior.py", "--class", "dog", "--ckpt", str(ckpt), "--outdir", str(work / "prior"),
                "--num", str(setting("prior", "num", smoke)), "--batch-size", str(setting("prior", "batch", smoke)),
                "--ddim_steps", str(setting("prior", "steps", smoke)), *device]
    if phase == "train":
        return ["train.py", "--instance", str(REPO / "examples" / "dog"), "--prior", str(work / "prior"),
                "--class", "dog", "--ckpt", str(ckpt), "--out", str(work / "run"),
                "--steps", str(setting("train", "steps", smoke)),
                "--save-every", str(setting("train", "save_every", smoke)),
                "--sample-every", str(setting("train", "sample_every", smoke)),
                "--sample-steps", str(setting("train", "sample_steps", smoke)), *device]
    return ["sample.py", "--ckpt", str(work / "run" / "model.safetensors"), "--prompt", PROMPT,
            "--n_samples", str(setting("sample", "n", smoke)), "--ddim_steps", str(setting("sample", "steps", smoke)),
            "--outdir", str(work / "samples"), *device]


def timed(cmd, smoke) -> float:
    """Seconds of wall time of one process, start-up included; its output is kept for a failure's message."""
    env = os.environ | ({"OMP_NUM_THREADS": "1"} if smoke else {})
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"whole_job.py: {' '.join(cmd[:1])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return seconds


def diffusers_phase(args):
    """The child process of a diffusers row: the pipeline from our checkpoint file, then images as PNGs."""
    from tests.references import single_file_pipeline

    smoke, phase = args.cpu_smoke, args.diffusers_phase
    sizes = SMOKE if smoke else FULL
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.float16)
    configs = SimpleNamespace(unet=SimpleNamespace(config=sizes.unet), vae=SimpleNamespace(config=sizes.vae),
                              text_encoder=SimpleNamespace(config=sizes.clip))
    out = Path(args.outdir)
    out.mkdir(parents=True)
    pipe = single_file_pipeline(args.ckpt, configs, out / "config").to(device, dtype)
    n, batch = (setting("prior", "num", smoke), setting("prior", "batch", smoke)) if phase == "prior" else \
        (setting("sample", "n", smoke), setting("sample", "n", smoke))
    steps = setting(phase, "steps", smoke)
    prompt = CLASS_PROMPT if phase == "prior" else PROMPT
    for first in range(0, n, batch):
        generators = [torch.Generator().manual_seed(42 + k) for k in range(first, min(first + batch, n))]
        images = pipe([prompt] * len(generators), num_inference_steps=steps, generator=generators,
                      height=sizes.resolution, width=sizes.resolution).images
        for k, image in enumerate(images):
            image.save(out / f"{first + k:05d}.png")


def write_checkpoint(path, smoke):
    """Full-size (or, smoke, tiny) SD v1 with seeded random weights, as an fp16 .safetensors file."""
    device = torch.device("cpu" if smoke else "cuda")
    sizes = SMOKE if smoke else FULL
    sd = random_sd(sizes, device, torch.float32 if smoke else torch.float16)
    dreambooth.save(sd, path)
    del sd
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    args = parse_args(argv)
    if args.diffusers_phase:
        return diffusers_phase(args)
    smoke = args.cpu_smoke
    if smoke:
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / "random-sd-v1.safetensors"
        write_checkpoint(ckpt, smoke)
        device = "CPU smoke run (tiny model, a few steps; no benchmark)" if smoke else torch.cuda.get_device_name()
        missing = reference_missing()
        versions = f"torch {torch.__version__}" + (
            "" if missing else f", diffusers {__import__('diffusers').__version__}")
        print(f"Whole job, {datetime.now():%Y-%m-%d %H:%M}: {device}; {versions}")
        print(f"{'phase':8} {'what':58} {'ours s':>8} {'diffusers s':>12}")
        total = 0.0
        for phase, what in (("prior", f"make_prior.py, {setting('prior', 'num', smoke)} class images"),
                            ("train", f"train.py, {setting('train', 'steps', smoke)} steps, 2 saves, previews"),
                            ("sample", f"sample.py, {setting('sample', 'n', smoke)} images")):
            seconds = timed(ours(phase, ckpt, work, smoke), smoke)
            total += seconds
            if missing:
                theirs = missing
            elif phase == "train":
                theirs = "skipped: train_dreambooth.py is an example script, not in the package"
            else:
                cmd = [str(Path(__file__).relative_to(REPO)), "--diffusers-phase", phase, "--ckpt", str(ckpt),
                       "--outdir", str(work / f"diffusers-{phase}"), *(["--cpu-smoke"] if smoke else [])]
                theirs = f"{timed(cmd, smoke):12.2f}"
            print(f"{phase:8} {what:58} {seconds:8.2f} {theirs:>12}", flush=True)
        print(f"{'total':8} {'the three phases, ours':58} {total:8.2f}")


if __name__ == "__main__":
    main()
