"""Output safety, atomic writes, fingerprints and manifests shared by every artifact.

An artifact is a directory with a `manifest.json` whose "kind" names it (mind-bundle,
index, ranker-bundle, synthetic-data, ...) or a JSON report with a "kind" field
(retrieval-report, retrieval-experiment, ranker-experiment, ...).

Every command that writes claims its output first (`claim_output`), before it reads a
byte of data, so a bad output path costs nothing and a command never destroys what it
does not own. A claim:
- refuses the current directory, an input of the command, a path inside an input or
  holding one;
- accepts a new path, an empty directory, or an artifact of the same kind (replaced);
  an artifact of another kind only with `force`; never a directory or a file that is
  not an artifact, whatever `force` says;
- checks the parent is creatable and writable by creating it and a lock file beside
  the output (`.NAME.lock`, `flock`ed for the whole command): a second writer of the
  same path fails at once naming the holder's pid. The kernel drops the lock when its
  holder dies, so the lock file of a killed process never blocks.

An artifact is written into a temporary sibling and renamed into place, so a crash or
a full disk never leaves a half-written file or directory under the final name, nor a
temporary one beside it. Artifacts get the user's umask (directories 0777 & ~umask,
files 0666 & ~umask). Manifests carry a checksum of their own content
(`write_manifest` / `read_manifest`), so a hand-edited or corrupt manifest fails on load.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from retrieval.errors import ArtifactError

MANIFEST = "manifest.json"
MANIFEST_CHECKSUM = "manifest_sha256"
_REPORT_PEEK = 256 << 20  # a file larger than this is not read to look for a report's "kind"


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape an artifact's contents."""
    import faiss
    import numpy
    import polars
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": numpy.__version__,
        "polars": polars.__version__,
    }


def file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_fingerprint(path: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> str:
    """sha256 over the names and contents of a directory's files (sorted), manifest excluded
    (the manifest carries its own checksum)."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and q.name not in exclude):
        h.update(str(p.relative_to(path)).encode())
        h.update(file_fingerprint(p).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- permissions


def umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else by setting
    it and back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(path: Path, directory: bool) -> None:
    """tempfile makes directories 0700 and files 0600; give the artifact the user's mode."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


# ---------------------------------------------------------------------------- what a path holds


def artifact_kind(path: Path) -> str | None:
    """The kind of the artifact at `path`: a directory's manifest "kind", or a JSON report's
    "kind"; None for anything else (absent, a plain file, a directory without a manifest)."""
    path = Path(path)
    if path.is_dir():
        manifest = path / MANIFEST
        return _json_kind(manifest) if manifest.is_file() else None
    if path.is_file():
        return _json_kind(path)
    return None


def _json_kind(path: Path) -> str | None:
    try:
        if path.stat().st_size > _REPORT_PEEK:
            return None
        with open(path, "rb") as f:
            if f.read(1) != b"{":
                return None
            f.seek(0)
            obj = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    kind = obj.get("kind") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) and kind else None


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def _within(path: str, root: str) -> bool:
    """`path` is `root` or lies under it (both real, absolute)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_replaceable(path: Path, kind: str, force: bool = False) -> str | None:
    """Whether an output of `kind` may be written at `path`; returns the kind it replaces
    (None for a new path or an empty directory), ArtifactError if it may not."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if path.is_dir() and not path.is_symlink() and _is_empty_dir(path):
        return None
    found = artifact_kind(path)
    if found == kind:
        return found
    if found is not None:
        if force:
            return found
        raise ArtifactError(f"{path}: is {_a(found)}, not {_a(kind)}; pass --force to replace it")
    what = "a directory that holds other files" if path.is_dir() else "a file"
    why = " (--force replaces only artifacts)" if force else ""
    raise ArtifactError(f"{path}: is {what}, not {_a(kind)}; choose a new path or an existing {kind}{why}")


def _a(kind: str) -> str:
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


# ---------------------------------------------------------------------------- claims


_CLAIMED: dict[str, OutputClaim] = {}  # real path -> this process's claim on it


class OutputClaim:
    """A command's hold on its output path: checked, parent created, lock held.

    Use as a context manager (or call `release`); on failure the parent directories the
    claim created are removed again when they are still empty."""

    def __init__(self, path: Path, kind: str, replaces: str | None, lock: Path, fd: int, made: list[Path]):
        self.path, self.kind, self.replaces = path, kind, replaces
        self.lock, self._fd, self._made = lock, fd, made
        _CLAIMED[os.path.realpath(path)] = self

    def release(self, failed: bool = False) -> None:
        if self._fd < 0:
            return
        _CLAIMED.pop(os.path.realpath(self.path), None)
        with contextlib.suppress(OSError):
            os.unlink(self.lock)  # while still holding it: a waiter then sees another inode and retries
        os.close(self._fd)
        self._fd = -1
        if failed:
            for d in reversed(self._made):
                with contextlib.suppress(OSError):
                    d.rmdir()

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.release(failed=exc_type is not None)


