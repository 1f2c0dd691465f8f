"""Train a custom network (examples/plugin/mycoco/nets.py) with COCO-EF and the Top-k-with-dithering
compressor of the same plugin package, through the Python API, and print the last evaluation.

    python examples/custom_network.py [--iters 40]

The same run from the shell (the plugin folder on PYTHONPATH, its YAML folder added to conf/):

    PYTHONPATH=examples/plugin cocoef run --config-dir examples/plugin/conf \\
        model=skip_mlp compressor=topk_dither dataset=digits iters=40
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "plugin"))  # the plugin package `mycoco` (a run in this process imports it)

from cocoef_cli import api  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=16)
    args = ap.parse_args()
    res = api.run(
        {
            "model": "skip_mlp",
            "model.hidden": args.hidden,
            "compressor": "topk_dither",
            "dataset": "digits",
            "method": "coco_ef",
            "devices": 6,
            "iters": args.iters,
            "eval_every": 10,
        },
        config_dir=HERE / "plugin" / "conf",
    )
    print(res.metrics[["iter", "train_loss", "test_acc", "bits_up"]].to_string(index=False))
    print(f"run_id {res.run_id}, model {res.record['config']['model']}, status {res.record['status']}")


if __name__ == "__main__":
    main()
