"""The throughput benchmarks run end to end (on a tiny model), with every option, so that the
scarce accelerator time is not spent finding a broken script."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _call(script, *args, **env):
    return subprocess.run([sys.executable, script, "--models", "tiny", "--dtypes", "float32",
                           "--batch", "4", *args], cwd=os.path.join(ROOT, "benchmarks"),
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})


def _run(script, *args):
    run = _call(script, *args)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _rows(name):
    with open(os.path.join(ROOT, "benchmarks", "results", f"{name}.json")) as f:
        return json.load(f)["rows"]


def test_train_throughput_with_every_option():
    out = _run("train_throughput.py", "--iterations", "2", "--steps-per-call", "2",
               "--grad-accumulation", "2", "--remat", "--dropout-rng", "rbg",
               "--attention", "auto", "--plain", "--profile", "--checkpoint",
               "--name", "test_train_throughput")
    rows = _rows("test_train_throughput")
    full, plain = rows
    assert full["train_step"] == "jit" and plain["train_step"] == "plain"
    assert full["steps_per_call"] == 2 and full["remat"] and full["dropout_rng"] == "rbg"
    for row in rows:
        assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0
    assert full["profile"] and all(op["ms_per_step"] >= 0 for op in full["profile"])
    assert "where the time of one tiny float32 step goes" in out
    assert full["save_blocking_s"] > 0 and full["save_stall_s"] is not None
    assert 0 < full["inputs_gb"] and full["inputs_gb"] + full["temp_gb"] <= full["peak_gb"]
    assert full["save_until_written_s"] >= full["save_blocking_s"]
    _run("train_throughput.py", "--iterations", "1", "--train-step", "shard_map",
         "--name", "test_train_throughput_shard_map")
    assert _rows("test_train_throughput_shard_map")[0]["train_step"] == "shard_map"


def test_sample_throughput():
    _run("sample_throughput.py", "--steps", "2", "--name", "test_sample_throughput")
    (row,) = _rows("test_sample_throughput")
    assert row["model"] == "tiny" and row["evaluations_per_s"] > 0
    # Guided (tiny has classes): both branches of each of 2 steps are evaluations.
    assert row["guided"] and row["evaluations_per_sample"] == 2 * 2
    assert row["gflop_per_evaluation"] > 0 and 0 < row["mfu"] < 1
    assert row["achieved_tflops"] == pytest.approx(
        row["evaluations_per_s"] * row["gflop_per_evaluation"] / 1e3)
    assert row["gflop_per_evaluation_xla"] > 0


def test_compiled_kernels_counts_what_a_step_launches():
    out = _run("compiled_kernels.py", "--plain", "--sample", "--state-layouts", "auto",
               "default", "--name", "test_compiled_kernels")
    rows = {(r["program"], r["state_layouts"]): r for r in _rows("test_compiled_kernels")}
    assert set(rows) == {("train", "auto"), ("train", "default"), ("plain", ""), ("sample", "")}
    for row in rows.values():
        assert row["kernels"] > 10 and sum(row["kinds"].values()) == row["kernels"]
    assert rows[("sample", "")]["loops"] >= 1  # the sampler's steps run in a loop
    assert "tiny float32 train auto:" in out


def test_train_memory_compiles_for_a_mesh_it_simulates():
    # 4 fake CPU devices, which the script asks for itself (before JAX starts).
    out = _run("train_memory.py", "--batch", "8", "--meshes", "2x2", "--remat", "on",
               "--grad-accumulation", "2", "--train-step", "shard_map",
               "--name", "test_train_memory")
    (row,) = _rows("test_train_memory")
    assert (row["mesh"], row["train_step"], row["remat"], row["grad_accumulation"]) == (
        "2x2", "shard_map", True, 2)
    assert 0 < row["inputs_gb"] and row["inputs_gb"] + row["temp_gb"] <= row["peak_gb"]
    assert "peak_gb" in out
    for bad, message in ((["--meshes", "2"], "a mesh is DATAxFSDP"),
                         (["--meshes", "3x1"], "of the 3x1 mesh; use a multiple of 3"),
                         (["--grad-accumulation", "1", "0"], "must be >= 1, got 0"),
                         (["--meshes", "2x2", "--grad-accumulation", "2"], "a multiple of 8")):
        run = _call("train_memory.py", *bad)
        assert run.returncode == 2 and message in run.stderr, (bad, run.stderr[-2000:])
    # Fewer devices than the mesh (here, as XLA_FLAGS asks): it says which flag limits them.
    run = _call("train_memory.py", "--batch", "8", "--meshes", "2x2",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert run.returncode == 2 and "has 2 cpu devices (XLA_FLAGS" in run.stderr, run.stderr


def test_video_models_are_measured_per_clip_length():
    # The text-to-video step (space-time UNet, text encoder, caption tokens) at 2 and 4 frames,
    # with and without remat, on a 1x2 mesh (fsdp over 2 fake devices).
    out = _run("train_memory.py", "--models", "tiny_video", "--frames", "2", "4", "--remat",
               "both", "--meshes", "1x2", "--name", "test_train_memory_video")
    rows = _rows("test_train_memory_video")
    assert [(r["frames"], r["remat"]) for r in rows] == [(2, False), (4, False), (2, True),
                                                          (4, True)]
    by = {(r["frames"], r["remat"]): r for r in rows}
    for remat in (False, True):  # twice the frames: more activations, the same parameters
        assert by[4, remat]["temp_gb"] > 1.5 * by[2, remat]["temp_gb"]
        assert by[4, remat]["params"] == by[2, remat]["params"]
    # (XLA's CPU compiler realises little of what remat saves: no claim about it here.)
    assert " frames " in out
    out = _run("train_throughput.py", "--models", "tiny_video", "--frames", "2",
               "--iterations", "1", "--name", "test_train_throughput_video")
    (row,) = _rows("test_train_throughput_video")
    assert row["frames"] == 2 and row["images_per_s"] > 0 and row["gflop_per_image"] > 0
    for script in ("train_memory.py", "train_throughput.py"):
        run = _call(script, "--frames", "4")  # tiny is an image model
        assert run.returncode == 2 and "'tiny' is not one" in run.stderr, run.stderr[-2000:]


def test_train_memory_compares_lora_with_full_training():
    out = _run("train_memory.py", "--lora-rank", "0", "4", "--lora-targets", "attention",
               "--name", "test_train_memory_lora")
    full, adapted = _rows("test_train_memory_lora")
    assert (full["lora_rank"], adapted["lora_rank"]) == (0, 4)
    assert (full["lora_targets"], adapted["lora_targets"]) == (None, "attention")
    # The adapters are what is trained; the base, held once, is what full training trains.
    assert 0 < adapted["params"] < full["params"] == adapted["frozen_params"]
    assert full["frozen_params"] == 0 and full["frozen_gb"] == 0
    assert 0 < adapted["frozen_gb"] < adapted["state_gb"] <= adapted["inputs_gb"]
    assert adapted["state_gb"] < full["state_gb"] <= full["inputs_gb"]
    for part in ("inputs", "temp", "peak"):
        assert adapted[f"{part}_ratio"] == pytest.approx(
            adapted[f"{part}_gb"] / full[f"{part}_gb"])
        assert f"{part}_ratio" not in full
    assert adapted["peak_ratio"] < 1
    assert "LoRA rank 4 (attention) / full: inputs" in out
    for bad, message in ((["--lora-rank", "-1"], "--lora-rank takes 0 (full) or a positive"),
                         (["--lora-rank", "4", "--train-step", "shard_map"],
                          "LoRA and ControlNet steps compute their gradients with "
                          "--train-step jit")):
        run = _call("train_memory.py", *bad)
        assert run.returncode == 2 and message in run.stderr, (bad, run.stderr[-2000:])


def test_train_memory_compares_a_controlnet_with_full_training():
    out = _run("train_memory.py", "--controlnet", "--name", "test_train_memory_controlnet")
    full, control = _rows("test_train_memory_controlnet")
    assert (full["trains"], control["trains"]) == ("full", "controlnet")
    # The ControlNet (a copy of the encoder) is what is trained; the base is held once.
    assert 0 < control["params"] < full["params"] == control["frozen_params"]
    assert 0 < control["frozen_gb"] < control["state_gb"] <= control["inputs_gb"]
    for part in ("inputs", "temp", "peak"):
        assert control[f"{part}_ratio"] == pytest.approx(
            control[f"{part}_gb"] / full[f"{part}_gb"])
    assert "ControlNet / full: inputs" in out


def test_train_throughput_compares_lora_with_full_training():
    out = _run("train_throughput.py", "--iterations", "1", "--lora-rank", "0", "4",
               "--name", "test_train_throughput_lora")
    full, adapted = _rows("test_train_throughput_lora")
    assert (full["lora_rank"], adapted["lora_rank"]) == (0, 4)
    assert 0 < adapted["params"] < full["params"] == adapted["frozen_params"]
    for row in (full, adapted):
        assert row["steps_per_s"] > 0 and row["images_per_s"] == pytest.approx(
            4 * row["steps_per_s"])
        assert 0 < row["inputs_gb"] and row["inputs_gb"] + row["temp_gb"] <= row["peak_gb"]
    assert adapted["speed_ratio"] == pytest.approx(adapted["steps_per_s"] / full["steps_per_s"])
    assert adapted["memory_ratio"] == pytest.approx(adapted["peak_gb"] / full["peak_gb"])
    assert adapted["inputs_gb"] < full["inputs_gb"]  # adapters + moments + base < 4 x base
    assert "speed_ratio" not in full
    assert "LoRA rank 4 (attention) / full:" in out
    run = _call("train_throughput.py", "--lora-rank", "4", "--train-step", "shard_map")
    assert run.returncode == 2 and "with --train-step jit" in run.stderr, run.stderr[-2000:]


FAKE_BASELINE = """
import json, os
json.dump({"device": "fake card", "torch": "0.0", "bf16_matmul_tflops": 1.0},
          open(os.path.join(os.environ["OUT"], "torch_baseline.json"), "w"))
