"""The run directory: atomic JSON/JSONL writes, the log file, and the results.json contract.

``results.json`` is written by every command that evaluates:
``{"tasks": [...], "matrix": [[...]], "metrics": {"AP", "F.Ra", "FWT", "BWT"}, "per_task": {...}}``
where matrix row i holds the scores after stage i (one row for a zero-shot evaluation).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from petmix.errors import PetmixError


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # a reader never sees a half-written file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def holding(folder: str | Path) -> Iterator[None]:
    """Hold an existing run or comparison folder for this process while it writes there: a second petmix
    process given the same folder stops with a PetmixError (exit 2) instead of interleaving its writes.
    The lock (``flock`` on the folder itself, no lock file) goes with the process, so a killed run
    resumes with nothing to clean up."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unguarded, as before
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PetmixError(f"{folder}: in use by another petmix process writing there; wait for it to end "
                              "or use another --out") from None
        except OSError:  # a file system without flock (some network mounts): unguarded, as before
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def write_json(path: str | Path, obj: Any) -> None:
    _atomic_write(Path(path), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file petmix (or the user) wrote; a damaged or unreadable one is a PetmixError
    that names the file and says what to do (exit status 2, no traceback)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PetmixError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise PetmixError(f"{path}: is a folder, expected a JSON file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise damaged(path, f"cannot read it: {err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise damaged(path, f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None


def read_jsonl(path: str | Path) -> list[Any]:
    """The rows of a JSON-lines file; a damaged line is a PetmixError naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PetmixError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise damaged(path, f"cannot read it: {err}") from None
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise damaged(path, f"line {lineno} is not valid JSON ({err.msg})") from None
    return rows


def damaged(path: Path, problem: str) -> PetmixError:
    """The error for a file petmix cannot read back: which file, what is wrong, what to do."""
    return PetmixError(f"{path}: damaged file: {problem}. {_advice(path)}")


def _advice(path: Path) -> str:
    parts = path.parts
    if "state" in parts:
        run = Path(*parts[: parts.index("state")])
        if (run / "state.prev").is_dir():
            return (f"The previous checkpoint is kept in {run / 'state.prev'}: remove {run / 'state'} to resume "
                    "from it, or start a new --out")
        return f"Remove {run / 'state'} to resume from the last finished stage, or start a new --out"
    if path.name == "config.json":
        return "Remove it to resume with the settings given now, or start a new --out"
    return "Restore it from a copy, or start the run again with a new --out"


def load_tensors(path: str | Path) -> dict[str, Any]:
    """A safetensors file, checked first (header parses, tensor sizes add up to the file size)."""
    from safetensors.torch import load_file

    path = Path(path)
    verify_safetensors(path)
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types; any of them means a bad file
        raise damaged(path, f"cannot load it ({err})") from None


def verify_safetensors(path: str | Path) -> None:
    """Check a safetensors file without loading it: 8-byte header length, JSON header, and data
    offsets that end exactly at the end of the file (a truncated file fails here)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise damaged(path, f"{size} bytes, too short for a safetensors file")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise damaged(path, f"header length {n} does not fit in {size} bytes (cut short?)")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise PetmixError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise damaged(path, f"unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise damaged(path, "safetensors header is not a JSON object")
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) != size:
        raise damaged(path, f"{size} bytes, but its header describes {8 + n + max(ends, default=0)} (cut short?)")


def check_run_folder(run_dir: str | Path) -> None:
    """Check every file petmix reads back from a run folder (JSON parses, JSON lines parse,
    safetensors headers match their sizes) before any work starts. Temporary folders of an
    interrupted write (hidden names) and the previous checkpoint (checked only if used) are skipped."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir).parts
        if any(p.startswith(".") for p in rel) or "state.prev" in rel or not path.is_file():
            continue
        if path.suffix == ".json":
            read_json(path)
        elif path.suffix == ".jsonl":
            read_jsonl(path)
        elif path.suffix == ".safetensors":
            verify_safetensors(path)


# Names petmix itself puts in a run, comparison or library folder: an existing --out holding
# none of them (and other files) is somebody else's folder.
_OUR_NAMES = {"config.json", "results.json", "state", "state.prev", "log.txt", "index.json", "table.md", "run",
              "stages.json", "predictions", "checkpoints", "adapters.safetensors",
              "compare.json", "floors", "tuned.yaml"}  # a comparison's and a tuning's own files


def _holds_runs(path: Path) -> bool:
    """A comparison's folder put back from an archive (benchmarks/archive.py) may hold only its entries'
    runs: ``<entry>/config.json`` or ``<entry>/seed-<s>/config.json``."""
    return any(p.is_file() for pattern in ("*/config.json", "*/seed-*/config.json") for p in path.glob(pattern))


def check_out_dir(text: str | None, flag: str = "--out") -> Path:
    """The output folder: a folder path (not empty, not a file, not under a file) in a writable
    place. Checked before anything is created; nothing is created here."""
    if text is None or not str(text).strip():
        raise PetmixError(f"{flag}: give a folder path (an empty path would write into the current folder)")
    path = Path(text).expanduser()
    if "\x00" in str(text):
        raise PetmixError(f"{flag}: the path holds a NUL character")
    if path.exists() and not path.is_dir():
        raise PetmixError(f"{flag} {text}: is a file, not a folder; give a folder path")
    if path.is_dir():
        entries = {p.name for p in path.iterdir()}
        if entries and not entries & _OUR_NAMES and not _holds_runs(path):
            raise PetmixError(f"{flag} {text}: the folder holds files that are not a petmix run "
                              f"({', '.join(sorted(entries)[:5])}); give a new or empty folder")
        try:  # another petmix process writing there: say so now, not after the model has loaded
            with holding(path):
                pass
        except PetmixError as err:
            raise PetmixError(f"{flag} {err}") from None
        probe = path
    else:
        probe = path.absolute().parent
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise PetmixError(f"{flag} {text}: {probe} is a file, so no folder can be made under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PetmixError(f"{flag} {text}: {probe} is not writable")
    try:  # os.access says yes to root even where nothing can be made (/proc): try for real
        tempfile.TemporaryDirectory(dir=probe, prefix=".petmix-probe-").cleanup()
    except OSError as err:
        raise PetmixError(f"{flag} {text}: cannot create a folder in {probe} ({err.strerror})") from None
    return path


_CRASH_HITS: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for the kill tests: ``PETMIX_CRASH_AT=name`` (or ``name:k``, the k-th time)
    makes the process kill itself with SIGKILL here, as a power cut or ``kill -9`` would."""
    spec = os.environ.get("PETMIX_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _CRASH_HITS[name] = _CRASH_HITS.get(name, 0) + 1
    if _CRASH_HITS[name] == int(nth or 1):
        import signal

        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    _atomic_write(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def setup_logging(run_dir: str | Path | None = None, verbose: bool = False) -> None:
    """Log to stderr and, when a run directory is given, to ``RUN/log.txt`` (appending)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_petmix", False):
            root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / "log.txt", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        h._petmix = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def save_tensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Safetensors file written atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
