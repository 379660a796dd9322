"""The toy study: V.I.P. against its ablations on the embedded toy world, paired over seeds.

Per seed, the pruning masks are computed ONCE and shared by every arm: reward-drop importance is
measured on the teacher (prune.py, probe prompts x 2 seed sets), round 1 keeps 70 % and round 2 60 %
of the parameters, both chosen from that one importance table (nested masks), and the one-shot arms
prune straight to round 2's mask. So every arm ends with the same architecture, and the arms differ
only in the loss and in online vs one-shot. Equal optimizer steps at the final size: one-shot trains the last
round's --train-steps at 60 %; online trains round 1's at 70 % and round 2's at 60 % (the toy's: 60, then 180).
(--ratios: the loop's budgets, the toy's 0.7 0.6 since 2026-12-04; toy/STUDY.md was run with --ratios 0.8 0.6.)

Arms (each one `online_loop.py` run with `--masks-from`, evaluated on the held-out eval prompts):
  untrained pruned        the teacher with the final mask, no training (the common start)
  SFT one-shot / ReDPO one-shot (`--no-online`)
  SFT online / ReDPO online (V.I.P.) / DPO online (no SFT term)
Reported: means with t-based 95 % intervals over seeds, and paired per-seed differences (ReDPO - SFT,
online - one-shot, each trained arm - the untrained pruned model), the average of the four scores, and
what the judge sees in the eval videos (color, shape and speed correct; the measured speed). Every arm
runs with the loop's defaults (pairs, steps, loss settings) unless --loop-args says otherwise; --leave-out
makes a smaller study (those arms are neither run nor reported, nor the differences that need them).

    python toy/study.py --seeds 0 1 2 3 4 --jobs 2            # the study, two units of work at a time
    python toy/study.py --seeds 0 1 2 3 4 --gather            # the tables, into toy/STUDY.md

--jobs N runs the study as a queue of units (a seed's masks, each arm, its evaluation), N processes of one
thread at a time, each unit as soon as what it reads is finished (an arm after the masks and the arm whose data
it copies; the evaluation after every arm), seed by seed (a ready unit of an earlier seed first, so a study stopped
part way has whole seeds evaluated), within a seed the longest remaining chain first; each unit's output goes to
WORK_DIR/logs/seed-S-UNIT.log, and each unit done prints the minutes left at the pace so far. The cores stay busy
but for the end, where the last seed's chain runs with fewer units ready than --jobs.

--loops DIR... gathers finished `online_loop.py --seed S --work-dir DIR` runs instead (the loop as shipped, one
seed a dir): per round, the trained student against its own pruned start, paired over the runs.
"""
import argparse
import contextlib
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import models  # noqa: E402
import online_loop  # noqa: E402

ARMS = {  # name: online_loop.py flags
    "SFT one-shot": ["--loss", "sft", "--no-online"],
    "ReDPO one-shot": ["--loss", "redpo", "--no-online"],
    "SFT online": ["--loss", "sft"],
    "V.I.P. (ReDPO online)": ["--loss", "redpo"],
    "DPO online (no SFT term)": ["--loss", "dpo"],
}
ONLINE = [n for n, f in ARMS.items() if "--no-online" not in f]
SHARE = {"ReDPO one-shot": "SFT one-shot", "V.I.P. (ReDPO online)": "SFT online",
         "DPO online (no SFT term)": "SFT online"}  # same data up to the first training: copied, not redone
