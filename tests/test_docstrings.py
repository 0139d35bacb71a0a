"""Docstring style of the package: a one-line summary first, and no measurements that go stale.

Every docstring in `diffusion_jax/` (modules, classes, functions and methods, nested ones too)
opens with a one-line summary: one complete sentence on the first line, ending in ".", "?" or
"!", of at most 100 characters; when more follows, the second line is blank. Timings, speeds and
losses measured on some machine belong in docs/ or result files, not in docstrings or in the
comments of the configs, where they go stale without anyone noticing.
"""

import ast
import pathlib
import re
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffusion_jax"
SUMMARY_MAX_CHARS = 100
SENTENCE_ENDS = (".", "?", "!")

# Phrases that quote a measurement taken on some machine: a speed, a duration, a loss or score
# reached. Facts of the code itself (parameter counts, FLOPs per image, shapes) and the names of
# logged quantities ("steps/s" without a number) are not matched.
_NUMBER = r"(?<![\w.-])\d[\d.,]*"
_TIME_UNIT = r"(?:ns|us|µs|ms|s|sec|secs|seconds?|min|mins|minutes?|h|hrs?|hours?)"
_ABOUT = r"(?:of |about |around |roughly |~ ?|= ?|: ?)?"
MEASUREMENT_PATTERNS = [
    r"\bmeasured\b[^.]{0,60}?" + _NUMBER,  # "measured ~2e-13", "Measured: 26.2 MB -> 13.8 MB"
    _NUMBER + r" ?k? ?(?:steps|images|imgs?|samples|examples|tokens|batches|it|[kMGTP]?FLOPs?"
    r"|[kMG]i?B) ?/ ?(?:s|sec|second)\b",
    _NUMBER + r" (?:steps|images|samples|examples|tokens|iterations) (?:per|a) second\b",
    _NUMBER + r" ?" + _TIME_UNIT + r" on (?:an? |one |two |\d+ )?\w",  # "12 s on one GPU"
    # "on two cores" / "on a 2-core machine" followed by a number in the same sentence (a pointer
    # such as "its speed on a 2-core machine is in docs/benchmarks.md" is fine).
    r"\bon (?:two|four|\d+) (?:cpu )?cores\b[^.]{0,80}?" + _NUMBER,
    r"\bon an? (?:\d+|two|four|single)-core\b[^.]{0,80}?" + _NUMBER,
    r"\b(?:about|roughly|around|~) ?" + _NUMBER + r" ?" + _TIME_UNIT + r"\b",
    r"\btook " + _NUMBER + r" ?" + _TIME_UNIT + r"\b",
    r"\b(?:loss|FID|MFU|accuracy) " + _ABOUT + _NUMBER,  # "final loss about 0.037"
    _NUMBER + r" ?% MFU\b",
]
# In a pattern a space stands for any run of white space and " ?" for optional white space, line
# breaks included, since a phrase can be wrapped over two lines of a docstring or comment.
_MEASUREMENT = re.compile(
    "|".join(f"(?:{p})".replace(" ?", r"\s*").replace(" ", r"\s+") for p in MEASUREMENT_PATTERNS),
    re.IGNORECASE)


def _package_files():
    return sorted(PACKAGE.rglob("*.py"))


def _config_files():
    files = sorted((ROOT / "configs").glob("*.py"))
    # The default config lives in the package; its comments are config comments too.
    defaults = PACKAGE / "defaults.py"
    return files + ([defaults] if defaults.exists() else [])


def _rel(path):
    return path.relative_to(ROOT).as_posix()


