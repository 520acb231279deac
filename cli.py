"""What the three programs share about the command line: the checks of their common flags, their notices, the
layout of their --help, and how they exit. The package (dreambooth/) speaks in values and raises ValueError;
this module turns those into flags and one-line messages for a person."""
import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import dreambooth
from dreambooth import files, toyworld
from dreambooth.checkpoint import DEFAULT_FILES, TOY_FILE, sampling_settings
from dreambooth.images import save_png


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default, where it has one, and keeps the line breaks of the examples."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = default is not None and default is not False and default not in ("", argparse.SUPPRESS)
        if action.option_strings and shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parser(prog, description, examples, usage=None):
    """An ArgumentParser whose help ends with example command lines."""
    return argparse.ArgumentParser(prog=prog, description=description, usage=usage, formatter_class=HelpFormatter,
                                   epilog="examples:\n" + "\n".join(f"  {line}" for line in examples))


def check_model_flags(p, args):
    """--ckpt names a path that exists (or toy, tiny), and so does --vae if given; --device is one this machine has
    ("auto": CUDA where there is one). A folder is left to the loader, which says what it is (a diffusers model)."""
    if args.ckpt not in (None, "tiny", "toy") and not Path(args.ckpt).exists():
        p.error(f"--ckpt {args.ckpt}: no such file")
    if args.vae and not Path(args.vae).exists():
        p.error(f"--vae {args.vae}: no such file")
    if args.device in (None, "auto"):
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")


