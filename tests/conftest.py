"""Shared fixtures. Tests run on the CPU; float64 is switched on per test where precision matters."""

import atexit
import os
import shutil
import signal
import subprocess
import tempfile

import jax
import pytest

# Many tests build the same small models in fresh closures (and fresh processes, for the command
# line), which jit compiles again each time. A persistent compilation cache shared by this test
# session and the processes it starts compiles each program once; it halves the suite's time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="diffusion_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

# Most of the suite's time is XLA compiling small programs, and much of that is LLVM optimising
# the generated CPU code: the random initialisers of the tiny UNet take 14.5 s to compile at
# XLA's default level (3) and 5.9 s at level 1. Level 1 code runs a little slower, which the
# tests' small models hardly notice: on two cores the suite took 15 minutes at level 1 against
# 18 at the default (level 0 compiles faster still, but its code is slow enough that the
# sampler and training tests lose what compiling gains: 18 minutes). The whole suite passes at
# levels 1 and 3 alike; DIFFUSION_JAX_TEST_XLA_OPT=3 runs it at the default level (a level
# already given in XLA_FLAGS is kept).
_level = os.environ.get("DIFFUSION_JAX_TEST_XLA_OPT", "1")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_backend_optimization_level={_level}").strip()


# A context manager in recent jax; older releases keep it under jax.experimental.
_enable_x64 = getattr(jax, "enable_x64", None)
if _enable_x64 is None:  # pragma: no cover - depends on the installed jax
    from jax.experimental import enable_x64 as _enable_x64


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled (restored afterwards)."""
    with _enable_x64(True):
        yield


@pytest.fixture(scope="session")
def tiny_base_run(tmp_path_factory):
    """The workdir of a finished ``configs/tiny.py`` run (6 steps), trained once per process.

    Runs on a frozen base (LoRA adapters, ControlNets) read it and write nothing into it."""
    from configs import tiny
    from diffusion_jax import train

    workdir = str(tmp_path_factory.mktemp("tiny_base") / "base")
    train.train_and_evaluate(tiny.get_config(), workdir, log=lambda line: None)
    return workdir


def kill_at_step_and_rerun(command, kill_at, *, cwd, env):
    """Start a training ``command``, SIGKILL it when it logs step ``kill_at``, rerun it to the end.

    kill -9 gives the run no chance to clean up: it may die mid-step or mid-save. Returns the
    completed rerun (which must have resumed from a checkpoint).
    """
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.startswith(f"step {kill_at}/"):
                process.kill()  # SIGKILL
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    rerun = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step" in rerun.stdout, rerun.stdout
    return rerun
