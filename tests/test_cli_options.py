"""CLI options of docs/cli.md that change behaviour, each against a run without it, and every
command's error path: exactly one ``Error:`` line, compared whole."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import maskpack
from maskpack.cli import main
from maskpack.train import load_checkpoint

# Tiny runs: 2 steps of 8 digits at 32 px, the last 3 masked tensors, one BN batch, no k-NN.
FAST = ["--dataset", "digits", "--image-size", "32", "--epochs", "1", "--max-steps", "2",
        "--batch-size", "8", "--quiet", "--knn", "never", "--threads", "1", "--mask-layers", "last:3",
        "--set", "train_indices=" + json.dumps(list(range(64))), "--set", "eval_every=0",
        "--set", "bn_reestimate_batches=1", "--keep-checkpoint"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def train(out, *extra) -> dict:
    """``maskpack train`` with the tiny settings (score lr 5 unless ``extra`` sets one); returns
    the final metrics of its --json output."""
    args = [*FAST, *extra]
    if "--lr" not in args:
        args += ["--lr", "5"]
    res = invoke("train", *args, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.output)["metrics"]


def _ckpt(run_dir) -> dict:
    return load_checkpoint(run_dir / "checkpoint.pt")


@pytest.fixture(scope="module")
def _baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "base"
    return out, train(out)


@pytest.fixture
def baseline(_baseline):
    """The shared reference run (tiny settings, no optional flag): its directory, which tests only
    read, and a private copy of its final metrics."""
    out, metrics = _baseline
    return out, copy.deepcopy(metrics)


def test_init_from_starts_the_scores_from_a_checkpoint(tmp_path, baseline):
    base, _ = baseline
    start = _ckpt(base)["scores"]
    assert any(bool((s != 1.0).any()) for s in start.values())  # not the default init (S0 = 1)
    # a learning rate too small to move a float32 score: the run ends where it started
    train(tmp_path / "b", "--init-from", base / "checkpoint.pt", "--lr", "1e-30")
    end = _ckpt(tmp_path / "b")["scores"]
    assert list(end) == list(start) and all(torch.equal(end[n], start[n]) for n in start)


def test_detach_alpha_changes_the_score_gradient(tmp_path, baseline):
    base, _ = baseline
    train(tmp_path / "d", "--detach-alpha")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["detach_alpha"] is True
    assert json.loads((base / "config.json").read_text())["detach_alpha"] is False
    a, b = _ckpt(base)["scores"], _ckpt(tmp_path / "d")["scores"]
    assert not all(torch.equal(a[n], b[n]) for n in a)  # same seed and data: only alpha's gradient differs


def test_workers_load_the_same_batches(tmp_path, baseline):
    base, base_metrics = baseline
    metrics = train(tmp_path / "w", "--workers", "1")
    assert json.loads((tmp_path / "w" / "config.json").read_text())["num_workers"] == 1
    a, b = _ckpt(base), _ckpt(tmp_path / "w")
    for key in ("scores", "extras", "objective"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key
    timings = ("images_per_s", "epoch_seconds")
    assert {k: v for k, v in metrics.items() if k not in timings} == \
        {k: v for k, v in base_metrics.items() if k not in timings}


def test_probe_adds_the_probe_metric(tmp_path, baseline):
    _, base_metrics = baseline
    metrics = train(tmp_path / "p", "--probe")
    assert "probe" not in base_metrics
    assert 0.0 <= metrics["probe"] <= 1.0


SYNC_BN = ("Error: --sync-bn needs CUDA (PyTorch's SyncBatchNorm trains on GPUs only): leave it out on "
           "the CPU, or use --bn-mode frozen for batch-independent results")


def test_sync_bn_is_refused_on_the_cpu_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "maskpack", "train", *FAST, "--device", "cpu", "--sync-bn", "--out", str(tmp_path / "s")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       timeout=300)
    assert p.returncode != 0
    errors = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("Error:")]
    # each rank prints this one line (torchrun's failure summary may repeat a rank's); nothing else
    assert len(errors) >= 2 and set(errors) == {SYNC_BN}
    assert not (tmp_path / "s" / "checkpoint.pt").exists()


def test_cascade_through_the_cli(tmp_path):
    # docs/cascade.md's command at the smallest size: a SwAV dispatcher of 2 steps on 96 digits,
    # 2 experts of 2 steps, both combinations
    out = tmp_path / "c"
    res = invoke("cascade", "--dataset", "digits", "--image-size", "32", "--epochs", "1", "--max-steps", "2",
                 "--experts", "2", "--batch-size", "8", "--expert-steps", "2", "--router-dim", "4",
                 "--threads", "1", "--no-probe", "--quiet", "--out", out,
                 "--modes", "unconditional,conditional",
                 "--set", "train_indices=" + json.dumps(list(range(96))), "--set", "bn_reestimate_batches=1",
                 "--set", "swav_prototypes=10", "--set", "mask_layers=last:3")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["model", "k-NN", "probe"]
    assert [ln.split()[0] for ln in lines[1:5]] == ["dispatcher", "dispatcher_combined", "unconditional",
                                                    "conditional"]
    assert lines[-1] == f"wrote {out / 'cascade.mask'}"
    from maskpack.cascade import is_cascade, load_cascade

    info = json.loads((out / "cascade.json").read_text())
    assert len(info["cluster_sizes"]) == 2 and sum(info["cluster_sizes"]) == 96
    assert info["dispatcher_config"]["objective"] == "swav" and info["dispatcher_steps"] == 2
    assert all(0.0 <= m["knn"] <= 1.0 for m in info["metrics"].values())
    path = out / "cascade.mask"
    assert is_cascade(path)
    cascade = load_cascade(path, maskpack.load_backbone())
    assert cascade.num_experts == 2
    # the default --mantissa-bits 2: the router's basis keeps 2 of float16's 10 mantissa bits
    assert info["command_config"]["mantissa_bits"] == 2
    assert cascade.router_dtype == torch.float16  # held in float64 for routing
    basis = cascade.router["pca_components"].to(torch.float16)
    normal = basis.abs() >= 2.0 ** -14  # (float16's subnormals have fewer bits anyway)
    assert normal.sum() > basis.numel() // 2 and not (basis.view(torch.int16) & 0xFF)[normal].any()
    emb = cascade(torch.randn(2, 3, 32, 32), "unconditional")
    assert emb.shape == (2, cascade.embed_dim("unconditional")) and torch.isfinite(emb).all()
    with pytest.raises(maskpack.errors.FormatError, match="holds a cascade"):
        maskpack.load(path)


# ----------------------------------------------------------------------- pack / unpack --backbone


@pytest.fixture
def renamed_task(tmp_path, lite0):
    """A task over Lite0 whose header names a backbone the registry does not know ('my-lite0'):
    only --backbone can open it. Two masked tensors keep it small."""
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(lite0.model.get_parameter(n).shape, generator=g) < 0.9
             for n in ("_blocks.15._project_conv.weight", "_conv_head.weight")}
    extras = {"head.weight": torch.randn(3, 1280, generator=g), "head.bias": torch.zeros(3)}
    lite0.name = "my-lite0"
    path = tmp_path / "renamed.mask"
    maskpack.save(path, masks, lite0, extras=extras, codec="zstd")
    return path, masks, extras


UNKNOWN = ("Error: unknown backbone 'my-lite0': use one of ['efficientnet_lite0', 'efficientnet_lite1', "
           "'efficientnet_lite2'], 'torchvision:<arch>' or 'timm:<model>'")


def _one_error_line(res, expected: str) -> None:
    assert res.exit_code == 1, res.output
    assert res.output == expected + "\n", res.output


def test_pack_backbone_option(tmp_path, renamed_task):
    path, masks, _ = renamed_task
    out = tmp_path / "ans.mask"
    _one_error_line(invoke("pack", path, "-o", out, "--codec", "ans"), UNKNOWN)
    assert not out.exists()
    res = invoke("pack", path, "-o", out, "--codec", "ans", "--backbone", "efficientnet_lite0")
    assert res.exit_code == 0, res.output
    assert res.output == f"wrote {out} ({os.path.getsize(out):,} bytes, codec ans)\n"
    mf = maskpack.read(out)
    assert mf.codec == "ans" and mf.backbone_name == "efficientnet_lite0"
    got = mf.masks(maskpack.load_backbone())
    assert set(got) == set(masks) and all(torch.equal(got[n], masks[n]) for n in masks)


def test_unpack_backbone_option(tmp_path, renamed_task):
    from safetensors.torch import load_file

    from maskpack.rehydrate import rehydrate

    path, masks, extras = renamed_task
    out = tmp_path / "model.safetensors"
    _one_error_line(invoke("unpack", path, "-o", out), UNKNOWN)
    assert not out.exists()
    res = invoke("unpack", path, "-o", out, "--backbone", "efficientnet_lite0")
    assert res.exit_code == 0, res.output
    state = load_file(out)
    ref = rehydrate(maskpack.load_backbone(), masks, extras).state_dict()
    assert set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and res.output == f"maskpack, version {maskpack.__version__}\n"


# --------------------------------------------------------------------- one Error: line per command


@pytest.fixture
def bad_mask(tmp_path):
    path = tmp_path / "bad.mask"
    path.write_bytes(b"\x89MASK\r\n\x1a\x01\x00" + b"\xff" * 4 + b"\x00" * 4)
    return path


def _past_the_end(path) -> str:
    return (f"Error: {path}: header length 4294967295 runs past the end of the 18-byte file (truncated or "
            "corrupted)")


@pytest.mark.parametrize("command", ["inspect", "verify", "unpack"])
def test_storage_commands_error_line(tmp_path, bad_mask, command):
    extra = ["-o", tmp_path / "x.safetensors"] if command == "unpack" else []
    _one_error_line(invoke(command, bad_mask, *extra), _past_the_end(bad_mask))


def test_pack_error_line(tmp_path):
    _one_error_line(invoke("pack", tmp_path, "-o", tmp_path / "x.mask"),
                    f"Error: {tmp_path} has no checkpoint.pt and no task.mask: is it a maskpack training "
                    "run? (a finished run keeps only its task.mask unless trained with --keep-checkpoint; an "
                    "unfinished one keeps its checkpoint.pt)")


def test_train_error_line(tmp_path):
    _one_error_line(invoke("train", "--dataset", "mnist", "--out", tmp_path / "o"),
                    "Error: unknown dataset 'mnist': use one of digits, cifar10, cifar100, imagefolder:PATH")
    assert not (tmp_path / "o").exists()


def test_eval_error_line():
    _one_error_line(invoke("eval", "--labels", "0.5,2"), "Error: label fraction must be in (0, 1], got 2.0")


def test_bench_error_lines(tmp_path, bad_mask):
    _one_error_line(invoke("bench", "--mask", bad_mask),
                    "Error: give both --mask and --finetuned, or neither (then both are trained)")
    _one_error_line(invoke("bench", "--mask", bad_mask, "--finetuned", bad_mask, "--quiet"),
                    _past_the_end(bad_mask))


def test_cascade_error_lines(tmp_path):
    _one_error_line(invoke("cascade", "--set", "nonsense=1", "--out", tmp_path / "c"),
                    "Error: --set 'nonsense=1': use KEY=VALUE with KEY one of the TrainConfig fields "
                        "(see docs/training.md)")
    _one_error_line(invoke("cascade", "--modes", "bogus", "--out", tmp_path / "c"),
                    "Error: unknown combination mode(s) ['bogus']: use unconditional, conditional")
    assert not (tmp_path / "c").exists()
