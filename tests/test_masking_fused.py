"""The sync-free per-layer path and the fused pass (compile_masks_) against the former implementation.

``_RefMaskedWeight`` below is the straight-through node as it was before either path existed
(``rsqrt(clamp(mean(M), 1/n))`` and a ``bool(...)`` host round trip for the all-zero case); the
new paths must give the same score and head gradients within float rounding, and the same
forward bits as :func:`masking.masked_weight`.
"""

import copy
import types
import warnings

import pytest
import torch
from torch import nn

from maskpack import masking
from maskpack.errors import ConfigError
from maskpack.rehydrate import rehydrate


class _RefMaskedWeight(torch.autograd.Function):
    """Reference: the former implementation, verbatim in its arithmetic."""

    @staticmethod
    def forward(ctx, weight, scores, mask, scale, detach_alpha):  # noqa: ARG004
        mf = mask.to(weight.dtype)
        if scale:
            n = max(mf.numel(), 1)
            out = weight * (mf * torch.rsqrt(torch.clamp(mf.mean(), min=1.0 / n)))
        else:
            out = weight * mf
        ctx.scale, ctx.detach_alpha = scale, detach_alpha
        ctx.save_for_backward(weight, mf)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, mf = ctx.saved_tensors
        gw = grad * weight
        if not ctx.scale:
            return None, gw, None, None, None
        n = max(mf.numel(), 1)
        mean = mf.mean()
        inv = torch.rsqrt(torch.clamp(mean, min=1.0 / n))
        grad_s = gw * inv
        if not ctx.detach_alpha and bool(mean > 1.0 / n):
            grad_s = grad_s + (gw * mf).sum() * (-0.5 * inv**3 / n)
        return None, grad_s, None, None, None


def _ref_forward(self, weight):
    return _RefMaskedWeight.apply(weight, self.scores, self.mask(), self.scale, self.detach_alpha)


