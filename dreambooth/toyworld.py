"""The toy world: flat shapes on a light background, drawn procedurally.

make_toy.py trains a tiny SD-v1-architecture model from scratch on these pictures, so that DreamBooth can be run
and checked on a CPU in minutes; benchmarks/measure.py judges what the model draws (its colour and shape). The
captions name only the vocabulary (SHAPES x COLOURS: "a red circle", "a circle", ""); the VAE also sees shapes
and colours the captions never name (rings, crosses, stripes, orange, purple, ...), so that a new subject such as
SUBJECT, a pink ring, can be drawn after DreamBooth teaches the UNet a word for it.

Images are 64 x 64 RGB. Shapes are drawn at 4x the size and box-filtered down, which gives them soft
(anti-aliased) edges like the VAE's own reconstructions. All randomness comes from a numpy Generator passed in.
"""
import numpy as np
from PIL import Image, ImageDraw

SIZE = 64        # image side in pixels
SUPERSAMPLE = 4  # drawn at 4x, then box-filtered down

# The vocabulary of the captions.
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 35)}
# Shapes the captions never name; the VAE learns to draw them too.
EXTRA_SHAPES = ("ring", "cross", "bar")

# The DreamBooth subject: new in colour and in look, of the class "circle" (a ring is a circle with a hole). Its pink
# (hue 317) lies far from every caption colour (43 degrees from red, 90 from blue), so a model that draws it pink
# has learnt it, not fallen back on a colour it knew (docs/toy-world.md, "A subject the VAE can draw").
SUBJECT = {"shape": "ring", "colour": (230, 50, 180), "colour_name": "pink", "class": "circle"}


# ---- drawing ------------------------------------------------------------------------------------------------------

def light_background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A pale, slightly tinted background colour."""
    return tuple(int(v) for v in rng.integers(215, 256, size=3))


def jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    """The same named colour, a little lighter or darker per channel."""
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def paint(pen: ImageDraw.ImageDraw, shape: str, rgb: tuple, centre: tuple[float, float], width: float) -> None:
    """Draw one shape of `width` 64-px pixels at `centre` (64-px coordinates) on a SUPERSAMPLE-sized canvas."""
    s = SUPERSAMPLE
    cx, cy, r = centre[0] * s, centre[1] * s, width * s / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        pen.ellipse(box, fill=rgb)
    elif shape == "square":
        pen.rectangle(box, fill=rgb)
    elif shape == "triangle":  # upright, base and height equal to the width
        pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=rgb)
    elif shape == "ring":  # a circle with a hole: the band is 0.36 of the radius
        pen.ellipse(box, outline=rgb, width=max(int(0.36 * r), 3 * s))
    elif shape == "cross":
        t = 0.35 * r
        pen.rectangle((cx - r, cy - t, cx + r, cy + t), fill=rgb)
        pen.rectangle((cx - t, cy - r, cx + t, cy + r), fill=rgb)
    elif shape == "bar":  # a horizontal stripe across the shape's box
        pen.rectangle((cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def random_place(rng: np.random.Generator, low: int = 20, high: int = 44) -> tuple[tuple[float, float], float]:
    """A random width in [low, high] px and a centre that keeps the shape 2 px inside the image."""
    width = float(rng.uniform(low, high))
    margin = width / 2 + 2
    return (float(rng.uniform(margin, SIZE - margin)), float(rng.uniform(margin, SIZE - margin))), width


def draw(rng: np.random.Generator, shape: str, colour, centre=None, width=None) -> Image.Image:
    """One shape on a light background, a 64 x 64 RGB image.

    colour is a name of COLOURS (slightly jittered) or an (r, g, b) tuple (used as is); centre and width are drawn
    at random where not given."""
    rgb = jitter(rng, COLOURS[colour]) if isinstance(colour, str) else tuple(colour)
    background = light_background(rng)
    if centre is None or width is None:
        centre, width = random_place(rng)
    canvas = Image.new("RGB", (SIZE * SUPERSAMPLE,) * 2, background)
    paint(ImageDraw.Draw(canvas), shape, rgb, centre, width)
    return canvas.resize((SIZE, SIZE), Image.BOX)


def random_scene(rng: np.random.Generator) -> Image.Image:
    """A picture broader than the captions, for training the VAE: 1-3 shapes of any kind in any colour,
    sometimes over stripes, on a background that is usually light but may be any colour."""
    light = rng.random() < 0.8
    background = light_background(rng) if light else tuple(int(v) for v in rng.integers(0, 256, size=3))
    canvas = Image.new("RGB", (SIZE * SUPERSAMPLE,) * 2, background)
    pen = ImageDraw.Draw(canvas)
    if rng.random() < 0.2:  # stripes across the whole picture
        step, rgb = int(rng.integers(6, 16)) * SUPERSAMPLE, tuple(int(v) for v in rng.integers(0, 256, size=3))
        for y in range(0, SIZE * SUPERSAMPLE, 2 * step):
            pen.rectangle((0, y, SIZE * SUPERSAMPLE, y + step - 1), fill=rgb)
    for _ in range(int(rng.integers(1, 4))):
        shape = str(rng.choice(SHAPES + EXTRA_SHAPES))
        centre, width = random_place(rng, 10, 44)
        paint(pen, shape, tuple(int(v) for v in rng.integers(0, 256, size=3)), centre, width)
    return canvas.resize((SIZE, SIZE), Image.BOX)


def caption(rng: np.random.Generator, shape: str, colour: str) -> str:
    """The caption of a drawn vocabulary image: "a red circle" 70 %, "a circle" 20 %, "" 10 % (the empty
    caption teaches the unconditional prediction that classifier-free guidance needs)."""
    u = rng.random()
    return f"a {colour} {shape}" if u < 0.7 else f"a {shape}" if u < 0.9 else ""
