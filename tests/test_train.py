"""Training mechanics on tiny data: loss goes down, masks change, checkpoints and resume."""

import json
import math

import pytest
import torch

from maskpack import masking
from maskpack.errors import ConfigError, DataError, MaskpackError
from maskpack.train import TrainConfig, layer_filter, load_checkpoint, lr_factor, run

SUBSET = list(range(96))


def cfg(tmp_path=None, name="run", **kw):
    base = dict(dataset="digits", image_size=16, batch_size=32, epochs=2, train_indices=SUBSET,
                quiet=True, threads=1, eval_every=0, eval_knn="never", bn_reestimate_batches=2,
                out=str(tmp_path / name) if tmp_path is not None else None)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warmup_never_zero_and_cosine_to_zero():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert min(f) > 0 and f[-1] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # noqa: B905
    assert lr_factor(0, 10, 0) == 1.0
    assert [lr_factor(s, 10, 0, "constant") for s in range(3)] == [1.0, 1.0, 1.0]


def test_loss_goes_down_and_masks_change(tmp_path):
    # 12 steps at 16 px: mask the late layers only (Lite0's early layers have far larger score
    # gradients and need the recipe study's care (docs/recipe-study.md)). Loss falls, masks move.
    r = run(cfg(tmp_path, epochs=4, head_lr=0.1, eval_every=4, mask_layers="re:_blocks\\.1[0-5]|_conv_head",
                recipe="lr50"))
    losses = [h["loss"] for h in r.history]
    assert losses[-1] < losses[0] - 0.1
    assert 0.9 < r.metrics["active"] < 1.0  # some weights were switched off
    assert r.metrics["accuracy"] > 0.15  # chance is 0.1
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "active", "images_per_s", "accuracy"} <= set(rows[-1])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 50.0


def test_default_recipe_learns(tmp_path):
    # the default (normalised score updates + BN affine) on every conv: loss falls, masks move
    r = run(cfg(tmp_path, epochs=4, head_lr=0.1, bn_lr=0.01, eval_every=4, train_bn_affine=True))
    losses = [h["loss"] for h in r.history]
    assert r.config.score_grad_norm and r.config.train_bn_affine
    assert losses[-1] < losses[0] - 0.1, losses
    assert 0.9 < r.metrics["active"] < 1.0


def test_finished_run_deletes_its_checkpoint(tmp_path):
    r = run(cfg(tmp_path, epochs=1))
    assert r.task_path.exists() and r.checkpoint_path is None
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left == ["config.json", "metrics.jsonl", "task.mask"]


def test_checkpoint_contract(tmp_path):
    r = run(cfg(tmp_path, epochs=1, keep_checkpoint=True))
    assert r.checkpoint_path == tmp_path / "run" / "checkpoint.pt"
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["backbone"] == "efficientnet_lite0"
    assert ck["mask_mode"] == "threshold" and ck["threshold"] == 0.0 and ck["scale"] is True
    assert isinstance(ck["k"], float)
    assert set(ck["scores"]) == set(r.masks) and all(v.dtype == torch.float32 for v in ck["scores"].values())
    for name, s in ck["scores"].items():
        assert torch.equal(s > 0, r.masks[name])
    ex = ck["extras"]
    # the default masks the last 25 tensors and adapts their BN only: the conv head's statistics
    # are stored, the stem's are the backbone's and left out; no BN weight/bias trains
    assert {"head.weight", "head.bias", "backbone._bn1.running_mean", "backbone._bn1.running_var",
            "backbone._bn1.num_batches_tracked"} <= set(ex)
    assert not {"backbone._bn0.running_mean", "backbone._bn0.weight", "backbone._bn1.weight"} & set(ex)
    assert not any("parametrizations" in k for k in ex)
    assert ck["metadata"]["mask.scale"] == "true"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in ck["metadata"].items())
    # the extras rebuild the trained model exactly (bit for bit)
    from maskpack import load_backbone
    from maskpack.rehydrate import rehydrate

    model = rehydrate(load_backbone(), r.masks, ex)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(model(x), r.model.eval()(x))


