"""Training-loop helpers shared by the bundles: resumable checkpoints.

``attach_checkpointing(trainer, ckpt_dir, objects)`` is called from a bundle's ``run`` list, after
the trainer exists (a handler that holds the trainer cannot be one of the trainer's own config
handlers without a circular reference). It

- saves ``checkpoint_last.pt`` (network, EMA, optimizer and trainer state: epoch and iteration)
  at the end of every epoch, replacing the previous one (written to a temporary name first), and
- if that file exists when training starts, loads it first, so an interrupted run resumes where
  its last completed epoch ended. The configured ``max_epochs`` wins over the checkpoint's (raise
  it to train on); a checkpoint already at or past it trains nothing.
"""

from __future__ import annotations

import json
import logging
import math
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


def checkpoint_name(model_name: str = "model") -> str:
    """The last-checkpoint file of a training whose best weights are ``<model_name>.pt``:
    checkpoint_last.pt for "model", checkpoint_last_<model_name>.pt otherwise (so that models for
    several protocols can be trained into one folder without resuming each other)."""
    if not model_name or any(c in str(model_name) for c in "/\\") or str(model_name).startswith("."):
        raise ValueError(f"model_name must be a plain file stem, got {model_name!r}")
    return CHECKPOINT_NAME if model_name == "model" else f"checkpoint_last_{model_name}.pt"


