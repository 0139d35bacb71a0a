"""Loading a run: checkpoints written before the model families had groups, and the config layer."""

import pathlib
import shutil

import numpy as np
import pytest

from configs import tiny
from diffusion_jax import checkpoints, configuration, generate, run, train

OLD_RUN = pathlib.Path(__file__).resolve().parent / "data" / "run_v0"


def _old_run_config():
    """The config that wrote ``tests/data/run_v0`` (tiny, 8 channels, 2 steps), in today's keys."""
    config = tiny.get_config()
    config.model.unet.channels = 8
    config.training.num_steps = 2
    return config


@pytest.fixture
def old_run(tmp_path):
    workdir = tmp_path / "run_v0"
    shutil.copytree(OLD_RUN / "checkpoints", workdir / "checkpoints")
    shutil.copy(OLD_RUN / "config.json", workdir / "config.json")
    return workdir


def test_a_checkpoint_from_before_the_restructure_restores_and_samples_the_same(old_run):
    """The checkpoint's stored fingerprint has the flat model keys of the old layout; it
    restores, and ``--mode=sample`` writes what the old code wrote from it."""
    config = _old_run_config()
    state, _, shape, num_classes = run.restore_run(config, str(old_run))
    assert int(state.step) == 2 and shape == (16, 16, 3) and num_classes == 3
    written = generate.generate_to_files(config, str(old_run))
    names = [pathlib.Path(p).name for p in written]
    stem = names[0][:-len(".npz")]
    assert stem.startswith("step2_dpmpp_2m_3steps_cfg1_")
    assert names == [stem + ".npz", stem + ".png", stem + ".json"]
    new, old = np.load(written[0]), np.load(OLD_RUN / "samples_step2.npz")
    assert set(new.files) == set(old.files) == {"samples", "labels"}
    np.testing.assert_array_equal(new["labels"], old["labels"])
    # Same computation on the same kind of machine; allow for other CPUs' float rounding.
    np.testing.assert_allclose(new["samples"], old["samples"], atol=1e-5)


def test_an_old_checkpoint_under_another_model_names_the_key(old_run):
    config = _old_run_config()
    config.model.unet.channels = 16
    with pytest.raises(checkpoints.CheckpointError) as err:
        run.restore_run(config, str(old_run))
    message = str(err.value)
    assert "(model.channels: checkpoint 8 vs config 16)" in message
    assert "channel_mult" not in message  # only the key that differs


def test_an_old_checkpoint_resumes_training(old_run):
    config = _old_run_config()
    config.training.num_steps = 4
    lines = []
    state = train.train_and_evaluate(config, str(old_run), log=lines.append)
    assert int(state.step) == 4
    assert any("resumed from step 2" in line for line in lines)


@pytest.mark.parametrize("old_key, new_key", [("model.channels", "model.unet.channels"),
                                              ("model.dit_size", "model.dit.size"),
                                              ("model.hidden", "model.mlp.hidden")])
def test_a_flat_model_key_names_its_new_group(old_key, new_key):
    config = tiny.get_config()
    group, key = old_key.split(".")
    with config.unlocked():
        config[group][key] = 1
    with pytest.raises(configuration.ConfigError, match=f"config.{old_key} is now "
                                                        f"config.{new_key}"):
        configuration.validate(config)


def test_a_family_checks_its_own_keys_only():
    """The chosen family's keys are validated; another family's group is left alone."""
    config = tiny.get_config()
    config.model.dit.patch_size = 0  # not used by the unet
    configuration.validate(config)
    config.model.name = "dit"
    with pytest.raises(configuration.ConfigError, match="config.model.dit.patch_size must be > 0"):
        configuration.validate(config)
    config.model.dit.patch_size = 3
    with pytest.raises(configuration.ConfigError, match="patch_size=3 does not divide"):
        configuration.build_model(config.model, (16, 16, 3), None)
    config.model.name = "transformer"
    with pytest.raises(configuration.ConfigError, match="model.name='transformer' is not one"):
        configuration.validate(config)


def test_a_new_family_is_one_record(monkeypatch):
    """Registering a family is all it takes for configs to name it and build it."""
    import ml_collections

    from diffusion_jax import defaults, models
    from diffusion_jax.models import registry

    monkeypatch.setattr(registry, "FAMILIES", dict(registry.FAMILIES))
    registry.register(registry.Family(
        name="wide_mlp", defaults=lambda: {"hidden": 512}, data_rank=1, text=False,
        ranges={"hidden": (int, "> 0")},
        build=lambda group, shape, common: models.MLP(hidden=group.hidden, depth=2,
                                                      num_classes=common["num_classes"])))
    config = defaults.get_config()
    assert isinstance(config.model.wide_mlp, ml_collections.ConfigDict)
    config.data.name, config.model.name = "toy2d", "wide_mlp"
    configuration.validate(config)
    model = configuration.build_model(config.model, (2,), None)
    assert isinstance(model, models.MLP) and model.hidden == 512
    assert run.model_fingerprint(config.model)["hidden"] == 512
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("unet"))


def test_training_says_how_long_it_will_take_after_the_first_step(tmp_path):
    """Right after the first compiled step: compile time, seconds per step and the ETA; a config
    sized for an accelerator says so first on a machine without one, naming its CPU preset."""
    config = tiny.get_config()
    config.training.num_steps = 4
    config.training.log_every = 4
    config.sized_for = "accelerator"
    config.cpu_preset = "configs/tiny_cpu.py"
    lines = []
    train.train_and_evaluate(config, str(tmp_path), log=lines.append)
    assert lines[0].startswith("note: this config is sized for a GPU or TPU and this machine has "
                               "none; configs/tiny_cpu.py is the same job sized for a CPU")
    assert lines[1].startswith("model: unet")
    first = lines[2]
    assert first.startswith("step 1: compiled the train step in ") and " s/step, so about " in first
    assert first.endswith("for the 3 steps left (this config is sized for a GPU or TPU and this "
                          "machine has none; configs/tiny_cpu.py is the same job sized for a CPU)")
    assert lines[3].startswith("step 4/4 ")
    config.sized_for = "any"
    lines = []
    train.train_and_evaluate(config, str(tmp_path / "any"), log=lines.append)
    assert lines[0].startswith("model: unet") and not lines[1].endswith(")")