DIFFERENCES = [  # (label, arm a, arm b): per seed a - b
    ("ReDPO - SFT, online", "V.I.P. (ReDPO online)", "SFT online"),
    ("ReDPO - SFT, one-shot", "ReDPO one-shot", "SFT one-shot"),
    ("online - one-shot, ReDPO", "V.I.P. (ReDPO online)", "ReDPO one-shot"),
    ("online - one-shot, SFT", "SFT online", "SFT one-shot"),
    ("ReDPO - DPO, online", "V.I.P. (ReDPO online)", "DPO online (no SFT term)"),
    *[(f"{arm} - untrained pruned", arm, "untrained pruned") for arm in ARMS],
]
DIMS = (*models.DIMS, "average")
# t_{0.975, df} for df = 1..30 (two-sided 95 %); beyond 30 the normal 1.96 is within 4 %.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (5 or more for the study)")
    p.add_argument("--work-dir", default="runs/study", help="where every run lives")
    p.add_argument("--gather", action="store_true", help="only gather finished seeds into --out")
    p.add_argument("--masks-only", action="store_true", help="only compute the seeds' pruning masks")
    p.add_argument("--jobs", type=int, default=1,
                   help="units of work run at a time, each a process (2 on a 2-core machine, OMP_NUM_THREADS=1)")
    p.add_argument("--no-evaluate", action="store_true", help="train the arms but leave the seed's evaluation to a "
                   "later run (--jobs runs each seed's evaluation as a unit of its own)")
    p.add_argument("--arms", nargs="*", default=list(ARMS), metavar="ARM",
                   help="run only these arms (the evaluation runs once every arm of a seed is trained)")
    p.add_argument("--leave-out", nargs="+", default=[], metavar="ARM",
                   help="arms this study leaves out: not trained, evaluated or reported (a smaller study; the paired "
                        "differences that need them are left out too)")
    p.add_argument("--out", default="", help="the tables (markdown; default toy/STUDY.md, with --loops toy/LOOPS.md)")
    p.add_argument("--loop-args", default="", help="extra online_loop.py flags for every arm, one quoted string")
    p.add_argument("--ratios", type=float, nargs=2, default=list(models.get_family("toy").budgets),
                   help="kept after round 1 and round 2 (default: the loop's, 0.7 0.6)")
    p.add_argument("--eval-samples", type=int, default=4, help="videos per eval prompt")
    p.add_argument("--eval-starts", action="store_true",
                   help="also evaluate each online arm's round-2 start (its trained round-1 student, pruned further)")
    p.add_argument("--loops", nargs="+", default=[], metavar="DIR",
                   help="only gather these online_loop.py work dirs (one seed each): per round, student - pruned")
    p.add_argument("--eval-args", default="", help="extra evaluate.py flags (e.g. sampling flags matching --loop-args)")
    return p


# ----------------------------------------------------------------------------- the statistics
def t_interval(values):
    """(mean, half-width of the t-based 95 % interval) of a few per-seed values; half-width None for n < 2."""
    values = [float(v) for v in values if v is not None]
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return mean, (T975[n - 2] if n - 1 <= len(T975) else 1.96) * sd / n ** 0.5


def paired(a, b):
    """Per-seed differences a - b (seeds present in both) and their (mean, t half-width)."""
    seeds = [s for s in a if s in b]
    diffs = [a[s] - b[s] for s in seeds]
    return diffs, t_interval(diffs)


def fmt(mean, half, sign=False):
    if mean is None:
        return "-"
    m = f"{mean:+.3f}" if sign else f"{mean:.3f}"
    return m if half is None else f"{m} ± {half:.3f}"


# ----------------------------------------------------------------------------- running one seed
def slug(name):
    return re.sub("-+", "-", "".join(c if c.isalnum() else "-" for c in name.lower())).strip("-")


def make_masks(seed_dir, seed, ratios):
    """Nested masks from one importance measurement on the teacher, laid out as a --masks-from dir.

    masks/importance.safetensors: prune.py on the teacher straight to the final ratio (its metadata
    holds the importance table, measured as toy/sweep.py measures it for a seed); round 1 and round
    2 are chosen from that table (round 2 from round 1's model), and one-shot takes round 2's mask.
    Every mask keeps the toy family's last temporal convolutions, as the loop's pruning does."""
    masks = os.path.join(seed_dir, "masks")
    imp = os.path.join(masks, "importance.safetensors")
    r1, r2 = os.path.join(masks, "round-1", "pruned.safetensors"), os.path.join(masks, "round-2", "pruned.safetensors")
    log = lambda name: os.path.join(masks, "logs", f"{name}.log")
    toy = models.get_family("toy")
    keep = ["--keep-temporal-convs", toy.keep_temporal_convs, "--keep-by", toy.keep_by]  # the loop's rule, in every mask
    online_loop.run_step("masks: importance on the teacher", imp,
                         ["prune.py", "--model", "toy", "--prompts", online_loop.TOY_PROMPTS["probe"],
                          "--target-ratio", ratios[-1], "--out", imp, "--seed", seed, *keep], log("importance"))
    online_loop.run_step("masks: round 1", r1, ["prune.py", "--model", "toy", "--importance-from", imp,
                                                "--target-ratio", ratios[0], "--out", r1, *keep], log("round-1"))
    online_loop.run_step("masks: round 2", r2, ["prune.py", "--model", "toy", "--student", r1, "--importance-from", imp,
                                                "--target-ratio", ratios[1], "--out", r2, *keep], log("round-2"))
    oneshot = os.path.join(masks, "oneshot", "pruned.safetensors")
    if not os.path.exists(oneshot):
        os.makedirs(os.path.dirname(oneshot), exist_ok=True)
        shutil.copyfile(r2, oneshot + ".tmp")  # the teacher's weights with round 2's mask
        os.replace(oneshot + ".tmp", oneshot)
    return masks


