"""Hyperparameter search over whole training runs: each trial is one run of train.py or
finetune.py with sampled flags, scored by a number from its summary.json (Optuna, SQLite).

    python -m minillm.search --space space.json --trials 12 --trial-budget 60 --eval-every 100 \\
        --study out/search -- finetune.py --init $MINILM --train train.tsv --eval dev.tsv
    python -m minillm.search --space space.json --trials 12 --trial-budget 60 --study out/search \\
        --resume -- finetune.py --init $MINILM --train train.tsv --eval dev.tsv   # after a crash or Ctrl-C
    python -m minillm.search --space lm.json --trials 8 --trial-budget 120 -- train.py --preset gpt-cpu

space.json names the flags to search (underscore or dash form: warmup_steps is --warmup-steps):

    {"lr": {"type": "float", "low": 1e-5, "high": 3e-4, "log": true},
     "warmup_steps": {"type": "int", "low": 0, "high": 200, "grid": [0, 100, 200]},
     "dropout": {"type": "categorical", "choices": [0.0, 0.1]}}

"grid" (optional) lists the values --sampler grid tries; it needs one on every float and int.

Each trial runs `python <script> <flags after --> <sampled flags> --time-budget <--trial-budget>
--out <study>/trial-NNN --no-progress` (stdout.log and stderr.log beside the run's files), one at
a time, or --parallel K at once (on one machine, give the trials their share of it: a trial
uses all the cores or the GPU it sees). Its score is --metric from summary.json: by default
eval_accuracy, maximised, for finetune.py and val_loss, minimised, for train.py; a metric ending
in loss or ppl is minimised unless --direction says otherwise. A trial that exits with an error
or writes no such number fails; the search goes on without it.

Pruning: while a trial runs, each evaluation row of its metrics.jsonl is reported to the pruner
(--pruner median: stop a trial whose best value so far is worse than the median of the finished
trials at the same step, after 3 finished trials; halving: successive halving; none). A pruned
trial's process gets Ctrl-C (SIGINT; SIGKILL a few seconds later) and counts as finished. Only
rows with the metric can be pruned on: pass --eval-every N (it becomes the script's
--eval-interval) or the run evaluates only at its end and nothing is ever pruned.

The study lives in <study>/study.db. --resume continues it until --trials trials have finished
(pruned ones count, failed ones do not); a trial left running by a search that was killed is
marked failed and never rerun, and no finished trial's folder is touched again. A resumed search
must run the same command (script, flags, space, metric, budget); sampler and pruner may change.
Samplers: tpe (default: random for the first min(5, trials/2) trials, then TPE), random, grid
(every point of the grid once). With a --seed (default 0) tpe and random repeat their draws when
trials run one at a time.

At the end (also of a resumed search): a markdown table of the trials, the best trial's command
line, <study>/trials.json (the table and the best trial, machine-readable), <study>/history.png
and <study>/importance.png (parameter importances: needs 2 completed trials and a parameter that
varied). Needs optuna: pip install 'minillm[search]' (and matplotlib for the plots).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from .cli import finite_float, positive_int, run_main
from .run_dir import lock, write_json_atomic

if TYPE_CHECKING:
    import optuna

STUDY_NAME = "minillm"
DB = "study.db"
POLL_SECONDS = 0.5  # how often a running trial's metrics.jsonl is read
STOP_GRACE_SECONDS = 5.0  # from SIGINT to SIGKILL: long enough for a run to close its files
OWNED_FLAGS = {"--out": "each trial writes to <study>/trial-NNN", "--time-budget": "--trial-budget sets it",
               "--resume": "every trial starts afresh"}
PARAM_KEYS = {"float": {"type", "low", "high", "log", "grid"}, "int": {"type", "low", "high", "log", "grid"},
              "categorical": {"type", "choices"}}
# What a resumed search must share with the study: trials measured otherwise would not compare.
COMPARED = {"script": "script", "flags": "script flags", "space": "--space", "metric": "--metric",
            "direction": "--direction", "trial_budget": "--trial-budget", "eval_every": "--eval-every"}


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise ValueError("minillm.search needs optuna: pip install 'minillm[search]'") from None
    return optuna


# -- the search space -----------------------------------------------------------------------------


def read_space(path: str) -> dict[str, dict]:
    """space.json checked: {param name (underscore form): its spec}. Any problem is a one-line
    ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--space {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--space {path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--space {path}: cannot read it ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f'--space {path}: expected a JSON object of parameters, e.g. '
                         f'{{"lr": {{"type": "float", "low": 1e-5, "high": 1e-3, "log": true}}}}')
    space: dict[str, dict] = {}
    for key, spec in raw.items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise ValueError(f"--space {path}: {key!r} is not a flag name (letters, digits, _ and -)")
        name = key.replace("-", "_")
        if name in space:
            raise ValueError(f"--space {path}: {param_flag(name)} is given twice")
        try:
            space[name] = checked_param(spec)
        except ValueError as e:
            raise ValueError(f"--space {path}: {key}: {e}") from None
    return space


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def checked_param(spec) -> dict:
    """One parameter's spec, or a ValueError saying what is wrong with it."""
    if not isinstance(spec, dict) or spec.get("type") not in PARAM_KEYS:
        kind = spec.get("type") if isinstance(spec, dict) else None
        raise ValueError(f"unknown type {kind!r} (expected float, int or categorical)")
    unknown = sorted(set(spec) - PARAM_KEYS[spec["type"]])
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} for a {spec['type']} parameter")
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ValueError("categorical needs a non-empty list of choices")
        if not all(isinstance(c, (str, bool)) or is_number(c) for c in choices):
            raise ValueError("choices must be numbers, strings or true/false")
        if len(set(map(json.dumps, choices))) != len(choices):
            raise ValueError("choices repeat a value")
        return {"type": "categorical", "choices": choices}
    return checked_range(spec)


