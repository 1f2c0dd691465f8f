"""The vectorized simulator: codes, stragglers, compressors, methods and the engine."""
