"""The README a newcomer follows: one sitting long, in the order they need it, the install steps before the first
pip install, and the commands it names are the ones that work (the test command is exactly CI's)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SECTIONS = ["The first run", "With real weights", "How it works, and the order to read the files",
            "The flags most people use", "LoRA", "Sampling and class images", "The run folder and resume",
            "More subjects, more GPUs", "Tests",
            "Performance", "Troubleshooting", "Credits and licences"]


def test_the_readme_is_one_sitting_in_the_order_a_reader_needs():
    assert len(README.splitlines()) <= 300
    assert re.findall(r"^## (.+)$", README, re.M) == SECTIONS
    for link in re.findall(r"\]\(((?:docs|benchmarks|weights)/[^)#]+)", README):
        assert (ROOT / link).exists(), link


def test_install_steps_come_before_the_first_pip_install():
    """Python's version, a virtual environment and the command for PyTorch's CPU build (its own wheel index, as
    PyTorch's install page gives it) come before the first `pip install -r`, which would fetch the CUDA build."""
    first = README.index("pip install -r requirements.txt")
    cpu_torch = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    for step in ("Python 3.10", "python3 -m venv", cpu_torch):
        assert README.index(step) < first, step


def test_the_first_section_says_where_the_pictures_land():
    first_run = README.split("## The first run")[1].split("\n## ")[0]
    for place in ("runs/demo/samples/", "runs/demo/model.safetensors", "outputs/samples/00000.png",
                  "outputs/samples/grid-0000.png", "![](docs/toy/after.png)"):
        assert place in first_run, place


def test_the_test_commands_are_cis_and_the_quick_subset_exists():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "pip install -r requirements.txt -r requirements-test.txt && python -m pytest"
    assert f"\n{command}\n" in README and ci.rstrip().endswith(command)
    assert "python -m pytest -m quick" in README
    assert 'markers = ["quick:' in (ROOT / "pyproject.toml").read_text()
