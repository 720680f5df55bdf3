"""Errors raised by pollinate.

Every error derives from one root, so ``except PollinateError`` catches them all::

    PollinateError
    ├── ConfigError            a run config or argument is invalid (names the key and the fix)
    │   └── RunFolderLocked    another live process writes this run folder (pollinate.runlock)
    ├── DataError              a data set is missing, corrupt, or cannot be partitioned as asked
    ├── SerializationError     bytes that are not a valid Arrays payload (truncated, oversized, …)
    ├── UpdateRejected         a client's update has the wrong shapes/dtypes or non-finite values
    ├── ClientFailure          a client task raised, died, or missed the round deadline
    ├── RoundFailedError       too few clients succeeded for the round to count
    ├── BackendError           a simulation backend could not start or lost its workers
    ├── MissingDependencyError an optional dependency (torch, ray …) is not installed
    ├── StateError             the server's SQLite run state is missing, corrupt or for another run
    │                          (pollinate.state)
    ├── AuthError              a client failed authentication: unknown, revoked, bad signature,
    │                          replayed (pollinate.transport.grpc.auth)
    └── PrivacyError           a privacy setting cannot be honoured (pollinate.privacy)
        └── PrivacyBudgetExceeded  the next round would spend more ε than privacy.max_epsilon
"""

from __future__ import annotations


class PollinateError(Exception):
    """Root of every error raised by pollinate."""


class ConfigError(PollinateError, ValueError):
    """A run config, CLI argument or API argument is invalid."""


class DataError(PollinateError, ValueError):
    """A data set is missing or corrupt, or cannot be partitioned as requested."""


class SerializationError(PollinateError, ValueError):
    """Bytes that cannot be decoded as an Arrays payload."""


class UpdateRejected(PollinateError, ValueError):
    """A client's update does not match the global model or holds non-finite values."""


class ClientFailure(PollinateError):
    """A client task raised, its worker died, or it missed the round deadline."""


class RoundFailedError(PollinateError):
    """Fewer clients than the strategy's minimum succeeded in a round."""


class BackendError(PollinateError):
    """A simulation backend could not start its workers or lost them."""


class MissingDependencyError(PollinateError, ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


def missing_dependency(package: str, extra: str) -> MissingDependencyError:
    """Build the error raised when an optional ``package`` is missing: it ends with the
    install line for a PyPI install and for an editable install of a clone."""
    return MissingDependencyError(
        f"{package} is not installed; install it with: pip install 'pollinate[{extra}]' "
        f"(or, in a clone of the repository: pip install -e '.[{extra}]')"
    )


OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    # an importable name: (the package that provides it, the pollinate extra that installs it)
    "torch": ("torch", "torch"),
    "sklearn": ("scikit-learn", "data"),
    "ray": ("ray", "ray"),
    "grpc": ("grpcio", "deploy"),
    "google.protobuf": ("protobuf", "deploy"),
    "cryptography": ("cryptography", "deploy"),
    "dp_accounting": ("dp-accounting", "privacy"),
    "pandas": ("pandas", "analytics"),
    "pyarrow": ("pyarrow", "analytics"),
    "datasets": ("datasets", "hf"),
    "PIL": ("pillow", "hf"),
    "mlflow": ("mlflow-skinny", "tracking"),
    "tensorboard": ("tensorboard", "tracking"),
    "wandb": ("wandb", "tracking"),
}
"""Optional dependencies by the name they are imported as, for :func:`dependency_error`."""


def dependency_error(exc: ImportError) -> MissingDependencyError | None:
    """The install hint for ``exc`` when it is an optional dependency that is not installed
    (``import torch`` failing, or ``import torch.nn``); None for any other import error."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not name:
        return None
    for module, (package, extra) in OPTIONAL_MODULES.items():
        if name == module or name.startswith(module + "."):
            return missing_dependency(package, extra)
    return None
