"""Reading photos for training and writing generated PNGs.

Photos come from phones and the web: rotated by an EXIF tag, greyscale, CMYK, with an alpha channel or a palette.
`load_images` turns all of them into the square RGB tensors the VAE expects. Generated images are written as PNGs
carrying AUTOMATIC1111's 'parameters' text chunk, so A1111's "PNG Info" tab (and people) can read how each was made.

Bad input raises ValueError with a message naming the file or folder.
"""
import io
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from .files import write_atomic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# What a photo is opened as, whatever its name says: Pillow would otherwise try every format it knows, and some of
# them hand the file to another program (an EPS file named x.jpg runs Ghostscript).
FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Image files that list_images passes over, so that a caller can say so (skipped_images).
OTHER_IMAGE_SUFFIXES = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".ico", ".psd", ".eps",
                        ".svg", ".ppm", ".pgm", ".pbm", ".tga", ".dng")


def list_images(folder) -> list[Path]:
    """The image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"{folder}: is a file; give the folder of photos ({folder.parent})")
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no images in it ({' '.join(IMAGE_SUFFIXES)})")
    return files


def skipped_images(folder) -> list[Path]:
    """The files directly inside `folder` that are images in a format list_images does not read (GIF, TIFF, HEIC...)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in OTHER_IMAGE_SUFFIXES and p.is_file())


def load_images(paths, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """The photos as a FloatTensor [N, 3, R, R] in [-1, 1], R = resolution: each turned upright by its EXIF tag, made
    RGB (transparent parts become white), its shorter side resized to R and the centre cropped. Also a note naming
    each photo smaller than R (it is upscaled, so it comes out blurry)."""
    images, notes = [], []
    for path in paths:
        img = _open(path)
        if min(img.size) < resolution:
            notes.append(f"{path}: {img.width}x{img.height} is smaller than {resolution} px and will be upscaled")
        images.append(ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.LANCZOS))  # centre crop
    return to_tensor(images).contiguous(), notes  # NCHW, the layout the networks are given


def _open(path) -> Image.Image:
    """The image upright by its EXIF tag, in RGB with transparent parts white."""
    path = Path(path)
    try:
        with Image.open(path, formats=FORMATS) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except Image.UnidentifiedImageError:
        raise ValueError(f"{path}: cannot read image (not a JPEG, PNG, WebP or BMP file)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    if img.mode.startswith("I"):  # 16-bit greyscale PNG ("I;16", "I"): convert("L") would clip it to white
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size as a FloatTensor [N, 3, H, W] in [-1, 1]: what the VAE encodes (to_pil's inverse).
    Its memory is the pictures' own, H, W, channel (torch's channels_last)."""
    pixels = torch.from_numpy(np.stack([np.asarray(img, dtype=np.float32) for img in images]))  # (N, H, W, 3) 0..255
    return pixels.permute(0, 3, 1, 2) / 127.5 - 1


def to_pil(img: torch.Tensor) -> Image.Image:
    """A decoded image [3, H, W] in [-1, 1] as an 8-bit RGB PIL image."""
    pixels = ((img.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def image_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Paste equally sized images into rows of `cols`, left to right, top to bottom."""
    w, h = images[0].size
    cols = min(cols, len(images))
    grid = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def a1111_parameters(prompt: str, negative_prompt: str, steps: int, scale: float, seed: int, width: int,
                     height: int, model: str, eta: float = 0.0, vae: str | None = None) -> str:
    """The 'parameters' text in AUTOMATIC1111's format, e.g.
        photo of a sks dog
        Negative prompt: blurry
        Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd-v1-4
    (the negative prompt line only when there is one, "VAE: file name" after the model when a separate VAE is
    used, "Eta: x" at the end only when eta is not 0)."""
    negative = f"Negative prompt: {negative_prompt}\n" if negative_prompt else ""
    vae_note = f", VAE: {vae}" if vae else ""
    eta_note = f", Eta: {eta}" if eta else ""
    return (f"{prompt}\n{negative}Steps: {steps}, Sampler: DDIM, CFG scale: {scale}, Seed: {seed}, "
            f"Size: {width}x{height}, Model: {model}{vae_note}{eta_note}")


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """`image` encoded as a PNG file (zlib level 6, Pillow's default) with an optional 'parameters' text chunk: the
    one way this package encodes a PNG, so that a file written here and one encoded elsewhere (by another process
    under torchrun, say) are the same bytes."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path, parameters: str | None = None) -> None:
    """Write `image` to `path` as a PNG with an optional 'parameters' text chunk (png_bytes), atomically
    (files.write_atomic). An image that cannot be encoded raises before anything is written."""
    data = png_bytes(image, parameters)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def next_index(outdir, prefix: str = "") -> int:
    """One past the highest number among the files named <prefix><number>.png in outdir (0 if there are none),
    so numbered outputs continue after earlier runs instead of overwriting them."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        return 0
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.png")
    numbers = [int(m.group(1)) for p in outdir.iterdir() if (m := pattern.fullmatch(p.name))]
    return max(numbers, default=-1) + 1
