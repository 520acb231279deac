"""Draws the toy world's held-out DreamBooth subjects: four subjects that no setting was tuned on, for judging the
toy recipe beyond the shipped pink ring (benchmarks/toy.py --subject NAME). Run once; the pictures are committed.

    python benchmarks/subjects/draw.py      # writes benchmarks/subjects/<name>/00.png ... 04.png

Each subject.json says what benchmarks/toy.py needs: the class word, and the shape and colours that
measure.shows looks for.
"""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from dreambooth import toyworld  # noqa: E402

SUBJECTS = {
    # a colour between two caption colours: orange (hue 29) lies between red (0) and yellow (51)
    "orange-square": {"class": "square", "shape": "square", "colours": [(245, 130, 20)]},
    # two colours no caption names, left half purple, right half cyan
    "two-colour-circle": {"class": "circle", "shape": "circle", "colours": [(140, 50, 220), (30, 190, 200)]},
    # a shape the captions never name, in lime (hue 80, between yellow and green)
    "lime-cross": {"class": "square", "shape": "cross", "colours": [(150, 210, 30)]},
    # a colour no caption names, in another class
    "purple-triangle": {"class": "triangle", "shape": "triangle", "colours": [(140, 50, 220)]},
}


def draw(rng, subject) -> Image.Image:
    """One picture of the subject, placed as make_toy.py places the shipped one. A two-colour subject (a circle) is
    split down the middle: the left half in its first colour, the right half in its second."""
    centre, width = toyworld.random_place(rng, 28, 44)
    if len(subject["colours"]) == 1:
        return toyworld.draw(rng, subject["shape"], subject["colours"][0], centre=centre, width=width)
    s, (cx, cy), r = toyworld.SUPERSAMPLE, centre, width / 2
    canvas = Image.new("RGB", (toyworld.SIZE * s,) * 2, toyworld.light_background(rng))
    box = ((cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s)
    ImageDraw.Draw(canvas).pieslice(box, 90, 270, fill=subject["colours"][0])
    ImageDraw.Draw(canvas).pieslice(box, -90, 90, fill=subject["colours"][1])
    return canvas.resize((toyworld.SIZE,) * 2, Image.BOX)


def main():
    for k, (name, subject) in enumerate(SUBJECTS.items()):
        folder = HERE / name
        folder.mkdir(exist_ok=True)
        rng = np.random.default_rng(1000 + k)
        for i in range(5):
            draw(rng, subject).save(folder / f"{i:02d}.png")
        (folder / "subject.json").write_text(json.dumps(subject) + "\n")


if __name__ == "__main__":
    main()