def _same_result(a, b) -> None:
    """Two TrainResults of the same training: every tensor bit for bit, metrics but timings."""
    for field in ("masks", "scores", "extras"):
        x, y = getattr(a, field), getattr(b, field)
        assert list(x) == list(y) and all(torch.equal(x[n], y[n]) for n in x), field
    sa, sb = a.objective.state_dict(), b.objective.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[n], sb[n]) for n in sa)
    drop = ("images_per_s", "epoch_seconds")
    assert {k: v for k, v in a.metrics.items() if k not in drop} == \
        {k: v for k, v in b.metrics.items() if k not in drop}


def test_resume_gives_identical_masks(tmp_path, same_run):
    # keep_checkpoint: the final checkpoints are compared too (a finished run deletes its own)
    full = run(cfg(tmp_path, "full", head_lr=0.1, keep_checkpoint=True))
    part = run(cfg(tmp_path, "part", head_lr=0.1, stop_after=1, keep_checkpoint=True))
    assert part.task_path is None and not (tmp_path / "part" / "task.mask").exists()
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["epoch"] == 1
    resumed = run(cfg(tmp_path, "part", head_lr=0.1, resume=True, keep_checkpoint=True))
    assert resumed.metrics["epoch"] == 2
    # masks, scores, extras, objective state, momentum, metrics (but timings), task file
    _same_result(full, resumed)
    same_run(tmp_path / "full", tmp_path / "part")
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_killed_run_resumes_and_leaves_no_partial_files(tmp_path, same_run):
    def kill(event, info):
        if event == "step_end" and info["step"] == 4:  # in the middle of epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg(tmp_path, "k", head_lr=0.1, keep_checkpoint=True), callbacks=[kill])
    out = tmp_path / "k"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    full = run(cfg(tmp_path, "full", head_lr=0.1, keep_checkpoint=True))
    resumed = run(cfg(tmp_path, "k", head_lr=0.1, resume=True, keep_checkpoint=True))
    _same_result(full, resumed)
    same_run(tmp_path / "full", out)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import os

    from maskpack.io import write_atomic

    target = tmp_path / "x.bin"

    def boom(*a, **k):
        raise OSError("killed")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", boom)
        with pytest.raises(OSError, match="killed"):
            write_atomic(target, b"half")
    assert list(tmp_path.iterdir()) == []
    write_atomic(target, b"whole")
    assert target.read_bytes() == b"whole" and len(list(tmp_path.iterdir())) == 1


def test_task_file_loads_as_trained_model(tmp_path):
    import maskpack

    r = run(cfg(tmp_path, epochs=1, bn_reestimate=True))
    assert r.task_path.name == "task.mask"
    bb = maskpack.load_backbone()
    loaded = maskpack.load(r.task_path, bb)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(loaded(x), r.model.eval()(x))  # the file holds the trained model exactly
    meta = maskpack.read(r.task_path).metadata
    assert meta["mask.scale"] == "true" and meta["dataset"] == "digits" and meta["image_size"] == "16"


def test_fft_writes_safetensors(tmp_path):
    from safetensors.torch import load_file

    r = run(cfg(tmp_path, epochs=1, method="fft", keep_checkpoint=True))
    assert r.task_path.name == "model.safetensors" and r.masks == {}
    state = load_file(str(r.task_path))
    assert set(state) == set(r.model.state_dict())
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck["scores"] == {} and "backbone._conv_stem.weight" in ck["extras"]
    assert json.loads(ck["config"])["weight_decay"] == 5e-4
    from maskpack import load_backbone
    from maskpack.io import load_task as load_task_model

    model, meta = load_task_model(r.task_path, load_backbone())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), r.model.eval()(x))  # the safetensors file holds the model exactly
    assert meta["method"] == "fft"


def test_fft_resume_identical(tmp_path, same_run):
    full = run(cfg(tmp_path, "a", method="fft", keep_checkpoint=True))
    run(cfg(tmp_path, "b", method="fft", stop_after=1, keep_checkpoint=True))
    res = run(cfg(tmp_path, "b", method="fft", resume=True, keep_checkpoint=True))
    _same_result(full, res)
    same_run(tmp_path / "a", tmp_path / "b")  # model.safetensors included


