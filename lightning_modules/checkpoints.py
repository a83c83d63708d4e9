"""Reading training checkpoints back into a model, with errors that name the file."""

from pathlib import Path

import torch

from lightning_modules.module import RWSModule


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or for a directory (e.g. `runs/`) the newest `last.ckpt` under it."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise FileNotFoundError(f"no last*.ckpt checkpoint under directory {path}")
        return candidates[-1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path) -> tuple[RWSModule, dict]:
    """Load a Lightning checkpoint of `RWSModule` safely (weights_only: no pickled code runs).

    Returns the module in eval mode and the datamodule's hyperparameters recorded in the
    checkpoint (empty if none), so evaluation can default to the data the model was trained on.
    """
    path = resolve_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from error
    for key in ("hyper_parameters", "state_dict"):
        if key not in checkpoint:
            raise ValueError(f"{path} is not an rws checkpoint: key {key!r} is missing")
    # Why the filter: LightningCLI adds private entries such as `_instantiator` to the hyperparameters.
    hparams = {key: value for key, value in checkpoint["hyper_parameters"].items() if not key.startswith("_")}
    module = RWSModule(**hparams)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"{path}: state_dict does not match its hyperparameters ({error})") from error
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: parameter {name} holds NaN or inf values")
    return module.eval(), dict(checkpoint.get("datamodule_hyper_parameters", {}))
