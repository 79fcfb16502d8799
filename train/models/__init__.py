"""The models: the architecture registry, the 32 px classifiers, pretrained weights, what
fine-tuning freezes, and the checkpoint file (card, weights, training state)."""
