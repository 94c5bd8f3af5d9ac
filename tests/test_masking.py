import pytest
import torch
import torchvision
from torch import nn

from maskpack import masking
from maskpack.errors import ConfigError


def test_default_selection_is_conv_and_linear_weights_not_bn(tiny_net):
    names = masking.apply_masks_(tiny_net)
    assert names == ["conv1.weight", "dw.weight", "fc.weight"]
    assert not any("bn" in n for n in masking.score_masks(tiny_net))


def test_mask_bias_option_and_filter_fn(tiny_net):
    names = masking.apply_masks_(tiny_net, mask_bias=True)
    assert "fc.bias" in names
    net2 = type(tiny_net)()
    names2 = masking.apply_masks_(net2, lambda m, n: isinstance(m, nn.Conv2d) and m.groups == 1)
    assert names2 == ["conv1.weight"]


def test_bn_is_never_masked_even_if_filter_says_so(tiny_net):
    names = masking.apply_masks_(tiny_net, lambda m, n: True)
    assert not any(n.startswith("bn") for n in names)


def test_forward_is_w_times_m_over_sqrt_mean(tiny_net):
    masking.apply_masks_(tiny_net)
    sm = masking.score_masks(tiny_net)["conv1.weight"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sm.scores.copy_(torch.randn(sm.scores.shape, generator=g))
    w = tiny_net.conv1.parametrizations.weight.original
    m = (sm.scores > 0).float()
    expected = w * m / torch.sqrt(m.mean())
    assert torch.allclose(tiny_net.conv1.weight, expected, rtol=1e-6, atol=0)
    # All ones at S0 = 1: the weight is unchanged.
    assert torch.equal(tiny_net.dw.weight, tiny_net.dw.parametrizations.weight.original)


def test_all_zero_mask_is_zero_not_nan(tiny_net):
    masking.apply_masks_(tiny_net)
    with torch.no_grad():
        masking.score_masks(tiny_net)["conv1.weight"].scores.fill_(-1.0)
    w = tiny_net.conv1.weight
    assert torch.isfinite(w).all() and (w == 0).all()
    out = tiny_net(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert torch.isfinite(masking.score_masks(tiny_net)["conv1.weight"].scores.grad).all()


def test_straight_through_gradient_reaches_scores_only(tiny_net):
    masking.apply_masks_(tiny_net)
    tiny_net(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
    for name, sm in masking.score_masks(tiny_net).items():
        assert sm.scores.grad is not None and sm.scores.grad.abs().sum() > 0, name
    assert tiny_net.conv1.parametrizations.weight.original.grad is None


def test_straight_through_equals_gradient_wrt_mask():
    # With alpha detached, dL/dS must equal dL/dM = dL/dW_eff * W / alpha exactly.
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=False)
    masking.apply_masks_(lin, detach_alpha=True)
    x = torch.randn(7, 5)
    lin(x).sum().backward()
    w = lin.parametrizations.weight.original
    grad_weff = torch.ones(7, 3).t() @ x  # d sum(x W^T) / dW
    expected = grad_weff * w  # alpha = 1 with every weight kept
    assert torch.equal(masking.score_masks(lin)["weight"].scores.grad, expected)


def test_topk_variant_keeps_the_fraction():
    net = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 4))
    masking.apply_masks_(net, mode="topk", k=0.3)
    masks = masking.extract_masks(net)
    assert int(masks["0.weight"].sum()) == 60 and int(masks["1.weight"].sum()) == 24
    net(torch.randn(3, 10)).sum().backward()
    assert net[0].parametrizations.weight[0].scores.grad is not None
    with pytest.raises(ConfigError, match=r"topk fraction k must be in \(0, 1\], got 0.0"):
        masking.apply_masks_(nn.Linear(2, 2), mode="topk", k=0.0)


def test_vit_attention_projections_are_maskable():
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=8, mlp_dim=16, num_classes=3)
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises it: no gradient upstream
    names = masking.apply_masks_(vit)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in names
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj.weight" in names
    assert "encoder.layers.encoder_layer_0.mlp.0.weight" in names
    assert not any("ln" in n for n in names)
    vit(torch.randn(2, 3, 16, 16)).sum().backward()
    sm = masking.score_masks(vit)["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"]
    assert sm.scores.grad is not None and sm.scores.grad.abs().sum() > 0


