"""Drafter training: data generation, target cache, anchors, losses, trainer, calibration, eval."""
