"""Class-conditional point clouds sized for a CPU: 128 points per shape, a small transformer.

The shapes and model family of configs/shape_points.py with an eighth of the points and a
narrower, shallower network; its speed and metrics on a 2-core machine are in
docs/point_clouds.md.
"""

from configs import shape_points


def get_config():
    config = shape_points.get_config()
    config.sized_for = "any"
    config.cpu_preset = ""
    config.data.size = 20_000
    config.data.num_points = 128
    config.data.batch_size = 32
    config.model.point_transformer.hidden = 96
    config.model.point_transformer.depth = 4
    config.model.point_transformer.num_heads = 4
    config.model.point_transformer.fourier_features = 32
    config.model.dtype = "float32"
    config.training.num_steps = 4_000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 200
    config.training.ema_decay = 0.995
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.sample_every = 1_000
    config.sampling.num_steps = 30
    config.evaluation.num_samples = 120
    config.evaluation.batch_size = 60
    config.classifier.num_steps = 500
    config.classifier.batch_size = 64
    return config
