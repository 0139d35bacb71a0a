"""The mesh: sizes from the config, sharding rules, and one training code path whose results do
not depend on how many devices run it."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import parallel, sample, train

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


def _config(**mesh):
    config = tiny.get_config()
    config.training.num_steps = 4
    config.training.checkpoint_every = 4
    for key, value in mesh.items():
        setattr(config.mesh, key, value)
    return config


_EIGHT_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from tests.test_parallel import _config
    from diffusion_jax import train
    assert jax.device_count() == 8
    out = {}
    for name, mesh in [("data8", dict(data=8, fsdp=1)), ("data4_fsdp2", dict(data=4, fsdp=2))]:
        state = train.train_and_evaluate(_config(**mesh), sys.argv[1] + "/" + name,
                                         log=lambda line: print(name, line))
        specs = {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(state.params)}
        print(name, "specs", sorted(specs))
        for i, leaf in enumerate(jax.tree_util.tree_leaves(state)):
            out[f"{name}/{i}"] = np.asarray(leaf)
    np.savez(sys.argv[1] + "/states.npz", **out)

    # Sampling spreads the batch over all 8 devices and gives what a single device gives.
    from diffusion_jax import parallel, sample
    config = _config()
    restored, model, shape, num_classes = train.restore_run(config, sys.argv[1] + "/data8")
    spread = sample.make_generate_fn(config, model, shape, num_classes,
                                     mesh=parallel.make_mesh(-1, 1))
    images = spread(restored.ema_params, jax.random.key(0), 16)
    print("sample devices", len(images.sharding.device_set))
    np.save(sys.argv[1] + "/samples8.npy", np.asarray(images))
""")


def test_eight_devices_and_fsdp_match_one_device(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    run = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # Under fsdp some parameters are split over the fsdp axis; under pure data parallelism none.
    assert "'fsdp'" in run.stdout.split("data4_fsdp2 specs")[1]
    assert "'fsdp'" not in run.stdout.split("data8 specs")[1].split("\n")[0]

    lines = []
    single = train.train_and_evaluate(_config(), str(tmp_path / "one"), log=lines.append)

    # The logged loss and gradient norm (averages over steps 1-2 and 3-4) agree to the digits
    # shown (4 and 3 decimals); a gradient summed rather than averaged over devices would show in
    # grad_norm.
    def logged(output_lines):
        values = []
        for line in output_lines:
            if line.startswith("step "):
                words = line.split()
                values.append([float(words[words.index(k) + 1]) for k in ("loss", "grad_norm")])
        return np.array(values)

    expected_log = logged(lines)
    assert expected_log.shape == (2, 2)
    for name in ("data8", "data4_fsdp2"):
        own = [line[len(name) + 1:] for line in run.stdout.splitlines()
               if line.startswith(name + " step ")]
        np.testing.assert_allclose(logged(own), expected_log, rtol=2e-3, err_msg=name)

    states = np.load(tmp_path / "states.npz")
    leaves = jax.tree_util.tree_flatten_with_path(single)[0]
    compared = 0
    for name in ("data8", "data4_fsdp2"):
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
    assert compared == 2 * 2 * len(jax.tree_util.tree_leaves(single.params))

    assert "sample devices 8" in run.stdout
    restored, model, shape, num_classes = train.restore_run(_config(), str(tmp_path / "data8"))
    single_device = sample.make_generate_fn(_config(), model, shape, num_classes)(
        restored.ema_params, jax.random.key(0), 16)
    np.testing.assert_allclose(np.load(tmp_path / "samples8.npy"), single_device, atol=1e-5)

    # A checkpoint written on 8 devices (sharded over fsdp) restores on this single device.
    state, *_ = train.restore_run(_config(), str(tmp_path / "data4_fsdp2"))
    for i, leaf in enumerate(jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(leaf), states[f"data4_fsdp2/{i}"])
