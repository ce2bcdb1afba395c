"""Sample-rate conversion (sphn's resampler), for the embedded models."""

from __future__ import annotations

import math

import numpy as np

from .pcm import Samples


def resample(samples: Samples, rate: int, to: int) -> Samples:
    """Mono float samples at ``rate`` to ``to``."""
    if rate == to or not len(samples):
        return samples.astype(np.float32, copy=False)
    import sphn

    out = sphn.resample(np.ascontiguousarray(samples, dtype=np.float32),
                        src_sample_rate=rate, dst_sample_rate=to)
    return np.asarray(out, dtype=np.float32)


class StreamResampler:
    """``rate`` to ``to`` for audio that arrives in pieces: a windowed-sinc low-pass
    filter that keeps its history across calls, so piece boundaries leave no clicks
    (resampling each 80 ms piece on its own did, and pocketsphinx heard worse).
    Upsample by ``up``, filter, keep every ``down``-th sample."""

    def __init__(self, rate: int, to: int, taps: int = 96) -> None:
        divisor = math.gcd(rate, to)
        self.up, self.down = to // divisor, rate // divisor
        cutoff = 0.45 / max(self.up, self.down)  # cycles per upsampled sample
        n = np.arange(taps) - (taps - 1) / 2
        kernel = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(taps, 8.0)
        # Zero-stuffing divides the level by ``up``; the filter gives it back.
        self._kernel = (kernel * self.up / kernel.sum()).astype(np.float32)
        self._history = np.zeros(taps - 1, np.float32)
        self._phase = 0

    def __call__(self, samples: Samples) -> Samples:
        if not len(samples):
            return np.zeros(0, np.float32)
        upsampled = np.zeros(len(samples) * self.up, np.float32)
        upsampled[::self.up] = samples
        buffer = np.concatenate([self._history, upsampled])
        filtered = np.convolve(buffer, self._kernel, mode="valid")  # one per upsampled
        out = filtered[self._phase::self.down]
        self._phase = self._phase + len(out) * self.down - len(upsampled)
        self._history = buffer[len(buffer) - len(self._history):]
        return out.astype(np.float32, copy=False)
