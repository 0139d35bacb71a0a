"""Latent against pixel-space diffusion: train steps/s, memory and sampling, side by side.

One config's denoiser is trained and sampled twice on the same data at the same resolution: on
the images (``--resolution`` x ``--resolution`` x 3), and on an autoencoder's latents
(``resolution / f`` x ``resolution / f`` x latent channels), as ``diffusion_jax.run.build``
builds a latent run's denoiser. Every step is the one ``train_and_evaluate`` runs, fed through
the same device prefetcher; the latent batches are encoded by ``diffusion_jax.latent``'s
``LatentBatches`` as a latent run encodes them.

    python benchmarks/latent_vs_pixel.py                    # captioned shapes at 64x64, CPU UNet
    python benchmarks/latent_vs_pixel.py --resolution 128 --batch-size 64 --steps 50 \\
        --autoencoder runs/shapes128_autoencoder_cpu --preset configs/text_shapes.py

``--preset`` is the config file of the denoiser and data (default configs/text_shapes_cpu.py;
its latent group is not read). ``--autoencoder`` is the workdir of a ``task="autoencoder"`` run,
a diffusers ``vae/`` folder, or a config file whose ``config.autoencoder`` group is built with
random weights (default configs/shapes128_autoencoder_cpu.py: speed and memory do not depend on
the weights). The rows, one per way of training:

- ``pixel``: the denoiser on images;
- ``latent``: encoding on the fly, each step's images through the frozen encoder and a posterior
  sample (``encode_ms`` is that part alone), then the train step;
- ``latent_precomputed``: from stored posterior moments (``--mode=encode_dataset``), each step a
  posterior sample of them (``encode_ms``) and the train step.

``steps_per_s`` counts whole steps, encoding included, after two warmup steps. Memory is per
device, in GB, from XLA's memory analysis of the compiled programs: ``step_peak_gb`` is the
train step's, ``encode_peak_gb`` the encode program's, and ``peak_gb`` what the device holds at
the busiest moment of a step: the larger of the step's peak plus the autoencoder's weights (a
latent run keeps them on the device) and the encode program's peak plus the train state.
``speed_ratio`` and ``memory_ratio`` are a row's ``steps_per_s`` and ``peak_gb`` over the pixel
row's. ``sample_s`` is the time to generate ``--sample-batch`` samples with the config's sampler
(``--sampling-steps``), the ``latent`` row's decoding them included (``decode_s`` alone), and
``sample_speed_ratio`` the pixel row's ``sample_s`` over the latent row's. Parameters are random
(a fresh train state). The JSON goes to benchmarks/results/<--name>.json, and to ``--out`` too.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from common import ROOT, accelerator, compiled_memory, on_accelerator, report, time_calls
from diffusion_jax import autoencoders, configuration, data, generate, latent, parallel, run
from diffusion_jax import train, train_state

DEFAULT_PRESET = os.path.join(ROOT, "configs", "text_shapes_cpu.py")
DEFAULT_AUTOENCODER = os.path.join(ROOT, "configs", "shapes128_autoencoder_cpu.py")
COLUMNS = ["run", "shape", "batch", "params", "steps_per_s", "step_ms", "encode_ms",
           "step_peak_gb", "encode_peak_gb", "peak_gb", "speed_ratio", "memory_ratio",
           "sample_s", "decode_s", "sample_speed_ratio"]


def pixel_config(preset: str, resolution: int, batch_size=None):
    """The preset's config as a pixel-space run at ``resolution``, one train step per call."""
    config = configuration.load_config(preset)
    config.data.resolution = resolution
    config.data.batch_size = batch_size or config.data.batch_size
    config.latent.autoencoder = ""
    config.latent.precomputed = ""
    config.training.steps_per_call = 1  # (what is timed is one step)
    return config


def latent_parts(config, autoencoder: str, image_shape, num_classes, mesh):
    """The latent space and the denoiser on its latents: ``(space, model, shape, description)``.

    A folder is loaded as a latent run loads it (weights from the run's checkpoint or the
    diffusers safetensors); a config file's ``config.autoencoder`` group gets random weights."""
    if os.path.isdir(autoencoder):
        config = config.copy_and_resolve_references()
        config.latent.autoencoder = autoencoder
        kind = autoencoders.describe(autoencoder).kind
        if kind != "diffusers":  # a run keeps its scale in its latent.json; it costs nothing
            config.latent.scale = config.latent.scale or 1.0
        _, model, shape, _, _ = run.build(config)
        with tempfile.TemporaryDirectory() as workdir:  # no latent.json there: none is written
            space = latent.load_space(config, workdir, log=lambda line: None)
    else:
        group = configuration.load_config(autoencoder).autoencoder
        network = autoencoders.build_autoencoder(group, image_shape[-1], config.model.dtype)
        shape = autoencoders.latent_shape(network, image_shape,
                                          where=f"--autoencoder {autoencoder}")
        space = latent.LatentSpace(network, random_weights(network, image_shape, mesh))
        model = configuration.build_denoiser(config, shape, num_classes)
        kind = "random"
    network = space.autoencoder
    return space, model, tuple(shape), {
        "path": shown_path(autoencoder),
        "kind": kind, "downsampling_factor": network.downsampling_factor,
        "latent_channels": network.latent_channels, "params": _count(space.params)}


