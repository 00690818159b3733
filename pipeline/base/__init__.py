"""Shared ground for every room: errors, option spellings, the checks of T and alpha, strict
JSON records, devices and threads, the torchrun world, and the output guard."""
