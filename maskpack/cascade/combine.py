"""Combinations: how a cascade turns its K + 1 feature blocks into one embedding.

Each kind is a fixed function of the concatenated blocks ``x`` (N, C), C = (K + 1) * F, and of
the tensors stored for it (``combine/<mode>/<name>`` in the file); the stored tensors define the
embedding exactly, so a saved and loaded cascade gives ``torch.equal`` embeddings.

* ``l2``: every block L2-normalised, then concatenated (C wide). Nothing stored.
* ``standardize``: ``(x - mean) * scale`` per dimension (C wide); ``mean``, ``scale`` (C,).
* ``subspace``: every block projected onto the router's PCA basis (``(b - pca_mean) @
  pca_components.T``, P dimensions; an all-zero block, as in the conditional mode, stays zero),
  concatenated (C = (K + 1) * P) and ZCA-whitened: ``(z - mean) @ M`` (C wide) with M the
  symmetric (C, C) whitening matrix; ``mean`` (C,), ``whiten`` (C(C+1)/2,): M's upper triangle,
  row-major, diagonal included. The basis is the router's, already in the file. (ZCA is PCA
  whitening rotated back: cosine k-NN and an L2-regularised probe see the same geometry, and a
  symmetric matrix stores in half the bytes.)
* ``pca``: a whitened PCA, ``((x - mean) @ components.T) * scale`` (W wide); ``mean`` (C,),
  ``components`` (W, C), ``scale`` (W,). The dense one of version-1 files.

Importable on the loading path (no scikit-learn): :mod:`.fit` fits the parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError

#: tensors each kind stores, per mode
KINDS: dict[str, tuple[str, ...]] = {
    "l2": (),
    "standardize": ("mean", "scale"),
    "subspace": ("mean", "whiten"),
    "pca": ("mean", "components", "scale"),
}
DEFAULT_KIND = "subspace"
#: stored dtypes accepted for the floating-point combination tensors
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def check_kind(kind: str) -> str:
    """``kind`` itself, or ConfigError naming the known kinds."""
    if kind not in KINDS:
        raise ConfigError(f"unknown combination {kind!r}: use one of {', '.join(KINDS)}")
    return kind


def shape_error(kind: str, params: dict[str, torch.Tensor], n_blocks: int, width: int,
                basis_dim: int = 0) -> str | None:
    """What is wrong with ``params`` for ``kind`` over ``n_blocks`` blocks of ``width`` (``subspace``:
    of the router's ``basis_dim`` dimensions), or None."""
    need = set(KINDS[kind])
    if set(params) != need:
        return f"needs tensors {sorted(need)}, got {sorted(params)}"
    c = n_blocks * (basis_dim if kind == "subspace" else width)
    if kind == "standardize":
        if params["mean"].shape != (c,) or params["scale"].shape != (c,):
            return f"mean and scale must have shape ({c},)"
    elif kind == "subspace":
        if params["mean"].shape != (c,) or params["whiten"].shape != (c * (c + 1) // 2,):
            return f"mean must have shape ({c},) and whiten ({c * (c + 1) // 2},)"
    elif kind == "pca":
        comp = params["components"].shape
        if (params["mean"].shape != (c,) or len(comp) != 2 or comp[1] != c
                or params["scale"].shape != (comp[0],)):
            return "has inconsistent shapes"
    if any(not t.is_floating_point() for t in params.values()):
        return "tensors must be floating point"
    return None


class Combination:
    """One mode's combination as a callable: ``(N, C)`` blocks -> ``(N, W)`` embeddings (float32).

    Args:
        kind: one of :data:`KINDS`.
        params: the stored tensors (any float dtype; computed in float32).
        n_blocks: K + 1.
        basis: ``subspace`` only: the router's ``(pca_mean (F,), pca_components (P, F))``.
    """

    def __init__(self, kind: str, params: dict[str, torch.Tensor], n_blocks: int,
                 basis: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.kind = check_kind(kind)
        self.n_blocks = n_blocks
        self.t = {k: v.detach().float() for k, v in params.items()}
        if kind == "pca":  # (C, W), contiguous for the matmul
            self.t["components"] = self.t["components"].t().contiguous()
        if kind == "subspace":
            c = self.t["mean"].numel()
            rows, cols = torch.triu_indices(c, c)
            m = torch.zeros(c, c)
            m[rows, cols] = self.t["whiten"]
            m[cols, rows] = self.t["whiten"]
            self.t["whiten"] = m
            if basis is None:
                raise ConfigError("the subspace combination needs the router's PCA basis")
            self.t["basis_mean"] = basis[0].detach().float()
            self.t["basis_t"] = basis[1].detach().float().t().contiguous()  # (F, P)

    def to(self, device) -> Combination:
        self.t = {k: v.to(device) for k, v in self.t.items()}
        return self

    def width(self, c: int) -> int:
        """Output width for ``c`` input columns."""
        if self.kind == "subspace":
            return int(self.t["mean"].numel())
        return int(self.t["components"].shape[1]) if self.kind == "pca" else c

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``subspace``: each block on the router's basis, all-zero blocks kept zero: (N, (K+1)P)."""
        t = self.t
        out = []
        for b in x.float().chunk(self.n_blocks, 1):
            z = (b - t["basis_mean"]) @ t["basis_t"]
            out.append(torch.where((b != 0).any(1, keepdim=True), z, torch.zeros_like(z)))
        return torch.cat(out, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        t = self.t
        if self.kind == "l2":
            return torch.cat([F.normalize(b, dim=1) for b in x.chunk(self.n_blocks, 1)], 1)
        if self.kind == "standardize":
            return (x - t["mean"]) * t["scale"]
        if self.kind == "subspace":
            return (self.project(x) - t["mean"]) @ t["whiten"]
        return ((x - t["mean"]) @ t["components"]) * t["scale"]
