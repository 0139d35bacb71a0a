"""The mesh: sizes from the config, sharding rules, and one training code path whose results do
not depend on how many devices run it."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import checkpoints, data, generate, parallel, train
from diffusion_jax import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("data, fsdp, devices, expected", [
    (-1, 1, 8, (8, 1)), (-1, 2, 8, (4, 2)), (2, -1, 8, (2, 4)), (1, 1, 1, (1, 1)),
    (4, 2, 8, (4, 2)),
])
def test_mesh_sizes(data, fsdp, devices, expected):
    assert parallel.mesh_shape(data, fsdp, devices) == expected


@pytest.mark.parametrize("data, fsdp, devices, message", [
    (-1, -1, 8, "at most one"), (-1, 3, 8, "do not split"), (3, 1, 8, "must use all 8"),
    (0, 1, 8, "mesh.data must be"), (2, 2, 8, "must use all 8"),
])
def test_bad_mesh_sizes_say_what_to_change(data, fsdp, devices, message):
    with pytest.raises(parallel.MeshError, match=message):
        parallel.mesh_shape(data, fsdp, devices)


def xla_flags(*flags):
    """XLA_FLAGS for a subprocess: this session's (tests/conftest.py sets some) and ``flags``."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def _config(**overrides):
    config = tiny.get_config()
    config.data.batch_size = 16
    config.training.num_steps = 4
    config.training.checkpoint_every = 4
    for key, value in overrides.items():
        group, name = key.split("__")
        setattr(getattr(config, group), name, value)
    return config


# Dropout in the network: its masks are drawn for the whole batch (threefry), so the jit path
# gives the same result with it on any mesh. Under shard_map each device draws its own masks,
# which changes the result; those variants run without dropout.
DROPOUT = dict(model__dropout=0.1)

# name -> config overrides; every variant must train to the single-device run of the same
# config without the mesh settings (with or without DROPOUT).
VARIANTS = {
    "data8": dict(mesh__data=8, mesh__fsdp=1, **DROPOUT),
    "data2_fsdp4": dict(mesh__data=2, mesh__fsdp=4, **DROPOUT),
    "shard_map8": dict(mesh__data=8, mesh__fsdp=1, mesh__train_step="shard_map"),
    # shard_map over a data x fsdp mesh, 2 microbatches per step, 2 steps per device call.
    "shard_map_fsdp_accum_scan": dict(mesh__data=4, mesh__fsdp=2, mesh__train_step="shard_map",
                                      training__grad_accumulation=2,
                                      training__steps_per_call=2, training__prefetch=3),
}

_EIGHT_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from tests.test_parallel import VARIANTS, _config
    from diffusion_jax import generate, train
    from diffusion_jax import run as run_lib
    assert jax.device_count() == 8
    out = {}
    for name, overrides in VARIANTS.items():
        state = train.train_and_evaluate(_config(**overrides), sys.argv[1] + "/" + name,
                                         log=lambda line: print(name, line))
        specs = {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(state.params)}
        print(name, "specs", sorted(specs))
        for i, leaf in enumerate(jax.tree_util.tree_leaves(state)):
            out[f"{name}/{i}"] = np.asarray(leaf)

    # The single-device run's checkpoint restores onto the 8 devices, split over fsdp.
    restored, *_ = run_lib.restore_run(_config(mesh__data=4, mesh__fsdp=2), sys.argv[1] + "/one")
    specs = {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(restored.params)}
    print("restored on", len(restored.params["conv_in"]["kernel"].sharding.device_set),
          "devices, specs", sorted(specs))
    for i, leaf in enumerate(jax.tree_util.tree_leaves(restored)):
        out[f"one_on_8/{i}"] = np.asarray(leaf)
    np.savez(sys.argv[1] + "/states.npz", **out)

    # Sampling spreads the batch over all 8 devices and gives what a single device gives.
    from diffusion_jax import parallel
    from tests.test_parallel import DROPOUT
    config = _config(**DROPOUT)
    restored, model, shape, num_classes = run_lib.restore_run(config, sys.argv[1] + "/data8")
    spread = generate.make_generate_fn(config, model, shape, num_classes,
                                     mesh=parallel.make_mesh(-1, 1))
    images = spread(restored.ema_params, jax.random.key(0), 16)
    print("sample devices", len(images.sharding.device_set))
    np.save(sys.argv[1] + "/samples8.npy", np.asarray(images))
