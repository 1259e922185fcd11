"""Model names as users type them, past the embedded ones (`demo.find_model` takes those first):

  a folder or file    as it is; a folder of the Hugging Face cache (`models--org--name`) is its snapshot of the
                      revision (main by default), and a snapshot folder (`.../snapshots/<hash>`) goes by `org/name`
  org/name            a hub repository: the snapshot in the Hugging Face cache where it holds the files the engine
                      reads, else downloaded into it (huggingface_hub's progress bars; `HF_TOKEN` for gated and
                      private repositories), unless `HF_HUB_OFFLINE` is set
  org/name:QUANT      the one GGUF file of the repository whose name holds the quant tag, in any case (the first
                      file of a split set), as llama.cpp's `-hf` takes it: only that file (or set) is downloaded

Each is a `ModelRef`: the local path and the name the model goes by (`serve`'s model id): a hub id as typed, else
the folder's or file's name. The cache is `HF_HUB_CACHE`, else `HF_HOME`/hub, else huggingface_hub's default,
read from the environment at each call rather than when huggingface_hub was imported: a process (a notebook, a
test) may set it late. huggingface_hub itself is imported only when a name needs it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .gguf import SPLIT

HUB_ID = re.compile(r"(\w[\w.-]*/\w[\w.-]*)(?::(\w[\w.-]*))?")  # org/name, or org/name:QUANT
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]  # what the engine reads of a repository
SUBFOLDERS = ["*/*"]  # not fetched for a model: other copies of it (gpt-oss's original/ and metal/)


@dataclass(frozen=True)
class ModelRef:
    path: Path  # a local folder or file
    name: str  # what the model goes by: the hub id or embedded name as typed, else the folder's or file's name


def hub_cache() -> Path:
    from huggingface_hub import constants

    home = os.environ.get("HF_HOME")
    return Path(os.environ.get("HF_HUB_CACHE") or (Path(home) / "hub" if home else constants.HF_HUB_CACHE)).expanduser()


def hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES


def first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def locate(text: str, revision: str | None = None, files: list[str] | None = None) -> ModelRef:
    """What `text` names (see the module's doc); `files`: the patterns of the files to fetch of a repository
    named `org/name` (default: those the engine reads)."""
    path = Path(text).expanduser()
    if path.exists():
        return local(path, revision)
    m = HUB_ID.fullmatch(text)
    if m is None:
        raise UserError(f"no such model folder or file: {text} (a model is a folder, a GGUF file, an embedded name "
                        "such as demo, or a hub id org/name)")
    repo, tag = m[1], m[2]
    what = text + (f" (revision {revision})" if revision else "")
    if tag is not None:
        return ModelRef(gguf_file(what, repo, tag, revision), text)
    files = files or MODEL_FILES
    folder = cached(repo, revision, files, SUBFOLDERS) or download(what, repo, revision, files, SUBFOLDERS)
    if not any((folder / name).is_file() for name in ("config.json", "params.json")):
        raise UserError(f"{what}: the repository has no config.json or params.json (of a GGUF repository, name one "
                        f"file: {repo}:QUANT, such as {repo}:Q4_K_M)")
    return ModelRef(folder, text)


def cache_repo(path: Path) -> str | None:
    """The hub id of a repository's folder in the Hugging Face cache (`models--org--name`), else None."""
    return path.name.removeprefix("models--").replace("--", "/") if path.name.startswith("models--") else None


def local(path: Path, revision: str | None) -> ModelRef:
    repo = cache_repo(path) if path.is_dir() else None
    if repo is not None:
        folder = cached(repo, revision, cache=path.parent)
        if folder is None:
            refs = sorted(p.name for p in (path / "refs").glob("*"))
            raise UserError(f"{path}: this cache folder holds no snapshot of revision {revision or 'main'} "
                            f"(its refs: {', '.join(refs) or 'none'})")
        return ModelRef(folder, repo)
    if revision is not None:
        raise UserError(f"a revision applies to a hub id or a cache folder (models--org--name), not to {path}")
    if path.parent.name == "snapshots" and (repo := cache_repo(path.parent.parent)):
        return ModelRef(path, repo)
    return ModelRef(path, path.name or str(path))


def cached(repo: str, revision: str | None, allow: list[str] | None = None, ignore: list[str] | None = None,
           cache: Path | None = None) -> Path | None:
    """The snapshot of the repository at `revision` in the cache (default: `hub_cache()`), where it holds the files
    matching `allow` (less `ignore`) as far as the cache knows the repository's files; else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache or hub_cache(), allow_patterns=allow,
                                      ignore_patterns=ignore, local_files_only=True))
    except HFValidationError as e:
        raise UserError(f"{repo}: not a hub id ({first_line(e)})") from None
    except LocalEntryNotFoundError:
        return None


def online(what: str, call: Callable):
    """`call` to the Hub, whose failures are one line each."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if hub_offline():
        raise UserError(f"{what}: no such local folder or file, and not in the Hugging Face cache at {hub_cache()} "
                        "(HF_HUB_OFFLINE is set: nothing is downloaded)")
    try:
        return call()
    except GatedRepoError:
        raise UserError(f"{what} is gated: accept its terms on huggingface.co, then set HF_TOKEN to a token of that "
                        "account") from None
    except RepositoryNotFoundError:
        raise UserError(f"{what}: no such local folder or file, nor a repository on the Hugging Face Hub (a private "
                        "one needs HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{what}: the repository has no such revision") from None
    except Exception as e:  # the Hub out of reach: a connection error, a timeout, a server error
        raise UserError(f"{what}: not in the Hugging Face cache at {hub_cache()}, and the Hub could not be reached "
                        f"({first_line(e)})") from None


def download(what: str, repo: str, revision: str | None, allow: list[str], ignore: list[str] | None = None) -> Path:
    """The repository's files matching `allow` (less `ignore`), downloaded into the cache: its snapshot folder."""
    from huggingface_hub import snapshot_download

    def fetch() -> str:
        print(f"fetching {what} from the Hugging Face Hub into {hub_cache()}", file=sys.stderr)
        return snapshot_download(repo, revision=revision, cache_dir=hub_cache(), allow_patterns=allow,
                                 ignore_patterns=ignore)

    return Path(online(what, fetch))


def set_of(file: str) -> str:
    """The GGUF file that stands for `file`: the first of its split set (`-00001-of-0000N.gguf`), else itself."""
    m = SPLIT.fullmatch(file)
    return f"{m[1]}-00001-of-{m[3]}.gguf" if m else file


def pick_gguf(files: list[str], tag: str, what: str) -> str:
    """Of a repository's files, the GGUF model (a file, or a split set's first file) whose path holds the quant tag
    in any case; one that holds it as a whole word before others (Q2_K before Q2_K_L). Projectors (mmproj) are
    not models."""
    models = sorted({set_of(f) for f in files if f.endswith(".gguf") and "mmproj" not in f.lower()})
    hits = [f for f in models if tag.lower() in f.lower()]
    whole = [f for f in hits if re.search(rf"(?<![a-z0-9]){re.escape(tag)}(?![a-z0-9_])", f, re.IGNORECASE)]
    for found in (hits, whole):
        if len(found) == 1:
            return found[0]
    if hits:
        raise UserError(f"{what}: {tag} is in the names of several GGUF files ({', '.join(hits)}): give more of the "
                        "name")
    there = f"its GGUF files: {', '.join(models)}" if models else "it has no GGUF file"
    raise UserError(f"{what}: no GGUF file has {tag} in its name ({there})")


def gguf_file(what: str, repo: str, tag: str, revision: str | None) -> Path:
    """The repository's GGUF file whose name holds `tag` (`pick_gguf`): from the cache where it holds one, else
    the Hub's listing picks it and that file (or split set) alone is downloaded."""
    anycase = "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in tag)
    folder = cached(repo, revision, [f"*{anycase}*.gguf"])
    held = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.gguf")) if folder else []
    if any(tag.lower() in f.lower() for f in held) or (held and hub_offline()):
        return folder / pick_gguf(held, tag, f"{what} (the cache's {folder})")
    from huggingface_hub import HfApi

    listing = online(what, lambda: HfApi().list_repo_files(repo, revision=revision))
    first = pick_gguf(listing, tag, what)
    return download(what, repo, revision, [f for f in listing if set_of(f) == first]) / first
