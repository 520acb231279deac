"""Reading photos (EXIF, colour modes, crop, errors) and writing PNGs with A1111 metadata."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from dreambooth.images import (a1111_parameters, image_grid, list_images, load_images, next_index, png_bytes,
                               save_png, to_pil)


def load_image(path, resolution):
    """One photo as load_images reads it: [3, R, R]."""
    return load_images([path], resolution)[0][0]


def test_list_images_sorted_and_filtered(tmp_path):
    for name in ["b.JPG", "a.png", "c.webp", "d.bmp", "e.jpeg", "notes.txt", "manifest.jsonl", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.webp", "d.bmp", "e.jpeg"]


def test_list_images_errors_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="no such folder") as e:
        list_images(tmp_path / "missing")
    assert "missing" in str(e.value)
    with pytest.raises(ValueError, match=f"{tmp_path}: no images"):
        list_images(tmp_path)


def test_load_image_crops_the_centre_of_the_shorter_side(tmp_path):
    # 192x64 landscape: left third red, middle third green, right third blue. The centre crop is the green third.
    pixels = np.zeros((64, 192, 3), dtype=np.uint8)
    pixels[:, :64, 0] = pixels[:, 64:128, 1] = pixels[:, 128:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    img = load_image(tmp_path / "wide.png", 32)
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    # (the resampling filter reaches a pixel or two past the crop, so look inside the border)
    torch.testing.assert_close(img[:, 4:28, 4:28].mean(dim=(1, 2)), torch.tensor([-1.0, 1.0, -1.0]))


def test_load_image_applies_exif_orientation(tmp_path):
    # Stored landscape (top half black, bottom white) with orientation 6 "rotate 90 CW to display": displayed
    # upright it is portrait with the black half on the right.
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "rotated.jpg", 32)
    assert img[:, :, 24:].mean() < -0.9 and img[:, :, :8].mean() > 0.9


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16"])
def test_load_image_accepts_any_colour_mode(tmp_path, mode):
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    Image.new("RGB", (40, 40), (200, 100, 50)).convert(mode).save(path)
    img = load_image(path, 32)
    assert img.shape == (3, 32, 32) and img.min() >= -1 and img.max() <= 1


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n"


def test_photos_are_opened_only_as_the_listed_formats(tmp_path):
    """Whatever the file's name, only JPEG, PNG, WebP and BMP are decoded: Pillow would open any format it knows, and
    EPS hands the file to Ghostscript. A PNG named .jpg still loads (the content decides, among the four)."""
    (tmp_path / "eps.jpg").write_bytes(EPS)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "tiff.png", format="TIFF")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "gif.jpeg", format="GIF")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "ppm.bmp", format="PPM")
    for name in ("eps.jpg", "tiff.png", "gif.jpeg", "ppm.bmp"):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / name))}: cannot read image \(not a JPEG, "
                                             r"PNG, WebP or BMP file\)$"):
            load_image(tmp_path / name, 8)
    Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / "png.jpg", format="PNG")
    assert load_image(tmp_path / "png.jpg", 8).min() == 1


def test_16_bit_greyscale_keeps_its_tones(tmp_path):
    """A 16-bit greyscale PNG (0..65535) used to be clipped at 255: all but its darkest 0.4 % turned white."""
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.frombytes("I;16B", (64, 64), ramp.astype(">u2").tobytes()).save(tmp_path / "ramp.png")
    img = load_image(tmp_path / "ramp.png", 64)
    expected = torch.from_numpy((ramp / 257).round() / 127.5 - 1).float()
    torch.testing.assert_close(img, expected.expand(3, -1, -1), atol=2 / 255, rtol=0)


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    torch.testing.assert_close(load_image(tmp_path / "clear.png", 32), torch.ones(3, 32, 32))


def test_small_images_are_named_in_a_note(tmp_path):
    Image.new("RGB", (20, 30)).save(tmp_path / "tiny.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    images, notes = load_images([tmp_path / "big.png", tmp_path / "tiny.png"], 30)
    assert images.shape == (2, 3, 30, 30)
    assert len(notes) == 1 and re.fullmatch(r".*tiny\.png: 20x30 is smaller than 30 px and will be upscaled", notes[0])
    torch.testing.assert_close(images[1], load_image(tmp_path / "tiny.png", 30))


def test_unreadable_image_error_names_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.jpg: cannot read image"):
        load_image(tmp_path / "broken.jpg", 32)


def test_to_pil_maps_minus_one_to_zero_and_one_to_255():
    img = torch.stack([torch.full((2, 3), -1.0), torch.zeros(2, 3), torch.full((2, 3), 2.0)])
    pil = to_pil(img)
    assert pil.size == (3, 2) and pil.mode == "RGB"
    assert np.asarray(pil)[0, 0].tolist() == [0, 128, 255]


def test_image_grid_layout():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = image_grid([Image.new("RGB", (4, 6), c) for c in colours], cols=2)
    assert grid.size == (8, 12)
    assert [grid.getpixel(xy) for xy in [(0, 0), (4, 0), (0, 6), (4, 6)]] == colours + [(0, 0, 0)]


def test_a1111_parameters_format():
    assert a1111_parameters("photo of a sks dog", "", 50, 7.5, 42, 512, 512, "sd-v1-4") == (
        "photo of a sks dog\nSteps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd-v1-4")
    assert a1111_parameters("a dog", "blurry", 20, 10.0, 7, 640, 512, "tiny", eta=0.5) == (
        "a dog\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DDIM, CFG scale: 10.0, Seed: 7, Size: 640x512, Model: tiny, Eta: 0.5")


def test_save_png_writes_metadata_atomically(tmp_path):
    path = tmp_path / "00000.png"
    save_png(Image.new("RGB", (8, 8), (1, 2, 3)), path, "a dog\nSteps: 5")
    with Image.open(path) as img:
        assert img.text == {"parameters": "a dog\nSteps: 5"} and img.getpixel((0, 0)) == (1, 2, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["00000.png"]  # no temporary file left behind


def test_png_bytes_are_the_file_pillow_writes_and_save_png_writes_them(tmp_path):
    """png_bytes (encoded in memory, as each process under torchrun encodes its own images) gives the very bytes of
    Pillow writing the PNG straight to a file; the noise makes a file of several IDAT chunks, where an in-memory
    encoder could split the data differently."""
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    image, text = Image.fromarray(pixels), "a dog\nSteps: 5, Seed: 7"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    image.save(tmp_path / "pillow.png", format="PNG", pnginfo=info)
    data = png_bytes(image, text)
    assert data.count(b"IDAT") > 1 and data == (tmp_path / "pillow.png").read_bytes()
    save_png(image, tmp_path / "ours.png", text)
    assert (tmp_path / "ours.png").read_bytes() == data
    with Image.open(tmp_path / "ours.png") as img:
        assert img.text == {"parameters": text} and np.array_equal(np.asarray(img), pixels)
    image.save(tmp_path / "plain.png", format="PNG", pnginfo=PngImagePlugin.PngInfo())
    assert png_bytes(image) == (tmp_path / "plain.png").read_bytes()


def test_failed_save_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "00000.png"
    save_png(Image.new("RGB", (8, 8)), path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_png(Image.new("RGB", (0, 0)), path)  # PIL cannot write an empty image
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["00000.png"]


def test_a_write_that_cannot_start_raises_its_own_error_only(tmp_path):
    """Writing under a file fails at once; cleaning up the temporary file that was never made must not raise a second
    error over the first (it did: NotADirectoryError during handling of NotADirectoryError)."""
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(NotADirectoryError) as e:
        save_png(Image.new("RGB", (8, 8)), tmp_path / "file" / "00000.png")
    assert e.value.__context__ is None


def test_next_index(tmp_path):
    assert next_index(tmp_path / "missing") == 0
    assert next_index(tmp_path) == 0
    for name in ["00000.png", "00007.png", "grid-0003.png", "00009.jpg", "x00012.png"]:
        (tmp_path / name).write_bytes(b"")
    assert next_index(tmp_path) == 8
    assert next_index(tmp_path, prefix="grid-") == 4


def test_written_files_get_the_umask_permissions_and_no_temporary_is_left(tmp_path):
    """A PNG and a model file are made as any new file is (0644 under umask 022; safetensors alone would make
    0600), and a failed write leaves the old file and no temporary file."""
    import dreambooth

    umask = os.umask(0o022)
    try:
        save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png")
        dreambooth.save(dreambooth.load("tiny"), tmp_path / "model.safetensors")
    finally:
        os.umask(umask)
    assert [oct(os.stat(tmp_path / name).st_mode & 0o777) for name in ("a.png", "model.safetensors")] == ["0o644"] * 2
    before = (tmp_path / "a.png").read_bytes()
    with pytest.raises(OSError, match="cannot write mode CMYK as PNG"):  # the encoding fails: nothing is written
        save_png(Image.new("CMYK", (8, 8)), tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "model.safetensors"]