""")


# The single-device references the variants are checked against, by name.
REFERENCES = {"plain": {}, "dropout": DROPOUT}


def _reference(overrides):
    return "dropout" if "model__dropout" in overrides else "plain"


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    """The references, run when first asked for: ``single_device_run["plain" | "dropout"]`` is
    ``(state, log lines, workdir)`` of the 4-step run of ``_config()`` on one device, without or
    with DROPOUT."""
    class Runs(dict):
        def __missing__(self, name):
            workdir = tmp_path_factory.mktemp(name)
            lines = []
            state = train.train_and_evaluate(_config(**REFERENCES[name]), str(workdir),
                                             log=lines.append)
            self[name] = state, lines, workdir
            return self[name]

    return Runs()


def _logged(output_lines):
    """(loss, grad_norm) of each "step N/M ..." log line."""
    values = []
    for line in output_lines:
        if re.match(r"step \d+/", line):
            words = line.split()
            values.append([float(words[words.index(k) + 1]) for k in ("loss", "grad_norm")])
    return np.array(values)


@pytest.mark.slow  # a subprocess with 8 simulated devices: minutes on two cores
def test_eight_devices_shard_map_and_fsdp_match_one_device(tmp_path, single_device_run):
    single, _, one_dir = single_device_run["plain"]
    os.symlink(one_dir, tmp_path / "one")

    env = {**os.environ, "PYTHONPATH": ROOT,
           "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")}
    run = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    # Under fsdp some parameters are split over the fsdp axis; under pure data parallelism none.
    for name in VARIANTS:
        specs = run.stdout.split(f"{name} specs")[1].split("\n")[0]
        assert ("'fsdp'" in specs) == (VARIANTS[name]["mesh__fsdp"] > 1), (name, specs)

    # The logged loss and gradient norm (averages over steps 1-2 and 3-4) agree to the digits
    # shown (4 and 3 decimals); a gradient summed rather than averaged over devices would show in
    # grad_norm.
    for name, overrides in VARIANTS.items():
        expected_log = _logged(single_device_run[_reference(overrides)][1])
        assert expected_log.shape == (2, 2)
        own = [line[len(name) + 1:] for line in run.stdout.splitlines()
               if line.startswith(name + " step ")]
        np.testing.assert_allclose(_logged(own), expected_log, rtol=2e-3, err_msg=name)
    # Dropout changes the parameters far beyond the tolerance below (the logged losses hardly:
    # it acts before convolutions that start at zero), so the dropout variants check its masks.
    with_dropout = single_device_run["dropout"][0].params["up_1_res_0"]["conv_1"]["kernel"]
    assert not np.allclose(with_dropout, single.params["up_1_res_0"]["conv_1"]["kernel"],
                           rtol=1e-4, atol=1e-5)

    states = np.load(tmp_path / "states.npz")
    compared = 0
    for name, overrides in VARIANTS.items():
        leaves = jax.tree_util.tree_flatten_with_path(
            single_device_run[_reference(overrides)][0])[0]
        for i, (path, expected) in enumerate(leaves):
            where = jax.tree_util.keystr(path)
            actual, expected = states[f"{name}/{i}"], np.asarray(expected)
            if where.startswith((".step", ".rng")):
                np.testing.assert_array_equal(actual, expected, err_msg=f"{name} {where}")
            elif where.startswith((".params", ".ema_params")):
                # Same math, batch reductions in a different order: float32 round-off only.
                # (atol covers biases whose true gradient is 0, e.g. before a GroupNorm: Adam
                # turns their round-off gradients into updates of ~1e-6.)
                np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5,
                                           err_msg=f"{name} {where}")
                compared += 1
    assert compared == len(VARIANTS) * 2 * len(jax.tree_util.tree_leaves(single.params))

    # 1 -> 8: the single-device checkpoint, restored on 8 devices with fsdp, is the same state.
    assert "restored on 8 devices" in run.stdout
    assert "'fsdp'" in run.stdout.split("restored on 8 devices, specs")[1].split("\n")[0]
    for i, (path, expected) in enumerate(jax.tree_util.tree_flatten_with_path(single)[0]):
        np.testing.assert_array_equal(states[f"one_on_8/{i}"], np.asarray(expected),
                                      err_msg=jax.tree_util.keystr(path))

    assert "sample devices 8" in run.stdout
    restored, model, shape, num_classes = run_lib.restore_run(_config(**DROPOUT),
                                                            str(tmp_path / "data8"))
    single_device = generate.make_generate_fn(_config(**DROPOUT), model, shape, num_classes)(
        restored.ema_params, jax.random.key(0), 16)
    np.testing.assert_allclose(np.load(tmp_path / "samples8.npy"), single_device, atol=1e-5)

    # 8 -> 1: a checkpoint written on 8 devices (sharded over fsdp) restores on this device.
    state, *_ = run_lib.restore_run(_config(**DROPOUT), str(tmp_path / "data2_fsdp4"))
    for i, leaf in enumerate(jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(leaf), states[f"data2_fsdp4/{i}"])


_SHARD_MAP_COLLECTIVES = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from tests.test_parallel import _config
    from diffusion_jax import parallel, train, train_state
    from diffusion_jax import run as run_lib
    for data, fsdp in ((1, 8), (4, 2)):
        config = _config(mesh__data=data, mesh__fsdp=fsdp, mesh__train_step="shard_map")
        source, model, shape, num_classes, optimizer = run_lib.build(config)
        abstract = train_state.abstract_train_state(model, optimizer, shape, num_classes,
                                                    config.seed)
        mesh = parallel.make_mesh(data, fsdp)
        place = lambda tree, sharding: jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sharding)
        state = place(abstract, parallel.state_shardings(mesh, abstract))
        batch = jax.ShapeDtypeStruct((config.data.batch_size,) + shape, jnp.float32,
                                     sharding=parallel.batch_sharding(mesh))
        running = jax.eval_shape(lambda: train.empty_running_metrics(mesh))
        step = train.compiled_train_step(config, model, optimizer, num_classes, mesh, abstract)
        text = step.lower(state, {"x": batch}, running).as_text()
        split = sum(parallel.split_axis(leaf.sharding.spec) is not None
                    for leaf in jax.tree_util.tree_leaves(state.params))
        print(data, fsdp, "split", split, "reduce_scatter", text.count("stablehlo.reduce_scatter"))
""")


