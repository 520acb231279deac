"""The three programs given bad input as a careless or hostile user would give it: each case ends in one line that
names the file, flag or path (exit 1, or 2 for a flag), before any image is written, and nothing already written is
lost or replaced."""
import shutil

import pytest
from PIL import Image

import train
from tests.conftest import run

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(error: SystemExit, program: str) -> str:
    """The message of a program's SystemExit, checked to be the one line a person reads."""
    message = str(error)
    assert message.startswith(f"{program}: error: ") and "\n" not in message, message
    return message


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n"


def test_photos_in_other_formats_are_refused_or_named(photos, tmp_path, capsys):
    """An EPS file named like a photo stops the run in one line (Pillow would hand it to Ghostscript); a GIF or TIFF
    beside the photos is skipped with a note naming it, instead of without a word."""
    folder = shutil.copytree(photos / "instance", tmp_path / "instance")
    Image.new("RGB", (80, 72), (0, 99, 0)).save(folder / "moving.gif")
    Image.new("RGB", (80, 72), (0, 99, 0)).save(folder / "scan.TIFF", format="TIFF")
    run(tmp_path, tmp_path / "run", "--steps", "1", prior=None)
    printed = capsys.readouterr().out
    assert f"note: {folder / 'moving.gif'}: skipped; photos are read as JPEG, PNG, WebP or BMP only" in printed
    assert f"note: {folder / 'scan.TIFF'}: skipped" in printed

    (folder / "x.jpg").write_bytes(EPS)
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "00.png").write_bytes(EPS)
    for instance, prior, bad in (("instance", None, folder / "x.jpg"), ("one", "prior", tmp_path / "prior/00.png")):
        shutil.copytree(photos / "one", tmp_path / "one", dirs_exist_ok=True)
        with pytest.raises(SystemExit) as e:
            run(tmp_path, tmp_path / f"run-{instance}", "--steps", "1", instance=instance, prior=prior)
        assert one_line(e.value, "train.py") == (f"train.py: error: {bad}: cannot read image (not a JPEG, PNG, WebP "
                                                 "or BMP file)")
