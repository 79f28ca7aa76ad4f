"""Where a model runs and in what precision: `--device auto|cpu|cuda`, `--precision`, `--compile`.

One place decides the device, so every command means the same by `auto` (cuda when
PyTorch sees a GPU, else cpu) and asking for cuda without one fails the same way.
Batches are built on the host (or, for training on a GPU, gathered on the device by
`retrieval.resident`) and moved with `to_device`; whatever leaves a model for numpy or
for disk goes back to the CPU first, so a bundle trained on a GPU loads on a CPU-only
machine and the other way round.

On cuda, training uses dense embedding gradients with a fused Adam (row-sparse Adam was
half as fast as dense on an H200; NCCL has no sparse all-reduce), draws its negatives
and gathers its histories on the device, and may run the loss under bf16 autocast
(`--precision bf16`) and `torch.compile` (`--compile`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import platform
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import torch

from retrieval.errors import RetrievalError

log = logging.getLogger(__name__)

DeviceName = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16"]
DEVICES: tuple[str, ...] = get_args(DeviceName)
PRECISIONS: tuple[str, ...] = get_args(Precision)

T = TypeVar("T")


class DeviceError(RetrievalError):
    """The requested device or precision is not available on this machine."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is a DeviceError.

    With several processes on one machine (torchrun), process `local_rank` takes GPU
    local_rank (modulo the GPUs it sees)."""
    if name not in DEVICES:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is available to PyTorch on this machine (use --device cpu or auto)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@dataclass
class Runtime:
    """How a training or scoring run uses its device. The CLI fills it; the default is today's CPU run."""

    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))  # where model and batches live
    precision: Precision = "fp32"  # bf16: the loss's forward under bf16 autocast (weights and optimizer stay fp32)
    compile: bool = False  # torch.compile the loss (the first steps pay the compilation)
    resident: bool | None = None  # training windows gathered on the device; None = on cuda only
    read_every: int = 0  # training losses read back to the host every this many steps; 0 = 1 on cpu, 16 on cuda

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.precision not in PRECISIONS:
            raise DeviceError(f"unknown precision {self.precision!r}; use fp32 or bf16")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dense_gradients(self) -> bool:
        """Embedding gradients dense (cuda: fused dense Adam is faster there, and NCCL reduces
        dense tensors only) rather than row-sparse (cpu: a step costs O(batch), not O(N))."""
        return self.cuda

    @property
    def loss_read_every(self) -> int:
        """Steps between reads of the training loss: on a GPU each read makes the host wait for
        the device, so losses stay there for a few steps."""
        return self.read_every or (16 if self.cuda else 1)

    @property
    def keeps_windows_on_device(self) -> bool:
        return self.cuda if self.resident is None else self.resident

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the loss's forward runs in: bf16 autocast, or nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def describe(self) -> dict[str, Any]:
        """The settings as plain values, for manifests and reports, and the processor: a seed's
        training is reproducible on one kind of CPU, not across kinds (their kernels round
        differently), so a figure says where it was computed."""
        out: dict[str, Any] = {"device": str(self.device), "precision": self.precision, "compile": self.compile,
                               **cpu_description()}
        if self.cuda:
            out["gpu"] = torch.cuda.get_device_name(self.device)
        return out


@functools.cache
def cpu_description() -> dict[str, str]:
    """{"cpu": the processor's model name, "cpu_capability": the vector instructions torch's
    kernels use (e.g. AVX512)}. The model name comes from /proc/cpuinfo on Linux, else from
    `platform`; "unknown" where neither says."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": name or platform.processor() or platform.machine() or "unknown",
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def runtime_for(device: str = "cpu", precision: str = "fp32", compile: bool = False, local_rank: int = 0) -> Runtime:
    """The Runtime of the CLI's --device / --precision / --compile options."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; use fp32 or bf16")
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return Runtime(dev, precision, compile)  # type: ignore[arg-type]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (cpu for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: T, device: torch.device) -> T:
    """A copy of a batch dataclass (Batch, RankBatch) with every tensor, and every tensor in a
    dict field, on `device`; the batch itself when it is already there."""
    if device.type == "cpu" and _all_on_cpu(batch):
        return batch
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(batch):  # type: ignore[arg-type]
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            changes[f.name] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            changes[f.name] = {k: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t
                               for k, t in v.items()}
    return dataclasses.replace(batch, **changes)  # type: ignore[type-var]


def _all_on_cpu(batch: Any) -> bool:
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        tensors = v.values() if isinstance(v, dict) else [v]
        if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tensors):
            return False
    return True


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state_dict as detached CPU tensors: what every bundle and checkpoint stores."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def compile_loss(model: torch.nn.Module) -> None:
    """Replace the model's `loss` by its torch.compile'd version (the module's state is unchanged)."""
    model.loss = torch.compile(model.loss)  # type: ignore[method-assign]
    log.info("loss compiled with torch.compile (the first steps include compilation)")
