"""Correctness of the masked training step on one device (run by bench/gpu_check.sh).

Usage:
    .venv/bin/python bench/masked_step_check.py --device cuda     # the GPU check
    .venv/bin/python bench/masked_step_check.py --device cpu --size 32 --batch 4   # smoke test

Lite0 with random scores (about 84% of weights kept, one tensor all-zero), per-layer path vs
:func:`maskpack.masking.compile_masks_`, channels_last on CUDA. Checks, printing one line each:

1. every masked weight of both paths equals :func:`masking.masked_weight` bit for bit;
2. fp32 score gradients of the two paths agree (allclose) and are finite;
3. bf16 autocast: finite loss and score gradients on both paths;
4. host synchronisations during a forward + backward (CUDA only, ``set_sync_debug_mode``);
5. eval outputs equal a model rehydrated on the same device (``torch.equal``).

Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

import torch
from torch import nn

from maskpack import load_backbone, masking
from maskpack.rehydrate import rehydrate

FAILED: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        FAILED.append(name)


def make(bb, compiled: bool, args) -> nn.Module:
    torch.manual_seed(0)
    net = bb.copy_model()
    masking.apply_masks_(net)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, sm in enumerate(masking.score_masks(net).values()):
            sm.scores.copy_(torch.randn(sm.scores.shape, generator=g) + 1.0)
            if i == 3:
                sm.scores.fill_(-1.0)  # the all-zero corner case
    net.to(args.device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    if compiled:
        masking.compile_masks_(net)
    return net


def masked_weights(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each masked weight as the forward pass sees it."""
    seen, hooks = {}, []
    for name in masking.score_masks(net):
        mod, _, leaf = name.rpartition(".")
        owner = net.get_submodule(mod)
        hooks.append(owner.register_forward_pre_hook(
            lambda m, a, name=name, leaf=leaf: seen.__setitem__(name, getattr(m, leaf).detach().clone())))
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return seen


def grads(net: nn.Module, x, y, amp: bool) -> dict[str, torch.Tensor]:
    for p in net.parameters():
        p.grad = None
    torch.manual_seed(2)  # the same head for every call
    head = nn.Linear(1280, 10).to(x.device)
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        loss = nn.functional.cross_entropy(head(net(x)), y)
    loss.backward()
    out = {n: sm.scores.grad.detach().clone() for n, sm in masking.score_masks(net).items()}
    out["loss"] = loss.detach().float().reshape(1)
    return out


def count_syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA GPU visible")
        return 1
    args.channels_last = cuda
    bb = load_backbone()
    per_layer, fused = make(bb, False, args), make(bb, True, args)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    g = torch.Generator().manual_seed(3)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(args.device)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)

    wa, wb = masked_weights(per_layer, x), masked_weights(fused, x)
    masks = masking.extract_masks(per_layer)
    ref = {}
    for name in wa:
        mod, _, leaf = name.rpartition(".")
        w = per_layer.get_submodule(mod).parametrizations[leaf].original
        ref[name] = masking.masked_weight(w, masks[name].to(w.device, w.dtype))
    bad = [n for n in wa if not (torch.equal(wa[n], ref[n]) and torch.equal(wb[n], ref[n]))]
    report("masked weights bit-identical to masked_weight (per-layer and fused)", not bad,
           f"{len(wa)} tensors" + (f", differ: {bad[:3]}" if bad else ""))

    ga, gb = grads(per_layer, x, y, False), grads(fused, x, y, False)
    worst = max(float((ga[n] - gb[n]).abs().max() / ga[n].abs().max().clamp_min(1e-30)) for n in ga)
    finite = all(torch.isfinite(t).all() for t in list(ga.values()) + list(gb.values()))
    report("fp32 score gradients, fused vs per-layer", finite and worst < 1e-3,
           f"max relative difference {worst:.2e}")

    for label, net in (("per-layer", per_layer), ("fused", fused)):
        gr = grads(net, x, y, cuda)
        ok = all(torch.isfinite(t).all() for t in gr.values())
        report(f"bf16 autocast step finite ({label})" if cuda else f"cpu step finite ({label})", ok,
               f"loss {float(gr['loss']):.4f}")

    if cuda:
        probe = count_syncs(lambda: torch.zeros(1, device=args.device).item())
        report("sync detector works (.item() is flagged)", probe >= 1, f"{probe} flagged")
        for label, net in (("per-layer", per_layer), ("fused", fused)):
            n = count_syncs(lambda net=net: grads(net, x, y, True)["loss"].shape)
            report(f"no host synchronisation in a masked forward + backward ({label})", n == 0,
                   f"{n} flagged")

    per_layer.eval()
    fused.eval()
    extras = {f"backbone.{k}": v.detach().cpu().clone() for k, v in per_layer.named_buffers()}
    plain = bb.copy_model().to(args.device)
    baked = rehydrate(plain, masking.extract_masks(fused), extras).to(args.device)
    baked.to(memory_format=fmt)
    with torch.no_grad():
        outs = [per_layer(x), fused(x), baked(x)]
    report("eval outputs: per-layer == fused == rehydrated on this device",
           torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2]),
           f"max |diff| {float((outs[1] - outs[2]).abs().max()):.2e}")
    print("all checks passed" if not FAILED else f"FAILED: {FAILED}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
