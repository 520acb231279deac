"""Every GPU path of train.py and generate(), checked in one run on one GPU (under 5 minutes); one line per check with
its figures and PASS or FAIL.

    python benchmarks/gpu_check.py              # on a CUDA machine
    python benchmarks/gpu_check.py --only fp16  # the checks whose name contains "fp16"
    python benchmarks/gpu_check.py --cpu-smoke  # the same code on the tiny model on the CPU, in seconds (CI runs it)

The checks, each through train.main as a user runs it (in this process, with its output kept out of the table):
- graph vs eager, on the toy model (64 px) and on full-size SD v1 with random weights (512 px), for a learning-rate
  warm-up, previews during the run, LoRA with the text encoder, fp32, fp16, --clip-grad and --no-cache: the trained
  weights of a CUDA-graph run against an eager run's, as tests/test_train.py measures them (the mean difference
  under 1 % of how far the weights moved), and the graph must have been recorded, except for fp16 and --clip-grad,
  whose step train.py keeps eager (train_setup.why_no_cuda_graph): there it must not have been;
- the trained weights and the optimizer's tensors stay the same tensors (the graph reads them by address) from
  before the recording through previews and saves;
- generate(): its CUDA graph against eager at eta 0 and 0.5 with a negative prompt (max pixel difference);
- peak memory of a full-size run (no checkpointing) without and with previews, against training_memory_gib's
  estimate, which must not fall short of it (the figures say how far apart they are);
- a host read in the step: caught in the last warm-up, so no recording is tried, and the run goes on eagerly;
- last (it stops recordings for the rest of the process): a recording that fails, which must say one line, run
  eagerly to the end exactly as an eager run, and let the closing preview run.
On the CPU (--cpu-smoke, or without CUDA) every run is eager, the comparisons hold trivially and the CUDA-only checks
print "skipped": the smoke run only shows that the script works end to end.
"""
import argparse
import contextlib
import io
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo root: dreambooth/, train.py, benchmarks/

import dreambooth  # noqa: E402
import train  # noqa: E402
import train_setup  # noqa: E402
from benchmarks.gpu import FULL, SMOKE, random_sd  # noqa: E402
from dreambooth import speed  # noqa: E402
from dreambooth.generate import generate  # noqa: E402

CONFIGS = {  # name: flags, on top of the run's own
    "lr warm-up": ["--warmup-steps", "4"],
    "previews": ["--sample-every", "3", "--sample-steps", "4"],
    "LoRA + text encoder": ["--lora", "16", "--train-text-encoder", "--lr", "1e-3"],
    "fp32": ["--precision", "fp32"],
    "fp16": ["--precision", "fp16", "--steps", "12"],  # the loss scaler skips the first steps that overflow
    "--clip-grad": ["--clip-grad", "0.01"],
    "--no-cache": ["--no-cache"],
}
EAGER = {"fp16", "--clip-grad"}  # train.py runs these steps eagerly: their graph run must not record


class Checks:
    def __init__(self, args, work):
        self.smoke, self.work, self.only, self.failed, self.runs = args.cpu_smoke, work, args.only, 0, 0
        self.device = "cpu" if self.smoke else "cuda"
        self.full_ckpt = work / "random-sd-v1.safetensors"
        self.full_ckpt.write_bytes(b"")  # --ckpt must name a file; dreambooth.load is told what it holds

    def line(self, name, check, *args):
        """Run one check, print its line: name, figures, seconds, PASS or FAIL (nothing where it was skipped)."""
        start = time.perf_counter()
        figures, passed = check(*args) if check else ("skipped: needs CUDA", None)
        self.failed += passed is False
        verdict = {True: "PASS", False: "FAIL", None: ""}[passed]
        print(f"{name:48} {figures:78} {time.perf_counter() - start:5.1f} s {verdict}", flush=True)

    def wanted(self, name):
        return not self.only or self.only in name

    def load(self, path, device="cpu", dtype=torch.float32, ema=False):
        """dreambooth.load, with the full-size random model for the placeholder checkpoint."""
        if Path(path) != self.full_ckpt:
            return original_load(path, device=device, dtype=dtype, ema=ema)
        return random_sd(SMOKE if self.smoke else FULL, torch.device(device), dtype)

    def train(self, model, *flags, keep_saves=False, patches=()):
        """train.main in this process: (its printed output, trained weights before, after, the TrainStep)."""
        self.runs += 1
        ckpt = ("tiny" if self.smoke else "toy") if model == "toy" else str(self.full_ckpt)
        resolution = "64" if self.smoke or model == "toy" else "512"
        seen = {}

        def spy(args, sd, preview_sd, train_step, trained, generator, log, previews):
            seen["start"] = weights(trained)
            seen["step"] = train_step
            real_train(args, sd, preview_sd, train_step, trained, generator, log, previews)
            seen["end"] = weights(trained)

        def no_save(out, sd, trained, train_step, step, args, generator, log):  # 10 GB a full-size save: skipped
            log.saved_step = step

        out = io.StringIO()
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(dreambooth, "load", self.load))
            stack.enter_context(mock.patch.object(train, "train", spy))
            if not keep_saves:
                stack.enter_context(mock.patch.object(train_setup, "save", no_save))
            for patch in patches:
                stack.enter_context(patch)
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(out))
            train.main(["--instance", str(REPO / "examples" / "dog"), "--class", "dog", "--ckpt", ckpt,
                        "--resolution", resolution, "--device", self.device, "--steps", "6", "--lr", "1e-4",
                        "--sample-every", "0", "--out", str(self.work / f"run-{self.runs}"), *flags])
        return out.getvalue(), seen["start"], seen["end"], seen["step"]


