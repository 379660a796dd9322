"""V.I.P.: the iterative online loop of prune -> pairs -> ReDPO (METHOD.md section 6).

    M_0 = teacher (frozen for the whole run)
    for i in 1..K:
        M_i     = prune(M_{i-1}')              # reward-drop importance, this round's budget
        targets = dims where score(M_i) < score(M_0) on the probe prompts
        prompts = curate(prompt pool, targets)
        pairs   = {(M_0(p), M_i(p)) : S(teacher) > S(student) > tau_p}   # losers are on-policy
        M_i'    = train M_i with ReDPO (reference = M_0) on pairs
        evaluate M_i'

Every step runs one stage script: as a separate process when --nproc > 1 (under torchrun) or with --isolate,
otherwise inside this process (the stage's own `main(args)`, its output logged the same way), which saves the
~10 s of importing torch, diffusers and transformers per step on a CPU. Every step's outputs live under
WORK_DIR/round-k/. A step is complete when its final file exists (stages write it last and atomically): a rerun
skips complete steps and redoes partial ones (ReDPO on vc2 / animatediff continues from its training state,
saved every 100 steps). The teacher's videos are cached in WORK_DIR/teacher_cache and reused by every round. It
ends by printing one table: per round, parameters, FLOPs, scores, pairs made and kept (also in WORK_DIR/results.md, .json).

Laptop (the embedded toy, minutes on a CPU):  python online_loop.py
Ablations:   python online_loop.py --loss sft    |   python online_loop.py --no-online
VC2, 1 GPU:  python online_loop.py --model vc2      (VideoScore reward, teacher and scorer from ckpt/, prompts/)
AnimateDiff: python online_loop.py --model animatediff
8 GPUs:      python online_loop.py ... --nproc 8     (each heavy stage runs under torchrun)
2 nodes:     python online_loop.py ... --nproc 8 --nnodes 2 --node-rank R --rdzv-endpoint NODE0:29500  (on each)

One loop per work dir: it holds WORK_DIR/loop.lock (pid, host) from its first write to its exit (SIGTERM included);
a second loop there stops at once; a lock whose process is gone from this host is taken over. Many nodes on a shared
filesystem: the same command runs on every node with its own --node-rank (node R > 0 locks
WORK_DIR/loop.nodeR.lock). Every heavy step (evaluate, make pairs, filter, redpo) runs under torchrun on all nodes,
joined by a c10d rendezvous at --rdzv-endpoint; the light single-process steps (prune, curate, keeping the pruned
student, the results) run on node 0 alone while the other nodes wait for their file.
"""
import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import models
import rewards

HERE = os.path.dirname(os.path.abspath(__file__))
TOY_PROMPTS = {k: os.path.join(HERE, "toy", "prompts", f"{k}.txt") for k in ("pool", "probe", "eval")}
# vc2 / animatediff defaults: tools/make_prompts.py's files, and local folders relative to the current directory,
# each with how to make it (the message when it is missing)
REAL_PROMPTS = {k: os.path.join(HERE, "prompts", f"{k}.txt") for k in ("pool", "probe", "eval")}
CKPT = {"vc2": {"teacher": "ckpt/vc2"},
        "animatediff": {"teacher": "ckpt/sd15", "motion_adapter": "ckpt/animatediff-v1-5-2"},
        "videoscore": "ckpt/VideoScore"}
