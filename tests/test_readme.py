"""The README and docs/*.md: their code runs and prints what it promises, and their links hold.

Convention: every ```python block runs, each file's blocks in order in one namespace, in a fresh
process whose working directory is a temporary folder (``configs/`` reachable from it as in a
clone). A block that needs a trained run or files from elsewhere has ``<!-- not run -->`` on the
line right before its fence.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "<!-- not run -->"
MAX_README_LINES = 250

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(path):
    """``(first line number, code, runs)`` of every ```python block of ``path``."""
    text = path.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        before = [line.strip() for line in text[:match.start()].splitlines() if line.strip()]
        runs = not (before and before[-1] == NOT_RUN)
        blocks.append((text.count("\n", 0, match.start(1)) + 1, match.group(1), runs))
    return blocks


def _block(path, marker):
    blocks = [code for _, code, _ in python_blocks(path) if marker in code]
    assert len(blocks) == 1, f"{len(blocks)} python blocks of {path.name} contain {marker!r}"
    return blocks[0]


def test_readme_example_runs(capsys):
    example = _block(README, "analytic.DiagonalGaussian")
    namespace = {}
    exec(compile(example, str(README), "exec"), namespace)
    result = namespace["result"]
    assert result.nfe == 20
    np.testing.assert_allclose(np.asarray(result.samples).mean(0), [1.0, -1.0], atol=0.06)
    np.testing.assert_allclose(np.asarray(result.samples).var(0), [0.5, 2.0], rtol=0.08)


def test_training_example_runs(tmp_path, monkeypatch):
    """The train-and-generate example, on the tiny preset instead of Fashion-MNIST."""
    page = ROOT / "docs" / "python_api.md"
    example = _block(page, "run.restore_run")
    for old, new in [("fashion_mnist_cpu", "tiny"), ("label=4", "label=1")]:
        assert old in example
        example = example.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # configs/ lives at the repository root
    namespace = {}
    exec(compile(example, str(page), "exec"), namespace)
    assert namespace["images"].shape == (16, 16, 16, 3)
    assert (tmp_path / "coats.png").exists()
    assert (tmp_path / "runs" / "fm_cpu" / "checkpoints" / "6").is_dir()


# Runs the blocks it reads as JSON from stdin in one namespace, with each block's line numbers
# in tracebacks.
_RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for path, line, code in json.load(sys.stdin):
    exec(compile("\\n" * (line - 1) + code, path, "exec"), namespace)
"""

_RUNNABLE = [p for p in PAGES if any(runs for _, _, runs in python_blocks(p))]


def test_pages_have_code_that_runs():
    assert README in _RUNNABLE and ROOT / "docs" / "python_api.md" in _RUNNABLE


@pytest.mark.parametrize("page", _RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page, tmp_path):
    blocks = [(str(page), line, code) for line, code, runs in python_blocks(page) if runs]
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(blocks), text=True,
                          cwd=tmp_path, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, (f"the python blocks of {page.name} failed:\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; keep it to {MAX_README_LINES}"


def _without_code_blocks(text):
    return re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.M | re.S)


def _prose(text):
    """``text`` without code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", _without_code_blocks(text))


def _anchors(path):
    """GitHub's anchors of the headings of ``path``."""
    anchors, seen = set(), {}
    text = _without_code_blocks(path.read_text())
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path):
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(path.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository_and_exist(page):
    text = page.read_text()
    urls = re.findall(r"\b(?:https?|ftp)://\S+|\bwww\.\S+", text)
    assert not urls, f"{page.name} points outside the repository: {urls}"
    for target in _links(page):
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I), \
            f"{page.name} links to {target!r}, outside the repository"
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        assert linked == ROOT or ROOT in linked.parents, \
            f"{page.name} links to {target!r}, outside the repository"
        assert linked.exists(), f"{page.name} links to {target!r}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), \
                f"{page.name} links to {target!r}: {linked.name} has no heading {anchor!r}"

