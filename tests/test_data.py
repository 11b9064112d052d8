"""Tests of petmix.data: loaders, BIG-bench extraction and caching, streams, templates."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from petmix.data import (
    STREAMS,
    TEMPLATES,
    Task,
    bigbench,
    format_prompt,
    load_task,
    load_tasks,
    resolve_stream,
    stream_info,
)
from petmix.errors import DataError, PetmixError

FIXTURES = Path(__file__).parent / "fixtures"
CL = FIXTURES / "cl_layout"  # hand-written tasks in the CL_Benchmark layout (SuperNI/, Long_Sequence/)
SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


def write(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def inputs(examples: list) -> set[str]:
    return {e.input for e in examples}


def cl_file(instances: object, definition: object = ("Do it.",)) -> dict:
    return {
        "Definition": list(definition) if isinstance(definition, tuple) else definition,
        "Instances": instances,
    }


# ---- CL layout ---------------------------------------------------------------------------------


def test_superni_folder_with_list_outputs() -> None:
    task = load_task(CL / "SuperNI/task001_tiny_colour_qa")
    assert task.name == "task001_tiny_colour_qa"
    assert (task.benchmark, task.metric, task.template) == ("superni", "rougeL", "superni")
    assert task.definition == "Answer with the colour of the item."
    assert (len(task.train), len(task.test)) == (30, 6)
    assert task.train[0].outputs == ["red", "red colour"] and task.train[0].target == "red"
    assert task.labels is None and task.notes == []


def test_long_sequence_folder_reads_labels_and_string_outputs() -> None:
    task = load_task("tinysent", CL)
    assert (task.benchmark, task.metric, task.template) == ("long", "exact_match", "long")
    assert task.labels == ["Good", "Bad"]
    assert task.train[1].outputs == ["Bad"]
    assert (len(task.train), len(task.test)) == (20, 6)


def test_missing_test_is_derived_from_train_with_a_note() -> None:
    task = load_task("tinynotest", CL)
    assert (len(task.train), len(task.test)) == (36, 4)
    assert not {e.input for e in task.train} & {e.input for e in task.test}
    assert any("test derived from held-back 10% of train (seed 0)" in n for n in task.notes)
    assert load_task("tinynotest", CL).test == task.test
    assert load_task("tinynotest", CL, seed=1).test != task.test


def test_missing_train_is_derived_from_test_disjoint_with_a_note(tmp_path) -> None:
    task = load_task("tinynotrain", CL)
    assert task.train and task.test and task.labels
    assert not {e.input for e in task.train} & {e.input for e in task.test}
    assert "train derived from test.json" in task.notes[0] and "disjoint" in task.notes[0]
    # the test part depends on test_seed only: other seeds sample other training examples, same test
    again = load_task("tinynotrain", CL, seed=5, test_seed=0, max_train=2)
    assert again.test == task.test and len(again.train) == 2
    folder = tmp_path / "Long_Sequence" / "nothing"
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text('["a"]')
    with pytest.raises(DataError, match=r"nothing/train\.json.*holds only: labels\.json.*cannot run"):
        load_task(folder)


def test_test_seed_fixes_the_test_sample_whatever_the_seed() -> None:
    a = load_task("tinysent", CL, max_train=5, max_test=3, seed=1, test_seed=0)
    b = load_task("tinysent", CL, max_train=5, max_test=3, seed=2, test_seed=0)
    assert a.test == b.test and a.train != b.train
    assert load_task("tinysent", CL, max_test=3, seed=1).test == load_task("tinysent", CL, max_test=3, seed=1,
                                                                          test_seed=1).test


# ---- spec resolution ---------------------------------------------------------------------------


def test_prefix_and_name_resolution() -> None:
    assert load_task("task001", CL).name == "task001_tiny_colour_qa"
    assert load_task("task002", CL).name == "task002_tiny_summary"
    assert load_task("SuperNI/task002_tiny_summary", CL).name == "task002_tiny_summary"
    with pytest.raises(DataError, match="ambiguous.*task001_tiny_colour_qa.*task002_tiny_summary"):
        load_task("task00", CL)


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(DataError, match=r"unknown task 'tinysnet'.*close matches: tinysent") as info:
        load_task("tinysnet", CL)
    assert str(CL) in str(info.value)
    with pytest.raises(DataError, match="no such task folder"):
        load_task("no_such_dir_anywhere")


def test_load_tasks_keeps_order() -> None:
    tasks = load_tasks(["tinysent", "task001", str(FIXTURES / "generic_folder")], CL)
    assert [t.name for t in tasks] == ["tinysent", "task001_tiny_colour_qa", "generic_folder"]


# ---- generic folder and BIG-bench task.json folder ---------------------------------------------


def test_generic_folder() -> None:
    task = load_task(FIXTURES / "generic_folder")
    assert (task.benchmark, task.metric, task.template) == ("folder", "exact_match", "plain")
    assert task.definition == "Repeat the word."
    assert (len(task.train), len(task.test)) == (15, 5)  # dev.jsonl is ignored
    assert task.test[0].outputs == ["test0", "TEST0"]


def test_generic_folder_defaults(tmp_path: Path) -> None:
    write(tmp_path / "t/train.jsonl", '{"input": "a", "output": "b"}\n\n')
    write(tmp_path / "t/test.jsonl", '{"input": "c", "output": ["d"]}\n')
    task = load_task(tmp_path / "t")
    assert (task.definition, task.metric, task.template) == ("", "rougeL", "plain")
    assert format_prompt(task, "c") == "Input: c\nOutput: "


def test_bigbench_task_json_folder() -> None:
    task = load_task(FIXTURES / "bigbench_ni")
    assert task.name == "subtask901_tiny_echo" and task.benchmark == "bigbench"
    assert task.definition == "Echo the animal named in the input."
    assert (task.template, task.metric) == ("superni", "rougeL")
    assert (len(task.train), len(task.test)) == (22, 2)
    assert "no train/test split" in task.notes[0]


def test_bigbench_multiple_choice_uses_best_choices() -> None:
    task = load_task(FIXTURES / "bigbench_mc")
    assert (task.template, task.metric) == ("plain", "exact_match")
    example = next(e for e in task.train + task.test if e.input.startswith("Which is larger: 3 or 4?"))
    assert example.outputs == ["4"]
    assert example.input.endswith("\n  choice: 3\n  choice: 4")


# ---- caps, held-out split, templates -----------------------------------------------------------


def test_caps_are_seeded_random_samples() -> None:
    folder = CL / "SuperNI/task001_tiny_colour_qa"
    a = load_task(folder, max_train=5, max_test=2, seed=3)
    b = load_task(folder, max_train=5, max_test=2, seed=3)
    c = load_task(folder, max_train=5, max_test=2, seed=4)
    full = load_task(folder)
    assert (len(a.train), len(a.test)) == (5, 2)
    assert a.train == b.train and a.test == b.test
    assert a.train != c.train
    assert a.train != full.train[:5]  # a sample, not the head of the file
    assert all(e in full.train for e in a.train)


def test_heldout_split_is_deterministic_and_disjoint_from_test() -> None:
    task = load_task("tinynotest", CL)  # test carved from train too: the hardest case
    rest, held = task.heldout_split(0.25, seed=0)
    assert (len(rest), len(held)) == (27, 9)
    assert (rest, held) == task.heldout_split(0.25, seed=0)
    assert held != task.heldout_split(0.25, seed=1)[1]
    assert not inputs(held) & inputs(task.test)
    assert not inputs(held) & inputs(rest)
    assert inputs(held) | inputs(rest) == inputs(task.train)
    assert len(task.heldout_split(0.5, max_n=3)[1]) == 3


def test_templates() -> None:
    task = load_task(CL / "SuperNI/task002_tiny_summary")
    assert format_prompt(task, "X") == (
        "Definition: Summarize the text in one sentence.\n\n"
        "Now complete the following example -\nInput: X\nOutput: "
    )
    long = load_task("tinysent", CL)
    assert format_prompt(long, "X") == "Make a judgement on the sentiment of the given text.\nX\nOutput: "
    generic = load_task(FIXTURES / "generic_folder")
    assert format_prompt(generic, "X") == "Repeat the word.\n\nInput: X\nOutput: "
    assert set(TEMPLATES) == {"superni", "long", "plain"}


# ---- bad data: each case names the file and the problem ---------------------------------------


BAD_CL = {
    "malformed JSON at line 2": '{"Definition": [],\n "Instances": [,]}',
    "expected a JSON object": "[1, 2]",
    "no 'Instances' field": {"Definition": []},
    "'Instances' must be a list": cl_file({"input": "a"}),
    "empty task": cl_file([]),
    "instance 1 has no 'output' field": cl_file([{"input": "a", "output": "b"}, {"input": "c"}]),
    "instance 0 has no 'input' field": cl_file([{"output": "b"}]),
    "instance 0: 'input' must be a string": cl_file([{"input": 3, "output": "b"}]),
    "instance 1: 'input' is empty": cl_file([{"input": "a", "output": "b"}, {"input": " \n", "output": "b"}]),
    "instance 0: 'output' must be a string or a list of strings": cl_file([{"input": "a", "output": [1]}]),
    "instance 0: 'output' is an empty list": cl_file([{"input": "a", "output": []}]),
    "instance 0 must be an object": cl_file(["a"]),
    "'Definition' must be a list of strings": cl_file([{"input": "a", "output": "b"}], definition=[1]),
}


@pytest.mark.parametrize("problem", list(BAD_CL))
def test_bad_cl_train_file(tmp_path: Path, problem: str) -> None:
    bad = write(tmp_path / "SuperNI/task9_bad/train.json", BAD_CL[problem])
    write(tmp_path / "SuperNI/task9_bad/test.json", cl_file([{"input": "a", "output": "b"}]))
    with pytest.raises(DataError, match=problem) as info:
        load_task(tmp_path / "SuperNI/task9_bad")
    assert info.value.path == str(bad)


def test_bad_labels(tmp_path: Path) -> None:
    ok = cl_file([{"input": "a", "output": "b"}])
    write(tmp_path / "Long_Sequence/x/train.json", ok)
    write(tmp_path / "Long_Sequence/x/test.json", ok)
    labels = write(tmp_path / "Long_Sequence/x/labels.json", {"a": 1})
    with pytest.raises(DataError, match="labels.json must be a non-empty list of strings") as info:
        load_task("x", tmp_path)
    assert info.value.path == str(labels)


BAD_JSONL = {
    "malformed JSON on line 2": '{"input": "a", "output": "b"}\n{"input": \n',
    "line 1 has no 'output' field": '{"input": "a"}\n',
    "line 2 has no 'input' field": '{"input": "a", "output": "b"}\n{"output": "b"}\n',
    "line 1: 'output' must be a string or a list of strings": '{"input": "a", "output": 5}\n',
    "empty task: no examples": "\n",
    "line 2: 'input' is empty": '{"input": "a", "output": "b"}\n{"input": "", "output": "b"}\n',
}


@pytest.mark.parametrize("problem", list(BAD_JSONL))
def test_bad_jsonl(tmp_path: Path, problem: str) -> None:
    write(tmp_path / "t/train.jsonl", '{"input": "a", "output": "b"}\n')
    bad = write(tmp_path / "t/test.jsonl", BAD_JSONL[problem])
    with pytest.raises(DataError, match=problem) as info:
        load_task(tmp_path / "t")
    assert info.value.path == str(bad)


def test_generic_folder_problems(tmp_path: Path) -> None:
    write(tmp_path / "t/train.jsonl", '{"input": "a", "output": "b"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl: file is missing"):
        load_task(tmp_path / "t")
    write(tmp_path / "t/test.jsonl", '{"input": "a", "output": "b"}\n')
    meta = write(tmp_path / "t/task.json", {"metric": "bleu"})
    with pytest.raises(DataError, match="unknown metric 'bleu'") as info:
        load_task(tmp_path / "t")
    assert info.value.path == str(meta)
    write(tmp_path / "t/task.json", {"definition": ["x"]})
    with pytest.raises(DataError, match="'definition' must be a string"):
        load_task(tmp_path / "t")


def test_folder_without_task_data(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no task data") as info:
        load_task(tmp_path / "empty")
    assert info.value.path == str(tmp_path / "empty")
    with pytest.raises(DataError, match="data dir does not exist"):
        load_task("x", tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ({"name": "x"}, "no 'examples' list"),
        ({"examples": [{"input": "a", "target": "b"}]}, "need at least 2"),
        ({"examples": [{"input": "a"}, {"input": "b", "target": "c"}]}, "example 0 has no 'target' field"),
        ({"examples": [{"input": "a", "target_scores": {"x": "hi"}}] * 2}, "example 0: 'target_scores'"),
    ],
)
def test_bad_bigbench_task_json(tmp_path: Path, content: dict, problem: str) -> None:
    bad = write(tmp_path / "bb/task.json", content)
    with pytest.raises(DataError, match=problem) as info:
        load_task(tmp_path / "bb")
    assert info.value.path == str(bad)


# ---- BIG-bench sdist extraction and cache -------------------------------------------------------


def fake_sdist(path: Path) -> Path:
    """A tarball laid out like bigbench-1.0.0.tar.gz, with three tiny JSON tasks."""
    ni = json.loads((FIXTURES / "bigbench_ni/task.json").read_text())
    mc = json.loads((FIXTURES / "bigbench_mc/task.json").read_text())
    files = {
        "natural_instructions/task.json": {"name": "natural_instructions", "description": "61 tasks"},
        "natural_instructions/subtask901_tiny_echo/task.json": ni,
        "tiny_choice/task.json": mc,
        "tiny_parent/task.json": {"name": "tiny_parent"},
        "tiny_parent/part_a/task.json": mc,
    }
    with tarfile.open(path, "w:gz") as tar:
        for rel, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def sdist_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    sdist = fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    monkeypatch.setenv("PETMIX_BIGBENCH_SDIST", str(sdist))
    monkeypatch.setenv("PETMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PETMIX_BIGBENCH_DIR", raising=False)
    return sdist


def test_bigbench_sdist_extracts_to_cache_then_loads_without_it(sdist_env: Path) -> None:
    task = load_task("bigbench:subtask901_tiny_echo", max_train=5)
    assert task.name == "subtask901_tiny_echo" and len(task.train) == 5
    cache = sdist_env.parent / "cache" / "bigbench"
    assert (cache / "tasks/natural_instructions/subtask901_tiny_echo/task.json").is_file()
    assert not (cache / "tasks/tiny_choice").exists()  # only what was asked for is extracted
    assert "tiny_choice" in json.loads((cache / "index.json").read_text())
    assert not list(cache.rglob("*.part"))
    sdist_env.unlink()  # later loads need only the cache
    again = load_task("bigbench:subtask901", max_train=5)  # unique prefix
    assert again.train == task.train and again.test == task.test


def test_bigbench_tasks_share_one_pass(sdist_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    passes = []
    scan = bigbench._scan_sdist
    monkeypatch.setattr(bigbench, "_scan_sdist", lambda *a: passes.append(a) or scan(*a))
    tasks = load_tasks(["bigbench:tiny_choice", "bigbench:subtask901_tiny_echo", "tinysent"], CL)
    assert [t.name for t in tasks] == ["tiny_choice", "subtask901_tiny_echo", "tinysent"]
    assert len(passes) == 1
    assert load_task("bigbench:tiny_parent/part_a").name == "tiny_parent-part_a"
    assert len(passes) == 2  # a second pass only for a task not yet in the cache


def test_bigbench_unknown_and_parent_names(sdist_env: Path) -> None:
    with pytest.raises(
        DataError, match="'tiny_chioce' is not a BIG-bench JSON task; candidates: tiny_choice"
    ):
        load_task("bigbench:tiny_chioce")
    with pytest.raises(DataError, match="has subtasks; name one: tiny_parent/part_a"):
        load_task("bigbench:tiny_parent")


def test_bigbench_bad_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PETMIX_BIGBENCH_DIR", raising=False)
    monkeypatch.setenv("PETMIX_BIGBENCH_SDIST", str(tmp_path / "absent.tar.gz"))
    with pytest.raises(
        DataError, match="absent.tar.gz: PETMIX_BIGBENCH_SDIST names a file that does not exist"
    ):
        load_task("bigbench:x")
    junk = write(tmp_path / "junk.tar.gz", "not a tarball")
    monkeypatch.setenv("PETMIX_BIGBENCH_SDIST", str(junk))
    with pytest.raises(DataError, match="junk.tar.gz: cannot read BIG-bench sdist"):
        load_task("bigbench:x")


def test_bigbench_checkout_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "BIG-bench"
    tasks = root / "bigbench" / "benchmark_tasks"
    write(tasks / "tiny_choice/task.json", json.loads((FIXTURES / "bigbench_mc/task.json").read_text()))
    monkeypatch.setenv("PETMIX_BIGBENCH_DIR", str(root))
    monkeypatch.setenv("PETMIX_CACHE", str(tmp_path / "cache"))
    assert load_task("bigbench:tiny_choice").source == str(tasks / "tiny_choice/task.json")
    assert not (tmp_path / "cache").exists()


def test_pick_sdist_url() -> None:
    page = {
        "files": [
            {"filename": "bigbench-0.0.1.tar.gz", "url": "u0"},
            {"filename": bigbench.SDIST_FILENAME, "url": "u1"},
        ]
    }
    assert bigbench.pick_sdist_url(page) == "u1"
    with pytest.raises(PetmixError, match="lists no"):
        bigbench.pick_sdist_url({"files": []})


# ---- streams ------------------------------------------------------------------------------------


def test_streams() -> None:
    assert len(resolve_stream("superni-order1")) == len(set(resolve_stream("superni-order2"))) == 15
    assert set(resolve_stream("superni-order1")) == set(resolve_stream("superni-order2"))
    assert resolve_stream("superni-order2")[0] == "task748_glucose_reverse_cause_event_detection"
    assert resolve_stream("long4-order3") == ["yahoo", "amazon", "agnews", "dbpedia"]
    assert all(s.startswith("bigbench:subtask") for s in resolve_stream("default"))
    assert 4 <= len(resolve_stream("default")) <= 5
    with pytest.raises(PetmixError, match="unknown stream 'nope'; known streams: default"):
        resolve_stream("nope")
    assert "no train or test data for yahoo" in stream_info("long-order1")
    assert "train derived from test.json for dbpedia" in stream_info("long-order1")
    assert "yahoo" not in resolve_stream("long4-avail-order1") and "deviation" in stream_info("long4-avail-order1")
    assert "imdb" in stream_info("long-order2")
    assert all(stream_info(name) for name in STREAMS)


# ---- the real benchmark data (skipped where ../shared/data is absent) ---------------------------


def test_real_benchmark_data() -> None:
    if not (SHARED_DATA / "CL_Benchmark").is_dir():
        pytest.skip(f"../shared/data not present: {SHARED_DATA} has no CL_Benchmark")
    superni = load_tasks(resolve_stream("superni-order1"), SHARED_DATA, max_train=8, max_test=4)
    assert all(isinstance(t, Task) and t.metric == "rougeL" and len(t.train) == 8 for t in superni)
    samsum = load_task("task1572", SHARED_DATA)
    assert (len(samsum.train), len(samsum.test)) == (160, 20)
    cb = load_task("cb", SHARED_DATA)
    assert cb.labels == ["entailment", "contradiction", "neutral"] and cb.metric == "exact_match"
    imdb = load_task("imdb", SHARED_DATA)
    assert (len(imdb.train), len(imdb.test)) == (1800, 200) and "test derived" in imdb.notes[0]
    dbpedia = load_task("dbpedia", SHARED_DATA)
    assert (len(dbpedia.train), len(dbpedia.test)) == (6080, 1520) and "train derived" in dbpedia.notes[0]
    assert not {e.input for e in dbpedia.train} & {e.input for e in dbpedia.test}
    with pytest.raises(DataError, match="yahoo cannot run|task yahoo cannot run"):
        load_task("yahoo", SHARED_DATA)


def test_tasks_found_inside_a_cl_benchmark_folder(tmp_path):
    import shutil

    shutil.copytree(CL, tmp_path / "CL_Benchmark")
    assert load_task("tinysent", tmp_path).name == "tinysent"
    assert load_task("task001", tmp_path).name == "task001_tiny_colour_qa"