def attach_checkpointing(trainer, ckpt_dir: str, objects: dict, resume: bool = True, interval_epochs: int = 1,
                         save: bool = True, name: str = CHECKPOINT_NAME) -> bool:
    """Attach last-checkpoint saving (and resuming) to an Ignite trainer. Returns True if resumed.

    ``save=False`` (every rank but 0 of a distributed run) only resumes: one process writes.
    ``name``: the checkpoint's file name in ``ckpt_dir`` (:func:`checkpoint_name`).
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / name
    objects = dict(objects)
    objects.setdefault("trainer", trainer)

    def _save(engine):
        _save_atomic({k: v.state_dict() for k, v in objects.items()}, path)

    if save:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=int(interval_epochs)), _save)
    if resume and path.exists():
        max_epochs = trainer.state.max_epochs  # the configured total, possibly changed since the checkpoint
        state = read_weights(path)
        for k, v in objects.items():
            if k in state:
                v.load_state_dict(state[k])
        if max_epochs is not None:  # the configured total wins over the checkpoint's (raise or lower it)
            trainer.state.max_epochs = int(max_epochs)
        LOGGER.info("resumed from %s at epoch %d, iteration %d", path, trainer.state.epoch, trainer.state.iteration)
        if max_epochs is not None and trainer.state.epoch >= int(max_epochs):
            # Ignite would start a finished run again from epoch 0: stop at once instead
            done = trainer.state.epoch
            trainer.state.max_epochs = done
            LOGGER.info("the checkpoint has %d epochs, max_epochs is %d: nothing to train (raise --max_epochs to go on)",
                        done, int(max_epochs))
            trainer.add_event_handler(Events.STARTED, lambda engine: engine.terminate())
        return True
    return False


class KeyMetricState:
    """The best-validation bookkeeping of a training, saved in ``checkpoint_last.pt`` beside the
    networks: the evaluator's best metric and epoch, and the key-metric CheckpointSaver's list of
    saved scores. Without it a resumed run forgets its best score, and its first validation, however
    much worse, would overwrite the best weights (``<model_name>.pt``).

    ``handlers``: the evaluator's handlers (``@validate#handlers``); the CheckpointSaver that saves
    on the key metric is found among them."""

    def __init__(self, evaluator, handlers):
        self.evaluator = evaluator
        savers = [h for h in handlers if getattr(h, "_key_metric_checkpoint", None) is not None]
        self.saver = savers[0] if savers else None

    def state_dict(self) -> dict:
        st = self.evaluator.state
        saved = self.saver._key_metric_checkpoint.state_dict()["_saved"] if self.saver is not None else []
        return {"best_metric": float(st.best_metric), "best_metric_epoch": int(st.best_metric_epoch),
                "saved": [[float(priority), str(name)] for priority, name in saved]}

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
        if self.saver is not None:
            self.saver.load_state_dict({"_saved": [(float(p), str(n)) for p, n in state["saved"]]})


def cosine_learning_rate(epoch_progress: float, learning_rate: float, final_learning_rate: float,
                         decay_start_epoch: float, max_epochs: float) -> float:
    """Learning rate at a (fractional) epoch: constant ``learning_rate`` until ``decay_start_epoch``,
    then a half cosine down to ``final_learning_rate`` at ``max_epochs``."""
    if epoch_progress <= decay_start_epoch or max_epochs <= decay_start_epoch:
        return float(learning_rate)
    f = min(1.0, (epoch_progress - decay_start_epoch) / (max_epochs - decay_start_epoch))
    return float(final_learning_rate + 0.5 * (learning_rate - final_learning_rate) * (1.0 + math.cos(math.pi * f)))


def attach_lr_decay(trainer, optimizer, learning_rate: float, final_learning_rate: float | None,
                    decay_start_epoch: int | None) -> bool:
    """Cosine learning-rate decay from ``decay_start_epoch`` to the trainer's ``max_epochs``.

    The rate is a function of the trainer's iteration count alone (set before every iteration), so
    it needs no state of its own and is right after a resume from ``checkpoint_last.pt``. Nothing
    is attached (constant rate) when ``decay_start_epoch`` or ``final_learning_rate`` is None.
    """
    if decay_start_epoch is None or final_learning_rate is None:
        return False

    def _set(engine):
        length = engine.state.epoch_length or 1
        progress = (engine.state.iteration - 1) / length
        lr = cosine_learning_rate(progress, learning_rate, final_learning_rate, float(decay_start_epoch),
                                  float(engine.state.max_epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr

    trainer.add_event_handler(Events.ITERATION_STARTED, _set)
    return True


def attach_gradient_clipping(trainer, network, max_norm: float | None) -> bool:
    """Clip the gradient norm of ``network`` to ``max_norm`` after every backward pass (MONAI's
    ``BACKWARD_COMPLETED`` event, before the optimizer step); nothing when ``max_norm`` is None."""
    if max_norm is None:
        return False
    from monai.engines.utils import IterationEvents

    def _clip(engine):
        torch.nn.utils.clip_grad_norm_(network.parameters(), float(max_norm))

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, _clip)
    return True


def init_from_weights(path: str | None, *networks: torch.nn.Module, input_layout=None, middle: str = "interpolate") -> bool:
    """Start training from trained weights (e.g. a bundle's models/model.pt): load them into each
    network (the online one and its EMA copy). A ``checkpoint_last.pt`` found later by
    :func:`attach_checkpointing` still takes precedence (it is loaded after this).

    ``input_layout = (n_lead, n_images, n_tail)`` allows a warm start across protocols: the network's
    input channels are ``n_lead`` channels (the noisy maps), then one channel per inversion time, then
    ``n_tail`` (the classical fit). A weight that differs from the file's only in its input-channel
    axis is adapted by :func:`adapt_input_channels`; every other tensor must match exactly. The file's
    own layout comes from its weights card (``n_images``, ``fit_condition``); weights whose condition
    channels differ from the network's (images only against images + fit) are refused, since their
    channels cannot be matched. Without a card the file is taken to have the network's tail.
    ``middle="zeros"``: the middle channels mean something else than the file's images (the CRLB channels
    of a protocol-free model): their weights start at zero, so the warm-started network first ignores them."""
    if middle not in ("interpolate", "zeros"):
        raise ValueError(f"middle must be 'interpolate' or 'zeros', got {middle!r}")
    if not path:
        return False
    from ..io import InputError

    card = None
    if input_layout is not None:
        card = read_weights_card(path)
        if card is not None and "fit_condition" in card:
            if (3 if _as_bool(card["fit_condition"]) else 0) != int(input_layout[2]):
                raise InputError(f"{path}: --init_from weights were trained with fit_condition="
                                 f"{_as_bool(card['fit_condition'])}, this network has fit_condition="
                                 f"{bool(input_layout[2])}; their condition channels differ, so they cannot "
                                 "warm-start it")
    for net in networks:
        if input_layout is None:
            load_weights(net, path)
        else:
            state = read_weights(path)
            target = net.state_dict()
            adapted = []
            for name, value in state.items():
                if name in target and value.ndim >= 2 and value.shape != target[name].shape \
                        and value.shape[0] == target[name].shape[0] and value.shape[2:] == target[name].shape[2:]:
                    if card is not None and "n_images" in card and \
                            value.shape[1] != int(input_layout[0]) + int(card["n_images"]) + int(input_layout[2]):
                        raise InputError(f"{path}: {name} has {value.shape[1]} input channels, not the "
                                         f"{input_layout[0]} + {card['n_images']} + {input_layout[2]} its card implies")
                    state[name] = adapt_input_channels(value, *input_layout)
                    if middle == "zeros":
                        state[name][:, int(input_layout[0]):int(input_layout[0]) + int(input_layout[1])] = 0
                    adapted.append(name)
            net.load_state_dict(state)
            if adapted:
                LOGGER.info("adapted input channels of %s to %d inversion times", ", ".join(adapted), input_layout[1])
    LOGGER.info("initialised %d network(s) from %s", len(networks), path)
    return True


def adapt_input_channels(weight: torch.Tensor, n_lead: int, n_images: int, n_tail: int) -> torch.Tensor:
    """Map a convolution weight (out, in_old, ...) trained for another number of inversion times to
    ``n_lead + n_images + n_tail`` input channels: the lead and tail channels mean the same for every
    protocol and are copied; the weight of old image channel ``j`` is split between the two new image
    channels nearest to its relative position in the TI order (linear interpolation), so the summed
    image weight is unchanged and a signal constant over TI gives the same response. A warm start, not
    a converted model: it still needs training."""
    n_lead, n_images, n_tail = int(n_lead), int(n_images), int(n_tail)
    n_old = weight.shape[1] - n_lead - n_tail
    if n_old < 1 or n_images < 1:
        raise ValueError(f"cannot adapt a weight with {weight.shape[1]} input channels to layout "
                         f"({n_lead}, {n_images}, {n_tail})")
    lead, images, tail = weight[:, :n_lead], weight[:, n_lead:n_lead + n_old], weight[:, n_lead + n_old:]
    split = torch.zeros(n_old, n_images, dtype=weight.dtype)  # rows sum to 1
    for j in range(n_old):
        q = j * (n_images - 1) / max(n_old - 1, 1)
        lo = int(q)
        hi = min(lo + 1, n_images - 1)
        split[j, lo] += 1.0 - (q - lo)
        split[j, hi] += q - lo
    new_images = torch.einsum("oj...,ji->oi...", images, split)
    return torch.cat([lead, new_images, tail], dim=1).contiguous()


def read_weights(path: str | os.PathLike) -> dict:
    """The tensors of a weights or checkpoint file, read with ``torch.load(weights_only=True)``: a file
    holding any other Python object (which unpickling could use to run code) is refused with one line,
    never executed."""
    import pickle
    import warnings

    from ..io import InputError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes would precede the one-line error
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: refused: the file holds Python objects besides tensors, and loading them could "
                         "run code; only plain weights are read (torch.load weights_only=True)") from None
    except FileNotFoundError:
        raise InputError(f"{path}: no such weights file") from None
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, ...
        raise InputError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: weights must be a dict of tensors, got {type(state).__name__}")
    return state


def load_weights(network: torch.nn.Module, path: str, key: str | None = None) -> torch.nn.Module:
    """Load CPU weights (a state dict, or a dict holding one under ``key``) with weights_only=True."""
    state = read_weights(path)
    if key is not None and key in state:
        state = state[key]
    network.load_state_dict(state)
    return network


def attach_progress_bar(trainer, enabled: bool = True) -> bool:
    """A tqdm progress bar over each training epoch (iterations, the running loss), on stderr; the
    per-iteration lines of the StatsHandler still go through the bundle's logging.conf."""
    if not _as_bool(enabled):  # "false" from the command line is text
        return False
    from ignite.handlers import ProgressBar

    ProgressBar(persist=False, desc="train").attach(
        trainer, output_transform=lambda out: {"loss": float(out[0]["loss"] if isinstance(out, list) else out["loss"])})
    return True


