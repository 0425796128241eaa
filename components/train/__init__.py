"""Stage 3: CLIPA two-stage training with a pluggable objective, launched by torchrun / torchx / PyTorchJob."""