CKPT_HOW = {
    "ckpt/vc2": "download model.ckpt of VideoCrafter/VideoCrafter2 (hf download VideoCrafter/VideoCrafter2 model.ckpt "
                "--local-dir ckpt/VideoCrafter2), then convert it: python tools/convert_vc2.py --ckpt "
                "ckpt/VideoCrafter2/model.ckpt --out ckpt/vc2",
    "ckpt/sd15": "download stable-diffusion-v1-5/stable-diffusion-v1-5 into it "
                 "(hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir ckpt/sd15)",
    "ckpt/animatediff-v1-5-2": "download guoyww/animatediff-motion-adapter-v1-5-2 into it (hf download "
                               "guoyww/animatediff-motion-adapter-v1-5-2 --local-dir ckpt/animatediff-v1-5-2)",
    "ckpt/VideoScore": "download TIGER-Lab/VideoScore into it (hf download TIGER-Lab/VideoScore --local-dir ckpt/VideoScore)",
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", choices=list(models.FAMILIES), help="model family")
    p.add_argument("--teacher", default="", help="teacher folder (default: toy/teacher; vc2 ckpt/vc2; animatediff ckpt/sd15)")
    p.add_argument("--motion-adapter", default="", help="MotionAdapter folder or .ckpt (animatediff; default ckpt/animatediff-v1-5-2)")
    p.add_argument("--work-dir", default="runs/vip", help="every round's outputs go under this folder")
    p.add_argument("--rounds", type=int, default=0, help="online rounds K (0 = the paper's: vc2 2, animatediff 3)")
    p.add_argument("--final-ratio", type=float, default=0.0,
                   help="prunable parameters kept after the last round (0 = the paper's: vc2 0.638, animatediff 0.325)")
    p.add_argument("--schedule", default="", choices=["linear", "geometric"], help="per-round budget to --final-ratio: "
                   "equal parameter cuts (the default), or an equal fraction kept each round")
    p.add_argument("--budgets", type=float, nargs="+", default=[], metavar="R", help="the fraction kept after each round, "
                   "decreasing, in place of --rounds, --final-ratio, --schedule (default: toy 0.7 0.6 unless one of those is given)")
    p.add_argument("--no-online", action="store_true", help="ablation: prune once to the final size, train once (as the last round)")
    p.add_argument("--loss", nargs="+", default=["redpo"], choices=["redpo", "dpo", "sft"],
                   help="training loss (sft and dpo: ablations), one for every round or one per round, as --lr")
    p.add_argument("--beta", type=float, nargs="+", default=[], help="DPO temperature, per round as --lr "
                   "(0 = the family's: toy 500, others 5000)")
    p.add_argument("--w-sft", type=float, default=1.0, help="SFT weight in ReDPO")
    p.add_argument("--reference", default="student0", choices=["teacher", "student0"], help="DPO reference: the round's pruned "
                   "student (Diffusion-DPO's convention; chosen on the toy's validation prompts) or the teacher M_0 (the paper's)")
    p.add_argument("--uncond-prob", type=float, default=0.1, help="prompt dropout in ReDPO (trains the CFG branch)")
    p.add_argument("--sft-cfg", type=float, default=-1.0, help="SFT on the teacher's CFG-guided prediction at this scale "
                   "(redpo.py; 0 = on the conditional one, the paper's; -1 = the family's: toy 6, chosen on validation, others 0)")
    p.add_argument("--train-steps", type=int, nargs="+", default=[], metavar="N", help="ReDPO optimizer steps: one for "
                   "every round, or one per round as --lr (0 = the family's: toy 60 180, others 30)")
    p.add_argument("--train-batch-size", type=int, default=4, help="pairs per ReDPO step and process (x --nproc)")
    p.add_argument("--lr", type=float, nargs="+", default=[], metavar="LR", help="ReDPO learning rate: one for every round, or "
                   "one per round (the last for later rounds and one-shot) (default: toy 1e-4, vc2 6e-6, animatediff 1e-5)")
    p.add_argument("--lr-schedule", nargs="+", default=[], choices=["constant", "cosine"], help="redpo.py's (constant), per round as --lr")
    p.add_argument("--train-layers", nargs="+", default=["all"], choices=["all", "temporal"], help="what ReDPO trains "
                   "(redpo.py): one for every round or one per round, as --lr (default: all; toy/RESULTS.md)")
    p.add_argument("--sft-on", nargs="+", default=[], choices=["winners", "both"], help="SFT on the winners (the "
                   "paper's) or on both members (redpo.py), per round as --lr (default: toy both, others winners)")
    p.add_argument("--interpolate", type=float, nargs="+", default=[], metavar="A", help="redpo.py's: write pruned start + A "
                   "(trained - start), per round as --lr (default 1, off; toy/RESULTS.md row 53)")
    p.add_argument("--sft-branches", action=argparse.BooleanOptionalAction, default=None, help="redpo.py --sft-branches "
                   "(guided SFT on each branch too) in every round (default: the family's: toy on, others off)")
    p.add_argument("--samples-per-prompt", type=int, default=0, help="pairs per curated prompt, each its own seed (0 = toy 2, others 1)")
    p.add_argument("--importance", default="reward", choices=["reward", "output"], help="pruning importance")
    p.add_argument("--prompt-pool", default="", help="pair prompts (default: toy/prompts/pool.txt; others prompts/pool.txt)")
    p.add_argument("--probe-prompts", default="", help="importance and targets (default: toy/prompts/probe.txt; others prompts/)")
    p.add_argument("--eval-prompts", default="", help="held-out eval prompts (default: toy/prompts/eval.txt; others prompts/)")
    p.add_argument("--max-pair-prompts", type=int, default=0, help="curated prompts made into pairs per round (0 = all, the default)")
    p.add_argument("--num-probe", type=int, default=8, help="probe prompts used for pruning importance")
    p.add_argument("--probe-seeds", type=int, nargs="+", default=[2, 4], help="importance seed sets, per round as --lr (2 4)")
    p.add_argument("--keep-temporal-convs", type=int, default=-1, metavar="N", help="pruning never removes the last "
                   "N temporal convs (prune.py's; -1 = the family's: toy 1, chosen on validation, others 0, the paper's)")
    p.add_argument("--keep-by", default="", choices=["importance", "alone"], help="prune.py's (the family's: toy alone)")
    p.add_argument("--masks-from", default="", help="a work dir whose round-k/pruned.safetensors masks this run reuses")
    p.add_argument("--eval-samples", type=int, default=0, help="videos per eval prompt (0 = toy 4, other families 1)")
    p.add_argument("--eval-rounds", default="all", choices=["all", "last", "none"],
                   help="evaluate every round's pruned and trained student, the last round's, or none (then no teacher)")
    p.add_argument("--scorer", default="", choices=["", *rewards.SCORERS], metavar="{" + ",".join(rewards.SCORERS) + "}",
                   help="reward model (rewards.py; default: toy for the toy, else videoscore as the paper)")
    p.add_argument("--scorer-path", default="",
                   help="scorer weights (videoscore: a folder, default ckpt/VideoScore; clip: ARCH:FILE or a folder)")
    p.add_argument("--tau", type=float, default=0.0, help="pair filter floor tau_p: keep S(w) > S(l) > tau")
    p.add_argument("--guard", type=float, default=None, metavar="M", help="pair filter: also drop a pair whose winner is more "
                   "than M below its loser on any dimension (filter_pairs.py; default off: no help on the toy's validation)")
    p.add_argument("--no-filter", action="store_true", help="ablation: train on every pair (scored, none dropped)")
    models.add_sampling_args(p)
    p.add_argument("--probe-steps", type=int, default=0, help="DDIM steps of pruning's probe videos (0 = --steps)")
    p.add_argument("--nproc", type=int, default=1, help="processes per heavy stage (torchrun) ")
    p.add_argument("--isolate", action="store_true", help="run every stage as its own process even with --nproc 1")
    p.add_argument("--nnodes", type=int, default=1, help="nodes the heavy stages span (start the loop on each)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank (node 0 runs the light steps)")
    p.add_argument("--rdzv-endpoint", default="", help="node 0's HOST:PORT for torchrun's c10d rendezvous (--nnodes > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p


# ----------------------------------------------------------------------------- running steps
class _Tee:
    """A stream for an in-process step: everything to the log, lines to the console indented, a
    progress bar's carriage-return updates shown only in their final state (as for a process)."""

    def __init__(self, log, console):
        self.log, self.console, self.pending = log, console, ""

    def write(self, text):
        self.log.write(text)
        self.log.flush()  # a progress bar's state is in the log as it happens
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.console.write("       " + line.split("\r")[-1] + "\n")
        return len(text)

    def flush(self):
        self.log.flush()
        self.console.flush()

    def isatty(self):
        return False


def run_inline(argv, log):
    """Run a stage's main(args) in this process; returns its exit code (2 for a one-line error)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    module = importlib.import_module(os.path.splitext(argv[0])[0])  # stage scripts do nothing on import
    tee = _Tee(log, sys.stdout)
    with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
        try:
            code = models.run_main(module.main, module.get_parser().parse_args([str(a) for a in argv[1:]]))
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
        finally:
            if tee.pending:
                tee.write("\n")
    return code


def launcher(nproc, nnodes=1, endpoint="", run_id="vip"):
    """The command that starts a stage script: Python, under torchrun for several processes or nodes."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes > 1:  # every node's torchrun joins one rendezvous (c10d numbers the nodes); one run id per step
        return torchrun + [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                           f"--rdzv-id={run_id}"]
    return torchrun + ["--standalone"] if nproc > 1 else [sys.executable]


def run_step(name, marker, argv, log_path, nproc=1, isolate=False, launch=None):
    """Run one stage unless `marker` exists (as a process started by `launch`, default launcher(nproc), when
    that is torchrun or with isolate, else in this process); stream and save its output."""
    if os.path.exists(marker):
        print(f"[skip] {name}: {os.path.relpath(marker)} exists")
        return False
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"[run ] {name}: {' '.join(argv[:1] + [str(a) for a in argv[1:]])}", flush=True)
    t0 = time.time()
    launch = launch or launcher(nproc)
    with open(log_path, "w") as log:
        if len(launch) > 1 or isolate:
            cmd = launch + [os.path.join(HERE, argv[0])] + [str(a) for a in argv[1:]]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=HERE,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                for raw in proc.stdout:  # bytes split on "\n" only: a progress bar's "\r" updates stay one line
                    line = raw.decode(errors="replace")
                    log.write(line)
                    sys.stdout.write("       " + line.split("\r")[-1])  # a progress bar shows its final state
                code = proc.wait()
            finally:  # the loop stops (an error, Ctrl-C, SIGTERM): its stage stops too, not left running
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
        else:
            code = run_inline(argv, log)
    if code != 0:
        raise models.UserError(f"step '{name}' failed with exit code {code}; its log is {log_path}")
    print(f"       {name} done in {time.time() - t0:.0f}s", flush=True)
    return True


def wait_for(name, marker, work, poll=10.0, grace=300.0):
    """Node rank > 0: wait until node 0 has made `marker`; stop if node 0's loop is gone (no lock for `grace` s)."""
    if os.path.exists(marker):
        print(f"[skip] {name}: {os.path.relpath(marker)} exists")
        return
    print(f"[wait] {name}: node 0 makes {os.path.relpath(marker)}", flush=True)
    lock, t0, seen = os.path.join(work, "loop.lock"), time.time(), time.time()
    while not os.path.exists(marker):
        if os.path.exists(lock):
            seen = time.time()
        elif time.time() - seen > grace:
            raise models.UserError(f"{marker}: node 0 did not make it and its loop is not running (no {lock} "
                                   f"for {grace:.0f}s); see node 0's output")
        time.sleep(poll)
    print(f"       {name}: ready after {time.time() - t0:.0f}s", flush=True)


def count_lines(path):
    return sum(1 for ln in models.read_lines(path) if ln.strip()) if os.path.exists(path) else 0


def check_work_dir(args, path):
    """A work dir belongs to one configuration: refuse to mix results made with other arguments."""
    mine = {k: v for k, v in vars(args).items()
            if k not in ("nproc", "device", "isolate", "nnodes", "node_rank", "rdzv_endpoint")}
    if os.path.exists(path):
        made, now, parser = dict(models.read_json(path)), dict(mine), get_parser()
        for d, k in [(d, k) for d in (made, now) for k in ("train_steps", "beta", "loss")]:  # a scalar: recorded
            v = d.get(k, parser.get_default(k))  # before the flag went per round; all 0 = the default
            v = v if isinstance(v, list) else [v]
            d[k] = v if any(v) else []
        for d in ([] if models.get_family(args.model).budgets else (made, now)):  # a family without budgets:
            d["schedule"] = d.get("schedule") or "linear"  # "" is linear, which records made before 2026-12-04 name
        diff = models.first_change(made, now, parser)
        if diff:
            raise models.UserError(f"{path}: this work dir was made with --{diff[0].replace('_', '-')}={diff[1]!r}, "
                                   f"not {diff[2]!r}; use another --work-dir")
    else:
        models.write_json(path, mine)


def round_rows(work, round_names):
    """One table row per model: the teacher, then each round's pruned and trained student."""
    rows = []
    for name, label in [("round-0", "teacher")] + [(r, m) for r in round_names for m in ("pruned", "student")]:
        path = os.path.join(work, name, "eval", "report.json")
        if not os.path.exists(path):
            continue
        report = models.read_json(path)
        entry = next((m for m in report["models"] if m["label"] == label), None)
        if entry is None:
            continue
        pairs_dir = os.path.join(work, name, "pairs")
        rows.append({"round": name, "model": label, "params": entry["params"]["prunable"],
                     "flops": (entry["flops"] or {}).get("unet_forward"),
                     **{d: entry["scores"][d]["mean"] for d in (*models.DIMS, "average")},
                     "pairs_made": count_lines(os.path.join(pairs_dir, "pairs.jsonl")) if label == "student" else None,
                     "pairs_kept": count_lines(os.path.join(pairs_dir, "filtered.jsonl")) if label == "student" else None})
    return rows


def table(rows):
    head = "| round | model | params | GFLOPs | " + " | ".join(models.DIM_SHORT.values()) + " | avg | pairs made | kept |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        lines.append(f"| {r['round']} | {r['model']} | {fmt(r['params'], ',')} | {fmt(r['flops'] and r['flops'] / 1e9, '.3f')} | "
                     + " | ".join(fmt(r[d], ".3f") for d in (*models.DIMS, "average"))
                     + f" | {fmt(r['pairs_made'], 'd')} | {fmt(r['pairs_kept'], 'd')} |")
    return "\n".join(lines)


