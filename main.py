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

Exit codes: 0 finished; 2 a problem the user can fix, printed as one ``error: ...`` line
(``--verbose`` or DIFFUSION_JAX_VERBOSE=1 adds the traceback); 143 (SIGTERM) or 130 (SIGINT) when
a signal stopped training after it saved a checkpoint, so that a scheduler requeues the run.
"""

import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import autoencoder_eval, checkpoints, configuration, data, evaluate, generate
from diffusion_jax import latent, parallel, run, run_export, train
from diffusion_jax import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags(values=FLAGS):
    """The command line's flags, on ``values`` (absl's global flags by default)."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                    lock_config=True, flag_values=values)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and logs.",
                        flag_values=values)
    flags.DEFINE_enum("mode", "train", list(MODES),
                      "train: train (or resume); sample: generate from a checkpoint (an "
                      "autoencoder run: reconstructions); eval: metrics of generated samples (of "
                      "reconstructions); train_classifier: the feature extractor eval uses; "
                      "encode_dataset: precompute a latent run's latents (config.latent); "
                      "export: write the run in diffusers' formats under WORKDIR/export.",
                      flag_values=values)
    flags.DEFINE_bool("verbose", False, "Print the traceback of errors as well as their message.",
                      flag_values=values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=values)


def sample(config, workdir):
    """--mode=sample: generate from the run's checkpoint and say which files were written."""
    if config.task == "autoencoder":
        written = autoencoder_eval.reconstruct_to_files(config, workdir)
    else:
        written = generate.generate_to_files(config, workdir)
    if len(written) > 6:  # an audio or video sample's files: one line, not one per clip
        folder = os.path.dirname(written[0])
        kinds = sorted({os.path.splitext(p)[1] for p in written})
        print(f"wrote {len(written)} files ({', '.join(kinds)}) to {folder}: "
              f"{os.path.basename(written[0])} ... {os.path.basename(written[-1])}")
    elif written:
        print(f"wrote {' and '.join(written)}")


def evaluate_run(config, workdir):
    """--mode=eval: sample metrics of a diffusion run, reconstruction metrics of an autoencoder."""
    if config.task == "autoencoder":
        return autoencoder_eval.evaluate_autoencoder(config, workdir)
    if config.pretrained.path and not run.has_checkpoints(workdir):
        return evaluate.evaluate_pretrained(config, workdir)
    return evaluate.evaluate(config, workdir)


def export(config, workdir):
    """--mode=export: the run in diffusers' formats (a model folder, or a LoRA file)."""
    written = run_export.export_to_workdir(config, workdir)
    print(f"wrote {' and '.join(written)}")


MODES = {"train": train.train_and_evaluate, "sample": sample, "eval": evaluate_run,
         "train_classifier": evaluate.train_classifier, "encode_dataset": latent.encode_dataset,
         "export": export}

define_flags()
# What a user can cause and fix: printed as one "error:" line, exit code 2.
USER_ERRORS = (configuration.ConfigError, data.DataError, checkpoints.CheckpointError,
               train.TrainingDiverged, evaluate.EvaluationError, parallel.JoinError,
               workdir_lib.WorkdirError)


def _verbose(argv=()):
    return "--verbose" in argv or os.environ.get("DIFFUSION_JAX_VERBOSE", "") not in ("", "0")


def fail(message, argv=()):
    """Print ``error: message`` (and the traceback being handled, when verbose); exit 2."""
    if _verbose(argv) and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv, values=FLAGS):
    """absl's flag parsing, with every problem of the flags or the config file as an error line."""
    try:
        remaining = values(argv)
        values.config.get("seed")  # the file loads lazily: a broken one raises here
        return remaining
    except flags.Error as err:
        fail(_override_problem(argv) or f"{err} (python main.py --helpshort lists the flags)",
             argv)
    except Exception as err:  # noqa: BLE001 - loading the config file runs the user's code
        fail(_override_problem(argv) or f"--config: {type(err).__name__}: {err}", argv)


def _override_problem(argv):
    """What is wrong with ``--config`` or a ``--config.KEY`` override ("" when nothing is)."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return ""
    try:
        config = configuration.load_config(path)
    except configuration.ConfigError as load_err:
        return str(load_err)
    except SyntaxError as syntax:
        return f"config file {path}, line {syntax.lineno}: {syntax.msg}; fix the file"
    except Exception as load_err:  # noqa: BLE001 - the user's code
        return (f"config file {path} failed to load: {type(load_err).__name__}: {load_err}; "
                "fix the file (--verbose shows where)")
    for key in (m.group(1) for a in argv if (m := re.match(r"--config\.([\w.]+)=", a))):
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                moved = configuration.moved_key_hint(key)
                return (f"--config.{key}: config has no key {key}"
                        f"{'; ' + moved if moved else ''} (every key is listed in "
                        "diffusion_jax/defaults.py)")
            node = node[part]
    return ""


def main(argv, values=FLAGS):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
    config, workdir, mode = values.config, values.workdir, values.mode
    if "://" in workdir:
        fail(f"--workdir={workdir} is a URL; the work directory must be a file system path (on "
             "several hosts, one they all see: NFS, or a bucket mounted with gcsfuse)")
    verbose = ["--verbose"] if values.verbose else []
    try:
        configuration.validate_distributed(config)
        workdir_lib.check(workdir, mode)
        parallel.join_processes(config, workdir, mode, log=lambda line: print(line, flush=True))
        MODES[mode](config, workdir)
    except USER_ERRORS as err:
        fail(err, verbose)
    except train.Interrupted as stopped:
        sys.exit(stopped.exit_code)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