def test_shard_map_reduce_scatters_the_gradients_of_split_parameters():
    """Under shard_map with fsdp, each parameter split over fsdp is gathered inside the step and
    its gradient comes back with one reduce-scatter, split as the parameter is, instead of an
    all-reduce of the whole gradient on every device (twice the traffic)."""
    env = {**os.environ, "PYTHONPATH": ROOT,
           "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")}
    run = subprocess.run([sys.executable, "-c", _SHARD_MAP_COLLECTIVES], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for line in run.stdout.splitlines():
        data, fsdp, _, split, _, reduce_scatters = line.split()
        assert int(split) > 0 and int(reduce_scatters) == int(split), line
    assert len(run.stdout.splitlines()) == 2, run.stdout


_STEP_MEMORY = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, "benchmarks")
    from common import abstract_step_arguments, build_abstract
    from train_memory import step_memory
    from diffusion_jax import parallel

    def shard_bytes(tree):  # what each device holds of these abstract arrays
        return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
                   for a in jax.tree_util.tree_leaves(tree))

    rows = []
    for data, fsdp, steps, train_step in ((1, 1, 1, "jit"), (1, 1, 2, "jit"), (2, 4, 1, "jit"),
                                          (2, 4, 1, "shard_map")):
        row = step_memory("tiny", "float32", 16, devices=jax.devices(), data=data, fsdp=fsdp,
                          grad_accumulation=steps, train_step=train_step)
        _, shape, num_classes, _, _, abstract = build_abstract("tiny", "float32", 16)
        mesh = parallel.make_mesh(data, fsdp, jax.devices()[:data * fsdp])
        row["expected_inputs"] = shard_bytes(abstract_step_arguments(
            "tiny", abstract, mesh, 16, shape, num_classes)) / 1e9
        rows.append(row)
    print(json.dumps(rows))