def test_extract_and_strip(tiny_net):
    masking.apply_masks_(tiny_net)
    with torch.no_grad():
        masking.score_masks(tiny_net)["fc.weight"].scores[0].fill_(-1)
    masks = masking.extract_masks(tiny_net)
    assert set(masks) == {"conv1.weight", "dw.weight", "fc.weight"}
    assert all(m.dtype == torch.bool for m in masks.values())
    assert masks["fc.weight"][0].sum() == 0 and masks["fc.weight"][1:].all()
    assert masking.active_fraction(masks) < 1.0
    x = torch.randn(2, 3, 8, 8)
    tiny_net.eval()
    with torch.no_grad():
        before = tiny_net(x)
    masking.strip_masks_(tiny_net)
    assert not masking.is_masked(tiny_net)
    with torch.no_grad():
        assert torch.equal(tiny_net(x), before)


def test_double_masking_is_refused(tiny_net):
    masking.apply_masks_(tiny_net)
    with pytest.raises(ConfigError, match="already has masks"):
        masking.apply_masks_(tiny_net)


def test_nothing_selected_is_an_error():
    with pytest.raises(ConfigError, match="nothing to mask"):
        masking.apply_masks_(nn.BatchNorm1d(3))


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.7, 1.0])
def test_fused_backward_matches_autograd_reference(scale, detach_alpha, density):
    # The hand-written backward must equal autograd through the straight-through formula.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 6, 3, dtype=torch.float64, generator=g)
    s = torch.randn(4, 6, 3, dtype=torch.float64, generator=g)
    thr = float(torch.quantile(s.flatten(), 1 - density)) - 1e-9 if 0 < density < 1 else (
        -99.0 if density == 1 else 99.0)
    upstream = torch.randn(4, 6, 3, dtype=torch.float64, generator=g)
    s_ref = s.clone().requires_grad_()
    m_ste = (s_ref - s_ref.detach()) + (s_ref > thr).double()
    ref = masking.masked_weight(w, m_ste, scale=scale, detach_alpha=detach_alpha)
    (ref * upstream).sum().backward()
    s_new = s.clone().requires_grad_()
    out = masking._MaskedWeight.apply(w, s_new, s_new.detach() > thr, scale, detach_alpha)
    (out * upstream).sum().backward()
    assert torch.equal(out, ref.detach())
    assert torch.allclose(s_new.grad, s_ref.grad, rtol=0, atol=1e-12)


def _reference_and_fused(w, s, thr, scale, detach_alpha, upstream, *, weight_grad=False, score_grad=True):
    """(autograd reference, fused op) after one backward: their outputs and the leaves' grads."""
    runs = []
    for fused in (False, True):
        wl = w.clone().requires_grad_(weight_grad)
        sl = s.clone().requires_grad_(score_grad)
        if fused:
            out = masking._MaskedWeight.apply(wl, sl, sl.detach() > thr, scale, detach_alpha)
        else:
            m_ste = (sl - sl.detach()) + (sl > thr).double()
            out = masking.masked_weight(wl, m_ste, scale=scale, detach_alpha=detach_alpha)
        (out * upstream).sum().backward()
        runs.append((out.detach(), wl.grad, sl.grad))
    return runs


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("score_grad", [True, False])
def test_fused_backward_gives_the_weight_gradient_too(scale, score_grad):
    # fft-style runs train the masked weights themselves: dL/dW = g * M / alpha (or g * M)
    g = torch.Generator().manual_seed(4)
    w, s, up = (torch.randn(5, 7, dtype=torch.float64, generator=g) for _ in range(3))
    (ref, ref_w, ref_s), (out, got_w, got_s) = _reference_and_fused(w, s, 0.2, scale, False, up,
                                                                   weight_grad=True, score_grad=score_grad)
    assert torch.equal(out, ref) and got_w is not None
    assert torch.allclose(got_w, ref_w, rtol=0, atol=1e-12)
    assert (got_s is None) == (not score_grad)


def test_fused_backward_on_a_one_element_tensor():
    w, s, up = (torch.tensor([v], dtype=torch.float64) for v in (0.7, 0.3, 1.3))
    (ref, _, ref_s), (out, _, got_s) = _reference_and_fused(w, s, 0.0, True, False, up)
    assert torch.equal(out, ref) and torch.allclose(got_s, ref_s, rtol=0, atol=1e-12)