"""


def test_gpu_comparison_script_runs_every_step_and_collects_the_files(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "gpu_comparison.sh")
    bad = subprocess.run(["bash", script, "--baseline", str(tmp_path / "missing.py")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such file" in bad.stderr
    baseline = tmp_path / "torch_baseline.py"
    baseline.write_text(FAKE_BASELINE)
    copies = tmp_path / "copies"
    # paths relative to where it is started, as a user would type them
    run = subprocess.run(["bash", script, "--model", "tiny", "--train-batch", "4",
                          "--sample-batch", "4", "--iterations", "2", "--baseline",
                          "torch_baseline.py", "--name", "test_gpu_comparison", "--copy-to",
                          "copies"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:]
    assert sorted(os.listdir(copies)) == [
        "test_gpu_comparison.log", "test_gpu_comparison.md", "test_gpu_comparison_sample.json",
        "test_gpu_comparison_torch.json", "test_gpu_comparison_train.json"]
    train = json.loads((copies / "test_gpu_comparison_train.json").read_text())
    assert [r["train_step"] for r in train["rows"]] == ["jit", "plain"]
    assert train["rows"][0]["dtype"] == "bfloat16" and train["rows"][0]["profile"]
    table = (copies / "test_gpu_comparison.md").read_text()
    assert "PyTorch baseline: fake card" in table and "WARNING: the two ran" in table
    assert "| tiny | full step (jit, batch 4) |" in table
    assert "tiny: the full step runs at" in table
    log = (copies / "test_gpu_comparison.log").read_text()
    assert "=== torch_baseline" in log and "=== done in" in log
    assert not [line for line in log.splitlines() if line.startswith("===") and "failed" in line]


TINY_TEXT_PRESET = """
from configs import text_shapes_cpu


