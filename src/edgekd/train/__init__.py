"""Training: the teacher and student models, augmentation, losses, the training engine, the
ensemble soft targets, quantization-aware training and checkpoints."""