@pytest.mark.parametrize("method", ["fft", "mask"])
def test_head_only_phase_freezes_the_backbone(tmp_path, method):
    # head_only_epochs covering the whole run: the head moves; scores, BN weight/bias and fft
    # weights stay exactly where they started (BN running statistics may still update)
    from maskpack import load_backbone

    # (float32 extras: bfloat16 would round the untouched BN weights at the end)
    r = run(cfg(tmp_path, epochs=2, method=method, head_only_epochs=2, train_bn_affine=True,
                bn_lr=0.1, head_lr=0.1, save_task=False, extras_dtype="float32"))
    start = load_backbone().model.state_dict()
    moved = []
    for name, t in r.extras.items():
        if name.startswith("head."):
            continue
        key = name.removeprefix("backbone.")
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        assert torch.equal(t, start[key]), name
        moved.append(name)
    assert moved  # BN weight/bias (mask) or every weight (fft) were checked
    assert all(bool((s == r.config.score_init).all()) for s in r.scores.values())
    losses = [h["loss"] for h in r.history]
    assert losses[-1] < losses[0], losses  # the head learned meanwhile


def test_topk_keeps_fraction(tmp_path):
    r = run(cfg(None, epochs=1, method="topk", topk_k=0.8))
    assert r.metrics["active"] == pytest.approx(0.8, abs=0.01)


def test_optimizer_sees_only_trainables_and_no_decay_on_scores(tmp_path, lite0):
    seen = {}

    def grab(event, info):
        if event == "train_start":
            groups = info["state"].optimizer.param_groups
            seen["groups"] = {g["name"]: (len(g["params"]), g["weight_decay"]) for g in groups}
            seen["all_trainable"] = all(p.requires_grad for g in groups for p in g["params"])

    run(cfg(None, epochs=1, max_steps_per_epoch=1, weight_decay=0.1, train_bn_affine=True), callbacks=[grab])
    assert seen["groups"]["scores"][1] == 0.0 and seen["all_trainable"]
    assert set(seen["groups"]) == {"scores", "head", "weights"}  # weights: BN affine
    n_bn = 2 * sum(1 for m in lite0.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert seen["groups"]["weights"][0] == n_bn
    seen.clear()
    run(cfg(None, epochs=1, max_steps_per_epoch=1), callbacks=[grab])  # the default: no BN affine
    assert set(seen["groups"]) == {"scores", "head"}


def test_layer_filters(lite0):
    net = lite0.copy_model()
    n_all = len(masking.select_parameters(net, layer_filter("all", net)))
    pw = masking.select_parameters(net, layer_filter("pointwise", net))
    nostem = masking.select_parameters(net, layer_filter("no-stem", net))
    assert len(nostem) == n_all - 1 and nostem[0][0] != "_conv_stem.weight"
    assert all(m.kernel_size == (1, 1) for _, m, _ in pw) and 0 < len(pw) < n_all
    rx = masking.select_parameters(net, layer_filter("re:_blocks\\.0\\.", net))
    assert [n for n, _, _ in rx] == ["_blocks.0._depthwise_conv.weight", "_blocks.0._project_conv.weight"]
    last = masking.select_parameters(net, layer_filter("last", net))
    assert [n for n, _, _ in last] == ["_conv_head.weight"]  # the conv before the pooled features
    last13 = masking.select_parameters(net, layer_filter("last:13", net))
    rx13 = masking.select_parameters(net, layer_filter("re:^(_blocks\\.1[2-5]\\.|_conv_head)", net))
    assert [n for n, _, _ in last13] == [n for n, _, _ in rx13] and len(rx13) == 13
    for bad in ("last:0", "last:x"):
        with pytest.raises(ConfigError, match="last:N"):
            layer_filter(bad, net)
    with pytest.raises(ConfigError, match="unknown layer filter"):
        layer_filter("convs", net)


def test_init_scores_and_bn_frozen(tmp_path):
    first = run(cfg(None, epochs=1))
    seen = {}

    def grab(event, info):
        if event == "train_start":
            seen["scores"] = masking.extract_scores(info["state"].model.backbone)
            seen["bn"] = info["state"].model.backbone._bn0.running_mean.clone()

    second = run(cfg(None, epochs=1, bn_mode="frozen", bn_reestimate=False, lr=1e-9),
                 callbacks=[grab], init_scores=first.scores)
    assert all(torch.equal(seen["scores"][n], first.scores[n]) for n in first.scores)
    assert torch.equal(second.model.backbone._bn0.running_mean, seen["bn"])  # frozen BN: unchanged


def _bn_modes_at_first_step():
    """A callback that records {BN layer name: in train mode?} after the first training step."""
    modes = {}

    def grab(event, info):
        if event == "step_end" and not modes:
            bb = info["state"].model.backbone
            modes.update({n: m.training for n, m in bb.named_modules()
                          if isinstance(m, torch.nn.BatchNorm2d)})

    return modes, grab


def test_bn_mode_head_adapts_only_the_last_bn(tmp_path):
    # --bn-mode head: only the conv head's BN (_bn1) runs in train mode and is re-estimated;
    # every other BN layer keeps the backbone's statistics
    from maskpack import load_backbone

    modes, grab = _bn_modes_at_first_step()

    r = run(cfg(tmp_path, epochs=1, bn_mode="head", head_lr=0.1, train_bn_affine=False), callbacks=[grab])
    assert [n for n, t in modes.items() if t] == ["_bn1"] and len(modes) > 40
    start = load_backbone().model.state_dict()
    bb = r.model.backbone.state_dict()
    for n in modes:
        same = torch.equal(bb[f"{n}.running_mean"], start[f"{n}.running_mean"])
        assert same == (n != "_bn1"), n
    # the task stores only what differs from the backbone: the head's BN statistics, no others
    assert {k for k in r.extras if k.startswith("backbone.")} == {
        f"backbone._bn1.{b}" for b in ("running_mean", "running_var", "num_batches_tracked")}
    import maskpack

    loaded = maskpack.load(r.task_path, maskpack.load_backbone())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), r.model.eval()(x))
    with pytest.raises(ConfigError, match="BN mode"):
        run(cfg(None, bn_mode="heads"))


