"""train.py's settings: its flags, their checks, and the defaults that depend on other settings, the machine or a
resumed run, and the run folder they name. Defaults follow the original DreamBooth fine-tuning of sd-v1-4
(XavierXiao's Dreambooth-Stable-Diffusion): lr 1e-6, 800 steps, batch 1 + 1; with --ckpt toy,
cli.TOY_DEFAULTS.

    args, state = parse_args(argv)          # state: the run's train_state.pt with --resume, else None
    resolve_defaults(args)                  # what depends on the device, --lora, the prior folder or the time
    with claim_run_folder(args, state):     # --out / --resume is this process's alone until the run ends
"""
import argparse
import contextlib
import json
import re
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

import torch

import cli
import manifest
import ranks
from dreambooth.files import LOCK_NAME, FolderInUse, lock_folder
from dreambooth.torchfile import CheckpointError, first_line, read_pickle


def parser():
    demo = "--instance examples/toy --prior prior/circle --class circle --out runs/demo"
    p = cli.parser("train.py", "DreamBooth fine-tuning of Stable Diffusion v1.", [
        f"python train.py {demo}   # the toy model (prior/circle: python make_prior.py --class circle)",
        f"python train.py --resume runs/demo --steps {cli.TOY_DEFAULTS['train.py']['steps'] + 200}"
        "   # continue that run, 200 steps past its last",
        "python train.py --instance examples/dog --prior prior/dog --class dog   # SD v1 from weights/sd-v1-4.ckpt "
        "(prior/dog: python make_prior.py --class dog)",
        "python train.py --instance examples/dog --prior prior/dog --class dog --lora 16   # a LoRA: "
        "runs/dog-<date>/lora.safetensors",
        "python train.py --concepts concepts.json   # several subjects in one run (README: More subjects, more GPUs)",
        "torchrun --nproc_per_node 4 train.py --instance examples/dog --prior prior/dog --class dog --batch-size 4"
        "   # 4 GPUs, one subject photo each a step"],
        usage="train.py --instance DIR --class NAME [--prior DIR] [options]  |  train.py --concepts FILE [options]  |  "
              "train.py --resume DIR [options]")
    add_subject_flags(p)
    p.add_argument("--ckpt", help=cli.CKPT_HELP)
    p.add_argument("--ema", action="store_true", help="start from the EMA weights stored in the checkpoint")
    p.add_argument("--vae", metavar="FILE", help="a separate KL-f8 VAE file to decode the preview grids with "
                                                 "(the photos are encoded with the checkpoint's own)")
    p.add_argument("--resolution", type=cli.TRAIN_RESOLUTION, help="image size, a multiple of 8 from 64; default the "
                                                                   "model's (512; toy: 64)")
    p.add_argument("--steps", type=cli.number(low=1), default=800, help="optimizer steps in total")
    p.add_argument("--batch-size", type=cli.number(low=1), default=1,
                   help="subject images per step, plus as many prior images")
    p.add_argument("--lr", type=cli.number(float), help="AdamW learning rate; default 1e-6, with --lora 1e-4")
    p.add_argument("--warmup-steps", type=cli.number(), default=0, help="linear learning-rate warm-up over N steps")
    p.add_argument("--clip-grad", type=cli.number(float), default=0.0, help="clip the gradient norm to this; 0 = off")
    p.add_argument("--prior-weight", type=cli.number(float), default=1.0,
                   help="lambda of eq. 2: weight of the prior loss")
    p.add_argument("--prior-loss", choices=["noise", "base"], default="noise",
                   help="the prior images' target: noise, the paper's eq. 2 (the noise that was added); base, what "
                        "the frozen base model predicts, for each prior image with its prompt and with the empty "
                        "prompt, which keeps the class as guidance draws it (docs/toy-world.md, \"Keeping the "
                        "class\"; a frozen copy of the UNet, none with --lora, and half as many images again per step)")
    p.add_argument("--noise-offset", type=cli.number(float), default=0.0,
                   help="offset noise: add a random constant of this std to each latent channel's noise (kohya's "
                        "--noise_offset; 0.1 is usual). Keep a model trained with it (the toy) on it; 0 = off")
    p.add_argument("--train-text-encoder", action="store_true", help="fine-tune the CLIP text encoder too")
    p.add_argument("--lora", type=cli.number(), default=0, metavar="RANK",
                   help="train LoRA adapters of this rank instead of the whole model, written to lora.safetensors "
                        "(kohya's format); 0 = off")
    p.add_argument("--lora-alpha", type=cli.number(float),
                   help="LoRA's alpha: the adapters' output is scaled by alpha / rank; default RANK")
    p.add_argument("--save-merged", action="store_true", help="with --lora, also write the model with the LoRA "
                                                              "merged in as model.safetensors")
    p.add_argument("--seed", type=cli.SEED, default=42, help="seed of all randomness: data order, flips, noise, t")
    add_machine_and_run_flags(p)
    cli.show_toy_defaults(p, "train.py")
    return p


