"""``splitexit plan``: predict latency and device energy of every cut and choose one.

A thin wrapper over :func:`splitexit.split.halves.cut_costs` and
:func:`splitexit.split.planner.plan`.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..errors import InputError
from .planner import OBJECTIVES, plan


def _load_model(args):
    from .. import checkpoint
    from ..zoo import create_model

    if args.checkpoint:
        model = checkpoint.load(args.checkpoint)
        model = getattr(model, "backbone", model)
        shape = (getattr(model, "spec", None) or {}).get("input_shape")
    else:
        shape = [int(v) for v in args.input_shape.split(",")]
        model = create_model(args.model, input_shape=shape)
    if shape is None:
        raise InputError("the checkpoint does not record its input shape; pass --model and "
                         "--input-shape instead")
    return model.eval(), tuple(shape)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the per-cut prediction table and the chosen cut."""
    from ..devices import get_link
    from ..report import markdown_table
    from .halves import cut_costs

    model, shape = _load_model(args)
    example = torch.rand(args.samples, *shape, generator=torch.Generator().manual_seed(0))
    costs = cut_costs(model, example, codec=args.codec)
    link = get_link(args.link)
    if args.uplink_mbps is not None:
        link = link.with_bandwidth(args.uplink_mbps)
    result = plan(costs, args.device, args.server, link, args.objective,
                  response_bytes=args.response_bytes)
    if args.json:
        print(json.dumps({"costs": [c.to_dict() for c in costs], **result.to_dict()}, indent=2))
        return 0
    rows = [{"cut": r.name, "device_macs": c.device_macs, "server_macs": c.server_macs,
             "payload_bytes": c.payload_bytes, "device_ms": 1e3 * r.device_s,
             "network_ms": 1e3 * r.tx_s, "server_ms": 1e3 * r.server_s,
             "latency_ms": 1e3 * r.latency_s, "energy_mj": r.energy_mj,
             "chosen": "<-" if r.name == result.choice else ""}
            for r, c in zip(result.rows, costs, strict=True)]
    print(markdown_table(rows, columns=list(rows[0])))
    print(f"\nchoice for {args.objective} on {args.device} -> {args.server} over {link.name} "
          f"({link.uplink_mbps:g} Mbit/s up, RTT {link.rtt_ms:g} ms), codec {args.codec}: "
          f"{result.choice} (all figures are estimates from profiles and MAC counts)")
    return 0


def register(subparsers) -> None:
    """Add the ``plan`` command."""
    p = subparsers.add_parser("plan", help="predict latency/energy of every cut for a device, "
                              "server and link, and choose the best")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="resnet8", help="zoo model (default resnet8)")
    src.add_argument("--checkpoint", default=None, help="checkpoint directory instead of --model")
    p.add_argument("--input-shape", default="1,28,28", help="input shape for --model")
    p.add_argument("--device", default="rpi4", help="device profile (default rpi4)")
    p.add_argument("--server", default="gpu_server_t4", help="server profile")
    p.add_argument("--link", default="lte", help="link profile (default lte)")
    p.add_argument("--uplink-mbps", type=float, default=None,
                   help="override the link's uplink bandwidth (e.g. a measured one)")
    p.add_argument("--objective", default="latency", choices=list(OBJECTIVES))
    p.add_argument("--codec", default="fp32", help="wire codec, e.g. fp32, int8, int4-ch+zstd")
    p.add_argument("--response-bytes", type=float, default=40)
    p.add_argument("--samples", type=int, default=16,
                   help="random inputs used to count MACs and message sizes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)
