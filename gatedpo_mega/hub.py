"""Hugging Face Hub ids (``org/name``, ``name``, either with ``@revision``) as ``model.init_from`` and ``data.source``.

An id becomes a folder of the local Hugging Face cache through ``huggingface_hub.snapshot_download``: the files are
downloaded when the Hub is reachable and taken from the cache when it is not, or when ``HF_HUB_OFFLINE=1`` forbids
asking it (the cache is ``HF_HUB_CACHE``, by default ``$HF_HOME/hub``). A path that exists is always a path, so a
local folder named like an id is never looked up. Every failure is one ``UserError`` naming the field and the id.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gatedpo_mega.errors import UserError

# Hub repository names: letters, digits, '-', '_', '.', at most 96 characters, no '--' or '..' (huggingface_hub's
# validate_repo_id). The revision is a branch, tag or commit; branches may hold '/' (refs/pr/1).
_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_REVISION = re.compile(r"^[\w.][\w./-]{0,199}$")
# Names that are files, not repositories: a missing file is "does not exist", never a Hub lookup.
_FILE_SUFFIXES = (
    ".json", ".jsonl", ".ndjson", ".gz", ".parquet", ".arrow", ".model", ".safetensors", ".bin", ".pt", ".yaml",
    ".yml", ".txt", ".csv",
)  # fmt: skip

# What a model folder of this project is read from: the config, safetensors weights and the tokenizer files
# (convert/folders.py reads model.safetensors or its index; transformers and data.tokenizer read the rest).
MODEL_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class HubId:
    repo_id: str  # "org/name" or "name"
    revision: str | None  # None: the default branch

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse_hub_id(text: str) -> HubId | None:
    """The Hub id ``text`` spells, or None when it can only be a local path (``/``, ``.`` or ``~`` first, more
    than one ``/`` before any ``@``, a file suffix, characters a repository name cannot hold)."""
    repo_id, at, revision = text.partition("@")
    if (at and not _REVISION.match(revision)) or not _ID.match(repo_id):
        return None
    if "--" in repo_id or ".." in repo_id or repo_id.lower().endswith((".git", *_FILE_SUFFIXES)):
        return None
    return HubId(repo_id, revision if at else None)


def hub_id(text: str) -> HubId | None:
    """``parse_hub_id`` for a string that names no existing file or folder (an existing path always wins)."""
    try:
        if Path(text).expanduser().exists():
            return None
    except OSError:  # a name the system refuses (too long): the path's own check says so
        return None
    return parse_hub_id(text)


def _cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def explain(e: Exception, ident: HubId, repo_type: str, *, cache: str, offline: bool) -> str:
    """What went wrong resolving ``ident`` and what to do, in one line (after ``field=id: ``)."""
    from huggingface_hub import errors

    download = f"hf download {ident.repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else "")
    if ident.revision:
        download += f" --revision {ident.revision}"
    kind = "dataset repository" if repo_type == "dataset" else "model repository"
    if isinstance(e, errors.GatedRepoError):
        return (
            f"a gated {kind} on the Hugging Face Hub, not in the cache ({cache}): accept its terms on "
            "huggingface.co, then log in (`hf auth login`) or set HF_TOKEN"
        )
    if isinstance(e, errors.RepositoryNotFoundError):
        return (
            f"no such local file or folder, and no such {kind} on the Hugging Face Hub (a private one needs "
            "`hf auth login` or HF_TOKEN)"
        )
    if isinstance(e, errors.RevisionNotFoundError):
        return f"the {kind} has no revision {ident.revision or 'main'} on the Hugging Face Hub"
    if isinstance(e, errors.IncompleteSnapshotError):
        return (
            f"only partly in the Hugging Face cache ({cache}; an interrupted download) and the Hub is not "
            f"reachable: complete it where the Hub is reachable (`{download}`)"
        )
    if isinstance(e, errors.LocalEntryNotFoundError):
        where = (
            "HF_HUB_OFFLINE=1 forbids downloading it"
            if offline
            else f"the Hub is not reachable ({_first_line(e.__cause__ or e)})"
        )
        unset = " or unset HF_HUB_OFFLINE" if offline else ""
        return (
            f"no such local file or folder, not in the Hugging Face cache ({cache}), and {where}: download it "
            f"into that cache where the Hub is reachable (`{download}`){unset}"
        )
    if isinstance(e, errors.HFValidationError):
        return f"no such local file or folder, and not a valid Hugging Face Hub id ({_first_line(e)})"
    if isinstance(e, errors.HfHubHTTPError):
        return f"the Hugging Face Hub refused it ({_first_line(e)})"
    return f"reading it from the Hugging Face cache ({cache}) failed ({_first_line(e)})"


def resolve(ident: HubId, *, field: str, repo_type: str, patterns: Sequence[str]) -> Path:
    """The cache folder of ``ident`` at its revision, holding the files of ``patterns`` (downloaded when missing
    and the Hub is reachable)."""
    import httpx2  # huggingface_hub's HTTP client: a connection lost mid-download
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            ident.repo_id, repo_type=repo_type, revision=ident.revision, allow_patterns=list(patterns)
        )
    except (
        OSError,
        ValueError,
        httpx2.HTTPError,
    ) as e:  # the hub's own: OSError (HTTP, not cached), ValueError (id)
        line = explain(e, ident, repo_type, cache=_cache(), offline=_offline())
        raise UserError(f"{field}={ident}: {line}") from None
    return Path(folder)


def resolve_model(ident: HubId, patterns: Sequence[str] = MODEL_FILES) -> Path:
    """The cache folder of the model ``ident`` of ``model.init_from`` (``patterns``: the files it must hold),
    refused when the repository has no ``config.json``."""
    folder = resolve(ident, field="model.init_from", repo_type="model", patterns=patterns)
    if not (folder / "config.json").is_file():
        raise UserError(
            f"model.init_from={ident}: the Hub repository has no config.json (a Hugging Face model is needed)"
        )
    return folder