def claim_output(path: Path, kind: str, inputs: Iterable[Path | None] = (), force: bool = False) -> OutputClaim:
    """Check that a command may write an artifact of `kind` at `path`, and hold it.

    Refuses (ArtifactError, before any work): the working directory or a directory above
    it; an input of the command, a directory holding one or a path inside one; a directory
    or file that is not an artifact; an artifact of another kind unless `force`; a path
    whose parent cannot be created or written; a path another process is writing."""
    path = Path(path)
    real = os.path.realpath(path)
    cwd = os.path.realpath(os.getcwd())
    if _within(cwd, real):
        where = "is the working directory" if real == cwd else "holds the working directory"
        raise ArtifactError(f"{path}: {where}; name a new path for the {kind}")
    for given in inputs:
        if given is None:
            continue
        src = os.path.realpath(given)
        if real == src:
            raise ArtifactError(f"{path}: is an input of this command; write the {kind} elsewhere")
        if _within(src, real):
            raise ArtifactError(f"{path}: holds {given}, an input of this command; write the {kind} elsewhere")
        if _within(real, src):
            raise ArtifactError(f"{path}: lies inside {given}, an input of this command; write the {kind} elsewhere")
    replaces = check_replaceable(path, kind, force)
    made = _make_parents(path)
    try:
        lock = path.parent / f".{path.name}.lock"
        fd = _lock(lock, path)
    except BaseException:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return OutputClaim(path, kind, replaces, lock, fd, made)


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parents of `path`; the ones created, outermost first."""
    missing = []
    parent = path.parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"{path}: cannot be created ({parent} is not a directory)")
    made: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
    except OSError as err:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise ArtifactError(f"{path}: cannot be created in {err.filename or parent} ({err.strerror})") from None
    return made


def _lock(lock: Path, path: Path) -> int:
    """Open and flock `lock` (non-blocking); the holder's pid is written into it."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise ArtifactError(f"{path}: cannot be written in {lock.parent} ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_pid(fd)
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ArtifactError(f"{path}: cannot lock {lock} ({err.strerror})") from None
            raise ArtifactError(
                f"{path}: another process (pid {holder}) is writing it; wait for it to finish or choose another path"
            ) from None
        try:  # the holder before us may have unlinked the file as it released it: lock the current one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).decode().strip()))
    return "unknown"


def _unclaimed_check(final: Path, kind: str | None) -> None:
    """The safety net of a write no command claimed (a library call): it may create a new
    path or replace an artifact of its own kind, nothing else."""
    if kind is not None and os.path.realpath(final) not in _CLAIMED:
        check_replaceable(final, kind)


# ---------------------------------------------------------------------------- atomic writes


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` onto `final`; whatever `final` held (a file, a directory) is moved aside
    first and deleted only once the new one is in place."""
    if os.path.lexists(final) and (final.is_dir() or tmp.is_dir()):
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                old.unlink()
    else:
        os.replace(tmp, final)


def _write_failed(final: Path, err: OSError) -> ArtifactError:
    reason = err.strerror or str(err)
    return ArtifactError(f"{final}: writing failed ({reason}); nothing was replaced")


@contextlib.contextmanager
def atomic_dir(final: Path, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final` by rename.

    `kind`: the artifact's kind; without a claim on `final`, only a new path or an artifact
    of that kind may be replaced. A failure (a full disk) removes the temporary directory
    and leaves `final` as it was; an OSError becomes one ArtifactError line."""
    final = Path(final)
    _unclaimed_check(final, kind)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        _honour_umask(tmp, directory=True)
    except OSError as err:
        raise _write_failed(final, err) from None
    try:
        yield tmp
        _put_in_place(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(final, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary file path beside `final` (the file exists, empty, with the user's
    mode); on success it is renamed onto `final`. A failure removes it and leaves `final`
    as it was; an OSError becomes one ArtifactError line."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
        os.close(fd)
    except OSError as err:
        raise _write_failed(final, err) from None
    tmp = Path(name)
    try:
        _honour_umask(tmp, directory=False)
        yield tmp
        _put_in_place(tmp, final)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise _write_failed(final, err) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file and rename."""
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write a JSON document atomically; a report (a dict with a "kind") written without a
    claim may only create a new path or replace a report of its own kind."""
    if isinstance(obj, dict) and isinstance(obj.get("kind"), str):
        _unclaimed_check(Path(path), obj["kind"])
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# ---------------------------------------------------------------------------- manifests


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write `directory/manifest.json` with a checksum of its own content; returns it as written."""
    sealed = {**manifest, MANIFEST_CHECKSUM: _manifest_checksum(manifest)}
    (Path(directory) / MANIFEST).write_text(json.dumps(sealed, indent=2) + "\n")
    return sealed


def read_manifest(directory: Path, kind: str) -> dict[str, Any]:
    """Read and check the manifest of an artifact directory of the given kind: readable JSON,
    the right kind, and unchanged since it was written (its checksum)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: not a {kind} (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
        reason = " ".join(str(err).split())
        raise ArtifactError(f"{path}: unreadable manifest ({reason[:200]})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: unreadable manifest (not a JSON object)")
    if manifest.get("kind") != kind:
        found = manifest.get("kind")
        raise ArtifactError(f"{directory}: expected {_a(kind)}, found {_a(found) if isinstance(found, str) else 'no kind'}")
    if manifest.get(MANIFEST_CHECKSUM) != _manifest_checksum(manifest):
        raise ArtifactError(
            f"{path}: the manifest does not match its checksum (edited by hand, corrupt, or written by an older "
            f"version); rebuild the {kind}"
        )
    return manifest


def command_line() -> str:
    return " ".join(sys.argv)
