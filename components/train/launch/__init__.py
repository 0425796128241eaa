"""Launching the trainer: a torchx component and a torchx scheduler that submits a Kubeflow PyTorchJob."""
