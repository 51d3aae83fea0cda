"""One storage interface for local paths, `file://` and `s3://` URLs (through fsspec / s3fs).

Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and are never logged.
An S3-compatible endpoint (SeaweedFS, MinIO) is given per call with `endpoint_url=`, or for a whole
process tree with AWS_ENDPOINT_URL, the variable the AWS tools read (subprocesses such as DataLoader and
Ray workers inherit it); there is no other hidden state. Reads, writes, listings and removals retry through a
storage outage for `storage.retry_seconds` (`dml_core.retry`; the window travels the same way). Importing this module installs a fork guard
(`os.register_at_fork`, see "fork safety" below) so forked DataLoader workers can't break the parent's
pooled S3 connections.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import io
import os
import shutil
import uuid
import weakref

import fsspec

from dml_core.retry import StorageUnavailableError, retry_window, retrying, use_retry_seconds  # noqa: F401

ENDPOINT_ENV = "AWS_ENDPOINT_URL"


# ---------------------------------------------------------------- fork safety -------------------
# A forked child (a DataLoader worker) inherits a copy of this process's cached S3FileSystem, its aiohttp
# connections and its event loop, and the epoll instance of that loop is SHARED with the parent (an inherited
# fd points at the same kernel object). fsspec drops its instance cache in the child; when the child's garbage
# collector then frees the inherited filesystem (it sits in reference cycles), s3fs's cleanup hook closes the
# inherited connections through the copied loop, which unregisters the PARENT's pooled sockets from the
# parent's epoll set (EPOLL_CTL_DEL). The parent's next request on such a socket never sees its answer and
# waits out s3fs's read timeout (15 s) before retrying. (The "attached to a different loop" errors are the same
# close failing.) So a child must never finalise what it inherited:
#   * before a fork, gc.freeze() moves every object of the parent into the permanent generation, so the
#     child's collector never frees (or even touches) inherited objects; the parent unfreezes right after
#     the fork and collects as before. (This also keeps the child's GC from dirtying copy-on-write pages.)
#   * in the child, the inherited fsspec instances are kept referenced (they can't be freed by refcount either
#     when fsspec clears its cache), and s3fs's close-at-exit finalizers of those instances are detached.
# The child still builds its own filesystem, loop and connections, as before; the inherited copies are only
# fds and memory, released when the child exits.
_fork_guard_installed = False
_fork_guard_enabled = True  # off only to measure the stall (benchmarks, the regression test's own check)
_froze_for_fork = False
_inherited_filesystems: list = []


def _freeze_before_fork() -> None:
    global _froze_for_fork
    _froze_for_fork = _fork_guard_enabled and gc.get_freeze_count() == 0  # leave others' freeze as it is
    if _fork_guard_enabled:
        gc.freeze()


def _unfreeze_in_parent() -> None:
    if _froze_for_fork:
        gc.unfreeze()


def _cached_filesystems() -> list:
    out, todo, seen = [], [fsspec.AbstractFileSystem], set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo += cls.__subclasses__()
        cache = cls.__dict__.get("_cache")
        if cache:
            out += list(cache.values())
    return out


def _keep_inherited_in_child() -> None:
    if not _fork_guard_enabled:
        return
    try:
        inherited = _cached_filesystems()
        _inherited_filesystems.extend(inherited)
        ids = {id(fs) for fs in inherited}
        for fin in list(getattr(weakref.finalize, "_registry", {})):  # s3fs's close_session hooks
            obj = fin.peek()
            if obj is not None and id(obj[0]) in ids:
                fin.detach()
    except Exception:  # never fail a fork over this; gc.freeze already protects the common case
        pass


def _install_fork_guard() -> None:
    global _fork_guard_installed
    if _fork_guard_installed or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(before=_freeze_before_fork, after_in_parent=_unfreeze_in_parent,
                        after_in_child=_keep_inherited_in_child)
    _fork_guard_installed = True


_install_fork_guard()


def use_endpoint(endpoint_url: str | None) -> None:
    """Point this process and the ones it starts at an S3 endpoint (sets AWS_ENDPOINT_URL); None keeps it."""
    if endpoint_url:
        os.environ[ENDPOINT_ENV] = endpoint_url


def configure(settings) -> None:
    """Use a config's `storage` section (endpoint, retry window) in this process and the ones it starts: done at
    the entry of every command, flow and task, before its first storage access."""
    use_endpoint(settings.endpoint_url)
    use_retry_seconds(settings.retry_seconds)


def is_local(url: str) -> bool:
    """True for a plain path or a `file://` URL."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The absolute filesystem path of a local `url` (see `is_local`)."""
    if not is_local(url):
        raise ValueError(f"{url} is not a local path")
    return os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)


def s3_options(url: str, endpoint_url: str | None = None) -> dict:
    """fsspec options for `url`: the S3 endpoint (`endpoint_url`, else AWS_ENDPOINT_URL) for s3:// URLs."""
    endpoint = endpoint_url or os.environ.get(ENDPOINT_ENV)
    if not url.startswith("s3://") or not endpoint:
        return {}
    return {"client_kwargs": {"endpoint_url": endpoint}}