def test_bn_mode_masked_adapts_the_bn_after_each_masked_layer(lite0):
    from maskpack.bn import bn_after

    net = lite0.copy_model()
    owners = {n.rpartition(".")[0] for n, _, _ in
              masking.select_parameters(net, layer_filter("re:_blocks\\.15\\.|_conv_head", net))}
    assert bn_after(net, owners) == ["_blocks.15._bn0", "_blocks.15._bn1", "_blocks.15._bn2", "_bn1"]
    modes, grab = _bn_modes_at_first_step()

    run(cfg(None, epochs=1, bn_mode="masked", mask_layers="last", max_steps_per_epoch=1),
        callbacks=[grab])
    assert [n for n, t in modes.items() if t] == ["_bn1"]
    with pytest.raises(ConfigError, match="needs --method mask"):
        run(cfg(None, epochs=1, method="fft", bn_mode="masked"))


def test_label_fraction_and_subset(tmp_path):
    seen = {}
    run(cfg(None, epochs=1, labels=0.5, max_steps_per_epoch=1),
        callbacks=[lambda e, i: seen.setdefault("n", len(i["state"].loaders.train_set))])
    assert seen["n"] == pytest.approx(48, abs=5)


@pytest.mark.parametrize("kw,err,msg", [
    (dict(method="lora"), ConfigError, "unknown method 'lora'"),
    (dict(objective="byol"), ConfigError, "unknown objective"),
    (dict(labels=1.5), DataError, r"label fraction must be in \(0, 1\]"),
    (dict(labels=0.0), DataError, "label fraction"),
    (dict(recipe="fancy"), ConfigError, "unknown recipe"),
    (dict(dataset="mnist"), DataError, "unknown dataset"),
    (dict(warmup="x"), ConfigError, "warm-up"),
    (dict(device="tpu"), ConfigError, "unknown device"),
    (dict(objective="swav", swav_jitter=2.0), ConfigError, "swav_jitter"),
])
def test_bad_options(kw, err, msg):
    with pytest.raises(err, match=msg):
        run(cfg(None, **kw))


