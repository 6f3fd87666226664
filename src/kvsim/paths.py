"""Where kvsim keeps files between runs, and how it writes them without leaving half-written ones."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvsim.errors import KvsimError


def cache_root() -> Path:
    """The kvsim cache folder: `$KVSIM_CACHE`, else `$XDG_CACHE_HOME/kvsim`, else `~/.cache/kvsim`."""
    if env := os.environ.get("KVSIM_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvsim"


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`.

    A crash or Ctrl-C leaves either the old file or the new one, never a torn one; the rename is
    atomic because the temporary file lives in the same folder (same filesystem).
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create `path` if needed and prove we can write there, before any long work starts."""
    if path.exists() and not path.is_dir():
        raise KvsimError(f"{what} {path} exists and is not a folder: pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".kvsim-write-probe-", delete=True)
        probe.close()
    except OSError as err:
        raise KvsimError(f"{what} {path} is not writable ({err.strerror}): pass a folder you can write to") from err
    return path


def check_output_file(path: Path, what: str, magic: bytes | None = None) -> Path:
    """Refuse, before any long work, an output path that is a folder or an existing file of another
    kind (not starting with `magic`), which a run would otherwise replace without a word; then make
    sure its folder is writable."""
    if path.is_dir():
        raise KvsimError(f"{what} {path} is a folder: pass a file path")
    if magic is not None and path.exists():
        try:
            with open(path, "rb") as handle:
                ours = handle.read(len(magic)) == magic
        except OSError as err:
            raise KvsimError(f"{what} {path} exists and cannot be read ({err.strerror}): pass another path") from err
        if not ours:
            raise KvsimError(f"{what} {path} exists and is not a file kvsim writes there: pass another path, or remove it")
    ensure_writable_dir(path.parent, "output folder")
    return path


def read_json(path: Path, what: str, fix: str):
    """Parse a JSON file, or raise one KvsimError line naming `what` it was and how to `fix` it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise KvsimError(f"cannot read {what} {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise KvsimError(f"{what} {path} is not UTF-8 text (byte {err.start}): {fix}") from err
    except json.JSONDecodeError as err:
        raise KvsimError(f"{what} {path} is not valid JSON (line {err.lineno}): {fix}") from err
    except RecursionError as err:
        raise KvsimError(f"{what} {path} is nested too deeply to read: {fix}") from err
