"""Command-line evaluation: `python -m eval.fvd`, `python -m eval.inception_score`."""