def test_resume_guards(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(cfg(tmp_path, "none", resume=True))
    run(cfg(tmp_path, "r", epochs=1, save_task=False))
    with pytest.raises(ConfigError, match="already holds a run"):
        run(cfg(tmp_path, "r", epochs=1))
    with pytest.raises(ConfigError, match="different seed"):
        run(cfg(tmp_path, "r", epochs=2, seed=5, resume=True))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MaskpackError, match="is not a readable training checkpoint"):
        run(cfg(tmp_path, "bad", resume=True))


def test_paper_recipe_defaults():
    from maskpack.train import resolve_config

    c = resolve_config(TrainConfig(recipe="paper", epochs=150))
    assert c.lr == 50.0 and math.isclose(c.warmup, 40.0) and c.bn_reestimate is False
    d = resolve_config(TrainConfig(method="fft"))
    assert d.lr == 0.01 and d.head_lr == 0.01 and d.weight_decay == 5e-4


def test_swav_recipe_defaults():
    # default: the small-image SwAV that learns (recipe study); paper: SwAV's own settings;
    # explicit values always win; supervised runs keep no head-only phase
    from maskpack.train import resolve_config

    d = resolve_config(TrainConfig(objective="swav", epochs=8))
    assert (d.swav_crops, d.swav_global_scale, d.swav_prototypes) == ((2, 0), (0.5, 1.0), 100)
    assert (d.swav_jitter, d.swav_blur, d.head_only_epochs) == (0.4, False, 2.0)
    assert (d.lr, d.head_lr, d.train_bn_affine, d.score_grad_norm) == (0.02, 1.0, False, True)
    assert (d.mask_layers, d.bn_mode) == ("last:13", "masked")
    p = resolve_config(TrainConfig(objective="swav", recipe="paper", epochs=8))
    assert (p.swav_crops, p.swav_global_scale, p.swav_prototypes) == ((2, 6), (0.14, 1.0), 500)
    assert (p.swav_jitter, p.swav_blur, p.head_only_epochs, p.lr) == (0.8, True, 0.0, 50.0)
    e = resolve_config(TrainConfig(objective="swav", epochs=8, swav_crops=(2, 4), lr=0.002,
                                   head_only_epochs="1/8", swav_jitter=0.0))
    assert (e.swav_crops, e.lr, e.head_only_epochs, e.swav_jitter) == ((2, 4), 0.002, 1.0, 0.0)
    assert (p.mask_layers, p.bn_mode) == ("all", "train")
    s = resolve_config(TrainConfig(epochs=8))
    assert s.head_only_epochs == 0.0 and s.lr == 0.003 and not s.train_bn_affine
    assert (s.mask_layers, s.bn_mode) == ("last:25", "masked")  # supervised default
    n = resolve_config(TrainConfig(epochs=8, recipe="normalized"))
    assert (n.mask_layers, n.bn_mode, n.lr, n.train_bn_affine) == ("all", "train", 0.002, True)
    t = resolve_config(TrainConfig(method="topk"))
    assert (t.mask_layers, t.bn_mode) == ("all", "train")
    f = resolve_config(TrainConfig(objective="swav", method="fft"))
    assert f.lr == 0.01 and f.head_lr == 0.01 and f.bn_mode == "train"
    m = resolve_config(TrainConfig(objective="swav", mask_layers="all", bn_mode="train"))
    assert (m.mask_layers, m.bn_mode) == ("all", "train")
    with pytest.raises(ConfigError, match="head_only_epochs"):
        resolve_config(TrainConfig(head_only_epochs="x/y"))


