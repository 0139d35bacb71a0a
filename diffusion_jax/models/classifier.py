"""Small classifiers for sample metrics.

``Classifier``, whose penultimate layer is a feature space, ``AudioClassifier``, the same on a
clip's log-magnitude spectrogram, and ``AttributeClassifier``, one softmax head per attribute of
a captioned image."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

__all__ = ["Classifier", "AudioClassifier", "AttributeClassifier", "stft_frame_length"]


class Classifier(nn.Module):
    """A small convolutional classifier whose last hidden layer gives the features of the metrics.

    ``Classifier(num_classes)(images, train=False) -> (logits, features)`` for NHWC images in
    [-1, 1]: two stages of two 3x3 convolutions (GroupNorm, SiLU) with 2x average pooling, a
    global average, and a ``feature_dim``-wide hidden layer whose activations are the features."""

    num_classes: int
    width: int = 32
    feature_dim: int = 128
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = x.astype(jnp.float32)
        for stage, channels in enumerate((self.width, 2 * self.width)):
            for i in range(2):
                h = nn.Conv(channels, (3, 3), name=f"conv_{stage}_{i}")(h)
                h = nn.silu(nn.GroupNorm(num_groups=8, name=f"norm_{stage}_{i}")(h))
            h = nn.avg_pool(h, (2, 2), (2, 2))
        h = jnp.mean(h, axis=(1, 2))
        features = nn.silu(nn.Dense(self.feature_dim, name="features")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(features)
        return nn.Dense(self.num_classes, name="logits")(h), features


class AttributeClassifier(nn.Module):
    """A small convolutional classifier with one softmax head per attribute of a captioned image.

    ``AttributeClassifier(heads)(images) -> ({name: logits [n, classes]}, features)`` for NHWC
    images in [-1, 1], with ``heads`` a tuple of ``(name, num_classes)``.

    The trunk is cheap enough to train on a CPU in minutes: a 3x3 convolution at full resolution,
    then 3x3 convolutions at 1/2 and 1/4 resolution (GroupNorm, SiLU, 2x average pooling). It
    flattens the last feature map instead of averaging it, because where an object is (the
    ``position`` attribute) and how many there are is what a global average would blur."""

    heads: tuple[tuple[str, int], ...]
    width: int = 32
    feature_dim: int = 128

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no dropout or batch statistics; kept for the Classifier's calling convention
        h = x.astype(jnp.float32)
        stages = ((self.width,), (self.width, 2 * self.width), (2 * self.width,))
        for stage, widths in enumerate(stages):
            if stage:
                h = nn.avg_pool(h, (2, 2), (2, 2))
            for i, channels in enumerate(widths):
                h = nn.Conv(channels, (3, 3), name=f"conv_{stage}_{i}")(h)
                h = nn.silu(nn.GroupNorm(num_groups=8, name=f"norm_{stage}_{i}")(h))
        h = h.reshape((h.shape[0], -1))
        features = nn.silu(nn.Dense(self.feature_dim, name="features")(h))
        logits = {name: nn.Dense(classes, name=f"head_{name}")(features)
                  for name, classes in self.heads}
        return logits, features


def stft_frame_length(sample_rate: int) -> int:
    """The power of two nearest 32 ms of samples: 256 at 8 kHz, 512 at 16 kHz."""
    return int(2 ** round(np.log2(0.032 * sample_rate)))


class AudioClassifier(nn.Module):
    """:class:`Classifier` on the log-magnitude spectrogram of audio clips.

    ``AudioClassifier(num_classes, sample_rate)(clips) -> (logits, features)`` for clips
    [batch, length, channels] in [-1, 1]: channels are averaged, cut into Hann-windowed frames of
    :func:`stft_frame_length` samples every half frame, and each frame's log(1e-4 + |FFT|) is a
    row of a one-channel image that the convolutional classifier reads. A waveform's 3-sample
    convolutions could not resolve a pitch whose period is tens of samples; the spectrum
    holds it in a few bins."""

    num_classes: int
    sample_rate: int
    width: int = 32
    feature_dim: int = 128
    dropout: float = 0.2

    @nn.compact
    def __call__(self, clips, train: bool = False):
        n_fft = stft_frame_length(self.sample_rate)
        hop = n_fft // 2
        wave = jnp.mean(clips.astype(jnp.float32), axis=-1)
        if wave.shape[1] < n_fft:
            raise ValueError(f"clips of {wave.shape[1]} samples are shorter than one "
                             f"{n_fft}-sample spectrogram frame")
        starts = np.arange(0, wave.shape[1] - n_fft + 1, hop)
        frames = wave[:, starts[:, None] + np.arange(n_fft)[None, :]]
        window = np.hanning(n_fft + 1)[:-1].astype(np.float32)  # periodic Hann
        spectrum = jnp.log(1e-4 + jnp.abs(jnp.fft.rfft(frames * window, axis=-1)))
        return Classifier(self.num_classes, self.width, self.feature_dim, self.dropout,
                          name="spectrogram_classifier")(spectrum[..., None], train)
