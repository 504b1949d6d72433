"""Training-loop helpers shared by the bundles: resumable checkpoints.

``attach_checkpointing(trainer, ckpt_dir, objects)`` is called from a bundle's ``run`` list, after
the trainer exists (a handler that holds the trainer cannot be one of the trainer's own config
handlers without a circular reference). It

- saves ``checkpoint_last.pt`` (network, EMA, optimizer and trainer state: epoch and iteration)
  at the end of every epoch, replacing the previous one (written to a temporary name first), and
- if that file exists when training starts, loads it first, so an interrupted run resumes where
  its last completed epoch ended.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from ignite.engine import Events

LOGGER = logging.getLogger("qmri.training")
CHECKPOINT_NAME = "checkpoint_last.pt"


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def attach_checkpointing(trainer, ckpt_dir: str, objects: dict, resume: bool = True, interval_epochs: int = 1,
                         save: bool = True) -> bool:
    """Attach last-checkpoint saving (and resuming) to an Ignite trainer. Returns True if resumed.

    ``save=False`` (every rank but 0 of a distributed run) only resumes: one process writes.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / CHECKPOINT_NAME
    objects = dict(objects)
    objects.setdefault("trainer", trainer)

    def _save(engine):
        _save_atomic({k: v.state_dict() for k, v in objects.items()}, path)

    if save:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=int(interval_epochs)), _save)
    if resume and path.exists():
        max_epochs = trainer.state.max_epochs  # the configured total, possibly raised since the checkpoint
        state = torch.load(path, map_location="cpu", weights_only=True)
        for k, v in objects.items():
            if k in state:
                v.load_state_dict(state[k])
        if max_epochs is not None:
            trainer.state.max_epochs = max(int(max_epochs), trainer.state.max_epochs or 0)
        LOGGER.info("resumed from %s at epoch %d, iteration %d", path, trainer.state.epoch, trainer.state.iteration)
        return True
    return False


def init_from_weights(path: str | None, *networks: torch.nn.Module) -> bool:
    """Start training from trained weights (e.g. a bundle's models/model.pt): load them into each
    network (the online one and its EMA copy). A ``checkpoint_last.pt`` found later by
    :func:`attach_checkpointing` still takes precedence (it is loaded after this)."""
    if not path:
        return False
    for net in networks:
        load_weights(net, path)
    LOGGER.info("initialised %d network(s) from %s", len(networks), path)
    return True


def load_weights(network: torch.nn.Module, path: str, key: str | None = None) -> torch.nn.Module:
    """Load CPU weights (a state dict, or a dict holding one under ``key``) with weights_only=True."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None and key in state:
        state = state[key]
    network.load_state_dict(state)
    return network


__all__ = ["attach_checkpointing", "init_from_weights", "load_weights", "CHECKPOINT_NAME"]