def _docstrings(path):
    """Yields (line, docstring) for every docstring in the file, the raw text as written."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                yield node.body[0].lineno, doc


def summary_problem(doc):
    """Returns why the docstring does not open with a one-line summary, or None when it does."""
    lines = doc.strip().split("\n")
    first = lines[0].strip()
    if not first:
        return "empty docstring"
    if len(lines) > 1 and lines[1].strip():
        return "the second line is not blank (the summary must be one line, then a blank line)"
    if not first.endswith(SENTENCE_ENDS):
        return f"the first line does not end in a full stop: {first!r}"
    if len(first) > SUMMARY_MAX_CHARS:
        return f"the summary has {len(first)} characters (at most {SUMMARY_MAX_CHARS})"
    return None


def test_summary_rule_examples():
    assert summary_problem("Adds one.") is None
    assert summary_problem("Adds one.\n\n    Details follow here.\n    ") is None
    assert summary_problem("\n    Adds one.\n    ") is None
    assert summary_problem("Adds one") is not None
    assert summary_problem("Adds one to x, which is\n    then returned.") is not None
    assert summary_problem("Adds one.\n    Details without a blank line.") is not None
    assert summary_problem("Returns:") is not None
    assert summary_problem("A" * 100 + ".") is not None


def test_docstrings_open_with_a_one_line_summary():
    problems = []
    for path in _package_files():
        for line, doc in _docstrings(path):
            why = summary_problem(doc)
            if why:
                problems.append(f"{_rel(path)}:{line}: {why}")
    assert not problems, (f"{len(problems)} docstrings do not open with a one-line summary:\n"
                          + "\n".join(problems))


def test_measurement_rule_examples():
    for text in ["measured ~2e-13", "Measured: 26.2 MB", "0.7 steps/s", "~1.6k images/s",
                 "12 it/s", "300 TFLOP/s", "12 s on one GPU", "about 50\n    minutes on a CPU",
                 "on two cores the suite took 15", "on a 2-core machine, 0.45 steps a second",
                 "takes about 2 minutes", "final loss about 0.037", "loss 0.068", "took 15 s",
                 "FID 3.2", "41% MFU"]:
        assert _MEASUREMENT.search(text), text
    for text in ["35,746,307 parameters", "51 GFLOP per training image", "loss weighting",
                 "sigma in [0.002, 80]", "steps per epoch", "one step of the sampler",
                 "logs the loss, steps/s and samples", "is measured in Inception-v3's features",
                 "measured on a GPU are in docs/", "at 256 px", "the loss at t = 0.5",
                 "Its speed on a 2-core machine is in docs/benchmarks.md."]:
        assert not _MEASUREMENT.search(text), text


def _matches(text, first_line):
    """Yields (line, matched text) for each measurement phrase in text starting at first_line."""
    for m in _MEASUREMENT.finditer(text):
        yield first_line + text.count("\n", 0, m.start()), " ".join(m.group(0).split())


def _comment_blocks(path):
    """Yields (first line, text) for each run of comments on consecutive lines of a Python file."""
    # A comment can run over several lines; reading the run whole finds phrases wrapped over two.
    block, start, last = [], None, None
    with open(path, "rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type != tokenize.COMMENT:
                continue
            line, text = tok.start[0], tok.string.lstrip("#").strip()
            if block and line == last + 1:
                block.append(text)
            else:
                if block:
                    yield start, "\n".join(block)
                block, start = [text], line
            last = line
    if block:
        yield start, "\n".join(block)


def test_no_measurements_in_docstrings_or_config_comments():
    problems = []
    for path in _package_files():
        for line, doc in _docstrings(path):
            for where, found in _matches(doc, line):
                problems.append(f"{_rel(path)}:{where}: docstring quotes {found!r}")
    for path in _config_files():
        texts = [("comment", line, text) for line, text in _comment_blocks(path)]
        if path.parent.name == "configs":  # the package's docstrings are read above
            texts += [("docstring", line, doc) for line, doc in _docstrings(path)]
        for kind, line, text in texts:
            for where, found in _matches(text, line):
                problems.append(f"{_rel(path)}:{where}: {kind} quotes {found!r}")
    assert not problems, (
        f"{len(problems)} measurements quoted in docstrings or config comments (they go stale; "
        "put them in docs/ or a results file):\n" + "\n".join(problems))
