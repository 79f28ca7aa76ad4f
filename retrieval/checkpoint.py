"""Training checkpoints: what a resumed run needs to continue as if it had never stopped.

A checkpoint holds the model, the optimizers' state, the negative sampler's generator,
the numpy generator as it stood when the epoch in progress began (its window order is
drawn again from it) and as it stands now, every rank's torch generator (the routing
logits of training), the epoch and step reached, the early-stopping bookkeeping (history,
best epoch and its weights) and the settings of the run. It is written atomically (temp +
rename) at the end of every epoch and, with `every`, every that many steps inside one;
a run killed at any moment leaves the last whole checkpoint. A resumed run with the same
settings and the same number of processes draws the same windows, negatives and routing
logits in the same order, so it ends with the same parameters and metrics as a run that
was never stopped.

With several processes rank 0 gathers the ranks' generators and writes; on resume rank 0
reads and hands the checkpoint to every rank, so only rank 0's machine needs the file.
A successful run removes its checkpoint (the bundle is the result).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.artifacts import atomic_write_bytes, package_versions
from retrieval.device import cpu_state
from retrieval.distributed import Group, from_main, gather_to_main
from retrieval.errors import ArtifactError

log = logging.getLogger(__name__)

KIND = "training-checkpoint"
VERSION = 1
# Settings that may change between a run and its resumption: how long it may go on and its
# thread count. Anything else would change the arithmetic.
MAY_CHANGE = frozenset({"epochs", "patience", "threads"})


@dataclass
class Checkpointing:
    """Where and how often a training run checkpoints, and whether it resumes."""

    path: Path  # the checkpoint file (rewritten atomically)
    every: int = 0  # also every this many steps inside an epoch; 0 = at epoch ends only
    resume: bool = False  # continue from `path` when it exists (a fresh start when it does not)


def default_path(out: Path) -> Path:
    """The checkpoint beside a bundle directory, `OUT.ckpt`: never inside it, since each save
    replaces the bundle directory whole."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def torch_rng(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's torch generator states (CPU, and the device's when it is a GPU)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_torch_rng(state: Mapping[str, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'name: saved -> now' for every setting that differs (nested dicts flattened), MAY_CHANGE skipped."""
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in MAY_CHANGE:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class Checkpointer:
    """Saves and loads one run's checkpoints; `identity` (plain JSON values: settings, data
    fingerprint, split seed) must match for a checkpoint to be resumed. Every method is called
    on every rank at the same point of the run."""

    def __init__(self, settings: Checkpointing, identity: dict[str, Any], group: Group, device: torch.device):
        self.settings, self.identity, self.group, self.device = settings, identity, group, device

    def due(self, before: int, step: int, steps: int) -> bool:
        """Whether to checkpoint at `step` of an epoch of `steps`, the previous chance having been at
        step `before`: when a multiple of `every` lies in (before, step] (the losses of a GPU run are
        read, and a checkpoint can be written, every few steps), not at the epoch's end (it has its own)."""
        every = self.settings.every
        return every > 0 and step // every > before // every and step < steps

    def save(
        self,
        epoch: int,
        step: int,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        generators: Mapping[str, torch.Generator],
        rng_epoch: dict[str, Any],
        rng_now: dict[str, Any],
        loop: dict[str, Any],
        best_state: Mapping[str, torch.Tensor] | None,
    ) -> None:
        """Write the state after `step` steps of epoch `epoch` (step 0: the epoch has not begun).

        rng_epoch / rng_now: the numpy generator's state when the epoch began and now; loop:
        the early-stopping bookkeeping as plain values; generators: torch generators shared
        by every rank (the negative sampler's)."""
        ranks = gather_to_main(torch_rng(self.device), self.group)
        if not self.group.main:
            return
        state = {
            "kind": KIND,
            "version": VERSION,
            "identity": self.identity,
            "world": self.group.world,
            "epoch": epoch,
            "step": step,
            "model": cpu_state(model),
            "optimizers": [_to_cpu(o.state_dict()) for o in optimizers],
            "generators": {k: g.get_state() for k, g in generators.items()},
            "rng_epoch": rng_epoch,
            "rng_now": rng_now,
            "torch_rng": ranks,
            "loop": loop,
            "best_state": None if best_state is None else {k: v.detach().cpu() for k, v in best_state.items()},
            "versions": {k: str(v) for k, v in package_versions().items()},  # plain str: loads with weights_only
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.settings.path, buf.getvalue())
        log.debug("checkpoint: epoch %d step %d -> %s", epoch, step, self.settings.path)

    def load(self) -> dict[str, Any] | None:
        """The checkpoint to resume from (on every rank), or None: not resuming, or no checkpoint
        yet (a fresh start, so the same command works before and after a crash). ArtifactError
        when it is unreadable or was written by a run with other settings."""
        if not self.settings.resume:
            return None
        return from_main(self._read, self.group)

    def _read(self) -> dict[str, Any] | None:
        path = Path(self.settings.path)
        if not path.exists():
            log.info("--resume: no checkpoint at %s yet; starting from the beginning", path)
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: torch raises several kinds
            raise ArtifactError(f"{path}: unreadable checkpoint ({' '.join(str(err).split())[:200]})") from None
        if not isinstance(state, dict) or state.get("kind") != KIND:
            raise ArtifactError(f"{path}: not a training checkpoint")
        if state.get("version") != VERSION:
            raise ArtifactError(f"{path}: checkpoint version {state.get('version')}, this code reads {VERSION}")
        diff = _differences(state["identity"], self.identity)
        if diff:
            raise ArtifactError(f"{path}: the checkpoint was written by a run with other settings "
                                f"({'; '.join(diff[:4])}); resume with the same settings or start over without --resume")
        if state["world"] != self.group.world:
            log.warning("resuming a run of %d processes with %d: it continues, but the routing draws differ "
                        "from an uninterrupted run's", state["world"], self.group.world)
        log.info("resuming from %s: epoch %d, step %d", path, state["epoch"], state["step"])
        return state

    def restore(
        self,
        state: dict[str, Any],
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        generators: Mapping[str, torch.Generator],
        rng: np.random.Generator,
    ) -> None:
        """Put a loaded checkpoint's model, optimizer, generator and this rank's torch RNG state
        back; the numpy generator is left as the epoch in progress began (rng_epoch)."""
        model.load_state_dict(state["model"])
        for o, s in zip(optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for k, g in generators.items():
            g.set_state(state["generators"][k])
        rng.bit_generator.state = state["rng_epoch"]
        if state["world"] == self.group.world:
            set_torch_rng(state["torch_rng"][self.group.rank], self.device)

    def finish(self) -> None:
        """Remove the checkpoint of a run that ended (rank 0)."""
        if self.group.main:
            Path(self.settings.path).unlink(missing_ok=True)


def _to_cpu(obj: Any) -> Any:
    """An optimizer state_dict with its tensors on the CPU (load_state_dict moves them back)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
