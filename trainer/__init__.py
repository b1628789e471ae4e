"""shardrec trainer: config, loop, metrics. Entry point: ``python -m trainer``."""