def test_alpha_passes_no_gradient_at_its_floor():
    # Exactly one weight kept: mean(M) = 1/n sits on the clamp's floor, so the score gradient is
    # the plain straight-through term g * W / alpha (documented choice at the kink).
    w = torch.linspace(-1, 1, 12, dtype=torch.float64)
    s = torch.full((12,), -1.0, dtype=torch.float64)
    s[5] = 1.0
    up = torch.linspace(0.5, 2, 12, dtype=torch.float64)
    s.requires_grad_()
    masking._MaskedWeight.apply(w, s, s.detach() > 0, True, False).mul(up).sum().backward()
    assert torch.allclose(s.grad, up * w * 12 ** 0.5, rtol=0, atol=1e-12)
    assert float(masking.inverse_alpha(torch.zeros(1))) == 1.0  # floor 1/numel, numel 1
    # two kept: above the floor, alpha's gradient is back (equal to autograd's)
    s2 = s.detach().clone()
    s2[7] = 1.0
    (ref, _, ref_s), (_, _, got_s) = _reference_and_fused(w, s2, 0.0, True, False, up)
    assert torch.allclose(got_s, ref_s, rtol=0, atol=1e-12) and not torch.allclose(got_s, up * w * 6 ** 0.5)


def test_masked_weight_passes_the_gradient_through_alpha_by_default():
    w = torch.linspace(-1, 1, 6)
    m = torch.tensor([1.0, 1, 0, 1, 0, 1], requires_grad=True)
    masking.masked_weight(w, m).sum().backward()
    through = m.grad.clone()
    m.grad = None
    masking.masked_weight(w, m, detach_alpha=True).sum().backward()
    assert not torch.allclose(through, m.grad)


def test_defaults_are_the_papers():
    sm = masking.ScoreMask(torch.Size([4, 3]))
    assert bool((sm.scores == 1.0).all()) and sm.mode == "threshold" and sm.threshold == 0.0
    assert sm.k == 0.9 and sm.scale is True and sm.detach_alpha is False
    net = nn.Linear(3, 4, bias=False)
    masking.apply_masks_(net)
    sm = masking.score_masks(net)["weight"]
    assert bool((sm.scores == 1.0).all()) and (sm.mode, sm.threshold, sm.k) == ("threshold", 0.0, 0.9)
    assert sm.scale is True and sm.detach_alpha is False
    w = torch.arange(4.0)
    m = torch.tensor([1.0, 0, 0, 1])
    assert torch.equal(masking.masked_weight(w, m), w * m * 2 ** 0.5)  # scale on by default
    scores = torch.tensor([-1.0, 0.0, 1e-9, 5.0])
    assert masking.mask_from_scores(scores).tolist() == [False, False, True, True]  # S > 0
    assert int(masking.mask_from_scores(torch.arange(20.0), mode="topk").sum()) == 18  # k = 0.9


def test_apply_masks_passes_every_option_on():
    net = nn.Linear(3, 4)
    masking.apply_masks_(net, mask_bias=True, init=0.5, threshold=0.25, scale=False, detach_alpha=True)
    for sm in masking.score_masks(net).values():
        assert (sm.threshold, sm.scale, sm.detach_alpha) == (0.25, False, True)
        assert bool((sm.scores == 0.5).all())
    with torch.no_grad():
        assert torch.equal(net.weight, net.parametrizations.weight.original)  # scale off: W * 1


def test_topk_scores_are_seeded_and_kaiming_uniform():
    def scores(seed=None, shape=(6, 3, 2, 2)):
        net = nn.Conv2d(3, 6, 2, bias=False) if len(shape) == 4 else nn.Linear(shape[1], shape[0])
        kw = {} if seed is None else {"seed": seed}
        masking.apply_masks_(net, mode="topk", k=0.5, **kw)
        return masking.score_masks(net)["weight"].scores.detach()

    torch.manual_seed(123)
    default, zero, one = scores(), scores(0), scores(1)
    assert torch.equal(default, zero) and not torch.equal(zero, one)  # seed 0 by default
    bound = 1 / 12 ** 0.5  # fan-in 3 * 2 * 2
    big = scores(0, (2000, 12))
    assert float(big.min()) >= -bound and float(big.max()) <= bound
    assert float(big.min()) < -0.9 * bound and float(big.max()) > 0.9 * bound
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = masking.ScoreMask(torch.Size([50]), mode="topk", generator=g1).scores.detach()
    torch.rand(3)  # the global generator moves; the explicit one decides
    b = masking.ScoreMask(torch.Size([50]), mode="topk", generator=g2).scores.detach()
    assert torch.equal(a, b) and float(a.abs().max()) > 0.9  # fan-in 1 for a vector: bound 1


