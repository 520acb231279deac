"""Writing files so that a crash, a full disk or Ctrl-C never leaves half of one where a whole one was, and a run
folder that one process at a time writes in."""
import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path


def write_atomic(path, write) -> None:
    """Make `path` by calling write(tmp) on a temporary file beside it, then flush that to the disk and rename it
    over `path`: the file appears whole or not at all, and the one it replaces stays until then. On failure the
    temporary file is removed and the error raised. The file gets the permissions that the user's umask gives any
    new file (some writers, safetensors among them, make theirs private)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):  # a folder that cannot be written in: the first error is the one to see
            tmp.unlink(missing_ok=True)
        raise


def replace_all(staging: Path, folder: Path) -> None:
    """Move every file of the folder `staging` (each written whole, by write_atomic) into `folder`, over the files
    of the same names, then remove `staging`. The writing that can fail (a full disk) is over before the first
    rename, so `folder` gets all the new files or none; renames in one file system do not fail for want of space."""
    for path in sorted(staging.iterdir()):
        os.replace(path, folder / path.name)
    sync_folder(folder)
    staging.rmdir()


def sync_folder(folder) -> None:
    """Flush a folder's entries, so that the renames into it reach the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(folder) -> None:
    """Raise OSError unless files can be made in `folder`, or where it would be made if it does not exist yet.
    Nothing is left behind: the probe is an unnamed temporary file."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, not a folder")
    with tempfile.TemporaryFile(dir=existing):
        pass


class FolderInUse(Exception):
    """Another process holds the folder's lock (the message names its process id)."""


LOCK_NAME = ".lock"


def lock_folder(folder: Path):
    """Make `folder` this process's alone: an exclusive flock on folder/.lock (the folder is made if need be), which
    a second process is refused (FolderInUse) rather than made to wait. Returns the open lock file; closing it
    releases the lock, and so does the end of the process, however it ends (a crash, kill -9): a dead process never
    keeps a folder. The file stays, holding the last holder's process id."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / LOCK_NAME, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read(32).strip() or "unknown"
        lock.close()
        raise FolderInUse(f"another process (pid {holder}) is working in it") from None
    except OSError:
        lock.close()
        raise
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def why_write_failed(error: BaseException, folder, need_bytes: int) -> str:
    """One line on a failed write of about need_bytes into folder: the free space where it is short, else the error's
    first line (safetensors' disk-full errors run to seven)."""
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        return f"{free / 1e6:.0f} MB free in {folder}, and it needs about {need_bytes / 1e6:.0f} MB"
    return (str(error).splitlines() or [type(error).__name__])[0]
