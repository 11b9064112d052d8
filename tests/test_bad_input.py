"""Every bad input gets exit status 2, one message naming the offending flag, key or file, no
traceback, and leaves no new file behind (issue 14).

Each case runs ``petmix.cli.main`` in-process from an empty working folder. Validation happens
before the model loads, so almost no case needs one; ``--model`` names the tiny model anyway, so
that a case petmix failed to refuse would train quickly (and fail the test) instead of loading the
default model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import save_file

from petmix.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "generic_folder"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_llama_path):
    """An empty working folder holding a few prepared inputs (a file, a non-UTF-8 file, run folders)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "a_file").write_text("not a folder\n")
    (work / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (work / "inputs.txt").write_text("hello\n")
    _fake_run(work / "run")
    return {"work": work, "model": str(tiny_llama_path)}


def _fake_run(run: Path) -> None:
    """A finished run's files, as far as predict/report read them before a model loads."""
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": "sapt-lora", "model": "m", "tasks": ["t1"]}))
    results = {"method": "sapt-lora", "tasks": ["t1"], "matrix": [[50.0]], "metrics": {"AP": 50.0},
               "per_task": {"t1": {"metric": "rougeL", "template": "plain", "definition": "d"}}}
    (run / "results.json").write_text(json.dumps(results))
    import torch

    save_file({"lora.0.x.A": torch.zeros(2, 2)}, run / "adapters.safetensors")
    (run / "predictions").mkdir()
    (run / "predictions" / "t1.jsonl").write_text('{"input": "x", "router_weights": [1.0]}\n')


def _train(*extra: str) -> list[str]:
    return ["train", "--tasks", str(FIXTURE), "--max-train", "3", "--max-test", "2", "--max-new-tokens", "2",
            "--out", "out", *extra]


def _eval(*extra: str) -> list[str]:
    return ["eval", "--tasks", str(FIXTURE), "--max-test", "2", "--max-new-tokens", "2", *extra]


def _yaml(text: str):
    """A YAML file holding ``text`` plus small settings for the keys it does not set (flags would
    override the very key under test)."""
    def make(env) -> list[str]:
        small = {"tasks": str(FIXTURE), "max_train": 3, "max_test": 2, "max_new_tokens": 2, "model": env["model"]}
        extra = "".join(f"{k}: {json.dumps(v)}\n" for k, v in small.items() if not text.startswith(f"{k}:")
                        and f"\n{k}:" not in text)
        body = text if text.startswith("-") else text + extra
        Path("cfg.yaml").write_text(body, encoding="utf-8")
        return ["train", "--config", "cfg.yaml", "--out", "out", M, env["model"]] if text.startswith("-") else \
            ["train", "--config", "cfg.yaml", "--out", "out"]
    return make


def _damage(rel: str, content: bytes | None = None, truncate_safetensors: bool = False):
    """A run folder ``out`` that a kill and a bad disk left with one damaged file."""
    def make() -> None:
        out = Path("out")
        (out / "state").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_safetensors:
            import torch

            save_file({"w": torch.zeros(64)}, path)
            path.write_bytes(path.read_bytes()[:-40])
        else:
            path.write_bytes(content if content is not None else b'{"progress": {"stage": ')
    return make


# (id, argv or a function making argv, expected words in the message, optional set-up)
M = "--model"
CASES: list[tuple[str, object, tuple[str, ...], object]] = [
    # ---- train: flags -----------------------------------------------------------------------------
    ("epochs-inf", _train("--epochs", "inf"), ("--epochs", "finite"), None),
    ("epochs-nan", _train("--epochs", "nan"), ("--epochs",), None),
    ("epochs-0", _train("--epochs", "0"), ("--epochs",), None),
    ("max-train-neg", _train("--max-train", "-1"), ("--max-train",), None),
    ("max-test-0", _train("--max-test", "0"), ("--max-test",), None),
    ("train-eval-batch-0", _train("--eval-batch-size", "0"), ("--eval-batch-size",), None),
    ("train-heldout-max-0-with-arm", _train("--heldout-max", "0"), ("--heldout-max", "held-out"), None),
    ("max-new-tokens-0", _train("--max-new-tokens", "0"), ("--max-new-tokens",), None),
    ("checkpoint-every-0", _train("--checkpoint-every", "0"), ("--checkpoint-every",), None),
    ("lora-dropout-1.5", _train("--lora-dropout", "1.5"), ("--lora-dropout",), None),
    ("lora-dropout-neg", _train("--lora-dropout", "-0.1"), ("--lora-dropout",), None),
    ("target-modules", _train("--target-modules", "nonexistent_proj"), ("target_modules", "nonexistent_proj"), None),
    ("prompt-init-missing", _train("--method", "prompt-tuning", "--prompt-init", "/missing.safetensors"),
     ("--prompt-init",), None),
    ("unfreeze-regex", _train("--method", "seq-ft", "--unfreeze", "("), ("--unfreeze", "regular expression"), None),
    ("unfreeze-last-x", _train("--method", "seq-ft", "--unfreeze", "last:x"), ("--unfreeze",), None),
    ("unfreeze-matches-nothing", _train("--method", "seq-ft", "--unfreeze", "zzz_nothing"), ("unfreeze",), None),
    ("router-lr-neg", _train("--router-lr", "-1"), ("--router-lr",), None),
    ("prompt-length-0", _train("--method", "prompt-tuning", "--prompt-length", "0"), ("--prompt-length",), None),
    ("lora-r-0", _train("--lora-r", "0"), ("--lora-r",), None),
    ("batch-size-float", _train("--batch-size", "2.5"), ("--batch-size",), None),
    ("seed-neg", _train("--seed", "-1"), ("--seed",), None),
    ("heldout-1", _train("--heldout-fraction", "1"), ("--heldout-fraction",), None),
    ("kl-ratio-neg", _train("--kl-ratio", "-1"), ("--kl-ratio",), None),
    ("replay-source", _train("--replay-source", "foo"), ("--replay-source", "generated"), None),
    ("eval-scope", _train("--eval-scope", "foo"), ("--eval-scope", "seen"), None),
    ("method-unknown", _train("--method", "nope"), ("method", "nope"), None),
    ("stream-unknown", ["train", "--stream", "nope", "--out", "out"], ("stream", "nope"), None),
    ("task-unknown", ["train", "--tasks", "no_such_task_xyz", "--out", "out"], ("no_such_task_xyz",), None),
    ("data-missing", _train("--data", "/nonexistent/data"), ("--data",), None),
    ("config-missing", _train("--config", "missing.yaml"), ("--config",), None),
    ("l2p-top-k", _train("--method", "l2p", "--l2p-top-k", "20", "--l2p-pool-size", "5"), ("--l2p-top-k", "l2p_pool_size"), None),
    ("single-task-missing", _train("--single-task-results", "/missing/run"), ("--single-task-results",), None),
    ("single-task-not-results", _train("--single-task-results", "inputs.txt"), ("inputs.txt",), None),
    ("sources-missing", _train("--method", "attempt", "--sources", "/missing/lib"), ("--sources",), None),
    ("attempt-no-sources", _train("--method", "attempt"), ("sources",), None),
    ("ewc-online-word", _train("--ewc-online", "maybe"), ("--ewc-online",), None),
    ("lwf-temperature-0", _train("--lwf-temperature", "0"), ("--lwf-temperature",), None),
    ("prompt-depth", _train("--prompt-depth", "middle"), ("--prompt-depth", "shallow"), None),
    ("residual-without-encoder", _train("--method", "prompt-tuning", "--prompt-encoder-residual", "true"),
     ("--prompt-encoder-residual", "no prompt encoder"), None),
    ("buffer-sampling", _train("--buffer-sampling", "foo"), ("--buffer-sampling",), None),
    ("attempt-temperature-0", _train("--attempt-temperature", "0"), ("--attempt-temperature",), None),
    ("model-empty", _train(M, ""), ("--model",), None),
    ("model-missing-folder", _train(M, "/nonexistent/model"), ("--model", "/nonexistent/model"), None),
    ("eval-model-missing-folder", _eval(M, "./no_model_here", "--out", "out"), ("--model",), None),
    ("max-source-len-small", _train("--max-source-len", "4"), ("--max-source-len",), None),
    ("grad-accum-0", _train("--grad-accum", "0"), ("--grad-accum",), None),
    # ---- train: --out -----------------------------------------------------------------------------
    ("out-empty", ["train", "--tasks", str(FIXTURE), "--out", ""], ("--out",), None),
    ("out-file", ["train", "--tasks", str(FIXTURE), "--out", "a_file"], ("--out", "a_file"), None),
    ("out-under-file", ["train", "--tasks", str(FIXTURE), "--out", "a_file/run"], ("--out", "a_file"), None),
    ("out-proc", ["train", "--tasks", str(FIXTURE), "--out", "/proc/petmix-x"], ("--out",), None),
    ("out-foreign-folder", ["train", "--tasks", str(FIXTURE), "--out", "mine"], ("--out", "not a petmix run"),
     lambda: (Path("mine").mkdir(), Path("mine/thesis.tex").write_text("x"))),
    # ---- train: YAML ------------------------------------------------------------------------------
    ("yaml-epochs-list", _yaml("epochs: [1, 2]\n"), ("cfg.yaml", "epochs"), None),
    ("yaml-lr-word", _yaml("lr: fast\n"), ("cfg.yaml", "lr"), None),  # null: the method's own rate
    ("yaml-tasks-int", _yaml("tasks: 5\n"), ("cfg.yaml", "tasks"), None),
    ("yaml-batch-float", _yaml("batch_size: 2.5\n"), ("cfg.yaml", "batch_size", "whole number"), None),
    ("yaml-model-int", _yaml("model: 123\n"), ("cfg.yaml", "model"), None),
    ("yaml-int-key", _yaml("1: 2\n"), ("cfg.yaml", "1"), None),
    ("yaml-not-utf8", lambda env: (Path("cfg.yaml").write_bytes(b"epochs: 1 # caf\xe9\n"), _train("--config", "cfg.yaml", M, env["model"]))[1],
     ("cfg.yaml", "UTF-8"), None),
    ("yaml-bf16-string", _yaml('bf16: "false"\n'), ("cfg.yaml", "bf16", "true or false"), None),
    ("yaml-chat-int", _yaml("chat: 1\n"), ("cfg.yaml", "chat"), None),
    ("yaml-generator-unknown", _yaml("generator:\n  nope: 1\n"), ("generator", "nope"), None),
    ("yaml-generator-r-0", _yaml("generator:\n  r: 0\n"), ("generator", "r"), None),
    ("yaml-generator-float-count", _yaml("generator:\n  max_rounds: 1.5\n"), ("generator.max_rounds",), None),
    ("yaml-generator-not-map", _yaml("generator: 5\n"), ("generator",), None),
    ("yaml-list-top", _yaml("- a\n- b\n"), ("cfg.yaml", "mapping"), None),
    ("yaml-malformed", _yaml("a: [1\n"), ("cfg.yaml", "YAML"), None),
    ("yaml-epochs-inf", _yaml("epochs: .inf\n"), ("cfg.yaml", "epochs"), None),
    ("yaml-unknown-key", _yaml("epochz: 3\n"), ("cfg.yaml", "epochz"), None),
    ("yaml-max-test-neg", _yaml("max_test: -3\n"), ("cfg.yaml", "max_test"), None),
    ("yaml-lora-alpha-text", _yaml("lora_alpha: abc\n"), ("cfg.yaml", "lora_alpha"), None),
    ("yaml-tasks-ints", _yaml("tasks: [1, 2]\n"), ("cfg.yaml", "tasks"), None),
    ("yaml-seed-bool", _yaml("seed: true\n"), ("cfg.yaml", "seed"), None),
    ("yaml-ewc-online-string", _yaml("ewc_online: 'yes'\n"), ("cfg.yaml", "ewc_online"), None),
    # ---- train: damaged run folder on resume ------------------------------------------------------
    ("resume-config-json", _train(), ("config.json", "damaged"), _damage("config.json", b'{"method": "sa')),
    ("resume-trainer-json", _train(), ("trainer.json", "damaged"), _damage("state/trainer.json")),
    ("resume-adapters-truncated", _train(), ("adapters.safetensors", "damaged"),
     _damage("state/adapters.safetensors", truncate_safetensors=True)),
    ("resume-trainer-st-empty", _train(), ("trainer.safetensors", "damaged"), _damage("state/trainer.safetensors", b"")),
    ("resume-stages-json", _train(), ("stages.json", "damaged"), _damage("stages.json", b'[{"name": "t"')),
    ("resume-arm-json", _train(), ("arm.json", "damaged"), _damage("arm.json", b'{"targets": {')),
    ("resume-pseudo-jsonl", _train(), ("pseudo", "damaged"), _damage("pseudo/t1.jsonl", b'{"input": "a"}\n{"inp')),
    # ---- compare ----------------------------------------------------------------------------------
    ("compare-dup-label", ["compare", "--methods", "a=seq-lora,a=inc-lora", "--tasks", str(FIXTURE), "--out", "out"],
     ("--methods", "'a'"), None),
    ("compare-dup-method", ["compare", "--methods", "seq-lora,seq-lora", "--tasks", str(FIXTURE), "--out", "out"],
     ("--methods", "seq-lora"), None),
    ("compare-bad-label", ["compare", "--methods", "../x=seq-lora", "--tasks", str(FIXTURE), "--out", "out"],
     ("--methods", "label"), None),
    ("compare-bad-override", ["compare", "--methods", "a=seq-lora:lr=-1", "--tasks", str(FIXTURE), "--out", "out"],
     ("entry a", "lr"), None),
    ("compare-unknown-override", ["compare", "--methods", "a=seq-lora:nope=1", "--tasks", str(FIXTURE), "--out", "out"],
     ("entry a", "nope"), None),
    ("compare-override-no-value", ["compare", "--methods", "a=seq-lora:lr", "--tasks", str(FIXTURE), "--out", "out"],
     ("--methods", "key=value"), None),
    ("compare-unknown-method", ["compare", "--methods", "a=nope", "--tasks", str(FIXTURE), "--out", "out"],
     ("entry a", "method"), None),
    ("compare-no-methods", ["compare", "--methods", ",", "--tasks", str(FIXTURE), "--out", "out"], ("--methods",), None),
    ("compare-out-file", ["compare", "--methods", "seq-lora", "--tasks", str(FIXTURE), "--out", "a_file"],
     ("--out",), None),
    ("compare-epochs-inf", ["compare", "--methods", "seq-lora", "--tasks", str(FIXTURE), "--epochs", "inf", "--out", "out"],
     ("--epochs",), None),
    ("compare-bool-override", ["compare", "--methods", "a=ewc:ewc_online=maybe", "--tasks", str(FIXTURE), "--out", "out"],
     ("entry a", "ewc_online"), None),
    # ---- eval -------------------------------------------------------------------------------------
    ("eval-max-test-0", _eval("--max-test", "0", "--out", "out"), ("--max-test",), None),
    ("eval-batch-0", _eval("--batch-size", "0", "--out", "out"), ("--batch-size",), None),
    ("eval-new-tokens-0", _eval("--max-new-tokens", "0", "--out", "out"),
     ("--max-new-tokens",), None),
    ("eval-out-file", _eval("--out", "a_file"), ("--out",), None),
    ("eval-out-under-file", _eval("--out", "a_file/x"), ("--out",), None),
    ("eval-out-proc", _eval("--out", "/proc/petmix-x"), ("--out",), None),
    ("eval-out-empty", _eval("--out", ""), ("--out",), None),
    ("eval-dtype", _eval("--dtype", "float8", "--out", "out"), ("--dtype",), None),
    ("eval-data-missing", ["eval", "--data", "/nonexistent", "--tasks", "x", "--out", "out"], ("--data",), None),
    ("eval-seed-neg", _eval("--seed", "-5", "--out", "out"), ("--seed",), None),
    ("eval-stream-unknown", ["eval", "--stream", "nope", "--out", "out"], ("stream", "nope"), None),
    # ---- predict ----------------------------------------------------------------------------------
    ("predict-missing-run", ["predict", "no_such_run", "--input", "x"], ("no_such_run",), None),
    ("predict-not-a-run", ["predict", ".", "--input", "x"], ("results.json",), None),
    ("predict-results-truncated", ["predict", "run", "--input", "x"], ("results.json", "damaged"),
     lambda: Path("run/results.json").write_text('{"tasks": ["t1"], "matr')),
    ("predict-results-shape", ["predict", "run", "--input", "x"], ("results.json",),
     lambda: Path("run/results.json").write_text('{"tasks": 3}')),
    ("predict-input-file-missing", ["predict", "run", "--input-file", "nope.txt"], ("--input-file",), None),
    ("predict-input-file-latin1", ["predict", "run", "--input-file", "latin1.txt"], ("--input-file", "UTF-8"), None),
    ("predict-template", ["predict", "run", "--input", "x", "--template", "nope"], ("--template", "superni"), None),
    ("predict-task", ["predict", "run", "--input", "x", "--task", "nope"], ("--task", "nope"), None),
    ("predict-no-input", ["predict", "run"], ("--input",), None),
    ("predict-config-damaged", ["predict", "run", "--input", "x"], ("config.json", "damaged"),
     lambda: Path("run/config.json").write_text('{"method": ')),
    ("predict-adapters-truncated", ["predict", "run", "--input", "x"], ("adapters.safetensors", "damaged"),
     lambda: Path("run/adapters.safetensors").write_bytes(Path("run/adapters.safetensors").read_bytes()[:-5])),
    ("predict-config-bad-value", ["predict", "run", "--input", "x"], ("config.json", "lora_r"),
     lambda: Path("run/config.json").write_text('{"method": "sapt-lora", "model": "m", "tasks": [], "lora_r": "x"}')),
    # ---- report -----------------------------------------------------------------------------------
    ("report-missing-run", ["report", "no_such_run"], ("no_such_run",), None),
    ("report-results-truncated", ["report", "run"], ("results.json", "damaged"),
     lambda: Path("run/results.json").write_text('{"tasks": ["t1"], "matrix": [[5')),
    ("report-results-shape", ["report", "run"], ("results.json",),
     lambda: Path("run/results.json").write_text('{"tasks": ["a", "b"], "matrix": [[1]], "metrics": {}}')),
    ("report-results-not-utf8", ["report", "run"], ("results.json",),
     lambda: Path("run/results.json").write_bytes(b'{"tasks": ["caf\xe9"]}')),
    ("report-predictions-truncated", ["report", "run"], ("t1.jsonl", "damaged"),
     lambda: Path("run/predictions/t1.jsonl").write_text('{"input": "x", "router_wei')),
    ("report-pseudo-truncated", ["report", "run"], ("pseudo", "damaged"),
     lambda: (Path("run/arm.json").write_text('{"pools": {"t1": ["a"]}}'), Path("run/pseudo").mkdir(),
              Path("run/pseudo/t1.jsonl").write_text('{"input": "a"}\n{"in'))),
    # ---- export -----------------------------------------------------------------------------------
    ("export-missing-run", ["export", "no_such_run", "--to", "exp"], ("no_such_run",), None),
    ("export-adapters-truncated", ["export", "run", "--to", "exp"], ("adapters.safetensors", "damaged"),
     lambda: Path("run/adapters.safetensors").write_bytes(Path("run/adapters.safetensors").read_bytes()[:-5])),
    ("export-config-damaged", ["export", "run", "--to", "exp"], ("config.json", "damaged"),
     lambda: Path("run/config.json").write_text('{"method": ')),
    # ---- sources ----------------------------------------------------------------------------------
    ("sources-list-missing", ["sources", "list", "no_such_lib"], ("no_such_lib",), None),
    ("sources-list-damaged", ["sources", "list", "lib"], ("index.json", "damaged"),
     lambda: (Path("lib").mkdir(), Path("lib/index.json").write_text('{"prompts": [{"fi'))),
    ("sources-list-shape", ["sources", "list", "lib"], ("index.json",),
     lambda: (Path("lib").mkdir(), Path("lib/index.json").write_text('{"prompts": 3}'))),
    ("sources-train-epochs", ["sources", "train", "--tasks", str(FIXTURE), "--epochs", "-1", "--out", "lib2"],
     ("--epochs",), None),
    ("sources-train-out-file", ["sources", "train", "--tasks", str(FIXTURE), "--out", "a_file"], ("--out",), None),
    ("sources-train-prompt-length", ["sources", "train", "--tasks", str(FIXTURE), "--prompt-length", "0", "--out", "lib2"],
     ("--prompt-length",), None),
]


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors (exit 2, usage line)
        return int(exc.code or 0)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_naming_the_field(case, env, capsys):
    _, argv, words, setup = case
    if setup is not None:
        setup()
    argv = argv(env) if callable(argv) else list(argv)
    if argv[0] in ("train", "compare", "eval") or argv[:2] == ["sources", "train"]:
        if M not in argv and "--config" not in argv:
            argv = [*argv, M, env["model"]]
    before = _files(env["work"])
    mtimes = {p: os.stat(env["work"] / p).st_mtime_ns for p in before}
    rc = _run(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit {rc}, stderr: {err[-2000:]}"
    assert "Traceback" not in err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    assert _files(env["work"]) == before, "new files were left behind"
    changed = [p for p in before if (env["work"] / p).is_file() and os.stat(env["work"] / p).st_mtime_ns != mtimes[p]]
    assert not changed, f"files were rewritten: {changed}"


def test_enough_cases():
    commands = {c[1][0] if isinstance(c[1], list) else "train" for c in CASES}
    assert len(CASES) >= 60 and commands >= {"train", "compare", "eval", "predict", "report", "sources"}


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_folder_another_process_writes_to_exits_2(command, env, capsys):
    """A run or comparison folder held by another petmix process (here: this test holding its lock) is
    refused before the model loads, naming the folder, and nothing in it changes."""
    import fcntl

    argv = _train("--method", "sapt-lora") if command == "train" else [
        "compare", "--tasks", str(FIXTURE), "--max-train", "3", "--max-test", "2", "--methods", "sapt-lora",
        "--out", "out"]
    argv = [a if a != "out" else "run" for a in argv] + [M, env["model"]]
    fd = os.open(env["work"] / "run", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = {p: os.stat(env["work"] / p).st_mtime_ns for p in _files(env["work"])}
        rc = _run(argv)
        err = capsys.readouterr().err
        assert rc == 2, err[-2000:]
        assert "--out run: in use by another petmix process" in err and "Traceback" not in err
        assert {p: os.stat(env["work"] / p).st_mtime_ns for p in _files(env["work"])} == before
    finally:
        os.close(fd)
    assert _run(argv) == 0  # released: the same command now runs (and resumes nothing: a fresh run)
