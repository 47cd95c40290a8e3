"""Read the JSON files, tokenizers and models the stages wrote, and name a damaged one in one line.

A truncated or corrupt file (an interrupted copy or download, a full disk, a killed write) makes
json, safetensors, torch or tokenizers fail with their own tracebacks, which name neither the file
nor what to do. These helpers turn that into a ``PenwrightError``:
``<file>: damaged or truncated (<reason>); <what to do>``, one line.

A directory load (``from_pretrained``) that fails is followed by a cheap check of the files in it
(JSON parses, a safetensors header covers the file, a torch zip opens, ``tokenizer.json`` builds a
tokenizer) to name the damaged one. When none is damaged, the loader's own error goes on unchanged.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from penwright.core.errors import PenwrightError

T = TypeVar("T")

# the order files are checked in: the one a load reads first is named first
CHECKED = (
    "config.json",
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin",
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "vocab.json",
    "generation_config.json",
)


def short(err: BaseException | str, limit: int = 200) -> str:
    """An error's message on one line, cut at ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def damaged(file: str | Path, reason: BaseException | str, fix: str) -> PenwrightError:
    """The one-line error for a damaged ``file``: what failed and ``fix``, what to do."""
    return PenwrightError(f"{file}: damaged or truncated ({short(reason)}); {fix}")


def read_json(path: str | Path, fix: str) -> Any:
    """The JSON in ``path``; a PenwrightError naming it when it is not valid JSON (cut short, garbage bytes).

    A missing file raises ``FileNotFoundError`` as ``open`` does: callers say what writes it.
    """
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except ValueError as err:  # json.JSONDecodeError, UnicodeDecodeError
        raise damaged(path, f"not valid JSON: {err}", fix) from None


def why_damaged(file: Path) -> str | None:
    """Why ``file`` cannot be read as what its name says (JSON, safetensors, a torch zip), or None when it can."""
    name = file.name
    try:
        if name.endswith(".json"):
            try:
                text = file.read_bytes().decode("utf-8")
                json.loads(text)
            except ValueError as err:
                return f"not valid JSON: {err}"
            if name == "tokenizer.json":
                from tokenizers import Tokenizer

                try:
                    Tokenizer.from_str(text)
                except Exception as err:  # tokenizers raises a plain Exception
                    return f"not a tokenizer: {err}"
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(str(file), "np") as weights:
                    weights.keys()
            except Exception as err:  # SafetensorError: a short or foreign header, a file shorter than it says
                return f"not a complete safetensors file: {err}"
        elif name.endswith(".bin"):
            try:
                with zipfile.ZipFile(file) as archive:
                    if archive.testzip() is not None:
                        return "a member fails its checksum"
            except Exception as err:  # zipfile raises several types for a damaged archive
                return f"not a complete torch file: {err}"
    except OSError as err:
        return f"cannot be read: {err}"
    return None


def check_dir(directory: str | Path, fix: str) -> None:
    """Raise the one-line error for the first damaged file in ``directory`` (see ``why_damaged``); else nothing."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    present = [p for p in directory.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")]
    order = {name: i for i, name in enumerate(CHECKED)}
    for file in sorted(present, key=lambda p: (order.get(p.name, len(order)), p.name)):
        why = why_damaged(file)
        if why:
            raise damaged(file, why, fix)


def load_dir(directory: str | Path, loader: Callable[..., T], fix: str, *args, **kwargs) -> T:
    """``loader(directory, *args, **kwargs)`` (a ``from_pretrained``); when it fails on a damaged file, the
    one-line error naming that file and ``fix``. Other failures go on as the loader raised them."""
    try:
        return loader(str(directory), *args, **kwargs)
    except Exception:  # SafetensorError, OSError, ValueError, tokenizers' plain Exception, torch's errors ...
        check_dir(directory, fix)
        raise


def load_model(directory: str | Path, fix: str, **kwargs):
    """``GPT2LMHeadModel.from_pretrained(directory, **kwargs)``, naming a damaged file (see ``load_dir``)."""
    from transformers import GPT2LMHeadModel

    return load_dir(directory, GPT2LMHeadModel.from_pretrained, fix, **kwargs)


def load_tokenizer(directory: str | Path, fix: str, **kwargs):
    """``AutoTokenizer.from_pretrained(directory, local_files_only=True)``, naming a damaged file (see ``load_dir``)."""
    from transformers import AutoTokenizer

    return load_dir(directory, AutoTokenizer.from_pretrained, fix, local_files_only=True, **kwargs)


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """``save_pretrained`` with the chat template inline in ``tokenizer_config.json`` (not a separate
    ``chat_template.jinja``): transformers.js and every copy of the folder read it from there."""
    tokenizer.save_pretrained(directory, save_jinja_files=False)