def add_subject_flags(p):
    """The flags of what the run teaches: the subject's photos and prompt, the class images and theirs."""
    p.add_argument("--instance", metavar="DIR", help="the folder of the subject's photos (3-5 are enough)")
    p.add_argument("--concepts", metavar="FILE",
                   help="several subjects in one run: a JSON list of concepts, each with instance_prompt, "
                        "instance_data_dir, class_prompt, optionally class_data_dir and token (README, \"More "
                        "subjects, more GPUs\"); instead of --instance, --prior and their prompts")
    p.add_argument("--captions", action=argparse.BooleanOptionalAction, default=True,
                   help="train each image with the caption in the .txt file of its name beside it (photo.txt for "
                        "photo.jpg), where there is one; --no-captions: every image with its folder's prompt")
    p.add_argument("--prior", metavar="DIR", help="class images from make_prior.py; without it, plain fine-tuning")
    p.add_argument("--class", dest="class_name", metavar="NAME", help='what the subject is, e.g. "dog"')
    p.add_argument("--token", default="sks", help="the rare token that comes to mean the subject")
    p.add_argument("--instance-prompt", help='default "photo of a {token} {class}" (toy: "a {token} {class}")')
    p.add_argument("--prior-prompt", help="the prompt of prior images that the folder's manifest.jsonl (make_prior.py"
                                          "'s) does not list; each image it lists trains with its own prompt. "
                                          'Default: its first prompt, else "photo of a {class}"')


def add_machine_and_run_flags(p):
    """The flags of where and how fast the run computes, and of its run folder: what it writes, and when."""
    p.add_argument("--device", help="cuda, cpu, cuda:1, ...; default cuda if available, else cpu")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="autocast dtype; weights stay fp32. "
                                                                         "Default bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute UNet activations in backward: less memory, slower steps; default on only where "
                        "the GPU could not hold the run without it")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, record the whole step once as a CUDA graph and replay it")
    p.add_argument("--no-cache", action="store_true", help="encode the images with the VAE every step")
    p.add_argument("--no-step-in-backward", action="store_true",
                   help="plain optimizer loop instead of stepping each weight as soon as its gradient is ready")
    p.add_argument("--out", metavar="DIR", help="run folder; default runs/<class>-<date>")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly where it stopped")
    p.add_argument("--sample-every", type=cli.number(), default=200, help="write a preview grid every N steps; 0 = off")
    p.add_argument("--sample-steps", type=cli.DDIM_STEPS, help=f"DDIM steps of the preview grids; default "
                   f"{cli.SD_DDIM_STEPS}, or the model file's (toy: {cli.toy_sampling().get('ddim_steps')})")
    p.add_argument("--save-every", type=cli.number(), default=400,
                   help="save every N steps (and at the end); 0 = at the end")
    p.add_argument("--log-every", type=cli.number(low=1), default=10, help="log the losses every N steps")


def parse_args(argv=None):
    """Returns (args, train_state or None). With --resume DIR, the run's saved settings become the defaults, so
    `--resume DIR` alone continues it; flags given again (e.g. a larger --steps) override them. With --ckpt toy,
    cli.TOY_DEFAULTS are the defaults."""
    p = parser()
    args, state = p.parse_args(argv), None
    if not args.resume:
        args = cli.with_toy_defaults(p, args, argv, "train.py")
    if args.resume:
        if not (Path(args.resume) / "train_state.pt").is_file():
            p.error(f"--resume {args.resume}: {why_no_train_state(Path(args.resume))}")
        state = read_train_state(args.resume)
        p.set_defaults(**{"captions": False} | state["args"])  # a run saved before captions trained without them
        args = p.parse_args(argv)
        args.out = args.resume
        if args.lora != state["args"].get("lora", 0):  # what train_state.pt holds: the adapters, or the model
            p.error(f"--lora {args.lora}: {args.resume} was trained with --lora {state['args'].get('lora', 0)}")
    if args.concepts:
        given = [flag for flag in ("instance", "prior", "instance_prompt", "prior_prompt") if getattr(args, flag)]
        if given:
            p.error(f"--{given[0].replace('_', '-')}: not with --concepts, whose file names each concept's folders "
                    "and prompts")
        if not Path(args.concepts).is_file():
            p.error(f"--concepts {args.concepts}: no such file")
    elif not args.instance:
        p.error("--instance DIR (or --concepts FILE) is required")
    elif not args.class_name and not (args.instance_prompt and args.prior_prompt):
        p.error("--class NAME is required unless both --instance-prompt and --prior-prompt are given")
    size = ranks.processes()
    if args.batch_size % size:
        p.error(f"--batch-size {args.batch_size}: with {size} processes it must be a multiple of {size}, so that "
                "each takes an equal share of every batch")
    if args.save_merged and not args.lora:
        p.error("--save-merged: only with --lora (a full fine-tuning always writes model.safetensors)")
    cli.check_model_flags(p, args)
    return args, state


