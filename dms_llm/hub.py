"""The Hugging Face Hub, in one place: what a Hub id looks like, whether the Hub is worth trying (offline
switches, DNS), which errors mean it could not be reached, the local cache, and pushing a saved folder.

    from dms_llm.hub import push_to_hub
    push_to_hub("outputs/smollm2-80m", "me/smollm2-80m-dms")
"""

from __future__ import annotations

import json
import os
import re
import socket
from urllib.parse import urlparse

from .errors import ActionableError

# "namespace/name" in the characters the Hub allows; anything else is a path, an alias or a typo.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+$")
# huggingface_hub and datasets derive their HTTP, offline, missing-entry and repo-id errors from these two.
HUB_ERRORS = (OSError, ValueError)
# Arguments of `from_pretrained` that say how to fetch files, never how to tokenize.
LOADER_ARGUMENTS = frozenset({
    "is_local", "local_files_only", "cache_dir", "force_download", "proxies", "token", "use_auth_token", "revision",
    "subfolder", "trust_remote_code", "code_revision", "gguf_file", "_commit_hash", "_from_auto",
})
_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")
_CONNECTION_ERRORS = {
    "LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectionError", "gaierror", "ConnectTimeout"
}


def hub_id_of(name: str) -> str | None:
    """The Hub id a model name stands for: itself when it is one and no such local path exists, the id
    of a snapshot folder in the local Hugging Face cache, else None."""
    if HUB_ID.match(name) and not os.path.exists(name):
        return name
    m = _CACHE_SNAPSHOT.search(os.path.abspath(name) + "/")
    return f"{m.group(1)}/{m.group(2)}" if m else None


def offline_mode() -> bool:
    """True when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE (or huggingface_hub's own flag) is on."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return bool(constants.HF_HUB_OFFLINE)


def hub_host_resolves() -> bool:
    """Whether the Hub's host name resolves. A machine without network fails this at once, where
    transformers / datasets would spend ~25 s in retries before giving up; passing it proves little."""
    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname or "huggingface.co", 443)
    except OSError:
        return False
    return True


def hub_reachable() -> bool:
    """Offline switches off and the Hub host resolving: the Hub is worth trying."""
    return not offline_mode() and hub_host_resolves()


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, says the Hub could not be reached."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _CONNECTION_ERRORS or "couldn't connect" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def cached_snapshot(repo_id: str, label: str | None = None) -> str:
    """The folder of Hub model `repo_id` in the local Hugging Face cache (never downloaded; the cache
    location follows HF_HOME / HF_HUB_CACHE); FileNotFoundError when it is not there."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except HUB_ERRORS as e:  # not cached, a malformed cache entry, or not a valid repo id
        raise FileNotFoundError(
            f"model {label or repo_id!r} ({repo_id}) is not a local folder and is not in the local Hugging Face "
            f"cache ({type(e).__name__}); download it first (`hf download {repo_id}`) or pass its folder"
        ) from e


def save_tokenizer(tokenizer, folder: str) -> None:
    """`tokenizer.save_pretrained(folder)` without the loader arguments transformers keeps among a loaded
    tokenizer's settings (`local_files_only`, `is_local`, ...): saved, they would travel with the folder to
    the Hub and tell every later loader to stay offline."""
    tokenizer.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if LOADER_ARGUMENTS & set(config):
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in config.items() if k not in LOADER_ARGUMENTS}, indent=2,
                               sort_keys=True, ensure_ascii=False) + "\n")


def push_to_hub(out_dir: str, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a saved checkpoint folder to the Hub (creating the repo if needed); returns the commit URL.

    A failure of the Hub (offline, no or bad token, invalid repo id, network) becomes an `ActionableError`
    that names the local folder; the folder itself is only read.
    """
    folder = os.path.abspath(out_dir)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ActionableError(f"{folder} is not a saved checkpoint (no config.json); nothing was pushed")
    import huggingface_hub as hub

    try:
        hub.create_repo(repo_id, private=private, token=token, repo_type="model", exist_ok=True)
        commit = hub.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", token=token,
                                   commit_message="Upload DMS-pruned model (dms_llm)")
    except HUB_ERRORS as e:
        raise ActionableError(
            f"pushing to the Hub as {repo_id!r} failed ({type(e).__name__}: {e}). The local checkpoint is kept "
            f"unchanged at {folder}; fix the cause (network, HF_HUB_OFFLINE, token with write access, "
            f"repo id 'user/name') and push again, e.g. `hf upload {repo_id} {folder}`"
        ) from e
    return str(getattr(commit, "commit_url", None) or commit)
