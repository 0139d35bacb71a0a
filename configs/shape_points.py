"""Class-conditional point clouds on one GPU: 1,024 points on the surfaces of six shapes.

Spheres, cubes, tori, cylinders, cones and octahedra of random size and orientation
(diffusion_jax.data.points.ShapePoints), denoised by a permutation-equivariant point transformer
with class conditioning and label dropout for classifier-free guidance; cosine schedule, v
prediction, noise drawn with zero centre of mass. docs/point_clouds.md has the metrics.
"""

from diffusion_jax import defaults


def get_config():
    config = defaults.get_config()
    config.sized_for = "accelerator"
    config.cpu_preset = "configs/shape_points_cpu.py"
    config.data.name = "shape_points"
    config.data.size = 200_000
    config.data.num_points = 1_024
    config.data.batch_size = 64
    config.model.name = "point_transformer"
    config.model.point_transformer.hidden = 256
    config.model.point_transformer.depth = 8
    config.model.point_transformer.num_heads = 8
    config.model.point_transformer.fourier_features = 64
    config.model.dtype = "bfloat16"
    config.diffusion.schedule = "cosine"
    config.diffusion.target = "v"
    config.diffusion.label_dropout = 0.1
    config.training.num_steps = 50_000
    config.training.learning_rate = 2e-4
    config.training.warmup_steps = 1_000
    config.training.ema_decay = 0.9995
    config.training.log_every = 200
    config.training.checkpoint_every = 5_000
    config.training.sample_every = 5_000
    config.sampling.method = "dpmpp_2m"
    config.sampling.num_steps = 50
    config.sampling.num_samples = 36
    config.sampling.guidance_scale = 1.0
    config.evaluation.num_samples = 600
    config.evaluation.batch_size = 60
    return config
