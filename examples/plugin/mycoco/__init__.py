"""An example plugin package for cocoef: a compressor and a network from outside the package.

Put this folder (examples/plugin) on PYTHONPATH and select them with ``_target_`` (docs/plugins.md).
"""
