"""Token-weighted gradient accumulation: the gradient of one optimizer step over grad_accum
micro-batches (and over DDP processes) equals the gradient of one batch holding all of them,
even when the micro-batches hold different numbers of target tokens (masked LM: the masked
count varies; instruction tuning: response lengths vary).

The reference is the big batch's mean cross-entropy over all its targets, written out here with
F.cross_entropy on the model's logits; the accumulated gradient uses the pieces train.py's and
finetune.py's loops use (count_targets, token_share, grad_sync)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minillm.model import build_model
from minillm.config import preset
from minillm.training import count_targets, token_share

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, T = 40, 12


def micro_batches(kind: str, seed: int = 0, n: int = 4, b: int = 3):
    """n micro-batches (x, y) whose numbers of targets differ a lot from one to the next."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randint(5, V, (b, T), generator=g)
        keep = torch.rand(b, T, generator=g) < (0.05, 0.6, 0.2, 0.9)[i % 4]  # targets per position
        if kind == "sft":  # the response is a suffix of varying length
            keep = torch.arange(T)[None, :] >= torch.randint(1, T, (b, 1), generator=g) + (i % 2) * 4
            y = torch.where(keep, torch.roll(x, -1, 1), torch.full_like(x, -100))
        else:
            y = torch.where(keep, x, torch.full_like(x, -100))
            x = torch.where(keep, torch.full_like(x, 4), x)  # the mask token
        out.append((x, y))
    return out


def tiny(kind: str):
    torch.manual_seed(0)
    arch = "bert-tiny" if kind == "mlm" else "gpt-cpu"
    extra = {"pooler": False} if kind == "mlm" else {}  # as train.py: masked-LM pretraining builds no pooler
    return build_model(preset(arch, vocab_size=V, n_layer=2, n_head=2, n_embd=16, n_inner=32, block_size=T,
                              dropout=0.0, attn_dropout=0.0, **extra))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_grads(model, batches):
    """One batch holding every micro-batch: the mean loss over all its target tokens."""
    model.zero_grad()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    logits, _ = model(x)
    F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1), ignore_index=-100).backward()
    return grads(model)


def accumulated_grads(model, batches, token_weighted=True):
    model.zero_grad()
    n = count_targets([y for _, y in batches])
    for x, y in batches:
        _, loss = model(x, y)
        (token_share(loss, y, n) if token_weighted else loss / len(batches)).backward()
    return grads(model)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("kind", ["mlm", "sft"])
def test_grad_accum_equals_one_big_batch(kind):
    model = tiny(kind)
    batches = micro_batches(kind)
    counts = [int((y != -100).sum()) for _, y in batches]
    assert max(counts) > 3 * min(counts) > 0, counts  # unequal enough to matter
    ref = reference_grads(model, batches)
    ours = accumulated_grads(model, batches)
    naive = accumulated_grads(model, batches, token_weighted=False)  # the mean of per-batch means
    print(f"{kind}: target tokens per micro-batch {counts}; max |grad - one big batch|: token-weighted "
          f"{max_diff(ours, ref):.2e}, mean of means {max_diff(naive, ref):.2e}")
    assert max_diff(ours, ref) <= 1e-6
    assert max_diff(naive, ref) > 1e-4  # the test would catch the old normalisation


def test_micro_batch_without_targets_adds_nothing():
    """An instruction-tuning micro-batch whose responses were all cut off has no targets: its
    loss is NaN on its own, but it must add zero, not NaN, to the step."""
    model = tiny("sft")
    batches = micro_batches("sft")
    empty = (batches[0][0], torch.full_like(batches[0][1], -100))
    ours = accumulated_grads(model, [*batches, empty])
    assert max_diff(ours, reference_grads(model, batches)) <= 1e-6


DDP_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["TEST_DIR"])
from test_accumulation import micro_batches, tiny, reference_grads, grads, max_diff
from minillm.distributed import grad_sync, setup_distributed, wrap_ddp
from minillm.training import count_targets, token_share

kind, result, store, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# a file rendezvous: no port to race for on a busy machine
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
rank, world, device = setup_distributed()
batches = micro_batches(kind, n=4)
mine = batches[rank * 2 : rank * 2 + 2]  # rank 0 holds few targets, rank 1 many
model = tiny(kind)
ddp = wrap_ddp(model, device, world)
n = count_targets([y for _, y in mine])
for i, (x, y) in enumerate(mine):
    with grad_sync(ddp, i == len(mine) - 1):
        _, loss = ddp(x, y)
    (token_share(loss, y, n) * world).backward()
ours = grads(model)
if rank == 0:
    ref = reference_grads(tiny(kind), batches)
    counts = [[int((y != -100).sum()) for _, y in batches[r * 2 : r * 2 + 2]] for r in range(world)]
    json.dump({"max_diff": max_diff(ours, ref), "counts": counts}, open(result, "w"))
del ddp  # as in train.py, the DDP wrapper (and its reducer) is gone before the group is destroyed
dist.barrier()  # neither process leaves while the other still talks to it
dist.destroy_process_group()
sys.stdout.flush()
# Skip C++ static destructors: about 1 exit in 10 under pytest aborted there ("terminate called
# without an active exception") after the group was destroyed and the result written.
os._exit(0)
"""


@pytest.mark.parametrize("kind", ["mlm", "sft"])
def test_grad_accum_across_two_ddp_processes_equals_one_big_batch(tmp_path, kind):
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEST_DIR": os.path.dirname(os.path.abspath(__file__)),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    result, store = tmp_path / "result.json", tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, str(script), kind, str(result), str(store), str(rank)],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    r = json.load(open(result))
    print(f"{kind}, 2 processes x 2 micro-batches, target tokens {r['counts']}: max |grad - one big batch| "
          f"{r['max_diff']:.2e}")
    assert r["max_diff"] <= 1e-6
