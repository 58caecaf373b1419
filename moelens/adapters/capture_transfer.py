"""Move what the hooks captured to the host: one transfer per device and dtype, asynchronous on CUDA.

A forward leaves dozens of small tensors per layer on the model's device(s) (routing decisions, gate weights,
expert-contribution norms). Copying each one is a blocking device-to-host round trip per tensor; instead the
tensors of one forward are grouped by ``(device, dtype)``, concatenated on the device and copied once per group.
On CUDA the concatenation and the copy run on a side stream into pinned host memory, ordered after the work
queued so far, so the caller goes on with the next forward and `Pending.wait` blocks only whoever reads the
values (the writer thread). Tensors already on the CPU are left as they are (the hooks keep detached copies).
Routers of a model split over devices (``device_map="auto"``, offloaded layers) live on different devices:
their tensors are grouped per device, never concatenated across devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: ``(device, dtype)`` -> the ``(record, field)`` pairs whose tensors travel together, in record then field order.
Groups = dict[tuple[torch.device, torch.dtype], list[tuple[Any, str]]]


def transfer_groups(records: Sequence[Any]) -> Groups:
    """Which tensors of ``records`` share a transfer. Each record names its tensor attributes in a ``TENSORS``
    class attribute; ``None`` fields and CPU tensors need no transfer. Reads only devices and dtypes (no data),
    so it can be checked on tensors of any device, ``meta`` included."""
    groups: Groups = {}
    for record in records:
        for name in type(record).TENSORS:
            tensor = getattr(record, name)
            if tensor is not None and tensor.device.type != "cpu":
                groups.setdefault((tensor.device, tensor.dtype), []).append((record, name))
    return groups


class Pending:
    """Records whose tensors are on their way to the host; `wait` returns them with every tensor on the CPU."""

    def __init__(self, records: list[Any], events: list[Any]) -> None:
        self._records = records
        self._events = events

    def wait(self) -> list[Any]:
        for event in self._events:
            event.synchronize()
        self._events = []
        return self._records


def to_host(records: list[Any], *, non_blocking: bool = True) -> Pending:
    """Start moving every tensor of ``records`` to the CPU with one copy per `transfer_groups` group: on CUDA
    with ``non_blocking``, asynchronously (see the module docstring); elsewhere (or blocking) a plain copy, done
    when this returns. The records' fields are replaced by views of the host buffers."""
    events = []
    for (device, _), owners in transfer_groups(records).items():
        tensors = [getattr(record, name) for record, name in owners]
        if non_blocking and device.type == "cuda":
            host, event = _copy_async(tensors, device)
            events.append(event)
        else:
            host = torch.cat([t.reshape(-1) for t in tensors]).cpu()
        for (record, name), tensor, piece in zip(owners, tensors, host.split([t.numel() for t in tensors])):
            setattr(record, name, piece.view(tensor.shape))
    return Pending(records, events)


def _copy_async(tensors: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, Any]:
    """Concatenate on a side stream (after the work queued so far) and copy into pinned host memory."""
    stream = _side_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        flat = torch.cat([t.reshape(-1) for t in tensors])
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
    for tensor in (*tensors, flat):  # keep the caching allocator from reusing them before the copy ran
        tensor.record_stream(stream)
    return host, stream.record_event()


_SIDE_STREAMS: dict[torch.device, Any] = {}


def _side_stream(device: torch.device) -> Any:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]
