"""Fitting a cascade's router (PCA + Gaussian mixture) and combination (whitened PCA) with scikit-learn."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError, DataError


def fit_router(features: torch.Tensor, *, n_experts: int = 5, dim: int = 20,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """PCA to ``dim`` dimensions + a ``n_experts``-way full-covariance Gaussian mixture.

    Args:
        features: dispatcher features of the training set (N, F).
        n_experts: mixture components (clusters).
        dim: PCA dimensions (capped at ``min(N - 1, F)``).
        seed: the mixture's ``random_state`` (PCA uses the exact, deterministic solver).

    Returns:
        The router tensors of :class:`CascadeModel` (float64).
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    x = features.detach().to(torch.float64).numpy()
    n, f = x.shape
    if n_experts < 1:
        raise ConfigError(f"a cascade needs at least one expert, got {n_experts}")
    if n < 2 * n_experts:
        raise DataError(f"{n} training images cannot be split into {n_experts} clusters: use fewer experts")
    dim = max(1, min(dim, n - 1, f))
    pca = PCA(n_components=dim, svd_solver="full").fit(x)
    out = {"pca_mean": torch.from_numpy(pca.mean_.copy()),
           "pca_components": torch.from_numpy(pca.components_.copy())}
    y = (torch.from_numpy(x) - out["pca_mean"]) @ out["pca_components"].t()  # the torch projection
    gmm = GaussianMixture(n_components=n_experts, covariance_type="full", random_state=seed,
                          max_iter=200, reg_covar=1e-6).fit(y.numpy())
    out.update(gmm_means=torch.from_numpy(gmm.means_.copy()),
               gmm_precisions_cholesky=torch.from_numpy(gmm.precisions_cholesky_.copy()),
               gmm_weights=torch.from_numpy(gmm.weights_.copy()))
    return out


def fit_combination(blocks: torch.Tensor, *, width: int, seed: int = 0,
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Whitened PCA of training embeddings ``blocks`` (N, C) to ``width`` dimensions.

    The width is capped at the data's rank (``N - 1``) and components with a variance below
    1e-9 of the largest are dropped (whitening would divide by ~0). ``components`` are stored
    in ``dtype`` (float16 halves the file; the cascade always uses the stored values).
    """
    from sklearn.decomposition import PCA

    x = blocks.detach().to(torch.float64).numpy()
    n, c = x.shape
    width = max(1, min(width, n - 1, c))
    pca = PCA(n_components=width, whiten=True, svd_solver="auto", random_state=seed).fit(x)
    var = pca.explained_variance_
    keep = int(np.count_nonzero(var > var[0] * 1e-9)) if var.size and var[0] > 0 else 0
    if keep == 0:
        raise DataError("the training embeddings have no variance: cannot fit the combination PCA")
    return {"mean": torch.from_numpy(pca.mean_.astype(np.float32)),
            "components": torch.from_numpy(pca.components_[:keep].copy()).to(dtype),
            "scale": torch.from_numpy((1.0 / np.sqrt(var[:keep])).astype(np.float32))}
