"""What each compression step costs and buys, on SST-2 with the all-MiniLM-L6-v2 weights: one table.

    python -m minillm.benchmarks.compression                      # about 25 min on a 2-core CPU
    python -m minillm.benchmarks.compression --budget 60 --recovery-budget 30 --out out/compression-quick
    python -m minillm.benchmarks.compression --reuse              # keep the trained runs of an earlier call

The recipe (each training run is `python finetune.py` as a user runs it, with --time-budget):
1. teacher: the 6-layer model finetuned on SST-2 (full, lr 1e-4, warmup 30, dropout 0, [CLS]).
2. quantised copies of the teacher: int8 dynamic, int8 and int4 weight-only (minillm.quantize).
3. unstructured magnitude pruning of the teacher at 30% and 50% (python -m minillm.prune), no retraining.
4. structured pruning: --prune-heads / --prune-mlp on the teacher, then a recovery finetune distilled
   from the unpruned teacher.
5. a 3-layer student (blocks 1, 3, 5 of the finetuned teacher, and its head) distilled from the
   teacher, and the same student finetuned without a teacher, for the same time.
6. the teacher exported with torch.export (.pt2) and compiled ahead of time by AOTInductor.

Each row: size on disk (the weights file, or the .pt2 / AOTI package), the bytes of the blocks'
linear weights, CPU latency of one forward at batch 1 (a dev sentence of median length) and
batch 32 (32 dev sentences padded to their longest), the median of --repeats calls with every
model taking its turn call after call (so a shared machine's load weighs on all of them alike),
all with the same --threads; and accuracy on the 872 dev sentences. Everything is measured in this
one process, so the ratios are the figures to quote.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

from minillm import export as ex
from minillm.benchmarks.finetune_sst2 import DATA, minilm_dir
from minillm.benchmarks.timing import ROOT, cpu_name, run_step
from minillm.checkpoint import save_checkpoint
from minillm.classification_data import collate, encode_examples, eval_order, read_table, to_examples
from minillm.metrics import classification_report
from minillm.pretrained import load_finetuned
from minillm.quantize import QUANT_KINDS, quantizable_layers, quantize_backend, quantize_model, quantized_tensors

COMMON = ["--train", "train.tsv", "--eval", "dev.tsv", "--text-col", "sentence", "--label-col", "label",
          "--pooling", "cls", "--lr", "1e-4", "--warmup-steps", "30", "--dropout", "0", "--dtype", "float32",
          "--no-progress"]


def finetune_step(name, out, flags, data, budget, reuse) -> str:
    """One finetune.py run (or its earlier output with --reuse)."""
    common = [os.path.join(data, f) if f.endswith(".tsv") else f for f in COMMON]
    return run_step(name, ["finetune.py", *common, *flags, "--time-budget", str(budget), "--out", out], out, reuse)


def dev_inputs(tokenizer, data, names):
    """The dev sentences encoded, and their labels as indices into the model's label names."""
    examples = to_examples(read_table(os.path.join(data, "dev.tsv")), "sentence", "label", None)
    return encode_examples(tokenizer, examples, 128), torch.tensor([names.index(str(e.label)) for e in examples])


def batch_of(encoded, indices, pad):
    ids, types, mask = collate(encoded, indices, pad)
    return ids, mask, types


def dev_logits(run, encoded, pad) -> torch.Tensor:
    """run(ids, mask, types) -> logits over the dev set, in batches of 64 of similar length."""
    order = eval_order([len(ids) for ids, _ in encoded], 64)
    parts = {}
    with torch.no_grad():
        for idx in order:
            parts.update(zip(idx, run(*batch_of(encoded, idx, pad)).float()))
    return torch.stack([parts[i] for i in range(len(encoded))])


def accuracy(logits, labels) -> float:
    return classification_report(labels, logits.argmax(-1), logits.shape[-1])["accuracy"]


def eager(model):
    model.eval()
    return lambda ids, mask, types: model.classify(ids, attention_mask=mask, token_type_ids=types)[0]


def linear_bytes(tensors: dict, layers: list[str]) -> int:
    """Bytes of the quantisable layers' weights (with their scales and zero points, not biases)."""
    prefixes = tuple(n + "." for n in layers)
    return sum(t.numel() * t.element_size() for k, t in tensors.items()
               if k.startswith(prefixes) and not k.endswith(".bias"))


def measure(name, run, file_bytes, lin_bytes, budget, env, note="", same_as=None) -> dict:
    """One row. same_as: the logits this model should reproduce (the eager teacher's, for the
    exported ones): the largest difference over the dev set goes into the note."""
    encoded, labels, pad = env[:3]
    logits = dev_logits(run, encoded, pad)
    if same_as is not None:
        diff = f"max abs logit difference from eager {(logits - same_as).abs().max().item():.1e}"
        note = f"{diff}; {note}" if note else diff
    row = {"model": name, "budget_s": budget, "size_mb": file_bytes / 1e6, "linear_mb": lin_bytes / 1e6,
           "accuracy": accuracy(logits, labels), "note": note, "logits": logits, "run": run}
    print(f"{name}: {row['size_mb']:.1f} MB, dev accuracy {row['accuracy']:.4f}", flush=True)
    return row