def resolve_defaults(args):
    """Fill in the defaults that depend on the machine, the files or the time, so train_state.pt records them."""
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.lr is None:
        args.lr = 1e-4 if args.lora else 1e-6  # the original DreamBooth's; LoRA's usual
    args.lora_alpha = args.lora_alpha or args.lora
    args.out = args.out or f"runs/{args.class_name or ('concepts' if args.concepts else 'run')}-" \
                           f"{datetime.now():%Y%m%d-%H%M%S}"
    if args.concepts:
        return
    args.instance_prompt = args.instance_prompt or cli.prompt_for(args.ckpt, f"{args.token} {args.class_name}")
    if not args.prior_prompt:
        listed = next(iter(manifest.prompts(args.prior).values()), None)
        args.prior_prompt = listed or cli.prompt_for(args.ckpt, args.class_name)


# What a run leaves in its folder before its first save: a fresh run may start again over it.
UNSAVED = {"log.jsonl", "samples", ".saving"}


@contextlib.contextmanager
def claim_run_folder(args, state):
    """The run folder, this run's alone while inside: its lock (files.lock_folder) is taken before any work and held
    until the end (or until the process ends, however it ends: the OS releases it, so a killed run never blocks its
    --resume). A second run of the folder, fresh or --resume, is refused in one line. A fresh run needs the folder
    empty, or holding only what a run that stopped before its first save left; a --resume, the train state it read.
    A folder this run made and left holding nothing but its lock (its setup failed) is removed at the end."""
    out = Path(args.out)
    flag = f"--resume {out}" if args.resume else f"--out {out}"
    made = not out.exists()
    if not args.resume and not (out / LOCK_NAME).exists():
        check_fresh_folder(out)  # before the lock too, so that a folder of other things gets no lock file
    try:
        lock = lock_folder(out)
    except FolderInUse as e:
        raise SystemExit(f"train.py: error: {flag}: {e}; one run at a time in a run folder") from None
    except OSError as e:
        raise SystemExit(f"train.py: error: {flag}: cannot write there ({e.strerror or e})") from None
    try:
        if args.resume and read_train_state(out)["step"] != state["step"]:
            raise SystemExit(f"train.py: error: --resume {out}: another run saved there while this one started; "
                             "run the command again")
        if not args.resume and check_fresh_folder(out):
            print(f"note: {out} holds only the log or previews of a run that stopped before its first save; "
                  "starting afresh there")
        yield
    finally:
        if made and [path.name for path in out.iterdir()] == [LOCK_NAME]:  # removed while still locked
            (out / LOCK_NAME).unlink()
            out.rmdir()
        lock.close()


def check_fresh_folder(out):
    """Whether --out holds the leftovers of a run that never saved (UNSAVED); one line if it holds anything else."""
    names = {path.name for path in out.iterdir()} - {LOCK_NAME} if out.is_dir() else set()
    if not names <= UNSAVED:
        raise SystemExit(f"train.py: error: --out {out} exists and is not empty; "
                         "choose another folder, or continue that run with --resume")
    return bool(names)


def why_no_train_state(folder):
    """Why a --resume folder holds no train state, in words for the user."""
    if not folder.is_dir():
        return "no such folder"
    if (folder / LOCK_NAME).exists():
        try:
            lock_folder(folder).close()
        except FolderInUse as e:  # a run that has not saved yet
            raise SystemExit(f"train.py: error: --resume {folder}: {e} and has not saved yet; one run at a time in a "
                             "run folder") from None
        except OSError:  # a folder this process may not write: what follows says enough
            pass
    unsaved = (folder / "log.jsonl").is_file()
    return "no train_state.pt in it" + (f" (the run stopped before its first save; start it again with --out "
                                         f"{folder})" if unsaved else "")


# What train_state.pt holds besides the optimizer's state (train.save writes it).
TRAIN_STATE = {"step": int, "args": dict, "weights": dict, "data_rng": torch.Tensor}


