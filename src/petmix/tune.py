"""``petmix tune``: choose a method's learning rate (and its most sensitive option) without test data.

One learning rate for every method measures the learning rate, not the method (prompt tuning learns at
1e-1 and barely at 1e-3; full fine-tuning wants 1e-5). So each method gets its own, chosen on a
validation split carved from the TRAIN split of the stream's first tasks; the test split is dropped
as soon as the tasks are loaded and never read. The search is small and coordinate-wise, on
log-spaced grids: first the learning rate at the option's default, then the option at the chosen
rate. Scores less than one validation answer apart are a tie, won by the smaller rate (for the option,
by its default). The choice goes to a YAML file that ``petmix compare --tuned`` and ``petmix train --tuned``
read; the file records the command, the split and every candidate's validation score.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from petmix.data.task import Task, cap, split_off
from petmix.errors import PetmixError
from petmix.methods import get_method
from petmix.parallel import Run, WorkerPool
from petmix.runs import read_json
from petmix.train import TrainConfig, Trainer, finished_run, run_settings_diff

log = logging.getLogger(__name__)

# Learning-rate grids (log-spaced, about x3 apart) by what trains (``Method.lr_kind``).
LR_GRIDS: dict[str, list[float]] = {
    "prompt": [3e-3, 1e-2, 3e-2, 1e-1],  # raw soft prompts
    "prompt-attention": [3e-3, 1e-2, 3e-2, 1e-1],  # ATTEMPT: a raw prompt and its attention G at one rate
    "prompt-deep": [1e-3, 3e-3, 1e-2, 3e-2],  # a raw prompt at every layer (P-tuning v2 picked 3e-3 of 3e-3..1e-1)
    "prompt-encoder": [1e-4, 3e-4, 1e-3, 3e-3],  # prompts behind an MLP/LSTM (P-tuning, prefix tuning)
    "lora": [3e-4, 1e-3, 3e-3],  # LoRA, BitFit, routers
    "full": [1e-5, 3e-5, 1e-4],  # backbone weights
}

# A rate chosen at an end of its grid is no choice: tune steps past that end (the grid's 1-3-10 ladder)
# this many times at most, until the best rate has a tried neighbour on both sides.
EDGE_STEPS = 2

# ``--converge``: coordinate passes (the option, then the rate, each moved while a neighbour wins) at most.
MAX_PASSES = 3

# A method's single most sensitive option and its grid are its own (``Method.tuned_option``); a prompt
# method without one tunes its prompt length, unless source prompts fix it.
PROMPT_LENGTHS = [5, 10, 20]


def lr_grid(method: str, cfg: TrainConfig) -> list[float]:
    """The grid of what trains (``Method.lr_kind``: the same kinds as the default rates)."""
    return LR_GRIDS[get_method(method).lr_kind(cfg.prompt_encoder, cfg.prompt_depth)]


def past_edge(lrs: list[float], best: float) -> tuple[float, float] | None:
    """Where ``best`` is an end of the grid: its inner neighbour, and the rate one step beyond it (ten
    times the neighbour: 3e-1 past 1e-1 after 3e-2; 1e-3 below 3e-3 before 1e-2). None inside the grid."""
    inner = _inner_neighbour(lrs, best)
    if inner is None:
        return None
    return inner, float(f"{inner * 10 if best > inner else inner / 10:.3g}")


def _inner_neighbour(values: list[Any], best: Any) -> Any | None:
    """The neighbour of ``best`` where ``best`` is an end of ``values``; None inside them (or too few)."""
    grid = sorted(values)
    if len(grid) < 2 or grid[0] < best < grid[-1]:
        return None
    return grid[-2] if best == grid[-1] else grid[1]


def option_past_edge(values: list[Any], best: Any) -> tuple[Any, Any] | None:
    """``past_edge`` for an option's values, on their own ratio (LwF's alpha 0.01 of 0.01/0.1/1: 0.001;
    prompt length 20 of 5/10/20: 40; 5: 2). Whole numbers stay whole, and at least 1. None inside the
    values, or where no new value lies beyond."""
    inner = _inner_neighbour(values, best)
    if inner is None or not min(values) > 0:
        return None
    beyond = best * best / inner
    if all(isinstance(v, int) for v in values):
        beyond = max(1, round(beyond))
        return None if beyond == best else (inner, beyond)
    return inner, float(f"{beyond:.3g}")


def option_grid(method: str) -> tuple[str, list[Any]] | None:
    """The option tuned after the learning rate, or None (LoRA-only and similar methods)."""
    m = get_method(method)
    if m.tuned_option is not None:
        return m.tuned_option[0], list(m.tuned_option[1])
    if m.block == "prompt" and not m.needs_sources:
        return "prompt_length", list(PROMPT_LENGTHS)
    return None


def typed_options(opt: tuple[str, list[Any]], given: list[float]) -> list[Any]:
    """``--option-grid`` values (read as numbers) in the type of the option's own grid: whole numbers
    for an integer option such as prompt_length (5.0 would fail the run's config check)."""
    name, grid = opt
    if not all(isinstance(v, int) for v in grid):
        return list(given)
    if any(float(v) != int(v) for v in given):
        raise PetmixError(f"--option-grid: {name} takes whole numbers, not {','.join(f'{v:g}' for v in given)}")
    return [int(v) for v in given]


def answer_resolution(tasks: list[Task]) -> float:
    """The most one validation answer can move the AP: 100 points of the smallest task, over the tasks."""
    return 100 / (len(tasks) * min(max(len(t.test), 1) for t in tasks))


def validation_tasks(tasks: list[Task], fraction: float, seed: int, max_val: int | None,
                     max_train: int | None) -> list[Task]:
    """Copies of ``tasks`` whose test split is a seeded part of their train split and whose train is the
    rest (capped at ``max_train`` afterwards, so a run trains on as many examples as in ``compare``).
    The original test split is not read."""
    out = []
    for t in tasks:
        rest, val = split_off(t.train, fraction, seed, max_val)
        if not val or not rest:
            raise PetmixError(f"task {t.name}: {len(t.train)} training examples are too few to carve a validation split")
        note = (f"tuning: test = validation split carved from train ({len(val)} examples, seed {seed}); "
                "the real test split is not used")
        out.append(dataclasses.replace(t, train=cap(rest, max_train, seed), test=val, notes=[*t.notes, note]))
    return out


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _name(settings: dict[str, Any]) -> str:
    """A candidate's folder: its settings, e.g. ``lr-0.003-kl_ratio-0.5``."""
    return "-".join(f"{k}-{_fmt(v)}" for k, v in settings.items())


def _said(settings: dict[str, Any]) -> str:
    """A candidate's settings in a note or table, e.g. ``lr 0.003, kl_ratio 0.5``."""
    return ", ".join(f"{k} {_fmt(v)}" for k, v in settings.items())


INERT_LOSS = 1e-6  # a stage's recorded mean of the term (6 decimals): at or below it, the term moved nothing


def _inert_option(method: str, run: Path) -> str | None:
    """Why no value of ``method``'s tuned option can change ``run`` (trained at the option's default), or
    None. The option multiplies a loss term; if that term was ~0 in every stage where it was added, the
    run trained as without it, and any other multiplier of ~0 trains it the same way again."""
    key = get_method(method).tuned_option_loss
    stages = read_json(run / "stages.json") if key and (run / "stages.json").is_file() else []
    values = [s[key] for s in stages if isinstance(s, dict) and s.get(key) is not None]
    if not values or max(abs(float(v)) for v in values) > INERT_LOSS:
        return None
    return (f"the term it multiplies ({key}) was at most {INERT_LOSS:g} in every stage at the chosen rate, so "
            "every value trains the same run (SAPT on two tasks: the prototype router is one-hot there)")


def check_kept_candidates(method: str, base: dict[str, Any], tasks: list[Task], out: str | Path) -> None:
    """Refuse, before anything trains, a finished candidate under ``out/<method>`` (from an earlier run
    or an archive) whose settings differ from these in more than what the search varies."""
    cfg = TrainConfig.from_dict({**base, "method": method}, f"tune {method}")
    searched = {"lr", *([option_grid(method)[0]] if option_grid(method) else [])}
    for results in sorted((Path(out) / method).glob("*/results.json")):
        if not finished_run(results.parent, method, len(tasks)):
            continue
        diff = [k for k in run_settings_diff(results.parent, cfg, [t.name for t in tasks]) if k not in searched]
        if diff:
            raise PetmixError(f"{results.parent} holds a finished candidate with other settings ({', '.join(diff)}); "
                              "use a new --out or the same settings")


def tune_method(method: str, base: dict[str, Any], tasks: list[Task], out: str | Path, *,
                lrs: list[float] | None = None, options: list[Any] | None = None,
                workers: WorkerPool | None = None, converge: bool = False) -> dict[str, Any]:
    """Search ``method``'s learning rate, then its option, on ``tasks`` (already validation tasks: see
    ``validation_tasks``); each candidate trains into ``out/<method>/<candidate>`` (finished ones are
    read). The method's own grid grows past an end that wins (``EDGE_STEPS``); a given ``lrs`` is kept as
    it is. With ``workers``, each round's candidates (the rates, then the option's values) train in those
    worker processes, at once (``petmix.parallel``); else one by one in this process. ``converge`` goes on
    after that one pass: the option, then the rate, each moves to a neighbouring value while one scores
    more than one answer better (the option's values grow past a winning end too), until a pass moves
    neither (``MAX_PASSES`` at most). Returns ``{"settings": {...}, "score": ..., "candidates": [...],
    "grid": {...}}``."""
    out = Path(out) / method
    cfg0 = TrainConfig.from_dict({**base, "method": method}, f"tune {method}")
    extend = not lrs
    lrs = list(lrs or lr_grid(method, cfg0))
    opt = option_grid(method)
    if opt is not None and options:
        opt = (opt[0], typed_options(opt, options))
    candidates: list[dict[str, Any]] = []

    def candidate(settings: dict[str, Any]) -> tuple[TrainConfig, Path]:
        name = _name(settings)
        return TrainConfig.from_dict({**base, "method": method, **settings}, f"tune {method} {name}"), out / name

    def train_together(grid: list[dict[str, Any]]) -> None:
        """With ``workers``: the round's unfinished candidates trained there, at once; ``score`` then
        reads them. A candidate that failed stops this method's search with its error."""
        if workers is None:
            return
        todo = [Run(cfg, tasks, run, f"tune {method} {_name(s)}") for s in grid for cfg, run in [candidate(s)]
                if not any(c["settings"] == s for c in candidates) and not finished_run(run, method, len(tasks))]
        for run, (_, error) in zip(todo, workers.train(todo)):
            if error:
                raise PetmixError(f"{run.tag}: training failed: {error}")

    def score(settings: dict[str, Any]) -> float:
        for c in candidates:
            if c["settings"] == settings:
                return c["score"]
        cfg, run = candidate(settings)
        done = finished_run(run, method, len(tasks))
        if done:  # a candidate finished earlier (or kept in an archive) must have these settings
            diff = run_settings_diff(run, cfg, [t.name for t in tasks])
            if diff:
                raise PetmixError(f"{run} holds a finished candidate with other settings ({', '.join(diff)}); "
                                  "use a new --out or the same settings")
        results = read_json(run / "results.json") if done else Trainer(cfg, tasks, run).run()
        value = results["metrics"]["AP"]
        value = -math.inf if value is None else float(value)
        log.info("tune %s %s: validation AP %.2f", method, run.name, value)
        candidates.append({"settings": dict(settings), "score": round(value, 4), "run": str(run)})
        return value

    # Scores less than one validation answer apart (in the smallest task) cannot be told apart: they tie,
    # and a tie goes to the first in grid order (the smaller rate; for an option, the default).
    resolution = answer_resolution(tasks)

    def best_of(grid: list[dict[str, Any]], searched: str) -> tuple[dict[str, Any], str | None]:
        """The first candidate within one answer of the best, and a note where that overturned a lead."""
        train_together(grid)
        scores = [score(s) for s in grid]
        top = max(scores)
        first = next((i for i, v in enumerate(scores) if v > top - resolution), 0)  # all -inf: the first
        if scores[first] == top:
            return grid[first], None
        return grid[first], (f"{searched}: {_fmt(grid[first][searched])} ({scores[first]:.2f}) chosen over "
                             f"{_fmt(grid[scores.index(top)][searched])} ({top:.2f}): less than one validation "
                             f"answer apart ({resolution:.2f} AP) is a tie, and a tie goes to the first in grid order")

    def line_search(point: dict[str, Any], key: str, ladder: list[Any], grow: bool) -> tuple[dict[str, Any], list[Any]]:
        """Move ``point`` along ``key`` to the neighbour on ``ladder`` that scores more than one answer better
        (the point itself first: a tie stays), until none does; with ``grow``, the ladder grows past a
        winning end as the first pass's rates do (``EDGE_STEPS`` times at most)."""
        ladder, grown = sorted(ladder), 0
        while True:
            i = ladder.index(point[key])
            moved, _ = best_of([point, *({**point, key: ladder[j]} for j in (i - 1, i + 1) if 0 <= j < len(ladder))], key)
            if moved != point:
                point = moved
                continue
            edge = (past_edge if key == "lr" else option_past_edge)(ladder, point[key]) if grow else None
            if grown >= EDGE_STEPS or edge is None or score({**point, key: edge[0]}) > score(point) - resolution:
                return point, ladder
            log.info("tune %s: %s %s is at the end of its values; trying %s too", method, key, _fmt(point[key]),
                     _fmt(edge[1]))
            ladder, grown = sorted([*ladder, edge[1]]), grown + 1

    def coordinate_passes(point: dict[str, Any], lrs: list[float], values: list[Any]) -> tuple[
            dict[str, Any], list[float], list[Any], str | None]:
        """``converge``: the option, then the rate, line-searched from ``point`` until a pass moves neither."""
        key, start = opt[0], dict(point)
        passes, moving = 0, True
        while moving and passes < MAX_PASSES:
            before, passes = dict(point), passes + 1
            point, values = line_search(point, key, values, grow=not options)  # a given --option-grid stays as given
            point, lrs = line_search(point, "lr", lrs, grow=extend)
            moving = point != before
        if point == start:  # said all the same: the record shows the first pass's choice was checked
            return point, lrs, values, (f"converge: the first pass's {_said(point)} ({score(point):.2f}) stands; "
                                        f"{passes} further pass moved nothing")
        stop = f"stopped at {MAX_PASSES} passes, still moving" if moving else f"the last of {passes} further passes moved nothing"
        return point, lrs, values, (f"converge: {_said(point)} ({score(point):.2f}) over the first pass's "
                                    f"{_said(start)} ({score(start):.2f}); {stop}")

    values: list[Any] = []  # the option's values searched (grown by converge)
    default_opt = {} if opt is None else {opt[0]: getattr(cfg0, opt[0])}
    chosen, tie = best_of([{"lr": lr, **default_opt} for lr in lrs], "lr")
    for _ in range(EDGE_STEPS if extend else 0):
        edge = past_edge(lrs, chosen["lr"])
        if edge is None or score({"lr": edge[0], **default_opt}) > score(chosen) - resolution:
            break  # inside the grid, or an end that only ties its neighbour (all 0, say): no direction to go
        log.info("tune %s: lr %g is at the end of the grid; trying %s too", method, chosen["lr"], _fmt(edge[1]))
        lrs = sorted([*lrs, edge[1]])
        chosen, tie = best_of([{"lr": lr, **default_opt} for lr in lrs], "lr")
    notes = [tie] if tie else []
    inert = _inert_option(method, out / _name(chosen)) if opt is not None else None
    if inert:
        notes.append(f"{opt[0]}: not searched: {inert}; the default {_fmt(default_opt[opt[0]])} is kept")
    elif opt is not None:
        key, default = opt[0], default_opt[opt[0]]
        values = [default, *sorted(set(opt[1]) - {default})]  # the default first: another value must beat it
        chosen, tie = best_of([{**chosen, key: v} for v in values], key)
        tried = [score({**chosen, key: v}) for v in values]
        if len(values) > 1 and len(set(tried)) == 1:  # e.g. SAPT's kl_ratio on two tasks, where the router is already one-hot
            notes.append(f"{key}: every value scored the same ({tried[0]:.2f}), so it had no measurable effect "
                         f"on these tasks; the default {_fmt(default)} is kept")
        elif tie:
            notes.append(tie)
        if converge:
            chosen, lrs, values, note = coordinate_passes(chosen, lrs, values)
            notes += [note] if note else []
    for note in notes:
        log.info("tune %s: %s", method, note)
    best = next(c for c in candidates if c["settings"] == chosen)
    # A prompt length given to a prompt method whose search is another option (SAPT-Prompt: its kl ratio)
    # is part of what was scored: it goes with the choice, or `compare --tuned` and `train --tuned` would
    # run the method's own length and pass this score off as that length's.
    if "prompt_length" in base and "prompt_length" not in chosen and get_method(method).block == "prompt":
        chosen = {**chosen, "prompt_length": base["prompt_length"]}
    return {"settings": chosen, "score": best["score"], "resolution": round(resolution, 4), "candidates": candidates,
            "grid": {"lr": lrs, **({opt[0]: sorted({*opt[1], default_opt[opt[0]], *values})} if opt else {})},
            **({"notes": notes} if notes else {})}


def read_tuned(path: str | Path) -> dict[str, dict[str, Any]]:
    """method -> settings from a file ``petmix tune`` wrote."""
    path = Path(path)
    if not path.is_file():
        raise PetmixError(f"{path}: tuned-settings file not found (write one with `petmix tune`)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise PetmixError(f"{path}: malformed YAML ({err})") from err
    methods = data.get("methods") if isinstance(data, dict) else None
    if not isinstance(methods, dict):
        raise PetmixError(f"{path}: expected a 'methods:' mapping (method -> settings)")
    out = {}
    for name, entry in methods.items():
        settings = entry.get("settings") if isinstance(entry, dict) else None
        if not isinstance(settings, dict):
            raise PetmixError(f"{path}: method {name}: expected 'settings:' (e.g. lr)")
        out[str(name)] = dict(settings)
    return out


def write_tuned(path: str | Path, method: str, result: dict[str, Any], record: dict[str, Any]) -> None:
    """Add (or replace) ``method``'s choice in the YAML file, keeping the other methods' entries."""
    path = Path(path)
    data: dict[str, Any] = {}
    if path.is_file():
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")  # newest wins a merge
    data.setdefault("methods", {})[method] = {**result, **record, "tuned_at": stamp}
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Settings chosen by `petmix tune` on validation splits carved from train (never test).\n"
              "# Read by `petmix compare --tuned FILE` and `petmix train --tuned FILE`.\n")
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (``argv`` without the program name; default: this process's)."""
    return "petmix " + shlex.join(sys.argv[1:] if argv is None else argv)


def tuned_table(path: str | Path) -> str:
    """The file's choices as a markdown table: method, learning rate, option, validation AP, grid."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    lines = ["| method | lr | option | validation AP | candidates (settings: AP) |", "|---|---|---|---|---|"]
    for name, entry in (data.get("methods") or {}).items():
        settings = dict(entry.get("settings") or {})
        lr = settings.pop("lr", None)
        option = ", ".join(f"{k}={_fmt(v)}" for k, v in settings.items()) or "-"
        tried = "; ".join(f"{_said(c['settings'])}: {c['score']:.1f}" for c in entry.get("candidates") or [])
        lines.append(f"| {name} | {_fmt(lr)} | {option} | {entry.get('score', float('nan')):.2f} | {tried} |")
    notes = [f"- {name}: {note}" for name, entry in (data.get("methods") or {}).items() for note in entry.get("notes") or []]
    return "\n".join(lines + ([""] + notes if notes else []))