def checkpoint_row(name, path, budget, env, note=""):
    model, _, _ = load_finetuned(path)
    weights = os.path.join(path, "checkpoint", "model.safetensors")
    float_linear = linear_bytes(model.state_dict(), quantizable_layers(model))
    return measure(name, eager(model), os.path.getsize(weights), float_linear, budget, env, note), model


def quantized_rows(teacher_model, out, env):
    rows = []
    layers = quantizable_layers(teacher_model)
    for kind, backend in [(k, "auto") for k in QUANT_KINDS] + [("int8", "torch.ao")]:
        q = quantize_model(teacher_model, kind, backend)
        tensors = quantized_tensors(q)
        path = save_checkpoint(out, q, teacher_model.config, None, name=f"q-{kind}-{backend}", tensors=tensors)
        library = quantize_backend(kind) if backend == "auto" else "torch.ao"
        rows.append(measure(f"{kind}{' dynamic' if kind == 'int8' else ''} ({library})", eager(q),
                            os.path.getsize(os.path.join(path, "model.safetensors")), linear_bytes(tensors, layers), 0, env))
    return rows


def exported_rows(path, out, env, eager_logits):
    """The teacher as a torch.export program and an AOTInductor package (minillm.export), both run
    as a user runs them: loaded back from their files by torch alone."""
    model, _ = ex.load_for_export(path)  # attention: the hand-written backend (see minillm.export)
    program = ex.export_program(model, "logits", torch.float32)
    pt2 = os.path.join(out, "teacher.pt2")
    torch.export.save(program, pt2)
    loaded = torch.export.load(pt2).module()
    rows = [measure("torch.export program (.pt2)", lambda i, m, t: loaded(i, m, t), os.path.getsize(pt2), 0, 0, env,
                    same_as=eager_logits)]
    t0 = time.perf_counter()
    package = ex.save_aoti(program, os.path.join(out, "teacher.aoti.pt2"))
    compile_s = time.perf_counter() - t0
    compiled = torch._inductor.aoti_load_package(package)
    run = lambda i, m, t: compiled(i.contiguous(), m.contiguous(), t.contiguous())  # noqa: E731 (AOTI reads them raw)
    rows.append(measure("AOTInductor package", run, os.path.getsize(package), 0, 0, env,
                        note=f"compiled in {compile_s:.0f} s", same_as=eager_logits))
    return rows