def read_train_state(folder):
    """The train_state.pt of a run folder, read as safely as a .ckpt (dreambooth.torchfile: nothing in it runs), or
    one line naming the file and what is wrong with it."""
    path = Path(folder) / "train_state.pt"
    try:
        state = read_pickle(path)
    except CheckpointError as e:
        raise SystemExit(f"train.py: error: --resume {folder}: {e}") from None
    wrong = next((key for key, kind in TRAIN_STATE.items() if not isinstance(state, dict)
                  or not isinstance(state.get(key), kind)), None)
    if wrong:
        raise SystemExit(f"train.py: error: --resume {folder}: {path} is not a train state that train.py wrote "
                         f"(no {wrong})")
    return state


@dataclass
class Concept:
    """One subject of a run and its class. The field names are those of ShivamShrirao's DreamBooth fork's
    concepts_list, so that its files work here as they are."""
    instance_prompt: str                # "photo of a sks dog": the prompt of the subject's photos
    instance_data_dir: str              # the folder of the subject's photos
    class_prompt: str                   # "photo of a dog": the class images' prompt, where their manifest has none
    class_data_dir: str | None = None   # the class images (make_prior.py's folder); None: no prior
    token: str | None = None            # the rare word for the subject (--token); not in the fork's files

    def token_words(self) -> set[str]:
        """The token's words; without one, the words the instance prompt adds to the class prompt ({"sks"} for
        "photo of a sks dog" and "photo of a dog"). A subject photo's caption must name them, a class image's must
        not (train_setup.caption_of)."""
        return words(self.token) if self.token else words(self.instance_prompt) - words(self.class_prompt)

    def subject_and_class(self) -> tuple[str, str]:
        """("sks dog", "dog") for "photo of a sks dog" and "photo of a dog": each prompt without the words the two
        begin with alike."""
        subject, class_ = self.instance_prompt.split(), self.class_prompt.split()
        same = next((i for i, (a, b) in enumerate(zip(subject, class_)) if a != b), min(len(subject), len(class_)))
        return " ".join(subject[same:]) or self.instance_prompt, " ".join(class_[same:]) or self.class_prompt


def words(text: str) -> set[str]:
    """The words of a prompt, in lower case, without punctuation."""
    return set(re.findall(r"\w+", text.lower()))


def run_concepts(args) -> list[Concept]:
    """The run's concepts: those of the --concepts file, else one from --instance, --prior and their prompts."""
    if not args.concepts:
        token = args.token if words(args.token) <= words(args.instance_prompt) else None
        return [Concept(args.instance_prompt, args.instance, args.prior_prompt, args.prior, token)]
    concepts = read_concepts(Path(args.concepts))
    if len({bool(c.class_data_dir) for c in concepts}) > 1:
        raise SystemExit(f"train.py: error: --concepts {args.concepts}: concept "
                         f"{next(n for n, c in enumerate(concepts, 1) if not c.class_data_dir)}: class_data_dir: "
                         "missing, while other concepts have one; a step takes a class image for each subject photo, "
                         "so give every concept its class images, or none")
    return concepts


def read_concepts(path: Path) -> list[Concept]:
    """A --concepts file: a JSON list of objects with Concept's fields. A folder given relative is relative to the
    file's own folder. Anything wrong is one line naming the concept (counted from 1) and the field."""
    def error(what):
        return SystemExit(f"train.py: error: --concepts {path}: {what}")
    try:
        listed = json.loads(path.read_bytes())
    except (ValueError, OSError) as e:
        raise error(f"not a JSON file ({first_line(e)})") from None
    if not isinstance(listed, list) or not listed:
        raise error("must hold a JSON list of concepts, [{\"instance_prompt\": ..., ...}, ...]")
    known, concepts = [f.name for f in fields(Concept)], []
    for n, entry in enumerate(listed, start=1):
        if not isinstance(entry, dict):
            raise error(f"concept {n}: not an object with the fields {', '.join(known)}")
        unknown = sorted(entry.keys() - set(known))
        if unknown:
            raise error(f"concept {n}: {unknown[0]}: not a field of a concept ({', '.join(known)})")
        for name in known:
            value = entry.get(name)
            if value is None and name in ("class_data_dir", "token"):
                continue
            if not (isinstance(value, str) and value.strip()):
                raise error(f"concept {n}: {name}: {'missing' if value is None else f'{value!r} is not a text'}")
            if name.endswith("_dir"):
                entry[name] = str(path.parent / value)  # an absolute path stays as it is
                if not Path(entry[name]).is_dir():
                    raise error(f"concept {n}: {name}: {entry[name]}: no such folder")
        concepts.append(Concept(**entry))
    return concepts
