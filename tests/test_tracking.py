"""--log tensorboard|wandb: what RunDir logs comes back from TensorBoard's and wandb's own files
(a resumed run hiding the steps it trains again), a tracker that fails is turned off without
stopping the run, a missing package is named with its pip extra; and loss.png for finetuning
(eval_loss as the validation curve, eval_accuracy on a second axis)."""
import glob
import json
import os
import struct
import sys

import pytest

from minillm.run_dir import RunDir, loss_curves
from minillm.tracking import Tracker, open_trackers, wandb_mode

CONFIG = {"lr": 0.001, "preset": "tiny", "batch_size": 8}
# TensorBoard/wandb tag: metrics.jsonl key, for train.py's rows
TAGS = {"train/loss": "train_loss", "train/lr": "lr", "train/tok_per_s": "tok_per_s", "train/elapsed": "elapsed",
        "eval/loss": "val_loss"}


def train_rows(steps, offset=0.0) -> list[dict]:
    """train.py's rows: an evaluation every third step; mfu unknown (None) on this machine."""
    rows = [{"step": s, "train_loss": offset + 3.0 / s, "lr": 1e-3 * s, "tok_per_s": 1000.0 + s, "mfu": None,
             "elapsed": 0.5 * s} for s in steps]
    for row in rows:
        if row["step"] % 3 == 0:
            row["val_loss"] = offset + 2.0 / row["step"]
    return rows


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def curves_in_metrics(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    curves = {tag: [(r["step"], r[key]) for r in rows if r.get(key) is not None] for tag, key in TAGS.items()}
    return {tag: points for tag, points in curves.items() if points}


# -- TensorBoard -----------------------------------------------------------------------------------


def tensorboard_files(log_dir: str):
    """(scalars {tag: [(step, value)]}, texts {tag: [(step, text)]}) as TensorBoard's reader sees them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode())
                                                 for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}
    return scalars, texts


def assert_same_curves(seen: dict, want: dict) -> None:
    assert sorted(seen) == sorted(want)
    for tag, points in want.items():
        assert [step for step, _ in seen[tag]] == [step for step, _ in points], tag
        assert [value for _, value in seen[tag]] == pytest.approx([value for _, value in points], rel=1e-6), tag


def test_tensorboard_events_match_metrics_and_resume_hides_the_steps_trained_again(tmp_path):
    pytest.importorskip("tensorboard")
    out = str(tmp_path / "run")
    log_dir = os.path.join(out, "tensorboard")
    run = RunDir(out, trackers=open_trackers("tensorboard", out, CONFIG))
    run.start(None)
    for row in train_rows(range(1, 6)):
        run.log(row)
    run.log({"step": 5, "val_loss": 0.25})  # the final evaluation, merged into the last row
    assert len(tensorboard_files(log_dir)[0]["train/loss"]) == 5  # on disk before the writer closes: a crash keeps them
    run.text("sample", "once upon\n  a <time>")
    run.finish({})
    scalars, texts = tensorboard_files(log_dir)
    assert_same_curves(scalars, curves_in_metrics(metrics(out)))
    assert scalars["eval/loss"] == [(3, pytest.approx(2 / 3)), (5, 0.25)]
    assert json.loads(texts["config"][0][1].replace("\n    ", "\n")) == CONFIG and texts["config"][0][0] == 0
    assert texts["sample"] == [(5, "    once upon\n      a <time>")]  # a markdown code block: shown as it is

    # resumed at step 3: the earlier run's steps 4 and 5 are trained again, and only the new ones show,
    # in every curve (eval/loss had step 5 and is not logged again); step 3 itself stays
    run = RunDir(out, trackers=open_trackers("tensorboard", out, CONFIG, resumed_step=3))
    run.start(3)
    for row in train_rows(range(4, 6), offset=10.0):
        del row["mfu"], row["tok_per_s"]
        run.log(row)
    run.finish({})
    scalars, texts = tensorboard_files(log_dir)
    assert_same_curves(scalars, curves_in_metrics(metrics(out)))
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5] and scalars["train/loss"][3][1] > 10
    assert [step for step, _ in scalars["eval/loss"]] == [3]
    assert [step for step, _ in scalars["train/tok_per_s"]] == [1, 2, 3]
    assert [step for step, _ in texts["config"]] == [0, 3]

    # a fresh run into the same folder starts the curves over
    run = RunDir(out, trackers=open_trackers("tensorboard", out, CONFIG))
    run.start(None)
    run.log({"step": 1, "train_loss": 7.0})
    run.finish({})
    scalars, _ = tensorboard_files(log_dir)
    assert scalars == {"train/loss": [(1, 7.0)]}


# -- wandb -----------------------------------------------------------------------------------------


def wandb_records(path: str):
    """The records of a .wandb file, read with wandb's own protobuf schema. The framing is leveldb's
    log format as wandb writes it (the reader left the Python package for wandb-core): a 7-byte file
    header (":W&B", magic, version), then 32 KiB blocks of chunks, each behind a 7-byte header
    (checksum, length, type: 1 whole record, 2 first, 3 middle, 4 last part); a block's tail too
    short for a header is padding."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    block, pos, record = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zeros: the end of what was written
            break
        record += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            record = b""
            yield parsed


def wandb_history(path: str) -> tuple[dict, dict]:
    """({step: {key: value}}, config {key: value}) of an offline run's .wandb file."""
    history, config = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind in ("run", "config"):  # the config comes with the run record, or in one of its own
            updates = (record.run.config if kind == "run" else record.config).update
            config.update({u.key: json.loads(u.value_json) for u in updates})
    return history, config


def test_wandb_offline_run_holds_the_rows(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_PROJECT", "minillm-test")):
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing outside tmp_path
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    out = str(tmp_path / "run")
    rows = [{"step": s, "train_loss": 1.0 / s, "lr": 2e-5, "ex_per_s": 50.0 + s, "train_reward": 0.1 * s}
            for s in (10, 20, 30)]
    rows[1].update({"eval_loss": 0.7, "eval_accuracy": 0.75, "eval_confusion": [[3, 1], [0, 4]]})
    trackers = open_trackers("wandb", out, CONFIG)
    run = RunDir(out, trackers=trackers)
    run.start(None)
    for row in rows:
        run.log(row)
    run.log({"step": 30, "eval_loss": 0.5, "eval_accuracy": 0.875})
    run.text("sample", "a <b> & c")
    run.finish({})
    # wandb's service may still be writing the run's file when finish() returns; it is done when the
    # service stops, as at the end of a training process
    wandb.teardown()
    files = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1
    folder = os.path.dirname(files[0])
    assert trackers[0].where == f"wandb: offline run in {folder} (upload it: wandb sync {folder})"
    history, config = wandb_history(files[0])
    assert {k: v for k, v in config.items() if not k.startswith("_")} == CONFIG
    assert sorted(history) == [10, 20, 30]
    for step, want in ((10, rows[0]), (20, rows[1]), (30, {**rows[2], "eval_loss": 0.5, "eval_accuracy": 0.875})):
        got = history[step]
        assert got["train/loss"] == want["train_loss"] and got["train/lr"] == want["lr"]
        assert got["train/ex_per_s"] == want["ex_per_s"] and got["train/reward"] == want["train_reward"]
        assert (got.get("eval/loss"), got.get("eval/accuracy")) == (want.get("eval_loss"), want.get("eval_accuracy"))
        assert not any("confusion" in key for key in got)
    assert history[30]["sample/_type"] == "html-file"
    with open(os.path.join(folder, "files", history[30]["sample/path"]), encoding="utf-8") as f:
        assert "<pre>a &lt;b&gt; &amp; c</pre>" in f.read()


def test_wandb_stays_offline_unless_told(monkeypatch):
    for value, mode in ((None, "offline"), ("online", "online"), ("disabled", "disabled"), ("dryrun", "offline")):
        if value is None:
            monkeypatch.delenv("WANDB_MODE", raising=False)
        else:
            monkeypatch.setenv("WANDB_MODE", value)
        assert wandb_mode() == mode, value


# -- choosing trackers -----------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["tensorboard", "wandb"])
def test_a_missing_package_is_named_with_its_extra(tmp_path, monkeypatch, missing):
    """Checked before anything opens: with both asked for, a missing wandb leaves no tensorboard folder."""
    if missing == "wandb":
        pytest.importorskip("tensorboard")
    monkeypatch.setitem(sys.modules, missing, None)  # import fails, as if not installed
    with pytest.raises(ValueError) as e:
        open_trackers("tensorboard,wandb", str(tmp_path), CONFIG)
    assert str(e.value) == f"--log {missing} needs the {missing} package: pip install 'minillm[{missing}]'"
    assert os.listdir(tmp_path) == []


def test_tracker_names(tmp_path):
    with pytest.raises(ValueError) as e:
        open_trackers("tensorboard,tensorbored", str(tmp_path), CONFIG)
    assert "'tensorbored'" in str(e.value) and "tensorboard, wandb" in str(e.value)
    assert open_trackers(None, str(tmp_path), CONFIG) == open_trackers("", str(tmp_path), CONFIG) == []
    assert os.listdir(tmp_path) == []


# -- RunDir and its trackers -----------------------------------------------------------------------


class Recorder(Tracker):
    name = "recorder"

    def __init__(self, fail_with: Exception = None):
        super().__init__("in memory")
        self.fail_with, self.calls, self.closed = fail_with, [], False

    def _log(self, step, values):
        self.calls.append(("log", step, values))
        if self.fail_with:
            raise self.fail_with

    def _text(self, tag, text, step):
        self.calls.append(("text", step, tag, text))

    def _close(self):
        self.closed = True


def test_rows_reach_the_trackers_of_rank_0(tmp_path):
    """Each row's numbers, a merged row's new values at its step again, the text at the last step."""
    main, other = Recorder(), Recorder()
    run = RunDir(str(tmp_path), trackers=[main])
    run.log({"step": 1, "train_loss": 2.0, "mfu": None})
    run.log({"step": 2, "train_loss": 1.5, "lr": 0.1})
    run.log({"step": 2, "val_loss": 1.25, "eval_confusion": [[1]]})
    run.text("sample", "hi")
    run.finish({})
    assert main.calls == [("log", 1, {"train/loss": 2.0}), ("log", 2, {"train/loss": 1.5, "train/lr": 0.1}),
                          ("log", 2, {"eval/loss": 1.25}), ("text", 2, "sample", "hi")]
    assert main.closed
    rank1 = RunDir(str(tmp_path / "rank1"), is_main=False, trackers=[other])
    rank1.log({"step": 1, "train_loss": 2.0})
    rank1.finish({})
    assert other.calls == [] and not other.closed


def test_a_failing_tracker_warns_once_and_the_run_goes_on(tmp_path, capsys):
    broken, working = Recorder(OSError(28, "No space left on device")), Recorder()
    broken.name = "tensorboard"
    run = RunDir(str(tmp_path), trackers=[broken, working])
    run.start(None)
    for step in range(1, 5):
        run.log({"step": step, "train_loss": 1.0 / step})
    run.text("sample", "hi")
    run.finish({"steps": 4})
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: --log tensorboard failed (OSError: [Errno 28] No space left on device)")
    assert "metrics.jsonl is still written" in warnings[0]
    assert [call[0] for call in broken.calls] == ["log"] and broken.closed  # off after the failure, still closed
    assert len(working.calls) == 5
    assert [row["step"] for row in metrics(tmp_path)] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 4}


# -- loss.png --------------------------------------------------------------------------------------


def test_loss_png_of_a_classifier_shows_eval_loss_and_accuracy(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    rows = [{"step": s, "train_loss": 1.0 / s, "ex_per_s": 40.0, "train_reward": None} for s in (10, 20, 30, 40)]
    rows[1].update({"eval_loss": 0.6, "eval_accuracy": 0.7, "eval_confusion": [[2, 1], [1, 2]]})
    final = {"step": 40, "eval_loss": 0.4, "eval_accuracy": 0.9, "eval_f1": 0.88}
    drawn, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k))[1])
    run = RunDir(str(tmp_path))
    for row in rows:
        run.log(row)
    run.log(final)
    assert run.finish({}) == str(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    want = {"train": ([10, 20, 30, 40], [0.1, 0.05, 1 / 30, 0.025]), "validation": ([20, 40], [0.6, 0.4]),
            "accuracy": ([20, 40], [0.7, 0.9])}
    assert loss_curves(run.history) == want
    loss_axis, accuracy_axis = drawn[0].axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for axis in (loss_axis, accuracy_axis) for line in axis.get_lines()}
    assert lines == want
    assert [line.get_label() for line in accuracy_axis.get_lines()] == ["accuracy"]
    assert [t.get_text() for t in loss_axis.get_legend().get_texts()] == ["train", "validation", "accuracy"]


def test_loss_curves_of_pretraining_use_val_loss():
    rows = train_rows(range(1, 7))
    assert loss_curves(rows) == {"train": ([1, 2, 3, 4, 5, 6], [3.0 / s for s in range(1, 7)]),
                                 "validation": ([3, 6], [2 / 3, 1 / 3])}