def main(args):
    """Run the loop holding the work dir's lock (taken once the inputs are checked), released however it ends;
    SIGTERM (a cluster's time limit, scancel) ends it like an error, releasing it and stopping the stage."""
    name = f"loop.node{args.node_rank}.lock" if args.node_rank else "loop.lock"
    lock = os.path.join(os.path.abspath(args.work_dir), name)
    with models.sigterm_exits():
        try:
            loop(args, lock)
        finally:
            models.release_lock(lock)


FREE = {"redpo": ("out", "student", "pairs", "teacher", "motion_adapter", "device", "save_every", "log_every"),
        "prune": ("out", "student", "teacher", "motion_adapter", "device", "prompts", "scorer_path", "layers_from",
                  "importance_from")}  # paths: a clone moved elsewhere resumes


def made_otherwise(path, argv, verb):
    """Refuse the round's model at `path` if `argv`, this run's prune.py or redpo.py command for it, would make it otherwise
    (settings only: paths, device, logging are free); a model another stage made (a pruned one kept as the student) passes."""
    stage, meta = os.path.splitext(argv[0])[0], models.read_student_meta(path) if os.path.exists(path) else {}
    if meta.get("stage") != stage:
        return
    parser = importlib.import_module(stage).get_parser()
    now = vars(parser.parse_args([str(a) for a in argv[1:]]))
    diff = models.first_change(json.loads(meta["args"]), now, parser, skip=FREE[stage])
    if diff:  # e.g. a family default changed since this work dir was made: not this run's model
        raise models.UserError(f"{path}: {verb} with --{diff[0].replace('_', '-')} {diff[1]}, not {diff[2]}; "
                               "use another --work-dir")


