"""petmix's structure (issue 11): a method is one module; generic code names no method; no import
cycles; inference does not import training; every setting has a flag. The toy method below is added
the way docs/adding-a-method.md says: one options dataclass, one hook, one registration."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from petmix.cli import build_parser, main
from petmix.config import TrainConfig
from petmix.methods import METHODS, Method, StageHook, register_method, setting
from petmix.methods.base import unregister_method

SRC = Path(__file__).resolve().parents[1] / "src" / "petmix"
FIXTURE = Path(__file__).parent / "fixtures" / "generic_folder"
# Modules that run any method: they may ask a Method, never name one.
GENERIC = ["train.py", "mixture.py", "api.py", "compare.py", "report.py", "report_html.py", "cli.py", "router.py",
           "config.py", "build.py", "checkpoint.py", "tune.py", "serve.py", "peft_io.py", "evaluate.py"]
# Block kinds that are also the names of the plain single-task methods that use them, and the stage
# record key "replay" (what a method replayed, any method's), which is also a method's name.
BLOCK_KINDS = {"lora", "prompt", "full", "bitfit", "replay"}


def _strings(tree: ast.AST) -> set[str]:
    """String literals of a module, docstrings left out."""
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs}


@pytest.mark.parametrize("module", GENERIC)
def test_generic_modules_name_no_method(module):
    tree = ast.parse((SRC / module).read_text())
    named = sorted(_strings(tree) & (set(METHODS) - BLOCK_KINDS))
    assert not named, f"{module} names methods {named}: ask the Method instead"


def _module_imports(path: Path) -> set[str]:
    """petmix modules imported at module level (not under TYPE_CHECKING, not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for n in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.If, ast.Try)) else []:
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("petmix"):
                found.add(n.module)
                found.update(f"{n.module}.{a.name}" for a in n.names)  # `from petmix.methods import sapt`
            elif isinstance(n, ast.Import):
                found.update(a.name for a in n.names if a.name.startswith("petmix"))
    return found


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Paths that lead from a module back to itself (a package importing its own submodules does not count)."""
    def package_parent(a: str, b: str) -> bool:
        return b.startswith(a + ".") or a.startswith(b + ".")

    cycles = []
    for start in graph:  # depth-first search for a path back to start
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start and not any(package_parent(x, y) for x, y in zip(path, path[1:] + [start])):
                    cycles.append(path + [start])
                elif nxt not in path and len(path) < 8:
                    stack.append((nxt, path + [nxt]))
    return cycles


def test_no_import_cycles():
    assert find_cycles({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}})  # the search finds one where there is one
    assert not find_cycles({"p": {"p.a"}, "p.a": {"p"}})
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: {m for m in _module_imports(path) if m in modules and m != name} for name, path in modules.items()}
    assert sum(map(len, graph.values())) > 50  # the graph was read
    cycles = find_cycles(graph)
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_inference_does_not_import_training():
    code = "import sys, petmix.api; print(sorted(m for m in sys.modules if m in ('petmix.train', 'petmix.checkpoint')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_setting_has_a_flag_in_train_help():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for _, f in TrainConfig.settings():
        assert "--" + f.name.replace("_", "-") in text, f"{f.name} has no flag"


# ---- a toy method, added as the guide says ----------------------------------------------------------
@dataclass
class ToyOptions:
    toy_decay: float = setting(0.1, "toy-decay: weight of the L2 pull of the new block toward zero", ge=0)


class DecayNewBlock(StageHook):
    name = "toy"

    def __init__(self, decay: float):
        self.decay = decay

    def loss(self, trainer, micro_batch, output):
        pool = trainer.mix.pool
        return self.decay * sum((p ** 2).sum() for p in pool.block_parameters(pool.num_blocks - 1))


TOY = Method("toy-decay", "sum", True, options=ToyOptions,
             hooks=(lambda trainer, o: DecayNewBlock(o.toy_decay) if o.toy_decay > 0 else None,),
             summary="a new LoRA per task, pulled toward zero (a test's toy method)")


@pytest.fixture
def toy():
    register_method(TOY)
    yield TOY
    unregister_method(TOY.name)


def test_a_toy_method_added_in_one_place_trains(toy, tiny_llama_path, tmp_path, capsys):
    assert "toy-decay" in METHODS
    # its option is a setting with a flag, a type, a default and bounds, like any other
    assert "--toy-decay" in build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert TrainConfig.from_dict({"method": "toy-decay"}).toy_decay == 0.1
    assert main(["methods", "toy-decay"]) == 0
    described = capsys.readouterr().out
    assert "router: sum (no task id at test)" in described and "--toy-decay" in described and "(default 0.1)" in described
    rc = main(["train", "--method", "toy-decay", "--toy-decay", "-1", "--model", str(tiny_llama_path),
               "--tasks", str(FIXTURE), "--out", str(tmp_path / "bad")])
    assert rc == 2 and "--toy-decay: must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "run"
    rc = main(["train", "--method", "toy-decay", "--toy-decay", "0.5", "--model", str(tiny_llama_path),
               "--tasks", str(FIXTURE), "--max-train", "8", "--max-test", "2", "--batch-size", "4",
               "--max-new-tokens", "2", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    stage = results["stages"][0]
    assert results["method"] == "toy-decay" and stage["mean_toy_loss"] > 0
    assert json.loads((out / "config.json").read_text())["toy_decay"] == 0.5
    # a decay of 0 switches the hook off: no toy loss recorded
    cfg = TrainConfig.from_dict({"method": "toy-decay", "toy_decay": 0.0, "model": str(tiny_llama_path)})
    from petmix.data.loaders import load_tasks
    from petmix.train import Trainer

    trainer = Trainer(cfg, load_tasks([str(FIXTURE)], None, max_train=4, max_test=1), tmp_path / "off")
    assert trainer.hooks == []
