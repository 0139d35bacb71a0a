"""diffusion_jax command line.

    python main.py --config=configs/toy2d.py --workdir=/tmp/toy2d                 # train (resumes)
    python main.py --config=configs/toy2d.py --workdir=/tmp/toy2d --mode=sample   # generate
    python main.py --config=configs/tiny.py --workdir=/tmp/t --config.training.num_steps=100
    python main.py --config=configs/X.py --workdir=DIR --mode=train_classifier   # for eval
    python main.py --config=configs/X.py --workdir=DIR --mode=eval              # metrics
    python main.py --config=configs/text_shapes.py --workdir=DIR --mode=sample \
        --config.sampling.prompt="two red squares on a blue background" \
        --config.sampling.guidance_scale=4                                     # text to image

Any config key can be overridden with --config.KEY=VALUE; unknown keys and invalid values stop
the run before anything is compiled.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and logs.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "train_classifier"],
                  "train: train (or resume); sample: generate from a checkpoint; eval: metrics of "
                  "generated samples; train_classifier: the feature extractor eval uses.")
flags.mark_flags_as_required(["config", "workdir"])


def run_sample(config, workdir):
    import jax
    import numpy as np

    from diffusion_jax import parallel, sample, train

    step = None if config.sampling.checkpoint_step == -1 else config.sampling.checkpoint_step
    state, model, example_shape, num_classes = train.restore_run(config, workdir, step=step)
    params = state.ema_params if config.sampling.use_ema else state.params
    generate = sample.make_generate_fn(config, model, example_shape, num_classes,
                                       mesh=train.sampling_mesh(config))
    # Generated over all devices of all processes; every process takes part in the gather, and
    # process 0 writes the files.
    images = parallel.to_host(generate(params, jax.random.key(config.sampling.seed),
                                       config.sampling.num_samples))
    if not parallel.is_writer():
        return
    s = config.sampling
    stem = os.path.join(workdir, "samples",
                        f"step{int(state.step)}_{s.method}_{s.num_steps}steps_cfg{s.guidance_scale:g}")
    if sample.is_text_model(config):
        extra = {"prompts": np.array(sample.sampling_prompts(config, s.num_samples))}
    else:
        labels = sample.sampling_labels(config, num_classes, s.num_samples)
        extra = {} if labels is None else {"labels": labels}
    sample.save_arrays(stem + ".npz", samples=images, **extra)
    written = [stem + ".npz"]
    if len(example_shape) == 3:
        sample.save_grid(images, stem + ".png")
        written.append(stem + ".png")
    print(f"wrote {' and '.join(written)}")


def _check_same_run(config, workdir, launched):
    """The processes of one run must have the same workdir, mode and config (but for the
    ``distributed`` group, which names each process); separate runs that one launcher started (a
    sweep under srun) must not train as one."""
    import hashlib
    import json

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    settings = {k: v for k, v in config.to_dict().items() if k != "distributed"}
    text = json.dumps([os.path.abspath(workdir), FLAGS.mode, settings], sort_keys=True,
                      default=str)
    try:
        multihost_utils.assert_equal(
            np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8))
    except AssertionError:
        fix = ("for separate runs started by one launcher, add "
               "--config.distributed.auto_detect=False" if launched else
               "give every process the same command")
        print(f"error: the {jax.process_count()} processes of this run were not all given the "
              f"same --workdir, --mode and config, and they train one run together; {fix}",
              file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    from diffusion_jax import checkpoints, configuration, data, evaluate, train

    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
    config, workdir = FLAGS.config, FLAGS.workdir
    if "://" in workdir:
        print(f"error: --workdir={workdir} is a URL; the work directory must be a file system "
              "path (on several hosts, one they all see: NFS, or a bucket mounted with gcsfuse)",
              file=sys.stderr)
        sys.exit(2)
    from diffusion_jax import parallel

    d = config.distributed
    try:
        configuration.validate_distributed(config)
    except configuration.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    launched = parallel.launched_processes() if d.auto_detect else None
    if d.initialize or launched:  # before anything touches the devices
        if launched and not d.initialize:
            print(f"joining a run of several processes: {launched} "
                  "(--config.distributed.auto_detect=False runs this process alone)")
        # JAX ends the process itself when the others do not come in time.
        print(f"waiting up to {d.timeout_s} s for every process to join "
              "(config.distributed.timeout_s)", flush=True)
        try:
            parallel.initialize_distributed(d.coordinator_address, d.num_processes,
                                            d.process_id, d.timeout_s)
        except (ValueError, RuntimeError) as err:
            print(f"error: jax.distributed.initialize failed ({err}); give "
                  "--config.distributed.coordinator_address (process 0's host:port), "
                  "num_processes and process_id"
                  + (", or --config.distributed.auto_detect=False to run alone" if launched
                     else ""), file=sys.stderr)
            sys.exit(2)
        _check_same_run(config, workdir, launched)
    try:
        if FLAGS.mode == "train":
            train.train_and_evaluate(config, workdir)
        elif FLAGS.mode == "sample":
            run_sample(config, workdir)
        elif FLAGS.mode == "eval":
            evaluate.evaluate(config, workdir)
        else:
            evaluate.train_classifier(config, workdir)
    except (configuration.ConfigError, data.DataError, checkpoints.CheckpointError,
            train.TrainingDiverged, evaluate.EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
