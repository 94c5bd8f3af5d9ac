"""Cascade mechanics on tiny data: routing, shapes, storage as XOR deltas, bit-identical loading."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import TinyNet

import maskpack
from maskpack.cascade import (
    CascadeModel,
    _expert_config,
    fit_combination,
    fit_router,
    is_cascade,
    load_cascade,
    save_cascade,
)
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
    router = fit_router(d_tr, n_experts=K, dim=4, seed=0)
    blocks = [d_tr] + [e.features(x) for e in experts]
    routes = CascadeModel(disp, [], router, {}).route_features(d_tr)
    combine = {"unconditional": fit_combination(torch.cat(blocks, 1), width=16),
               "conditional": fit_combination(CascadeModel.conditional_blocks(blocks, routes), width=16)}
    model = CascadeModel(disp, experts, router, combine)
    return dict(net=net, d_masks=d_masks, e_masks=e_masks, d_extras=d_extras, e_extras=e_extras,
                router=router, combine=combine, model=model, x=x)


def _save(parts, path):
    return save_cascade(path, parts["net"], parts["d_masks"], parts["d_extras"], parts["e_masks"],
                        parts["e_extras"], parts["router"], parts["combine"], metadata={"dataset": "test"})


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


def test_router_rejects_too_few_images():
    with pytest.raises(maskpack.errors.DataError, match="fewer experts"):
        fit_router(torch.randn(5, 8), n_experts=5)


def test_combination_width_is_capped_at_rank_and_finite():
    c = fit_combination(torch.randn(10, 64), width=32)
    assert c["components"].shape[0] <= 9 and c["components"].shape[1] == 64
    assert torch.isfinite(c["scale"]).all() and c["components"].dtype == torch.float16


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
    torch.testing.assert_close(model(x, "conditional"), model.combine(cat, "conditional"))
    with pytest.raises(maskpack.errors.ConfigError, match="no 'bogus' combination"):
        model(x, "bogus")


def test_expert_config_gives_about_the_dispatcher_steps():
    from maskpack.train import TrainConfig, resolve_config

    disp = resolve_config(TrainConfig(epochs=4, batch_size=32, warmup=1.0))
    cfg, steps = _expert_config(disp, list(range(100)), steps=40, seed=0)
    assert cfg.train_indices == list(range(100)) and abs(steps - 40) <= 3  # 3 steps an epoch
    assert cfg.warmup == pytest.approx(cfg.epochs / 4)  # same fraction of the schedule


# ----------------------------------------------------------------------------- storage


def test_round_trip_is_bit_identical(parts, tmp_path):
    path = tmp_path / "c.mask"
    _save(parts, path)
    loaded = load_cascade(path, parts["net"])
    x = parts["x"]
    for mode in ("unconditional", "conditional"):
        assert torch.equal(loaded(x, mode), parts["model"](x, mode)), mode
    assert torch.equal(loaded.route(x), parts["model"].route(x))
    assert is_cascade(path) and loaded.metadata["dataset"] == "test"
    mf = maskpack.read(path)  # an ordinary, valid .mask container
    assert mf.metadata["cascade.format"] == "maskpack-cascade" and mf.codec == "ans"
    assert len(mf.tensors) == (K + 1) * len(parts["d_masks"])
    # same inputs, same bytes
    _save(parts, tmp_path / "again.mask")
    assert (tmp_path / "again.mask").read_bytes() == path.read_bytes()


def test_experts_stored_as_deltas_cost_less(parts, tmp_path):
    rep = _save(parts, tmp_path / "c.mask")
    assert sum(rep["expert_delta_bytes"]) < sum(rep["expert_independent_bytes"])
    assert rep["masks_multiple"] < rep["masks_multiple_independent"]
    assert rep["masks_multiple"] < K + 1
    # only expert 1 changed a BN statistic: only that tensor is stored for the experts
    assert rep["expert_extras_bytes"] == parts["e_extras"][0]["backbone.bn1.running_mean"].numel() * 4
    # the file without the combination PCAs is measured, not estimated from raw sizes
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
    router = dict(parts["router"], gmm_weights=torch.ones(K + 1, dtype=torch.float64) / (K + 1))
    path = tmp_path / "c.mask"
    save_cascade(path, parts["net"], parts["d_masks"], parts["d_extras"], parts["e_masks"],
                 parts["e_extras"], router, parts["combine"])
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
    assert {"dispatcher", "dispatcher_whitened", "unconditional", "conditional"} <= set(res.metrics)
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
    assert loaded.router["pca_mean"].dtype == torch.float64
    x = parts["x"]
    assert torch.equal(loaded(x, "unconditional"), parts["model"](x, "unconditional"))
