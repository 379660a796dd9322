"""The toy sweep: choose ReDPO's settings on the VALIDATION prompts (toy/prompts/val.txt), never on eval.

Per seed: prune the teacher once to the final size (reward importance), make pairs from the pool
(the loop's curation and filter), then train one student per configuration from the same pruned
model on the same pairs, and evaluate every student and the untrained pruned model on the 24
validation prompts with the same initial noise. Prints and writes a table of the per-seed gains
(student - pruned, average of the four dimensions) with the mean and a t-based 95 % interval over
seeds, plus the last training log line of each configuration (DPO margin, implicit accuracy, the
held-out distance to the teacher). Every stage runs in this process through online_loop.run_step.

    python toy/sweep.py --seed 0 --work-dir runs/sweep      # one seed (run seeds side by side)
    python toy/sweep.py --seeds 0 1 --work-dir runs/sweep --report toy/SWEEP.md   # gather
"""
import argparse
import datetime
import os
import platform
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import models  # noqa: E402
import online_loop  # noqa: E402
from toy.study import slug, t_interval  # noqa: E402

PROMPTS = {**online_loop.TOY_PROMPTS, "val": os.path.join(HERE, "prompts", "val.txt")}  # the loop's files + validation
CONFIGS = {  # name: redpo.py flags (on top of --max-steps/--batch-size/--lr given below)
    "sft": ["--loss", "sft"],
    "sft, no prompt dropout": ["--loss", "sft", "--uncond-prob", "0"],
    "redpo ref=teacher beta=5000": ["--loss", "redpo", "--reference", "teacher", "--beta", "5000"],
    "redpo ref=teacher beta=500": ["--loss", "redpo", "--reference", "teacher", "--beta", "500"],
    "redpo ref=teacher beta=50": ["--loss", "redpo", "--reference", "teacher", "--beta", "50"],
    "redpo ref=student0 beta=5000": ["--loss", "redpo", "--reference", "student0", "--beta", "5000"],
    "redpo ref=student0 beta=500": ["--loss", "redpo", "--reference", "student0", "--beta", "500"],
    "redpo ref=student0 beta=50": ["--loss", "redpo", "--reference", "student0", "--beta", "50"],
    "redpo ref=student0 beta=5": ["--loss", "redpo", "--reference", "student0", "--beta", "5"],
    "dpo ref=student0 beta=500": ["--loss", "dpo", "--reference", "student0", "--beta", "500"],
    "sft 120 steps": ["--loss", "sft", "--max-steps", "120"],
    "sft 240 steps": ["--loss", "sft", "--max-steps", "240"],
    "sft lr=3e-4": ["--loss", "sft", "--lr", "3e-4"],
    "redpo ref=student0 beta=500 240 steps": ["--loss", "redpo", "--reference", "student0", "--beta", "500",
                                              "--max-steps", "240"],
    # round 1's size (80 %), on the default loop's own round-1 pruned models and pairs (toy/RESULTS.md)
    "redpo ref=student0 beta=500 30 steps": ["--loss", "redpo", "--reference", "student0", "--beta", "500",
                                             "--max-steps", "30"],
    "redpo ref=student0 beta=500 lr=3e-5": ["--loss", "redpo", "--reference", "student0", "--beta", "500",
                                            "--lr", "3e-5"],
    "sft lr=3e-5": ["--loss", "sft", "--lr", "3e-5"],
    "redpo ref=student0 beta=500 w_sft=4": ["--loss", "redpo", "--reference", "student0", "--beta", "500",
                                            "--w-sft", "4"],
    # SFT on the CFG-guided prediction (redpo.py --sft-cfg), the noise estimate the sampler follows
    "redpo ref=student0 beta=500 sft_cfg=6": ["--loss", "redpo", "--reference", "student0", "--beta", "500",
                                              "--sft-cfg", "6"],
    "sft sft_cfg=6": ["--loss", "sft", "--sft-cfg", "6"],
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=-1, help="run this seed's sweep (-1: only gather --seeds)")
    p.add_argument("--seeds", type=int, nargs="*", default=[], help="gather these seeds into --report")
    p.add_argument("--work-dir", default="runs/sweep")
    p.add_argument("--report", default="", help="markdown file for the gathered table")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), help="subset of the configurations")
    p.add_argument("--ratio", type=float, default=0.6, help="pruned to this fraction of the teacher (final size)")
    p.add_argument("--steps", type=int, default=60, help="ReDPO steps per configuration")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--samples", type=int, default=2, help="validation videos per prompt")
    return p


