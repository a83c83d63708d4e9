"""Reading training checkpoints back into a model, with errors that name the file.

Three kinds are read: Lightning `.ckpt` files, single-file `.pt` checkpoints written by `rws
checkpoint consolidate`, and sharded checkpoint directories written by `rws fit` (DCP, with a
COMPLETE marker; verified with sha256 before loading). Nothing is unpickled beyond tensors and
plain values (torch.load(weights_only=True), and DCP's metadata through an allow-list).
"""

import sys
from pathlib import Path

from lightning_modules.module import NonFiniteError, RWSModule, nonfinite_names
from pipeline import checkpoint as ckpt


def _warn_skipped(path: Path, error: ckpt.CheckpointError) -> None:
    print(f"warning: skipping damaged checkpoint {path} ({error})", file=sys.stderr)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or directory; for another directory (e.g. `runs/`) the newest checkpoint
    under it: the newest written complete sharded checkpoint directory (the one `rws fit --resume
    auto` and `rws checkpoint` pick) or a `last*.ckpt` file, whichever was written later."""
    path = Path(path)
    if path.is_dir():
        if (path / ckpt.MARKER).is_file():
            return path
        candidates = [(p.stat().st_mtime, p) for p in path.rglob("last*.ckpt")]
        sharded = ckpt.find_checkpoints(path, on_skip=_warn_skipped)
        if sharded:
            # Why the marker's time and not the write order: a .ckpt file has no sequence number.
            candidates.append((sharded[-1].time, sharded[-1].path))
        if not candidates:
            raise FileNotFoundError(
                f"no checkpoint (last*.ckpt, or a checkpoint directory with a {ckpt.MARKER} marker) under directory {path}"
            )
        return max(candidates)[1]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def _saved_value(path: Path, key: str, tensors_as_none: bool = False):
    """`key` of a checkpoint file or sharded checkpoint directory (None if absent); for a directory,
    read without its tensor data (`ckpt.read_shared_value`)."""
    if path.is_dir():
        return ckpt.read_shared_value(path, key, tensors_as_none)
    return ckpt.read_file(path).get(key)


def read_hyperparameters(path: Path) -> dict:
    """The model hyperparameters saved in a checkpoint file or sharded checkpoint directory (for a
    directory, without reading its tensors); a ValueError naming the file if it holds none."""
    saved = _saved_value(path, "hyper_parameters")
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not an rws checkpoint: key 'hyper_parameters' is missing")
    return saved


def saved_checkpoint_dirs(path: Path) -> dict[str, str]:
    """The directory each of Lightning's ModelCheckpoint callbacks wrote to, by its state key, as
    recorded in checkpoint `path` (a file or a sharded checkpoint directory)."""
    callbacks = _saved_value(path, "callbacks", tensors_as_none=True)
    return {
        key: state["dirpath"]
        for key, state in (callbacks or {}).items()
        if isinstance(state, dict) and isinstance(state.get("dirpath"), str)
    }


def load_checkpoint(path: str | Path) -> tuple[RWSModule, dict]:
    """Load a Lightning checkpoint of `RWSModule` safely (weights_only: no pickled code runs).

    Returns the module in eval mode and the datamodule's hyperparameters recorded in the
    checkpoint (empty if none), so evaluation can default to the data the model was trained on.
    """
    path = resolve_checkpoint(path)
    if path.is_dir():
        checkpoint = ckpt.load(path, ranks=[], no_dist=True).shared  # sha256-verified first; no per-rank state needed
    else:
        checkpoint = ckpt.read_file(path)
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
    nonfinite = nonfinite_names(module.state_dict().items())
    if nonfinite:
        raise NonFiniteError(f"{path}: parameters {', '.join(nonfinite)} hold NaN or inf values")
    return module.eval(), dict(checkpoint.get("datamodule_hyper_parameters", {}))
