"""A data source for `normcli recalibrate --data examples/calibration_data.py:synthetic_images`.

Any ``module:function`` or ``file.py:function`` that returns an iterable of batches works as ``--data``; this
one yields seeded synthetic 3x32x32 images (drawn in float64, rounded once to float32) for the sample models,
so the README's example gives the same batches on any machine. Real use points ``--data`` at a folder of
.npy/.npz/.pt/.safetensors files or images, or at a function that reads your own data set.
"""

from __future__ import annotations


def synthetic_images(batch_size: int = 16, batches: int = 8):
    import numpy as np

    rng = np.random.default_rng(0)
    offset = np.array([0.5, -0.2, 0.1]).reshape(1, 3, 1, 1)
    scale = np.array([1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)
    for _ in range(batches):
        yield (rng.standard_normal((batch_size, 3, 32, 32)) * scale + offset).astype(np.float32)
