"""The toy world's classical measure: what colour and shape a picture shows, found without any network, and whether
a class kept its meaning. benchmarks/toy.py judges the toy model's samples with it, and the tests that DreamBooth
teaches the toy its subject (tests/test_toy.py) rely on it; it is checked first on freshly drawn pictures.
"""
from collections import deque

import numpy as np
from PIL import Image

from dreambooth.toyworld import COLOURS, SUBJECT

# Hue bins (degrees) of the names dominant_colour can return, checked in order; red wraps around 0.
HUES = (("red", 0, 15), ("orange", 15, 40), ("yellow", 40, 75), ("green", 75, 165), ("blue", 165, 255),
        ("purple", 255, 290), ("pink", 290, 345), ("red", 345, 361))


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
