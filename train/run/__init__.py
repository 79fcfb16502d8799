"""A training run: its state, one epoch (train and validate), checkpoints, the model card,
what it writes and reports, distributed training, optimizers and precision; the entry
point is ``train.run.trainer.Run``."""