def random_weights(network, image_shape, mesh, seed: int = 0):
    """Weights of ``network`` drawn from N(0, 0.02^2) on the host, replicated over ``mesh``.

    Only their shapes are the network's initialiser's (from ``jax.eval_shape``): compiling the
    initialiser would cost more than the programs it serves here."""
    images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    shapes = jax.eval_shape(lambda x: network.init(jax.random.key(0), x)["params"], images)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), shapes)
    return jax.device_put(params, parallel.replicated(mesh))


def host_batches(source, config, count: int) -> list:
    """``count`` host batches of the data, as training's input pipeline makes them."""
    iterator = data.make_iterator(source, batch_size=config.data.batch_size, seed=config.seed,
                                  max_length=config.text.max_length)
    return [next(iterator) for _ in range(count)]


def moment_batches(space, batches) -> list:
    """The batches with images replaced by their posterior moments, as encode_dataset keeps them."""
    out = []
    for batch in batches:
        mean, logvar = space.moments(batch["x"])
        rest = {k: v for k, v in batch.items() if k != "x"}
        out.append({**rest, "moments": np.concatenate([np.asarray(mean), np.asarray(logvar)],
                                                      axis=-1)})
    return out


def device_batches(batches, mesh, config, space=None):
    """The batches, cycled, through the training prefetcher (and ``space``'s encoding, if given)."""
    out = parallel.DevicePrefetcher(itertools.cycle(batches), mesh, size=config.training.prefetch)
    if space is None:
        return out
    return latent.LatentBatches(out, space, seed=config.seed, first_step=0)


def compiled_step(config, model, optimizer, shape, num_classes, mesh, example_batch):
    """A fresh state and the run's compiled train step: ``(step, state, running, memory)``."""
    abstract = train_state.abstract_train_state(model, optimizer, shape, num_classes,
                                                config.seed)
    state = train_state.init_train_state(config, model, optimizer, shape, num_classes, mesh)
    step = train.compiled_train_step(config, model, optimizer, num_classes, mesh, abstract)
    running = train.empty_running_metrics(mesh)
    step, state = train.compile_train_step(step, state, example_batch, running)
    return step, state, running, compiled_memory(step)


def time_steps(step, state, running, batches, steps: int):
    """``(seconds per step, state, running)`` over ``steps`` timed steps after two warmup ones."""
    def one():
        nonlocal state, running
        state, running = step(state, next(batches), running)
        return running

    seconds = time_calls(one, iterations=steps, warmup=2)
    return seconds, state, running


def encode_cost(space, batch, steps: int):
    """``(seconds, memory)`` of ``space.encode_batch`` on one device batch (images or moments)."""
    key = latent.step_key(0, 0)
    seconds = time_calls(lambda: space.encode_batch(batch, key), iterations=steps)

    def encode(params, batch, key):  # the same program, with the weights as an argument
        return latent.LatentSpace(space.autoencoder, params, space.scale,
                                  space.shift).encode_batch(batch, key)

    compiled = jax.jit(encode).lower(space.params, batch, key).compile()
    return seconds, compiled_memory(compiled)


def sampling_cost(config, model, shape, num_classes, mesh, params, num: int, *, space=None):
    """``(seconds to generate num samples, seconds of their decoding or None)``."""
    fn = generate.make_generate_fn(config, model, shape, num_classes, mesh=mesh,
                                   decode=space.decode if space is not None else None)
    prompts = generate.sampling_prompts(config, num) if generate.is_text_model(config) else None
    iterations = 3 if on_accelerator() else 2
    key = jax.random.key(config.sampling.seed)
    seconds = time_calls(lambda: fn(params, key, num, prompts), iterations=iterations, warmup=1)
    if space is None:
        return seconds, None
    latents = jax.random.normal(key, (num,) + tuple(shape), jnp.float32)
    return seconds, time_calls(lambda: space.decode(latents), iterations=iterations, warmup=1)


def shown_path(path: str) -> str:
    """``path`` relative to the repository when it is inside it, else as given."""
    relative = os.path.relpath(os.path.abspath(path), ROOT)
    return path if relative.startswith("..") else relative