def run_seed(args, seed):
    work = os.path.abspath(os.path.join(args.work_dir, f"seed-{seed}"))
    run = lambda name, marker, argv: online_loop.run_step(name, marker, argv, os.path.join(work, "logs", f"{slug(name)}.log"))
    base = ["--model", "toy", "--seed", seed]
    pruned, probe = os.path.join(work, "pruned.safetensors"), os.path.join(work, "probe")
    pairs, kept = os.path.join(work, "pairs", "pairs.jsonl"), os.path.join(work, "pairs", "filtered.jsonl")
    run("prune", pruned, ["prune.py", *base, "--prompts", PROMPTS["probe"], "--target-ratio", args.ratio, "--out", pruned])
    run("probe", os.path.join(probe, "report.json"),
        ["evaluate.py", *base, "--students", pruned, "--labels", "pruned", "--prompts", PROMPTS["probe"],
         "--out-dir", probe, "--no-efficiency", "--no-side-by-side"])
    run("curate", os.path.join(work, "prompts.txt"),
        ["filter_pairs.py", "--job", "curate", "--prompts", PROMPTS["pool"], "--report", os.path.join(probe, "report.json"),
         "--out", os.path.join(work, "prompts.txt"), "--seed", seed])
    run("make pairs", pairs, ["make_pairs.py", *base, "--student", pruned, "--prompts", os.path.join(work, "prompts.txt"),
                              "--out-dir", os.path.join(work, "pairs"), "--samples-per-prompt", 2, "--round", 1])
    run("filter", kept, ["filter_pairs.py", "--job", "filter", "--pairs", pairs, "--report",
                         os.path.join(probe, "report.json"), "--out", kept])
    students = []
    for name in args.configs:
        out = os.path.join(work, "students", f"{slug(name)}.safetensors")
        run(f"redpo {name}", out, ["redpo.py", *base, "--student", pruned, "--pairs", kept, "--out", out,
                                    "--max-steps", args.steps, "--lr", args.lr, "--batch-size", args.batch_size,
                                    *CONFIGS[name]])
        students.append(out)
    run("validation", os.path.join(work, "val", "report.json"),
        ["evaluate.py", *base, "--no-teacher", "--students", pruned, *students, "--labels", "pruned",
         *[slug(n) for n in args.configs], "--prompts", PROMPTS["val"], "--samples", args.samples,
         "--out-dir", os.path.join(work, "val"), "--no-efficiency", "--no-side-by-side"])


def guided(logs):
    """The guided distance to the teacher (last log line, mean over seeds); '-' for logs from before it was logged."""
    values = [log["dist_teacher_guided"] for log in logs if "dist_teacher_guided" in log]
    return f"{sum(values) / len(values):.4f}" if len(values) == len(logs) else "-"


def gather(args):
    rows, t0 = [], time.time()
    for name in args.configs:
        gains, logs = [], []
        for seed in args.seeds:
            work = os.path.join(args.work_dir, f"seed-{seed}")
            report = models.read_json(os.path.join(work, "val", "report.json"))
            by = {m["label"]: m["scores"] for m in report["models"]}
            gains.append({d: by[slug(name)][d]["mean"] - by["pruned"][d]["mean"]
                          for d in (*models.DIMS, "average")})
            logs.append(models.read_jsonl(os.path.join(work, "students", f"{slug(name)}.log.jsonl"))[-1])
        mean, half = t_interval([g["average"] for g in gains])
        last = lambda k: sum(l.get(k, 0.0) for l in logs) / len(logs)
        rows.append(f"| {name} | {mean:+.3f} ± {half:.3f} | " + " | ".join(f"{g['average']:+.3f}" for g in gains)
                    + " | " + " | ".join(f"{sum(g[d] for g in gains) / len(gains):+.3f}" for d in models.DIMS)
                    + f" | {last('implicit_acc'):.2f} | {last('margin'):.3g} | {last('dist_teacher_cond'):.4f}"
                    f" | {last('dist_teacher_uncond'):.4f} | {guided(logs)} |")
    head = ("| configuration | gain (avg) ± 95 % | " + " | ".join(f"seed {s}" for s in args.seeds)
            + " | VQ | TC | DD | TA | implicit acc (last) | margin (last) | dist. to teacher cond | uncond | guided |\n"
            + "|---" * (11 + len(args.seeds)) + "|")
    text = (f"# The toy sweep (validation prompts)\n\nMade by `python toy/sweep.py {shlex.join(sys.argv[1:])}` on "
            f"{datetime.date.today()} ({platform.machine()}, {os.cpu_count()} CPU cores). Gain = student - untrained "
            f"pruned model on toy/prompts/val.txt ({args.samples} videos a prompt, the same noise for every model), "
            f"the average of the four dimensions; mean ± t-based 95 % interval over seeds {args.seeds}. "
            f"Pruned once per seed to {args.ratio:.0%} of the teacher; {args.steps} steps, batch {args.batch_size}, "
            f"lr {args.lr:g}; prompt dropout 0.1 unless said.\n\n" + head + "\n" + "\n".join(rows) + "\n")
    print(text)
    if args.report:
        with models.atomic_path(args.report) as tmp, open(tmp, "w") as f:
            f.write(text)


def main(args):
    if args.seed >= 0:
        run_seed(args, args.seed)
    if args.seeds:
        gather(args)


if __name__ == "__main__":
    models.cli(main, get_parser())
