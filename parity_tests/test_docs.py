"""Every ```python block in README.md and docs/*.md runs as written, and prints what the text after it says.

Each block runs alone, in a fresh namespace, in a temporary directory (blocks save tiny checkpoints there).
An HTML comment on the line before a block changes how it runs:
  <!-- not run: REASON -->                   never run (real released weights, several hosts); listed in NOT_RUN
  <!-- run with VAR=VALUE ... -->             run in a subprocess with those environment variables
                                              (XLA_FLAGS=--xla_force_host_platform_device_count=8 for a mesh)
The sentence after a block may say what it prints:
  It prints `TEXT`.                          the whole output, exactly
  It prints about `LABEL FIGURE`, below `B`  the label exactly, the figure under the bound: its digits depend on
                                             the CPU XLA compiles for, so they are never compared
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

NOT_RUN_MARK = re.compile(r"<!-- not run: (.+?) -->")
RUN_WITH_MARK = re.compile(r"<!-- run with (.+?) -->")
PRINTS_ABOUT = re.compile(r"It prints about `(.*?)`, below `(.*?)`")
PRINTS = re.compile(r"It prints `(.*?)`")

# Blocks that do not run, by (file, reason): a new one is a decision, made here.
NOT_RUN = {
    ("README.md", "needs a released pipeline directory"),
    ("docs/checkpoints.md", "needs the released SD 1.5 and SDXL files"),
    ("docs/sharding.md", "needs several hosts (or processes joined by jax.distributed.initialize)"),
}


class Block(NamedTuple):
    doc: str  # relative to the repository
    line: int  # of the opening fence
    code: str
    not_run: str | None  # the reason
    env: dict[str, str]
    after: str  # the text up to the next code block or heading: what the block prints


def blocks(path: pathlib.Path) -> list[Block]:
    lines = path.read_text().split("\n")
    found = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        assert not lines[i].startswith(" "), f"{path.name}:{i + 1}: a python block must not be indented"
        start = i
        end = lines.index("```", start + 1)
        before = lines[start - 1] if start else ""
        not_run = NOT_RUN_MARK.fullmatch(before.strip())
        run_with = RUN_WITH_MARK.fullmatch(before.strip())
        env = dict(item.split("=", 1) for item in run_with.group(1).split()) if run_with else {}
        after = []
        for line in lines[end + 1:]:
            if line.lstrip().startswith(("```", "#", "<!--")):
                break
            after.append(line)
        found.append(Block(str(path.relative_to(ROOT)), start + 1, "\n".join(lines[start + 1:end]) + "\n",
                           not_run.group(1) if not_run else None, env, " ".join(after)))
        i = end + 1
    return found


BLOCKS = [b for path in DOCS for b in blocks(path)]
RUN = [b for b in BLOCKS if b.not_run is None]


def test_every_doc_is_read_and_opt_outs_are_the_listed_ones():
    assert {p.name for p in DOCS} >= {"README.md", "checkpoints.md", "verification.md", "attention.md", "unet.md",
                                      "programs.md", "sharding.md", "cli.md"}
    assert {(b.doc, b.not_run) for b in BLOCKS if b.not_run} == NOT_RUN
    readme = [b for b in RUN if b.doc == "README.md"]
    assert len(readme) == 3, "the README's three jobs: run a UNet, port weights, verify"


def assert_printed_as_said(out: str, after: str) -> None:
    """What the text after the block says it prints: exactly, or about (the label, and the figure under a bound)."""
    printed = out.strip()
    about = PRINTS_ABOUT.search(after)
    if about:
        said, bound = about.groups()
        label, _, value = printed.rpartition(" ")
        said_label, _, said_value = said.rpartition(" ")
        assert label == said_label, (printed, said)
        assert float(value) < float(bound), f"{printed}: not below the documented bound {bound}"
        assert float(said_value) < float(bound), "the documented figure breaks its own bound"
        return
    exact = PRINTS.search(after)
    if exact:
        assert printed == exact.group(1)


def test_assert_printed_as_said_never_compares_a_figures_digits():
    after = "It prints about `error: 5e-05`, below `1e-3` (float32 rounding)."
    assert_printed_as_said("error: 4.7e-05\n", after)
    with pytest.raises(AssertionError):
        assert_printed_as_said("error: 2e-03\n", after)  # above the bound
    with pytest.raises(AssertionError):
        assert_printed_as_said("mistake: 5e-05\n", after)  # another label
    with pytest.raises(AssertionError):
        assert_printed_as_said("208 tensors\n", "It prints `209 tensors`.")


@pytest.mark.parametrize("block", RUN, ids=lambda b: f"{b.doc}:{b.line}")
def test_block_runs_and_prints_what_the_text_says(block, tmp_path, monkeypatch, capsys):
    if block.env:
        env = os.environ | block.env | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        result = subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr
        out = result.stdout
    else:
        monkeypatch.chdir(tmp_path)
        exec(compile(block.code, f"{block.doc}:{block.line}", "exec"), {"__name__": "__main__"})
        out = capsys.readouterr().out
    assert_printed_as_said(out, block.after)


def test_readme_names_every_seed_difference_test():
    """The README's "Known differences from the seed" names each test of test_seed_differences.py, and only those."""
    section = (ROOT / "README.md").read_text().split("## Known differences from the seed", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+)`", section))
    defined = set(re.findall(r"^def (test_\w+)", (ROOT / "parity_tests" / "test_seed_differences.py").read_text(), re.M))
    assert named == defined


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_reaches_a_file_and_heading():
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            path, _, fragment = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            assert linked.exists(), f"{doc.name}: {target}"
            if fragment:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                assert fragment in {anchor(h) for h in headings}, f"{doc.name}: {target}"
