"""The package's shape: imports go one way, modules and functions stay small, it installs alone."""

import ast
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffusion_jax"

# The math core imports nothing above it; models, data and pretrained import no application code.
# Editing (image-to-image, inpainting) and LoRA are functions of arrays and parameter trees.
MATH = {"schedules", "parameterization", "losses", "samplers", "guidance", "analytic",
        "likelihood", "metrics", "flops", "time_grids", "multistep", "editing", "lora",
        "repaint"}
LAYERS = {
    "math": lambda name: name.split(".")[1] in MATH,
    "models": lambda name: name.startswith("diffusion_jax.models"),
    "data": lambda name: name.startswith("diffusion_jax.data"),
    "pretrained": lambda name: name.startswith("diffusion_jax.pretrained"),
    "pipelines": lambda name: name.startswith("diffusion_jax.pipelines"),
}
ALLOWED = {  # layer -> what its modules may import from the package
    "math": lambda name: name.split(".")[1] in MATH,
    "models": lambda name: name.startswith("diffusion_jax.models") or name == "diffusion_jax.text",
    "data": lambda name: name.startswith("diffusion_jax.data") or name == "diffusion_jax.text",
    # Converters of published formats sit just above the networks they fill (and map scheduler
    # configs onto the math core's schedules).
    "pretrained": lambda name: name.startswith(("diffusion_jax.pretrained",
                                                "diffusion_jax.models")) or name == "diffusion_jax.text"
    or name.split(".")[1] in MATH,
    # Pipelines compose loaded models with the math core, over a mesh; no training code.
    "pipelines": lambda name: name.startswith(("diffusion_jax.pipelines", "diffusion_jax.pretrained",
                                               "diffusion_jax.models"))
    or name.split(".")[1] in MATH or name == "diffusion_jax.parallel",
}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name, modules):
    """The module ``name`` names, or its longest prefix that is a module."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def _imports(path, modules):
    """``[(imported module, line, inside a function)]`` of the package's own modules."""
    tree = ast.parse(path.read_text())
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - child.level + 1]
                                    + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in child.names]
            for name in names:
                if name.split(".")[0] != "diffusion_jax":
                    continue
                target = _resolve(name, modules)
                found.append((target, child.lineno, in_function))
                # Importing a.b.c from outside package a.b runs a.b's __init__ as well.
                parent = target.rpartition(".")[0]
                if parent != "diffusion_jax" and parent in modules and not this.startswith(
                        parent + "."):
                    found.append((parent, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return [(target, line, inner) for target, line, inner in found if target != this]


def _graph():
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _cycles(graph):
    """Every import cycle, each as a list of module names (found by depth-first search)."""
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target, _, _ in graph[node]:
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_the_package_has_no_import_cycle():
    """Imports inside functions count too, so a cycle cannot hide in one."""
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": [("b", 1, False)], "b": [("c", 1, True)], "c": [("a", 1, False)], "d": []}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


def test_no_package_import_hides_inside_a_function():
    """The package's own modules are imported at the top; only optional dependencies late."""
    hidden = [f"{name}:{line} imports {target}" for name, edges in _graph().items()
              for target, line, inner in edges if inner]
    assert not hidden, "\n".join(hidden)


def test_layers_import_downwards_only():
    wrong = []
    for name, edges in _graph().items():
        for layer, member in LAYERS.items():
            if name != "diffusion_jax" and member(name):
                wrong += [f"{name} ({layer}) imports {target}" for target, _, _ in edges
                          if not ALLOWED[layer](target)]
    assert not wrong, "\n".join(wrong)


def test_modules_and_functions_stay_small():
    """No module over 600 lines; no function over 80 (the networks' ``__call__`` aside)."""
    long_modules = [f"{p.relative_to(ROOT)}: {n} lines" for p in PACKAGE.rglob("*.py")
                    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    long_functions = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if path.parent.name == "models" and node.name in ("__call__", "setup"):
                continue
            body = (node.body[1:] if ast.get_docstring(node) else node.body) or node.body
            lines = body[-1].end_lineno - body[0].lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                      f"{lines} lines")
    assert not long_modules + long_functions, "\n".join(long_modules + long_functions)


def test_an_installed_copy_validates_a_preset_loaded_by_path(tmp_path):
    """``pip install .`` (not editable), then from another directory: the library loads a preset
    by its path, validates it with its own schema, and builds the model it names."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "diffusion_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    # Build with the setuptools at hand when there is one (no download); else pip fetches it.
    offline = (["--no-build-isolation", "--no-index"]
               if importlib.util.find_spec("setuptools") else [])
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *offline, "--target",
         str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import diffusion_jax, sys\n"
        f"assert diffusion_jax.__file__.startswith({str(site)!r}), diffusion_jax.__file__\n"
        "from diffusion_jax import configuration\n"
        f"config = configuration.load_config({str(ROOT / 'configs' / 'fashion_mnist_cpu.py')!r})\n"
        "configuration.validate(config)\n"
        "model = configuration.build_model(config.model, (28, 28, 1), 10)\n"
        "print(config.data.name, config.model.name, config.model.unet.channels,\n"
        "      type(model).__name__)\n"
        "config.model.unet.channels = 0\n"
        "try:\n"
        "    configuration.validate(config)\n"
        "except configuration.ConfigError as err:\n"
        "    print(err)\n")
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "fashion_mnist unet 32 UNet"
    assert "config.model.unet.channels must be > 0" in lines[1]
    assert not (elsewhere / "configs").exists() and not list(elsewhere.iterdir())


def test_load_config_reports_missing_and_broken_files(tmp_path):
    from diffusion_jax import configuration

    with pytest.raises(configuration.ConfigError, match="does not exist"):
        configuration.load_config(str(tmp_path / "nope.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(configuration.ConfigError, match="defines no get_config"):
        configuration.load_config(str(tmp_path / "empty.py"))
