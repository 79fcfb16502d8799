"""Training stage: datasets, architectures, pretrained weights, training loop, checkpoints."""
