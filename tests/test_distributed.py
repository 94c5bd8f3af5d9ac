"""DDP under torchrun on the CPU (gloo, 2 processes) against one process with the same global batch.

With ``--bn-mode frozen`` every sample's forward pass is independent of the rest of its batch,
so 2 processes x 16 images compute the same gradients as 1 process x 32 (DDP averages the two
half-batch means; one process takes the mean of all 32). Only the order of the float sums
differs, so scores agree to ~1e-6 and masks (scores > 0) agree except where a score sits within
rounding of 0. BatchNorm in train mode would normalise each rank's half-batch on its own;
SyncBatchNorm (``--sync-bn``) fixes that, but PyTorch's SyncBatchNorm trains on GPUs only.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from maskpack.train import TrainConfig, load_checkpoint, resume_config, run

SUBSET = list(range(96))
# Late layers only (as tests/test_train.py); a small S0 (= a larger lr, Theorem 2) makes masks move.
BASE = dict(dataset="digits", image_size=16, batch_size=32, epochs=2, train_indices=SUBSET, quiet=True,
            threads=1, eval_every=0, eval_knn="never", bn_mode="frozen", bn_reestimate_batches=2,
            head_lr=0.1, score_init=0.02, mask_layers="re:_blocks\\.1[0-5]|_conv_head", keep_checkpoint=True,
            extras_dtype="float32")  # bfloat16 rounding could split 1e-5 differences by one bf16 step
CLI = ["--dataset", "digits", "--image-size", "16", "--batch-size", "32", "--epochs", "2",
       "--bn-mode", "frozen", "--knn", "never", "--threads", "1", "--quiet", "--head-lr", "0.1",
       "--mask-layers", "re:_blocks\\.1[0-5]|_conv_head", "--set", f"train_indices={json.dumps(SUBSET)}",
       "--set", "eval_every=0", "--set", "bn_reestimate_batches=2", "--set", "score_init=0.02",
       "--keep-checkpoint", "--set", "extras_dtype=float32"]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "maskpack", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[int, int, float]:
    same = sum(int(((a[k] > 0) == (b[k] > 0)).sum()) for k in a)
    total = sum(a[k].numel() for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return same, total, diff


@pytest.fixture(scope="module")
def _reference(tmp_path_factory):
    """One process, global batch 32: the checkpoints after epoch 1 and epoch 2 (resumed in
    process, which is bit-identical to an uninterrupted run: tests/test_train.py)."""
    out = tmp_path_factory.mktemp("one") / "run"
    run(TrainConfig(**BASE, out=str(out), stop_after=1))
    first = load_checkpoint(out / "checkpoint.pt")
    run(TrainConfig(**BASE, out=str(out), resume=True))
    return first, load_checkpoint(out / "checkpoint.pt")


@pytest.fixture
def reference(_reference):
    """Private copies of the shared reference checkpoints (tests may change them)."""
    return copy.deepcopy(_reference)


def _check_same(ref: dict, ck: dict, min_off: int) -> str:
    same, total, diff = _agreement(ref["scores"], ck["scores"])
    off = sum(int((v <= 0).sum()) for v in ref["scores"].values())
    assert off > min_off, "masks barely moved: the comparison would be empty"
    assert same / total >= 0.999, (same, total, diff)
    assert diff < 1e-3
    # the head (and BN weight/bias when trained); BN buffers are untouched (frozen).
    # All-reduce sums in another order than one process: differences of ~1e-5 after lr-0.1 steps.
    for k, v in ref["extras"].items():
        torch.testing.assert_close(ck["extras"][k], v, rtol=1e-4, atol=1e-4)
    return (f"masks agree on {same}/{total} ({same / total:.6%}), max |score diff| {diff:.3g}, "
            f"{off} weights switched off")


def test_two_processes_match_one_and_resume_on_one(tmp_path, reference):
    first_ref, final_ref = reference
    out = tmp_path / "ddp"
    p = _torchrun([*CLI, "--stop-after", "1", "--out", str(out)])
    assert p.stdout.count("continue with --resume") == 1  # only rank 0 reports
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["epoch"] == 1 and ck["step"] == 3
    print("\nepoch 1, 2 processes vs 1:", _check_same(first_ref, ck, 100))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]  # one writer
    ref_row = json.loads(first_ref["history"])[0]
    assert rows[0]["loss"] == pytest.approx(ref_row["loss"], rel=1e-4)  # loss over the global batch
    assert rows[0]["train_acc"] == pytest.approx(ref_row["train_acc"], abs=1e-6)
    # the DDP checkpoint continues on one process: same data order, same global batch
    r = run(resume_config(out))
    msg = _check_same(final_ref, {"scores": r.scores, "extras": r.extras}, 1000)
    print("epoch 2, 2 processes then 1 vs 1:", msg)


@pytest.mark.slow
def test_two_processes_uninterrupted_and_resumed_by_two(tmp_path, reference):
    _, final_ref = reference
    _torchrun([*CLI, "--out", str(tmp_path / "a")])
    ck = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    print("\n2 processes, 2 epochs vs 1:", _check_same(final_ref, ck, 1000))
    _torchrun([*CLI, "--stop-after", "1", "--out", str(tmp_path / "b")])
    _torchrun(["--resume", "--keep-checkpoint", "--out", str(tmp_path / "b")])  # every rank reads it
    print("2 processes, stopped and resumed by 2 vs 1:",
          _check_same(final_ref, load_checkpoint(tmp_path / "b" / "checkpoint.pt"), 1000))
    assert (tmp_path / "b" / "task.mask").exists()


def test_launcher_torchrun_needs_torchrun():
    from click.testing import CliRunner

    from maskpack.cli import main

    res = CliRunner().invoke(main, ["train", "--launcher", "torchrun", "--epochs", "1"])
    assert res.exit_code == 1
    assert "Error: --launcher torchrun but RANK/WORLD_SIZE/LOCAL_RANK are not set" in res.output


# ----------------------------------------------------------------------------- collectives


def _held_store():
    """A rendezvous store this process serves on a port the OS picks, held until the workers are
    done: the workers join it as clients (``TORCHELASTIC_USE_AGENT_STORE``, as under torchrun),
    so no port is probed, freed and then bound again by someone else."""
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _collectives_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    from maskpack import distributed
    from maskpack.objectives import sinkhorn

    d, dev = distributed.init(torch.device("cpu"))
    assert d.world_size == world and d.backend == "gloo" and dev.type == "cpu"
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 7, generator=g)  # 12 samples over 2 ranks, 7 prototypes
    mine = scores[rank::world]
    q = sinkhorn(mine, reduce_sum=distributed.all_reduce_sum, world_size=world)
    q_all = distributed.gather_strided(q, 12)
    feats = distributed.gather_strided(torch.arange(rank, 11, world, dtype=torch.float32)[:, None] * 2, 11)
    empty = distributed.gather_strided(torch.zeros(0, 0) if rank == 1 else torch.ones(1, 3), 1)
    got = distributed.broadcast_floats({"knn@1": 0.5} if rank == 0 else None, ["knn@1"])
    if rank == 0:
        from safetensors.torch import save_file

        save_file({"q": q_all, "scores": scores, "feats": feats, "empty": empty,
                   "got": torch.tensor([got["knn@1"]])}, out)
    distributed.cleanup()


def test_sinkhorn_over_ranks_matches_one_batch_and_gather_keeps_order(tmp_path):
    from safetensors.torch import load_file

    from maskpack.objectives import sinkhorn

    out = str(tmp_path / "res.safetensors")
    store = _held_store()
    mp.spawn(_collectives_worker, args=(2, store.port, out), nprocs=2, join=True)
    del store
    res = load_file(out)
    torch.testing.assert_close(res["q"], sinkhorn(res["scores"]), rtol=1e-5, atol=1e-7)
    assert res["feats"][:, 0].tolist() == [2.0 * i for i in range(11)]
    assert res["empty"].shape == (1, 3)
    assert float(res["got"]) == 0.5


@pytest.mark.slow
def test_swav_two_processes_match_one(tmp_path):
    """Global Sinkhorn and the per-rank queue: 2 x 16 against 1 x 32, queue used from step 2."""
    # lr pinned: the SwAV default's (0.02) flips enough weights that a 0.1% mask difference moves a
    # re-estimated BN channel past the tolerance; this test checks the all-reduce, not the recipe
    swav = dict(objective="swav", swav_crops=[2, 2], swav_queue_length=32, swav_queue_start=0.0,
                swav_prototypes=20, head_lr=0.01, lr=0.001)
    base = {**BASE, **swav}
    base.pop("train_indices")
    run(TrainConfig.from_dict({**base, "train_indices": SUBSET, "out": str(tmp_path / "one")}))
    ref = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    sets = [a for k, v in swav.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    _torchrun([*CLI, "--objective", "swav", *sets, "--out", str(tmp_path / "two")])
    ck = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    print("\nSwAV, 2 processes vs 1:", _check_same(ref, ck, 100))
    # the checkpoint holds the one-process queue layout
    torch.testing.assert_close(ck["objective"]["queue"], ref["objective"]["queue"], rtol=1e-4, atol=1e-5)
    assert int(ck["objective"]["queue_filled"]) == int(ref["objective"]["queue_filled"])
    for k, v in ref["objective"].items():
        torch.testing.assert_close(ck["objective"][k], v, rtol=1e-4, atol=1e-5)
