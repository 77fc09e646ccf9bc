"""Function feature learning (§3.3).

Each network at chain index l is represented by x = vec(G_l) (aligned) or by vec(W_l) (the
unaligned baseline). A linear map Θ projects x to one score per training task and is learned with
cross-entropy over the task labels (paper: SGD, batch 1, lr 1e-3, momentum 0.9, lr/10 after 6
epochs). Similarity of two networks = cosine of their projected vectors.

**Kernel form.** vec(G) has d² entries (9.4 M for MLP chain 1, 3.9e8 for CNN chain 4), so we never
store it. Start Θ at zero (we do; the paper does not say): every SGD step — with momentum and
weight decay too — adds multiples of training vectors x_i to Θ, so Θ = A X stays in their span and
Θ x = A (X x) = A k(x), where k holds the inner products ⟨x_i, x⟩. For chains these are
⟨G_i, G⟩ = ‖C_iᵀ C‖²_F (:func:`ffl.chain.gram_inner`). Training updates the coefficients A instead
of Θ: the iterates are exactly those of SGD on Θ (``tests/test_features.py`` checks this against
``torch.optim.SGD`` on explicit features).

**Normalization.** With ``normalize=True`` (default) each x is scaled to unit L2 norm first, i.e.
the kernel is the cosine ⟨x_i, x_j⟩ / (‖x_i‖ ‖x_j‖). Raw Gram magnitudes differ by orders of
magnitude between chain indices, and one learning rate must serve all of them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ffl.chain import chain_factors, layer_features

# Largest block of explicit vectors formed at once (in floats), to bound memory.
_BLOCK_FLOATS = 2**26


@dataclass
class Representation:
    """N networks at one index: explicit ``vectors`` (N, D), chain ``factors`` (N, d, n) with
    x_i = vec(C_i C_iᵀ), or their precomputed float64 ``inner`` products (N, N) with the feature
    dimension ``inner_dim`` (as :func:`ffl.kernels.streamed_inner` computes them from a zoo on
    disk). Exactly one of the three is set."""

    vectors: torch.Tensor | None = None
    factors: torch.Tensor | None = None
    inner_products: torch.Tensor | None = None
    inner_dim: int | None = None
    _inner: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.vectors, self.factors, self.inner_products)]
        if sum(given) != 1:
            raise ValueError("give exactly one of vectors, factors or inner_products")
        if self.inner_products is not None:
            k = self.inner_products
            if k.dim() != 2 or k.shape[0] != k.shape[1]:
                raise ValueError(f"inner_products must be a square matrix, got shape {tuple(k.shape)}")
            if self.inner_dim is None:
                raise ValueError("inner_products need inner_dim (the dimension of the features)")
            self._inner = k.double()

    @classmethod
    def of_kernel(cls, inner: torch.Tensor, shape: tuple[int, ...]) -> "Representation":
        """The kernel of features of ``shape`` per network: chain factors (d, n), x = vec(C Cᵀ) of
        dimension d², or vectors (D,)."""
        return cls(inner_products=inner, inner_dim=shape[0] ** 2 if len(shape) == 2 else shape[0])

    def __len__(self) -> int:
        for data in (self.vectors, self.factors, self.inner_products):
            if data is not None:
                return data.shape[0]
        raise AssertionError("unreachable")

    @property
    def dim(self) -> int:
        """Dimension of x (d² for chain Grams, never formed)."""
        if self.inner_products is not None:
            return int(self.inner_dim)
        if self.vectors is not None:
            return self.vectors.shape[1]
        return self.factors.shape[1] ** 2

    def inner(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Raw inner products ⟨x_i, x_j⟩ for i in ``rows``, j in ``cols`` (float64).

        The full N × N matrix is computed once (both protocols need nearly all of it) and cached.
        """
        # one gather of the block: indexing rows, then columns, would copy len(rows) × N first
        return self._all_inner()[rows[:, None], cols]

    def _all_inner(self) -> torch.Tensor:
        if self._inner is None:
            if self.vectors is not None:
                v = self.vectors.double()
                self._inner = v @ v.T
            else:
                self._inner = _gram_inner_matrix(self.factors)
        return self._inner

    def squared_norms(self) -> torch.Tensor:
        """‖x_i‖² for all networks: the diagonal of the cached inner products."""
        return self._all_inner().diagonal().clone()

    def kernel(self, rows: torch.Tensor, cols: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """Kernel block K[rows, cols]; cosine-normalized when ``normalize``."""
        k = self.inner(rows, cols)
        if normalize:
            norms = self.squared_norms().sqrt().clamp_min(1e-300)
            k = k / norms[rows, None] / norms[None, cols]
        return k


def _gram_inner_matrix(c: torch.Tensor) -> torch.Tensor:
    """Symmetric matrix of ⟨G_i, G_j⟩ for a factor stack c (N, d, n), the cheaper of two ways.

    Implicit: ‖C_iᵀ C_j‖², N²/2 · d·n² flops. Explicit: form the Grams in blocks, N·d²·n + N²/2 · d²
    flops. Both exact; products in float32, sums of squares in float64.
    """
    num, d, n = c.shape
    out = torch.empty(num, num, dtype=torch.float64)
    implicit_flops = num * num * d * n * n
    explicit_flops = num * d * d * n + num * num * d * d
    if implicit_flops <= explicit_flops or d * d > _BLOCK_FLOATS:  # explicit also needs a G in memory
        for i in range(num):
            row = (c[i].T @ c[i:]).double().square().sum(dim=(-1, -2))
            out[i, i:] = row
            out[i:, i] = row
        return out
    step = max(1, _BLOCK_FLOATS // (d * d))

    def grams(j: int) -> torch.Tensor:  # vec(G) of networks j … j+step-1
        return (c[j : j + step] @ c[j : j + step].transpose(1, 2)).flatten(1).double()

    # Keep every block when they all fit (formed once); else form column blocks again per row block.
    kept = {j: grams(j) for j in range(0, num, step)} if num * d * d <= 4 * _BLOCK_FLOATS else {}
    for i in range(0, num, step):
        ga = kept[i] if kept else grams(i)
        for j in range(i, num, step):
            gb = kept[j] if kept else grams(j)
            block = ga @ gb.T
            out[i : i + step, j : j + step] = block
            out[j : j + step, i : i + step] = block.T
    return out


@dataclass
class FeatureConfig:
    """Which weights stand for a network (§3.2–3.3 and the unaligned baseline of §4).

    Defaults are the paper's and, where it is silent, the official code's:

    * ``chain_normalize``: unit-norm rows of every layer matrix in chains of length ≥ 2 (the
      paper's "we normalize the weights of each layer in MLP"; the official MLP chain does so);
    * ``fold_bn``: fold eval-mode BatchNorm scales into the kernels (ours); ``False`` = the raw
      kernels, as the official CNN chains and CNN baseline take them;
    * ``resnet_skips``: ResNet-5's projection shortcuts enter its chains as layer-matrix terms
      (ours); ``False`` = the 3×3 kernels only, as the official chain takes them;
    * ``gru_lags``: lags of the GRU chain; 0 = the official GRU feature W_ih^{(1)ᵀ} only;
    * ``layer_normalize``: unit-norm rows (each input's outgoing weights) of every layer matrix in
      the unaligned baseline, as the official MLP baseline does;
    * ``gru_recurrent``: the GRU baseline takes [W_ih | W_hh] per layer (ours); ``False`` = W_ih only,
      the official baseline (its layer 1 is the first layer's input weights);
    * ``channel_normalize``: every conv output channel's kernel at unit L2 norm, in chains and
      layers alike (ours, CNNs; BatchNorm makes the function blind to that scale);
    * ``max_index``: only indices 1 … ``max_index`` (None: all). §4.4's Figures 4–5 show 1–3, and
      PlainNet-6's chain 5 would have 27·9⁴ rows.
    """

    chain_normalize: bool = False
    fold_bn: bool = True
    resnet_skips: bool = True
    gru_lags: int = 1
    layer_normalize: bool = False
    gru_recurrent: bool = True
    channel_normalize: bool = False
    max_index: int | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "FeatureConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown feature settings {sorted(unknown)}; "
                             f"choose from {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def of(self, model: nn.Module, kind: str, upto: int | None = None) -> list[torch.Tensor]:
        """``model``'s features at indices 1 … ``upto`` (default ``max_index``; None: all), with
        these options: chain factors C_l (``kind="chain"``) or flattened layer weights
        (``kind="layer"``)."""
        upto = self.max_index if upto is None else upto
        if kind == "chain":
            return chain_factors(model, normalize=self.chain_normalize, fold_bn=self.fold_bn, skips=self.resnet_skips,
                                 gru_lags=self.gru_lags, upto=upto, channel_normalize=self.channel_normalize)
        if kind == "layer":
            return layer_features(model, fold_bn=self.fold_bn, normalize=self.layer_normalize,
                                  gru_recurrent=self.gru_recurrent, channel_normalize=self.channel_normalize)[:upto]
        raise ValueError(f"unknown feature kind {kind!r}; choose 'chain' or 'layer'")


def zoo_representations(
    models: Sequence[nn.Module], kind: str, features: FeatureConfig | None = None
) -> list[Representation]:
    """One :class:`Representation` per index for a list of same-architecture networks.

    ``kind="chain"``: aligned chain Grams G_1 … G_L (kept as factors C_l);
    ``kind="layer"``: the unaligned per-layer weights W_1 … W_L. ``features`` chooses the options.
    """
    per_model = [(features or FeatureConfig()).of(m, kind) for m in models]
    make = (lambda x: Representation(factors=x)) if kind == "chain" else (lambda x: Representation(vectors=x))
    return [make(torch.stack([p[l] for p in per_model])) for l in range(len(per_model[0]))]


@dataclass
class ProjectionConfig:
    """Training of Θ (§3.3). Defaults are the paper's: SGD, batch 1, lr 1e-3, momentum 0.9,
    lr/10 after 6 epochs (we train 10 epochs in all).

    ``normalize``: each x at unit L2 norm (cosine kernel). ``center`` (ours; the paper is silent):
    subtract the training networks' mean feature μ before Θ, i.e. Θ reads x − μ (a centred kernel).
    A component shared by every network then no longer dominates each SGD step (see the CNN-gap
    chapter); Θ's function class is the same (its bias absorbs Θμ)."""

    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 10
    lr_step_epochs: tuple[int, ...] = (6,)
    lr_gamma: float = 0.1
    batch_size: int = 1
    normalize: bool = True
    center: bool = False
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict | None) -> "ProjectionConfig":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown projection settings {sorted(unknown)}")
        if "lr_step_epochs" in d:
            d["lr_step_epochs"] = tuple(d["lr_step_epochs"])
        return cls(**d)


def _centered(k: torch.Tensor, train_means: torch.Tensor, grand_mean: float) -> torch.Tensor:
    """⟨x_i − μ, x − μ⟩ from k = ⟨x_i, x⟩ (rows i: the training networks whose mean is μ):
    k − (column means) − (row means of the training kernel) + (its grand mean)."""
    return k - k.mean(dim=0, keepdim=True) - train_means[:, None] + grand_mean


@dataclass
class Projection:
    """A learned Θ in kernel form: scores(x) = coef · k(x) + bias, k(x)_i = ⟨x_i, x⟩ (centred:
    ⟨x_i − μ, x − μ⟩). ``train_top1`` and ``train_loss``: Θ's accuracy and mean cross-entropy on
    the networks it was learned from, after the last epoch (how far its SGD got)."""

    coef: torch.Tensor  # (T, N_train)
    bias: torch.Tensor  # (T,)
    train_index: torch.Tensor  # rows of the Representation that span Θ
    normalize: bool
    center: tuple[torch.Tensor, float] | None = None  # training kernel's row means and grand mean
    train_top1: float = float("nan")
    train_loss: float = float("nan")

    def kernel(self, rep: Representation, index: torch.Tensor) -> torch.Tensor:
        """k(x) for the networks ``index`` of ``rep``: (N_train, len(index))."""
        k = rep.kernel(self.train_index, index, normalize=self.normalize)
        return k if self.center is None else _centered(k, *self.center)

    def project(self, rep: Representation, index: torch.Tensor) -> torch.Tensor:
        """Projected vectors (len(index), T) of the networks ``index`` of ``rep``."""
        return (self.coef @ self.kernel(rep, index)).T + self.bias


def sgd_schedule(n: int, cfg: ProjectionConfig) -> tuple[list[list[torch.Tensor]], list[float]]:
    """Per epoch, the minibatches of training networks (a ``torch.Generator`` seeded with
    ``cfg.seed`` shuffles each epoch) and the learning rate (``MultiStepLR``'s schedule)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    batches, lrs, lr = [], [], cfg.lr
    for epoch in range(cfg.epochs):
        if epoch in cfg.lr_step_epochs:
            lr *= cfg.lr_gamma
        order = torch.randperm(n, generator=gen)
        batches.append([order[s : s + cfg.batch_size] for s in range(0, n, cfg.batch_size)])
        lrs.append(lr)
    return batches, lrs


def fit_projection(
    rep: Representation,
    train_index: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: ProjectionConfig | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> Projection:
    """Learn Θ with cross-entropy over task ``labels`` by SGD, in kernel form (see module doc).

    Reproduces ``torch.optim.SGD`` (momentum, weight decay, step schedule) on a zero-initialized
    ``nn.Linear`` exactly, minibatches drawn by a ``torch.Generator`` seeded with ``config.seed``.
    Without weight decay the steps are taken in blocks (:func:`_sgd_blocked`, the same iterates
    up to rounding); with it, one step at a time (:func:`_sgd_stepwise`).
    """
    cfg = config or ProjectionConfig()
    n = len(train_index)
    if labels.shape != (n,):
        raise ValueError(f"need one label per training network: {n} networks, labels {tuple(labels.shape)}")
    k = rep.kernel(train_index, train_index, normalize=cfg.normalize)  # (N, N)
    center = None
    if cfg.center:
        center = (k.mean(dim=1), float(k.mean()))
        k = _centered(k, *center)
    onehot = nn.functional.one_hot(labels, num_classes).double()
    batches, lrs = sgd_schedule(n, cfg)
    fit = _sgd_stepwise if cfg.weight_decay else _sgd_blocked
    coef, bias = fit(k, onehot, batches, lrs, cfg, progress)
    scores = (coef @ k).T + bias
    return Projection(coef=coef, bias=bias, train_index=train_index, normalize=cfg.normalize, center=center,
                      train_top1=float((scores.argmax(dim=1) == labels).double().mean()),
                      train_loss=float(nn.functional.cross_entropy(scores, labels)))


def _sgd_stepwise(k: torch.Tensor, onehot: torch.Tensor, batches: list[list[torch.Tensor]], lrs: list[float],
                  cfg: ProjectionConfig, progress: Callable[[int], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel-form SGD one minibatch at a time: coefficients (T, N) and bias (T,)."""
    num_classes, n = onehot.shape[1], k.shape[0]
    coef = torch.zeros(num_classes, n, dtype=torch.float64)
    bias = torch.zeros(num_classes, dtype=torch.float64)
    coef_buf, bias_buf = torch.zeros_like(coef), torch.zeros_like(bias)
    for epoch, (epoch_batches, lr) in enumerate(zip(batches, lrs)):
        for batch in epoch_batches:
            scores = (coef @ k[:, batch]).T + bias
            resid = (scores.softmax(dim=1) - onehot[batch]) / len(batch)  # d(mean CE)/d(scores)
            grad_coef = torch.zeros_like(coef)
            grad_coef.index_add_(1, batch, resid.T)
            grad_bias = resid.sum(dim=0)
            if cfg.weight_decay:
                grad_coef += cfg.weight_decay * coef
                grad_bias = grad_bias + cfg.weight_decay * bias
            coef_buf.mul_(cfg.momentum).add_(grad_coef)  # a zero buffer makes the first step torch's
            bias_buf.mul_(cfg.momentum).add_(grad_bias)
            coef -= lr * coef_buf
            bias -= lr * bias_buf
        if progress is not None:
            progress(epoch)
    return coef, bias


#: minibatch points per block of :func:`_sgd_blocked`
SGD_BLOCK_POINTS = 256


def _sgd_blocked(k: torch.Tensor, onehot: torch.Tensor, batches: list[list[torch.Tensor]], lrs: list[float],
                 cfg: ProjectionConfig, progress: Callable[[int], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel-form SGD with momentum μ and no weight decay, m steps at a time.

    A step's gradient touches only its batch's coefficient columns and the bias, so over steps
    1 … m of one learning rate, from coefficients A₀, bias b₀ and momentum buffers V₀, v₀,
        A_t = A₀ − lr (a_t V₀ + Σ_{s≤t} c_{t−s} g_s),   V_m = μ^m V₀ + Σ_s μ^{m−s} g_s,
    with a_t = μ + … + μ^t and c_j = 1 + μ + … + μ^j (the bias alike, its gradient Σ r_s). Scores
    of step t's points P therefore need A₀ K[:, P] and V₀ K[:, P] (two GEMMs per block) plus the
    residuals r_s of the block's earlier steps weighted by c_{t−1−s} (K[s, P] + 1): the sequential
    part is m small steps on T × m numbers instead of m passes over T × N coefficients.
    """
    mu = cfg.momentum
    k_t = k.T.contiguous().numpy()  # row i = column i of K: a block's columns are rows here
    y = onehot.numpy()
    num_classes, n = y.shape[1], k_t.shape[0]
    coef = np.zeros((n, num_classes))  # coefficients transposed: row i is training network i's
    bias = np.zeros(num_classes)
    coef_buf, bias_buf = np.zeros_like(coef), np.zeros_like(bias)
    per_block = max(1, SGD_BLOCK_POINTS // cfg.batch_size)
    for epoch, (epoch_batches, lr) in enumerate(zip(batches, lrs)):
        for b0 in range(0, len(epoch_batches), per_block):
            steps = epoch_batches[b0 : b0 + per_block]
            m = len(steps)
            sizes = [len(s) for s in steps]
            bounds = np.cumsum([0, *sizes]).tolist()
            pts = torch.cat(steps).numpy()
            step_of = np.repeat(np.arange(m), sizes)  # 0-based step of each point
            inv_size = 1.0 / np.repeat(np.asarray(sizes, dtype=np.float64), sizes)[:, None]
            powers = mu ** np.arange(m + 1)
            a = np.concatenate([[0.0], np.cumsum(powers[1:])])  # a_t = μ + … + μ^t
            c = np.cumsum(powers)  # c_j = 1 + … + μ^j
            k_cols = k_t[pts]  # K[:, P]ᵀ
            start = k_cols @ np.concatenate([coef, coef_buf], axis=1)
            start = start[:, :num_classes] + bias - lr * a[step_of][:, None] * (start[:, num_classes:] + bias_buf)
            lag = step_of[:, None] - 1 - step_of[None, :]  # (later point, earlier point)
            weight = np.where(lag >= 0, c[np.clip(lag, 0, None)], 0.0) * (k_cols[:, pts] + 1.0)
            y_block = y[pts]
            resid = np.zeros((len(pts), num_classes))
            for t in range(m):
                first, last = bounds[t], bounds[t + 1]
                s = start[first:last] - lr * (weight[first:last, :first] @ resid[:first])
                s = np.exp(s - s.max(axis=1, keepdims=True))
                resid[first:last] = (s / s.sum(axis=1, keepdims=True) - y_block[first:last]) * inv_size[first:last]
            after = m - 1 - step_of  # steps after each point's own, within the block
            coef -= lr * a[m] * coef_buf
            coef[pts] -= lr * c[after][:, None] * resid
            bias -= lr * (a[m] * bias_buf + (c[after][:, None] * resid).sum(axis=0))
            coef_buf *= powers[m]
            coef_buf[pts] += powers[after][:, None] * resid
            bias_buf = powers[m] * bias_buf + (powers[after][:, None] * resid).sum(axis=0)
        if progress is not None:
            progress(epoch)
    return torch.from_numpy(coef.T.copy()), torch.from_numpy(bias)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products of L2-normalized rows: (len(a), len(b))."""
    a = nn.functional.normalize(a, dim=1)
    b = nn.functional.normalize(b, dim=1)
    return a @ b.T
