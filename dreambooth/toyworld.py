"""The toy world: flat shapes on a light background, drawn procedurally, and a classical measure of them.

make_toy.py trains a tiny SD-v1-architecture model from scratch on these pictures, so that DreamBooth can be run
and checked on a CPU in minutes; benchmarks/toy.py measures what the model draws with `dominant_colour` and
`shape_of`. The captions name only the vocabulary (SHAPES x COLOURS: "a red circle", "a circle", ""); the VAE also
sees shapes and colours the captions never name (rings, crosses, stripes, orange, purple, ...), so that a new
subject such as SUBJECT, a pink ring, can be drawn after DreamBooth teaches the UNet a word for it.

Images are 64 x 64 RGB. Shapes are drawn at 4x the size and box-filtered down, which gives them soft
(anti-aliased) edges like the VAE's own reconstructions. All randomness comes from a numpy Generator passed in.
"""
from collections import deque

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64        # image side in pixels
SUPERSAMPLE = 4  # drawn at 4x, then box-filtered down

# The vocabulary of the captions.
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 35)}
# Shapes the captions never name; the VAE learns to draw them too.
EXTRA_SHAPES = ("ring", "cross", "bar")

# The DreamBooth subject: new in colour and in look, of the class "circle" (a ring is a circle with a hole). Pink
# (hue 317) lies 90 degrees from blue and 43 from red, 27 inside HUES' pink bin; the orange ring it replaced (hue 29)
# lay 29 and 22 degrees from red and yellow, 11 inside its bin, and VAEs gave it back red or yellow (README).
SUBJECT = {"shape": "ring", "colour": (230, 50, 180), "colour_name": "pink", "class": "circle"}

# Hue bins (degrees) of the names dominant_colour can return, checked in order; red wraps around 0.
HUES = (("red", 0, 15), ("orange", 15, 40), ("yellow", 40, 75), ("green", 75, 165), ("blue", 165, 255),
        ("purple", 255, 290), ("pink", 290, 345), ("red", 345, 361))


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


def draw(rng: np.random.Generator, shape: str, colour, background=None, centre=None, width=None) -> Image.Image:
    """One shape on a light background, a 64 x 64 RGB image.

    colour is a name of COLOURS (slightly jittered) or an (r, g, b) tuple (used as is); background, centre and
    width are drawn at random where not given."""
    rgb = jitter(rng, COLOURS[colour]) if isinstance(colour, str) else tuple(colour)
    background = background or light_background(rng)
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


# ---- measuring ----------------------------------------------------------------------------------------------------

def foreground(image: Image.Image, threshold: float = 80.0) -> np.ndarray:
    """The largest 4-connected blob of pixels far (RGB distance > threshold) from the background, which is taken
    to be the median colour of the border pixels. A bool mask [64, 64]."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    mask = np.linalg.norm(a - np.median(border, axis=0), axis=-1) > threshold
    best, seen = np.zeros_like(mask), np.zeros_like(mask)
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        blob, queue = [], deque([(y, x)])
        seen[y, x] = True
        while queue:  # breadth-first flood fill of one blob
            p = queue.popleft()
            blob.append(p)
            for q in ((p[0] + 1, p[1]), (p[0] - 1, p[1]), (p[0], p[1] + 1), (p[0], p[1] - 1)):
                if 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1] and mask[q] and not seen[q]:
                    seen[q] = True
                    queue.append(q)
        if len(blob) > best.sum():
            best = np.zeros_like(mask)
            best[tuple(np.array(blob).T)] = True
    return best


def hue_and_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hue (degrees) and the chroma (max - min channel, 0..1) of each RGB row [N, 3] (0..255)."""
    rgb = np.asarray(rgb, dtype=np.float32).reshape(-1, 3) / 255.0
    hi, lo = rgb.max(axis=1), rgb.min(axis=1)
    chroma = np.maximum(hi - lo, 1e-6)
    r, g, b = rgb.T
    hue = np.where(hi == r, ((g - b) / chroma) % 6, np.where(hi == g, (b - r) / chroma + 2, (r - g) / chroma + 4))
    return hue * 60.0, hi - lo


def hue_name(rgb: np.ndarray, bins=HUES) -> np.ndarray:
    """The name in `bins` (HUES, or FAMILIES below) of each RGB row [N, 3] (0..255); "grey" where the chroma is too
    low to tell a hue: under 0.12, so that a dark green such as (30, 64, 30) still counts as green."""
    hue, chroma = hue_and_chroma(rgb)
    names = np.full(len(hue), "grey", dtype=object)
    for name, start, end in bins:
        names[(hue >= start) & (hue < end)] = name
    names[chroma < 0.12] = "grey"
    return names


def dominant_colour(image: Image.Image) -> str:
    """The colour name most of the foreground's pixels have ("none" for an empty picture)."""
    mask = foreground(image)
    if mask.sum() < 20:
        return "none"
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)[mask]
    names, counts = np.unique(hue_name(pixels), return_counts=True)
    return str(names[counts.argmax()])


