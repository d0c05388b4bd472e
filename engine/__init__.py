"""The loops that run a model over data: scoring and evaluation, validation during training, calibration."""
