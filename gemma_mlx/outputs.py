"""Writing outputs so that nothing is lost: stage beside the target, verify, commit atomically.

Every file or directory the package writes (converted models, the GGUF model cache, chat sessions,
prompt caches, reports, benchmark results) goes through `staged_directory` or
`write_file_atomically`:

- The output is written to a staging path beside the target (same filesystem, so the final rename
  is atomic), named `.<target>.partial-<host>.<pid>.<start>.<random><suffix>` (the target's
  suffix kept, for writers that go by it, like `mx.save_safetensors`): the name says which process
  owns it, so staging left by a process that died (kill -9, power loss) is recognised and removed
  by the next write beside the same target (`remove_stale_staging`).
- A target that is, contains or lies inside one of the sources is refused (symlinks resolved).
- Without `force` the commit fails if the target exists, even if it appeared while we worked (the
  rename itself refuses to replace: Linux `renameat2(RENAME_NOREPLACE)`, macOS `renamex_np
  (RENAME_EXCL)`, else a hard link for files).
- With `force` only a target of the same kind is replaced: a file by a file; a directory by a
  directory only if it is empty or this package wrote it (its `OUTPUT_MARKER` lists every file in
  it, and nothing else was added since). Directories are swapped with a rename-exchange (Linux
  `RENAME_EXCHANGE`, macOS `RENAME_SWAP`) and what was swapped out is checked again before it is
  deleted. Where neither exists the old directory is first renamed aside (to an owned staging
  name), then the new one renamed into place: between the two renames the target path is briefly
  missing, but it never holds a partial output, and the old one is restored if the second rename
  fails.
- SIGTERM and SIGHUP are handled like Ctrl-C while staging (a `Terminated` exception, a
  `KeyboardInterrupt`), so the staging path is removed; the commit itself runs with these signals
  blocked.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gemma_mlx.errors import GemmaMLXError

# Written into every directory `staged_directory` commits: who wrote it and which files it holds.
OUTPUT_MARKER = ".gemma-mlx-output.json"
# Test hook: `<stage>=<KILL|TERM>` sends that signal to this process when it reaches the stage.
FAULT_ENV = "GEMMA_MLX_FAULT_INJECTION"
# Signals that end a process; while staging they raise `Terminated`, as Ctrl-C raises its own.
TERMINATING_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)
_STAGING = re.compile(
    r"^\.(?P<name>.+)\.partial-(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<start>\d+)\.[0-9a-f]{8}"
    r"(?P<suffix>\.[^.]*)?$"
)
logger = logging.getLogger(__name__)


class OutputError(GemmaMLXError, OSError):
    """A target that cannot be written: it overlaps a source, or is not of a replaceable kind."""


class OutputExistsError(OutputError, FileExistsError):
    """The target exists (or appeared while we worked) and `force` was not given."""


class DiskSpaceError(OutputError):
    """Not enough free space: before an output whose size is known, or when a write failed."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ownership of staging paths --------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """The process that created a staging path: host, pid and the process's start time."""

    host: str
    pid: int
    start: int  # clock ticks since boot (Linux); 0 where unknown

    def is_running(self) -> bool:
        """Whether the owner still runs; True for another host's process (we cannot tell)."""
        if self.host != _host():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            pass
        return not (self.start and _process_start(self.pid) not in (0, self.start))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _process_start(pid: int) -> int:
    """The start time of process `pid` in clock ticks since boot, which tells a reused pid apart;
    0 where /proc is unavailable (macOS)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def staging_path(target: Path) -> Path:
    """A fresh staging path beside `target`, named after this process."""
    owner = f"{_host()}.{os.getpid()}.{_process_start(os.getpid())}.{secrets.token_hex(4)}"
    return target.with_name(f".{target.name}.partial-{owner}{target.suffix}")


def staging_owner(path: Path) -> tuple[str, Owner] | None:
    """(target name, owner) of a staging path; None for any other name."""
    match = _STAGING.match(path.name)
    if match is None or not match["name"].endswith(match["suffix"] or ""):
        return None
    return match["name"], Owner(match["host"], int(match["pid"]), int(match["start"]))


def remove_stale_staging(directory: Path, name: str | None = None) -> list[Path]:
    """Remove the staging paths in `directory` (for target `name`, or all) whose process has
    ended; report, without touching them, those of processes on another host."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for path in Path(directory).iterdir():
            parsed = staging_owner(path)
            if parsed is None or (name is not None and parsed[0] != name):
                continue
            owner = parsed[1]
            if owner.host != _host():
                logger.warning(
                    "%s: left by process %d on host %s; remove it if that process has ended",
                    path, owner.pid, owner.host,
                )  # fmt: skip
            elif not owner.is_running():
                _remove(path)
                removed.append(path)
                logger.warning(
                    "removed %s, left by process %d, which is no longer running", path, owner.pid
                )
    return removed


# checks ----------------------------------------------------------------------------------------


