"""timm backbones and local weights files: build, mask, train, pack and load bit-exactly (offline).

Models come from timm with random weights (seeded) and go through a weights file, as a user
behind a firewall would do with downloaded weights.
"""

import pytest
import torch
from click.testing import CliRunner

timm = pytest.importorskip("timm")

import maskpack  # noqa: E402
from maskpack import load_backbone, masking  # noqa: E402
from maskpack.errors import BackboneError, BackboneMismatchError, ConfigError  # noqa: E402
from maskpack.train import TrainConfig, run  # noqa: E402

_TEST_MODELS = set(timm.list_models("test_*"))
# timm's tiny test models when this timm has them, else the smallest real ones
CNN = "test_resnet" if "test_resnet" in _TEST_MODELS else "resnet10t"
VIT = "test_vit" if "test_vit" in _TEST_MODELS else "vit_tiny_patch16_224"
CONVNEXT = "test_convnext" if "test_convnext" in _TEST_MODELS else "convnext_atto"
SUBSET = list(range(48))


def _weights_file(path, arch, seed=0, headless=False, fmt="safetensors", **kwargs):
    """Save a seeded random timm model's state dict (with its classifier unless ``headless``)."""
    torch.manual_seed(seed)
    net = timm.create_model(arch, pretrained=False, **kwargs)
    if headless:
        net.reset_classifier(0)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path), net.eval()