original_load, real_train = dreambooth.load, train.train


def weights(trained):
    return {f"{name}.{k}": v.detach().float().clone() for name, m in trained.items() for k, v in m.state_dict().items()}


def mean_difference(a, b):
    return sum((a[k] - b[k]).abs().sum().item() for k in a) / sum(a[k].numel() for k in a)


def graph_vs_eager(checks, model, config):
    printed, start, eager, _ = checks.train(model, *CONFIGS[config], "--no-cuda-graph")
    printed, _, graphed, step = checks.train(model, *CONFIGS[config])
    recorded = getattr(step.learn, "graph", None) is not None
    moved, differ = mean_difference(eager, start), mean_difference(graphed, eager)
    as_meant = not recorded if config in EAGER else recorded or checks.smoke
    passed = differ <= 0.01 * moved and as_meant and moved > 0
    del start, eager, graphed
    return f"mean |graph - eager| {differ:.3g}, weights moved {moved:.3g}, recorded {recorded}", passed


def tensors_of(step):
    """The data pointers of the trained weights and of the optimizer's state tensors (which the graph reads)."""
    optimizers = train_setup.torch_optimizers(step.optimizer)
    state = [v.data_ptr() for o in optimizers for s in o.state.values() for v in s.values()
             if isinstance(v, torch.Tensor)]
    return [p.data_ptr() for o in optimizers for g in o.param_groups for p in g["params"]] + state


def identity(checks):
    """Pointers after the first preview (step 3, before the recording at step 4), each later preview and each save."""
    marks = []
    holder = {}
    real_preview, real_save = train_setup.preview, train_setup.save

    def preview(*args):
        real_preview(*args)
        marks.append(("preview", tensors_of(holder["step"])))

    def save(out, sd, trained, train_step, step, *rest):
        real_save(out, sd, trained, train_step, step, *rest)
        marks.append(("save", tensors_of(holder["step"])))

    def make_step(*args):
        made = real_make_step(*args)
        holder["step"] = made[0]
        return made

    real_make_step = train.make_step
    patches = [mock.patch.object(train_setup, "preview", preview), mock.patch.object(train_setup, "save", save),
               mock.patch.object(train, "make_step", make_step)]
    checks.train("toy", "--sample-every", "3", "--sample-steps", "4", "--save-every", "4", "--steps", "8",
                 keep_saves=True, patches=patches)
    same = all(pointers == marks[0][1] for _, pointers in marks)
    return f"{len(marks[0][1])} tensors, the same through {' '.join(kind for kind, _ in marks)}", same


def images_differ(a, b):
    import numpy as np

    return max(int(np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)).max()) for x, y in zip(a, b))


def generate_graph_vs_eager(checks, eta):
    sizes = SMOKE if checks.smoke else FULL
    sd = random_sd(sizes, torch.device(checks.device), torch.float32 if checks.smoke else torch.float16)
    prompts, seeds = [f"photo of a sks dog, picture {k}" for k in range(4)], [1, 2, 3, 4]
    run = [generate(sd, prompts, seeds, negative_prompt="blurry, dark", steps=10, eta=eta, progress=False,
                    cuda_graph=graph) for graph in (False, True)]
    differ = images_differ(*run)
    return f"4 images x 10 steps, negative prompt, max pixel difference {differ}/255", differ <= 2


