"""CLI: pack / unpack / inspect / verify, and exactly one clear Error: line on bad input."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import maskpack
from maskpack.checkpoint import build_checkpoint
from maskpack.cli import main
from maskpack.masking import masks_from_scores, select_parameters
from maskpack.rehydrate import rehydrate


@pytest.fixture(scope="module")
def _run_dir(tmp_path_factory, lite0_readonly):
    d = tmp_path_factory.mktemp("run")
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.randn(getattr(m, p).shape, generator=g) + 1.5
              for n, m, p in select_parameters(lite0_readonly.model)}
    extras = {"head.weight": torch.randn(10, 1280), "head.bias": torch.zeros(10),
              "backbone._bn0.num_batches_tracked": torch.tensor(3)}
    ckpt = build_checkpoint(
        backbone="efficientnet_lite0", backbone_hash=lite0_readonly.hash(), scores=scores,
        mask_mode="threshold", threshold=0.0, k=0.9, scale=True, extras=extras,
        metadata={"dataset": "digits"}, objective={}, momentum={}, epoch=1, step=1,
        rng_torch=torch.get_rng_state(), config="{}", history="[]")
    torch.save(ckpt, d / "checkpoint.pt")
    return d, ckpt


@pytest.fixture
def run_dir(_run_dir):
    """The shared run directory and a private copy of its checkpoint dict (tests may change it)."""
    d, ckpt = _run_dir
    return d, copy.deepcopy(ckpt)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result, match):
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], result.output


def test_pack_inspect_verify_unpack(tmp_path, run_dir, lite0):
    d, ckpt = run_dir
    out = tmp_path / "task.mask"
    r = _run("pack", d, "-o", out, "--codec", "ans")
    assert r.exit_code == 0, r.output
    mf = maskpack.read(out)
    masks = masks_from_scores(ckpt["scores"], mode="threshold", threshold=0.0)
    assert all(torch.equal(mf.masks(lite0)[k], masks[k]) for k in masks)
    assert mf.metadata == {"dataset": "digits", "mask.scale": "true"}

    r = _run("inspect", out, "--json")
    info = json.loads(r.output)
    assert info["codec"] == "ans" and info["backbone"]["name"] == "efficientnet_lite0"
    assert len(info["tensors"]) == len(masks) and 0.8 < info["active_fraction"] < 1
    r = _run("inspect", out)
    assert r.exit_code == 0 and "_blocks.0._depthwise_conv.weight" in r.output

    r = _run("verify", out, "--backbone", "efficientnet_lite0")
    assert r.exit_code == 0 and r.output.startswith("OK:")

    st = tmp_path / "model.safetensors"
    r = _run("unpack", out, "-o", st)
    assert r.exit_code == 0, r.output
    state = load_file(st)
    ref = rehydrate(lite0, masks, ckpt["extras"]).state_dict()
    assert set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)


def test_pack_reencode_mask(tmp_path, run_dir):
    d, _ = run_dir
    _run("pack", d / "checkpoint.pt", "-o", tmp_path / "a.mask")
    r = _run("pack", tmp_path / "a.mask", "-o", tmp_path / "z.mask", "--codec", "zstd", "--level", "3")
    assert r.exit_code == 0, r.output
    a, z = maskpack.read(tmp_path / "a.mask"), maskpack.read(tmp_path / "z.mask")
    assert z.codec == "zstd" and z.metadata == a.metadata
    assert all(torch.equal(x, y) for x, y in zip(a.masks(maskpack.load_backbone()).values(),
                                                 z.masks().values(), strict=True))


def test_errors_are_one_line(tmp_path, run_dir):
    d, _ = run_dir
    bad = tmp_path / "bad.mask"
    bad.write_bytes(b"\x89MASK\r\n\x1a\x01\x00" + b"\xff" * 8)
    _one_error_line(_run("inspect", bad), "past the end")
    _one_error_line(_run("verify", bad), "past the end")
    _one_error_line(_run("unpack", bad, "-o", tmp_path / "x.st"), "past the end")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    _one_error_line(_run("pack", junk, "-o", tmp_path / "x.mask"), "not a readable training checkpoint")
    _one_error_line(_run("pack", tmp_path, "-o", tmp_path / "x.mask"),
                    "has no checkpoint.pt and no task.mask")
    assert "--keep-checkpoint" in _run("pack", tmp_path, "-o", tmp_path / "x.mask").output
    _run("pack", d, "-o", tmp_path / "t.mask", "--codec", "raw")
    _one_error_line(_run("verify", tmp_path / "t.mask", "--backbone", "torchvision:resnet18?weights=none"),
                    "was made for backbone 'efficientnet_lite0'")
    _one_error_line(_run("pack", d, "-o", tmp_path / "y.mask", "--codec", "raw", "--level", "3"),
                    "no compression levels")


def test_every_command_has_an_example():
    for name in ("pack", "unpack", "inspect", "verify"):
        r = _run(name, "--help")
        assert r.exit_code == 0 and "Example:" in r.output