def check_target(
    target: Path, *, directory: bool, force: bool = False, sources: Sequence[Path] = ()
) -> None:
    """Raise unless `target` may be written: it overlaps no source, and it is absent or (with
    `force`) of the kind we may replace. Callers run it before any work starts; the commit runs it
    again, as the target may have changed meanwhile."""
    target = Path(target)
    _check_sources(target, sources)
    _check_parent(target, create=directory)
    if not os.path.lexists(target):
        return
    if not force:
        raise OutputExistsError(f"{target} already exists: pass --force to replace it")
    _check_replaceable(target, directory)


def _check_replaceable(target: Path, directory: bool) -> None:
    reason = _not_replaceable(target, directory)
    if reason:
        raise OutputError(f"{target}: {reason}, so --force does not replace it")


def _check_sources(target: Path, sources: Sequence[Path]) -> None:
    resolved = target.resolve()
    for source in sources:
        source = Path(source).resolve()
        if resolved == source:
            relation = "is the source"
        elif source.is_relative_to(resolved):
            relation = f"contains the source {source}"
        elif resolved.is_relative_to(source):
            relation = f"lies inside the source {source}"
        else:
            continue
        raise OutputError(f"{target}: {relation}; choose an output elsewhere")


def _check_parent(target: Path, create: bool) -> None:
    parent = target.parent
    if create:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:
            raise OutputError(f"{parent}: not a directory") from e
    elif not parent.is_dir():
        raise OutputError(f"{parent}: no such directory (create it first)")


