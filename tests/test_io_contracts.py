"""maskpack.io's narrow promises, each checked on its own: file order of prefixed masks, the
contexts cache on save, caller limits passed through to every check, messages that name the file,
and the loaders of fine-tuned weights and task files."""

import re

import pytest
import torch

import maskpack
from maskpack import io
from maskpack.errors import BackboneMismatchError, FormatError
from maskpack.masking import select_parameters


def _masks(net, seed=0, keep=0.8):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(getattr(mod, p).shape, generator=g) < keep
            for name, mod, p in select_parameters(net)}


def test_a_tensors_own_mask_comes_before_prefixed_ones_whatever_the_dict_order(tmp_path, tiny_net):
    base = _masks(tiny_net)
    delta = {f"expert{k}/conv1.weight": _masks(tiny_net, k)["conv1.weight"] for k in (2, 1)}
    masks = {**delta, **base}  # prefixed names first in the caller's dict
    maskpack.save(tmp_path / "c.mask", masks, tiny_net)
    mf = maskpack.read(tmp_path / "c.mask")
    names = [t.name for t in mf.tensors]
    assert names[:3] == ["conv1.weight", "expert2/conv1.weight", "expert1/conv1.weight"]
    got = mf.masks(tiny_net)
    assert all(torch.equal(got[n], masks[n]) for n in masks)


def test_saving_with_ans_fills_the_contexts_cache_of_that_backbone(tmp_path, tiny_net):
    io._CONTEXTS.clear()
    masks = _masks(tiny_net)
    maskpack.save(tmp_path / "z.mask", masks, tiny_net, codec="zstd")
    assert io._CONTEXTS == {}
    maskpack.save(tmp_path / "a.mask", masks, tiny_net, codec="ans")
    h = maskpack.backbone_hash(tiny_net)
    assert set(io._CONTEXTS) == {(h, n) for n in masks}
    io._CONTEXTS.clear()


def test_the_hash_mismatch_message_is_exact(tmp_path, tiny_net):
    maskpack.save(tmp_path / "t.mask", _masks(tiny_net), tiny_net)
    other = type(tiny_net)()
    ha, hb = maskpack.backbone_hash(tiny_net), maskpack.backbone_hash(other)
    expected = (f"{tmp_path / 't.mask'} was made for backbone 'TinyNet' (sha256 {ha}), but the given "
                f"backbone 'TinyNet' has sha256 {hb}: load it with the backbone it was trained on "
                "(trained on a local weights file: backbone=load_backbone(name, weights=PATH), CLI "
                "--backbone-weights PATH)")
    with pytest.raises(BackboneMismatchError) as info:
        maskpack.read(tmp_path / "t.mask").masks(other)
    assert str(info.value) == expected


def test_read_extras_takes_the_callers_limit_and_names_the_file(tmp_path, tiny_net):
    extras = {"head.weight": torch.arange(64.0)}  # 256 bytes of data in the safetensors blob
    maskpack.save(tmp_path / "e.mask", _masks(tiny_net), tiny_net, extras=extras)
    mf = maskpack.read(tmp_path / "e.mask")
    size = mf._info.extras.size
    with pytest.raises(FormatError, match=re.escape(f"{tmp_path / 'e.mask'}: extras declare {size:,} bytes, "
                                                    f"more than the limit {size - 1:,}")):
        mf.read_extras(max_bytes=size - 1)
    assert torch.equal(mf.read_extras(max_bytes=size)["head.weight"], extras["head.weight"])


def test_masks_and_verify_pass_the_element_limit_on(tmp_path, tiny_net):
    masks = _masks(tiny_net)
    total = sum(m.numel() for m in masks.values())
    maskpack.save(tmp_path / "t.mask", masks, tiny_net, codec="zstd")
    mf = maskpack.read(tmp_path / "t.mask")
    msg = re.escape(f"{tmp_path / 't.mask'}: the masks declare {total:,} elements in total, more than "
                    f"the limit {total - 1:,}")
    with pytest.raises(FormatError, match=msg):
        mf.masks(tiny_net, max_elements=total - 1)
    with pytest.raises(FormatError, match=msg):
        mf.verify(tiny_net, max_elements=total - 1)
    with pytest.raises(FormatError, match=msg):
        mf.verify(max_elements=total - 1)  # zstd decodes without the backbone
    mf.verify(tiny_net, max_elements=total)
    assert all(torch.equal(v, masks[k]) for k, v in mf.masks(max_elements=total).items())


def _task_state(net) -> dict[str, torch.Tensor]:
    """A fine-tune's TaskModel state dict over ``net`` with a 3-class head."""
    state = {f"backbone.{k}": v.clone() + 0.5 if v.is_floating_point() else v.clone()
             for k, v in net.state_dict().items()}
    state["head.weight"], state["head.bias"] = torch.randn(3, 16), torch.randn(3)
    return state


def _backbone(net):
    from maskpack.backbones import Backbone

    return Backbone("tiny", net, 16, 8, (0.5,) * 3, (0.25,) * 3)


