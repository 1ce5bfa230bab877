"""Remote inputs and outputs: any stage reads and writes fsspec URLs (``s3://``, ``gs://``, ``hf://``, ...).

- **Inputs** — a config value that is a URL (a file, a folder/prefix, or a glob) is copied once into a local cache
  (``$LMFORGE_CACHE``, default ``~/.cache/lmforge/remote``), keyed by the URL and the listing's sizes and ETags /
  modification times, so an unchanged remote input is not downloaded again and a changed one is.  The stage runs on
  the copy; its manifest records the URL (never the cache path, never credentials).
- **Outputs** — ``--out s3://bucket/prefix`` runs the stage in a local staging folder (kept between runs, so a
  crashed stage resumes) and then publishes it: the remote ``manifest.json`` is removed first (the folder is then
  "not finished" to every reader), the files are uploaded, files the new run did not write are deleted, and the
  manifest is uploaded last.  The manifest is the commit marker: a folder without one is never read as an artifact.
- **Credentials** come from each library's usual environment and config files (for S3: ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` for S3-compatible stores such as MinIO).

Install the backend of a scheme as fsspec asks (``pip install 'lmforge[s3]'`` for S3, ``gcsfs`` for GCS).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from lmforge.progress import console

_ORIGINS: dict[str, str] = {}


class StorageError(ValueError):
    """A remote location that does not exist, denies access or has no file system installed (names the URL)."""  # local copy → the URL it came from


# web addresses are endpoints (synth's base_url) or crawl seeds, not storage; file:// and plain paths are local
NOT_STORAGE = {"http", "https", "file", "local", "ws", "wss", "ftp"}


def is_url(value: Any) -> bool:
    """An object-storage location fsspec knows (s3://, gs://, hf://, az://, ...); not a web address, not a path."""
    if not isinstance(value, str) or "://" not in value:
        return False
    from fsspec.registry import known_implementations

    scheme = value.split("://", 1)[0].lower()
    return scheme not in NOT_STORAGE and scheme in known_implementations


def redact(url: str) -> str:
    """The URL without user:password@ (what a manifest may record)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
    return url


def cache_root() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def _fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        scheme = url.split("://", 1)[0]
        hint = " (pip install 'lmforge[s3]')" if scheme == "s3" else ""
        raise StorageError(f"{redact(url)}: no file system for {scheme}://{hint}: {e}") from None


def _remote_error(url: str, err: Exception) -> StorageError:
    kind = {FileNotFoundError: "not found (no such bucket or key)", PermissionError: "access denied"}.get(
        type(err), type(err).__name__)
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return StorageError(f"{redact(url)}: {kind}{': ' + detail if detail else ''}")


def _listing(fs, path: str) -> list[tuple[str, dict]]:
    """(path, info) of every file the URL names: a file, every file under a folder/prefix, or a glob's matches."""
    if any(ch in path for ch in "*?["):
        found = fs.glob(path, detail=True)
        return sorted((p, i) for p, i in found.items() if i.get("type") == "file")
    info = fs.info(path)
    if info.get("type") == "directory":
        return sorted((p, i) for p, i in fs.find(path, detail=True).items() if not Path(p).name.startswith("."))
    return [(info["name"], info)]


def local_copy(url: str) -> Path:
    """A local copy of what ``url`` names (cached by content version); a folder for a prefix or glob."""
    fs, path = _fs(url)
    try:
        files = _listing(fs, path)
    except Exception as e:  # noqa: BLE001 - every backend raises its own kinds: one clear message
        raise _remote_error(url, e) from None
    if not files:
        raise StorageError(f"{redact(url)}: matches no file")
    version = hashlib.sha256(json.dumps(
        [(p, i.get("size"), str(i.get("ETag") or i.get("etag") or i.get("mtime") or i.get("LastModified") or ""))
         for p, i in files]).encode()).hexdigest()[:16]
    key = hashlib.sha256(redact(url).encode()).hexdigest()[:12]
    dest = cache_root() / "remote" / f"{key}-{version}"
    single = len(files) == 1 and files[0][0].rstrip("/") == path.rstrip("/")
    base = path.rstrip("/") if not any(ch in path for ch in "*?[") else path.split("*")[0].rsplit("/", 1)[0]
    if not (dest / ".complete").is_file():
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            for p, _ in files:
                rel = Path(p).name if single else os.path.relpath(p, base)
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(p, str(target))
            (tmp / ".complete").write_text(redact(url) + "\n")
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        except Exception as e:  # noqa: BLE001
            shutil.rmtree(tmp, ignore_errors=True)
            raise _remote_error(url, e) from None
        console.print(f"[dim]↓ {redact(url)}: {len(files)} file(s) → {dest}[/]", highlight=False)
    local = dest / Path(files[0][0]).name if single else dest
    _ORIGINS[str(local)] = redact(url)
    return local


def origin(path: str | os.PathLike) -> str | None:
    """The URL a local copy came from (None for an ordinary path)."""
    return _ORIGINS.get(str(path))


def origins_of(paths: list[str]) -> dict[str, str]:
    """``{local copy: URL}`` for the paths that are local copies (for readers that name their sources)."""
    return {str(p): _ORIGINS[str(p)] for p in paths if str(p) in _ORIGINS}


def to_origins(value: Any) -> Any:
    """``value`` (a config dict, a list, a path) with every local copy replaced by its URL."""
    if isinstance(value, dict):
        return {k: to_origins(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_origins(v) for v in value]
    if isinstance(value, str):
        return _ORIGINS.get(value, value)
    return value


def _localized(value: Any) -> Any:
    if is_url(value):
        return str(local_copy(value))
    if isinstance(value, list):
        return [_localized(v) for v in value]
    if isinstance(value, dict):  # e.g. a data pipeline entry {step: quality, model: s3://...}
        return {k: _localized(v) for k, v in value.items()}
    return value


def localize(config: Any) -> Any:
    """A copy of a stage config whose URL-valued fields (strings, and strings inside lists and mappings, such as a
    data pipeline's entries) point at local copies."""
    update: dict[str, Any] = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        local = _localized(value)
        if local != value:
            update[name] = local
    return config.model_copy(update=update) if update else config


def staging_dir(url: str) -> Path:
    return cache_root() / "staging" / hashlib.sha256(redact(url).encode()).hexdigest()[:16]


def fetch_manifest(url: str, local: Path) -> None:
    """Copy the remote folder's manifest into the staging folder (so an unchanged stage is skipped) when the staging
    folder has none of its own."""
    fs, path = _fs(url)
    if (local / "manifest.json").is_file():
        return
    try:
        if fs.exists(f"{path.rstrip('/')}/manifest.json"):
            local.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{path.rstrip('/')}/manifest.json", str(local / "manifest.json"))
    except Exception as e:  # noqa: BLE001
        raise _remote_error(url, e) from None


def publish(local: Path, url: str) -> int:
    """Upload the finished local folder to ``url`` with the manifest last; returns the number of files."""
    fs, path = _fs(url)
    root = path.rstrip("/")
    files = sorted(p for p in local.rglob("*") if p.is_file() and ".tmp-" not in p.name and p.name != "manifest.json")
    try:
        if fs.exists(f"{root}/manifest.json"):
            fs.rm_file(f"{root}/manifest.json")  # un-commit first: readers see an unfinished folder meanwhile
        names = set()
        for f in files:
            rel = f.relative_to(local).as_posix()
            names.add(rel)
            fs.put_file(str(f), f"{root}/{rel}")
        if fs.exists(root):
            for p in fs.find(root):
                rel = p[len(root) + 1:] if p.startswith(root + "/") else p
                if rel not in names and rel != "manifest.json":
                    fs.rm_file(p)  # left by an earlier run into the same URL
        fs.put_file(str(local / "manifest.json"), f"{root}/manifest.json")
    except Exception as e:  # noqa: BLE001
        raise _remote_error(url, e) from None
    return len(files) + 1


def run_stage(run: Callable[..., Any], config: Any, out: str | os.PathLike, force: bool = False) -> Any:
    """``run(config, out, force=force)`` with URL inputs copied locally and a URL ``out`` staged, then published."""
    config = localize(config)
    if not is_url(str(out)):
        return run(config, out, force=force)
    url = str(out)
    local = staging_dir(url)
    fetch_manifest(url, local)
    before = (local / "manifest.json").read_bytes() if (local / "manifest.json").is_file() else None
    result = run(config, local, force=force)
    if (local / "manifest.json").read_bytes() == before:  # up to date: the remote folder already is this run
        return result
    n = publish(local, url)
    console.print(f"[green]↑ {redact(url)}[/]: {n} file(s) published (manifest last)", highlight=False)
    return result


def uses_remote(config: Any, out: Any) -> bool:
    if is_url(str(out)) if out is not None else False:
        return True
    for name in type(config).model_fields:
        v = getattr(config, name)
        if is_url(v) or (isinstance(v, list) and any(is_url(x) for x in v)):
            return True
    return False
