"""Experiments with the reference model (`mtp-ext experiment`): polynomial.py, the polynomial
arithmetic task of Gloeckle et al. 2024; runner.py, training, evaluation and the report in
docs/experiments.md."""
