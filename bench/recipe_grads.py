"""Why one score lr does not fit Lite0: per-layer score-gradient sizes at initialisation.

One batch of real CIFAR-10 images at 32 px, Lite0 with masks on every conv, a linear head fitted
by logistic regression on the frozen features of the same batch (so gradients are those of a
sensible head, not a random one). For each layer group it prints mean |dL/dS| and the number of
SGD steps at lr 50 a score needs to cross mu = 0 from S0 = 1 (no momentum: 1 / (50 |g|);
momentum 0.9 divides it by ~10 in steady state). Usage:
    .venv/bin/python bench/recipe_grads.py [imagefolder:$CIFAR5K] [32]
"""
import os
import sys

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from maskpack import load_backbone, masking
from maskpack.data import eval_transform, load_dataset

torch.set_num_threads(2)
ds = sys.argv[1] if len(sys.argv) > 1 else "imagefolder:" + os.environ.get("CIFAR5K", "data/cifar10-5k")
size = int(sys.argv[2]) if len(sys.argv) > 2 else 32
name = sys.argv[3] if len(sys.argv) > 3 else "efficientnet_lite0"
bb = load_backbone(name)
data = load_dataset(ds, image_size=size)
tf = eval_transform(size, bb.mean, bb.std)
g = torch.Generator().manual_seed(0)
idx = torch.randperm(len(data.train), generator=g)[:64].tolist()
x = torch.stack([tf(data.train[i][0]) for i in idx])
y = torch.tensor([int(data.train[i][1]) for i in idx])
net = bb.copy_model().eval()  # eval-mode BN: gradients of the pretrained statistics
masking.apply_masks_(net)
with torch.no_grad():
    f = net(x)
clf = LogisticRegression(max_iter=2000, C=1.0).fit(f.numpy(), y.numpy())
head = torch.nn.Linear(f.shape[1], data.num_classes)
cls = torch.as_tensor(clf.classes_)
with torch.no_grad():
    head.weight.zero_()
    head.bias.fill_(-10.0)
    head.weight[cls] = torch.as_tensor(clf.coef_, dtype=torch.float32)
    head.bias[cls] = torch.as_tensor(clf.intercept_, dtype=torch.float32)
loss = F.cross_entropy(head(net(x)), y)
loss.backward()
rows = []
for n, sm in masking.score_masks(net).items():
    gs = sm.scores.grad.abs()
    key = ("stem" if "conv_stem" in n else "expand" if "expand" in n else
           "depthwise" if "depthwise" in n else "project" if "project" in n else "head-conv")
    rows.append((n, key, float(gs.mean()), float(gs.quantile(0.99) if gs.numel() < 16_000_000 else gs.max())))
print(f"{name} {size}px, loss {float(loss):.3f}")
print(f"{'tensor':38s} {'group':10s} {'mean|g|':>10s} {'p99|g|':>10s} {'steps@50 (mean)':>16s} {'(p99)':>8s}")
for n, k, m, p in rows:
    print(f"{n:38s} {k:10s} {m:10.2e} {p:10.2e} {1 / (50 * m):16.0f} {1 / (50 * p):8.0f}")
groups = {}
for _n, k, m, _p in rows:
    groups.setdefault(k, []).append(m)
print("group means of mean|g|:", {k: f"{sum(v) / len(v):.2e}" for k, v in groups.items()})
ms = [m for _, _, m, _ in rows]
print(f"max/min mean|g| over tensors: {max(ms) / min(ms):.0f}x")
