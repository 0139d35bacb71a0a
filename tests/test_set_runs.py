"""Point clouds and molecules through the loop: configs, resume, samples, files, metrics, mesh."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import tiny
from diffusion_jax import configuration, generate, modalities, run, samplers, set_eval, set_files
from diffusion_jax import train
from diffusion_jax.data import molecule_files
from diffusion_jax.data.molecules import SmilesMolecules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("rdkit")
pytest.importorskip("matplotlib")


def point_config(**data):
    """A seconds-long class-conditional run on 32-point shapes with a small point transformer."""
    config = tiny.get_config()
    config.data.name = "shape_points"
    config.data.size = 64
    config.data.num_points = 32
    config.model.name = "point_transformer"
    config.model.point_transformer.hidden = 32
    config.model.point_transformer.depth = 2
    config.model.point_transformer.fourier_features = 8
    for key, value in data.items():
        config.data[key] = value
    return config


def molecule_config(**data):
    """A seconds-long unconditional run on molecules of up to 3 heavy atoms with a small EGNN."""
    config = tiny.get_config()
    config.data.name = "molecules"
    config.data.size = 64
    config.data.max_atoms = 12
    config.data.max_heavy_atoms = 3
    config.data.class_conditional = False
    config.model.name = "egnn"
    config.model.egnn.hidden = 16
    config.model.egnn.depth = 2
    config.diffusion.schedule = "ddpm_linear"
    config.diffusion.target = "eps"
    config.sampling.method = "ddpm"
    config.sampling.num_steps = 5
    for key, value in data.items():
        config.data[key] = value
    return config


def _quiet(*args, **kwargs):
    pass


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_a_molecule_run_resumes_bit_for_bit_and_samples_xyz_and_sdf(tmp_path):
    straight = train.train_and_evaluate(molecule_config(), str(tmp_path / "a"), log=_quiet)
    config = molecule_config()
    config.training.num_steps = 3
    train.train_and_evaluate(config, str(tmp_path / "b"), log=_quiet)
    lines = []
    resumed = train.train_and_evaluate(molecule_config(), str(tmp_path / "b"), log=lines.append)
    assert any("resumed from step 3" in line for line in lines)
    for a, b in zip(_leaves(straight), _leaves(resumed)):
        np.testing.assert_array_equal(a, b)

    config = molecule_config()
    config.sampling.num_samples = 5
    written = generate.generate_to_files(config, str(tmp_path / "a"))
    samples = np.load([p for p in written if p.endswith(".npz")][0])["samples"]
    assert samples.shape == (5, 12, 8)
    xyz = sorted(p for p in written if p.endswith(".xyz"))
    assert len(xyz) == 5 and any(p.endswith(".sdf") for p in written)
    assert any(p.endswith(".png") for p in written)
    # Each file holds the sample's present atoms (its nonzero rows), as decoded.
    counts = (np.abs(samples).sum(-1) > 0).sum(-1)
    allowed = set(SmilesMolecules(64, 12, max_heavy_atoms=3).atom_counts())
    for path, count in zip(xyz, counts):
        [(symbols, positions)] = molecule_files.read_xyz(path)
        assert len(symbols) == count and count in allowed
        assert set(symbols) <= {"H", "C", "N", "O", "F"}
        np.testing.assert_allclose(positions.mean(0), 0.0, atol=1e-4)
    # The masks differ between samples (sizes drawn from the data's counts) and padding is zero.
    assert len(set(counts.tolist())) > 1 or len(allowed) == 1
    for sample, count in zip(samples, counts):
        assert np.all(sample[count:] == 0.0)


def test_a_point_cloud_run_samples_ply_files_and_a_grid(tmp_path):
    config = point_config()
    config.training.num_steps = 2
    train.train_and_evaluate(config, str(tmp_path), log=_quiet)
    config.sampling.num_samples = 3
    written = generate.generate_to_files(config, str(tmp_path))
    plys = sorted(p for p in written if p.endswith(".ply"))
    assert len(plys) == 3
    samples = np.load([p for p in written if p.endswith(".npz")][0])
    assert samples["samples"].shape == (3, 32, 3)
    np.testing.assert_array_equal(samples["labels"], [0, 1, 2])
    from diffusion_jax import point_eval
    points, _ = point_eval.read_ply(plys[2])
    np.testing.assert_allclose(points, samples["samples"][2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("overrides, message", [
    ({"model.name": "unet"}, "set network"),
    ({"data.name": "shapes", "model.name": "egnn"}, "denoises sets of 3-D points"),
    ({"data.elements": "H,C,C"}, "each element once"),
    ({"data.max_heavy_atoms": 20}, "max_heavy_atoms=20 is more than"),
    ({"data.max_atoms": 0}, "data.max_atoms"),
    ({"sampling.init_image": __file__}, "init_image"),
])
def test_bad_set_settings_name_the_key(overrides, message):
    config = molecule_config()
    with config.unlocked():
        for key, value in overrides.items():
            group, name = key.split(".")
            config[group][name] = value
    with pytest.raises(configuration.ConfigError, match=message):
        configuration.validate(config)


def test_the_elements_choose_the_molecules_and_must_be_elements():
    config = molecule_config(elements="H,C")
    source = configuration.build_source(config.data)
    assert all(set(source.smiles(i)) <= set("C()=#123") for i in range(source.num_molecules))
    assert source[0]["x"].shape == (12, 5)
    config = molecule_config(elements="H,C,Xx")
    with pytest.raises(configuration.ConfigError, match="'Xx' is not one"):
        configuration.validate(config)


def test_a_folder_of_molecules_trains_and_skips_unreadable_files(tmp_path, capsys):
    folder = tmp_path / "molecules"
    folder.mkdir()
    water = (["O", "H", "H"], np.array([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], float))
    methane = (["C", "H", "H", "H", "H"], np.array(
        [[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63],
         [0.63, -0.63, -0.63]], float))
    set_files.write_xyz(str(folder / "water.xyz"), *water)
    set_files.write_xyz(str(folder / "methane.xyz"), *methane)
    (folder / "broken.xyz").write_text("3\nno atoms follow\nO 0 0\n")
    (folder / "argon.xyz").write_text("1\nan element the model lacks\nAr 0 0 0\n")
    config = molecule_config()
    config.data.name = "molecule_folder"
    config.data.path = str(folder)
    config.data.max_atoms = 6
    config.data.max_heavy_atoms = 9  # (a key of the SMILES list only: no conflict here)
    config.data.batch_size = 2
    config.training.num_steps = 2
    train.train_and_evaluate(config, str(tmp_path / "run"), log=_quiet)
    out = capsys.readouterr().out
    assert "broken.xyz" in out and "argon.xyz" in out and "skipped 2 of 4" in out
    config.sampling.num_samples = 4
    samples = np.load([p for p in generate.generate_to_files(config, str(tmp_path / "run"))
                       if p.endswith(".npz")][0])["samples"]
    assert sorted(set((np.abs(samples).sum(-1) > 0).sum(-1).tolist())) <= [3, 5]
    # Evaluated with as many samples as asked, the folder's two molecules as the real row.
    config.evaluation.num_samples, config.evaluation.batch_size = 4, 4
    results = set_eval.evaluate_sets(config, str(tmp_path / "run"), log=_quiet)
    assert results["num_samples"] == 4 and results["scales"][0]["num_molecules"] == 4
    assert results["real"]["num_molecules"] == 2 and results["real"]["atom_stability"] == 1.0


def test_novelty_is_measured_against_the_molecules_a_run_trains_on():
    source = SmilesMolecules(10, 12, max_heavy_atoms=3)
    assert source.num_molecules > 10
    smiles = set_eval._reference_smiles(source)
    assert smiles == sorted({source.smiles(i) for i in range(10)}) and len(smiles) == 10


def test_the_preview_of_sets_is_a_grid_of_renders():
    config = point_config()
    source = configuration.build_source(config.data)
    batch = np.stack([source[i]["x"] for i in range(4)])
    grid = modalities.preview(batch, config)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[-1] == 3
    assert (grid < 200).mean() > 0.002  # points drawn on the white background
    config = molecule_config()
    source = configuration.build_source(config.data)
    grid = modalities.preview(np.stack([source[i]["x"] for i in range(4)]), config)
    assert grid.dtype == np.uint8 and (grid < 200).mean() > 0.002
    # A diverged sample is a blank cell, not an error that stops training.
    broken = np.stack([source[i]["x"] for i in range(2)])
    broken[0, 0, 0] = np.nan
    broken[1] = 0.0
    grid = modalities.preview(broken, config)
    assert grid.dtype == np.uint8 and (grid < 200).mean() < 0.05


def _real_generator(config, kind):
    """A stand-in for a checkpoint whose samples are real held-out data (or noise)."""
    source = configuration.build_source(config.data, split="test")

    def load(config, workdir, step):
        def for_scale(scale):
            def g(key, num, prompts=None, edit=None):
                offset = int(jax.random.randint(key, (), 1000, len(source) - num))
                offset -= offset % 6  # record i has label i % 6: the labels asked, in turn
                x = np.stack([source[offset + i]["x"] for i in range(num)])
                if kind == "noise":
                    x = np.random.default_rng(offset).normal(size=x.shape).astype(np.float32)
                return x
            return g
        return 0, getattr(source, "num_classes", None), for_scale
    return load


def test_molecule_metrics_tell_real_molecules_from_noise(tmp_path):
    config = molecule_config(size=4000)
    config.evaluation.num_samples = 24
    config.evaluation.batch_size = 12
    real = set_eval.evaluate_sets(config, str(tmp_path), log=_quiet,
                                  load_generator=_real_generator(config, "real"))
    noise = set_eval.evaluate_sets(config, str(tmp_path), log=_quiet,
                                   load_generator=_real_generator(config, "noise"))
    assert real["scales"][0]["atom_stability"] > 0.95 and real["real"]["atom_stability"] > 0.95
    assert real["scales"][0]["validity"] > 0.9
    assert noise["scales"][0]["atom_stability"] < 0.5
    assert noise["scales"][0]["molecule_stability"] < 0.1


@pytest.mark.slow  # the classifier trains for a minute
def test_point_metrics_tell_real_shapes_from_noise(tmp_path):
    config = point_config(num_points=64, size=4000)
    config.classifier.num_steps, config.classifier.batch_size = 300, 32
    summary = set_eval.train_point_classifier(config, str(tmp_path), log=_quiet)
    assert summary["test"]["accuracy"] > 0.9
    config.evaluation.num_samples = 30
    config.evaluation.batch_size = 6
    real = set_eval.evaluate_sets(config, str(tmp_path), log=_quiet,
                                  load_generator=_real_generator(config, "real"))
    noise = set_eval.evaluate_sets(config, str(tmp_path), log=_quiet,
                                   load_generator=_real_generator(config, "noise"))
    assert real["scales"][0]["class_accuracy"] == pytest.approx(
        real["real"]["class_accuracy"], abs=0.2)
    assert real["scales"][0]["chamfer_1nna"] < 0.8 and noise["scales"][0]["chamfer_1nna"] > 0.95
    assert noise["scales"][0]["chamfer_mmd"] > 3 * real["scales"][0]["chamfer_mmd"]


@pytest.mark.slow  # every sampler compiles for two set networks
@pytest.mark.parametrize("method", samplers.METHODS)
def test_every_sampler_runs_the_set_networks_unchanged(tmp_path, method):
    for make in (point_config, molecule_config):
        config = make()
        config.training.num_steps = 2
        workdir = str(tmp_path / make.__name__)
        if not os.path.exists(workdir):
            train.train_and_evaluate(config, workdir, log=_quiet)
        config.sampling.method = method
        state, model, shape, num_classes = run.restore_run(config, workdir)
        samples = np.asarray(generate.make_generate_fn(config, model, shape, num_classes)(
            state.ema_params, jax.random.key(0), 4))
        # (tests/test_set_models.py checks the samples' projection for every sampler)
        assert samples.shape == (4,) + tuple(shape) and np.isfinite(samples).all(), method


_EIGHT_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from tests.test_set_runs import molecule_config, point_config
    from diffusion_jax import generate, train
    from diffusion_jax import run as run_lib
    assert jax.device_count() == 8
    out = {}
    for name, make, data, fsdp in (("points", point_config, 4, 2),
                                   ("molecules", molecule_config, 2, 4)):
        config = make()
        config.data.batch_size, config.mesh.data, config.mesh.fsdp = 16, data, fsdp
        config.training.num_steps = config.training.checkpoint_every = 4
        state = train.train_and_evaluate(config, sys.argv[1] + "/" + name, log=lambda line: None)
        for i, leaf in enumerate(jax.tree_util.tree_leaves(state)):
            out[f"{name}/{i}"] = np.asarray(leaf)
        restored, model, shape, num_classes = run_lib.restore_run(config, sys.argv[1] + "/" + name)
        samples = generate.make_generate_fn(config, model, shape, num_classes, mesh=
                                            run_lib.sampling_mesh(config))(
            restored.ema_params, jax.random.key(0), 8)
        print(name, "sample devices", len(samples.sharding.device_set))
        out[f"{name}/samples"] = np.asarray(samples)
    np.savez(sys.argv[1] + "/states.npz", **out)
""")


