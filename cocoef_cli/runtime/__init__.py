"""The commands of ``runtime=torch_distributed`` (the runtime itself is :mod:`cocoef_cli.distributed`,
docs/design.md §10).

``python -m cocoef_cli.runtime [OVERRIDES...] [--out DIR]``: one rank of a distributed run (rank 0
the server, which runs the whole run as ``cocoef run`` does; every other rank a device);
``python -m cocoef_cli.runtime.launch``: several device processes on one host;
``python -m cocoef_cli.runtime.table``: measured bytes per uplink message, per compressor. They sit
above :mod:`cocoef_cli.run` in the layers; the runtime below it.
"""