def _count(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def _device_gb(tree) -> float:
    """Bytes of ``tree`` on one device (its first shard of each array), in GB."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(tree)) / 1e9


def _ratio(numerator, denominator):
    return numerator / denominator if numerator and denominator else None


def _train_row(name, shape, batch, params, seconds, memory, encode=None):
    """One row of the table from the measurements of one way of training."""
    encode_seconds, encode_memory, resident_state, resident_autoencoder = encode or (None,) * 4
    step_peak = memory.get("peak_gb")
    encode_peak = (encode_memory or {}).get("peak_gb")
    peak = step_peak
    if step_peak is not None and encode_peak is not None:
        peak = max(step_peak + resident_autoencoder, encode_peak + resident_state)
    return {"run": name, "shape": "x".join(str(n) for n in shape), "batch": batch,
            "params": params, "steps_per_s": 1.0 / seconds, "step_ms": 1e3 * seconds,
            "encode_ms": 1e3 * encode_seconds if encode_seconds is not None else None,
            "step_peak_gb": step_peak, "encode_peak_gb": encode_peak, "peak_gb": peak}


def measure(config, autoencoder: str, steps: int, sample_batch: int) -> tuple[list, dict]:
    """The three ways of training and both ways of sampling: ``(rows, what was compared)``."""
    source, model, image_shape, num_classes, optimizer = run.build(config)
    mesh = run.build_mesh(config)
    batch = config.data.batch_size
    space, latent_model, shape, described = latent_parts(config, autoencoder, image_shape,
                                                         num_classes, mesh)
    images = host_batches(source, config, min(steps, 4))
    pixels = device_batches(images, mesh, config)
    step, state, running, memory = compiled_step(config, model, optimizer, image_shape,
                                                 num_classes, mesh, next(pixels))
    seconds, state, _ = time_steps(step, state, running, pixels, steps)
    pixel = _train_row("pixel", image_shape, batch, _count(state.params), seconds, memory)
    pixel["sample_s"], _ = sampling_cost(config, model, image_shape, num_classes, mesh,
                                         state.ema_params, sample_batch)
    del state, step

    moments = moment_batches(space, images)
    rows = [pixel]
    for name, host in (("latent", images), ("latent_precomputed", moments)):
        encoded = device_batches(host, mesh, config, space)
        if name == "latent":
            step, state, running, memory = compiled_step(config, latent_model, optimizer, shape,
                                                         num_classes, mesh, next(encoded))
        seconds, state, running = time_steps(step, state, running, encoded, steps)
        encode = encode_cost(space, next(device_batches(host, mesh, config)), steps)
        rows.append(_train_row(name, shape, batch, _count(state.params), seconds, memory,
                               encode + (_device_gb(state), _device_gb(space.params))))
    rows[1]["sample_s"], rows[1]["decode_s"] = sampling_cost(
        config, latent_model, shape, num_classes, mesh, state.ema_params, sample_batch,
        space=space)
    for row in rows:
        row["speed_ratio"] = _ratio(row["steps_per_s"], pixel["steps_per_s"])
        row["memory_ratio"] = _ratio(row["peak_gb"], pixel["peak_gb"])
    rows[1]["sample_speed_ratio"] = _ratio(pixel["sample_s"], rows[1]["sample_s"])
    return rows, {"autoencoder": described, "image_shape": list(image_shape),
                  "latent_shape": list(shape)}


def build_parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help="config file of the denoiser and the data (configs/*.py)")
    parser.add_argument("--autoencoder", default=DEFAULT_AUTOENCODER,
                        help="an autoencoder run's workdir, a diffusers vae/ folder, or a config "
                             "file whose autoencoder group is built with random weights")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global train batch (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed train steps per run (default: 50 on a GPU/TPU, 5 on a CPU)")
    parser.add_argument("--sample-batch", type=int, default=None,
                        help="samples generated at once (default: 64 on a GPU/TPU, 8 on a CPU)")
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="sampler steps (default: the preset's sampling.num_steps)")
    parser.add_argument("--name", default="latent_vs_pixel", help="results file stem")
    parser.add_argument("--out", default=None, help="also write the JSON to this path")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("resolution", "batch_size", "steps", "sample_batch", "sampling_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag, path in (("--preset", args.preset), ("--autoencoder", args.autoencoder)):
        if not os.path.exists(path):
            parser.error(f"{flag} {path} does not exist")
    steps = args.steps or (50 if on_accelerator() else 5)
    sample_batch = args.sample_batch or (64 if on_accelerator() else 8)
    print(f"device: {accelerator()}, jax {jax.__version__}")
    try:
        config = pixel_config(args.preset, args.resolution, args.batch_size)
        if args.sampling_steps:
            config.sampling.num_steps = args.sampling_steps
        rows, compared = measure(config, args.autoencoder, steps, sample_batch)
    except configuration.ConfigError as err:
        parser.error(str(err))
    report(rows, COLUMNS, args.name, {
        "preset": shown_path(args.preset), **compared,
        "resolution": args.resolution, "timed_steps": steps, "sample_batch": sample_batch,
        "sampler": {"method": config.sampling.method, "num_steps": config.sampling.num_steps,
                    "guidance_scale": config.sampling.guidance_scale},
        "dtype": config.model.dtype})
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        shutil.copyfile(os.path.join(ROOT, "benchmarks", "results", f"{args.name}.json"),
                        args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