""")


@pytest.mark.slow  # compiles steps for 8 simulated devices: over a minute
def test_step_memory_counts_each_devices_share():
    """benchmarks/train_memory.py reads the compiled step's memory: each device is given exactly
    its shard of the state and the batch (nothing gathered or replicated on the way in), and
    gradient accumulation halves what the step allocates besides."""
    env = {**os.environ, "PYTHONPATH": ROOT,  # the CPU compiler ordered as train_memory.py sets it
           "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8",
                                  "--xla_cpu_enable_concurrency_optimized_scheduler=false")}
    run = subprocess.run([sys.executable, "-c", _STEP_MEMORY], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, accumulated, split, split_shard_map = json.loads(run.stdout.splitlines()[-1])
    for row in (one, accumulated, split, split_shard_map):
        np.testing.assert_allclose(row["inputs_gb"], row["expected_inputs"], rtol=1e-6)
        assert row["peak_gb"] >= row["inputs_gb"] + row["temp_gb"] - 1e-9, row
    # The batch splits 8 ways; of the tiny model's state only the one array over
    # parallel.FSDP_MIN_SIZE (its parameter, EMA and moments) splits, 4 ways (2.89 -> 2.63 MB).
    assert split["inputs_gb"] < one["inputs_gb"] == accumulated["inputs_gb"]
    # Measured: 26.2 MB -> 13.8 MB with two microbatches of 8 (activations halve, gradients not).
    assert accumulated["temp_gb"] < 0.6 * one["temp_gb"], (one, accumulated)
    assert (split["mesh"], split_shard_map["train_step"]) == ("2x4", "shard_map")


_REPLICA_SLICES = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from diffusion_jax import checkpoints, parallel

    # Orbax's replica-parallel saving cuts a replicated array into per-replica slices with
    # jax.lax.slice_in_dim (one compiled program per shape); count what it cuts.
    sliced = []
    slice_in_dim = jax.lax.slice_in_dim
    def counting(array, *args, **kwargs):
        sliced.append(array.shape)
        return slice_in_dim(array, *args, **kwargs)
    jax.lax.slice_in_dim = counting

    assert jax.device_count() == 8
    replicated = parallel.replicated(parallel.make_mesh(-1, 1))
    state = {"small": jnp.arange(64.0), "large": jnp.arange(8 * 2048.0)}
    state = jax.device_put(state, replicated)
    if sys.argv[2] == "threshold":  # 8 KiB slices of "large" qualify, 32 B ones of "small" not
        checkpoints.MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 4096
    manager = checkpoints.Checkpoints(sys.argv[1], fingerprint={"test": 1})
    manager.save(1, state)
    manager.close()
    restored = checkpoints.Checkpoints(sys.argv[1], fingerprint={"test": 1}).restore(state)
    for key in state:
        np.testing.assert_array_equal(restored[key], state[key])
        assert restored[key].sharding == replicated, restored[key].sharding
    print("sliced", sorted(set(sliced)))
""")


