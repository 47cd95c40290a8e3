"""Load pretrained things (tokenizers now, models later) by hub name or local directory, failing fast offline.

``from_pretrained("gpt2")`` with no network and no cached copy retries for ~20 s before it fails
with a message about the hub. We try the local cache first, then check in a few seconds whether
the hub is reachable at all, and otherwise say how to point penwright at a local checkpoint.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from penwright.core.errors import PenwrightError
from penwright.core.files import check_dir, load_dir, short

T = TypeVar("T")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (or ``HF_ENDPOINT``) opens within ``timeout``."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def cached_snapshot(name: str) -> Path | None:
    """The directory of ``name``'s copy in the Hugging Face cache, or None when there is none."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception:  # not cached, not a valid repo id, ...
        return None


def load_pretrained(name_or_path: str, loader: Callable[..., T], what: str, key: str, extra: str = "") -> T:
    """``loader(name_or_path)`` from a local dir, the HF cache, or the hub; a clear error otherwise.

    ``what`` says what is loaded ("tokenizer", "model"); ``key`` is the config key that set the name;
    ``extra`` ends the offline message (e.g. another key that sets it too).
    """
    local = Path(os.path.expanduser(str(name_or_path)))
    if local.exists():
        if not local.is_dir():
            raise PenwrightError(f"{key}={name_or_path}: is a file; give the directory saved with save_pretrained")
        try:
            return load_dir(
                local,
                loader,
                f"save the {what} there again with save_pretrained, or download it again ({key}={name_or_path})",
            )
        except (OSError, ValueError) as err:
            raise PenwrightError(
                f"{key}={name_or_path}: cannot load a {what} from this directory ({err}). "
                f"It must hold the files save_pretrained writes."
            ) from None
    try:
        return loader(str(name_or_path), local_files_only=True)
    except Exception as err:  # not cached (OSError), or a cached file is damaged (SafetensorError, torch, ...)
        cached = cached_snapshot(str(name_or_path))
        if cached is not None:  # name the damaged file of the cached copy, if one is
            check_dir(
                cached,
                f"delete the cached copy ({cached.parent.parent}) and download it again, or set {key} to a local "
                f"directory saved with save_pretrained",
            )
        if not isinstance(err, (OSError, ValueError)):
            raise
    if hub_reachable():
        try:
            return loader(str(name_or_path))
        except (OSError, ValueError) as err:
            raise PenwrightError(f"{key}={name_or_path}: cannot load the {what} from the hub: {short(err)}") from None
    raise PenwrightError(
        f"{key}={name_or_path}: no local directory of that name, no cached copy, and the Hugging Face hub "
        f"is not reachable (offline?). Download it on a machine with network "
        f"(`AutoModelForCausalLM.from_pretrained('{name_or_path}').save_pretrained(DIR)` and the same for "
        f"AutoTokenizer), then set {key}=DIR{extra}"
    )