def test_topk_fraction_limits_and_messages():
    assert int(masking.mask_from_scores(torch.arange(10.0), mode="topk", k=0.01).sum()) == 1  # at least one
    assert masking.ScoreMask(torch.Size([4]), mode="topk", k=1.0).k == 1.0
    for k in (0.0, 1.5):
        with pytest.raises(ConfigError, match=rf"topk fraction k must be in \(0, 1\], got {k}"):
            masking.ScoreMask(torch.Size([4]), mode="topk", k=k)
    with pytest.raises(ConfigError, match="unknown mask mode 'best': use 'threshold' or 'topk'"):
        masking.ScoreMask(torch.Size([4]), mode="best")
    with pytest.raises(ConfigError, match="unknown mask mode 'best': use 'threshold' or 'topk'"):
        masking.mask_from_scores(torch.zeros(3), mode="best")
    out = masking.masks_from_scores({"a": torch.tensor([3.0, -1, 2]), "b": torch.zeros(2)}, mode="topk",
                                    k=0.5)
    assert out["a"].tolist() == [True, False, True] and out["b"].sum() == 1
    assert out["a"].dtype == torch.bool and out["a"].device.type == "cpu"


class _Odd(nn.Module):
    """A parameter slot left empty before a real one, and a bias on a module that is not a layer."""

    def __init__(self):
        super().__init__()
        self.register_parameter("first", None)
        self.weight = nn.Parameter(torch.ones(2))
        self.bias = nn.Parameter(torch.zeros(2))
        self.in_proj_bias = nn.Parameter(torch.zeros(2))


def test_selection_rules():
    lin = nn.Linear(2, 3)
    assert [n for n, _, _ in masking.select_parameters(lin)] == ["weight"]  # no bias unless asked
    assert [n for n, _, _ in masking.select_parameters(lin, mask_bias=True)] == ["weight", "bias"]
    net = nn.Sequential(nn.Sequential(nn.Conv1d(2, 2, 1), nn.LayerNorm(2)), nn.Embedding(4, 2),
                        nn.MultiheadAttention(4, 2), _Odd())
    names = [n for n, _, _ in masking.select_parameters(net, mask_bias=True)]
    assert names == ["0.0.weight", "0.0.bias", "2.in_proj_weight", "2.in_proj_bias", "2.out_proj.weight",
                     "2.out_proj.bias"]
    assert [n for n, _, _ in masking.select_parameters(net)] == ["0.0.weight", "2.in_proj_weight",
                                                                 "2.out_proj.weight"]
    odd = [n for n, _, _ in masking.select_parameters(_Odd(), lambda m, n: True)]
    assert odd == ["weight", "bias", "in_proj_bias"]  # the empty slot is skipped, the rest still seen
    assert masking.select_parameters(_Odd(), mask_bias=True) == []  # not a layer: no bias of its own


def test_active_fractions():
    masks = {"a": torch.tensor([True, False, False, False]), "b": torch.zeros(0, dtype=torch.bool),
             "c": torch.zeros(1, dtype=torch.bool)}
    assert masking.active_fraction(masks) == 0.2
    assert masking.active_fraction({"c": masks["c"]}) == 0.0
    assert masking.active_fraction({}) == 1.0
    assert masking.per_layer_active(masks) == {"a": 0.25, "b": 1.0, "c": 0.0}
    net = nn.Linear(2, 2, bias=False)
    masking.apply_masks_(net)
    with torch.no_grad():
        masking.score_masks(net)["weight"].scores[0, 0] = -1.0
    assert masking.active_fraction(net) == 0.75 and masking.per_layer_active(net) == {"weight": 0.75}


def test_masking_messages_are_exact():
    net = nn.Linear(2, 2)
    masking.apply_masks_(net)
    with pytest.raises(ConfigError) as info:
        masking.apply_masks_(net)
    assert str(info.value) == "model already has masks: call strip_masks_() or use a fresh copy"
    with pytest.raises(ConfigError) as info:
        masking.apply_masks_(nn.Linear(2, 2), lambda m, n: False)
    assert str(info.value) == "no parameter matched the mask filter: nothing to mask"