def _not_replaceable(target: Path, directory: bool) -> str | None:
    """Why `force` may not replace `target`; None if it may."""
    if target.is_symlink():
        return "is a symbolic link"
    if not directory:
        return None if target.is_file() else "is not a regular file"
    if not target.is_dir():
        return "is not a directory"
    present = _files(target)
    if not present:
        return None
    try:
        written = set(json.loads((target / OUTPUT_MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"was not written by gemma_mlx (no valid {OUTPUT_MARKER})"
    added = sorted(present - written - {OUTPUT_MARKER})
    if added:
        return f"holds {added[0]}, which gemma_mlx did not write"
    return None


def _files(directory: Path) -> set[str]:
    """Every entry under `directory` (relative, '/'-separated); directories end with '/'."""
    found = set()
    for path in directory.rglob("*"):
        relative = path.relative_to(directory).as_posix()
        found.add(relative + "/" if path.is_dir() and not path.is_symlink() else relative)
    return found


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Raise `DiskSpaceError` if the filesystem of `directory` has less than `needed` bytes free."""
    existing = Path(directory).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise DiskSpaceError(
            f"{directory}: {what} needs {_size(needed)} ({needed} bytes), only {_size(free)} "
            f"({free} bytes) are free there"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def save_safetensors(path: Path, arrays: dict, metadata: dict[str, str] | None = None) -> None:
    """`mx.save_safetensors`, whose failed writes (a bare RuntimeError from MLX) become an
    `OutputError` saying how much space was left."""
    import mlx.core as mx

    try:
        mx.save_safetensors(str(path), arrays, metadata=metadata)
    except RuntimeError as e:
        free = shutil.disk_usage(Path(path).parent).free
        needed = sum(a.nbytes for a in arrays.values())
        if free < needed:
            raise DiskSpaceError(
                f"{path}: cannot be written, no space left ({free} bytes free, {needed} needed)"
            ) from e
        raise OutputError(f"{path}: cannot be written ({e})") from e


# the two ways to write an output -----------------------------------------------------------------


@contextlib.contextmanager
def staged_directory(
    target: Path, *, force: bool = False, sources: Sequence[Path] = ()
) -> Iterator[Path]:
    """Yield an empty staging directory beside `target`; when the block completes, commit it to
    `target` (see the module docstring for what may be replaced). On an exception or a signal the
    staging directory is removed and `target` is left as it was."""
    target = Path(target).absolute()
    with _staging(target, directory=True, force=force, sources=sources) as staging:
        staging.mkdir()
        fault_point("staged")
        yield staging
        if not staging.is_dir():
            raise OutputError(f"{staging}: the staging directory disappeared")
        files = sorted(_files(staging) - {OUTPUT_MARKER})
        (staging / OUTPUT_MARKER).write_text(json.dumps({"files": files}, indent=1) + "\n")
        _sync_tree(staging)
        fault_point("commit")
        with _signals_blocked():
            _commit_directory(staging, target, force, sources)


def write_file_atomically(
    target: Path,
    write: Callable[[Path], None],
    *,
    force: bool = False,
    sources: Sequence[Path] = (),
) -> None:
    """`write(partial)` writes the content to a path beside `target`, which is then synced and
    renamed into place: `target` is never seen half-written. The parent directory must exist."""
    target = Path(target).absolute()
    with _staging(target, directory=False, force=force, sources=sources) as partial:
        write(partial)
        if not partial.is_file():
            raise OutputError(f"{partial}: nothing was written")
        _sync(partial)
        fault_point("commit")
        with _signals_blocked():
            _check_sources(target, sources)
            if force and os.path.lexists(target):
                _check_replaceable(target, directory=False)
                os.replace(partial, target)  # atomic for files; fails if a directory appeared
            else:
                _rename_noreplace(partial, target)
            _sync(target.parent)


@contextlib.contextmanager
def _staging(
    target: Path, *, directory: bool, force: bool, sources: Sequence[Path]
) -> Iterator[Path]:
    """Check `target`, remove stale staging beside it, and yield a fresh staging path, removed
    however the block ends (Ctrl-C, SIGTERM and SIGHUP included)."""
    check_target(target, directory=directory, force=force, sources=sources)
    remove_stale_staging(target.parent, target.name)
    staging = staging_path(target)
    with _terminating_signals_interrupt():
        try:
            yield staging
        finally:
            # A signal sent to the process may land on another thread and reach this one a few
            # statements late: it must not stop the removal halfway.
            with _signals_blocked():
                _remove(staging)


def _commit_directory(staging: Path, target: Path, force: bool, sources: Sequence[Path]) -> None:
    _check_sources(target, sources)
    if not force or not os.path.lexists(target):
        _rename_noreplace(staging, target)
    else:
        _check_replaceable(target, directory=True)
        if _exchange(staging, target):
            fault_point("exchanged")
            if _not_replaceable(staging, directory=True):  # it changed just before the swap
                _exchange(staging, target)
                _check_replaceable(target, directory=True)
        else:
            aside = staging_path(target)
            os.rename(target, aside)
            try:
                _rename_noreplace(staging, target)
            except BaseException:
                os.rename(aside, target)
                raise
            os.rename(aside, staging)  # deleted with the staging directory
    _sync(target.parent)


def _rename_noreplace(source: Path, target: Path) -> None:
    """Rename, failing with `OutputExistsError` if `target` exists (even if it just appeared)."""
    try:
        done = _renameat(source, target, _NOREPLACE)
        if not done and source.is_file() and not source.is_symlink():
            try:
                os.link(source, target)
                os.unlink(source)
                done = True
            except OSError as e:
                if e.errno == errno.EEXIST:
                    raise
        if not done:  # no atomic way here: the check and the rename are two steps (a directory
            # appearing between them is replaced only if empty: rename fails on a non-empty one)
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "exists", str(target))
            try:
                os.rename(source, target)
            except OSError as e:
                if e.errno == errno.ENOTEMPTY:
                    raise FileExistsError(errno.EEXIST, "exists", str(target)) from e
                raise
    except FileExistsError as e:
        raise OutputExistsError(
            f"{target} appeared while it was being written (another process?); nothing was "
            "replaced: remove it or pass --force"
        ) from e


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; False where this system cannot."""
    return _renameat(first, second, _EXCHANGE)


# Linux renameat2 flags, macOS renamex_np flags.
if sys.platform == "darwin":
    _NOREPLACE, _EXCHANGE = 0x4, 0x2  # RENAME_EXCL, RENAME_SWAP
else:
    _NOREPLACE, _EXCHANGE = 0x1, 0x2  # RENAME_NOREPLACE, RENAME_EXCHANGE
_AT_FDCWD = -100


def _libc_rename() -> Callable[[bytes, bytes, int], int] | None:
    """renameat2 (Linux, glibc >= 2.28) or renamex_np (macOS), as f(old, new, flags) -> 0 | -1."""
    libc = ctypes.CDLL(None, use_errno=True)  # this process's symbols: the C library's included
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        function = libc.renamex_np
        function.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint)
        return function
    if hasattr(libc, "renameat2"):
        renameat2 = libc.renameat2
        renameat2.argtypes = (
            ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
        )  # fmt: skip
        return lambda old, new, flags: renameat2(_AT_FDCWD, old, _AT_FDCWD, new, flags)
    return None


_RENAME = _libc_rename()


def _renameat(source: Path, target: Path, flags: int) -> bool:
    """Rename with `flags`; False where the system or the filesystem does not support them."""
    if _RENAME is None:
        return False
    if _RENAME(os.fsencode(source), os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


# durability and cleanup ----------------------------------------------------------------------------


def _sync(path: Path) -> None:
    """fsync a file or directory (directories: so that a rename inside them is durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        _sync(path)
    _sync(directory)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# signals ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _terminating_signals_interrupt() -> Iterator[None]:
    """While in the block, SIGTERM/SIGHUP raise `Terminated` (where their handler is the default
    and this is the main thread), so that the caller's cleanup runs as it does for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = {}
    for signum in TERMINATING_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Ctrl-C and the terminating signals wait until the block (a commit) is done."""
    signals = {signal.SIGINT, *TERMINATING_SIGNALS}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def fault_point(stage: str) -> None:
    """Fault injection for tests: `GEMMA_MLX_FAULT_INJECTION=<stage>=<KILL|TERM>` sends that
    signal to this process when it reaches `stage`."""
    wanted = os.environ.get(FAULT_ENV, "")
    name, _, action = wanted.partition("=")
    if name == stage and action == "KILL":
        os.kill(os.getpid(), signal.SIGKILL)
    elif name == stage and action == "TERM":
        # To the main thread: sent to the process it may land on another thread (MLX's,
        # OpenBLAS's) and reach Python's handler only statements later.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
