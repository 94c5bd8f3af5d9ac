"""Named recipes (docs/recipe-study.md): the paper's recipe stays available, every
recipe resolves, and training BN affine parameters alongside masks never uses the score lr."""

import math

import pytest
import torch

from maskpack.train import METHODS, OBJECTIVES, RECIPES, TrainConfig, resolve_config, run

SUBSET = list(range(64))


def cfg(**kw):
    base = dict(dataset="digits", image_size=16, batch_size=32, epochs=1, train_indices=SUBSET,
                quiet=True, threads=1, eval_every=0, eval_knn="never", bn_reestimate=False,
                max_steps_per_epoch=1)
    base.update(kw)
    return TrainConfig(**base)


def test_paper_recipe_is_the_papers():
    c = resolve_config(TrainConfig(recipe="paper", epochs=150))
    assert c.lr == 50.0 and c.score_init == 1.0 and c.threshold == 0.0
    assert math.isclose(c.warmup, 40.0) and c.bn_reestimate is False and c.weight_decay == 0.0
    assert resolve_config(TrainConfig(recipe="paper", method="fft")).lr == 1e-3


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_recipe_resolves(recipe, method, objective):
    c = resolve_config(TrainConfig(recipe=recipe, method=method, objective=objective, epochs=8))
    assert c.lr > 0 and c.head_lr > 0 and 0 <= c.warmup <= 8
    assert isinstance(c.bn_reestimate, bool)
    if method != "fft":
        assert c.weight_decay == 0.0  # never decay scores (breaks Theorems 1-2)


def test_default_mask_recipe_is_the_studys_normalised_recipe():
    # docs/recipe-study.md: per-tensor normalised score updates at lr 0.003 (0.002 under
    # `normalized`, every layer masked); S0 = 1 and threshold
    # 0 stay the paper's; the extras are the head and the adapted BN statistics in bfloat16 (no BN
    # weight/bias: "What the extras cost"). The paper's raw lr stays available as `lr50`.
    c = resolve_config(TrainConfig(epochs=8))
    assert c.lr == 0.003 and c.score_grad_norm is True and c.train_bn_affine is False
    assert (c.extras_dtype, c.bn_fold) == ("bfloat16", False)
    n = resolve_config(TrainConfig(recipe="normalized"))
    assert (n.extras_dtype, n.bn_fold, n.bn_affine_scope) == ("float32", False, "all")
    assert c.score_init == 1.0 and c.threshold == 0.0 and c.warmup >= 1.0 and c.bn_reestimate is True
    old = resolve_config(TrainConfig(recipe="lr50", epochs=8))
    assert old.lr == 50.0 and old.score_grad_norm is False and old.train_bn_affine is False
    # top-k and fft are unchanged by the study
    t = resolve_config(TrainConfig(method="topk"))
    assert t.lr == 0.1 and t.score_grad_norm is False and t.train_bn_affine is False
    f = resolve_config(TrainConfig(method="fft"))
    assert f.lr == 0.01 and f.score_grad_norm is False


def _groups(config):
    seen = {}

    def grab(event, info):
        if event == "train_start":
            seen.update({g["name"]: (len(g["params"]), g["lr"] if g["lr"] else g["base_lr"],
                                     g["base_lr"], g["weight_decay"])
                         for g in info["state"].optimizer.param_groups})

    r = run(config, callbacks=[grab])
    return seen, r


def test_bn_affine_never_gets_the_score_lr():
    seen, r = _groups(cfg(train_bn_affine=True, lr=50.0, head_lr=0.02))
    n_bn = sum(2 for m in r.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert seen["weights"][0] == n_bn and seen["weights"][2] == 0.02  # default: head lr
    assert seen["scores"][2] == 50.0 and seen["scores"][3] == 0.0
    seen, _ = _groups(cfg(train_bn_affine=True, lr=50.0, head_lr=0.02, bn_lr=0.005))
    assert seen["weights"][2] == 0.005
    seen, _ = _groups(cfg(method="fft", lr=0.01))  # fft: all weights at lr, as before
    assert seen["weights"][2] == 0.01


def test_bn_affine_is_trained_and_saved_as_extras():
    r = run(cfg(train_bn_affine=True, head_lr=0.05))
    bn_w = [n for n in r.extras if n.endswith("_bn0.weight") or n.endswith("_bn1.weight")]
    assert bn_w, "BN weights must travel with the task"
    from maskpack import load_backbone

    base = load_backbone("efficientnet_lite0").copy_model().state_dict()
    changed = [n for n in bn_w if not torch.equal(r.extras[n], base[n.removeprefix("backbone.")])]
    assert changed  # one step moved them


def test_score_grad_norm_gives_unit_mean_gradients_per_tensor():
    seen = {}

    def grab(event, info):
        if event == "step_end" and "g" not in seen:
            run_ = info["state"]
            seen["g"] = [float(p.grad.abs().mean()) for p in run_.optim.score_params if p.grad is not None]

    # lr tiny so the step itself does not matter; gradients are inspected after the step
    run(cfg(score_grad_norm=True, lr=1e-6), callbacks=[grab])
    assert seen["g"] and all(abs(g - 1.0) < 1e-4 for g in seen["g"] if g > 0)


def test_normalized_recipe_switches_on_per_tensor_score_normalisation():
    n = resolve_config(TrainConfig(recipe="normalized", epochs=8))
    assert n.score_grad_norm is True and n.lr == 0.002 and n.bn_reestimate is True
    assert n.train_bn_affine is True and resolve_config(TrainConfig(recipe="lr50")).train_bn_affine is False
    assert resolve_config(TrainConfig(recipe="normalized", train_bn_affine=False)).train_bn_affine is False
    assert resolve_config(TrainConfig(recipe="paper")).score_grad_norm is False
    assert resolve_config(TrainConfig(recipe="lr50")).score_grad_norm is False
    assert resolve_config(TrainConfig(recipe="normalized", score_grad_norm=False)).score_grad_norm is False
