"""Hyperparameter search on Ray Tune (`plait tune`): search spaces over config fields, one plait
training run per trial, ASHA early stopping, ranked results, the best config and loss curves.

Ray and torch are imported only when a sweep runs.
"""