def table(rows) -> str:
    """The rows as markdown; speed-ups are the teacher's batch-32 time over the row's, both from the same turns."""
    head = ("| model | train budget (s) | size on disk (MB) | block linear weights (MB) | batch 1 (ms) | batch 32 (ms) "
            "| speed-up at 32 | SST-2 dev accuracy | note |")
    lines = [head, "|" + "---|" * 9]
    base = rows[0]["ms_b32"]
    for r in rows:
        linear = f"{r['linear_mb']:.2f}" if r["linear_mb"] else "-"
        lines.append(f"| {r['model']} | {r['budget_s'] or '-'} | {r['size_mb']:.1f} | {linear} | {r['ms_b1']:.2f} | "
                     f"{r['ms_b32']:.1f} | {base / r['ms_b32']:.2f}x | {r['accuracy']:.4f} | {r['note']} |")
    return "\n".join(lines)


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(rows):
        ax.scatter(r["ms_b32"], r["accuracy"], s=20 + 4 * r["size_mb"])
        ax.annotate(r["model"].split(" (")[0], (r["ms_b32"], r["accuracy"]), fontsize=7, xytext=(4, 2 - 9 * (i % 3)),
                    textcoords="offset points")  # neighbours' labels at different heights
    ax.set_xlabel("CPU latency at batch 32 (ms)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title("Compression of all-MiniLM-L6-v2 on SST-2 (marker area ~ size on disk)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DATA, help="folder with SST-2's train.tsv and dev.tsv")
    p.add_argument("--out", default="out/compression")
    p.add_argument("--init", help="the pretrained model (default: all-MiniLM-L6-v2 from its package)")
    p.add_argument("--budget", type=int, default=300, help="seconds of training for the teacher and each student")
    p.add_argument("--recovery-budget", type=int, default=150, help="seconds of recovery after structured pruning")
    p.add_argument("--prune-heads", type=float, default=0.33)
    p.add_argument("--prune-mlp", type=float, default=0.4)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--student-from", choices=["teacher", "pretrained"], default="teacher",
                   help="the blocks the students start from: the finetuned teacher's (and its head) or the "
                        "pretrained model's (measured here: 0.8807 vs 0.8693 distilled, 300 s)")
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--distill-temperature", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads for every latency and every training run")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--reuse", action="store_true", help="keep trained runs already in --out")
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.data, "dev.tsv")):
        raise SystemExit(f"{args.data}: no SST-2 here (train.tsv, dev.tsv)")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    minilm, runs = args.init or minilm_dir(), {}
    o = lambda name: os.path.join(args.out, name)  # noqa: E731
    runs["teacher"] = finetune_step("teacher", o("teacher"), ["--init", minilm], args.data, args.budget, args.reuse)
    for share in (30, 50):  # unstructured: no training
        if not (args.reuse and os.path.exists(o(f"sparse{share}"))):
            shutil.rmtree(o(f"sparse{share}"), ignore_errors=True)
            subprocess.run([sys.executable, "-m", "minillm.prune", "--ckpt", runs["teacher"], "--sparsity",
                            str(share / 100), "--out", o(f"sparse{share}")], cwd=ROOT, check=True)
    kd = ["--teacher", runs["teacher"], "--distill-alpha", str(args.distill_alpha),
          "--distill-temperature", str(args.distill_temperature)]
    runs["pruned"] = finetune_step("structured pruning + recovery", o("pruned"),
                                   ["--init", runs["teacher"], "--prune-heads", str(args.prune_heads), "--prune-mlp",
                                    str(args.prune_mlp), *kd], args.data, args.recovery_budget, args.reuse)
    student = ["--init", runs["teacher"] if args.student_from == "teacher" else minilm,
               "--student-layers", str(args.student_layers)]
    runs["student_kd"] = finetune_step("student, distilled", o("student_kd"), [*student, *kd], args.data, args.budget,
                                       args.reuse)
    runs["student"] = finetune_step("student, no teacher", o("student"), student, args.data, args.budget, args.reuse)
    rows = measure_all(args, runs, o)
    text = table(rows)
    cpu = cpu_name()
    print(f"\n{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads, float32\n\n{text}")
    with open(o("compression.json"), "w") as f:
        json.dump({"cpu": cpu, "threads": args.threads, "rows": rows}, f, indent=1)
    plot(rows, o("compression.png"))
    print(f"\nwrote {o('compression.json')}, {o('compression.png')}")
    return 0


def measure_all(args, runs, o) -> list:
    teacher, tokenizer, cfg = load_finetuned(runs["teacher"])
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    encoded, labels = dev_inputs(tokenizer, args.data, cfg["labels"])
    lengths = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    one = batch_of(encoded, [lengths[len(lengths) // 2]], pad)
    many = batch_of(encoded, list(range(min(32, len(encoded)))), pad)
    env = (encoded, labels, pad)
    print(f"latency inputs: batch 1 of {one[0].shape[1]} tokens, batch 32 of {many[0].shape[1]} tokens", flush=True)
    budgets = {k: json.load(open(os.path.join(v, "summary.json")))["train_seconds"] for k, v in runs.items()}
    rows = []
    row, teacher = checkpoint_row(f"teacher: {teacher.config.n_layer} layers, float32", runs["teacher"],
                                  round(budgets["teacher"]), env)
    rows.append(row)
    rows += quantized_rows(teacher, o("quantized"), env)
    for share in (30, 50):
        rows.append(checkpoint_row(f"unstructured {share}% (magnitude)", o(f"sparse{share}"), 0, env,
                                   note="zeros in dense weights")[0])
    pruned_cfg = json.load(open(os.path.join(runs["pruned"], "checkpoint", "config.json")))["finetune"]["pruned"]
    rows.append(checkpoint_row("structured: heads + neurons, after recovery", runs["pruned"], round(budgets["pruned"]),
                               env, note=f"heads {pruned_cfg['heads']}, neurons {pruned_cfg['inner']}, "
                                         f"{pruned_cfg['removed_share']:.0%} of block weights removed")[0])
    rows.append(checkpoint_row(f"student: {args.student_layers} layers, distilled", runs["student_kd"],
                               round(budgets["student_kd"]), env)[0])
    rows.append(checkpoint_row(f"student: {args.student_layers} layers, no teacher", runs["student"],
                               round(budgets["student"]), env)[0])
    rows += exported_rows(runs["teacher"], args.out, env, rows[0]["logits"])
    print(f"latency: every model in turn, {args.repeats} calls at batch 1 and {max(3, args.repeats // 2)} at batch 32",
          flush=True)
    for key, inputs, repeats in (("ms_b1", one, args.repeats), ("ms_b32", many, max(3, args.repeats // 2))):
        ms = ex.latency_ms({i: r["run"] for i, r in enumerate(rows)}, inputs, repeats)  # in turns, after warm-up
        for i, r in enumerate(rows):
            r[key] = ms[i]
    for r in rows:
        del r["logits"], r["run"]
    return rows


if __name__ == "__main__":
    sys.exit(main())
