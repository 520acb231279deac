"""manifest.jsonl: the record make_prior.py keeps of a folder of class images, read by both programs.

Each finished image has one JSON line, written once the image is whole on the disk:

    {"file": "00012.png", "prompt": "photo of a dog", "seed": 54, "steps": 50, "scale": 10.0, "eta": 0.0,
     "checkpoint": "sd-v1-4", "height": 512, "width": 512}        (and "vae", "lora" where they were given)

make_prior.py reads the lines back to go on where an interrupted run stopped, with the same settings; train.py
trains each image with its line's prompt.
"""
import json
import os
from pathlib import Path

from dreambooth.files import write_atomic

NAME = "manifest.jsonl"


def read(folder, program: str, repair: bool = False) -> list[dict]:
    """The records of folder's manifest, in order ([] without a folder or a manifest), each with a text "file" and
    "prompt". With repair (the program that appends to it), a last line that an interruption cut short is dropped,
    from the file too. Anything else that is not a record stops `program` in one line naming the file and line."""
    manifest = Path(folder or "", NAME)
    if not (folder and manifest.is_file()):
        return []
    try:
        text = manifest.read_bytes().decode()
    except UnicodeDecodeError as e:
        raise SystemExit(f"{program}: error: {manifest} is not make_prior.py's manifest (not text: {e})") from None
    lines = text.splitlines()
    if repair and text and not text.endswith("\n"):  # the run stopped while appending this line
        lines.pop()
        write_atomic(manifest, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))
    records = []
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            file, prompt = record["file"], record["prompt"]
            if not (isinstance(file, str) and isinstance(prompt, str)):
                raise TypeError(f"file {file!r} and prompt {prompt!r} are not both strings")
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{program}: error: {manifest} line {n} is not make_prior.py's manifest ({e!r})") from None
        records.append(record)
    return records


def prompts(folder) -> dict[str, str]:
    """{file name: prompt} of the images folder's manifest lists, in its order; {} without one."""
    return {record["file"]: record["prompt"] for record in read(folder, "train.py")}


def append(manifest, record: dict) -> None:
    """Append an image's record to the open manifest file, on the disk before this returns: the image is finished."""
    manifest.write(json.dumps(record) + "\n")
    manifest.flush()
    os.fsync(manifest.fileno())
