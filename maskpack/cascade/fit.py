"""Fitting a cascade's router (PCA + Gaussian mixture) and combination (:mod:`.combine`) with scikit-learn."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..extras import round_mantissa
from .combine import DTYPES, check_kind

ROUTER_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
# Mantissa bits kept in the router's PCA basis and the combination's matrix by default (None: all):
# on the documented digits cascade 2 bits halve the router's stored bytes and keep the k-NN gain
# (docs/results/cascade-v2.md).
MANTISSA_BITS: int | None = 2


def _stored(t: np.ndarray, dtype: torch.dtype, name: str, bits: int | None = None) -> torch.Tensor:
    """``t`` rounded to ``bits`` mantissa bits (None: all of ``dtype``'s) and to the stored
    ``dtype`` (an error when it does not fit)."""
    x = torch.from_numpy(np.ascontiguousarray(t))
    out = (x if bits is None else round_mantissa(x, bits)).to(dtype)
    if not torch.isfinite(out).all():
        raise DataError(f"cascade tensor {name!r} does not fit {dtype} (overflow): store it in float32 "
                        "(--router-dtype / --combine-dtype float32)")
    return out


def fit_router(features: torch.Tensor, *, n_experts: int = 5, dim: int = 20, seed: int = 0,
               dtype: torch.dtype = torch.float64, bits: int | None = None) -> dict[str, torch.Tensor]:
    """PCA to ``dim`` dimensions + a ``n_experts``-way full-covariance Gaussian mixture.

    The router is stored in ``dtype`` by construction: the PCA is rounded to ``dtype`` (its
    components to ``bits`` mantissa bits when given) before the mixture is fitted on the rounded
    projection, and the mixture's parameters are rounded after, so the returned (stored) tensors
    route the training images exactly as a loaded file does.

    Args:
        features: dispatcher features of the training set (N, F).
        n_experts: mixture components (clusters).
        dim: PCA dimensions (capped at ``min(N - 1, F)``).
        seed: the mixture's ``random_state`` (PCA uses the exact, deterministic solver).
        dtype: stored precision, float16, float32 or float64.
        bits: mantissa bits kept in ``pca_components`` (the largest tensor; float16 has 10), or None.

    Returns:
        The router tensors of :class:`CascadeModel`, in ``dtype``.

    Raises:
        DataError: too few images, or a parameter that overflows ``dtype``.
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
    out = {"pca_mean": _stored(pca.mean_, dtype, "pca_mean"),
           "pca_components": _stored(pca.components_, dtype, "pca_components", bits)}
    # the projection CascadeModel.route_features computes, from the stored values
    y = (torch.from_numpy(x) - out["pca_mean"].double()) @ out["pca_components"].double().t()
    gmm = GaussianMixture(n_components=n_experts, covariance_type="full", random_state=seed,
                          max_iter=200, reg_covar=1e-6).fit(y.numpy())
    out.update(gmm_means=_stored(gmm.means_, dtype, "gmm_means"),
               gmm_precisions_cholesky=_stored(gmm.precisions_cholesky_, dtype, "gmm_precisions_cholesky"),
               gmm_weights=_stored(gmm.weights_, dtype, "gmm_weights"))
    diag = torch.diagonal(out["gmm_precisions_cholesky"], dim1=1, dim2=2)
    if not (diag > 0).all() or not (out["gmm_weights"] > 0).all():
        raise DataError(f"the router's mixture does not fit {dtype} (a precision or weight rounds to 0): "
                        "use --router-dtype float32")
    return out


def fit_combination(blocks: torch.Tensor, *, width: int, seed: int = 0, dtype: torch.dtype = torch.float16,
                    kind: str = "pca", n_blocks: int = 1, router: dict[str, torch.Tensor] | None = None,
                    bits: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of combination ``kind`` (:mod:`.combine`) fitted on training blocks (N, C).

    * ``pca``: a whitened PCA to ``width`` dimensions, capped at the data's rank (``N - 1``);
      components with a variance below 1e-9 of the largest are dropped (whitening would divide
      by ~0). ``components`` are stored in ``dtype``, ``mean`` and ``scale`` in float32.
    * ``standardize``: per-dimension mean and ``1 / std`` (0 for constant dimensions), in ``dtype``.
    * ``subspace``: the blocks projected onto the router's PCA basis (as stored), then a ZCA
      whitening of the top ``width`` principal components: a symmetric matrix, stored as its
      upper triangle (row-major, diagonal included) in ``dtype``, with the mean in ``dtype``.
    * ``l2``: nothing (``{}``).

    The cascade always uses the stored, rounded values, so training and loading agree exactly.

    Args:
        blocks: concatenated training features (N, C), C = ``n_blocks`` * F.
        width: principal components kept by ``pca`` / ``subspace`` (capped at the rank).
        seed: the PCA's ``random_state``.
        dtype: float16 or float32, the stored precision.
        kind: one of :data:`maskpack.cascade.combine.KINDS`.
        n_blocks: K + 1 (for the shape check).
        router: the router's tensors (``subspace`` only).
        bits: mantissa bits kept in the matrix (``whiten`` / ``components``), or None for all.

    Returns:
        ``{name: tensor}`` as stored under ``combine/<mode>/``.
    """
    check_kind(kind)
    if dtype not in DTYPES.values():
        raise ConfigError(f"combination dtype {dtype}: use {', '.join(DTYPES)}")
    if blocks.shape[1] % max(n_blocks, 1):
        raise ConfigError(f"{blocks.shape[1]} columns do not split into {n_blocks} blocks")
    if kind == "l2":
        return {}
    if kind == "standardize":
        x = blocks.detach().to(torch.float64)
        sd = x.std(0)
        if blocks.shape[0] < 2 or not (sd > 0).any():
            raise DataError("the training embeddings have no variance: cannot fit the standardisation")
        scale = torch.where(sd > sd.max() * 1e-6, 1.0 / sd, torch.zeros_like(sd)).to(dtype)
        # a dimension whose 1/std overflows the stored dtype is dropped (scale 0), never inf
        scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
        return {"mean": x.mean(0).to(dtype), "scale": scale}
    if kind == "subspace":
        if router is None:
            raise ConfigError("the subspace combination needs the router's tensors")
        from .combine import Combination

        z = Combination(kind, {"mean": torch.zeros(1), "whiten": torch.zeros(1)}, n_blocks,
                        (router["pca_mean"], router["pca_components"])).project(blocks)
        pca, keep = _whitened_pca(z, width, seed)
        comp = pca.components_[:keep]
        m = comp.T @ (comp / np.sqrt(pca.explained_variance_[:keep])[:, None])  # ZCA: symmetric (C, C)
        rows, cols = np.triu_indices(m.shape[0])
        out = {"mean": torch.from_numpy(pca.mean_).to(dtype),
               "whiten": _stored(m[rows, cols], dtype, "whiten", bits)}
        if not all(torch.isfinite(v).all() for v in out.values()):
            raise DataError(f"the subspace whitening does not fit {dtype}: use --combine-dtype float32")
        return out
    return _fit_pca(blocks, width, seed, dtype, bits)


def _whitened_pca(blocks: torch.Tensor, width: int, seed: int):
    """A fitted scikit-learn PCA (capped at the rank) and how many components to keep (variance
    above 1e-9 of the largest: whitening would divide by ~0)."""
    from sklearn.decomposition import PCA

    x = blocks.detach().to(torch.float64).numpy()
    n, c = x.shape
    width = max(1, min(width, n - 1, c))
    pca = PCA(n_components=width, whiten=True, svd_solver="auto", random_state=seed).fit(x)
    var = pca.explained_variance_
    keep = int(np.count_nonzero(var > var[0] * 1e-9)) if var.size and var[0] > 0 else 0
    if keep == 0:
        raise DataError("the training embeddings have no variance: cannot fit the combination PCA")
    return pca, keep


def _fit_pca(blocks: torch.Tensor, width: int, seed: int, dtype: torch.dtype,
             bits: int | None) -> dict[str, torch.Tensor]:
    pca, keep = _whitened_pca(blocks, width, seed)
    var = pca.explained_variance_
    return {"mean": torch.from_numpy(pca.mean_.astype(np.float32)),
            "components": _stored(pca.components_[:keep], dtype, "components", bits),
            "scale": torch.from_numpy((1.0 / np.sqrt(var[:keep])).astype(np.float32))}
