"""Secondary programs, run from the repository root as `python -m tools.<name>`: calibration, anomalib
conversion, the demo data, benchmarks."""