def share(src, dst, first):
    """Start `dst` from `src`'s finished data up to its first training (teacher cache, scores, and
    `first` round's prune/probe/prompts/pairs), copied, so arms that differ only later reuse it."""
    if os.path.exists(dst) or not os.path.exists(os.path.join(src, first, "pairs", "filtered.jsonl")):
        return
    os.makedirs(dst)
    for part in ("teacher_cache", "score_cache.jsonl"):
        if os.path.isdir(os.path.join(src, part)):
            shutil.copytree(os.path.join(src, part), os.path.join(dst, part))
        elif os.path.exists(os.path.join(src, part)):
            shutil.copyfile(os.path.join(src, part), os.path.join(dst, part))
    shutil.copytree(os.path.join(src, first), os.path.join(dst, first),
                    ignore=shutil.ignore_patterns("student.*", "eval", "redpo.log"))


def study_arms(args):
    """The arms of this study, in ARMS's order (all but --leave-out); a name that is no arm is a one-line error."""
    for flag, names in (("--arms", args.arms), ("--leave-out", args.leave_out)):
        unknown = [n for n in names if n not in ARMS]
        if unknown:
            raise models.UserError(f"{flag}: {', '.join(map(repr, unknown))} is no arm of the study "
                                   f"(arms: {', '.join(map(repr, ARMS))})")
    return [n for n in ARMS if n not in args.leave_out]


def final(seed_dir, name):
    rnd = "oneshot" if "--no-online" in ARMS[name] else "round-2"
    return os.path.join(seed_dir, slug(name), rnd, "student.safetensors")


def run_seed(args, seed):
    seed_dir = os.path.join(os.path.abspath(args.work_dir), f"seed-{seed}")
    masks = make_masks(seed_dir, seed, args.ratios)
    arms = study_arms(args)
    for name, flags in ARMS.items():
        if name not in args.arms or name not in arms:
            continue
        work = os.path.join(seed_dir, slug(name))
        if name in SHARE:
            share(os.path.join(seed_dir, slug(SHARE[name])), work, "oneshot" if "--no-online" in flags else "round-1")
        elif not os.path.exists(work) and os.path.isdir(os.path.join(seed_dir, slug("SFT one-shot"), "teacher_cache")):
            os.makedirs(work)  # the teacher's videos depend on (prompt, seed) only: shared by every arm
            shutil.copytree(os.path.join(seed_dir, slug("SFT one-shot"), "teacher_cache"),
                            os.path.join(work, "teacher_cache"))
        argv = ["--work-dir", work, "--seed", seed, "--masks-from", masks, "--eval-rounds", "none", *flags,
                *args.loop_args.split()]
        print(f"\n##### seed {seed}: {name}\n$ python online_loop.py {' '.join(map(str, argv))}", flush=True)
        t0 = time.time()
        online_loop.main(online_loop.get_parser().parse_args([str(a) for a in argv]))
        print(f"##### seed {seed}: {name} done in {time.time() - t0:.0f}s", flush=True)
    # every model of the seed in one evaluation: the same eval prompts, the same initial noise
    if args.no_evaluate:
        return
    if not all(os.path.exists(final(seed_dir, n)) for n in arms):
        print(f"##### seed {seed}: not every arm is trained yet; evaluation left for a later run")
        return
    starts = [n for n in ONLINE if n in arms] if args.eval_starts else []
    labels = ["untrained-pruned", *[slug(n) for n in arms], *[f"{slug(n)}-round-2-start" for n in starts]]
    ckpts = [os.path.join(masks, "oneshot", "pruned.safetensors"), *[final(seed_dir, n) for n in arms],
             *[os.path.join(seed_dir, slug(n), "round-2", "pruned.safetensors") for n in starts]]
    ran = online_loop.run_step("evaluate every arm", os.path.join(seed_dir, "eval", "report.json"),
                         ["evaluate.py", "--model", "toy", "--students", *ckpts, "--labels", *labels, "--prompts",
                          online_loop.TOY_PROMPTS["eval"], "--samples", args.eval_samples, "--out-dir",
                          os.path.join(seed_dir, "eval"), "--seed", seed, "--latency-repeats", 1, "--batch-size", 16,
                          *args.eval_args.split()],
                         os.path.join(seed_dir, "logs", "evaluate.log"))
    if ran and os.path.exists(os.path.join(seed_dir, "eval", "judge_parts.json")):  # an earlier evaluation's
        os.remove(os.path.join(seed_dir, "eval", "judge_parts.json"))
    seed_parts(os.path.join(seed_dir, "eval"))  # what the judge sees, read from the videos now: --gather reads it


