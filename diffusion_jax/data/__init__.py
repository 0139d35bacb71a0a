"""Input pipelines: data sources and grain iterators of host-local numpy batches."""

from diffusion_jax.data.audio import AudioFolder, Tones, read_audio
from diffusion_jax.data.captions import CaptionedShapes, caption_for
from diffusion_jax.data.folder import ImageFolder, Resized, resize_center_crop
from diffusion_jax.data.latent_files import PrecomputedLatents
from diffusion_jax.data.pipeline import (
    ToModelInputs,
    check_batch,
    check_first_batch,
    check_source,
    make_iterator,
)
from diffusion_jax.data.sources import (
    FASHION_MNIST_CLASSES,
    DataError,
    FashionMNIST,
    Shapes,
    TFDSSource,
    Toy2D,
    read_idx,
)
from diffusion_jax.data.video import MovingShapes, VideoFolder, read_video

__all__ = [
    "AudioFolder",
    "CaptionedShapes",
    "DataError",
    "FASHION_MNIST_CLASSES",
    "FashionMNIST",
    "ImageFolder",
    "MovingShapes",
    "PrecomputedLatents",
    "Resized",
    "Shapes",
    "TFDSSource",
    "Tones",
    "Toy2D",
    "ToModelInputs",
    "VideoFolder",
    "caption_for",
    "check_batch",
    "check_first_batch",
    "check_source",
    "make_iterator",
    "read_audio",
    "read_idx",
    "read_video",
    "resize_center_crop",
]
