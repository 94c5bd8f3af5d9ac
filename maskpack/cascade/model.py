"""The cascade module: dispatcher, router and experts as one fixed function of stored tensors.

Importable on the loading path: no scikit-learn and no trainer here (:mod:`.fit` fits the router
and the combination; :mod:`.train` trains the masks).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..model import TaskModel
from .combine import Combination

MODES = ("unconditional", "conditional")


class CascadeModel(nn.Module):
    """Embeds images with a dispatcher, a router and K experts.

    Args:
        dispatcher: the dispatcher's :class:`TaskModel` (eval mode, baked weights).
        experts: K expert :class:`TaskModel` s.
        router: tensors ``pca_mean`` (F,), ``pca_components`` (P, F), ``gmm_means`` (K, P),
            ``gmm_precisions_cholesky`` (K, P, P), ``gmm_weights`` (K,), in their stored dtype
            (float16, float32 or float64); routing computes in float64 from the stored values.
        combine: per mode, the combination's tensors (:mod:`.combine`; none for ``l2``).
        mode: the default mode of :meth:`forward`.
        combine_kind: the combination, one of :data:`maskpack.cascade.combine.KINDS`.

    Forward: ``(N, 3, H, W)`` normalised images -> ``(N, W)`` embeddings. The module does no
    training-time work: everything is a fixed function of the stored tensors, so a cascade
    saved and loaded gives ``torch.equal`` embeddings.
    """

    def __init__(self, dispatcher: TaskModel, experts: list[TaskModel], router: dict[str, torch.Tensor],
                 combine: dict[str, dict[str, torch.Tensor]], mode: str | None = None,
                 combine_kind: str = "pca"):
        super().__init__()
        self.dispatcher = dispatcher.eval()
        self.experts = nn.ModuleList(e.eval() for e in experts)
        self.router_dtype = next(iter(router.values())).dtype if router else torch.float64
        self.router = {k: v.detach().to(torch.float64) for k, v in router.items()}
        self.combine_kind = combine_kind
        self.combine_params = {m: {k: v.detach() for k, v in p.items()} for m, p in combine.items()}
        # float32 copies of the stored tensors (exact for float16 input)
        basis = (self.router["pca_mean"], self.router["pca_components"]) if router else None
        self._proj = {m: Combination(combine_kind, p, len(experts) + 1, basis)
                      for m, p in self.combine_params.items()}
        prec = self.router["gmm_precisions_cholesky"]  # (K, P, P)
        self._log_det = torch.log(torch.diagonal(prec, dim1=1, dim2=2)).sum(1)  # (K,)
        self._mu_prec = torch.einsum("kp,kpq->kq", self.router["gmm_means"], prec)  # (K, P)
        self.mode = mode or next(iter(self.combine_params), "unconditional")
        self.requires_grad_(False)

    def _apply(self, fn, recurse=True):
        # Router and projection tensors are plain dicts (fixed dtypes: float64 routing); follow the
        # dispatcher's device on .to()/.cuda() but never change their dtype.
        super()._apply(fn, recurse)
        dev = next(self.dispatcher.parameters()).device
        self.router = {k: v.to(dev) for k, v in self.router.items()}
        self._proj = {m: p.to(dev) for m, p in self._proj.items()}
        self._log_det, self._mu_prec = self._log_det.to(dev), self._mu_prec.to(dev)
        return self

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.combine_params)

    @property
    def feature_dim(self) -> int:
        """Width of the dispatcher's (and each expert's) features."""
        return int(self.router["pca_mean"].numel())

    def embed_dim(self, mode: str | None = None) -> int:
        """Width of the embedding of ``mode``."""
        return self._proj[self._mode(mode)].width((self.num_experts + 1) * self.feature_dim)

    def _mode(self, mode: str | None) -> str:
        mode = mode or self.mode
        if mode not in self.combine_params:
            raise ConfigError(f"this cascade has no {mode!r} combination; it has {list(self.combine_params)}")
        return mode

    # -- routing -------------------------------------------------------------------------------

    @torch.no_grad()
    def route_features(self, d: torch.Tensor) -> torch.Tensor:
        """Cluster index (N,) int64 of dispatcher features ``d`` (N, F): the GMM's argmax."""
        r = self.router
        y = (d.to(torch.float64) - r["pca_mean"]) @ r["pca_components"].t()  # (N, P)
        z = torch.einsum("np,kpq->nkq", y, r["gmm_precisions_cholesky"]) - self._mu_prec  # (N, K, P)
        p = y.shape[1]
        log_prob = -0.5 * (p * math.log(2 * math.pi) + (z * z).sum(2)) + self._log_det  # (N, K)
        return (log_prob + torch.log(r["gmm_weights"])).argmax(1)

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster index (N,) of images ``x`` (one dispatcher pass)."""
        return self.route_features(self.dispatcher.features(x).float())

    # -- combination ---------------------------------------------------------------------------

    @torch.no_grad()
    def combine(self, blocks: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """The combination of concatenated blocks ``(N, (K+1)*F)`` -> ``(N, W)``."""
        return self._proj[self._mode(mode)](blocks)

    @staticmethod
    def conditional_blocks(blocks: list[torch.Tensor], routes: torch.Tensor) -> torch.Tensor:
        """``[D, E1..EK]`` with every expert block zeroed except the routed one: (N, (K+1)*F)."""
        d, experts = blocks[0], blocks[1:]
        out = [d] + [torch.where((routes == k)[:, None], e, torch.zeros_like(e))
                     for k, e in enumerate(experts)]
        return torch.cat(out, 1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        mode = self._mode(mode)
        d = self.dispatcher.features(x).float()  # (N, F)
        if mode == "unconditional":  # K + 1 passes
            blocks = torch.cat([d] + [e.features(x).float() for e in self.experts], 1)
            return self.combine(blocks, mode)
        routes = self.route_features(d)  # conditional: 2 passes, each image through its expert only
        blocks = [d] + [torch.zeros_like(d) for _ in self.experts]
        for k, expert in enumerate(self.experts):
            sel = (routes == k).nonzero().flatten()
            if sel.numel():
                blocks[k + 1] = blocks[k + 1].index_copy(0, sel, expert.features(x[sel]).float())
        return self.combine(torch.cat(blocks, 1), mode)
