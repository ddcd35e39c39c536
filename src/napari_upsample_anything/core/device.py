"""Device and precision resolution, decided once per call and passed down."""

from __future__ import annotations

import torch

_PRECISIONS = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"`` / ``"cpu"`` / ``"cuda"`` / ``"cuda:1"`` / ``"mps"`` into a usable device.

    ``"auto"`` (or None) picks CUDA, then Apple MPS, then the CPU. Asking for a device that
    this machine does not have raises a ValueError that says what is available.
    """
    if isinstance(device, bool) or not (device is None or isinstance(device, (str, torch.device))):
        raise TypeError(f"device={device!r}: give a device name ('auto', 'cpu', 'cuda', 'cuda:N', 'mps') or a torch.device")
    if isinstance(device, str):
        device = device.strip().lower()  # "CPU", "Cuda:0" and "AUTO" alike
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a device name; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was asked for but CUDA is not available on this machine; use device='cpu' or device='auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device={device!r}: Apple MPS is not available; use 'cpu' or 'auto'")
    elif dev.type == "meta":
        raise ValueError(f"device={device!r} holds no data; use 'auto', 'cpu', 'cuda' or 'mps'")
    elif dev.type != "cpu":
        raise ValueError(f"device={device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'mps'")
    return dev


def resolve_precision(precision: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Dtype of the feature aggregation (the only part whose cost grows with channels).

    ``"auto"``: float16 on CUDA (tensor cores, float32 accumulation), float32 elsewhere.
    Log-weights and the softmax are always computed in float32: they come from an expanded
    quadratic form that half precision cannot hold (see docs/engine.md).
    """
    if isinstance(precision, bool) or not (precision is None or isinstance(precision, (str, torch.dtype))):
        raise TypeError(f"precision={precision!r}: use 'auto', 'fp32', 'fp16' or 'bf16'")
    if precision is None or (isinstance(precision, str) and precision.strip().lower() == "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(precision, torch.dtype):
        if precision in (torch.float32, torch.float16, torch.bfloat16):
            return precision
        raise ValueError(f"precision={precision!r}: use float32, float16 or bfloat16")
    key = str(precision).strip().lower()
    if key not in _PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; use 'auto', 'fp32', 'fp16' or 'bf16'")
    return _PRECISIONS[key]