@pytest.mark.parametrize("arch", [CNN, VIT, CONVNEXT])
def test_timm_backbone_from_a_weights_file(tmp_path, arch):
    path, full = _weights_file(tmp_path / "w.safetensors", arch)
    bb = load_backbone(f"timm:{arch}", weights=path)
    cfg = timm.data.resolve_model_data_config(full)
    assert bb.name == f"timm:{arch}" and bb.weights == path
    assert bb.feature_dim == full.num_features
    assert bb.input_size == cfg["input_size"][-1] and bb.mean == cfg["mean"] and bb.std == cfg["std"]
    assert not any(p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    size = bb.input_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = bb.model(x)
        assert feats.shape == (2, bb.feature_dim)
        # the detached classifier on the features gives the full model's logits
        torch.testing.assert_close(bb.predict_imagenet(x), full(x))
    # the same weights saved without the classifier (and with torch.save): the same backbone
    headless, _ = _weights_file(tmp_path / "h.pt", arch, headless=True, fmt="torch")
    bb2 = load_backbone(f"timm:{arch}", weights=headless)
    assert bb2.classifier is None and bb2.hash() == bb.hash()
    assert sorted(bb.model.state_dict()) == sorted(timm.create_model(arch, num_classes=0).state_dict())


def test_weights_file_that_does_not_fit_names_the_file_and_keys(tmp_path):
    path, _ = _weights_file(tmp_path / "resnet.safetensors", CNN)
    with pytest.raises(BackboneError, match=r"resnet\.safetensors does not fit timm:.*missing keys.*"
                                            r"unexpected keys"):
        load_backbone(f"timm:{VIT}", weights=path)
    torch.manual_seed(0)
    drop = "layer1.0.conv1.weight"
    partial = {k: v for k, v in timm.create_model(CNN).state_dict().items() if k != drop}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(BackboneError, match=r"partial\.pt does not fit .*missing keys "
                                            r"\['layer1\.0\.conv1\.weight'\]$"):
        load_backbone(f"timm:{CNN}", weights=tmp_path / "partial.pt")


def test_weights_file_errors(tmp_path):
    import datetime

    with pytest.raises(BackboneError, match="nope.pt does not exist"):
        load_backbone(f"timm:{CNN}", weights=tmp_path / "nope.pt")
    torch.save({"when": datetime.datetime(2026, 1, 1)}, tmp_path / "pickled.pt")  # not weights_only
    with pytest.raises(BackboneError, match=r"pickled\.pt is neither safetensors nor .*weights_only"):
        load_backbone(f"timm:{CNN}", weights=tmp_path / "pickled.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(BackboneError, match=r"bad\.safetensors is not a readable safetensors file"):
        load_backbone(f"timm:{CNN}", weights=tmp_path / "bad.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(BackboneError, match=r"list\.pt holds list, not a state dict"):
        load_backbone(f"timm:{CNN}", weights=tmp_path / "list.pt")


def test_timm_names_and_options():
    with pytest.raises(BackboneError, match="unknown timm model 'no_such_net'"):
        load_backbone("timm:no_such_net")
    with pytest.raises(BackboneError, match="'num_classes' in backbone .* is set by maskpack"):
        load_backbone(f"timm:{CNN}?num_classes=10")
    with pytest.raises(BackboneError, match="does not take the option"):
        load_backbone(f"timm:{CNN}?no_such_option=1&weights=none")
    with pytest.raises(BackboneError, match="only 'weights=none' goes in the name"):
        load_backbone(f"timm:{CNN}?weights=/tmp/x.pt")
    with pytest.raises(BackboneError, match="random weights .* and a weights file"):
        load_backbone(f"timm:{CNN}?weights=none", weights="x.pt")
    bb = load_backbone(f"timm:{CNN}?weights=none")  # seeded: the same random network every time
    assert bb.hash() == load_backbone(f"timm:{CNN}?weights=none").hash()
    assert load_backbone(bb) is bb


def test_vit_input_size_is_checked_and_img_size_resamples(tmp_path):
    path, _ = _weights_file(tmp_path / "vit.safetensors", VIT)
    bb = load_backbone(f"timm:{VIT}", weights=path)
    with pytest.raises(ConfigError, match=rf"takes {bb.input_size}x{bb.input_size} images only, got "
                                          r"32x32: use --image-size .*img_size=N"):
        bb.model(torch.zeros(1, 3, 32, 32))
    # weights trained at the model's size load into a 32 px build: timm's checkpoint filter
    # resamples the position embeddings (patch 16: 2x2 patches + the class token)
    small = load_backbone(f"timm:{VIT}?img_size=32", weights=path)
    assert small.input_size == 32 and small.model.pos_embed.shape[1] == 1 + 4
    with torch.no_grad():
        assert small.model(torch.zeros(2, 3, 32, 32)).shape == (2, small.feature_dim)


def test_what_gets_masked_per_family():
    vit = load_backbone(f"timm:{VIT}?img_size=32&weights=none").model
    names = [n for n, _, _ in masking.select_parameters(vit)]
    depth = len(vit.blocks)
    assert names[0] == "patch_embed.proj.weight"
    for i in range(depth):  # attention (qkv, proj) and MLP (fc1, fc2) of every block
        assert [f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.proj.weight", f"blocks.{i}.mlp.fc1.weight",
                f"blocks.{i}.mlp.fc2.weight"] == names[1 + 4 * i: 5 + 4 * i]
    assert len(names) == 1 + 4 * depth  # no norms, biases, position embeddings or class token
    cnn = load_backbone(f"timm:{CNN}?weights=none").model
    cnn_names = [n for n, _, _ in masking.select_parameters(cnn)]
    convs = [n + ".weight" for n, m in cnn.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert cnn_names == convs and any(n.startswith("conv1") for n in convs)  # the stem is masked too
    cnx = load_backbone(f"timm:{CONVNEXT}?weights=none").model
    cnx_names = [n for n, _, _ in masking.select_parameters(cnx)]
    assert "stem.0.weight" in cnx_names and any(n.endswith("conv_dw.weight") for n in cnx_names)
    assert any(n.endswith("mlp.fc1.weight") for n in cnx_names)
    for net, masked in ((vit, names), (cnn, cnn_names), (cnx, cnx_names)):
        norms = {n for n, m in net.named_modules() if isinstance(m, masking._NORM_TYPES)}
        assert norms and not any(n.rpartition(".")[0] in norms for n in masked)


def _train(tmp_path, name, path, **kw):
    base = dict(backbone=name, backbone_weights=path, dataset="digits", image_size=32, epochs=1,
                max_steps_per_epoch=2, batch_size=8, train_indices=SUBSET, lr=1.0, quiet=True, threads=1,
                eval_every=0, eval_knn="never", bn_reestimate_batches=2, out=str(tmp_path / "run"))
    base.update(kw)
    return run(TrainConfig(**base))


@pytest.mark.parametrize("arch,name", [(CNN, f"timm:{CNN}"), (VIT, f"timm:{VIT}?img_size=32"),
                                       (CONVNEXT, f"timm:{CONVNEXT}")])
def test_train_pack_load_is_bit_exact(tmp_path, arch, name):
    kw = {"img_size": 32} if "img_size" in name else {}
    path, _ = _weights_file(tmp_path / "w.safetensors", arch, **kw)
    # the default recipe (mask_layers last:25, bn_mode masked): with no BatchNorm in a ViT or a
    # ConvNeXt, the BN mode has nothing to adapt and the run goes on
    r = _train(tmp_path, name, path)
    assert r.config.bn_mode == "masked" and 0.0 < r.metrics["active"] < 1.0
    mf = maskpack.read(r.task_path)
    bb = load_backbone(name, weights=path)
    assert mf.backbone_name == name and mf.backbone_hash == bb.hash()
    loaded = maskpack.load(r.task_path, backbone=bb)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), r.model.eval()(x))
    if arch == VIT:
        assert {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.weight"} <= set(mf.per_layer_active())


def test_mask_refuses_other_weights_and_says_how_to_load(tmp_path):
    path, _ = _weights_file(tmp_path / "w.safetensors", CNN)
    r = _train(tmp_path, f"timm:{CNN}", path)
    other, _ = _weights_file(tmp_path / "other.safetensors", CNN, seed=1)
    with pytest.raises(BackboneMismatchError, match="--backbone-weights PATH"):
        maskpack.load(r.task_path, backbone=load_backbone(f"timm:{CNN}", weights=other))


def test_bn_mode_head_on_layernorm_only_backbone(tmp_path):
    path, _ = _weights_file(tmp_path / "w.safetensors", CONVNEXT)
    r = _train(tmp_path, f"timm:{CONVNEXT}", path, bn_mode="head", method="topk")
    assert r.task_path.exists() and r.metrics["active"] < 1.0


def test_cli_backbone_weights(tmp_path):
    from maskpack.cli import main

    path, _ = _weights_file(tmp_path / "w.safetensors", CNN)
    out = tmp_path / "run"
    cli = CliRunner()
    res = cli.invoke(main, ["train", "--backbone", f"timm:{CNN}", "--backbone-weights", path,
                            "--dataset", "digits", "--image-size", "32", "--epochs", "1", "--max-steps", "2",
                            "--batch-size", "8", "--knn", "never", "--lr", "1", "--threads", "1", "-q",
                            "--keep-checkpoint", "--out", str(out)])
    assert res.exit_code == 0, res.output
    task = out / "task.mask"
    res = cli.invoke(main, ["verify", str(task), "--backbone-weights", path])
    assert res.exit_code == 0 and res.output.startswith("OK:"), res.output
    res = cli.invoke(main, ["unpack", str(task), "-o", str(tmp_path / "t.safetensors"),
                            "--backbone-weights", path])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "t.safetensors"))
    ref = maskpack.load(task, backbone=load_backbone(f"timm:{CNN}", weights=path)).state_dict()
    assert all(torch.equal(state[k], v) for k, v in ref.items())
    res = cli.invoke(main, ["pack", str(out), "-o", str(tmp_path / "re.mask")])  # weights from the run
    assert res.exit_code == 0, res.output
    res = cli.invoke(main, ["eval", str(task), "--backbone-weights", path, "--no-knn", "--no-probe",
                            "--no-baseline", "--json"])
    assert res.exit_code == 0 and '"accuracy"' in res.output, res.output
    other, _ = _weights_file(tmp_path / "other.safetensors", CNN, seed=1)
    res = cli.invoke(main, ["verify", str(task), "--backbone-weights", other])
    assert res.exit_code == 1 and "--backbone-weights PATH" in res.output
