"""The toy study: V.I.P. against its ablations on the embedded toy world, several seeds.

Rows (METHOD.md section 7's table, on the toy): the teacher; the pruned student before training
(pruned once to the final size); pruned + SFT, pruned + DPO (no SFT term) and V.I.P. (ReDPO),
each trained online over the rounds; and pruned + ReDPO one-shot (`--no-online`). Every variant
is one `online_loop.py` run per seed. Runs that differ only in the loss share their first round
up to training (same prune, probe, prompts, pairs), which is copied instead of recomputed. Writes
toy/RESULTS.md: mean and 95 % interval over seeds per dimension and average, parameters, latency.

    python toy/study.py                     # 3 seeds, the loop's toy defaults (about an hour on 2 cores)
    python toy/study.py --seeds 0 --train-steps 20 --work-dir runs/study-quick   # a quick look
"""
import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import models  # noqa: E402
import rewards  # noqa: E402

VARIANTS = {  # name: online_loop.py flags
    "V.I.P. (online ReDPO)": ["--loss", "redpo"],
    "pruned + SFT (online)": ["--loss", "sft"],
    "pruned + DPO, no SFT term (online)": ["--loss", "dpo"],
    "pruned + ReDPO one-shot (--no-online)": ["--loss", "redpo", "--no-online"],
}
SHARE_FROM = {"pruned + SFT (online)": "V.I.P. (online ReDPO)", "pruned + DPO, no SFT term (online)": "V.I.P. (online ReDPO)"}
DIMS = (*models.DIMS, "average")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (at least 3 for intervals)")
    p.add_argument("--work-dir", default="runs/study", help="where every run lives")
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"), help="the results table")
    p.add_argument("--loop-args", default="", help="extra online_loop.py flags, one quoted string")
    p.add_argument("--train-steps", type=int, default=0, help="ReDPO steps per round (0 = the loop's default)")
    return p


def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def share_first_round(src, dst):
    """Copy a finished run's round 0 and round 1 up to training (everything before redpo)."""
    if os.path.exists(dst) or not os.path.exists(os.path.join(src, "round-1", "pairs", "filtered.jsonl")):
        return
    os.makedirs(dst)
    for part in ("teacher_cache", "round-0"):
        shutil.copytree(os.path.join(src, part), os.path.join(dst, part))
    r1 = os.path.join(dst, "round-1")
    shutil.copytree(os.path.join(src, "round-1"), r1,
                    ignore=shutil.ignore_patterns("student.safetensors", "student.log.jsonl", "eval", "redpo.log"))


def interval(values):
    """(mean, half-width of the 95 % interval) over seeds, with rewards.interval."""
    iv = rewards.interval([v for v in values if v is not None])
    return iv["mean"], None if iv["mean"] is None else iv["ci95"][1] - iv["mean"]


def model_entry(report_path, label):
    report = models.read_json(report_path)
    return next(m for m in report["models"] if m["label"] == label)


def main(args):
    rows = {}  # row name -> list of per-seed model entries
    t0 = time.time()
    extra = args.loop_args.split() + (["--train-steps", str(args.train_steps)] if args.train_steps else [])
    for seed in args.seeds:
        for name, flags in VARIANTS.items():
            work = os.path.join(args.work_dir, f"seed-{seed}", slug(name))
            if name in SHARE_FROM:
                share_first_round(os.path.join(args.work_dir, f"seed-{seed}", slug(SHARE_FROM[name])), work)
            cmd = [sys.executable, os.path.join(ROOT, "online_loop.py"), "--work-dir", work, "--seed", str(seed),
                   *flags, *extra]
            print(f"\n##### seed {seed}: {name}\n$ {' '.join(cmd[1:])}", flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                raise models.UserError(f"the run '{name}' (seed {seed}) failed; see {work}")
            last = "oneshot" if "--no-online" in flags else sorted(
                d for d in os.listdir(work) if d.startswith("round-") and d != "round-0")[-1]
            rows.setdefault(name, []).append(model_entry(os.path.join(work, last, "eval", "report.json"), "student"))
            if name == "V.I.P. (online ReDPO)":
                rows.setdefault("teacher", []).append(
                    model_entry(os.path.join(work, "round-0", "eval", "report.json"), "teacher"))
            if "--no-online" in flags:
                rows.setdefault("pruned, before training", []).append(
                    model_entry(os.path.join(work, "oneshot", "eval", "report.json"), "pruned"))
    order = ["teacher", "pruned, before training", "pruned + SFT (online)", "pruned + DPO, no SFT term (online)",
             "pruned + ReDPO one-shot (--no-online)", "V.I.P. (online ReDPO)"]
    head = ("| model | params (seed 0) | latency/video (s) | VQ | TC | DD | TA | avg |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    summary = {}
    for name in order:
        entries = rows[name]
        cells = []
        for d in DIMS:
            mean, half = interval([e["scores"][d]["mean"] for e in entries])
            cells.append(f"{mean:.3f} ± {half:.3f}")
            summary.setdefault(name, {})[d] = [mean, half]
        lat, _ = interval([(e["latency"] or {}).get("video_s") for e in entries])
        lines.append(f"| {name} | {entries[0]['params']['prunable']:,} | {'-' if lat is None else f'{lat:.2f}'} | "
                     + " | ".join(cells) + " |")
    table = "\n".join(lines)
    cmd = "python toy/study.py " + " ".join(sys.argv[1:])
    text = (f"# The toy study\n\nMade by `{cmd.strip()}` on {datetime.date.today()} "
            f"({platform.machine()}, {os.cpu_count()} CPU cores, torch {__import__('torch').__version__}), "
            f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {time.time() - t0:.0f} s in this invocation "
            f"(runs already complete in --work-dir are reused, not redone).\n"
            f"Scores: the toy judge on the held-out eval prompts (each in [0, 1]); mean ± 95 % interval over seeds "
            f"(1.96 standard errors).\n\n{table}\n")
    with models.atomic_path(args.out) as tmp, open(tmp, "w") as f:
        f.write(text)
    models.write_json(os.path.join(args.work_dir, "study.json"), {"args": vars(args), "rows": summary})
    print("\n" + text)


if __name__ == "__main__":
    models.cli(main, get_parser())