def checked_range(spec: dict) -> dict:
    """A float or int parameter: low < high, log only above 0, grid values inside the range."""
    whole = spec["type"] == "int"
    fits = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if whole else is_number
    low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
    if not (fits(low) and fits(high)):
        raise ValueError(f"needs low and high, {'integers' if whole else 'numbers'}")
    if low >= high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if not isinstance(log, bool):
        raise ValueError("log must be true or false")
    if log and low <= 0:
        raise ValueError(f"log needs low > 0, got {low}")
    checked = {"type": spec["type"], "low": low, "high": high, "log": log}
    if "grid" in spec:
        grid = spec["grid"]
        if not isinstance(grid, list) or not grid or not all(fits(v) and low <= v <= high for v in grid):
            raise ValueError(f"grid must be a non-empty list of {'integers' if whole else 'numbers'} "
                             f"from low to high ({low} to {high})")
        checked["grid"] = grid
    return checked


def grid_of(space: dict[str, dict], path: str) -> dict[str, list]:
    """{param: values} for --sampler grid: categorical choices, or a float's or int's "grid"."""
    missing = [n for n, spec in space.items() if spec["type"] != "categorical" and "grid" not in spec]
    if missing:
        raise ValueError(f'--sampler grid: --space {path}: {", ".join(missing)} need(s) a "grid": [values] '
                         f"list (a {space[missing[0]]['type']} range has no finite set of values)")
    return {n: spec["choices"] if spec["type"] == "categorical" else spec["grid"] for n, spec in space.items()}


def grid_points(grid: dict[str, list]) -> list[dict]:
    names = sorted(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def param_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)


def suggest(trial: "optuna.Trial", space: dict[str, dict]) -> dict:
    params = {}
    for name, spec in space.items():
        if spec["type"] == "categorical":
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "float":
            params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"])
        else:
            params[name] = trial.suggest_int(name, spec["low"], spec["high"], log=spec["log"])
    return params


# -- the search: what each trial runs and how it is scored ----------------------------------------


@dataclass
class Search:
    """The search the command line asks for: what each trial runs and how it is scored."""

    script: str
    flags: list[str]  # the user's, after the script
    space: dict[str, dict]
    metric: str
    direction: str
    trial_budget: float
    eval_every: Optional[int]
    folder: str
    grid: Optional[dict[str, list]]  # --sampler grid's values

    def record(self) -> dict:
        """What the study keeps of the command (study user attrs)."""
        return {"script": self.script, "flags": self.flags, "space": self.space, "metric": self.metric,
                "direction": self.direction, "trial_budget": self.trial_budget, "eval_every": self.eval_every}

    def run_flags(self, params: dict) -> list[str]:
        """The flags a run with these params gets besides --out: the user's, the params, the budget."""
        sampled = [x for name, v in params.items() for x in (param_flag(name), flag_value(v))]
        evals = (["--eval-interval", str(self.eval_every)] if self.eval_every and "eval_interval" not in params
                 and not has_flag(self.flags, "--eval-interval") else [])
        return [*self.flags, *sampled, "--time-budget", flag_value(self.trial_budget), *evals]

    def command(self, params: dict, out: str) -> list[str]:
        return [sys.executable, self.script, *self.run_flags(params), "--out", out, "--no-progress"]


def has_flag(flags: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in flags)


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the search's own flags, the training command after the first --)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def plan_search(args: argparse.Namespace, command: list[str]) -> Search:
    """The search the flags describe, checked before anything runs."""
    if not command:
        raise ValueError("give the training command after --, e.g. -- finetune.py --init out/base --train train.tsv "
                         "--eval dev.tsv")
    script, flags = command[0], command[1:]
    if not os.path.isfile(script):
        raise ValueError(f"{script}: no such script (the command after -- starts with train.py or finetune.py)")
    space = read_space(args.space)
    for flag, why in OWNED_FLAGS.items():
        if has_flag(flags, flag):
            raise ValueError(f"{flag} in the command after --: the search owns it ({why}); remove it")
    for name in space:
        if has_flag(flags, param_flag(name)):
            raise ValueError(f"{param_flag(name)} is both in the command after -- and in --space {args.space}; "
                             f"remove one")
    metric = args.metric or default_metric(script)
    direction = args.direction or ("minimize" if metric.endswith(("loss", "ppl")) else "maximize")
    return Search(os.path.normpath(script), flags, space, metric, direction, args.trial_budget, args.eval_every,
                  args.study, grid_of(space, args.space) if args.sampler == "grid" else None)


def default_metric(script: str) -> str:
    name = os.path.basename(script)
    if name == "finetune.py":
        return "eval_accuracy"
    if name == "train.py":
        return "val_loss"
    raise ValueError(f"--metric: no default for {name}; name the summary.json number to optimise")


# -- one trial ------------------------------------------------------------------------------------


class TrialFailed(Exception):
    """The trial's process failed or left no metric: the trial is FAIL and the search goes on."""


def evaluations(path: str, metric: str) -> dict[int, float]:
    """{step: value} of the metric in metrics.jsonl so far (a line cut short mid-write is skipped)."""
    values: dict[int, float] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return values
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and is_number(row.get(metric)):
            values[row["step"]] = float(row[metric])
    return values


def stop(process: subprocess.Popen) -> None:
    """Ctrl-C, which the scripts answer by closing their files and exiting; SIGKILL if they do not."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def watch(process: subprocess.Popen, trial: "optuna.Trial", metrics_path: str, metric: str) -> Optional[int]:
    """Report each new evaluation of a running trial; stop the process as soon as the pruner asks.
    Returns the step it was pruned at, or None once the process has exited by itself (its last
    rows reported too: later trials are compared with them)."""
    reported: set[int] = set()
    while True:
        running = process.poll() is None
        for step, value in sorted(evaluations(metrics_path, metric).items()):
            if step in reported:
                continue
            trial.report(value, step)
            reported.add(step)
            if running and trial.should_prune():
                stop(process)
                return step
        if not running:
            return None
        try:
            process.wait(POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass


def launch(command: list[str], out: str) -> subprocess.Popen:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "stdout.log"), "w") as stdout, open(os.path.join(out, "stderr.log"), "w") as stderr:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)


def last_lines(path: str, n: int = 5) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip() for line in f.readlines()[-n:] if line.strip()]
    except OSError:
        return []


def score(out: str, metric: str, returncode: int) -> float:
    """The metric from the finished run's summary.json; TrialFailed saying why there is none."""
    if returncode != 0:
        raise TrialFailed(f"exit code {returncode}")
    try:
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError):
        raise TrialFailed("no readable summary.json") from None
    value = summary.get(metric) if isinstance(summary, dict) else None
    if not is_number(value):
        numbers = [k for k, v in summary.items() if is_number(v)] if isinstance(summary, dict) else []
        raise TrialFailed(f"summary.json has no number {metric} (it has: {', '.join(numbers) or 'none'})")
    return float(value)


def trial_folder(folder: str, number: int) -> str:
    return os.path.join(folder, f"trial-{number:03d}")


def make_objective(search: Search) -> Callable[["optuna.Trial"], float]:
    """One trial: sample the params, run the script, prune it on its evaluations or score it."""
    import optuna

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, search.space)
        out = trial_folder(search.folder, trial.number)
        shown = " ".join(x for name, v in params.items() for x in (param_flag(name), flag_value(v)))
        print(f"trial {trial.number}: start {shown}", flush=True)
        t0 = time.perf_counter()
        process = launch(search.command(params, out), out)
        try:
            pruned_at = watch(process, trial, os.path.join(out, "metrics.jsonl"), search.metric)
        finally:
            if process.poll() is None:  # Ctrl-C or an error here: the run must not outlive the search
                stop(process)
        seconds = round(time.perf_counter() - t0, 1)
        trial.set_user_attr("seconds", seconds)
        if pruned_at is not None:
            trial.set_user_attr("pruned_step", pruned_at)
            print(f"trial {trial.number}: pruned at step {pruned_at} after {seconds:.0f}s", flush=True)
            raise optuna.TrialPruned(f"pruned at step {pruned_at}")
        try:
            value = score(out, search.metric, process.returncode)
        except TrialFailed as e:
            tail = "".join(f"\n    {line}" for line in last_lines(os.path.join(out, "stderr.log")))
            print(f"trial {trial.number}: failed ({e}) after {seconds:.0f}s; the end of {out}/stderr.log:{tail}",
                  flush=True)
            raise
        print(f"trial {trial.number}: {search.metric} {value:.6g} in {seconds:.0f}s", flush=True)
        return value

    return objective


# -- the study ------------------------------------------------------------------------------------


def make_sampler(sampler: str, search: Search, trials: int, seed: int, parallel: int) -> "optuna.samplers.BaseSampler":
    import optuna

    if sampler == "grid":
        return optuna.samplers.GridSampler(search.grid, seed=seed)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE models the trials so far: give it a few random ones to start from, at most half the search
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, trials // 2)),
                                      constant_liar=parallel > 1)  # running trials count as bad: parallel trials spread


def make_pruner(pruner: str) -> "optuna.pruners.BasePruner":
    import optuna

    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def check_study_folder(folder: str, resume: bool) -> None:
    exists = os.path.exists(os.path.join(folder, DB))
    if exists and not resume:
        raise ValueError(f"--study {folder} already holds a search ({DB}); pass --resume to continue it or choose "
                         f"another --study")
    if resume and not exists:
        raise ValueError(f"--resume: {folder} holds no {DB} to continue")


def refuse_other_command(saved: dict, given: dict, folder: str) -> None:
    def shown(key, v):
        return shlex.join(v) if key == "flags" and isinstance(v, list) else json.dumps(v) if key == "space" else v

    differs = [f"{label} {shown(key, given[key])} (study: {shown(key, saved.get(key))})"
               for key, label in COMPARED.items() if saved.get(key) != given[key]]
    if differs:
        raise ValueError(f"--resume: the command differs from the search in {folder}: {'; '.join(differs)}")


def fail_interrupted(study: "optuna.Study") -> None:
    """Trials an earlier, killed search left RUNNING (the folder's lock says it is gone): FAIL,
    never rerun; their folders may hold half a run."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        print(f"trial {t.number}: left running by a search that was stopped; marked failed")


def open_study(search: Search, args: argparse.Namespace) -> "optuna.Study":
    """The new study, or with --resume the saved one, checked against this command."""
    import optuna

    db = os.path.abspath(os.path.join(search.folder, DB))
    # parallel trials write to one SQLite file: wait for its lock rather than fail
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 60}})
    pruner = make_pruner(args.pruner)
    if not args.resume:
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction=search.direction, pruner=pruner,
                                    sampler=make_sampler(args.sampler, search, args.trials, args.seed, args.parallel))
    else:
        try:
            study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        except KeyError:
            raise ValueError(f"--resume: {db} holds no minillm search") from None
        refuse_other_command(study.user_attrs, search.record(), search.folder)
        fail_interrupted(study)
        # a resumed sampler must not repeat the draws of the first run's seed
        sampler = make_sampler(args.sampler, search, args.trials, args.seed + len(study.trials), args.parallel)
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner)
    for key, value in {**search.record(), "sampler": args.sampler, "pruner": args.pruner}.items():
        study.set_user_attr(key, value)
    return study


def finished(study: "optuna.Study") -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def started(study: "optuna.Study") -> int:
    from optuna.trial import TrialState

    return len([t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING])


def queue_missing_points(study: "optuna.Study", grid: dict[str, list], count: int) -> None:
    """GridSampler counts a failed trial's point as visited and never returns to it: after a
    failure, or in a resumed search, up to `count` points no finished or queued trial holds are
    queued for the next trials."""
    from optuna.trial import TrialState

    held = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING))
    # optuna keeps a queued trial's params in its system attrs until the trial starts
    taken = [t.system_attrs.get("fixed_params", t.params) for t in held]
    for point in [p for p in grid_points(grid) if p not in taken][:count]:
        study.enqueue_trial(point)


def run_trials(study: "optuna.Study", search: Search, target: int, parallel: int) -> None:
    """Start trials until `target` have finished. A failed trial does not count and another takes
    its place, but this run starts at most twice the trials it set out to finish: a command that
    keeps failing ends the search instead of looping. Every trial failing is an error."""
    objective, missing = make_objective(search), target - finished(study)
    starts_left = 2 * missing
    while missing > 0 and starts_left > 0:
        before = started(study)
        if search.grid is not None and before:
            queue_missing_points(study, search.grid, missing)
        study.optimize(objective, n_trials=min(missing, starts_left), n_jobs=parallel, catch=(TrialFailed,))
        starts_left -= started(study) - before
        if finished(study) == 0:
            raise ValueError(f"every trial failed; see the errors above and {search.folder}/trial-*/stderr.log")
        missing = target - finished(study)
    if missing > 0:
        print(f"note: stopped with {target - missing} of {target} trials finished: too many trials failed")


# -- the report -----------------------------------------------------------------------------------


def trial_rows(study: "optuna.Study", search: Search) -> list[dict]:
    from optuna.trial import TrialState

    # a pruned trial's value in optuna is its last intermediate one: not a score to compare
    return [{"number": t.number, "state": t.state.name, "params": t.params,
             "value": t.value if t.state == TrialState.COMPLETE else None,
             "seconds": t.user_attrs.get("seconds"), "pruned_step": t.user_attrs.get("pruned_step"),
             "intermediate": {str(s): v for s, v in sorted(t.intermediate_values.items())},
             "out": trial_folder(search.folder, t.number)}
            for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]


def cell(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_table(rows: list[dict], search: Search) -> str:
    header = ["trial", "state", *search.space, search.metric, "seconds", "pruned at step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["number"], r["state"], *(r["params"].get(n) for n in search.space), r["value"], r["seconds"],
                 r["pruned_step"]]
        lines.append("| " + " | ".join(map(cell, cells)) + " |")
    return "\n".join(lines)


def best_of(study: "optuna.Study", search: Search) -> Optional[dict]:
    """The best finished trial and the command that trains with its params, or None."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    command = ["python", search.script, *search.run_flags(best.params), "--out", "out/best"]
    return {"number": best.number, "params": best.params, "value": best.value, "command": shlex.join(command)}


def save_plot(draw: Callable, path: str) -> None:
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        ax = draw()
    ax.figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(ax.figure)


