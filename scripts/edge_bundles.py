"""Write the bundles the torch-free edge check loads (run with the main venv, which has torch).

    .venv/bin/python scripts/edge_bundles.py OUT_DIR

writes OUT_DIR/split (ResNet-8, cut at block1, int8 codec, MaxProb(0.9)) and OUT_DIR/device
(the same model, device only). Untrained weights: the check is about running, not accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from splitexit import policies, zoo
from splitexit.deploy import bundle


def main(out: str) -> None:
    torch.manual_seed(0)
    model = zoo.create_multiexit("resnet8", 10, (1, 28, 28))
    policy = policies.MaxProb(0.9)
    out_dir = Path(out)
    for name, cut, codec in [("split", "block1", "int8"), ("device", None, "fp32")]:
        path = bundle(model, out_dir / name, cut=cut, codec=codec, policy=policy, measure=False)
        print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
