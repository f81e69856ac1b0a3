"""Training: splits, the loop, losses, schedules; calibration and evaluation of a trained model."""