# ----------------------------------------------------------------------------- a queue of units over the cores
# One core's seconds per unit on the toy at the defaults of 2026-12-03, two processes alone on 2 cores (the study
# in toy/study-runs, seeds 0-1, rounded): the queue's order, and its estimate of the time left, which scales them
# by the pace of the units done.
UNIT_SECONDS = {"masks": 470, "SFT one-shot": 460, "ReDPO one-shot": 300, "SFT online": 670,
                "V.I.P. (ReDPO online)": 490, "DPO online (no SFT term)": 350, "evaluate": 450}
unit_seconds = lambda u: UNIT_SECONDS.get(u[1], 60)  # a (seed, unit)'s estimate


def minutes_left(pending, running, took, jobs, now):
    """Minutes the queue has left at the pace so far: each unit's UNIT_SECONDS scaled by what the finished units took
    against theirs, less what the running units ({unit: start time}) have already run, spread over `jobs` processes.
    An estimate: it ignores that a unit may wait for another. Units done in under 30 s (a rerun finds them finished)
    do not set the pace."""
    est = unit_seconds
    took = {u: s for u, s in took.items() if s >= 30}
    scale = sum(took.values()) / sum(est(u) for u in took) if took else 1.0
    work = sum(est(u) for u in pending) * scale + sum(max(0.0, est(u) * scale - (now - t)) for u, t in running.items())
    return work / jobs / 60


def units(args):
    """The study as {(seed, unit): the units it waits for}: per seed the masks, each arm of the study that
    --arms asks for, then the evaluation. An arm waits for the masks and for the arm whose data it copies (SHARE;
    SFT online for SFT one-shot's teacher videos), so no unit reads what another is still writing."""
    arms = [n for n in study_arms(args) if n in args.arms]
    jobs = {}
    for s in args.seeds:
        jobs[(s, "masks")] = []
        if args.masks_only:
            continue
        for name in arms:
            first = SHARE.get(name, "SFT one-shot")
            jobs[(s, name)] = [(s, "masks"), *([(s, first)] if first in arms and first != name else [])]
        jobs[(s, "evaluate")] = [(s, n) for n in arms] or [(s, "masks")]
    return jobs


def unit_argv(args, seed, unit):
    """This script's command line that runs one unit."""
    argv = [sys.executable, os.path.abspath(__file__), "--seeds", str(seed), "--work-dir", os.path.abspath(args.work_dir),
            "--ratios", *map(str, args.ratios), "--eval-samples", str(args.eval_samples), f"--loop-args={args.loop_args}",
            f"--eval-args={args.eval_args}", *(["--leave-out", *args.leave_out] if args.leave_out else []),
            *(["--eval-starts"] if args.eval_starts else [])]
    if unit == "masks":
        return argv + ["--masks-only"]
    return argv + (["--arms"] if unit == "evaluate" else ["--arms", unit, "--no-evaluate"])


@contextlib.contextmanager
def stopping(running):
    """However the block ends, stop the units still in `running` ({unit: (process, log, ...)}) and close their logs."""
    try:
        yield
    finally:
        for proc, log, *_ in running.values():
            proc.terminate()
            proc.wait()
            log.close()


