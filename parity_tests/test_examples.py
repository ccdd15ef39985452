"""The examples run as written, at their default sizes (the docs' code blocks: test_docs.py).

The examples' defaults cross the sizes where bugs hid: jvp.py's 16 x 16 latent is one
256-query attention block with 77 fixed context tokens (forward mode went wrong there).
"""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_every_example_is_run():
    assert [p.name for p in EXAMPLES] == ["jvp.py", "linen.py", "lora.py", "sample.py", "text_to_image.py", "train.py", "unet.py"]


# Each at its default size; the UNet's v-prediction path too (tiny: the same program).
RUNS = [(p, ()) for p in EXAMPLES] + [(ROOT / "examples" / "unet.py", ("--prediction", "v", "--tiny"))]


@pytest.mark.parametrize("script,args", RUNS, ids=lambda r: r.name if isinstance(r, pathlib.Path) else " ".join(r) or "default")
def test_example_runs(script, args):
    result = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