def number(kind=int, low=0, high=None, multiple_of=1, why=""):
    """An argparse type: a finite number from `low` (None: any; to `high`; a multiple of `multiple_of`). argparse's
    error names the flag: "argument --steps: 0: must be at least 1", "argument --lr: nan: must be a finite number"."""
    rule = (f"a positive multiple of {multiple_of}" if multiple_of > 1 and multiple_of >= low else
            f"a multiple of {multiple_of}, at least {low}" if multiple_of > 1 else
            f"from {low} to {high}" if high is not None else f"at least {low}")

    def parse(text):
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
        off_grid = multiple_of > 1 and value % multiple_of
        if low is not None and (value < low or (high is not None and value > high) or off_grid):
            raise argparse.ArgumentTypeError(f"{text}: must be {rule}{why}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'"
    return parse


IMAGE_SIZE = number(low=8, multiple_of=8, why=" (the VAE works on 8x8 pixel blocks)")
# Training needs more: the UNet halves the 8x smaller latent three times, and at 1x1 a GroupNorm has nothing to norm.
TRAIN_RESOLUTION = number(low=64, multiple_of=8, why=" (the UNet halves the latent, an eighth of it, three times)")
DDIM_STEPS = number(low=1, high=999, why=" (the model was trained on 1000 timesteps)")
SEED = number(low=0, high=2**63 - 1)  # what torch.Generator.manual_seed takes, with room for seed + k
FINITE = number(float, low=None)


def precision(text):
    """--precision of sample.py and make_prior.py, as train.py names it: fp16, bf16 or fp32. The CompVis scripts'
    names work too: autocast (fp16) and full (fp32)."""
    return {"autocast": "fp16", "full": "fp32"}.get(text, text)


def add_sampling_flags(p, scale):
    """The flags sample.py and make_prior.py share: the model, the sampler, the image size, the device."""
    toy = toy_sampling()
    p.add_argument("--ckpt", help=CKPT_HELP)
    p.add_argument("--vae", metavar="FILE", help="a separate KL-f8 VAE file (.ckpt/.safetensors) to decode with, "
                                                 "e.g. vae-ft-mse-840000-ema-pruned")
    p.add_argument("--lora", metavar="FILE[:SCALE]", action="append", type=lora_and_scale,
                   help="a LoRA file (kohya's format, e.g. a run's lora.safetensors) merged into the model at SCALE "
                        "(default 1.0) before sampling; repeatable")
    p.add_argument("--ddim_steps", "--ddim-steps", dest="ddim_steps", type=DDIM_STEPS,
                   help=f"DDIM steps; default {SD_DDIM_STEPS}, or the model file's (toy: {toy.get('ddim_steps')})")
    p.add_argument("--scale", type=FINITE, help=f"classifier-free guidance scale; default {scale}, or the model "
                                               f"file's (toy: {toy.get('scale')})")
    p.add_argument("--H", type=IMAGE_SIZE, help="image height, a multiple of 8; default the model's (512; toy: 64)")
    p.add_argument("--W", type=IMAGE_SIZE, help="image width, a multiple of 8; default the model's (512; toy: 64)")
    p.add_argument("--precision", type=precision, choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="the arithmetic on CUDA, under autocast with fp32 weights (autocast, the CompVis name, is "
                        "fp16; full is fp32); the CPU always computes in fp32")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1, ...; auto: cuda if available")


def check_sampling_flags(p, args):
    """The LoRA files exist, and the model's flags are right."""
    for path, _ in args.lora or []:
        if not Path(path).exists():
            p.error(f"--lora {path}: no such file")
    check_model_flags(p, args)


def lora_and_scale(value):
    """--lora FILE or FILE:SCALE -> (FILE, SCALE). A colon not followed by a number belongs to the file's name."""
    path, _, scale = value.rpartition(":")
    try:
        path, scale = (path, float(scale)) if path else (value, 1.0)
    except ValueError:
        return value, 1.0
    if not math.isfinite(scale):
        raise argparse.ArgumentTypeError(f"{value}: SCALE must be a finite number")
    return path, scale


def load_model(args, program):
    """The model of --ckpt (default_checkpoint if not given), with --ema, each --lora merged in at its scale, and
    the VAE of --vae; bad input stops the program with one line naming the file."""
    args.ckpt = args.ckpt or default_checkpoint(program)
    sd = load_checkpoint(program, args.ckpt, device=args.device, ema=getattr(args, "ema", False))
    for path, scale in args.lora or []:
        try:
            dreambooth.load_lora(sd, path, scale)
        except ValueError as e:
            raise SystemExit(f"{program}: error: --lora {e}") from None
    return with_vae(sd, args.vae, program) if args.vae else sd


def load_checkpoint(program, path, **kwargs):
    """dreambooth.load(path, **kwargs), or one line naming --ckpt and the file where that is not a model it loads.
    A small model on the CPU gets one thread (one_thread_for_small_models)."""
    try:
        sd = dreambooth.load(path, **kwargs)
    except ValueError as e:
        raise SystemExit(f"{program}: error: --ckpt {e}") from None
    one_thread_for_small_models(sd)
    return sd


def check_outdir(program, flag, folder):
    """Stop in one line, before the model loads, where no file can be written in `folder` (read-only, a file, under a
    file); nothing is made."""
    try:
        files.check_writable(folder)
    except OSError as e:
        raise SystemExit(f"{program}: error: {flag} {folder}: cannot write there ({e.strerror or e})") from None


def save_image(program, image, path, parameters, kept):
    """images.save_png, or one line naming the file where the write failed (a full disk, a folder made read-only
    meanwhile); `kept` says what is there already."""
    try:
        save_png(image, path, parameters)
    except OSError as e:
        raise SystemExit(f"{program}: error: writing {path} failed ({e.strerror or e}); {kept}") from None


def with_loras(prompt, loras):
    """The prompt as A1111 writes it into PNG info when LoRAs were used: "photo of a dog <lora:name:0.8>"."""
    return prompt + "".join(f" <lora:{model_name(path)}:{scale:g}>" for path, scale in loras or [])


def default_checkpoint(program):
    """The first of dreambooth.checkpoint.DEFAULT_FILES that exists, else "toy", saying so in one line; under
    torchrun rank 0 alone says it (this runs while the flags are read, before ranks.join silences the others)."""
    for f in DEFAULT_FILES:
        if Path(f).is_file():
            return f
    if first_rank():
        print(f"{program}: note: no {DEFAULT_FILES[0]} or .safetensors, so using the built-in toy model "
              "(it draws coloured shapes: docs/toy-world.md)")
    return "toy"


SD_DDIM_STEPS = 50  # SD's sampling steps; its guidance scale is each program's (sample.py 7.5, make_prior.py 10)

# With --ckpt toy (the default without SD weights), the settings that work for the toy model, as the usual ones do
# for SD v1 (docs/toy-world.md; benchmarks/toy.py measures them). Its captions were "a red circle", never
# "photo of ...", and its class images are sampled as all its samples are (its file's guidance scale and steps).
TOY_DEFAULTS = {
    "train.py": {"lr": 3e-4, "batch_size": 4, "noise_offset": 0.1, "steps": 1000, "prior_loss": "base",
                 "prior_weight": 3.0},
    "make_prior.py": {"num": 200},
}


def toy_sampling() -> dict:
    """The toy model's sampling settings, as its file's metadata names them ({} without the file)."""
    return sampling_settings(TOY_FILE) if TOY_FILE.is_file() else {}


def one_thread_for_small_models(sd) -> None:
    """On the CPU, run a 64-px model (the toy, tiny) on one thread unless OMP_NUM_THREADS says otherwise: its
    operations are too small to share between threads that sleep while they wait for work (README,
    "Troubleshooting": training the tiny model, 12.0 steps/s on one thread against 7.0 on two)."""
    if sd.device.type == "cpu" and sd.resolution == 64 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def sampling_defaults(args, sd, scale: float) -> None:
    """Fill in --scale and --ddim_steps where not given: the model file's own (the toy's), else SD's."""
    args.scale = sd.sampling.get("scale", scale) if args.scale is None else args.scale
    args.ddim_steps = args.ddim_steps or sd.sampling.get("ddim_steps", SD_DDIM_STEPS)


def show_toy_defaults(p, program):
    """Each flag's help shows the toy's default beside its own ("default: 1e-6; toy: 3e-4"), and where there are
    no SD weights (so the toy's apply) the description says so."""
    toy = TOY_DEFAULTS.get(program, {})
    for action in p._actions:
        if action.dest in toy and toy[action.dest] != action.default:
            value = toy[action.dest]
            value = f"{value:.0e}".replace("e-0", "e-") if isinstance(value, float) and value < 0.01 else value
            action.help += f" (toy: {value})" if action.default is None else f" (default: %(default)s; toy: {value})"
    if not any(Path(f).is_file() for f in DEFAULT_FILES):
        p.description += (f"\nNo {DEFAULT_FILES[0]} here: --ckpt defaults to the toy model, and the toy's defaults "
                          "apply.")


def with_toy_defaults(p, args, argv, program):
    """args, parsed again with TOY_DEFAULTS where --ckpt is toy or defaults to it (saying so in one line)."""
    args.ckpt = args.ckpt or default_checkpoint(program)
    if args.ckpt != "toy":
        return args
    p.set_defaults(ckpt="toy", **TOY_DEFAULTS[program])
    return p.parse_args(argv)


def prompt_for(ckpt, words):
    """"photo of a dog" for SD, "a circle" for the toy model, whose captions had no "photo of"."""
    return f"a {words}" if ckpt == "toy" else f"photo of a {words}"


def prior_prompts(ckpt, class_name):
    """make_prior.py's prompts for a class: "photo of a dog" for SD. For the toy model, "a circle" and the class in
    each of the colours its captions name ("a red circle", ...), so that the prior keeps the colour words too: with
    "a circle" alone, the subject's colour spread to them (docs/toy-world.md)."""
    if ckpt != "toy":
        return [prompt_for(ckpt, class_name)]
    return [f"a {class_name}"] + [f"a {colour} {class_name}" for colour in toyworld.COLOURS]


CKPT_HELP = ("SD v1 .ckpt/.safetensors, toy (the built-in toy model) or tiny (random, for tests); default "
             "weights/sd-v1-4.ckpt or .safetensors, else toy")


def with_vae(sd, path, program, device=None):
    """sd with the VAE of the file `path` (--vae) instead of its own, or one line saying why not."""
    try:
        vae = dreambooth.load_vae(path, device or sd.device, next(sd.vae.parameters()).dtype)
    except ValueError as e:
        raise SystemExit(f"{program}: error: --vae {e}") from None
    return dataclasses.replace(sd, vae=vae)


def model_name(ckpt):
    """What image metadata calls a model or LoRA: the file's name without its suffix, or for a run's
    model.safetensors or lora.safetensors the run folder's name (runs/dog-20261126/model.safetensors ->
    dog-20261126; copy a run's LoRA into A1111 under that name and <lora:dog-20261126:1> finds it)."""
    path = Path(ckpt)
    run_file = path.name in ("model.safetensors", "lora.safetensors") and path.parent.name
    return path.parent.name if run_file else path.stem


def note_long_prompts(tokenizer, prompts):
    """One line for each distinct prompt longer than CLIP reads, naming where the ignored text starts."""
    distinct = list(dict.fromkeys(prompts))
    for i, prompt in enumerate(distinct):
        cut = tokenizer.cut(prompt)
        if cut:
            tokens, kept = cut
            which = f"prompt {i + 1} of {len(distinct)}" if len(distinct) > 1 else "the prompt"
            print(f"note: {which} is {tokens} tokens; CLIP reads {tokenizer.max_length - 2}, so the text after "
                  f"'...{kept[-30:]}' is ignored")


def progress(**kwargs):
    """A tqdm bar on a terminal. Where the output goes to a file (nohup, CI logs) there is no bar: its carriage
    returns and cursor moves would fill the file; the programs print plain lines instead."""
    return tqdm(disable=not interactive(), dynamic_ncols=True, **kwargs)


def interactive():
    """Whether a person watches this process's output: a terminal, and under torchrun rank 0's alone."""
    return sys.stderr.isatty() and first_rank()


def first_rank():
    """Whether this process is the one that speaks: the only one, or torchrun's rank 0 (ranks.py)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def stop_requests():
    """Inside, Ctrl-C (SIGINT) and SIGTERM (`kill`, Slurm at its time limit; torchrun passes both on) do not end the
    process: each appends its signal number to the list this yields, so that a loop can finish its step, save and
    stop. A second Ctrl-C ends it at once (one line, exit status 130). A second SIGTERM only asks again: it may be the
    same request delivered twice (by Slurm to every process, and by torchrun to its workers), and SIGKILL is what
    ends a process that does not stop in time."""
    asked = []

    def on_signal(signum, frame):
        asked.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = [signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)]
    try:
        yield asked
    finally:
        for signum, handler in zip((signal.SIGINT, signal.SIGTERM), previous):
            signal.signal(signum, handler)
        if signal.SIGTERM in asked:  # the process is on its way out: SIGTERM delivered twice must not cut that short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def interrupts_raise():
    """Inside, Ctrl-C raises KeyboardInterrupt, Python's own way, where startup.py's handler would end the process at
    once: for work that has something to finish when interrupted (the caller catches it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(main):
    """Run a program's main(): exit 0 on success, 1 on an error (its SystemExit message), 2 on a usage error
    (argparse's), 130 when interrupted by Ctrl-C, as shells expect for SIGINT."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