def peak_memory(checks, previews):
    """Peak GPU memory of a full-size run without checkpointing from where train.py measures the free memory on,
    previews counted, against the estimate made there."""
    seen = {}
    real_free, real_need = speed.free_gpu_memory_gib, speed.training_memory_gib

    def free(device):
        torch.cuda.synchronize()
        seen["allocated"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return real_free(device)

    def need(*args, **kwargs):
        seen["need"] = real_need(*args, **kwargs)
        return seen["need"]

    patches = [mock.patch.object(speed, "free_gpu_memory_gib", free), mock.patch.object(speed, "training_memory_gib",
                                                                                          need),
               mock.patch("dreambooth.runlog.Log._reset_peak", lambda self: None)]  # previews counted too
    flags = ["--sample-every", "3"] if previews else []
    checks.train("full", "--no-grad-checkpointing", *flags, patches=patches)
    gib = 2**30
    allocated = (torch.cuda.max_memory_allocated() - seen["allocated"]) / gib
    reserved = (torch.cuda.max_memory_reserved() - seen["allocated"]) / gib
    estimate = seen["need"]
    return (f"peak {allocated:.2f} GiB allocated, {reserved:.2f} reserved, beyond setup; estimate "
            f"{estimate.total:.2f} ({estimate})", allocated <= estimate.total)


def spoiled_learn(always):
    """TrainStep.learn with a host read in it: always (caught in the warm-up), or only while it is being recorded."""
    real_learn = train.TrainStep.learn

    def learn(self, *inputs):
        losses = real_learn(self, *inputs)
        if always or torch.cuda.is_current_stream_capturing():
            losses = losses * (losses.sum().item() != 0)  # a host read: it spoils a recording
        return losses
    return mock.patch.object(train.TrainStep, "learn", learn)


def host_read_in_warmup(checks):
    printed, _, _, step = checks.train("toy", "--sample-every", "6", "--sample-steps", "4",
                                       patches=[spoiled_learn(always=True)])
    said = printed.count("recording the CUDA graph failed (it reads the GPU from the host")
    later = speed.recording_failed_before is None  # no recording was tried: later graphs still may be
    return f"lines saying so {said}, eager to the end {step.learn.failed}, later graphs allowed {later}", \
        said == 1 and step.learn.failed and later and "done: 6 steps" in printed


def failed_recording(checks):
    """The recording fails (a host read only while recording): one line, eager to the end as an eager run, the
    closing preview made (eagerly: no graph is recorded after a failed one in the process)."""
    _, start, eager, _ = checks.train("toy", "--no-cuda-graph")
    printed, _, failed, step = checks.train("toy", "--sample-every", "6", "--sample-steps", "4",
                                            patches=[spoiled_learn(always=False)])
    said = printed.count("recording the CUDA graph failed")
    preview = any(checks.work.glob(f"run-{checks.runs}/samples/step-00006.png"))
    moved, differ = mean_difference(eager, start), mean_difference(failed, eager)
    torch.cuda.empty_cache()  # the allocator is not left in the capture
    return (f"lines {said}, eager to the end {step.learn.failed}, |failed - eager| {differ:.3g} (moved "
            f"{moved:.3g}), preview {preview}: {speed.recording_failed_before}",
            said == 1 and step.learn.failed and differ <= 0.01 * moved and preview)


def run_all(checks):
    cuda = not checks.smoke
    for model in ("toy", "full-size"):
        for config in CONFIGS:
            name = f"graph vs eager, {model}, {config}"
            if checks.wanted(name):
                checks.line(name, graph_vs_eager, checks, "toy" if model == "toy" else "full", config)
    if checks.wanted("identity"):
        checks.line("identity of weights and optimizer state", identity, checks)
    for eta in (0.0, 0.5):
        if checks.wanted(f"generate eta {eta}"):
            checks.line(f"generate() graph vs eager, eta {eta}", generate_graph_vs_eager, checks, eta)
    for previews in (False, True):
        name = f"peak memory, 512 px, {'with' if previews else 'without'} previews"
        if checks.wanted(name):
            checks.line(name, peak_memory if cuda else None, checks, previews)
    for name, check in (("host read caught in the warm-up", host_read_in_warmup),
                        ("failed recording: one line, eager, preview", failed_recording)):
        if checks.wanted(name):
            checks.line(name, check if cuda else None, checks)


def main(argv=None):
    p = argparse.ArgumentParser(description="Every GPU path of train.py and generate(), one line per check.")
    p.add_argument("--cpu-smoke", action="store_true", help="the tiny model on the CPU (automatic without CUDA)")
    p.add_argument("--only", help="only the checks whose name contains this")
    args = p.parse_args(argv)
    args.cpu_smoke = args.cpu_smoke or not torch.cuda.is_available()
    if args.cpu_smoke:
        torch.set_num_threads(1)
    name = "CPU smoke run (tiny model; no GPU check)" if args.cpu_smoke else torch.cuda.get_device_name()
    print(f"GPU check, {datetime.now():%Y-%m-%d %H:%M}: {name}; torch {torch.__version__}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        checks = Checks(args, Path(work))
        run_all(checks)
    print(f"{checks.failed} failed, in {time.perf_counter() - start:.0f} s")
    if checks.failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
