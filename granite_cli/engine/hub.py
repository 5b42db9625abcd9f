"""Which model to load, and from where: a local folder or the Hugging Face Hub (or its cache).

Checked before anything heavy is imported, and turned into one line when it fails: a malformed
id, a folder that does not exist, a Hub that cannot be reached without a cached copy, a gated or
missing repository.
"""

from __future__ import annotations

from pathlib import Path

from .. import DEFAULT_MODEL
from ..errors import UsageError

#: What a vision model folder holds besides config.json, each as file name patterns of which one
#: must be there (the names `from_pretrained` looks for).
FOLDER_FILES = (
    ("its weights (*.safetensors or pytorch_model*.bin)", ("*.safetensors", "pytorch_model*.bin")),
    ("its image processor (preprocessor_config.json)", ("preprocessor_config.json", "processor_config.json")),
    ("its tokenizer (tokenizer.json or tokenizer_config.json)", ("tokenizer.json", "tokenizer_config.json")),
)

#: How long the probe of the Hub waits for an answer before it counts the Hub as unreachable: long
#: enough for a slow network, short beside the half minute of retries it saves.
HUB_PROBE_SECONDS = 5.0


def model_name(value: str, where: str) -> str:
    """The model to load, checked before anything heavy: a local folder by its absolute path (so
    records and --resume know it however it was spelled), or a well-formed Hub id as given.
    `where` says which option or variable the value came from, for the error line."""
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if _names_a_folder(value):
        raise UsageError(
            f"{where} {value!r}: model folder does not exist."
            f" Hint: pass a folder holding config.json, or a Hub id like {DEFAULT_MODEL}"
        )
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise UsageError(
            f"{where} {value!r}: not a model folder, nor a Hugging Face model id (owner/name, like {DEFAULT_MODEL})"
        ) from None
    return value


def _names_a_folder(value: str) -> bool:
    """A path, not a Hub id (`owner/name`): it can only mean a local folder."""
    return value.startswith(("/", "./", "../", "~")) or value.count("/") > 1


def load_locally(model: str, revision: str | None) -> bool:
    """Whether to load from local files only, deciding fast, and failing fast where nothing can work.

    Without a network, the Hub client retries every file for half a minute with a warning per
    try; a user with a cached model deserves the cached model at once, and a user with neither
    network nor cache deserves one line. So: a folder loads as a folder; otherwise one quick
    probe of the Hub decides between a normal load, a cache-only load, or a clear error.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import get_session

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"model folder {model!r} has no config.json: it is not a Hugging Face model folder")
        return True
    model_name(model, "model")  # no folder: a path that names none, or a malformed Hub id, is one line
    cached = isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str)
    if constants.HF_HUB_OFFLINE:
        return True
    try:
        get_session().head(f"{constants.ENDPOINT}/api/models/{model}", timeout=HUB_PROBE_SECONDS)
        return False
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "offline" here
        if cached:
            return True
        raise UsageError(
            f"model {model!r} is not in the local cache ({constants.HF_HUB_CACHE}) and the Hugging Face Hub"
            f" cannot be reached ({type(exc).__name__}). Hint: connect once to download it, or pass --model PATH"
            " to a downloaded model folder"
        ) from None


def check_folder(model: str) -> None:
    """A local model folder holds what loading needs besides its config: name what is missing,
    rather than let the loader fail on the first file it looks for."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return
    missing = [what for what, patterns in FOLDER_FILES if not any(any(path.glob(p)) for p in patterns)]
    if missing:
        raise UsageError(
            f"model folder {model!r} lacks {' and '.join(missing)}: copy the whole model folder (every file"
            " of its Hub repository), not only some of its files"
        )


#: Exceptions that say, by their type alone, that a model is not there or cannot be read (the hub
#: client's, and safetensors' for a weights file cut short).
NOT_LOADABLE = frozenset(
    {"RepositoryNotFoundError", "HFValidationError", "GatedRepoError", "RevisionNotFoundError", "SafetensorError"}
)


def model_load_error(model: str, exc: BaseException) -> UsageError:
    """Turn a `from_pretrained` failure into one line with a hint.

    The hub client raises several exception types for "not there" (invalid id, repository not
    found, offline, no connection, local folder lacking files); to a user they all mean the
    model could not be found, so they share one message and differ only in the hint.
    """
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if name in NOT_LOADABLE or (
        isinstance(exc, (OSError, ValueError))
        and any(
            key in lowered
            for key in (
                "not a valid model identifier",
                "is not a local folder",
                "does not appear to have a file",
                "couldn't connect",
                "offline mode",
                "repo id must",
                "repo_id",
                "can't load",
                "cannot find the requested files",
                "not found",
            )
        )
    ):
        hint = (
            "check the id or pass --model PATH to a downloaded model folder"
            " (offline? set HF_HUB_OFFLINE=1 and use a cached id or a local folder)"
        )
        from huggingface_hub import constants

        if Path(model).is_dir():
            hint = "the model folder is incomplete or damaged: copy it again, every file of its Hub repository"
        elif constants.HF_HUB_OFFLINE:
            hint = "HF_HUB_OFFLINE is set, so only cached ids and local folders load; check the id or unset it"
        if name == "GatedRepoError":
            hint = "the repository is gated: accept its licence on the Hub and log in with `hf auth login`"
        elif name == "RevisionNotFoundError":
            hint = "check --revision"
        return UsageError(f"model {model!r} not found or not loadable: {_short(text)}. Hint: {hint}")
    return UsageError(f"could not load model {model!r}: {name}: {_short(text)}")


def _short(text: str, limit: int = 200) -> str:
    first = text.split(". ")[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."
