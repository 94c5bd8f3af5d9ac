"""Layering rules from docs/design.md, checked in a fresh interpreter."""

import subprocess
import sys
import textwrap


def test_loading_a_task_never_imports_the_trainer_torchvision_or_sklearn(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import torch
        from torch import nn
        import maskpack
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
        net(torch.zeros(1, 3, 5, 5))
        masks = {{"0.weight": torch.rand(4, 3, 3, 3) > 0.2, "3.weight": torch.rand(2, 36) > 0.1}}
        path = {str(tmp_path / "t.mask")!r}
        maskpack.save(path, masks, net, extras={{"head.weight": torch.ones(3, 2)}})
        model = maskpack.load(path, net)
        loaded = [m for m in ("torchvision", "sklearn", "maskpack.train", "maskpack.data",
                              "maskpack.evaluate", "maskpack.compare", "maskpack.cascade.train",
                              "maskpack.cascade.fit") if m in sys.modules]
        print(",".join(loaded) or "clean")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "clean", out.stdout
