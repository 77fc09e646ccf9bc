"""The synthetic task family (§4 stand-in): binary Gaussian mixtures in the 3×32×32 input space of
the image tasks, generated deterministically from ``(seed, task)`` (see :func:`synthetic_task`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ffl.data.tasks import TaskData, check_task, task_classes
from ffl.seeds import derive_seed


def _low_frequency_image(gen: torch.Generator, grid: int) -> torch.Tensor:
    """A smooth random image: a ``grid×grid`` Gaussian field bilinearly upsampled to 32×32,
    scaled to unit RMS per pixel."""
    coarse = torch.randn(1, 3, grid, grid, generator=gen, dtype=torch.float64)
    img = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)[0]
    return img / img.pow(2).mean().sqrt()


def synthetic_task(task: int, *, seed: int = 0, n_train: int = 256, n_test: int = 128,
                   n_tasks: int | None = None, noise: float = 1.0, separation: float = 12.0,
                   grid: int = 4) -> TaskData:
    """A synthetic binary task in the 3×32×32 input space of the image tasks (§4 stand-in).

    Task ``t`` is a two-class Gaussian mixture: ``x = μ_y + noise·ε`` with ε ~ N(0, I) (shared
    isotropic noise) and class means ``μ_{0,1} = c_t ∓ d_t/2``. The centre ``c_t`` (RMS 0.5 per
    pixel) and the direction ``d_t`` (‖d_t‖ = ``separation``·``noise``) are *low-frequency* random
    images (a ``grid×grid`` Gaussian field upsampled to 32×32) from a generator seeded by
    ``(seed, t)``. Why this design: the Bayes-optimal rule is the fixed direction ``d_t``, so
    networks trained on the same task from different initializations converge to similar
    functions, while two tasks' directions are nearly independent random vectors in the
    3·grid² = 48-dim smooth subspace, so tasks are distinguishable. With the defaults the mean
    difference is estimated well from 256 samples (cosine ≈ 0.87 to d_t) and test accuracy is
    near 100 %. Checked with MLP-4 (SGD, 30 epochs): two seeds on one task reach 100 % test
    accuracy and their logit margins on shared probe inputs correlate at 0.98-0.99, while
    networks of different tasks correlate at |r| < 0.4.

    Samples are balanced (``n//2`` per class, in a seeded random order) and drawn from a second
    generator seeded by ``(seed, t, split)``; everything uses explicit ``torch.Generator`` seeds,
    so the result is bit-identical across processes.
    """
    task = check_task("synthetic", task, n_tasks)
    if n_train < 2 or n_test < 2:
        raise ValueError("n_train and n_test must be >= 2")
    gen = torch.Generator().manual_seed(derive_seed("ffl-synthetic", seed, task, "means"))
    centre = 0.5 * _low_frequency_image(gen, grid)
    direction = _low_frequency_image(gen, grid)
    direction = direction * (separation * noise / direction.norm())
    means = torch.stack([centre - direction / 2, centre + direction / 2])  # (2, 3, 32, 32)

    def sample(n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(derive_seed("ffl-synthetic", seed, task, split))
        y = torch.arange(n, dtype=torch.int64) % 2
        y = y[torch.randperm(n, generator=g)]
        eps = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
        return (means[y] + noise * eps).float(), y

    x_train, y_train = sample(n_train, "train")
    x_test, y_test = sample(n_test, "test")
    c0, c1 = task_classes("synthetic", task, n_tasks=n_tasks)
    return TaskData(x_train, y_train, x_test, y_test, classes=[f"synthetic-{c0}", f"synthetic-{c1}"])
