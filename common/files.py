"""Files that are never half-written, and the one cache folder.

Every file vidiff writes (checkpoints, samples, caches) goes through `atomic_write`: the bytes go to a temporary
file beside the target, which is then renamed over it, so a reader, or a run killed at any instant, sees the old
file or the new one, never half of one. A failed write removes its temporary file, and an OS error (full disk,
read-only folder, missing permission) becomes one sentence naming the path and the cause.
"""
import fcntl
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


# --- One writer per run folder ---

LOCK_NAME = ".train.lock"
_held = {}      # {folder: open file of its lock}: this process's locks


def lock_folder(folder: Path):
    """Take the exclusive lock of `folder` for this process, or refuse in one sentence naming the process that holds
    it. The lock is the operating system's (flock on <folder>/.train.lock), so a killed process holds none: no stale
    lock to delete by hand. Taken again by the process that holds it, it is a no-op (a script's stages, tests that
    train one run twice in one process); release_locks() lets go."""
    key = str(Path(folder).resolve())
    if key in _held:
        return
    f = open(Path(folder) / LOCK_NAME, "a")         # "a": an existing lock file is neither truncated nor touched
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(f.fileno())
        f.close()
        raise UserError(f"{folder} is being trained by {holder} (another `train` on this run folder): wait for it "
                        f"to finish or stop it, or pass another --run") from None
    _held[key] = f


def _lock_holder(fd: int) -> str:
    """'process <pid>' holding the flock on the file open at fd, from Linux's /proc/locks; elsewhere 'another
    process'."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode and fields[4] != str(os.getpid()):
                return f"process {fields[4]}"
    except OSError:
        pass
    return "another process"


def release_locks():
    """Let go of every run folder this process locked (the end of a `train` command)."""
    while _held:
        _held.popitem()[1].close()


def output_folder(path, nested: bool = False, lock: bool = False) -> Path:
    """A command's output folder, made now, before any slow work, tried with a write and cleared of killed writes'
    temporary files (in its subfolders too when nested); a path that cannot be one (a file, under a file, not
    writable, on a read-only disk) is one sentence with the cause. lock=True takes the folder's lock first
    (lock_folder): a second `train` on it is refused before it deletes the temporary files of the first's writes."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"cannot write {path}: it is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        _try_writing(path)
        if lock:
            lock_folder(path)
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
