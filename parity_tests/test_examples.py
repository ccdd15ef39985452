"""The examples and the README's program snippet run as written, at their default sizes.

The examples' defaults cross the sizes where bugs hid: jvp.py's 16 x 16 latent is one
256-query attention block with 77 fixed context tokens (forward mode went wrong there).
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_every_example_is_run():
    assert [p.name for p in EXAMPLES] == ["jvp.py", "linen.py", "sample.py", "train.py", "unet.py"]


# Each at its default size; the UNet's v-prediction path too (tiny: the same program).
RUNS = [(p, ()) for p in EXAMPLES] + [(ROOT / "examples" / "unet.py", ("--prediction", "v", "--tiny"))]


@pytest.mark.parametrize("script,args", RUNS, ids=lambda r: r.name if isinstance(r, pathlib.Path) else " ".join(r) or "default")
def test_example_runs(script, args):
    result = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def assert_printed_as_said(out: str, section: str) -> None:
    """The README says "It prints about `LABEL FIGURE`, below `BOUND`": the label must match and the value stay
    under the bound. The figure's digits depend on the CPU XLA compiles for, so they are never compared."""
    (said, bound) = re.findall(r"It prints about `(.*?)`, below `(.*?)`", section)[0]
    printed = out.strip()
    label, _, value = printed.rpartition(" ")
    said_label, _, said_value = said.rpartition(" ")
    assert label == said_label, (printed, said)
    assert float(value) < float(bound), f"{printed}: not below the README's bound {bound}"
    assert float(said_value) < float(bound), "the README's own figure breaks its bound"


def test_readme_program_snippet_runs_and_prints_what_the_readme_says(capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using flax_sgm inside a JAX program", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["y"].shape == namespace["x_T"].shape == namespace["dy"].shape == (2, 16, 16, 64)
    # The JVP (every weight random, the context fixed) agrees with the central difference.
    assert_printed_as_said(capsys.readouterr().out, section)


def test_readme_sharding_program_runs_on_8_cpu_devices():
    """The README's mesh program as a whole file, with the XLA_FLAGS line it gives for a CPU."""
    section = (ROOT / "README.md").read_text().split("## Several devices: the model over a jax Mesh", 1)[1].split("\n## ", 1)[0]
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=8" in section
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "8 devices; to_q kernel gradient split as P(None, 'model')"


def test_readme_unet_check_runs_and_prints_what_the_readme_says(tmp_path, monkeypatch, capsys):
    section = (ROOT / "README.md").read_text().split("## The whole UNet", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)  # it saves a diffusers directory
    exec(compile(code, "README.md", "exec"), {})
    assert_printed_as_said(capsys.readouterr().out, section)
