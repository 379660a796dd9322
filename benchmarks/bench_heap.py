"""Benchmark: the toy's CPU work with glibc's default malloc against models.steady_heap, side by side in one run.

Each measurement is a fresh process (the allocator is set once per process), alternating default / steady over
--repeats rounds, one thread each, on the shipped toy teacher:
  sample  models.sample of --videos videos (10 DDIM steps, CFG 6), as evaluate.py and make_pairs.py sample;
  train   redpo.train_step + backward + AdamW at the loop's settings (--pairs pairs, the initial student as DPO
          reference, guided SFT on both members and branches), on random latents.
Per row: the median seconds a call (after one warm-up call), the page faults a call, and a checksum of the output
(the videos' latents, or the loss of every step), which must agree between the two allocators: the allocator
changes no number. The speed-up is default / steady, both medians from this run.

    python benchmarks/bench_heap.py                                  # 16 videos, 4 pairs, 3 rounds (~3 minutes)
    python benchmarks/bench_heap.py --videos 2 --pairs 1 --calls 2 --repeats 1   # seconds (the test)
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import models  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=16, help="videos a sampling call (evaluate.py's batch)")
    p.add_argument("--pairs", type=int, default=4, help="pairs a training step (the loop's --batch-size)")
    p.add_argument("--calls", type=int, default=3, help="timed calls a process, after one warm-up call")
    p.add_argument("--repeats", type=int, default=3, help="processes per allocator and workload")
    p.add_argument("--teacher", default=os.path.join(ROOT, "toy", "teacher"), help="the toy teacher's folder")
    p.add_argument("--child", nargs=2, metavar=("ALLOCATOR", "WORK"), help=argparse.SUPPRESS)
    return p


def workload(args, work):
    """A function that runs one call of `work` and returns its checksum."""
    import torch

    import redpo

    family = models.get_family("toy")
    teacher = models.load_teacher(family, args.teacher)
    prompts = ["a red circle moving right quickly", "a blue square moving up slowly"]
    if work == "sample":
        cond = models.encode_prompts(teacher, [prompts[i % 2] for i in range(args.videos)])
        uncond = models.encode_prompts(teacher, [""])
        shape = models.latent_shape(teacher, family.frames, family.height, family.width)
        return lambda: float(models.sample(family, teacher.unet, teacher.scheduler, cond, uncond,
                                           list(range(args.videos)), shape, family.steps, family.cfg).sum())
    rargs = redpo.get_parser().parse_args(["--model", "toy", "--pairs", "-", "--out", "-", "--reference", "student0",
                                           "--sft-cfg", str(family.sft_cfg), "--sft-on", "both", "--sft-branches"])
    student, reference = copy.deepcopy(teacher.unet).train().requires_grad_(True), copy.deepcopy(teacher.unet)
    opt = torch.optim.AdamW(student.parameters(), lr=family.lr)
    g = torch.Generator().manual_seed(0)
    shape = models.latent_shape(teacher, family.frames, family.height, family.width)  # (C, F, h, w)
    B = args.pairs
    emb = models.encode_prompts(teacher, [prompts[i % 2] for i in range(B)])
    uncond = models.encode_prompts(teacher, [""])

    def step():
        batch = (torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g), emb,
                 torch.randint(0, 1000, (B,), generator=g), torch.randn(B, *shape, generator=g))
        loss, _ = redpo.train_step(family, teacher.scheduler, student, teacher.unet, reference, batch, rargs, False,
                                   "cpu", uncond=uncond)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)
    return step


def child(args):
    """One process: the allocator, a warm-up call, --calls timed calls; prints one JSON line."""
    allocator, work = args.child
    if allocator == "steady" and not models.steady_heap():
        raise models.UserError("this C library has no mallopt (not glibc): nothing to compare")
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    call = workload(args, work)
    sums = [call()]
    seconds, faults = [], []
    for _ in range(args.calls):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        sums.append(call())
        seconds.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"allocator": allocator, "work": work, "seconds": seconds, "faults": faults, "sums": sums}))


def main(args):
    if args.child:
        return child(args)
    results = {}
    for r in range(args.repeats):
        for work in ("sample", "train"):
            for allocator in ("default", "steady"):
                cmd = [sys.executable, os.path.abspath(__file__), "--child", allocator, work, "--videos",
                       str(args.videos), "--pairs", str(args.pairs), "--calls", str(args.calls), "--teacher",
                       args.teacher]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if proc.returncode:
                    raise models.UserError(f"{work} with the {allocator} allocator failed: "
                                           f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                res = results.setdefault((work, allocator), {"seconds": [], "faults": [], "sums": []})
                for k in res:
                    res[k].append(row[k])
                print(f"round {r + 1}: {work} {allocator} {np.median(row['seconds']):.3f} s a call", flush=True)
    lines = [f"one thread a process; {args.videos} videos a sampling call, {args.pairs} pairs a training step; "
             f"{args.repeats} processes x {args.calls} calls each", "",
             "| work | malloc | median s a call | page faults a call | speed-up | same output |", "|---|---|---|---|---|---|"]
    for work in ("sample", "train"):
        base = np.median(sum(results[(work, "default")]["seconds"], []))
        for allocator in ("default", "steady"):
            res = results[(work, allocator)]
            med = np.median(sum(res["seconds"], []))
            same = all(s == results[(work, "default")]["sums"][0] for s in res["sums"])
            lines.append(f"| {work} | {allocator} | {med:.3f} | {np.median(sum(res['faults'], [])):,.0f} | "
                         f"{base / med:.2f} | {'yes' if same else 'NO'} |")
    print("\n".join(lines))


if __name__ == "__main__":
    models.cli(main, get_parser(), steady=False)  # each child sets its own allocator