def _model(mode: str, scale: bool, detach_alpha: bool, *, k: float = 0.5, zero: str | None = None,
           ref: bool = False):
    """Tiny masked backbone + head, random scores (mixed masks), one tensor all-zero if asked."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 12))
    masking.apply_masks_(net, mode=mode, k=k, scale=scale, detach_alpha=detach_alpha, mask_bias=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, sm in masking.score_masks(net).items():
            sm.scores.copy_(torch.randn(sm.scores.shape, generator=g))
            if name == zero:
                sm.scores.fill_(-1.0)
            if ref:
                sm.forward = types.MethodType(_ref_forward, sm)
    return nn.Sequential(net, nn.Linear(12, 5)).train()


def _grads(model, x, y):
    nn.functional.cross_entropy(model(x), y).backward()
    out = {n: sm.scores.grad.clone() for n, sm in masking.score_masks(model[0]).items()}
    out.update({f"head.{n}": p.grad.clone() for n, p in model[1].named_parameters()})
    return out


CASES = [(mode, scale, detach, zero) for mode in ("threshold", "topk") for scale in (True, False)
         for detach in (False, True) for zero in (None, "3.weight")]


@pytest.mark.parametrize("mode,scale,detach_alpha,zero", CASES)
@pytest.mark.parametrize("fused", [False, True])
def test_gradients_match_the_former_implementation(mode, scale, detach_alpha, zero, fused, monkeypatch):
    if mode == "topk" and zero:  # top-k keeps at least one weight: its corner case is a single one
        zero, k = None, 0.01
    else:
        k = 0.5
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    ref = _model(mode, scale, detach_alpha, k=k, zero=zero, ref=True)
    new = _model(mode, scale, detach_alpha, k=k, zero=zero)
    if fused:
        assert masking.compile_masks_(new[0]) == 6  # every masked tensor (4 weights, 2 biases) fused
        monkeypatch.setattr(masking._MaskedWeight, "apply", None)  # the per-layer path must not run
    expected, got = _grads(ref, x, y), _grads(new, x, y)
    assert set(expected) == set(got)
    for name in expected:
        assert torch.isfinite(got[name]).all(), name
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-7), name
    if zero:
        assert not masking.extract_masks(new[0])[zero].any()


@pytest.mark.parametrize("scale", [True, False])
def test_both_paths_give_the_bits_of_masked_weight(scale):
    net = _model("threshold", scale, False, zero="6.weight")[0]
    masks = masking.extract_masks(net)
    sms = masking.score_masks(net)
    per_layer = {n: getattr(net.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in sms}
    masking.compile_masks_(net)
    captured = {}
    for name in sms:
        owner = net.get_submodule(name.rpartition(".")[0])
        owner.register_forward_pre_hook(lambda m, a, name=name: captured.__setitem__(
            name, getattr(m, name.rpartition(".")[2])))
    net(torch.randn(2, 3, 8, 8))
    for name, sm in sms.items():
        w = net.get_submodule(name.rpartition(".")[0]).parametrizations[name.rpartition(".")[2]].original
        expected = masking.masked_weight(w, masks[name].float(), scale=scale)
        assert torch.equal(per_layer[name], expected), name
        assert torch.equal(captured[name], expected), name
        assert sm._fused is None  # the fused outputs live for one forward only


def test_compiled_channels_last_training_rehydrates_bit_identically():
    torch.manual_seed(0)
    model = _model("threshold", True, False)
    net = model[0]
    masking.compile_masks_(net)
    model.to(memory_format=torch.channels_last)  # parameters move after compiling: layout rebuilt
    opt = torch.optim.SGD(masking.score_parameters(net) + list(model[1].parameters()), lr=5.0, momentum=0.9)
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.randint(0, 5, (4,))).backward()
        opt.step()
    fused = net.__dict__["_maskpack_fused"]
    assert any(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
               for b in fused.banks for w in b.weights)
    model.eval()
    masks = masking.extract_masks(net)
    extras = {f"backbone.{k}": v.clone() for k, v in net.named_buffers()}
    plain = _model("threshold", True, False)[0]  # a fresh twin: stripping a deep copy would break net
    masking.strip_masks_(plain)  # (a parametrized module's copy shares its class with the original)
    with torch.no_grad():
        for name in masks:  # the backbone's own weights back in place of the baked ones
            mod, leaf = name.rpartition(".")[0], name.rpartition(".")[2]
            getattr(plain.get_submodule(mod), leaf).copy_(
                net.get_submodule(mod).parametrizations[leaf].original)
    baked = rehydrate(plain, masks, extras).to(memory_format=torch.channels_last)
    with torch.no_grad():
        x = torch.randn(3, 3, 8, 8)
        assert torch.equal(baked(x), net(x))


def test_fused_and_per_layer_training_agree(tiny_net):
    def run(compiled):
        net = copy.deepcopy(tiny_net)
        masking.apply_masks_(net)
        if compiled:
            masking.compile_masks_(net)
        opt = torch.optim.SGD(masking.score_parameters(net), lr=50.0, momentum=0.9)
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(8, 3, 8, 8, generator=g)).pow(2).mean().backward()
            opt.step()
        return masking.extract_scores(net)

    a, b = run(False), run(True)
    assert any(not torch.equal(v, torch.ones_like(v)) for v in a.values())
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5) for k in a)


def test_fused_path_gives_the_weight_gradients_of_the_per_layer_path(tiny_net):
    """Runs that train the masked weights too (the fine-tune side of a comparison) get the same
    dL/dW from both paths, for every masked tensor."""
    def grads(compiled):
        net = copy.deepcopy(tiny_net)
        masking.apply_masks_(net)
        for p in net.parameters():
            p.requires_grad_(True)
        if compiled:
            masking.compile_masks_(net)
        net(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))).pow(2).mean().backward()
        if compiled:  # the weights went through a bank, not the per-layer fallback
            assert sum(len(b.weights) for b in net.__dict__["_maskpack_fused"].banks) >= 2
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    a, b = grads(False), grads(True)
    weights = [n for n in a if n.endswith("original")]
    assert weights and set(a) == set(b)
    assert all(a[n].abs().sum() > 0 and torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-6) for n in a)


def test_no_host_synchronisation_in_either_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("host synchronisation")

    for compiled in (False, True):
        model = _model("threshold", True, False, zero="3.weight")
        if compiled:
            masking.compile_masks_(model[0])
        x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))
        with monkeypatch.context() as m:
            for attr in ("__bool__", "item", "tolist"):
                m.setattr(torch.Tensor, attr, refuse)
            nn.functional.cross_entropy(model(x), y).backward()


def test_compile_strip_copy_and_errors(tiny_net):
    with pytest.raises(ConfigError, match="call apply_masks_"):
        masking.compile_masks_(tiny_net)
    masking.apply_masks_(tiny_net)
    assert masking.compile_masks_(tiny_net) == 3
    assert masking.compile_masks_(tiny_net) == 3  # again: replaces, does not stack hooks
    assert len(tiny_net._forward_pre_hooks) == 1 and len(tiny_net._forward_hooks) == 1
    twin = copy.deepcopy(tiny_net)  # the copy's hooks drive the copy's own masks
    twin(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(sm.scores.grad is not None for sm in masking.score_masks(twin).values())
    assert all(sm.scores.grad is None for sm in masking.score_masks(tiny_net).values())
    with torch.no_grad():
        before = tiny_net.eval()(torch.ones(1, 3, 8, 8))
    masking.strip_masks_(tiny_net)
    assert not tiny_net._forward_pre_hooks and not tiny_net._forward_hooks
    with torch.no_grad():
        assert torch.equal(tiny_net(torch.ones(1, 3, 8, 8)), before)


def test_compiled_model_trains_after_an_inference_mode_forward(tiny_net):
    masking.apply_masks_(tiny_net)
    masking.compile_masks_(tiny_net)
    with torch.inference_mode():  # the layout's buffers are built here, and must outlive it
        tiny_net(torch.randn(2, 3, 8, 8))
    tiny_net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(sm.scores.grad is not None for sm in masking.score_masks(tiny_net).values())


def test_an_unused_masked_layer_gets_no_gradient_and_poisons_nothing():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused, self.b = nn.Linear(5, 7), nn.Linear(5, 300), nn.Linear(7, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    def run(compiled):
        torch.manual_seed(0)
        net = Net()
        masking.apply_masks_(net)
        if compiled:
            masking.compile_masks_(net)
            torch.full((4096,), float("nan")).sum()  # leave NaN garbage for the allocator to hand out
        net(torch.randn(4, 5)).sum().backward()
        return {n: sm.scores.grad for n, sm in masking.score_masks(net).items()}

    ref, got = run(False), run(True)
    assert ref["unused.weight"] is None and got["unused.weight"] is None
    for name in ("a.weight", "b.weight"):
        assert torch.isfinite(got[name]).all() and torch.allclose(got[name], ref[name], rtol=1e-5, atol=1e-7)


def test_unfusable_tensors_keep_the_per_layer_path():
    net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)).double()
    masking.apply_masks_(net)
    assert masking.compile_masks_(net) == 0  # float64 weights: nothing fused, still correct
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    assert net[0].parametrizations.weight[0].scores.grad.abs().sum() > 0


def test_dot_matches_the_product_sum_for_any_layout():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 5, 3, 3, generator=g)
    b = torch.randn(6, 5, 3, 3, generator=g)
    expected = (a * b).sum()
    cl = torch.channels_last
    for x, y in [(a, b), (a.contiguous(memory_format=cl), b.contiguous(memory_format=cl)),
                 (a, b.contiguous(memory_format=cl)), (a[:, :4], b[:, :4])]:
        ref = expected if x.shape == a.shape else (a[:, :4] * b[:, :4]).sum()
        assert torch.allclose(masking._dot(x, y), ref, rtol=1e-5), (x.stride(), y.stride())
    p, q = torch.randn(4, 3, 1, 1, generator=g), torch.randn(4, 3, 1, 1, generator=g)  # 1x1 kernels
    q_cl = torch.empty_strided((4, 3, 1, 1), (3, 1, 3, 3)).copy_(q)  # channels_last strides
    assert p.stride() != q_cl.stride() and masking._same_layout(p, q_cl)
    assert torch.allclose(masking._dot(p, q_cl), (p * q).sum(), rtol=1e-5)


def test_dense_and_same_layout_follow_their_definitions():
    base = torch.empty(4, 1, 3)
    assert masking._dense(base) and masking._dense(base.transpose(0, 2))
    odd_unit = base.as_strided((4, 1, 3), (3, 99, 1))  # a size-1 dimension's stride is irrelevant
    assert masking._dense(odd_unit) and masking._same_layout(base, odd_unit)
    assert not masking._dense(torch.empty(2, 3)[:, :2])  # rows of 3 with a gap: not consecutive
    assert not masking._dense(torch.empty(4, 6)[:, ::2]) and not masking._dense(torch.empty(5, 4)[1:4, 1:3])
    assert not masking._same_layout(torch.empty(2, 3), torch.empty(3, 2).t())  # same shape, other order
    assert not masking._same_layout(torch.empty(2, 3), torch.empty(3, 2))


def test_count_is_exact_past_float32_integers():
    n = (1 << 24) + 3  # float32 holds every integer only up to 2**24
    ones = torch.ones(n)
    got = masking._count(ones)
    assert got.dtype == torch.float32 and got.item() == float(torch.tensor(float(n)).float())
    assert masking._count(torch.ones(5, dtype=torch.float64)).dtype == torch.float64


def test_trainer_compile_option_trains_the_same_masks():
    """``TrainConfig(compile=True)`` (``maskpack train --compile``) takes the fused path and learns
    the same masks as the per-layer path on the CPU (scores within float rounding)."""
    from maskpack.train import TrainConfig, run

    kw = dict(dataset="digits", image_size=16, epochs=1, max_steps_per_epoch=3, batch_size=16, quiet=True,
              eval_knn="never", threads=1)
    seen = {}

    def grab(event, info):
        if event == "train_start":
            seen["fused"] = "_maskpack_fused" in info["state"].model.backbone.__dict__

    plain = run(TrainConfig(**kw))
    fused = run(TrainConfig(**kw, compile=True), [grab])
    assert seen["fused"] is True
    assert plain.masks.keys() == fused.masks.keys()
    assert all(torch.equal(plain.masks[k], fused.masks[k]) for k in plain.masks)
    assert max(float((plain.scores[k] - fused.scores[k]).abs().max()) for k in plain.scores) < 1e-4
