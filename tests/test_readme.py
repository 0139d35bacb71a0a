"""The README's runnable example runs and prints what it promises."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "analytic.DiagonalGaussian" in b)
    namespace = {}
    exec(compile(example, str(README), "exec"), namespace)
    result = namespace["result"]
    assert result.nfe == 20
    np.testing.assert_allclose(np.asarray(result.samples).mean(0), [1.0, -1.0], atol=0.06)
    np.testing.assert_allclose(np.asarray(result.samples).var(0), [0.5, 2.0], rtol=0.08)


def test_readme_training_example_runs(tmp_path, monkeypatch):
    """The train-and-generate example, on the tiny preset instead of Fashion-MNIST."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "train.restore_run" in b)
    for old, new in [("fashion_mnist_cpu", "tiny"), ("label=4", "label=1")]:
        assert old in example
        example = example.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(README.parent))  # configs/ lives at the repository root
    namespace = {}
    exec(compile(example, str(README), "exec"), namespace)
    assert namespace["images"].shape == (16, 16, 16, 3)
    assert (tmp_path / "coats.png").exists()
    assert (tmp_path / "runs" / "fm_cpu" / "checkpoints" / "6").is_dir()
