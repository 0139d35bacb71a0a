"""The training run's console and TensorBoard lines: timing of the first step, then one per interval."""

from __future__ import annotations

import time

import jax

from diffusion_jax import optimizer as optimizer_lib
from diffusion_jax import writers

__all__ = ["Console", "size_advice", "on_accelerator"]


def on_accelerator() -> bool:
    return jax.default_backend() != "cpu"


def size_advice(config) -> str:
    """What to say when a config sized for an accelerator runs on a CPU ("" otherwise)."""
    if config.sized_for != "accelerator" or on_accelerator():
        return ""
    instead = (f"; {config.cpu_preset} is the same job sized for a CPU" if config.cpu_preset
               else "")
    return f"this config is sized for a GPU or TPU and this machine has none{instead}"


class Console:
    """The console and TensorBoard lines: the first step's timing, then one line per interval."""

    def __init__(self, writer, config, first_step: int):
        self._writer = writer
        self._num_steps = config.training.num_steps
        self._learning_rate = optimizer_lib.learning_rate_schedule(
            config.training.learning_rate, config.training.warmup_steps)
        self._advice = size_advice(config)
        self._last_time, self._last_step = time.time(), first_step

    def first_step(self, step: int, compile_seconds: float, step_seconds: float) -> None:
        """Say how long compiling took, how long a step takes, and the ETA that implies."""
        left = self._num_steps - step
        line = (f"step {step}: compiled the train step in {compile_seconds:.1f} s; "
                f"{step_seconds:.3g} s/step, so about "
                f"{writers.format_duration(left * step_seconds)} for the {left:,} steps left")
        self._writer.text(line + (f" ({self._advice})" if self._advice else ""))
        self._last_time, self._last_step = time.time(), step

    def log(self, step: int, values: dict) -> None:
        """One line of the losses averaged since the last one, with the speed and time left."""
        scalars = {"train/loss": values["loss"], "train/grad_norm": values["grad_norm"],
                   "train/learning_rate": float(self._learning_rate(step - 1))}
        now = time.time()
        speed = ""
        if step > self._last_step:
            rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
            eta = (self._num_steps - step) / max(rate, 1e-9)
            speed = f"  {rate:.2f} steps/s  ETA {writers.format_duration(eta)}"
            scalars["train/steps_per_sec"] = rate
        self._last_time, self._last_step = now, step
        self._writer.text(f"step {step}/{self._num_steps} "
                          f"{writers.progress_bar(step, self._num_steps)}  loss "
                          f"{values['loss']:.4f}  grad_norm {_number(values['grad_norm'])}"
                          f"{speed}")
        self._writer.scalars(step, scalars)


def _number(value: float) -> str:
    """Three decimals, or three significant digits for what those would show as 0.000."""
    return f"{value:.3f}" if value == 0 or abs(value) >= 5e-4 else f"{value:.3g}"
