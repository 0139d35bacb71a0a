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