def test_finetuned_weights_round_trip_with_their_metadata(tmp_path, tiny_net):
    state = _task_state(tiny_net)
    io.save_finetuned(tmp_path / "m.safetensors", state, {"method": "fft", "dataset": "digits"})
    got, meta = io.load_finetuned(tmp_path / "m.safetensors")
    assert meta == {"method": "fft", "dataset": "digits"}
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert not io.is_mask_file(tmp_path / "m.safetensors")
    maskpack.save(tmp_path / "t.mask", _masks(tiny_net), tiny_net)
    assert io.is_mask_file(tmp_path / "t.mask")
    io.save_finetuned(tmp_path / "h.safetensors", {"head.weight": torch.ones(2, 2)}, {})
    with pytest.raises(FormatError, match=re.escape(f"{tmp_path / 'h.safetensors'} holds no 'backbone.*' "
                                                    "tensors: expected the model.safetensors of a")):
        io.load_finetuned(tmp_path / "h.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(FormatError, match=re.escape(f"{tmp_path / 'bad.safetensors'} is not a readable "
                                                    "safetensors file (")):
        io.load_finetuned(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="No such file"):
        io.load_finetuned(tmp_path / "none.safetensors")


def test_load_task_reads_a_fine_tune_a_mask_file_or_a_run_directory(tmp_path, tiny_net):
    bb = _backbone(tiny_net)
    state = _task_state(tiny_net)
    (tmp_path / "fft").mkdir()
    io.save_finetuned(tmp_path / "fft" / "model.safetensors", state, {"method": "fft"})
    x = torch.randn(2, 3, 8, 8)
    for path in (tmp_path / "fft", tmp_path / "fft" / "model.safetensors"):
        model, meta = io.load_task(path, bb)
        assert meta == {"method": "fft"} and not model.training
        got = model.state_dict()
        assert all(torch.equal(got[k], state[k]) for k in state)
    assert all(torch.equal(p, q) for p, q in zip(tiny_net.parameters(), bb.model.parameters(), strict=True))
    masks = _masks(tiny_net)
    extras = {"head.weight": torch.randn(3, 16), "head.bias": torch.randn(3)}
    (tmp_path / "mask").mkdir()
    maskpack.save(tmp_path / "mask" / "task.mask", masks, bb, extras=extras, metadata={"method": "mask"})
    model, meta = io.load_task(tmp_path / "mask", bb)
    ref = maskpack.load(tmp_path / "mask" / "task.mask", bb)
    assert meta == {"method": "mask"} and torch.equal(model(x), ref(x))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=re.escape(f"run directory {tmp_path / 'empty'} holds no task.mask "
                                                    "or model.safetensors yet")):
        io.load_task(tmp_path / "empty", bb)
    with pytest.raises(FileNotFoundError, match="No such file"):
        io.load_task(tmp_path / "none.mask", bb)
    wide = {**state, "backbone.fc.weight": torch.zeros(16, 9)}
    io.save_finetuned(tmp_path / "w.safetensors", wide, {})
    with pytest.raises(FormatError, match=re.escape(f"{tmp_path / 'w.safetensors'} does not match backbone "
                                                    "'tiny': ")):
        io.load_task(tmp_path / "w.safetensors", bb)


def test_write_text_replaces_the_file_whole(tmp_path):
    io.write_text(tmp_path / "c.json", "{\"a\": 1}\n")
    io.write_text(tmp_path / "c.json", "{}\n")
    assert (tmp_path / "c.json").read_text() == "{}\n"
    assert io.leftover_temp_files(tmp_path) == []


def test_missing_files_raise_enoent_with_their_name(tmp_path, tiny_net):
    import errno

    for call in (lambda p: io.load_finetuned(p), lambda p: io.load_task(p, _backbone(tiny_net))):
        with pytest.raises(FileNotFoundError) as info:
            call(tmp_path / "none.safetensors")
        assert info.value.errno == errno.ENOENT and info.value.filename == str(tmp_path / "none.safetensors")


def test_load_task_refuses_a_fine_tune_missing_a_tensor(tmp_path, tiny_net):
    state = _task_state(tiny_net)
    del state["backbone.bn1.running_mean"]
    io.save_finetuned(tmp_path / "m.safetensors", state, {})
    missing = "(?s)does not match backbone 'tiny': .*Missing key.*bn1.running_mean"
    with pytest.raises(FormatError, match=missing):
        io.load_task(tmp_path / "m.safetensors", _backbone(tiny_net))


def test_a_head_still_in_its_stored_form_is_refused():
    from maskpack.rehydrate import build_head

    msg = ("extra 'head.weight' ({}) is a quantised head as stored (int8 / uint8 with 'head.weight_scale'): "
           "take the extras from MaskFile.extras, which dequantises it")
    scaled_float = {"head.weight": torch.ones(3, 4), "head.weight_scale": torch.ones(3)}
    stored_int = {"head.weight": torch.ones(3, 4, dtype=torch.int8)}
    for extras, dtype in ((scaled_float, torch.float32), (stored_int, torch.int8)):
        with pytest.raises(FormatError) as info:
            build_head(extras)
        assert str(info.value) == msg.format(dtype)
    head = build_head({"head.weight": torch.ones(3, 4), "head.bias": torch.zeros(3)})
    assert head.weight.shape == (3, 4) and torch.equal(head.bias, torch.zeros(3))


def test_backbone_tensors_lists_parameters_and_buffers_by_name(tiny_net):
    got = io.backbone_tensors(tiny_net)
    assert set(got) == set(tiny_net.state_dict()) and got["bn1.running_mean"] is tiny_net.bn1.running_mean
    assert io.backbone_tensors(_backbone(tiny_net)).keys() == got.keys()