def get_config():
    config = text_shapes_cpu.get_config()
    config.model.unet.channels = 16
    config.model.unet.channel_mult = (1, 2)
    config.model.unet.attention_resolutions = (8,)
    config.model.unet.head_dim = 16
    config.text.width = 32
    config.text.depth = 1
    return config
"""

TINY_AUTOENCODER = """
from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.task = "autoencoder"
    config.autoencoder.block_out_channels = (8, 16)  # f = 2
    config.autoencoder.layers_per_block = 1
    config.autoencoder.latent_channels = 4
    config.autoencoder.norm_num_groups = 8
    return config
"""


def test_latent_vs_pixel_reports_both_runs_and_their_ratios(tmp_path):
    # A captioned-shapes text UNet, as the default preset, shrunk; a random f=2 autoencoder.
    (tmp_path / "preset.py").write_text(TINY_TEXT_PRESET)
    (tmp_path / "autoencoder.py").write_text(TINY_AUTOENCODER)
    script = [sys.executable, "latent_vs_pixel.py", "--preset", str(tmp_path / "preset.py"),
              "--autoencoder", str(tmp_path / "autoencoder.py")]
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run(script + ["--resolution", "16", "--batch-size", "4", "--steps", "2",
                                   "--sample-batch", "2", "--sampling-steps", "2",
                                   "--name", "test_latent_vs_pixel",
                                   "--out", str(tmp_path / "out.json")],
                         cwd=os.path.join(ROOT, "benchmarks"), capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "speed_ratio" in run.stdout and "latent_precomputed" in run.stdout
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["rows"] == _rows("test_latent_vs_pixel")
    assert result["latent_shape"] == [8, 8, 4] and result["autoencoder"]["kind"] == "random"
    pixel, latent, precomputed = result["rows"]
    assert [r["run"] for r in result["rows"]] == ["pixel", "latent", "latent_precomputed"]
    assert (pixel["shape"], latent["shape"]) == ("16x16x3", "8x8x4")

    def positive(*values):
        return all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)

    for row in result["rows"]:
        assert positive(row["steps_per_s"], row["step_ms"], row["step_peak_gb"], row["peak_gb"])
        assert row["speed_ratio"] == pytest.approx(row["steps_per_s"] / pixel["steps_per_s"])
        assert row["memory_ratio"] == pytest.approx(row["peak_gb"] / pixel["peak_gb"])
    for row in (latent, precomputed):
        assert positive(row["encode_ms"], row["encode_peak_gb"])
        assert row["peak_gb"] >= row["step_peak_gb"]
    assert positive(pixel["sample_s"], latent["sample_s"], latent["decode_s"])
    assert latent["sample_speed_ratio"] == pytest.approx(pixel["sample_s"] / latent["sample_s"])
    bad = subprocess.run(script[:2] + ["--autoencoder", str(tmp_path / "missing")],
                         cwd=os.path.join(ROOT, "benchmarks"), capture_output=True, text=True,
                         timeout=600, env=env)
    assert bad.returncode == 2 and "missing does not exist" in bad.stderr, bad.stderr[-2000:]


# -- Stable Diffusion: the pipeline, the load's memory, the GPU comparison's SD step -------------

@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD 1.x folder with a DPM-Solver++(2M) scheduler, as the PyTorch side's."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import sd_folders

    folder = tmp_path_factory.mktemp("sd") / "model"
    pipe = sd_folders.build(folder, family="sd1", scheduler="dpmpp")
    return folder, sum(p.numel() for p in pipe.unet.parameters())


def _script(name, *args):
    return subprocess.run([sys.executable, name, *map(str, args)],
                          cwd=os.path.join(ROOT, "benchmarks"), capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": ROOT})


def _result(name):
    with open(os.path.join(ROOT, "benchmarks", "results", f"{name}.json")) as f:
        return json.load(f)


def test_sd_pipeline_times_a_folder_and_compares_with_torch(sd_folder, tmp_path):
    folder, unet_parameters = sd_folder
    fake_torch = tmp_path / "torch_sd_pipeline.json"  # as the PyTorch script writes it
    fake_torch.write_text(json.dumps({
        "device": "fake card", "torch": "0.0", "batch": 8, "steps": 2, "size": 32,
        "dtype": "torch.float32", "images_per_s_eager": 2.0, "images_per_s_compiled_unet": 4.0}))
    run = _script("sd_pipeline.py", "--folder", folder, "--batch", "1", "--steps", "2",
                  "--size", "32", "--dtype", "float32", "--repeats", "2",
                  "--torch-json", fake_torch, "--name", "test_sd_pipeline")
    assert run.returncode == 0, run.stderr[-3000:]
    result = _result("test_sd_pipeline")
    (row,) = result["rows"]
    assert (row["batch"], row["steps"], row["size"], row["dtype"]) == (1, 2, 32, "float32")
    # The folder's DPMSolverMultistepScheduler, mapped onto our DPM-Solver++(2M).
    assert (row["scheduler"], row["sampler"], row["sampler_from"]) == (
        "DPMSolverMultistepScheduler", "dpmpp_2m", "folder")
    assert row["parameters"]["unet"] == unet_parameters
    assert row["load_s"] > 0 and row["first_call_s"] >= row["best_s"] > 0
    assert row["mean_s"] >= row["best_s"]
    assert row["images_per_s"] == pytest.approx(1 / row["best_s"])
    assert row["unet_evaluations_per_s"] == pytest.approx(2 * 2 * row["images_per_s"])
    assert row["ratio_to_images_per_s_eager"] == pytest.approx(row["images_per_s"] / 2.0)
    assert row["ratio_to_images_per_s_compiled_unet"] == pytest.approx(row["images_per_s"] / 4.0)
    assert "jax" in result and "flax" in result and "device" in result
    assert "diffusers eager 2.000 images/s =" in run.stdout
    assert "with torch.compile(UNet) 4.000 images/s =" in run.stdout
    warnings = result["torch_warnings"]  # batch 8 there, 1 here; its card is not this one
    assert any(w.startswith("batch: ours 1, diffusers 8") for w in warnings), warnings
    assert any(w.startswith("device:") for w in warnings), warnings
    assert "WARNING: the two ran with different batch" in run.stdout
    summary = _script("sd_pipeline.py", "--summarize",
                      os.path.join(ROOT, "benchmarks", "results", "test_sd_pipeline.json"),
                      "--torch-json", fake_torch, "--train-json", tmp_path / "missing.json")
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "diffusers eager 2.000 images/s" in summary.stdout
    assert "SD 1.5 training step: no result" in summary.stdout
    for bad, message in ((["--folder", tmp_path / "none"], "is not a directory"),
                         ([], "give --folder DIR"),
                         (["--folder", folder, "--torch-json", tmp_path / "no.json"],
                          "no such file")):
        run = _script("sd_pipeline.py", *bad)
        assert run.returncode == 2 and message in run.stderr, (bad, run.stderr[-2000:])


def test_load_memory_accounts_for_the_peak(sd_folder):
    folder, unet_parameters = sd_folder
    run = _script("load_memory.py", "--folder", folder, "--dtype", "float32", "bfloat16",
                  "--name", "test_load_memory")
    assert run.returncode == 0, run.stderr[-3000:]
    full, half = _result("test_load_memory")["rows"]
    assert (full["dtype"], half["dtype"]) == ("float32", "bfloat16")
    for row in (full, half):
        assert row["parameters"] == unet_parameters
        assert row["peak_bytes"] >= row["baseline_bytes"] > 0
        assert row["largest_tensor_bytes"] > 0 and row["file_bytes"] == 4 * unet_parameters
        assert row["residual_gib"] == pytest.approx(
            row["peak_gib"] - row["param_gib"] - row["largest_tensor_gib"] - row["baseline_gib"])
    assert full["param_bytes"] == 4 * unet_parameters == 2 * half["param_bytes"]
    assert "float32: peak RSS = " in run.stdout and "GiB = params " in run.stdout
    assert "bfloat16: peak RSS = " in run.stdout and "+ largest tensor" in run.stdout
    bad = _script("load_memory.py", "--folder", os.path.dirname(folder))
    assert bad.returncode != 0 and "is neither a diffusers UNet folder" in bad.stderr


FAKE_SD_BASELINE = """
import json, os, sys
sys.path.insert(0, {tests!r})
import sd_folders
save = sys.argv[sys.argv.index("--save") + 1]
sd_folders.build(save, family="sd1", scheduler="dpmpp")
json.dump({{"device": "fake card", "torch": "0.0", "batch": 1, "steps": 2, "size": 32,
           "dtype": "torch.bfloat16", "images_per_s_eager": 1.0,
           "images_per_s_compiled_unet": 2.0}},
          open(os.path.join(os.environ["OUT"], "torch_sd_pipeline.json"), "w"))
