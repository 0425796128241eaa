"""Which torch device a process runs on: the one rule train and evaluate share."""

from __future__ import annotations

import os

import torch


class DeviceError(RuntimeError):
    pass


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto``: this process's GPU when CUDA is visible (torchrun's LOCAL_RANK picks which), else the CPU.
    ``cuda`` (that GPU) and ``cuda:N`` fail when no GPU is visible instead of silently running on the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if choice not in ("auto", "cuda") and not choice.startswith("cuda:"):
        raise DeviceError(f"unknown device {choice!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {choice} was asked for, but no CUDA device is visible")
    return torch.device(choice) if ":" in choice else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
