"""``python -m cocoef_cli.runtime [OVERRIDES...] [--out DIR]`` — one rank of a distributed run.

The rank comes from the environment (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
rank 0 is the server — it composes the config from the overrides (``runtime=torch_distributed
runtime.spawn=false`` implied, the address from the environment), runs and writes ``--out``; every
other rank is device RANK − 1 and takes everything from the server. WORLD_SIZE must be devices + 1.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from cocoef_cli.distributed import transport as tp

    argv = list(sys.argv[1:] if argv is None else argv)
    rank, world, addr, port = tp.env_rank()
    if rank != 0:
        from cocoef_cli.distributed.device import main as device_main

        return device_main()
    from pathlib import Path

    from cocoef_cli import config
    from cocoef_cli.errors import ConfigError
    from cocoef_cli.record import run_id
    from cocoef_cli.run import check_out_dir, execute

    out = None
    if "--out" in argv:
        k = argv.index("--out")
        out, argv = Path(argv[k + 1]), argv[:k] + argv[k + 2 :]
    try:
        ov = argv + [
            "runtime=torch_distributed",
            "runtime.spawn=false",
            f"runtime.master_addr={addr}",
            f"runtime.master_port={port}",
        ]
        cfg = config.load(ov)
        if int(cfg["devices"]) + 1 != world:
            raise ConfigError("devices", cfg["devices"], f"{world - 1} (WORLD_SIZE − 1)", "does not match WORLD_SIZE")
        out = out or Path("runs") / run_id(cfg)
        check_out_dir(out, False)
        execute(cfg, out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"cocoef server: done → {out}/metrics.csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
