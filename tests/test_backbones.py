import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskpack import backbone_hash, load_backbone
from maskpack.backbones.hashing import state_dict_hash
from maskpack.errors import BackboneError


def test_lite0_is_really_pretrained(lite0):
    # scikit-learn's bundled flower photo must come out as ImageNet class 985 (daisy).
    from sklearn.datasets import load_sample_image

    img = np.array(load_sample_image("flower.jpg"), dtype=np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)
    x = F.interpolate(x / 255.0, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        logits = lite0.predict_imagenet(lite0.normalize(x))
    assert int(logits.argmax()) == 985


def test_lite0_shape_and_metadata(lite0):
    assert lite0.feature_dim == 1280 and lite0.input_size == 224
    n = sum(p.numel() for p in lite0.model.parameters())
    n += sum(p.numel() for p in lite0.classifier.parameters())
    assert n == 4_652_008
    with torch.no_grad():
        feats = lite0.model(torch.zeros(2, 3, 32, 32))
    assert feats.shape == (2, 1280)
    assert not any(p.requires_grad for p in lite0.model.parameters())


def test_lite0_normalisation_is_tf_style(lite0):
    x01 = torch.tensor([0.0, 127 / 255, 1.0]).view(1, 3, 1, 1).expand(1, 3, 1, 1)
    out = lite0.normalize(x01).flatten()
    expected = torch.tensor([-127 / 128, 0.0, 128 / 128])
    assert torch.allclose(out, expected, atol=1e-6)


def test_hash_is_stable_and_order_independent(lite0):
    h = backbone_hash(lite0)
    assert len(h) == 64 and h == lite0.hash()
    sd = lite0.model.state_dict()
    reversed_sd = dict(reversed(list(sd.items())))
    assert state_dict_hash(reversed_sd) == h
    # Stable across processes: pinned value for the embedded weights.
    assert h == "b2afc3d652a619f7cc6a88fdfde37af4d582e8fbb58dbf69cffc1cbbee00e1b0"


def test_hash_changes_with_weight_dtype_and_name(tiny_net):
    sd = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    h = state_dict_hash(sd)
    changed = dict(sd)
    changed["conv1.weight"] = sd["conv1.weight"].clone()
    changed["conv1.weight"].view(-1)[0] += 1e-6
    assert state_dict_hash(changed) != h
    as_double = dict(sd)
    as_double["fc.bias"] = sd["fc.bias"].double()
    assert state_dict_hash(as_double) != h
    renamed = {("fc.b" if k == "fc.bias" else k): v for k, v in sd.items()}
    assert state_dict_hash(renamed) != h
    reshaped = dict(sd)
    reshaped["fc.weight"] = sd["fc.weight"].reshape(-1)
    assert state_dict_hash(reshaped) != h


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone("efficientnet_b99")
    with pytest.raises(BackboneError, match="unknown torchvision model"):
        load_backbone("torchvision:not_a_model")


def test_torchvision_backbone_without_weights():
    bb = load_backbone("torchvision:resnet18?weights=none")
    assert bb.feature_dim == 512 and bb.name.endswith("?weights=none")
    with torch.no_grad():
        assert bb.model(torch.zeros(1, 3, 32, 32)).shape == (1, 512)
    # Seeded: the same random backbone every time, so its hash is reproducible.
    assert load_backbone("torchvision:resnet18?weights=none").hash() == bb.hash()


def test_torchvision_weights_missing_is_a_clear_error(monkeypatch, tmp_path):
    import torchvision

    def no_download(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", no_download)
    with pytest.raises(BackboneError, match="torch hub cache"):
        load_backbone("torchvision:resnet18")


def test_timm_missing_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(BackboneError, match=r"pip install 'maskpack\[timm\]'"):
        load_backbone("timm:resnet50")


def test_lite0_from_a_local_weights_file(lite0, tmp_path):
    from safetensors.torch import save_file

    from maskpack.backbones import _lite_weights_path

    # the package's own file (with the ImageNet classifier): the embedded backbone, same hash
    bb = load_backbone("efficientnet_lite0", weights=_lite_weights_path("efficientnet_lite0"))
    assert bb.hash() == lite0.hash() and bb.classifier is not None and bb.name == "efficientnet_lite0"
    # the feature extractor alone, as safetensors: same hash, no classifier
    state = {k: v.contiguous() for k, v in lite0.model.state_dict().items()}
    save_file(state, str(tmp_path / "f.safetensors"))
    bb2 = load_backbone("efficientnet_lite0", weights=tmp_path / "f.safetensors")
    assert bb2.hash() == lite0.hash() and bb2.classifier is None
    with pytest.raises(BackboneError, match="has no ImageNet classifier"):
        bb2.predict_imagenet(torch.zeros(1, 3, 32, 32))


def test_weights_file_of_another_architecture(tiny_net, tmp_path):
    torch.save(tiny_net.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(BackboneError, match=r"tiny\.pt does not fit efficientnet_lite0 .*missing keys "
                                            r"\['_blocks.*unexpected keys \['bn1\.bias'"):
        load_backbone("efficientnet_lite0", weights=tmp_path / "tiny.pt")


def test_torchvision_from_a_local_weights_file(tmp_path):
    ref = load_backbone("torchvision:resnet18?weights=none")
    torch.save(ref.model.state_dict(), tmp_path / "r18.pth")
    bb = load_backbone("torchvision:resnet18", weights=tmp_path / "r18.pth")
    assert bb.hash() == ref.hash() and bb.feature_dim == 512 and bb.name == "torchvision:resnet18"
    with pytest.raises(BackboneError, match="random weights and a weights file"):
        load_backbone("torchvision:resnet18?weights=none", weights=tmp_path / "r18.pth")


def test_loaded_backbone_passes_through(lite0):
    assert load_backbone(lite0) is lite0
    with pytest.raises(BackboneError, match="already loaded backbone"):
        load_backbone(lite0, weights="x.pt")
