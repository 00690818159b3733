"""Datasets in canonical order: Fashion-MNIST, synthetic, image folders, WebDataset shards;
their indexes and fingerprints."""