"""


def test_gpu_comparison_sd_step_runs_both_pipelines_on_one_folder(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    script = os.path.join(ROOT, "benchmarks", "gpu_comparison.sh")
    for bad, message in ((["--sd-only"], "--sd-only needs --sd-baseline"),
                         (["--sd-baseline", "missing.py"], "no such file")):
        run = subprocess.run(["bash", script, *bad], cwd=tmp_path, capture_output=True,
                             text=True)
        assert run.returncode == 2 and message in run.stderr, (bad, run.stderr)
    (tmp_path / "torch_sd_pipeline.py").write_text(
        FAKE_SD_BASELINE.format(tests=os.path.join(ROOT, "tests")))
    run = subprocess.run(
        ["bash", script, "--sd-baseline", "torch_sd_pipeline.py", "--sd-only",
         "--sd-args", "--batch 1 --steps 2 --size 32 --repeats 1", "--sd-folder", "kept/sd",
         "--sd-train-args", "--models tiny --batch 4", "--iterations", "2",
         "--name", "test_gpu_comparison_sd", "--copy-to", "copies"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:]
    name = "test_gpu_comparison_sd"
    assert sorted(os.listdir(tmp_path / "copies")) == [
        f"{name}.log", f"{name}.md", f"{name}_sd15_train.json", f"{name}_sd_pipeline.json",
        f"{name}_sd_torch.json"]
    assert (tmp_path / "kept" / "sd" / "model_index.json").exists()  # --sd-folder keeps it
    (row,) = json.loads((tmp_path / "copies" / f"{name}_sd_pipeline.json").read_text())["rows"]
    assert row["attention"] == "auto" and row["sampler"] == "dpmpp_2m"
    assert row["ratio_to_images_per_s_eager"] == pytest.approx(row["images_per_s"])
    summary = (tmp_path / "copies" / f"{name}.md").read_text()
    assert "diffusers eager 1.000 images/s =" in summary
    assert "with torch.compile(UNet) 2.000 images/s =" in summary
    assert "training step, tiny UNet" in summary and "MFU" in summary
    log = (tmp_path / "copies" / f"{name}.log").read_text()
    assert "=== sd_torch" in log and "=== SD 1.5 summary" in log and "=== done in" in log
    assert "=== train (" not in log  # --sd-only: the DDPM steps did not run
    assert not [line for line in log.splitlines() if line.startswith("===") and "failed" in line]
