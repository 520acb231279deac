"""What the three programs share (cli.py): --help with every default and example commands, exit codes, the model
name in image metadata."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import train_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("program, usage, defaults", [
    ("train.py", "train.py --instance DIR --class NAME", [
        "--steps STEPS", "(default: 800; toy: 1000)", "default 1e-6, with --lora 1e-4 (toy: 3e-4)",
        "(default: 1; toy: 4)", "(default: 0.0; toy: 0.1)", "(default: noise; toy: base)",
        "default 50, or the model file's (toy: 25)", "(default: sks)", "(default: 42)", "(default: 200)"]),
    ("sample.py", "(--prompt PROMPT | --from-file FILE)", ["default 50, or the model file's (toy: 25)",
                                                           "default 7.5, or the model file's (toy: 3.0)",
                                                           "(default: 42)", "(default: 0.0)",
                                                           "(default: outputs/samples)", "(default: fp16)"]),
    ("make_prior.py", "make_prior.py --class NAME", ["(default: 200)", "default 10.0, or the model file's (toy: 3.0)",
                                                     "(default: 4)"]),
])
def test_help_shows_defaults_and_ends_with_examples(program, usage, defaults):
    result = subprocess.run([sys.executable, program, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines at the terminal's width
    assert usage in text
    for default in defaults:
        assert default in text
    assert "(default: None)" not in text
    examples = result.stdout.split("examples:\n")[1].splitlines()
    assert len(examples) >= 2 and all(line.strip().startswith((f"python {program}", f"torchrun --nproc_per_node 4 "
                                                                f"{program}")) for line in examples)


def test_exit_codes():
    def interrupted():
        raise KeyboardInterrupt

    codes = []
    for main in (lambda: None, interrupted, lambda: sys.exit("x.py: error: bad")):
        with pytest.raises(SystemExit) as e:
            cli.run(main)
        codes.append(e.value.code)
    assert codes == [None, 130, "x.py: error: bad"]  # None: status 0; a message: status 1


def test_under_torchrun_rank_0_alone_says_the_toy_model_is_used(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no weights/ here
    for rank, says in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert cli.default_checkpoint("make_prior.py") == "toy"
        assert ("make_prior.py: note: no weights/sd-v1-4.ckpt" in capsys.readouterr().out) == says


def test_model_name_is_the_run_folder_for_a_runs_model():
    assert cli.model_name("runs/dog-20261126/model.safetensors") == "dog-20261126"
    assert cli.model_name("weights/sd-v1-4.ckpt") == "sd-v1-4"
    assert cli.model_name("model.safetensors") == "model"
    assert cli.model_name("tiny") == "tiny"


def test_long_prompts_get_one_plain_line_each(capsys):
    import dreambooth

    long = "a photo of a sks dog " + "in a garden full of flowers " * 15
    cli.note_long_prompts(dreambooth.Tokenizer(), ["a dog", long, long, "a cat"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    tokens, kept = dreambooth.Tokenizer().cut(long)  # cut() itself is checked against CLIPTokenizerFast
    assert lines == [f"note: prompt 2 of 3 is {tokens} tokens; CLIP reads 75, so the text after '...{kept[-30:]}' "
                     "is ignored"]


def examples(program):
    result = subprocess.run([sys.executable, program, "--help"], cwd=ROOT, capture_output=True, text=True)
    return [shlex.split(line.split("#")[0])[2:] for line in result.stdout.split("examples:\n")[1].splitlines()]


def test_the_resume_example_continues_the_toy_example_run():
    """train.py's --help: the --resume example continues the run of the toy example (its folder) past the step that
    run stops at, the toy's --steps, so it trains rather than saying the run is done."""
    toy_run, resume = [argv for argv in examples("train.py") if "runs/demo" in argv]
    args, _ = train_settings.parse_args(toy_run)
    assert args.ckpt == "toy" or Path("weights/sd-v1-4.ckpt").is_file()
    assert resume[:2] == ["--resume", args.out]
    assert int(resume[resume.index("--steps") + 1]) > cli.TOY_DEFAULTS["train.py"]["steps"] == args.steps


# Two ways an interrupt meets an import: a KeyboardInterrupt raised inside it, and a real SIGINT arriving in code that
# swallows what it catches (C++ bindings may; torch imports more of itself while the first model is built).
RAISED = "raise KeyboardInterrupt\n"
SWALLOWED = ("import os, signal, time\ntry:\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)\n"
             "except BaseException:\n    pass\nraise SystemExit('the interrupt was swallowed')\n")


@pytest.mark.parametrize("module", [RAISED, SWALLOWED], ids=["raised", "swallowed"])
@pytest.mark.parametrize("program", ["train.py", "sample.py", "make_prior.py", "make_toy.py"])
def test_ctrl_c_while_importing_is_one_line_and_exit_130(program, module, tmp_path):
    """Ctrl-C while the program is still importing (torch takes seconds) ends it as it ends it later: the line
    "interrupted" and exit status 130, no traceback. The interrupt is made to arrive inside an import: in a module
    the programs import (after startup.py), standing in for tqdm."""
    (tmp_path / "tqdm.py").write_text(module)
    env = os.environ | {"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, program, "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (130, "\ninterrupted\n")
