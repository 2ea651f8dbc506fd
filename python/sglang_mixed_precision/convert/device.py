"""Where the converter computes: ``--device cuda`` (the default when a GPU is visible) or ``cpu``.

The quantization math takes its device from the tensors it is given, so the CPU tests exercise the
same code the GPU runs; only this module decides the device, and only the pipeline moves tensors.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..core.errors import ErrorCode, MixedPrecisionError

DEVICES = ("cuda", "cpu")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None) -> torch.device:
    """``None`` -> the default; ``cuda`` / ``cuda:N`` only where that GPU exists (a named error otherwise)."""
    name = name or default_device()
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise MixedPrecisionError(
            ErrorCode.BAD_DEVICE, f"unknown --device {name!r}", fix="use --device cuda (or cuda:N) or --device cpu"
        )
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise MixedPrecisionError(
            ErrorCode.BAD_DEVICE, f"--device {name!r}: {e}", fix="use --device cuda, cuda:N or cpu"
        ) from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            raise MixedPrecisionError(
                ErrorCode.BAD_DEVICE,
                f"--device {name} but this machine has {count} usable CUDA GPU(s)"
                + ("" if count else f" (torch {torch.__version__}, CUDA build {torch.version.cuda})"),
                fix="run on a machine with a GPU, or pass --device cpu",
            )
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings and memory peaks are per unit)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(peak device bytes allocated by torch, peak resident bytes of this process) so far."""
    dev = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    try:
        with open("/proc/self/status") as f:
            host = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)
    except OSError:  # not Linux
        host = None
    return dev, host


# -- hand-offs between the reader / writer threads and the main thread ----------------------------
def side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A stream of its own for a helper thread's copies, so they overlap the main stream's kernels."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def upload(tensors: dict[str, torch.Tensor], names, device: torch.device, stream=None) -> None:
    """Copy ``names`` of ``tensors`` to ``device`` in place of the host tensors; with a side stream
    the copies run on it and are finished when this returns (only the calling thread waits)."""
    if device.type == "cpu":
        return
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        for n in names:
            tensors[n] = tensors[n].to(device)
    if stream is not None:
        stream.synchronize()


def claim(tensors: dict[str, torch.Tensor], stream=None) -> None:
    """The main thread takes over tensors a side stream allocated: their memory must not go back to
    that stream's pool while the main stream's kernels may still read them."""
    if stream is None:
        return
    current = torch.cuda.current_stream(stream.device)
    for t in tensors.values():
        if t.is_cuda:
            t.record_stream(current)


def mark(device: torch.device) -> torch.cuda.Event | None:
    """An event after everything the main thread queued so far (outputs a writer will copy)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def to_host(t: torch.Tensor, stream=None, ready: torch.cuda.Event | None = None) -> torch.Tensor:
    """``t`` on the host; a device tensor is copied on ``stream`` once ``ready`` has passed."""
    if not t.is_cuda:
        return t
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        if ready is not None:
            torch.cuda.current_stream(t.device).wait_event(ready)
        return t.cpu()
