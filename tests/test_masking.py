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
    lin = nn.Linear(5, 3, bias=False)
    masking.apply_masks_(lin, detach_alpha=True)
    x = torch.randn(7, 5)
    lin(x).sum().backward()
    w = lin.parametrizations.weight.original
    grad_weff = torch.ones(7, 3).t() @ x  # d sum(x W^T) / dW
    expected = grad_weff * w  # alpha = 1 with every weight kept
    assert torch.allclose(masking.score_masks(lin)["weight"].scores.grad, expected, atol=1e-6)


def test_topk_variant_keeps_the_fraction():
    net = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 4))
    masking.apply_masks_(net, mode="topk", k=0.3)
    masks = masking.extract_masks(net)
    assert int(masks["0.weight"].sum()) == 60 and int(masks["1.weight"].sum()) == 24
    net(torch.randn(3, 10)).sum().backward()
    assert net[0].parametrizations.weight[0].scores.grad is not None
    with pytest.raises(ConfigError):
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