def shape_of(image: Image.Image) -> str:
    """"ring", "triangle", "cross", "square" or "circle" from the foreground's geometry ("none" for an empty picture):

    ring      the centre of the bounding box is background (a hole);
    triangle  the top quarter of the box is less than 0.6 times as wide as the bottom quarter;
    cross     the blob fills less than 0.7 of its box (a cross of arms 0.35 of its width wide fills 0.58) and
              leaves the box's corners empty;
    square    the blob fills more than 0.87 of its bounding box (a circle fills pi/4 = 0.785);
    circle    otherwise."""
    mask = foreground(image)
    if mask.sum() < 20:
        return "none"
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape
    centre = box[h // 2 - 1:h // 2 + 2, w // 2 - 1:w // 2 + 2]
    if centre.mean() < 0.5:
        return "ring"
    quarter = max(h // 4, 1)
    top, bottom = box[:quarter].sum(axis=1).mean(), box[-quarter:].sum(axis=1).mean()
    if top < 0.6 * bottom:
        return "triangle"
    corner = max(min(h, w) // 5, 1)
    corners = np.concatenate([box[:corner, :corner], box[:corner, -corner:], box[-corner:, :corner],
                              box[-corner:, -corner:]])
    if box.mean() < 0.7 and corners.mean() < 0.2:
        return "cross"
    return "square" if box.mean() > 0.87 else "circle"


def is_subject(image: Image.Image) -> bool:
    """Whether a picture shows SUBJECT: a pink ring."""
    return dominant_colour(image) == SUBJECT["colour_name"] and shape_of(image) == SUBJECT["shape"]


def hue_distance(a, b) -> np.ndarray:
    """Degrees between hues, around the circle."""
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


def shows(image: Image.Image, shape: str, colours: list, within: float = 20.0) -> bool:
    """Whether a picture shows a subject of this shape (shape_of's names) and these colours. A foreground pixel is of
    a subject colour when its hue lies within `within` degrees of that colour's, and nearer to it than to any
    caption colour's (so an orange subject is not found in a red or yellow shape); each colour must cover at least
    half of the foreground, shared evenly between the colours (a two-colour subject: a quarter each)."""
    mask = foreground(image)
    if mask.sum() < 20 or shape_of(image) != shape:
        return False
    hues, chroma = hue_and_chroma(np.asarray(image.convert("RGB"))[mask])
    to_captions = np.min([hue_distance(hues, hue_and_chroma(rgb)[0]) for rgb in COLOURS.values()], axis=0)
    for rgb in colours:
        apart = hue_distance(hues, hue_and_chroma(rgb)[0])
        if ((apart <= within) & (apart < to_captions) & (chroma >= 0.12)).mean() < 0.5 / len(colours):
            return False
    return True


# ---- does the class keep its meaning? ----------------------------------------------------------------------------
# A class drifts when the pictures of "a circle" change, not only when they turn into the subject: the fine-tuned
# model may draw every circle sky blue and none pink. So the class is judged by the mix of its samples' colours at
# fixed seeds, before and after fine-tuning, in hue families fine enough to tell a sky blue (azure) from the
# captions' blue (hue 227).

FAMILIES = (("red", 0, 15), ("orange", 15, 40), ("yellow", 40, 75), ("green", 75, 165), ("cyan", 165, 195),
            ("azure", 195, 215), ("blue", 215, 260), ("purple", 260, 290), ("magenta", 290, 345), ("red", 345, 361))


def hue_family(image: Image.Image) -> str:
    """The FAMILIES name most of the foreground's pixels have; "grey" for low chroma, "none" for an empty picture."""
    mask = foreground(image)
    if mask.sum() < 20:
        return "none"
    names, counts = np.unique(hue_name(np.asarray(image.convert("RGB"), dtype=np.float32)[mask], FAMILIES),
                              return_counts=True)
    return str(names[counts.argmax()])


def class_kept(before: list, after: list, shows=is_subject) -> dict:
    """How well the class kept its meaning, from samples of the class prompt at the same seeds before and after
    fine-tuning (lists of images, seed by seed):

    distance  total variation distance between the two mixes of hue families: half the sum over families of
              |share before - share after|; 0 is the same mix, 1 two mixes with no family in common
    kept      how many seeds drew the same hue family before and after
    shown     how many samples after show the subject (`shows`, is_subject by default)
    before, after   each sample's hue family
    """
    families_before, families_after = list(map(hue_family, before)), list(map(hue_family, after))
    names = set(families_before) | set(families_after)
    distance = sum(abs(families_before.count(f) - families_after.count(f)) for f in names) / (2 * len(before))
    kept = sum(a == b for a, b in zip(families_before, families_after))
    return {"distance": distance, "kept": kept, "shown": sum(map(shows, after)),
            "before": families_before, "after": families_after}


def family_counts(families: list) -> str:
    """"blue 12, yellow 7, ...": a mix of hue families, the most common first."""
    names, counts = np.unique(families, return_counts=True)
    return ", ".join(f"{names[i]} {counts[i]}" for i in np.argsort(-counts, kind="stable"))