def test_bn_reestimation_batches_span_the_classes(tmp_path):
    # ImageFolder stores images sorted by class: re-estimating BN on the first batches of that
    # order would see one class only and skew every statistic (it cost fft 14 points on
    # cifar10-5k). The re-estimation order is a seeded shuffle, identical between evaluations.
    from PIL import Image

    from maskpack.train.loop import start

    for split in ("train", "test"):
        for c in range(4):
            (tmp_path / "if" / split / f"c{c}").mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (8, 8), (60 * c, 0, 0)).save(tmp_path / "if" / split / f"c{c}" / f"{i}.png")
    s = start(cfg(dataset=f"imagefolder:{tmp_path / 'if'}", image_size=8, batch_size=8, train_indices=None))
    first = [next(iter(s.loaders.bn))[1].tolist() for _ in range(2)]
    assert first[0] == first[1]  # the same batch every time
    assert len(set(first[0])) >= 3  # not one class


def test_extras_rounding_and_bn_fold_define_the_stored_task(tmp_path):
    """bfloat16 extras with folded BN: the model evaluated at the end is the file's model, bit for bit."""
    import maskpack
    from maskpack import load_backbone

    # head_bits 0: the head in bfloat16 too (an int8 head is tests/test_compact_head.py's)
    r = run(cfg(tmp_path, epochs=1, extras_dtype="bfloat16", bn_fold=True, keep_checkpoint=True, head_bits=0))
    mf = maskpack.read(r.task_path)
    assert mf.metadata["extras.dtype"] == "bfloat16" and mf.metadata["bn.folded"] == "true"
    stored = mf.extras
    floats = {k: v for k, v in stored.items() if v.is_floating_point()}
    assert floats and all(v.dtype == torch.bfloat16 for v in floats.values())
    # the conv head's BN adapts (last 25 tensors masked) and is folded: mean 0, variance 1 - eps
    assert torch.equal(stored["backbone._bn1.running_mean"], torch.zeros(1280, dtype=torch.bfloat16))
    assert len(set(stored["backbone._bn1.running_var"].tolist())) == 1
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(maskpack.load(r.task_path, load_backbone())(x), r.model.eval()(x))
    # the in-memory extras hold the rounded values in float32; the checkpoint packs to the same file
    assert all(torch.equal(r.extras[k].to(torch.bfloat16), v) for k, v in floats.items())
    from click.testing import CliRunner

    from maskpack.cli import main

    res = CliRunner().invoke(main, ["pack", str(tmp_path / "run" / "checkpoint.pt"), "-o",
                                    str(tmp_path / "p.mask")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.mask").read_bytes() == r.task_path.read_bytes()
    # a folded run cannot be extended
    with pytest.raises(ConfigError, match="BN layers folded"):
        run(cfg(tmp_path, epochs=2, resume=True))


def test_bn_affine_scope_masked_trains_only_the_masked_layers_bn():
    from maskpack.bn import BatchNorm

    seen = {}

    def grab(event, info):
        if event == "train_start":
            net = info["state"].model.backbone
            seen.update({n: m.weight.requires_grad for n, m in net.named_modules()
                         if isinstance(m, BatchNorm)})

    run(cfg(None, epochs=1, max_steps_per_epoch=1, train_bn_affine=True, bn_affine_scope="masked"),
        callbacks=[grab])
    assert seen["_bn1"] and not seen["_bn0"]  # the conv head's BN trains, the stem's does not
    assert 0 < sum(seen.values()) < len(seen)


def test_fold_bn_keeps_the_function_and_float16_overflow_is_an_error():
    from torch import nn

    from maskpack.extras import fold_bn_, round_tensors_

    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3)
    x = torch.randn(2, 6, 4, 4)
    ref = bn(x)
    fold_bn_(bn)
    torch.testing.assert_close(bn(x), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(bn.running_mean, torch.zeros(6))
    with pytest.raises(ConfigError, match="'big' does not fit float16"):
        round_tensors_([("big", torch.tensor([1e6]))], "float16")
    with pytest.raises(ConfigError, match="unknown extras_dtype 'int8'"):
        run(cfg(None, epochs=1, extras_dtype="int8"))
