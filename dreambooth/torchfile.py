"""Reading a file that torch.save wrote (a .ckpt, train.py's train_state.pt) without trusting it.

Such a file is a zip archive holding a pickle and the tensors' bytes, and unpickling can run any code the file
names. We only unpickle with torch's `weights_only` unpickler, which rebuilds tensors and plain containers and
refuses everything else. sd-v1-4.ckpt also names one PyTorch Lightning class (it keys the `callbacks` metadata);
names from Lightning become an inert placeholder, any other name is refused.

Before that, the archive's members are checked against what torch.save writes: it stores them uncompressed, so no
member can be larger than the file. A compressed member could inflate to any size (a zip bomb) and is refused
before a byte of it is read.
"""
import pickle
import zipfile
from pathlib import Path

import torch

LIGHTNING = ("pytorch_lightning.", "lightning.", "lightning_fabric.")


class CheckpointError(ValueError):
    """A file that is not a Stable Diffusion v1 checkpoint we can load (the message says why)."""


def read_pickle(path: Path):
    """What the torch.save file at `path` holds, tensors memory-mapped; CheckpointError (one line naming the file)
    for a file that is not one torch.save wrote or that asks to run code."""
    if not zipfile.is_zipfile(path):
        what = what_it_is(path) or "is truncated or corrupt (not a zip archive as torch.save writes)"
        raise CheckpointError(f"{path} {what}")
    _check_members(path)
    return _unpickle(path)


def _check_members(path: Path) -> None:
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({first_line(e)})") from None
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"refusing to load {path}: its member {member.filename} is compressed, which "
                                  "torch.save never does")
        if member.file_size > size:
            raise CheckpointError(f"refusing to load {path}: its member {member.filename} claims {member.file_size} "
                                  f"bytes, more than the whole file's {size}")


def _unpickle(path: Path):
    """torch.load with the weights_only unpickler; Lightning classes become _LightningName."""
    try:  # the names of all classes and functions the pickle would use, read without running it
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:
        raise CheckpointError(f"refusing to load {path}: cannot check its pickle ({first_line(e)})") from None
    for name in names:
        if not name.startswith(LIGHTNING):
            raise CheckpointError(f"refusing to load {path}: it asks to run {name}")
    try:
        with torch.serialization.safe_globals([(_LightningName, name) for name in names]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: {first_line(e)}") from None
    except (RuntimeError, ValueError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({first_line(e)})") from None


# The first bytes of files that people give where a checkpoint goes, and what those files are.
SIGNATURES = ((b"version https://git-lfs", "is a Git LFS pointer, not the file itself (git lfs pull fetches it)"),
              (b"\x89PNG", "is a PNG image"), (b"\xff\xd8\xff", "is a JPEG image"), (b"\x1f\x8b", "is gzip-compressed"))


def what_it_is(path: Path) -> str | None:
    """What a file that is not a checkpoint is, said from its first bytes ("is a text file, ..."), for an error that
    names it; None where they say nothing (a damaged checkpoint, say)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "is empty"
    what = next((what for magic, what in SIGNATURES if head.startswith(magic)), None)
    if what or b"\0" in head:
        return what
    try:
        text = head.decode().strip()
    except UnicodeDecodeError as e:  # text cut inside a character at byte 512 is still text
        if e.start < len(head) - 3:
            return None
        text = head[:e.start].decode().strip()
    if text.lower().startswith(("<!doctype html", "<html")):
        return "is an HTML page (a download that failed?), not a checkpoint"
    return f"is a text file, not a checkpoint (it begins {text.splitlines()[0][:40]!r})" if text \
        else "holds only white space"


def first_line(error: Exception) -> str:
    return str(error).strip().split("\n")[0] or type(error).__name__


class _LightningName:
    """Stands in for a PyTorch Lightning class named in a .ckpt's metadata. Lightning is never
    imported; whatever the pickle hands this placeholder is dropped."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass
