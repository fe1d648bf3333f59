"""python -m minillm.search: trials as subprocesses, pruning, resuming a killed search, the
samplers, the report, bad input, and one real finetune.py search on tiny data.

Most searches run a tiny fake training script (FAKE below): it scores itself by a known formula
of its flags, writes metrics.jsonl rows and summary.json as the real scripts do, and logs every
invocation, so a test can count what ran."""
import itertools
import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

pytest.importorskip("optuna")

from minillm import search  # noqa: E402
from test_finetune import QUICK, bert_dir, data  # noqa: E402,F401  (finetune.py's tiny model and data)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}

# --plan good,bad,...: the n-th invocation's intermediate values are good (the formula) or 1 lower.
# --fail-at 0,3: those invocations exit 3. Each row (after --row-seconds, 5x for a bad one) holds
# eval_accuracy.
FAKE = r'''
import argparse, json, math, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--dropout", type=float, default=0.0)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--row-seconds", type=float, default=0.0)
p.add_argument("--plan", default="")
p.add_argument("--fail-at", default="")
p.add_argument("--log", required=True)
p.add_argument("--time-budget", type=float, required=True)
p.add_argument("--eval-interval", type=int, default=1)
p.add_argument("--out", required=True)
p.add_argument("--no-progress", action="store_true")
a = p.parse_args()
with open(a.log, "a") as f:
    f.write(json.dumps({"out": os.path.basename(a.out), "lr": a.lr, "dropout": a.dropout, "argv": sys.argv[1:]}) + "\n")
with open(a.log) as f:
    n = len(f.readlines()) - 1
if str(n) in a.fail_at.split(","):
    print("boom: invocation", n, file=sys.stderr)
    sys.exit(3)
bad = a.plan and a.plan.split(",")[n] == "bad"
final = 1 - (math.log10(a.lr) + 3.5) ** 2 - a.dropout - (1 if bad else 0)
try:
    for step in range(1, a.steps + 1):
        time.sleep(a.row_seconds * (5 if bad else 1))  # a bad run would last long: the pruner has time to see it
        with open(os.path.join(a.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "train_loss": 1 / step, "eval_accuracy": final + step / 1000}) + "\n")
except KeyboardInterrupt:
    with open(a.log + ".interrupted", "a") as f:
        f.write(os.path.basename(a.out) + "\n")
    sys.exit(130)
with open(os.path.join(a.out, "summary.json"), "w") as f:
    json.dump({"eval_accuracy": final + a.steps / 1000, "steps": a.steps}, f)
'''

LR = {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}
DROPOUT = {"type": "categorical", "choices": [0.0, 0.1]}


def fake_score(lr, dropout, steps=3):
    return 1 - (math.log10(lr) + 3.5) ** 2 - dropout + steps / 1000


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(FAKE)
    return {"script": str(path), "log": str(tmp_path / "calls.jsonl"), "dir": tmp_path}


def write_space(tmp_path, space, name="space.json"):
    path = tmp_path / name
    path.write_text(space if isinstance(space, str) else json.dumps(space))
    return str(path)


def search_args(fake, study, *flags, space=None, trials=3, script_flags=()):
    space_path = write_space(fake["dir"], space or {"lr": LR, "dropout": DROPOUT})
    return ["--space", space_path, "--trials", str(trials), "--trial-budget", "5", "--metric", "eval_accuracy",
            "--study", str(study), *flags, "--", fake["script"], "--log", fake["log"], *script_flags]


def run(fake, study, *flags, **kw):
    assert search.main(search_args(fake, study, *flags, **kw)) == 0
    return read_trials(study)


def read_trials(study):
    with open(os.path.join(study, "trials.json")) as f:
        return json.load(f)


def invocations(fake):
    with open(fake["log"]) as f:
        return [json.loads(line) for line in f]


def states(report):
    return [t["state"] for t in report["trials"]]


def db_states(study):
    """{trial number: state} in the study's database; {} before the search has made its tables."""
    try:  # read-only: never creates the file
        with sqlite3.connect(f"file:{os.path.join(study, 'study.db')}?mode=ro", uri=True, timeout=10) as db:
            return dict(db.execute("SELECT number, state FROM trials"))
    except sqlite3.OperationalError:
        return {}


# ---------------------------------------------------------------------------------------------
# resuming, pruning


def test_resume_after_kill_never_reruns_a_finished_trial(tmp_path, fake):
    study = str(tmp_path / "study")
    slow = ["--steps", "6", "--row-seconds", "0.1"]
    args = search_args(fake, study, trials=4, script_flags=slow)
    proc = subprocess.Popen([sys.executable, "-m", "minillm.search", *args], cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # two trials done and a third one's process started
            time.sleep(0.1)
            found = db_states(study)
            started = len(invocations(fake)) if os.path.exists(fake["log"]) else 0
            if list(found.values()).count("COMPLETE") >= 2 and "RUNNING" in found.values() and started == len(found):
                break
        else:
            pytest.fail(f"the search did not get going: {found}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the search and its running trial, as a crash would
        proc.wait()
    killed = [n for n, s in db_states(study).items() if s == "RUNNING"]
    assert len(killed) == 1

    report = run(fake, study, "--resume", trials=4, script_flags=slow)
    by_number = {t["number"]: t for t in report["trials"]}
    assert by_number[killed[0]]["state"] == "FAIL"
    done = [t for t in report["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(done) == 4 and killed[0] not in [t["number"] for t in done]
    calls = invocations(fake)
    for t in report["trials"]:  # every trial ran once, in its own folder, never again
        assert [c["out"] for c in calls].count(f"trial-{t['number']:03d}") == 1
    for t in done:
        assert sum(c["lr"] == t["params"]["lr"] and c["dropout"] == t["params"]["dropout"] for c in calls) == 1


def test_median_pruner_stops_trials_worse_than_the_median(tmp_path, fake, monkeypatch, capsys):
    monkeypatch.setattr(search, "POLL_SECONDS", 0.1)
    study = tmp_path / "study"
    report = run(fake, study, "--sampler", "random", "--pruner", "median", trials=6,
                 space={"lr": {"type": "categorical", "choices": [3e-4]}},
                 script_flags=["--steps", "6", "--row-seconds", "0.1", "--plan", "good,good,good,bad,good,bad"])
    assert states(report) == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    for t in report["trials"]:
        rows = open(os.path.join(t["out"], "metrics.jsonl")).read().splitlines()
        if t["state"] == "PRUNED":  # stopped at its first evaluation, by Ctrl-C, before it finished
            assert t["pruned_step"] == 1 and t["value"] is None and len(rows) < 6
            assert not os.path.exists(os.path.join(t["out"], "summary.json"))
        else:
            assert len(rows) == 6 and t["value"] == pytest.approx(fake_score(3e-4, 0.0, 6))
            assert list(t["intermediate"]) == [str(s) for s in range(1, 7)]
    with open(fake["log"] + ".interrupted") as f:
        assert f.read().split() == ["trial-003", "trial-005"]
    assert "trial 3: pruned at step 1" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# samplers


def test_grid_covers_every_point_once_even_after_a_failure(tmp_path, fake, capsys):
    grid = {"lr": {**LR, "grid": [1e-4, 3e-4, 1e-3]}, "dropout": DROPOUT}
    report = run(fake, tmp_path / "study", "--sampler", "grid", "--parallel", "2", trials=10, space=grid,
                 script_flags=["--fail-at", "1"])
    assert "grid has 6 points; --trials 10 lowered to 6" in capsys.readouterr().out
    done = sorted((t["params"]["lr"], t["params"]["dropout"]) for t in report["trials"] if t["state"] == "COMPLETE")
    assert done == sorted(itertools.product([1e-4, 3e-4, 1e-3], [0.0, 0.1]))
    failed = [t for t in report["trials"] if t["state"] == "FAIL"]
    assert failed and len(report["trials"]) == 6 + len(failed)  # the failed point ran again, nothing else did
    for t in report["trials"]:
        want = None if t["state"] == "FAIL" else pytest.approx(fake_score(t["params"]["lr"], t["params"]["dropout"]))
        assert t["value"] == want


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_seeded_samplers_repeat_their_params(tmp_path, fake, sampler, monkeypatch):
    monkeypatch.setattr(search, "write_plots", lambda *args: ([], []))  # not what this test is about; slow

    def params(name, seed):  # tpe: the second trial is TPE's (min(5, trials // 2) random trials first)
        report = run(fake, tmp_path / name, "--sampler", sampler, "--seed", str(seed), "--pruner", "none", trials=2)
        return [t["params"] for t in report["trials"]]

    first = params("a", 7)
    assert params("b", 7) == first
    assert params("c", 8) != first
    assert len({p["lr"] for p in first}) == 2


# ---------------------------------------------------------------------------------------------
# the report


def test_report_best_command_trials_json_and_plots(tmp_path, fake, capsys):
    study = tmp_path / "study"
    report = run(fake, study, "--sampler", "random", "--pruner", "none", "--eval-every", "2", trials=4,
                 script_flags=["--steps", "4"])
    out = capsys.readouterr().out
    values = {t["number"]: t["value"] for t in report["trials"]}
    best = max(values, key=values.get)
    assert report["best"]["number"] == best and report["best"]["value"] == values[best]
    t = report["trials"][best]
    assert t["value"] == pytest.approx(fake_score(t["params"]["lr"], t["params"]["dropout"], 4))
    command = report["best"]["command"]
    assert command.startswith(f"python {fake['script']} --log {fake['log']} --steps 4 ")
    assert f"--lr {t['params']['lr']!r} --dropout {t['params']['dropout']!r}" in command
    assert command.endswith("--time-budget 5.0 --eval-interval 2 --out out/best") and f"run it: {command}" in out
    for c in invocations(fake):  # --eval-every reached the script; the search owns --out
        assert c["argv"][c["argv"].index("--eval-interval") + 1] == "2"
        assert c["argv"][c["argv"].index("--out") + 1] == os.path.join(str(study), c["out"])
    assert "| trial | state | lr | dropout | eval_accuracy | seconds | pruned at step |" in out
    assert f"| {best} | COMPLETE | {t['params']['lr']:.4g} |" in out
    assert os.path.getsize(study / "history.png") > 1000 and os.path.getsize(study / "importance.png") > 1000


def test_importance_skipped_with_one_completed_trial(tmp_path, fake, capsys):
    study = tmp_path / "study"
    report = run(fake, study, trials=1)
    assert states(report) == ["COMPLETE"] and report["best"]["number"] == 0
    assert os.path.exists(study / "history.png") and not os.path.exists(study / "importance.png")
    assert "importance.png skipped" in capsys.readouterr().out


def test_metrics_rows_cut_short_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "eval_accuracy": 0.5}\n{"step": 2, "train_loss": 1.0}\n[1]\n'
                    '{"step": "3", "eval_accuracy": 0.7}\n{"step": 4, "eval_accuracy": 0.9}\n{"step": 5, "eval_acc')
    assert search.evaluations(str(path), "eval_accuracy") == {1: 0.5, 4: 0.9}
    assert search.evaluations(str(tmp_path / "missing.jsonl"), "eval_accuracy") == {}


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the problem, exit code 2


@pytest.mark.parametrize("space, message", [
    ('{"lr": ', "not valid JSON"),
    ('[]', "expected a JSON object of parameters"),
    ({"lr": {"type": "floaty", "low": 0, "high": 1}}, "lr: unknown type 'floaty'"),
    ({"lr": {"type": "float", "low": 1e-3, "high": 1e-4}}, "lr: low (0.001) must be below high (0.0001)"),
    ({"lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, "lr: log needs low > 0"),
    ({"lr": {"type": "float", "low": 0.0, "hgih": 1e-3}}, "lr: unknown key(s) hgih"),
    ({"warmup_steps": {"type": "int", "low": 0.5, "high": 10}}, "warmup_steps: needs low and high, integers"),
    ({"dropout": {"type": "categorical", "choices": []}}, "dropout: categorical needs a non-empty list"),
    ({"lr": {"type": "float", "low": 1e-4, "high": 1e-3, "grid": [1e-2]}}, "lr: grid must be a non-empty list"),
    ({"warmup-steps": DROPOUT, "warmup_steps": DROPOUT}, "--warmup-steps is given twice"),
])
def test_bad_space_files(tmp_path, fake, space, message):
    path = write_space(tmp_path, space, "bad.json")
    args = search_args(fake, tmp_path / "study")
    args[args.index("--space") + 1] = path
    with pytest.raises(ValueError) as e:
        search.main(args)
    assert str(e.value).startswith(f"--space {path}: ") and message in str(e.value)
    assert not os.path.exists(tmp_path / "study")


def test_missing_space_file_exits_2_with_one_line(tmp_path, fake):
    args = search_args(fake, tmp_path / "study")
    args[args.index("--space") + 1] = str(tmp_path / "nope.json")
    proc = subprocess.run([sys.executable, "-m", "minillm.search", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    want = f"minillm.search: error: --space {tmp_path / 'nope.json'}: no such file"
    assert proc.stderr.strip().splitlines() == [want]


@pytest.mark.parametrize("flags, sampler, message", [
    (["--out", "x"], "tpe", "--out in the command after --: the search owns it"),
    (["--time-budget=9"], "tpe", "--time-budget in the command after --"),
    (["--lr", "1e-3"], "tpe", "--lr is both in the command after -- and in --space"),
    ([], "grid", 'lr need(s) a "grid": [values] list'),
])
def test_bad_commands(tmp_path, fake, flags, sampler, message):
    with pytest.raises(ValueError) as e:
        search.main(search_args(fake, tmp_path / "study", "--sampler", sampler, script_flags=flags))
    assert message in str(e.value)
    assert not os.path.exists(fake["log"])  # refused before any trial ran


def test_without_optuna_the_module_imports_and_main_says_what_to_install(tmp_path, fake, monkeypatch):
    import minillm

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    monkeypatch.delitem(sys.modules, "minillm.search")
    monkeypatch.setattr(minillm, "search", search)  # put back afterwards, with sys.modules
    import minillm.search as fresh

    assert fresh is not search

    with pytest.raises(ValueError, match=re.escape("minillm.search needs optuna: pip install 'minillm[search]'")):
        fresh.main(search_args(fake, tmp_path / "study"))
    assert not os.path.exists(tmp_path / "study")


def test_missing_script_and_missing_command(tmp_path, fake):
    args = search_args(fake, tmp_path / "study")
    with pytest.raises(ValueError, match="give the training command after --"):
        search.main(args[:args.index("--")])
    args[args.index("--") + 1] = str(tmp_path / "nope.py")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'nope.py'}: no such script")):
        search.main(args)
    with pytest.raises(ValueError, match="--metric: no default for fake.py"):
        search.main([a for a in search_args(fake, tmp_path / "study") if a != "eval_accuracy" and a != "--metric"])


def test_study_folder_fresh_resume_and_a_changed_command(tmp_path, fake):
    study = tmp_path / "study"
    with pytest.raises(ValueError, match=re.escape(f"--resume: {study} holds no study.db")):
        search.main(search_args(fake, study, "--resume", trials=1))
    run(fake, study, trials=1)
    with pytest.raises(ValueError, match=re.escape(f"--study {study} already holds a search (study.db); pass")):
        search.main(search_args(fake, study, trials=1))
    with pytest.raises(ValueError) as e:
        search.main(search_args(fake, study, "--resume", trials=2, script_flags=["--steps", "5"]))
    assert str(e.value) == (f"--resume: the command differs from the search in {study}: "
                            f"script flags --log {fake['log']} --steps 5 (study: --log {fake['log']})")
    assert len(invocations(fake)) == 1
    report = run(fake, study, "--resume", trials=2)  # the same command continues
    assert states(report) == ["COMPLETE", "COMPLETE"] and len(invocations(fake)) == 2


def test_every_trial_failing_is_an_error(tmp_path, fake, capsys):
    with pytest.raises(ValueError, match="every trial failed"):
        search.main(search_args(fake, tmp_path / "study", trials=2, script_flags=["--fail-at", "0,1,2,3"]))
    out = capsys.readouterr().out
    assert "trial 0: failed (exit code 3)" in out and "boom: invocation 0" in out
    assert len(invocations(fake)) == 2  # no retrying a command that never works


def test_failures_are_retried_up_to_twice_the_trials(tmp_path, fake, capsys):
    grid = {"lr": {**LR, "grid": [1e-4, 1e-3]}}  # a grid point that always fails is queued again, within limits
    report = run(fake, tmp_path / "study", "--sampler", "grid", trials=2, space=grid,
                 script_flags=["--fail-at", "1,2,3,4,5,6"])
    assert states(report) == ["COMPLETE", "FAIL", "FAIL", "FAIL"] and len(invocations(fake)) == 4
    assert len({t["params"]["lr"] for t in report["trials"][1:]}) == 1
    assert "note: stopped with 1 of 2 trials finished" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the real finetune.py


@pytest.mark.slow  # two finetune.py processes: their start (torch) is most of it
def test_real_finetune_search(tmp_path, data, bert_dir):
    study = tmp_path / "study"
    space = write_space(tmp_path, {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    args = ["--space", space, "--trials", "2", "--trial-budget", "2", "--sampler", "random", "--pruner", "none",
            "--eval-every", "2", "--parallel", "2", "--study", str(study), "--",
            os.path.join(ROOT, "finetune.py"), "--init", bert_dir, "--train", data["train"], "--eval", data["eval"],
            *QUICK, "--max-steps", "4"]
    assert search.main(args) == 0
    report = read_trials(study)
    assert states(report) == ["COMPLETE", "COMPLETE"] and report["metric"] == "eval_accuracy"
    for t in report["trials"]:
        with open(os.path.join(t["out"], "summary.json")) as f:
            summary = json.load(f)
        assert t["value"] == summary["eval_accuracy"] and summary["steps"] <= 4
        assert "2" in t["intermediate"]  # the evaluation at step 2 reached the pruner
    assert report["best"]["value"] == max(t["value"] for t in report["trials"])
