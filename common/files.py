"""Files that are never half-written, and the one cache folder.

Every file vidiff writes (checkpoints, samples, caches) goes through `atomic_write`: the bytes go to a temporary
file beside the target, which is then renamed over it, so a reader, or a run killed at any instant, sees the old
file or the new one, never half of one. A failed write removes its temporary file, and an OS error (full disk,
read-only folder, missing permission) becomes one sentence naming the path and the cause.
"""
import os
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