def run_jobs(args, argv_of=unit_argv):
    """Run units(args), --jobs at a time (processes; their output in WORK_DIR/logs/seed-S-UNIT.log), each once its
    prerequisites are done: the earliest seed's first (finished seeds are what a stopped study keeps), within a
    seed the one heading the longest remaining chain. A unit that fails stops the
    queue (the running ones finish) and is a one-line error naming its log. Ctrl-C or SIGTERM stops the running
    units too (each releases its loop's lock); a rerun skips what is finished, appending to the logs."""
    jobs = units(args)
    after = {u: [v for v, deps in jobs.items() if u in deps] for u in jobs}
    chain = {}

    def longest(u):  # seconds from u's start to the end of the longest chain through it
        if u not in chain:
            chain[u] = unit_seconds(u) + max([longest(v) for v in after[u]], default=0)
        return chain[u]

    logs = os.path.join(args.work_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    pending, running, failed, t0, took = dict(jobs), {}, [], time.time(), {}  # took: the units done, their seconds
    stamp = lambda: f"[{(time.time() - t0) / 60:5.1f} min]"
    with models.sigterm_exits(), stopping(running):  # SIGTERM, Ctrl-C or an error: no unit is left running
        while running or (pending and not failed):
            ready = sorted((u for u, deps in pending.items() if all(d in took for d in deps)),
                           key=lambda u: (args.seeds.index(u[0]), -longest(u), u))
            for u in ready[:max(0, args.jobs - len(running)) if not failed else 0]:
                del pending[u]
                log_path = os.path.join(logs, f"seed-{u[0]}-{slug(u[1])}.log")
                argv, log = argv_of(args, *u), open(log_path, "a")
                log.write(f"==== {datetime.datetime.now():%Y-%m-%d %H:%M:%S}: {shlex.join(argv)}\n")
                log.flush()
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                running[u] = (proc, log, log_path, time.time())
                print(f"{stamp()} seed {u[0]}: {u[1]} started ({len(running)} running, {len(pending)} waiting)",
                      flush=True)
            time.sleep(0.2)
            for u, (proc, log, log_path, t) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[u]
                if proc.returncode == 0:
                    took[u] = time.time() - t
                    waiting = {} if failed else pending  # after a failure nothing waiting will start
                    left = minutes_left(waiting, {v: r[3] for v, r in running.items()}, took, args.jobs, time.time())
                    eta = f" (about {left:.0f} min left at this pace)" if waiting or running else ""
                    print(f"{stamp()} seed {u[0]}: {u[1]} done in {took[u]:.0f}s{eta}", flush=True)
                else:
                    failed.append(f"seed {u[0]}: {u[1]} failed with exit code {proc.returncode}; its log is {log_path}")
                    print(f"{stamp()} {failed[-1]}", flush=True)
    if failed:
        raise models.UserError(failed[0] + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
    print(f"{stamp()} all {len(jobs)} units done ({args.jobs} at a time)", flush=True)


# ----------------------------------------------------------------------------- gathering
def entries(args, seed):
    """{row name: report entry} of one finished seed."""
    report = models.read_json(os.path.join(args.work_dir, f"seed-{seed}", "eval", "report.json"))
    by = {m["label"]: m for m in report["models"]}
    out = {"teacher": by["teacher"], "untrained pruned": by["untrained-pruned"]}
    out.update({name: by[slug(name)] for name in study_arms(args)})
    out.update({f"{name}: its round-2 start": by[f"{slug(name)}-round-2-start"] for name in ONLINE
                if f"{slug(name)}-round-2-start" in by})
    return out


def gather(args):
    per_seed = {s: entries(args, s) for s in args.seeds}
    names = list(per_seed[args.seeds[0]])
    score = lambda name, d: {s: per_seed[s][name]["scores"][d]["mean"] for s in args.seeds}
    lines = ["| model | params | VQ | TC | DD | TA | avg |", "|---|---|---|---|---|---|---|"]
    for name in names:
        params = {per_seed[s][name]["params"]["prunable"] for s in args.seeds}
        p = f"{min(params):,}" if len(params) == 1 else f"{min(params):,}-{max(params):,}"
        lines.append(f"| {name} | {p} | " + " | ".join(fmt(*t_interval(score(name, d).values())) for d in DIMS) + " |")
    diff_lines = ["| paired difference (per seed a - b) | avg ± 95 % | " + " | ".join(f"seed {s}" for s in args.seeds)
                  + " | VQ | TC | DD | TA |", "|---" * (6 + len(args.seeds)) + "|"]
    summary = {}
    for label, a, b in DIFFERENCES:
        if a not in names or b not in names:  # an arm this study leaves out
            continue
        diffs, (mean, half) = paired(score(a, "average"), score(b, "average"))
        summary[label] = {"mean": mean, "half": half, "per_seed": diffs}
        dims = [fmt(*paired(score(a, d), score(b, d))[1], sign=True) for d in models.DIMS]
        diff_lines.append(f"| {label} | {fmt(mean, half, sign=True)} | " + " | ".join(f"{d:+.3f}" for d in diffs)
                          + " | " + " | ".join(dims) + " |")
    return "\n".join(lines), "\n".join(diff_lines), summary


def seed_parts(eval_dir):
    """{model label: [color, shape, speed correct, px/frame of "slowly", of "quickly"]} of one seed's eval
    videos (the written mp4 files), kept in EVAL_DIR/judge_parts.json once computed (reading every video of
    a seed takes about a minute)."""
    from toy import world

    cache = os.path.join(eval_dir, "judge_parts.json")
    if os.path.exists(cache):
        return models.read_json(cache)
    rows, folder = {}, os.path.join(eval_dir, "videos")
    for label in sorted(os.listdir(folder)):
        files = sorted(os.listdir(os.path.join(folder, label)))
        prompts = [f.rsplit("-", 1)[0] for f in files]
        videos = np.stack(models.read_videos([os.path.join(folder, label, f) for f in files]))
        details = world.judge_details(videos, prompts)
        speeds = lambda word: [d["speed_px"] for d, p in zip(details, prompts) if p.endswith(word)]
        part = [np.mean([d[k] for d in details]) for k in ("color", "shape", "speed")]
        rows[label] = [float(v) for v in part + [np.mean(speeds("slowly")), np.mean(speeds("quickly"))]]
    models.write_json(cache, rows)
    return rows


def judge_parts(args):
    """What the toy judge sees in each model's eval videos (the written mp4 files): the share of videos with
    the prompted color, shape and speed, and the measured speed (px/frame) of "slowly" and "quickly"
    prompts; per model the mean over seeds of each seed's mean."""
    from toy import world

    rows = {}
    for seed in args.seeds:
        for label, part in seed_parts(os.path.join(args.work_dir, f"seed-{seed}", "eval")).items():
            rows.setdefault(label, []).append(part)
    order = ["teacher", "untrained-pruned", *[slug(n) for n in ARMS]]
    names = {"teacher": "teacher", "untrained-pruned": "untrained pruned", **{slug(n): n for n in ARMS}}
    lines = [f"| model | color correct | shape correct | speed correct | px/frame, \"slowly\" ({world.SPEEDS['slowly']:g}) "
             f"| \"quickly\" ({world.SPEEDS['quickly']:g}) |", "|---|---|---|---|---|---|"]
    for label in [l for l in order if l in rows]:
        lines.append(f"| {names[label]} | " + " | ".join(f"{v:.2f}" for v in np.mean(rows[label], axis=0)) + " |")
    return "\n".join(lines)


def eval_noise(report_path):
    """Standard error of one seed's gain student - pruned that comes from its eval videos alone: the gain is a
    mean over (prompt, sample) of per-video differences (the same initial noise for both models), so its se is
    their sd / sqrt(n). None when the report or a model is missing."""
    if not os.path.exists(report_path):
        return None
    videos = {m["label"]: m.get("videos") for m in models.read_json(report_path)["models"]}
    if not videos.get("pruned") or not videos.get("student"):
        return None
    avg = lambda v: sum(v[d] for d in models.DIMS) / len(models.DIMS)
    key = lambda v: (v["prompt"], v["sample"])
    pruned = {key(v): avg(v) for v in videos["pruned"]}
    diffs = [avg(v) - pruned[key(v)] for v in videos["student"] if key(v) in pruned]
    return float(np.std(diffs, ddof=1) / len(diffs) ** 0.5) if len(diffs) > 1 else None


def loop_gains(dirs):
    """Markdown table of finished online_loop.py runs (one seed a dir, their results.json): per round the
    pruned start's and the trained student's average, the paired gain student - pruned, and how much of the
    gain's spread over seeds is measurement: the eval videos' standard error of a seed's gain (root mean
    square over seeds) against the sd of the gains over seeds."""
    runs = []
    for d in dirs:
        path = os.path.join(d, "results.json")
        if not os.path.exists(path):
            raise models.UserError(f"{path}: no such file (is the loop in {d} finished?)")
        result = models.read_json(path)
        runs.append((result["args"]["seed"], {(r["round"], r["model"]): r["average"] for r in result["rows"]}))
    rounds = sorted({rnd for _, rows in runs for rnd, model in rows if model == "student"})
    lines = ["| round | pruned start | trained student | gain (student - pruned) ± 95 % | " +
             " | ".join(f"seed {seed}" for seed, _ in runs) + " | eval se of a seed's gain / sd over seeds |",
             "|---|---|---|---|" + "---|" * (len(runs) + 1)]
    for rnd in rounds:
        pruned = {k: rows.get((rnd, "pruned")) for k, (_, rows) in enumerate(runs)}  # by run: seeds may repeat
        student = {k: rows.get((rnd, "student")) for k, (_, rows) in enumerate(runs)}
        gains = {s: student[s] - pruned[s] if None not in (student[s], pruned[s]) else None for s in student}
        mean, half = t_interval(gains.values())  # paired per run; a run missing either score is left out
        ses = [eval_noise(os.path.join(d, rnd, "eval", "report.json")) for d in dirs]
        ses, known = [x for x in ses if x is not None], [g for g in gains.values() if g is not None]
        noise = (f"{np.sqrt(np.mean(np.square(ses))):.3f} / {np.std(known, ddof=1):.3f}"
                 if ses and len(known) > 1 else "-")
        lines.append(f"| {rnd} | {fmt(*t_interval(pruned.values()))} | {fmt(*t_interval(student.values()))} | "
                     f"{fmt(mean, half, sign=True)} | " + " | ".join(fmt(gains[k], None, sign=True) for k in gains) +
                     f" | {noise} |")
    return "\n".join(lines)


def main(args):
    t0 = time.time()
    args.out = args.out or os.path.join(HERE, "LOOPS.md" if args.loops else "STUDY.md")
    if args.loops:
        text = (f"# The toy loop as shipped, over seeds\n\nMade by `python toy/study.py {shlex.join(sys.argv[1:])}` on "
                f"{datetime.date.today()}: the toy judge's average on the 24 eval prompts, mean over the runs ± the "
                f"t-based 95 % interval; the gain is paired per seed.\n\n{loop_gains(args.loops)}\n")
        with models.atomic_path(args.out) as tmp, open(tmp, "w") as f:
            f.write(text)
        print(text)
        return
    study_arms(args)  # misspelt arm names stop here, before any work
    if args.jobs < 1:
        raise models.UserError(f"--jobs must be at least 1 (got {args.jobs})")
    if args.gather:
        pass
    elif args.jobs > 1:
        run_jobs(args)
    elif args.masks_only:
        for seed in args.seeds:
            make_masks(os.path.join(os.path.abspath(args.work_dir), f"seed-{seed}"), seed, args.ratios)
    else:
        for seed in args.seeds:
            run_seed(args, seed)
    reports = [os.path.join(args.work_dir, f"seed-{s}", "eval", "report.json") for s in args.seeds]
    if args.masks_only or not args.gather and not all(os.path.exists(r) for r in reports):
        return
    table, diffs, summary = gather(args)
    text = (f"# The toy study (paired over seeds)\n\nMade by `python toy/study.py {shlex.join(sys.argv[1:])}` on "
            f"{datetime.date.today()} ({platform.machine()}, {os.cpu_count()} CPU cores, torch "
            f"{__import__('torch').__version__}); seeds {args.seeds}. Scores: the toy judge on the 24 held-out eval "
            f"prompts; every number is a mean over seeds ± the t-based 95 % interval (t with n-1 degrees of "
            f"freedom).\n\n{table}\n\n{diffs}\n\nThe judge's parts, from the eval videos (mean over the seeds):\n\n"
            f"{judge_parts(args)}\n")
    if args.gather:
        with models.atomic_path(args.out) as tmp, open(tmp, "w") as f:
            f.write(text)
        models.write_json(os.path.join(args.work_dir, "study.json"), {"args": vars(args), "differences": summary})
    print("\n" + text + f"\n({time.time() - t0:.0f} s in this invocation)")


if __name__ == "__main__":
    models.cli(main, get_parser())
