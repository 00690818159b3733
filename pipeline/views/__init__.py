"""Stored pixels to a model's input: view policies and parameters, view replay, resize,
normalise, precision; named layers and their taps."""
