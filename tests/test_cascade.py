"""Cascade mechanics on tiny data: routing, shapes, storage as XOR deltas, bit-identical loading."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import TinyNet

import maskpack
from maskpack.cascade import (
    FORMAT_VERSION,
    CascadeModel,
    _expert_config,
    fit_combination,
    fit_router,
    is_cascade,
    load_cascade,
    save_cascade,
)
from maskpack.cascade.combine import DEFAULT_KIND, KINDS
from maskpack.cascade.experts import expert_scope, expert_tensors
from maskpack.cli import main
from maskpack.errors import BackboneMismatchError, FormatError
from maskpack.model import TaskModel
from maskpack.rehydrate import rehydrate

K = 3


def _blobs(n_per=40, dim=32, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * 6
    return torch.cat([c + torch.randn(n_per, dim, generator=g) for c in centers])


def _net(seed=0, width=32):
    torch.manual_seed(seed)
    return TinyNet(width).eval()


def _masks(net, p_off=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) >= p_off for n, p in net.named_parameters()
            if n.endswith("weight") and p.ndim > 1}


def _flip(masks, frac, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: m ^ (torch.rand(m.shape, generator=g) < frac) for n, m in masks.items()}


def _extras(net, shift=0.0):
    out = {f"backbone.{n}": t.clone() for n, t in net.state_dict().items() if "running" in n}
    if shift:
        out["backbone.bn1.running_mean"] = out["backbone.bn1.running_mean"] + shift
    return out


@pytest.fixture
def parts():
    """A small cascade over TinyNet with the default combination and a float16 router."""
    return _build(DEFAULT_KIND)


def _build(kind, router_dtype=torch.float16):
    """A small cascade over TinyNet: dispatcher, K experts (1% of bits flipped), router, combination."""
    net = _net()
    d_masks = _masks(net)
    e_masks = [_flip(d_masks, 0.01, seed=k + 1) for k in range(K)]
    d_extras = _extras(net)
    e_extras = [_extras(net, shift=0.5 if k == 0 else 0.0) for k in range(K)]
    x = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    disp = rehydrate(net, d_masks, d_extras)
    experts = [rehydrate(net, m, e) for m, e in zip(e_masks, e_extras, strict=True)]
    d_tr = disp.features(x)
    router = fit_router(d_tr, n_experts=K, dim=4, seed=0, dtype=router_dtype)
    blocks = [d_tr] + [e.features(x) for e in experts]
    routes = CascadeModel(disp, [], router, {}).route_features(d_tr)
    fit = dict(width=16, kind=kind, n_blocks=K + 1, router=router)
    combine = {"unconditional": fit_combination(torch.cat(blocks, 1), **fit),
               "conditional": fit_combination(CascadeModel.conditional_blocks(blocks, routes), **fit)}
    model = CascadeModel(disp, experts, router, combine, combine_kind=kind)
    return dict(net=net, d_masks=d_masks, e_masks=e_masks, d_extras=d_extras, e_extras=e_extras,
                router=router, combine=combine, model=model, x=x, kind=kind)


def _save(parts, path, **kw):
    return save_cascade(path, parts["net"], parts["d_masks"], parts["d_extras"], parts["e_masks"],
                        parts["e_extras"], parts["router"], parts["combine"], combine_kind=parts["kind"],
                        metadata={"dataset": "test"}, **kw)


# ----------------------------------------------------------------------------- router


def test_router_is_deterministic_and_matches_sklearn():
    from sklearn.mixture import GaussianMixture

    feats = _blobs()
    a = fit_router(feats, n_experts=K, dim=5, seed=3)
    b = fit_router(feats, n_experts=K, dim=5, seed=3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["pca_components"].shape == (5, 32) and a["gmm_precisions_cholesky"].shape == (K, 5, 5)
    model = CascadeModel(TaskModel(torch.nn.Identity()), [], a, {})
    routes = model.route_features(feats)
    assert torch.equal(routes, model.route_features(feats))
    assert sorted(torch.bincount(routes, minlength=K).tolist()) == [40, 40, 40]  # the three blobs
    # the torch re-implementation predicts what scikit-learn's fitted mixture predicts
    y = (feats.double() - a["pca_mean"]) @ a["pca_components"].t()
    gmm = GaussianMixture(K, covariance_type="full", random_state=3, max_iter=200, reg_covar=1e-6)
    gmm.fit(y.numpy())
    assert torch.equal(routes, torch.from_numpy(gmm.predict(y.numpy())).long())


def test_float16_router_routes_from_its_stored_values():
    """Rounded by construction: the stored float16 parameters are what scikit-learn's mixture
    predicts with, and what the training routes come from."""
    from sklearn.mixture import GaussianMixture

    feats = _blobs()
    r16 = fit_router(feats, n_experts=K, dim=5, seed=3, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in r16.values())
    routes = CascadeModel(TaskModel(torch.nn.Identity()), [], r16, {}).route_features(feats)
    # scikit-learn's predict with exactly the stored (rounded) parameters
    y = (feats.double() - r16["pca_mean"].double()) @ r16["pca_components"].double().t()
    gmm = GaussianMixture(K, covariance_type="full")
    gmm.means_ = r16["gmm_means"].double().numpy()
    gmm.precisions_cholesky_ = r16["gmm_precisions_cholesky"].double().numpy()
    gmm.weights_ = r16["gmm_weights"].double().numpy()
    gmm.covariance_type = "full"
    assert torch.equal(routes, torch.from_numpy(gmm.predict(y.numpy())).long())
    # and it finds the same three blobs as the float64 router
    r64 = fit_router(feats, n_experts=K, dim=5, seed=3)
    routes64 = CascadeModel(TaskModel(torch.nn.Identity()), [], r64, {}).route_features(feats)
    pairs = set(zip(routes.tolist(), routes64.tolist(), strict=True))
    assert len(pairs) == K and sorted(torch.bincount(routes, minlength=K).tolist()) == [40, 40, 40]


def _low_bits(t: torch.Tensor, bits: int) -> torch.Tensor:
    """The float16 mantissa bits below the first ``bits`` of each normal value (subnormals: 0)."""
    h = t.to(torch.float16)
    return torch.where(h.abs() >= 2.0 ** -14, h.view(torch.int16) & ((1 << (10 - bits)) - 1), 0)


def test_mantissa_bits_round_the_router_basis_and_the_whitening():
    feats = _blobs()
    r3 = fit_router(feats, n_experts=K, dim=5, seed=3, dtype=torch.float16, bits=3)
    full = fit_router(feats, n_experts=K, dim=5, seed=3, dtype=torch.float16)
    assert not _low_bits(r3["pca_components"], 3).any() and _low_bits(full["pca_components"], 3).any()
    # only the basis is rounded (the mean and the mixture are small), and to nearest
    assert torch.equal(r3["pca_mean"], full["pca_mean"])
    err = (r3["pca_components"].double() - full["pca_components"].double()).abs()
    assert (err <= full["pca_components"].double().abs() * 2.0 ** -4 + 2.0 ** -24).all()
    # the mixture is fitted on the rounded basis: the stored router routes its own training images
    routes = CascadeModel(TaskModel(torch.nn.Identity()), [], r3, {}).route_features(feats)
    assert sorted(torch.bincount(routes, minlength=K).tolist()) == [40, 40, 40]
    blocks = torch.cat([feats, feats.flip(0)], 1)
    w3 = fit_combination(blocks, width=8, kind="subspace", n_blocks=2, router=r3, bits=3)
    assert not _low_bits(w3["whiten"], 3).any()
    c2 = fit_combination(blocks, width=6, kind="pca", n_blocks=2, bits=2)
    assert not _low_bits(c2["components"], 2).any()


def test_router_overflowing_float16_is_an_error():
    feats = _blobs() * 1e6  # the mean does not fit float16
    with pytest.raises(maskpack.errors.DataError, match="does not fit torch.float16"):
        fit_router(feats, n_experts=K, dim=5, dtype=torch.float16)


def test_router_rejects_too_few_images():
    with pytest.raises(maskpack.errors.DataError, match="fewer experts"):
        fit_router(torch.randn(5, 8), n_experts=5)


def test_combination_width_is_capped_at_rank_and_finite():
    c = fit_combination(torch.randn(10, 64), width=32)
    assert c["components"].shape[0] <= 9 and c["components"].shape[1] == 64
    assert torch.isfinite(c["scale"]).all() and c["components"].dtype == torch.float16


def test_combination_kinds():
    from maskpack.cascade.combine import Combination

    x = torch.randn(20, 12) * torch.arange(1, 13)
    x[:, 5] = 3.0  # a constant column
    assert fit_combination(x, width=4, kind="l2", n_blocks=3) == {}
    out = Combination("l2", {}, 3)(x)
    assert out.shape == (20, 12)
    torch.testing.assert_close(out[:, :4].norm(dim=1), torch.ones(20))
    assert torch.equal(Combination("l2", {}, 3)(torch.zeros(2, 12)), torch.zeros(2, 12))  # zero blocks stay 0
    st = fit_combination(x, width=4, kind="standardize", n_blocks=3)
    assert st["mean"].dtype == torch.float16 and st["scale"].shape == (12,) and float(st["scale"][5]) == 0
    y = Combination("standardize", st, 3)(x)
    torch.testing.assert_close(y.std(0)[:5], torch.ones(5), atol=2e-2, rtol=0)
    router = {"pca_mean": torch.zeros(4), "pca_components": torch.eye(4)[:2]}  # the first 2 coordinates
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 13)
    sub = fit_combination(x, width=6, kind="subspace", n_blocks=3, router=router, dtype=torch.float32)
    assert sub["whiten"].shape == (21,) and sub["mean"].shape == (6,)  # 3 blocks x 2 dims: 6x6 triangle
    comb = Combination("subspace", sub, 3, (router["pca_mean"], router["pca_components"]))
    z = comb.project(x)
    assert torch.equal(z, x[:, [0, 1, 4, 5, 8, 9]])
    w = comb(x)  # ZCA-whitened: identity covariance on the training data
    torch.testing.assert_close(torch.cov(w.T.double()), torch.eye(6, dtype=torch.float64), atol=1e-3, rtol=0)
    with pytest.raises(maskpack.errors.ConfigError, match="needs the router"):
        fit_combination(x, width=4, kind="subspace", n_blocks=3)
    with pytest.raises(maskpack.errors.ConfigError, match="unknown combination 'dense'"):
        fit_combination(x, width=4, kind="dense")
    with pytest.raises(maskpack.errors.ConfigError, match="do not split into 5 blocks"):
        fit_combination(x, width=4, kind="l2", n_blocks=5)


# ----------------------------------------------------------------------------- module


def test_shapes_and_modes(parts):
    model, x = parts["model"], parts["x"][:6]
    f = model.feature_dim
    assert model.num_experts == K and set(model.modes) == {"unconditional", "conditional"}
    for mode in model.modes:
        out = model(x, mode)
        assert out.shape == (6, model.embed_dim(mode)) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    routes = model.route(x)
    assert routes.shape == (6,) and routes.dtype == torch.int64 and int(routes.max()) < K
    # conditional = the full [D, E1..EK] with the non-routed blocks zeroed, projected
    blocks = [model.dispatcher.features(x)] + [e.features(x) for e in model.experts]
    cat = CascadeModel.conditional_blocks(blocks, routes)
    assert cat.shape == (6, (K + 1) * f)
    for i, r in enumerate(routes.tolist()):
        for k in range(K):
            blk = cat[i, (k + 1) * f:(k + 2) * f]
            assert (blk.abs().sum() > 0) == (k == r)
    # the forward pass runs each expert on its routed images only: float32 batch-size noise,
    # amplified by the whitening
    torch.testing.assert_close(model(x, "conditional"), model.combine(cat, "conditional"),
                               atol=1e-4, rtol=1e-3)
    with pytest.raises(maskpack.errors.ConfigError, match="no 'bogus' combination"):
        model(x, "bogus")


def test_expert_config_gives_about_the_dispatcher_steps():
    from maskpack.train import TrainConfig, resolve_config

    disp = resolve_config(TrainConfig(epochs=4, batch_size=32, warmup=1.0))
    cfg, steps = _expert_config(disp, list(range(100)), steps=40, seed=0)
    assert cfg.train_indices == list(range(100)) and abs(steps - 40) <= 3  # 3 steps an epoch
    assert cfg.warmup == pytest.approx(cfg.epochs / 4)  # same fraction of the schedule


# ----------------------------------------------------------------------------- storage


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_is_bit_identical(kind, tmp_path):
    parts = _build(kind)
    path = tmp_path / "c.mask"
    rep = _save(parts, path)
    assert rep["combine"] == kind and rep["router_dtype"] == "float16"
    assert (rep["combine_bytes"] == 0) == (kind == "l2")
    loaded = load_cascade(path, parts["net"])
    x = parts["x"]
    for mode in ("unconditional", "conditional"):
        assert torch.equal(loaded(x, mode), parts["model"](x, mode)), mode
    assert torch.equal(loaded.route(x), parts["model"].route(x))
    assert is_cascade(path) and loaded.metadata["dataset"] == "test"
    assert loaded.combine_kind == kind and loaded.router_dtype == torch.float16
    mf = maskpack.read(path)  # an ordinary, valid .mask container
    assert mf.metadata["cascade.format"] == "maskpack-cascade" and mf.codec == "ans"
    assert mf.metadata["cascade.version"] == FORMAT_VERSION == "2" and mf.metadata["cascade.combine"] == kind
    assert len(mf.tensors) == (K + 1) * len(parts["d_masks"])
    # same inputs, same bytes
    _save(parts, tmp_path / "again.mask")
    assert (tmp_path / "again.mask").read_bytes() == path.read_bytes()


def test_version_1_file_with_the_dense_pca_still_loads(tmp_path):
    """A version-1 file: dense whitened-PCA combination, float64 router, no 'cascade.combine'."""
    parts = _build("pca", router_dtype=torch.float64)
    path = tmp_path / "v1.mask"
    _save(parts, path, version="1")
    meta = maskpack.read(path).metadata
    assert meta["cascade.version"] == "1" and "cascade.combine" not in meta
    loaded = load_cascade(path, parts["net"])
    assert loaded.combine_kind == "pca" and loaded.router_dtype == torch.float64
    for mode in ("unconditional", "conditional"):
        assert torch.equal(loaded(parts["x"], mode), parts["model"](parts["x"], mode)), mode
    with pytest.raises(maskpack.errors.ConfigError, match="version 1 holds only the pca combination"):
        _save(_build("l2"), tmp_path / "bad.mask", version="1")


def test_unknown_version_or_combination_is_rejected(parts, tmp_path):
    from maskpack import io

    path = tmp_path / "c.mask"
    _save(parts, path)
    mf = maskpack.read(path)
    masks = {**mf.masks(parts["net"])}
    for key, value, message in [("cascade.version", "3", "cascade version '3' is not supported"),
                                ("cascade.combine", "dense", "unknown combination 'dense'")]:
        meta = dict(mf.metadata, **{key: value})
        bad = tmp_path / f"{value}.mask"
        io.write_atomic(bad, io.to_bytes(masks, parts["net"], extras=mf.extras, metadata=meta, codec="ans"))
        with pytest.raises(FormatError, match=message):
            load_cascade(bad, parts["net"])


def test_standardize_with_wrong_shapes_is_rejected(tmp_path):
    parts = _build("standardize")
    combine = {m: dict(p, scale=p["scale"][:-1]) for m, p in parts["combine"].items()}
    path = tmp_path / "c.mask"
    save_cascade(path, parts["net"], parts["d_masks"], parts["d_extras"], parts["e_masks"], parts["e_extras"],
                 parts["router"], combine, combine_kind="standardize")
    with pytest.raises(FormatError, match=r"combination 'unconditional' \(standardize\) mean and scale"):
        load_cascade(path, parts["net"])


def test_unchanged_expert_tensors_cost_one_byte(parts, tmp_path):
    """An expert equal to the dispatcher on a tensor stores an all-zero delta: 1 payload byte (format
    version 1: 2)."""
    first = next(iter(parts["d_masks"]))
    e_masks = [{n: (m if n == first else parts["d_masks"][n]) for n, m in em.items()}
               for em in parts["e_masks"]]
    rep = save_cascade(tmp_path / "c.mask", parts["net"], parts["d_masks"], parts["d_extras"], e_masks,
                       parts["e_extras"], parts["router"], parts["combine"], combine_kind=parts["kind"])
    payload = {t.name: t.length for t in maskpack.read(tmp_path / "c.mask").tensors}
    for k in range(K):
        for n in parts["d_masks"]:
            if n != first:
                assert payload[f"expert{k + 1}/{n}"] == 1
    assert rep["expert_delta_bytes"] == [payload[f"expert{k + 1}/{first}"] + len(parts["d_masks"]) - 1
                                         for k in range(K)]


def test_experts_stored_as_deltas_cost_less(tmp_path):
    parts = _build("l2")
    rep = _save(parts, tmp_path / "c.mask")
    assert sum(rep["expert_delta_bytes"]) < sum(rep["expert_independent_bytes"])
    assert rep["masks_multiple"] < rep["masks_multiple_independent"]
    assert rep["masks_multiple"] < K + 1
    # only expert 1 changed a BN statistic: only that tensor is stored for the experts
    assert rep["expert_extras_bytes"] == parts["e_extras"][0]["backbone.bn1.running_mean"].numel() * 4
    # the file without the combination tensors is measured, not estimated from raw sizes
    assert rep["combine_bytes"] == 0 and rep["file_bytes_without_combine"] == rep["file_bytes"]  # l2
    rep = _save(_build("pca"), tmp_path / "pca.mask")
    assert 0 < rep["file_bytes_without_combine"] < rep["file_bytes"]
    assert rep["file_multiple_without_combine"] > 0


def test_loaded_expert_masks_and_extras_match(parts, tmp_path):
    path = tmp_path / "c.mask"
    _save(parts, path)
    loaded = load_cascade(path, parts["net"])
    for k, e in enumerate(loaded.experts):
        ref = rehydrate(parts["net"], parts["e_masks"][k], parts["e_extras"][k])
        for (n, a), (_, b) in zip(e.state_dict().items(), ref.state_dict().items(), strict=True):
            assert torch.equal(a, b), (k, n)


def test_bad_inputs(parts, tmp_path):
    path = tmp_path / "c.mask"
    _save(parts, path)
    with pytest.raises(BackboneMismatchError):
        load_cascade(path, _net(seed=1))
    plain = tmp_path / "plain.mask"
    maskpack.save(plain, parts["d_masks"], parts["net"])
    assert not is_cascade(plain)
    with pytest.raises(FormatError, match="not a cascade"):
        load_cascade(plain, parts["net"])
    with pytest.raises(maskpack.errors.ConfigError, match="no 'bogus' combination"):
        load_cascade(path, parts["net"], mode="bogus")
    with pytest.raises(FileNotFoundError):
        load_cascade(tmp_path / "missing.mask", parts["net"])
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the extras blob
    bad = tmp_path / "bad.mask"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum"):
        load_cascade(bad, parts["net"])


def test_inconsistent_router_is_rejected(parts, tmp_path):
    router = dict(parts["router"], gmm_weights=torch.ones(K + 1, dtype=torch.float16) / (K + 1))
    path = tmp_path / "c.mask"
    save_cascade(path, parts["net"], parts["d_masks"], parts["d_extras"], parts["e_masks"],
                 parts["e_extras"], router, parts["combine"], combine_kind=parts["kind"])
    with pytest.raises(FormatError, match="router tensors have inconsistent shapes"):
        load_cascade(path, parts["net"])


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("args, message", [
    (["--experts", "0"], "Error: --experts must be at least 1, got 0"),
    (["--modes", "sideways"], "Error: unknown combination mode(s) ['sideways']"),
    (["--set", "nope=1"], "Error: --set 'nope=1': use KEY=VALUE with KEY one of the TrainConfig fields"),
])
def test_cli_errors(args, message, tmp_path):
    res = CliRunner().invoke(main, ["cascade", "--quiet", "--out", str(tmp_path / "c"), *args])
    assert res.exit_code == 1
    assert message in res.output


def test_cli_rejects_bad_expert_layers(tmp_path):
    res = CliRunner().invoke(main, ["cascade", "--quiet", "--expert-layers", "first:2",
                                    "--out", str(tmp_path / "c")])
    assert res.exit_code == 1
    assert "bad --expert-layers 'first:2': use all or last:N" in res.output


def test_expert_tensors():
    names = ["a", "b", "c", "d"]
    assert expert_tensors("all", names) == names
    assert expert_tensors("last:2", names) == ["c", "d"] and expert_tensors("last:9", names) == names
    with pytest.raises(maskpack.errors.ConfigError, match="use all or last:N"):
        expert_tensors("last:0", names)


@pytest.mark.parametrize("bn", ["adapt", "frozen"])
def test_expert_scope_freezes_other_tensors_and_starts_from_dispatcher_bn(bn):
    from types import SimpleNamespace

    from maskpack import masking

    net = _net()
    masking.apply_masks_(net)
    model = TaskModel(net)
    names = list(masking.score_masks(net))
    extras = {"backbone.bn2.running_mean": torch.full((32,), 0.25)}
    parts = SimpleNamespace(adapt_bn_names=["bn1", "bn2"])
    state = SimpleNamespace(model=model, parts=parts, config=SimpleNamespace(bn_mode="masked"))
    expert_scope(names[-2:], bn, extras)("train_start", {"state": state})
    assert [masking.score_masks(net)[n].scores.requires_grad for n in names] == [False, True, True]
    assert parts.adapt_bn_names == ([] if bn == "frozen" else ["bn2"])  # the BN after 'dw' only
    assert torch.equal(net.bn2.running_mean, torch.full((32,), 0.25))
    with pytest.raises(maskpack.errors.ConfigError, match="not masked by the dispatcher"):
        expert_scope(["nope.weight"], bn, None)("train_start", {"state": state})


def test_cli_help_has_example():
    res = CliRunner().invoke(main, ["cascade", "--help"])
    assert res.exit_code == 0 and "Example:" in res.output and "maskpack cascade" in res.output


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_on_lite0(tmp_path, lite0):
    """A real (tiny) cascade on Lite0: trained and loaded embeddings are torch.equal; eval reads it."""
    from maskpack.cascade import CascadeConfig, default_train_config, train_cascade

    tc = default_train_config(image_size=16, batch_size=32, epochs=1, max_steps_per_epoch=1, threads=1,
                              quiet=True, swav_crops=(2, 2), swav_prototypes=20, swav_queue_length=0,
                              bn_reestimate_batches=1)
    cfg = CascadeConfig(train=tc, experts=2, expert_steps=1, router_dim=4, out=str(tmp_path / "c"),
                        train_indices=list(range(96)), quiet=True, probe=False)
    res = train_cascade(cfg)
    assert sum(res.clusters) == 96 and len(res.clusters) == 2
    assert {"dispatcher", "dispatcher_combined", "unconditional", "conditional"} <= set(res.metrics)
    info = json.loads((tmp_path / "c" / "cascade.json").read_text())
    assert info["cluster_sizes"] == res.clusters
    loaded = load_cascade(res.path, lite0)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for mode in ("unconditional", "conditional"):
        assert torch.equal(loaded(x, mode), res.model(x, mode))
    # a second call reuses the finished runs and routes the same way (deterministic router)
    again = train_cascade(cfg)
    assert again.clusters == res.clusters
    assert torch.equal(again.model(x), res.model(x))
    out = CliRunner().invoke(main, ["eval", str(res.path), "--no-baseline", "--no-probe", "--json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.output)
    assert set(got) == {"dispatcher", "unconditional", "conditional"} and "knn@1" in got["dispatcher"]


def test_cascade_file_verifies_but_load_points_to_load_cascade(parts, tmp_path):
    from maskpack.errors import FormatError

    path = tmp_path / "c.mask"
    _save(parts, path)
    mf = maskpack.read(path)
    mf.verify(parts["net"])  # experts' deltas decode with their backbone tensor's contexts
    with pytest.raises(FormatError, match="load_cascade"):
        maskpack.load(path, parts["net"])


def test_cascade_follows_to_device_and_keeps_router_dtype(parts, tmp_path):
    path = tmp_path / "c.mask"
    _save(parts, path)
    loaded = load_cascade(path, parts["net"]).to("cpu").float()
    assert loaded.router["pca_mean"].dtype == torch.float64  # routing computes in float64
    x = parts["x"]
    assert torch.equal(loaded(x, "unconditional"), parts["model"](x, "unconditional"))
