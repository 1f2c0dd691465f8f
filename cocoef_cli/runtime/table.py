"""``python -m cocoef_cli.runtime.table [OVERRIDES...]`` — measured bytes per uplink message, per compressor.

Runs every compressor on the distributed runtime (replay, 4 devices, no stragglers, a few iterations)
and prints a markdown table: the bits formula / 8 against the bytes the server actually received per
message (``bytes_up`` / messages), split into payload and framing (8-byte header, plus an 8-byte
‖state‖² trailer for methods with per-device state).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from cocoef_cli import config
    from cocoef_cli.run import execute
    from cocoef_cli.sim.compressors import COMPRESSORS

    extra = list(sys.argv[1:] if argv is None else argv)
    base = [
        "dataset.dim=100",
        "dataset.n=400",
        "devices=4",
        "iters=5",
        "eval_every=5",
        "straggler=none",
        "runtime=torch_distributed",
        "runtime.replay=true",
    ]
    keys = {"ratio": 0.05, "group": 25}  # set where the compressor declares them
    rows = []
    for name in COMPRESSORS.names():
        method = "method=coco" if name == "natural" else "method=coco_ef"
        own = [f"compressor.{k}={v}" for k, v in keys.items() if k in config.group_keys("compressor", name)]
        cfg = config.load(base + [f"compressor={name}", method] + own + extra)
        exp, res = execute(cfg, None)
        last = res.metrics.iloc[-1]
        n = last.bits_up / exp.bits_per_message
        rt = res.runtime
        rows.append(
            (
                name,
                exp.objective.model.D,
                exp.bits_per_message,
                exp.bits_per_message / 8,
                rt["payload_bytes"],
                rt["message_bytes"] - rt["payload_bytes"],
                last.bytes_up / n,
            )
        )
    print("| compressor | D | bits formula | bits/8 | payload bytes | framing bytes | measured bytes/message |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r[0]}` | {r[1]} | {r[2]} | {r[3]:g} | {r[4]} | {r[5]} | {r[6]:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
