"""Thin Ray entry points (preprocess, train, evaluate, tune, predict)."""
