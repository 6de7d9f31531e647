"""Files that are never half-written, and the one cache folder.

Every file vidiff writes (checkpoints, samples, caches) goes through `atomic_write`: the bytes go to a temporary
file beside the target, which is then renamed over it, so a reader, or a run killed at any instant, sees the old
file or the new one, never half of one. A failed write removes its temporary file, and an OS error (full disk,
read-only folder, missing permission) becomes one sentence naming the path and the cause.
"""
import os
import re
from pathlib import Path

from common.errors import UserError


def cache_dir() -> Path:
    """~/.cache/vidiff, or $VIDIFF_CACHE: video probe results and real-data features."""
    return Path(os.environ.get("VIDIFF_CACHE", Path.home() / ".cache" / "vidiff"))


def cannot_write(path, error: OSError) -> UserError:
    """The one sentence for a failed write: the path and the operating system's cause."""
    return UserError(f"cannot write {path}: {error.strerror or error}")


def temporary_name(path: Path) -> Path:
    """.<stem>.tmp<pid><suffix> beside `path`: hidden, one per process, the suffix kept for writers that read it."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def remove_stale_temporaries(folder: Path, nested: bool = False):
    """Delete what killed writes left in `folder` (and its subfolders when nested): files named as temporary_name
    names them (a finished or failed write leaves none, so any found belong to a dead process)."""
    for path in (Path(folder).rglob if nested else Path(folder).glob)(".*.tmp*"):
        if re.fullmatch(r"\..+\.tmp\d+(\.[^.]+)?", path.name):
            path.unlink(missing_ok=True)


def _try_writing(folder: Path):
    """Create and remove a file in `folder`: the OSError a write there would meet (a read-only disk, a permission),
    now rather than after the work whose result it would hold. (os.access says only yes or no, and no cause.)"""
    probe = temporary_name(folder / "write-probe")
    probe.open("w").close()
    probe.unlink()


def output_folder(path, nested: bool = False) -> Path:
    """A command's output folder, made now, before any slow work, tried with a write and cleared of killed writes'
    temporary files (in its subfolders too when nested); a path that cannot be one (a file, under a file, not
    writable, on a read-only disk) is one sentence with the cause."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"cannot write {path}: it is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        _try_writing(path)
        remove_stale_temporaries(path, nested)
    except OSError as e:
        raise cannot_write(path, e) from None
    return path


def output_file(path) -> Path:
    """A file a command will write at its end, its folder made and tried with a write now: a folder in its place,
    or a folder that cannot be made or written, is one sentence before any work."""
    path = Path(path)
    try:
        if path.is_dir():
            raise UserError(f"cannot write {path}: it is a folder, not a file")
        if path.parent.exists() and not path.parent.is_dir():
            raise UserError(f"cannot write {path}: {path.parent} is a file, not a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        _try_writing(path.parent)
    except OSError as e:
        raise cannot_write(path, e) from None
    return path


def atomic_write(path, write, *, sync: bool = False) -> Path:
    """write(tmp) into a temporary file, then rename it over `path`. sync=True also flushes the file to disk
    before the rename (checkpoints), so a power cut cannot leave an empty file behind the new name."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise cannot_write(path, e) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass                 # the folder itself is unusable: the error above already says so
    return path