def write_plots(study: "optuna.Study", search: Search, rows: list[dict]) -> tuple[list[str], list[str]]:
    """history.png and, when it means something, importance.png: (the files written, notes on those not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances
    except ImportError:
        return [], ["plots skipped: matplotlib is not installed"]
    written = [os.path.join(search.folder, "history.png")]
    save_plot(lambda: plot_optimization_history(study, target_name=search.metric), written[0])
    done = [r["params"] for r in rows if r["state"] == "COMPLETE"]
    varied = [n for n in (done[0] if done else {}) if len({json.dumps(p.get(n)) for p in done}) > 1]
    if len(done) < 2 or not varied:
        return written, ["importance.png skipped: it needs 2 completed trials and a parameter that varied"]
    written.append(os.path.join(search.folder, "importance.png"))
    save_plot(lambda: plot_param_importances(study, target_name=search.metric), written[1])
    return written, []


def report(study: "optuna.Study", search: Search) -> None:
    rows = trial_rows(study, search)
    print(markdown_table(rows, search))
    best = best_of(study, search)
    if best is None:
        print("no trial completed: no best trial")
    else:
        print(f"best: trial {best['number']}, {search.metric} {best['value']:.6g}\nrun it: {best['command']}")
    path = os.path.join(search.folder, "trials.json")
    write_json_atomic(path, {"metric": search.metric, "direction": search.direction, "best": best, "trials": rows})
    plots, notes = write_plots(study, search, rows)
    print("wrote " + ", ".join([path, *plots]))
    for note in notes:
        print(note)


# -- main -----------------------------------------------------------------------------------------


def positive_float(v: str) -> float:
    x = finite_float(v)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v!r}")
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minillm.search",
                                usage="python -m minillm.search --space SPACE --trials N --trial-budget S [options] "
                                      "-- SCRIPT [flags]",
                                description="Hyperparameter search over whole runs of train.py or finetune.py "
                                            "(Optuna; the study in <study>/study.db).")
    p.add_argument("--space", required=True, help="JSON file: the flags to search and their ranges")
    p.add_argument("--trials", type=positive_int, required=True,
                   help="trials to finish (pruned ones count; failed ones do not; grid: at most the grid's size)")
    p.add_argument("--trial-budget", type=positive_float, required=True, metavar="S",
                   help="each trial's --time-budget (seconds of training)")
    p.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe", help="(default: tpe)")
    p.add_argument("--pruner", choices=["median", "halving", "none"], default="median",
                   help="stop trials worse than the others at the same step (default: median)")
    p.add_argument("--eval-every", type=positive_int, metavar="N",
                   help="pass --eval-interval N to the script: intermediate evaluations to prune on")
    p.add_argument("--metric", help="the summary.json number to optimise (default: eval_accuracy for finetune.py, "
                                    "val_loss for train.py)")
    p.add_argument("--direction", choices=["maximize", "minimize"],
                   help="(default: minimize for a metric ending in loss or ppl, else maximize)")
    p.add_argument("--study", default="out/search", help="the study's folder (default: out/search)")
    p.add_argument("--resume", action="store_true", help="continue the search in --study")
    p.add_argument("--parallel", type=positive_int, default=1, metavar="K", help="trials at once (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default: 0)")
    return p


def main(argv=None) -> int:
    own, command = split_command(sys.argv[1:] if argv is None else [str(a) for a in argv])
    args = build_parser().parse_args(own)
    search = plan_search(args, command)
    optuna = import_optuna()
    check_study_folder(args.study, args.resume)
    lock(args.study)  # one search at a time in a folder: a RUNNING trial found on --resume is a dead one's
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the trials are logged here, one line each
    study = open_study(search, args)
    target = args.trials
    if search.grid is not None and len(grid_points(search.grid)) < target:
        target = len(grid_points(search.grid))
        print(f"note: the grid has {target} points; --trials {args.trials} lowered to {target}")
    print(f"search: {target} trials ({finished(study)} finished before) of {search.script} ({search.direction} "
          f"{search.metric}), {args.sampler} sampler, {args.pruner} pruner, {args.parallel} at a time, in "
          f"{search.folder}", flush=True)
    run_trials(study, search, target, args.parallel)
    report(study, search)
    return 0


if __name__ == "__main__":
    run_main(main, "minillm.search")