@pytest.mark.parametrize("threshold", [False, True])
def test_checkpoints_split_only_large_replicated_arrays(tmp_path, threshold):
    """Replica-parallel saving compiles a slicing program per array shape at the first save (on
    8 CPU devices, 19.5 s for the DDPM UNet's 1,220 arrays): the default leaves arrays of a
    diffusion model's size whole, and only arrays over the threshold are split."""
    env = {**os.environ, "PYTHONPATH": ROOT,
           "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")}
    run = subprocess.run([sys.executable, "-c", _REPLICA_SLICES, str(tmp_path / "ckpt"),
                          "threshold" if threshold else "default"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("sliced ")[1].strip() == ("[(16384,)]" if threshold else "[]")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_a_process_whose_peers_never_come_stops_after_the_timeout(tmp_path):
    """distributed.timeout_s bounds the wait for the other processes (JAX's default is 300 s);
    a bad value stops main.py before it tries to join."""
    common = [sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
              "--config.distributed.initialize=True", "--config.distributed.num_processes=2",
              "--config.distributed.process_id=0"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run([*common, "--config.distributed.timeout_s=0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "distributed.timeout_s must be" in run.stderr, run.stderr
    # With JAX's 300 s the subprocess timeout below would expire first.
    run = subprocess.run([*common, "--config.distributed.timeout_s=1",
                          f"--config.distributed.coordinator_address=localhost:{_free_port()}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0  # JAX ends the process (abort) when the deadline passes
    assert "waiting up to 1 s for every process to join" in run.stdout
    assert not os.path.exists(tmp_path / "checkpoints")


def _launch(flags, processes, devices_each, timeout=600, returncode=0, per_process=None):
    """main.py run as ``processes`` processes on localhost (``devices_each`` CPU devices each,
    gloo collectives), joined through jax.distributed as a pod's workers are; their outputs
    (each process must exit with ``returncode``; ``per_process(i)`` adds flags to process i)."""
    port = _free_port()
    env = {**os.environ,
           "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices_each}")}
    flags = [*flags, "--config.distributed.initialize=True",
             f"--config.distributed.coordinator_address=localhost:{port}",
             f"--config.distributed.num_processes={processes}"]
    procs = [subprocess.Popen([sys.executable, "main.py", *flags,
                               f"--config.distributed.process_id={i}",
                               *(per_process(i) if per_process else [])],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for i in range(processes)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == returncode, f"process {i}:\n{out[-3000:]}"
    return outputs


# Two processes each compile the step and then a sampler (about a minute on two cores); the
# criterion of multi-host training, so it runs in the default suite.
@pytest.mark.slow  # two processes and a one-device run: over a minute
def test_two_processes_match_one_process(tmp_path, single_device_run):
    """jax.distributed on localhost: 2 processes with 4 CPU devices each, launched through
    main.py as on a pod's workers, each reading only its share of the data; then --mode=sample
    over both processes' devices."""
    single, lines, _ = single_device_run["dropout"]
    workdir = tmp_path / "run"
    outputs = _launch(["--config=configs/tiny.py", f"--workdir={workdir}",
                       f"--config.model.dropout={DROPOUT['model__dropout']}",
                       "--config.data.batch_size=16", "--config.training.num_steps=4",
                       "--config.training.checkpoint_every=4",
                       "--config.training.sample_every=4", "--config.sampling.num_samples=8"],
                      processes=2, devices_each=4)
    # Process 0 writes the log; it shows the 8 devices of both processes.
    assert "over 8 cpu device(s)" in outputs[0]
    assert not [line for line in outputs[1].splitlines() if line.startswith("step ")]
    np.testing.assert_allclose(_logged(outputs[0].splitlines()), _logged(lines), rtol=2e-3)
    # The periodic grid: 8 samples spread over the 8 devices of two processes, gathered.
    assert os.path.exists(workdir / "samples" / "step_00000004.png")

    # The checkpoint both processes wrote restores on one device and equals the 1-process run.
    state, *_ = run_lib.restore_run(_config(**DROPOUT), str(workdir))
    for (path, expected), actual in zip(jax.tree_util.tree_flatten_with_path(single)[0],
                                        jax.tree_util.tree_leaves(state)):
        where = jax.tree_util.keystr(path)
        if where.startswith((".step", ".rng")):
            np.testing.assert_array_equal(actual, expected, err_msg=where)
        else:
            np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5, err_msg=where)

    # Resuming that run in one process: each of the two saved its own data position, so it says
    # to resume with two (before Orbax fails on a missing file).
    with pytest.raises(checkpoints.CheckpointError, match=r"written by 2 process\(es\), this "
                       r"run has 1.*resumes only with 2"):
        train.train_and_evaluate(_config(**DROPOUT, training__num_steps=8), str(workdir),
                                 log=lambda line: None)

    # --mode=sample from that checkpoint over both processes' devices: gathered, written once
    # (by process 0), and the same samples as one device generates.
    outputs = _launch(["--config=configs/tiny.py", f"--workdir={workdir}", "--mode=sample",
                       f"--config.model.dropout={DROPOUT['model__dropout']}",
                       "--config.sampling.num_samples=8"], processes=2, devices_each=4)
    assert "wrote" in outputs[0] and "wrote" not in outputs[1], outputs
    (written,) = (workdir / "samples").glob("*.npz")
    _, model, shape, num_classes = run_lib.restore_run(_config(**DROPOUT), str(workdir))
    config = _config(**DROPOUT)
    config.sampling.num_samples = 8
    expected = generate.make_generate_fn(config, model, shape, num_classes)(
        state.ema_params, jax.random.key(config.sampling.seed), 8)
    np.testing.assert_allclose(np.load(written)["samples"], expected, atol=1e-5)


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, None),  # a batch script's shell: one process
    ({"SLURM_STEP_NUM_TASKS": "1"}, None),
    ({"SLURM_STEP_NUM_TASKS": "4"}, "srun started 4 processes"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpirun started 2 processes"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, "4 TPU workers"),
    ({"JAX_COORDINATOR_ADDRESS": "node0:1234"}, "JAX_COORDINATOR_ADDRESS=node0:1234"),
])
def test_launches_of_several_processes_are_recognised(environ, expected):
    found = parallel.launched_processes(environ)
    assert found is None if expected is None else expected in found


_BATCH_SLOTS = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh
    from diffusion_jax import parallel
    devices = jax.devices()
    def slots(order, processes=2, shape=(8, 1)):  # posing as processes of 8 // processes devices
        owner = {d: i * processes // 8 for i, d in enumerate(devices)}
        mesh = Mesh(np.array([devices[i] for i in order]).reshape(shape), parallel.AXES)
        return [parallel.process_batch_slot(mesh, 16, process_of=owner.get, process=p)[0]
                for p in range(processes)]
    print("natural", slots(range(8)), slots(range(8), shape=(2, 4)))
    print("reversed", slots(range(7, -1, -1)))
    print("interleaved", slots([0, 4, 1, 5, 2, 6, 3, 7]))
    print("four", slots([2, 3, 0, 1, 6, 7, 4, 5], 4), slots([2, 4, 0, 1, 3, 5, 6, 7], 4))
""")


def test_each_process_reads_the_rows_the_mesh_gives_its_devices():
    """A process's slice of the global batch follows where the mesh puts its devices (a pod's
    topology-ordered mesh need not follow the process index), so every example reaches the
    device one process would send it to; with rows that are no single slice, the index."""
    env = {**os.environ, "PYTHONPATH": ROOT,
           "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")}
    run = subprocess.run([sys.executable, "-c", _BATCH_SLOTS], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # With four processes, one whose rows are no single slice sends all of them to their index
    # (otherwise two would read the same slice).
    assert run.stdout.splitlines() == ["natural [0, 1] [0, 1]", "reversed [1, 0]",
                                       "interleaved [0, 1]", "four [1, 0, 3, 2] [0, 1, 2, 3]"]


def test_training_reads_the_slice_the_mesh_gives_this_process(monkeypatch, tmp_path):
    """train_and_evaluate asks process_batch_slot which slice of the global batch to read."""
    class Stop(Exception):
        pass

    asked = {}

    def make_iterator(source, **kwargs):
        asked.update(kwargs)
        raise Stop

    monkeypatch.setattr(parallel, "process_batch_slot", lambda mesh, batch: (3, 4))
    monkeypatch.setattr(data, "make_iterator", make_iterator)
    with pytest.raises(Stop):
        train.train_and_evaluate(_config(), str(tmp_path))
    assert asked["shard_index"] == 3


def test_processes_given_different_runs_are_refused(tmp_path):
    """Joined processes must run one command: different workdirs (a sweep started by one
    launcher) stop before training, on every process."""
    outputs = _launch(["--config=configs/tiny.py"], processes=2, devices_each=1, timeout=300,
                      returncode=2, per_process=lambda i: [f"--workdir={tmp_path / str(i)}"])
    for out in outputs:
        assert "not all given the same --workdir, --mode and config" in out
    assert not (tmp_path / "0" / "checkpoints").exists()


@pytest.mark.slow  # a training run, a classifier and two processes compiling the sampler
def test_two_processes_evaluate_like_one(tmp_path):
    """--mode=eval over two processes (4 devices each): the metrics equal one process's, and
    only process 0 reports and writes them. The second batch of 8 does not split over the 8
    devices and is generated whole on each."""
    import json

    from diffusion_jax import evaluate

    config = _config(training__num_steps=2, classifier__num_steps=20,
                     classifier__batch_size=32, evaluation__num_samples=24,
                     evaluation__batch_size=16)
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir), log=lambda line: None)
    evaluate.train_classifier(config, str(workdir), log=lambda line: None)
    outputs = _launch(["--config=configs/tiny.py", f"--workdir={workdir}", "--mode=eval",
                       "--config.data.batch_size=16", "--config.evaluation.num_samples=24",
                       "--config.evaluation.batch_size=16"], processes=2, devices_each=4)
    assert "frechet_distance" in outputs[0] and "frechet_distance" not in outputs[1]
    (written,) = (workdir / "eval").glob("step2_*.json")
    two = json.loads(written.read_text())
    one = evaluate.evaluate(config, str(workdir), log=lambda line: None)
    del one["generation_and_scoring_seconds"]
    assert set(one) <= set(two) and "frechet_distance" in one
    for key, value in one.items():
        if isinstance(value, float):
            np.testing.assert_allclose(two[key], value, rtol=1e-5, err_msg=key)
        else:
            assert two[key] == value, key