@pytest.mark.slow  # two tiny runs on 8 simulated devices in a subprocess, and two on one
def test_sets_on_eight_devices_match_one_device(tmp_path):
    """Data parallelism and fsdp over 8 devices train the same set networks as one device
    (float32 round-off), masks and centred noise included, and sample the same sets."""
    env = {**os.environ, "PYTHONPATH": ROOT,
           "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""),
                                  "--xla_force_host_platform_device_count=8"]).strip()}
    result = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(tmp_path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    states = np.load(tmp_path / "states.npz")
    for name, make in (("points", point_config), ("molecules", molecule_config)):
        assert f"{name} sample devices 8" in result.stdout
        config = make()
        config.data.batch_size = 16
        config.training.num_steps = config.training.checkpoint_every = 4
        single = train.train_and_evaluate(config, str(tmp_path / f"one_{name}"), log=_quiet)
        for i, (path, expected) in enumerate(jax.tree_util.tree_flatten_with_path(single)[0]):
            where = jax.tree_util.keystr(path)
            if where.startswith((".params", ".ema_params")):
                np.testing.assert_allclose(states[f"{name}/{i}"], np.asarray(expected),
                                           rtol=1e-4, atol=1e-5, err_msg=f"{name} {where}")
            elif where.startswith((".step", ".rng")):
                np.testing.assert_array_equal(states[f"{name}/{i}"], np.asarray(expected),
                                              err_msg=f"{name} {where}")
        restored, model, shape, num_classes = run.restore_run(config, str(tmp_path / name))
        samples = np.asarray(generate.make_generate_fn(config, model, shape, num_classes)(
            restored.ema_params, jax.random.key(0), 8))
        # The same parameters sampled over 8 devices and over one: float32 round-off of the
        # largest entry (an untrained network's atom-type outputs reach hundreds; DDPM's first
        # step divides by alpha(t_max) = 0.006).
        np.testing.assert_allclose(states[f"{name}/samples"], samples,
                                   atol=1e-5 * np.abs(samples).max())
