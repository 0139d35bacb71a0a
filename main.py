"""diffusion_jax command line.

    python main.py --config=configs/toy2d.py --workdir=/tmp/toy2d                 # train (resumes)
    python main.py --config=configs/toy2d.py --workdir=/tmp/toy2d --mode=sample   # generate
    python main.py --config=configs/tiny.py --workdir=/tmp/t --config.training.num_steps=100
    python main.py --config=configs/X.py --workdir=DIR --mode=train_classifier   # for eval
    python main.py --config=configs/X.py --workdir=DIR --mode=eval              # metrics
    python main.py --config=configs/text_shapes.py --workdir=DIR --mode=sample \\
        --config.sampling.prompt="two red squares on a blue background" \\
        --config.sampling.guidance_scale=4                                     # text to image

Any config key can be overridden with --config.KEY=VALUE; unknown keys and invalid values stop
the run before anything is compiled. This file only parses the flags, joins the other processes
of a multi-process run and hands over to the library.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import checkpoints, configuration, data, evaluate, generate, parallel, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and logs.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "train_classifier"],
                  "train: train (or resume); sample: generate from a checkpoint; eval: metrics of "
                  "generated samples; train_classifier: the feature extractor eval uses.")
flags.mark_flags_as_required(["config", "workdir"])


def sample(config, workdir):
    """--mode=sample: generate from the run's checkpoint and say which files were written."""
    written = generate.generate_to_files(config, workdir)
    if written:
        print(f"wrote {' and '.join(written)}")


MODES = {"train": train.train_and_evaluate, "sample": sample, "eval": evaluate.evaluate,
         "train_classifier": evaluate.train_classifier}
# What a user can cause and fix: printed as one "error:" line, exit code 2.
USER_ERRORS = (configuration.ConfigError, data.DataError, checkpoints.CheckpointError,
               train.TrainingDiverged, evaluate.EvaluationError, parallel.JoinError)


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
    config, workdir = FLAGS.config, FLAGS.workdir
    if "://" in workdir:
        fail(f"--workdir={workdir} is a URL; the work directory must be a file system path (on "
             "several hosts, one they all see: NFS, or a bucket mounted with gcsfuse)")
    try:
        configuration.validate_distributed(config)
        parallel.join_processes(config, workdir, FLAGS.mode,
                                log=lambda line: print(line, flush=True))
        MODES[FLAGS.mode](config, workdir)
    except USER_ERRORS as err:
        fail(err)


if __name__ == "__main__":
    app.run(main)