def per_round(values, k):
    """The value for online round k (1-based) of a per-round list; a list shorter than the rounds repeats its last."""
    return values[min(k, len(values)) - 1]


def loop(args, lock):
    family = models.get_family(args.model)
    budgets = models.round_budgets(family, args.budgets, args.rounds, args.final_ratio, args.schedule)
    rounds_online, final = len(budgets), (budgets or [0])[-1]
    rounds = 1 if args.no_online else rounds_online
    toy = args.model == "toy"
    checks = [(f"--{f.replace('_', '-')}", v if isinstance(v, list) else [v], lambda x: x >= 0, ">= 0 (0 = the default)")
              for f in ("rounds", "max_pair_prompts", "samples_per_prompt", "train_steps", "eval_samples") for v in [getattr(args, f)]]
    alone = budgets == sorted(set(budgets), reverse=True) and not (args.rounds or args.final_ratio or args.schedule)
    checks += [("--budgets", args.budgets, lambda v: alone and 0 < v < 1, "decreasing, in (0, 1), without --rounds, "
                "--final-ratio, --schedule"),  # before --final-ratio: with --budgets the final ratio is their last
               ("--final-ratio", [final], lambda v: 0 < v < 1, "in (0, 1)"), ("--lr", args.lr, lambda v: v > 0, "> 0"),
               ("--interpolate", args.interpolate, lambda v: 0 < v <= 1, "in (0, 1]"),
               ("--guard", [] if args.guard is None else [args.guard], lambda v: v >= 0, ">= 0")]  # NaN fails each
    for flag, values, ok, rule in checks:  # before any work
        if not all(map(ok, values)):
            raise models.UserError(f"{flag} must be {rule} (got {' '.join(f'{v:g}' for v in values)})")
    per_prompt = args.samples_per_prompt or family.pairs_per_prompt
    keep_convs = family.keep_temporal_convs if args.keep_temporal_convs < 0 else args.keep_temporal_convs
    sft_cfg = family.sft_cfg if args.sft_cfg < 0 else args.sft_cfg
    branches = (family.sft_branches and sft_cfg > 0) if args.sft_branches is None else args.sft_branches
    if branches and not sft_cfg:
        raise models.UserError("--sft-branches needs guided SFT (--sft-cfg > 0)")
    eval_samples = args.eval_samples or family.eval_samples
    # Defaults: the toy's shipped teacher, prompts and judge; for vc2 / animatediff the paper's reward
    # (VideoScore), tools/make_prompts.py's files and the conventional folders under ./ckpt.
    prompts = TOY_PROMPTS if toy else REAL_PROMPTS
    pool = args.prompt_pool or prompts["pool"]
    probe = args.probe_prompts or prompts["probe"]
    evalp = args.eval_prompts or prompts["eval"]
    ckpt = CKPT.get(args.model, {})
    teacher = args.teacher or family.default_teacher or ckpt["teacher"]
    adapter = args.motion_adapter or ckpt.get("motion_adapter", "")
    scorer_name = args.scorer or ("toy" if toy else "videoscore")
    scorer_path = args.scorer_path or (CKPT["videoscore"] if scorer_name == "videoscore" else "")
    # every folder the run needs, checked before any work starts: one line naming each missing one
    needed = [("--teacher", teacher, os.path.isdir)]
    if args.model == "animatediff":
        needed.append(("--motion-adapter", adapter, os.path.exists))  # a folder or an original .ckpt
    if scorer_name == "videoscore":
        needed.append(("--scorer-path", scorer_path, os.path.isdir))
    how = {**CKPT_HOW, family.default_teacher: "the toy teacher ships in toy/teacher; see README"}
    missing = [f"{path}: not found; {how.get(os.path.normpath(path), f'pass {flag}')}"
               for flag, path, exists in needed if not exists(path)]
    if missing:
        raise models.UserError(" | ".join(missing))
    if scorer_name == "videoscore":
        rewards.videoscore_shards(scorer_path)  # a folder missing a file: names it
    for path in (pool, probe, evalp):
        models.read_prompts(path)  # fail early on a bad prompt file
    resolved = {"teacher": teacher, "motion_adapter": adapter, "scorer": scorer_name, "scorer_path": scorer_path,
                "prompt_pool": pool, "probe_prompts": probe, "eval_prompts": evalp}
    if args.masks_from and not os.path.isdir(args.masks_from):
        raise models.UserError(f"--masks-from {args.masks_from}: no such work dir")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise models.UserError(f"--node-rank {args.node_rank} is not in 0..{args.nnodes - 1} (--nnodes {args.nnodes})")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise models.UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's host and a free port, on every node)")
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    models.take_lock(lock)
    # the work dir records the scorer resolved (its default depends on the family), the rest as given
    record = os.path.join(work, "loop.args.json")
    if args.node_rank:  # node 0 writes the record, the other nodes check against it
        wait_for("work dir record", record, work)
    check_work_dir(argparse.Namespace(**{**vars(args), "scorer": scorer_name, "scorer_path": scorer_path}), record)

    # the defaults are relative to this directory: stages get them absolute (a process runs in the repository)
    absolute = lambda given, path: path if given else os.path.abspath(path)
    base = ["--model", args.model, "--teacher", absolute(args.teacher, teacher), "--device", args.device,
            "--precision", args.precision]
    if adapter:
        base += ["--motion-adapter", absolute(args.motion_adapter, adapter)]
    sampling = [x for f in ("steps", "cfg", "eta", "frames", "height", "width") if getattr(args, f) not in (0, 0.0, -1.0)
                for x in (f"--{f}", getattr(args, f))] + (["--no-x0-rescale"] if args.no_x0_rescale else [])  # given only
    scorer = ["--scorer", scorer_name] + (["--scorer-path", absolute(args.scorer_path, scorer_path)] if scorer_path else [])
    probe_sampling = sampling + (["--steps", args.probe_steps] if args.probe_steps else [])

    seconds = {}  # where the time goes: each step run here, by name (results.json)

    def run(name, marker, argv, log, nproc=0):
        """nproc 0: a light step, run by node 0 alone; else a heavy one, under torchrun on every node."""
        t = time.time()
        if not nproc:
            ran = wait_for(name, marker, work) if args.node_rank else run_step(name, marker, argv, log,
                                                                               isolate=args.isolate)
        else:
            run_id = re.sub(r"[^A-Za-z0-9]+", "-", os.path.relpath(marker, work))  # the same on every node
            ran = run_step(name, marker, argv, log[:-len(".log")] + f".node{args.node_rank}.log" if args.node_rank
                           else log, nproc, args.isolate, launcher(nproc, args.nnodes, args.rdzv_endpoint, run_id))
        seconds[name] = seconds.get(name, 0) + (time.time() - t if ran else 0)  # summed over the rounds
    t0 = time.time()

    # Round 0: the teacher's own scores and cost on the eval prompts, once.
    r0 = os.path.join(work, "round-0")
    if args.eval_rounds != "none":
        run("evaluate teacher", os.path.join(r0, "eval", "report.json"),
            ["evaluate.py", *base, "--prompts", evalp, "--out-dir", os.path.join(r0, "eval"), *scorer, *sampling,
             "--samples", eval_samples, "--seed", args.seed], os.path.join(r0, "logs", "evaluate.log"), nproc=args.nproc)

    names, previous = [], ""
    ratios = [final] if args.no_online else budgets
    for k, ratio in enumerate(ratios, 1):
        name = "oneshot" if args.no_online else f"round-{k}"
        names.append(name)
        rd = os.path.join(work, name)
        log = lambda step: os.path.join(rd, "logs", f"{step}.log")
        pruned, student = os.path.join(rd, "pruned.safetensors"), os.path.join(rd, "student.safetensors")
        report = os.path.join(rd, "probe", "report.json")
        pairs, kept = os.path.join(rd, "pairs", "pairs.jsonl"), os.path.join(rd, "pairs", "filtered.jsonl")
        print(f"\n=== {name}: prune to {ratio:.3f} of the teacher's prunable parameters ===")
        if args.masks_from:  # the other run's mask for this round, applied to this run's own student
            mask = os.path.join(os.path.abspath(args.masks_from), name, "pruned.safetensors")
            if not os.path.exists(mask):
                raise models.UserError(f"--masks-from {args.masks_from}: no {name}/pruned.safetensors there")
            how = ["--layers-from", mask]
        else:
            how = ["--prompts", probe, "--num-prompts", args.num_probe, "--probe-seeds", per_round(args.probe_seeds, k),
                   "--importance", args.importance, "--keep-temporal-convs", keep_convs,
                   "--keep-by", args.keep_by or family.keep_by, *scorer, "--target-ratio", ratio]
        prune = ["prune.py", *base, *(["--student", previous] if previous else []), *how, "--out", pruned,
                 *probe_sampling, "--seed", args.seed]
        made_otherwise(pruned, prune, "pruned")
        run("prune", pruned, prune, log("prune"))
        run("probe evaluation", report,
            ["evaluate.py", *base, "--students", pruned, "--labels", "pruned", "--prompts", probe, "--out-dir",
             os.path.join(rd, "probe"), *scorer, *sampling, "--no-efficiency", "--no-side-by-side",
             "--seed", args.seed], log("probe"), nproc=args.nproc)
        curated = os.path.join(rd, "prompts.txt")
        run("curate prompts", curated,
            ["filter_pairs.py", "--job", "curate", "--prompts", pool, "--report", report, "--out", curated,
             "--max-prompts", args.max_pair_prompts, "--seed", args.seed * 1000 + k], log("curate"))
        run("make pairs", pairs, ["make_pairs.py", *base, "--student", pruned, "--prompts", curated, "--out-dir",
             os.path.join(rd, "pairs"), "--teacher-cache", os.path.join(work, "teacher_cache"), *sampling,
             "--samples-per-prompt", per_prompt, "--round", k, "--seed", args.seed], log("make_pairs"), nproc=args.nproc)
        run("filter pairs", kept,
            ["filter_pairs.py", "--job", "filter", "--pairs", pairs, "--report", report, "--out", kept, *scorer,
             "--score-cache", os.path.join(work, "score_cache.jsonl"), *(["--keep-all"] if args.no_filter else []),
             "--tau", args.tau, *(["--guard", args.guard] if args.guard is not None else []), "--device", args.device],
            log("filter"), nproc=args.nproc)
        k_train = rounds_online if args.no_online else k  # one-shot trains with the last round's settings
        steps = per_round(args.train_steps or [0], k_train) or per_round(family.train_steps, k_train)
        train = ["redpo.py", *base, "--student", pruned, "--pairs", kept, "--out", student, "--loss", per_round(args.loss, k_train),
                 "--beta", per_round(args.beta or [0], k_train) or family.beta, "--w-sft", args.w_sft, "--reference", args.reference,
                 "--uncond-prob", args.uncond_prob, "--sft-cfg", sft_cfg, "--max-steps", steps,
                 "--batch-size", args.train_batch_size, "--lr", per_round(args.lr or [family.lr], k_train),
                 "--lr-schedule", per_round(args.lr_schedule or family.lr_schedule, k_train),
                 "--seed", args.seed, "--train-layers", per_round(args.train_layers, k_train),
                 "--sft-on", per_round(args.sft_on or [family.sft_on], k_train), *(["--sft-branches"] if branches else []),
                 "--interpolate", per_round(args.interpolate or [1.0], k_train),
                 *([] if toy else ["--save-every", 100])]  # real runs: a rerun of the loop resumes inside ReDPO
        made_otherwise(student, train, "trained")
        if not os.path.exists(student):
            nothing = count_lines(kept) == 0  # nothing to learn from: the round keeps the pruned student
            if nothing and args.node_rank:
                wait_for("keep the pruned student", student, work)
            elif nothing:
                print(f"[warn] {name}: no pair passed the filter; the round's student is the pruned model")
                shutil.copyfile(pruned, student + ".tmp")
                os.replace(student + ".tmp", student)
            else:
                run("redpo", student, train, log("redpo"), nproc=args.nproc)
        if args.eval_rounds == "all" or (args.eval_rounds == "last" and k == len(ratios)):
            run("evaluate", os.path.join(rd, "eval", "report.json"),
                ["evaluate.py", *base, "--no-teacher", "--students", pruned, student, "--labels", "pruned", "student",
                 "--prompts", evalp, "--out-dir", os.path.join(rd, "eval"), *scorer, *sampling,
                 "--samples", eval_samples, "--seed", args.seed], log("evaluate"), nproc=args.nproc)
        previous = student

    if args.node_rank:
        print(f"\nnode {args.node_rank}: every step done in {time.time() - t0:.0f}s; node 0 writes the results")
        return
    rows = round_rows(work, names)
    text = table(rows)
    models.write_json(os.path.join(work, "results.json"), {"args": vars(args), "resolved": resolved, "rows": rows,
                                                            "seconds": {k: round(v, 1) for k, v in seconds.items()}})
    with models.atomic_path(os.path.join(work, "results.md")) as tmp, open(tmp, "w") as f:
        f.write(f"V.I.P. on {args.model}: {'one-shot (no online)' if args.no_online else f'{rounds} online rounds'}, "
                f"loss {' '.join(args.loss)}, final ratio {final:.3f}, scorer {scorer_name}\n\n{text}\n")
    print(f"\n{text}\n\nV.I.P. finished in {time.time() - t0:.0f}s (" + ", ".join(
        f"{k} {v:.0f}s" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1]) if v >= 0.5)
        + f"); results in {os.path.relpath(work)}/results.md")


if __name__ == "__main__":
    models.cli(main, get_parser())
