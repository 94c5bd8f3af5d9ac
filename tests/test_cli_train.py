"""``maskpack train`` / ``maskpack eval`` through click's CliRunner."""

import json

import pytest
from click.testing import CliRunner

from maskpack.cli import main

FAST = ["--dataset", "digits", "--image-size", "16", "--batch-size", "32", "--threads", "1", "--quiet",
        "--knn", "never", "--set", "train_indices=" + json.dumps(list(range(64))),
        "--set", "eval_every=0", "--set", "bn_reestimate_batches=2"]


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("args,msg", [
    (["--dataset", "mnist"], "Error: unknown dataset 'mnist'"),
    (["--labels", "1.5"], "Error: label fraction must be in (0, 1], got 1.5"),
    (["--labels", "0"], "Error: label fraction must be in (0, 1], got 0.0"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/x"],
     "Error: cifar10 is not in /nonexistent/x and downloading is off (MASKPACK_OFFLINE=1)"),
    (["--mask-layers", "convs"], "Error: unknown layer filter 'convs'"),
    (["--set", "nonsense=1"], "Error: --set 'nonsense=1'"),
    (["--device", "tpu"], "Error: unknown device 'tpu'"),
    (["--warmup", "abc"], "Error: warm-up 'abc'"),
])
def test_train_bad_options(tmp_path, args, msg):
    res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 1
    assert msg in res.output


def test_train_help_names_keep_checkpoint():
    res = invoke("train", "--help")
    assert "--keep-checkpoint" in res.output and "checkpoint is deleted" in res.output


def test_train_resume_missing_checkpoint(tmp_path):
    res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "none"), "--resume"])
    assert res.exit_code == 1 and "Error: no checkpoint at" in res.output


def test_train_stop_resume_and_eval(tmp_path):
    out = str(tmp_path / "run")
    res = invoke("train", *FAST, "--epochs", "2", "--stop-after", "1", "--lr", "5", "--out", out)
    assert res.exit_code == 0, res.output
    assert "continue with --resume" in res.output
    again = CliRunner().invoke(main, ["train", *FAST, "--epochs", "2", "--out", out])
    assert again.exit_code == 1 and "already holds a run" in again.output
    # resume without repeating options: the saved config (lr 5 included) is used
    res = invoke("train", "--out", out, "--resume", "--quiet", "--json")
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    assert payload["metrics"]["epoch"] == 2 and payload["task"].endswith("task.mask")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["lr"] == 5.0 and cfg["image_size"] == 16
    # the finished run deleted its checkpoint: pack re-encodes the task, resume says why it cannot
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["config.json", "metrics.jsonl", "task.mask"]
    res = invoke("pack", out, "-o", str(tmp_path / "re.mask"), "--codec", "zstd")
    assert res.exit_code == 0 and "wrote" in res.output, res.output
    res = CliRunner().invoke(main, ["train", "--out", out, "--resume", "--epochs", "3"])
    assert res.exit_code == 1 and "checkpoint.pt was deleted" in res.output
    assert "--keep-checkpoint" in res.output
    res = invoke("eval", out, "--labels", "0.1,1.0", "--no-probe", "--json")
    assert res.exit_code == 0, res.output
    ev = json.loads(res.output)
    assert set(ev["task"]) == {"accuracy", "knn@0.1", "knn@1"} and "backbone" in ev


def test_eval_bad_labels():
    res = CliRunner().invoke(main, ["eval", "--labels", "0.5,2"])
    assert res.exit_code == 1 and "Error: label fraction must be in (0, 1], got 2.0" in res.output


@pytest.mark.parametrize("cmd", ["train", "eval"])
def test_help_has_example(cmd):
    res = invoke(cmd, "--help")
    assert res.exit_code == 0 and "Example:" in res.output