def filesystem(url: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    return fsspec.core.url_to_fs(url, **s3_options(url, endpoint_url))


def open_read(url: str, endpoint_url: str | None = None):
    """A binary file object reading `url` from start to end; opening it, and reading on after a dropped
    connection, retry through a storage outage (it does not seek)."""
    fs, path = filesystem(url, endpoint_url)
    return io.BufferedReader(_ResilientReader(fs, path, url), buffer_size=1 << 20)


class _ResilientReader(io.RawIOBase):
    """Reads `path` sequentially; after a transient error it reopens the file at the offset it had reached."""

    def __init__(self, fs, path: str, url: str) -> None:
        self.fs, self.path, self.url, self.pos = fs, path, url, 0
        self.file = retrying(url, fs.open, path, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = retrying(self.url, self._readinto_once, buffer)
        self.pos += n
        return n

    def _readinto_once(self, buffer) -> int:
        try:
            if self.file is None:
                self.file = self.fs.open(self.path, "rb")
                self.file.seek(self.pos)
            data = self.file.read(len(buffer))
        except Exception:
            if self.file is not None:
                self._drop()
            raise
        buffer[:len(data)] = data
        return len(data)

    def _drop(self) -> None:
        file, self.file = self.file, None
        try:
            file.close()
        except Exception:  # the connection is gone already
            pass

    def close(self) -> None:
        if self.file is not None:
            self._drop()
        super().close()


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return retrying(url, fs.exists, path)


def file_tag(url: str) -> str:
    """A short tag that changes when the file at `url` is replaced (its size and mtime, or ETag on S3)."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    info = retrying(url, fs.info, path)
    return f"{info.get('size')}:{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return retrying(url, fs.cat_file, path)


def list_names(url: str) -> list[str]:
    """The names of the entries directly under the directory `url`, fresh from storage ([] if it is absent)."""
    fs, path = filesystem(url)

    def names() -> list[str]:
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))

    return retrying(url, names)


def remove(url: str, recursive: bool = False) -> None:
    """Delete `url` (a directory with `recursive`); one already gone is no error (a retried delete)."""
    fs, path = filesystem(url)

    def rm() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    retrying(url, rm)


def move(src: str, dst: str) -> None:
    """Move the file or directory `src` to `dst` on the same storage (on S3 file by file: copy, then delete;
    a retry moves what is left)."""
    fs, path = filesystem(src)
    _, target = filesystem(dst)
    if is_local(src):
        fs.mv(path, target, recursive=True)
        return

    def move_files() -> None:
        fs.invalidate_cache(path)
        folders = {path}
        for f in fs.find(path):
            fs.mv(f, target + f[len(path):])
            folders.update(f[:i] for i in range(len(path), len(f)) if f[i] == "/")
        for folder in sorted(folders, key=len, reverse=True):  # emptied folders some servers keep (SeaweedFS)
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(folder + "/")

    retrying(src, move_files)


class StorageFullError(OSError):
    """A write found no space left; the message names the path, the bytes to write and the bytes free."""


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write `data` so that `url` holds either its old content or all of `data`, never part of it.

    On a local disk: a temporary name beside the target, then a rename. On S3: one PUT, whose object appears
    only once the upload has completed. Retried through a storage outage; a full disk raises `StorageFullError`.
    """
    if not is_local(url):
        fs, path = filesystem(url)
        retrying(url, fs.pipe_file, path, data)
        return
    try:
        with open_write_atomic(url) as f:
            f.write(data)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise no_space(local_path(url), len(data)) from e


def no_space(path: str, nbytes: int) -> StorageFullError:
    """The error for `nbytes` that did not fit at the local `path`, with the space free there."""
    folder = os.path.dirname(path)
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder or "/").free
    return StorageFullError(errno.ENOSPC, f"no space left on device writing {path}: {nbytes:,} bytes to write, "
                                          f"{free:,} bytes free on {folder}")


def open_write_atomic(url: str):
    """Context manager yielding a writable file that lands at `url` only when closed cleanly."""
    return _AtomicWriter(url)


class _AtomicWriter:
    def __init__(self, url: str) -> None:
        self.fs, self.path = filesystem(url)
        self.tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"

    def __enter__(self):
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        self.file = self.fs.open(self.tmp, "wb")
        return self.file

    def __exit__(self, exc_type, exc, tb):
        try:
            self.file.close()  # a full disk may only show here, when the buffer is flushed
            if exc_type is None:
                self.fs.mv(self.tmp, self.path)
        except BaseException as e:
            self._discard(e)
            raise
        if exc is not None:
            self._discard(exc)
        return False

    def _discard(self, cause: BaseException) -> None:
        """Remove the temporary object; if that fails too (storage gone), a note on `cause` says so and the
        cause stays the error raised."""
        try:
            self.fs.rm(self.tmp)
        except FileNotFoundError:
            pass
        except Exception as e:
            cause.add_note(f"(removing the temporary {self.tmp} failed as well: {type(e).__name__}: {e})")