def rank_summary(trainer, network: torch.nn.Module) -> dict:
    """Log (on every rank of a distributed run) what this process trained and a checksum of its
    weights: with DistributedDataParallel the checksums of all ranks agree (the gradients are averaged
    and the start broadcast from rank 0), which is how a test sees that the ranks trained together."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    with torch.no_grad():
        checksum = float(sum(p.detach().double().sum() for p in network.parameters()))
    st = trainer.state
    info = {"rank": rank, "world_size": world, "epochs": int(st.epoch), "iterations": int(st.iteration),
            "epoch_length": int(st.epoch_length or 0), "checksum": checksum}
    LOGGER.info("rank %d of %d trained %d epochs, %d iterations (%d per epoch); weights checksum %.12e",
                rank, world, info["epochs"], info["iterations"], info["epoch_length"], checksum)
    return info


CARD_KEYS = ("method", "protocol", "n_images", "network_preset", "fit_condition", "fit_residual", "prediction_type",
             "map_prior", "crlb_condition")


def weights_card_path(weights: str | os.PathLike) -> Path:
    """The card of a weights file: the same name with ``.json`` (models/model.pt -> models/model.json)."""
    return Path(weights).with_suffix(".json")


def write_weights_card(path: str | os.PathLike, **fields) -> Path:
    """Write the JSON card that travels with trained weights: the config values a network needs at
    inference (method, protocol as a full dict, network preset, condition variant, ...), so that
    ``qmri map --weights W`` maps with W's own protocol and variant. Written atomically at the start
    of training (the weights it describes appear later in the same folder)."""
    from ..physics.protocol import get_protocol

    card = {k: v for k, v in fields.items() if k in CARD_KEYS}
    unknown = sorted(set(fields) - set(CARD_KEYS))
    if unknown:
        raise ValueError(f"unknown weights-card fields {unknown}; allowed: {list(CARD_KEYS)}")
    if "protocol" in card:
        card["protocol"] = get_protocol(card["protocol"]).to_dict()
    for k in ("fit_condition", "fit_residual", "map_prior", "crlb_condition"):
        if k in card:
            card[k] = _as_bool(card[k])
    card = check_weights_card(card, str(path))  # what training writes, inference must accept
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(path)
    return path


#: Strings that MONAI's ConfigParser would not keep as text: "$" evaluates Python, "@" references
#: another config item, "%" pulls in (macro) part of another file.
CONFIG_SIGILS = ("$", "@", "%")

_CARD_METHODS = ("diffusor", "resnet", "rim")


def _card_choices(key: str) -> tuple[str, ...]:
    from ..methods.inferers import PREDICTION_TYPES
    from ..methods.networks import DIFFUSION_PRESETS, RESNET_PRESETS
    from ..methods.rim import RIM_PRESETS

    if key == "method":
        return _CARD_METHODS
    if key == "network_preset":
        return tuple(sorted(set(DIFFUSION_PRESETS) | set(RESNET_PRESETS) | set(RIM_PRESETS)))
    return tuple(PREDICTION_TYPES)


def _plain_number(v, integer: bool = False) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return math.isfinite(v) and (not integer or float(v).is_integer())


def check_weights_card(card, where: str = "weights card") -> dict:
    """A weights card is data: check it against its schema and return it with its protocol
    re-serialised by :meth:`Protocol.to_dict`. Raises :class:`custom_components.io.InputError` (one line).

    Schema (every key optional): ``method`` and ``prediction_type`` one of the code's own names,
    ``network_preset`` one of the presets of the networks, ``n_images`` an integer >= 3 (0 for a
    ``map_prior``, a prior over maps that sees no images, and for ``crlb_condition``, a protocol-free model
    conditioned on the fit and its CRLB), ``fit_condition``/``fit_residual``/``map_prior``/``crlb_condition``
    JSON booleans, ``protocol`` an object that
    :meth:`Protocol.from_dict` accepts whose values are numbers, lists of numbers, null or plain
    strings. No string anywhere may start with "$", "@" or "%" (:data:`CONFIG_SIGILS`): the card's
    values are copied into a MONAI config, where such strings are code or references."""
    from ..io import InputError
    from ..physics.protocol import Protocol

    def refuse(why: str):
        raise InputError(f"{where}: refused: {why} (a weights card holds data only: keys {list(CARD_KEYS)})")

    if not isinstance(card, dict):
        refuse(f"a JSON object is needed, got {type(card).__name__}")
    unknown = sorted(str(k) for k in set(card) - set(CARD_KEYS))
    if unknown:
        refuse(f"unknown keys {unknown}")

    def plain_string(key, v):
        if not isinstance(v, str):
            refuse(f"{key} must be a string, got {type(v).__name__}")
        if v.lstrip().startswith(CONFIG_SIGILS) or "\n" in v:
            refuse(f"{key} {v[:40]!r}... is an expression or reference, not a plain value")
        return v

    out = {}
    for key, v in card.items():
        if key in ("method", "network_preset", "prediction_type"):
            plain_string(key, v)
            if v not in _card_choices(key):
                refuse(f"{key} must be one of {list(_card_choices(key))}, got {v[:40]!r}")
        elif key == "n_images":
            free = card.get("map_prior") is True or card.get("crlb_condition") is True
            if not _plain_number(v, integer=True) or (v != 0 if free else v < 3):
                refuse(f"n_images must be {'0 for a protocol-free model' if free else 'an integer >= 3'}, got {str(v)[:40]!r}")
            v = int(v)
        elif key in ("fit_condition", "fit_residual", "map_prior", "crlb_condition"):
            if not isinstance(v, bool):
                refuse(f"{key} must be true or false, got {str(v)[:40]!r}")
        elif key == "protocol":
            if not isinstance(v, dict):
                refuse(f"protocol must be a JSON object, got {type(v).__name__}")
            for pk, pv in v.items():
                if isinstance(pv, str):
                    plain_string(f"protocol.{pk}", pv)
                elif isinstance(pv, list):
                    if not all(_plain_number(x) for x in pv):
                        refuse(f"protocol.{pk} must hold numbers only")
                elif pv is not None and not _plain_number(pv):
                    refuse(f"protocol.{pk} must be a number, a list of numbers, null or a string")
            try:
                v = Protocol.from_dict(v).to_dict()
            except (ValueError, TypeError) as e:  # ProtocolError is a ValueError
                refuse(f"protocol: {' '.join(str(e).split())[:200]}")
        out[key] = v
    if out.get("map_prior") is True and (out.get("fit_condition") is True or out.get("fit_residual") is True):
        refuse("a map prior sees no images and no fit: fit_condition and fit_residual must not be true")
    if out.get("crlb_condition") is True and (out.get("fit_condition") is not True or out.get("map_prior") is True):
        refuse("a CRLB condition comes with the classical fit: fit_condition must be true and map_prior not")
    return out


def read_weights_card(weights: str | os.PathLike) -> dict | None:
    """The card beside ``weights`` (None if there is none), checked by :func:`check_weights_card`;
    raises :class:`custom_components.io.InputError` (a ValueError) if it is unreadable or breaks the schema."""
    from ..io import InputError

    path = weights_card_path(weights)
    if not path.exists():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable weights card ({e})") from None
    return check_weights_card(card, str(path))


def card_value(weights: str | os.PathLike, key: str, default=None):
    """``key`` of the weights card beside ``weights`` (``default`` when there is no card or no such
    key): lets an inference config take the variant from the weights it loads."""
    card = read_weights_card(weights)
    return default if card is None else card.get(key, default)


def _as_bool(v) -> bool:
    """Config booleans as MONAI's command line passes them (True, "True", "true", 1, ...)."""
    if isinstance(v, str):
        if v.strip().lower() in ("true", "1", "yes"):
            return True
        if v.strip().lower() in ("false", "0", "no", "none", ""):
            return False
        raise ValueError(f"not a boolean: {v!r}")
    return bool(v)


__all__ = ["checkpoint_name", "rank_summary", "attach_progress_bar", "CARD_KEYS", "CONFIG_SIGILS", "check_weights_card", "write_weights_card", "read_weights_card", "card_value", "weights_card_path", "attach_checkpointing", "attach_gradient_clipping", "attach_lr_decay", "cosine_learning_rate", "init_from_weights", "adapt_input_channels", "read_weights", "load_weights", "CHECKPOINT_NAME"]
