"""log.jsonl, the record of a training run, and how a run stops on an error.

A row every --log-every steps (and at the last step) holds the mean losses since the last row, the learning rate and
the run's training time so far. The losses stay on the device until a row or a save needs them, so no step waits for
the GPU; a non-finite loss stops the run before anything is saved. After --resume the file reads as one run: rows
past the saved step (written before a crash) are dropped, and the losses since the last row and the time come back
from the train state. The log also keeps the steps' peak GPU memory, previews not counted.
"""
import contextlib
import json
import math
import os
import time

import torch

from .files import write_atomic


class Stopped(Exception):
    """A run stopped by an error; the message says what happened and where the last good save is."""


def logged_step(line):
    """The step of a log.jsonl row; infinity for a row cut short by a crash (or garbled), so that it is dropped."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
    return step if isinstance(step, int) else math.inf


class Log:
    def __init__(self, out, start, steps, device, saved=None, plain_lines=False, writes=True):
        """writes=False: the log of a process that writes no files (a torchrun rank but the first): it checks the
        losses as the first one does, and writes its rows nowhere."""
        self.path, self.out, self.start, self.steps = out / "log.jsonl", out, start, steps
        self.saved_step = start or None  # the step of the last good save
        if not writes:
            self.path = os.devnull
        elif start and self.path.exists():
            text = self.path.read_bytes().decode(errors="replace")  # bytes that are not text make rows that drop
            rows = [line for line in text.splitlines() if logged_step(line) <= start]
            write_atomic(self.path, lambda tmp: tmp.write_text("".join(row + "\n" for row in rows)))
        self.file = open(self.path, "a" if start else "w")  # a fresh run starts the log of one that never saved
        self.pending, self.losses = [], list(saved["losses"]) if saved else []
        self.time, self.t0 = (saved["time"] if saved else 0.0), time.time()
        self.plain_lines, self.device, self.peak = plain_lines, torch.device(device), 0.0
        self._reset_peak()

    def elapsed(self):
        return self.time + time.time() - self.t0

    def check(self, step):
        """Read the losses of the steps since the last check; stop at a non-finite one."""
        values = torch.stack(self.pending).tolist() if self.pending else []
        for k, (loss, *_) in enumerate(values):
            if not math.isfinite(loss):
                at = step - len(values) + k + 1  # the first step's loss comes before any update: not the --lr
                raise self.stop(f"loss is {loss} at step {at}", diverged=at > self.start + 1)
        self.losses += values
        self.pending.clear()

    def write(self, step, lr):
        """A row with the mean losses since the last one; returns the mean loss."""
        self.check(step)
        loss, loss_instance, loss_prior = (sum(column) / len(self.losses) for column in zip(*self.losses))
        self.file.write(json.dumps({"step": step, "loss": loss, "loss_instance": loss_instance,
                                    "loss_prior": loss_prior, "lr": lr, "time": round(self.elapsed(), 3)}) + "\n")
        self.file.flush()
        self.losses = []
        if self.plain_lines:  # for a log file, where a progress bar would not do
            rate = (step - self.start) / (time.time() - self.t0)
            print(f"step {step}/{self.steps}: loss {loss:.4f}, {rate:.2f} steps/s", flush=True)
        return loss

    def state(self):
        """What the train state keeps for --resume."""
        return {"losses": self.losses, "time": self.elapsed()}

    def stop(self, what, diverged=False):
        last = f"the last good save (step {self.saved_step}) is in {self.out}" if self.saved_step else \
            "nothing was saved"
        return Stopped(f"{what}; stopped, {last}" + (". Try a lower --lr or --precision fp32" if diverged else ""))

    @contextlib.contextmanager
    def peak_not_counted(self):
        """For the previews: the steps' peak memory so far is kept, the preview's is not counted."""
        self._note_peak()
        yield
        self._reset_peak()

    def _note_peak(self):
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) / 2**30)

    def _reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def summary(self):
        """The run's closing line: the steps this process trained, their rate and the peak GPU memory."""
        steps, seconds = self.steps - self.start, time.time() - self.t0
        self._note_peak()
        memory = f", peak GPU memory {self.peak:.1f} GiB in the steps (previews not counted)" \
            if self.device.type == "cuda" else ""
        print(f"done: {steps} steps in {seconds:.0f} s ({steps / seconds:.2f} steps/s{memory})")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()
