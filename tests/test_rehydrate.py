import copy

import pytest
import torch
from torch import nn

from maskpack import backbone_hash, masking
from maskpack.errors import FormatError
from maskpack.model import TaskModel
from maskpack.rehydrate import TaskHost, rehydrate


def _train_a_little(backbone: nn.Module, feat: int, classes: int, seed: int, steps: int = 3, size: int = 16):
    """A masked task model after a few real SGD steps (scores, head and BN stats all change)."""
    torch.manual_seed(seed)
    net = copy.deepcopy(backbone)
    masking.apply_masks_(net)
    model = TaskModel(net, nn.Linear(feat, classes))
    opt = torch.optim.SGD([{"params": masking.score_parameters(net), "lr": 50.0},
                           {"params": model.head.parameters(), "lr": 0.1}], momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, 3, size, size), torch.randint(0, classes, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    masks = masking.extract_masks(net)
    extras = {f"head.{k}": v.detach().clone() for k, v in model.head.state_dict().items()}
    extras.update({f"backbone.{k}": v.clone() for k, v in net.named_buffers()})
    return model, masks, extras


def test_rehydrated_lite0_is_bit_identical(lite0):
    before = backbone_hash(lite0.model)  # recomputed, not Backbone.hash()'s cached value
    model, masks, extras = _train_a_little(lite0.model, 1280, 5, seed=0)
    assert masking.active_fraction(masks) < 1.0  # the steps really flipped weights
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = rehydrate(lite0, masks, extras)(x)
    assert torch.equal(expected, got)
    # The backbone itself is untouched: rehydrate baked a copy.
    assert backbone_hash(lite0.model) == before and not masking.is_masked(lite0.model)


def test_task_switching_in_place_is_bit_identical(tiny_net):
    a_model, a_masks, a_extras = _train_a_little(tiny_net, 16, 3, seed=1, size=8)
    b_model, b_masks, b_extras = _train_a_little(tiny_net, 16, 4, seed=2, size=8)
    before = backbone_hash(tiny_net)
    host = TaskHost(tiny_net)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        for model, masks, extras in [(a_model, a_masks, a_extras), (b_model, b_masks, b_extras),
                                     (a_model, a_masks, a_extras)]:
            out = host.switch_(masks, extras)(x)
            assert torch.equal(out, model(x))
        # Back to the plain backbone: a task with no masks and no extras restores every tensor.
        host.switch_({}, {})
        assert backbone_hash(tiny_net) == before  # the host switched its own copy
        assert torch.equal(host.model(x), tiny_net.eval()(x))
        assert backbone_hash(host.model.backbone) == before


def test_all_zero_mask_rehydrates_without_nan(tiny_net):
    masks = {"conv1.weight": torch.zeros(8, 3, 3, 3, dtype=torch.bool)}
    model = rehydrate(tiny_net, masks)
    assert (model.backbone.conv1.weight == 0).all()
    assert torch.isfinite(model(torch.randn(1, 3, 8, 8))).all()


def test_bad_masks_and_extras_name_the_tensor(tiny_net):
    with pytest.raises(FormatError, match=r"masked tensor 'nope.weight' does not exist in this backbone; was "
                                          r"the mask made for another architecture\?"):
        rehydrate(tiny_net, {"nope.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(FormatError, match="'conv1.weight' has shape"):
        rehydrate(tiny_net, {"conv1.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(FormatError, match="dtype"):
        rehydrate(tiny_net, {"conv1.weight": torch.ones(8, 3, 3, 3)})
    with pytest.raises(FormatError, match="'backbone.bn1.running_mean' has shape"):
        rehydrate(tiny_net, {}, {"backbone.bn1.running_mean": torch.zeros(3)})
    with pytest.raises(FormatError, match="neither"):
        rehydrate(tiny_net, {}, {"other.x": torch.zeros(3)})


def test_bfloat16_extras_rehydrate_and_switch_exactly(tiny_net):
    """Extras stored in bfloat16 (a task defined in that precision) load into the float32 model
    exactly: rehydrate and TaskHost.switch_ give the outputs of the model holding the rounded values."""
    from maskpack.extras import cast_extras, round_tensors_

    model, masks, extras = _train_a_little(tiny_net, 16, 3, seed=3, size=8)
    state = model.state_dict()
    round_tensors_(((k, state[k]) for k in extras), "bfloat16")  # the task as defined
    stored = cast_extras({k: state[k] for k in extras}, "bfloat16")
    assert stored["head.weight"].dtype == torch.bfloat16
    assert stored["backbone.bn1.num_batches_tracked"].dtype == torch.int64
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(rehydrate(tiny_net, masks, stored)(x), expected)
        assert torch.equal(TaskHost(tiny_net).switch_(masks, stored)(x), expected)
