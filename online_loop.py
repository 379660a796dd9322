"""V.I.P.: the iterative online loop of prune -> pairs -> ReDPO (METHOD.md section 6).

    M_0 = teacher (frozen for the whole run)
    for i in 1..K:
        M_i     = prune(M_{i-1}')              # reward-drop importance, this round's budget
        targets = dims where score(M_i) < score(M_0) on the probe prompts
        prompts = curate(prompt pool, targets)
        pairs   = {(M_0(p), M_i(p)) : S(teacher) > S(student) > tau_p}   # losers are on-policy
        M_i'    = train M_i with ReDPO (reference = M_0) on pairs
        evaluate M_i'

Every step is a separate process running one stage script (so each can run under torchrun), and
every step's outputs live under WORK_DIR/round-k/. A step is complete when its final file exists
(stages write it last and atomically): a rerun skips complete steps and redoes partial ones.
The teacher's videos are cached in WORK_DIR/teacher_cache and reused by every round. It ends by
printing one table: per round, parameters, FLOPs, the four scores and their average, pairs made
and kept (also written to WORK_DIR/results.md and results.json).

Laptop (the embedded toy, minutes on a CPU):  python online_loop.py
Ablations:   python online_loop.py --loss sft    |   python online_loop.py --no-online
VC2, 1 GPU:  python online_loop.py --model vc2 --teacher ckpt/vc2 --prompt-pool pool.txt \
                 --probe-prompts probe.txt --eval-prompts eval.txt --scorer clip --scorer-path ViT-H-14:clip.safetensors
8 GPUs:      python online_loop.py ... --nproc 8     (each heavy stage runs under torchrun)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import models

HERE = os.path.dirname(os.path.abspath(__file__))
TOY_PROMPTS = {"pool": os.path.join(HERE, "toy", "prompts", "train.txt"),
               "probe": os.path.join(HERE, "toy", "prompts", "probe.txt"),
               "eval": os.path.join(HERE, "toy", "prompts", "eval.txt")}
DIM_SHORT = models.DIM_SHORT


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", choices=list(models.FAMILIES), help="model family")
    p.add_argument("--teacher", default="", help="teacher folder (default: the family's shipped teacher)")
    p.add_argument("--motion-adapter", default="", help="MotionAdapter folder (animatediff)")
    p.add_argument("--work-dir", default="runs/vip", help="every round's outputs go under this folder")
    p.add_argument("--rounds", type=int, default=0, help="online rounds K (0 = the paper's: vc2 2, animatediff 3)")
    p.add_argument("--final-ratio", type=float, default=0.0,
                   help="prunable parameters kept after the last round (0 = the paper's: vc2 0.638, animatediff 0.325)")
    p.add_argument("--schedule", default="linear", choices=["linear", "geometric"],
                   help="per-round budget: equal parameter cuts, or an equal fraction kept each round")
    p.add_argument("--no-online", action="store_true",
                   help="ablation: prune once to the final size and train once (with all rounds' steps)")
    p.add_argument("--loss", default="redpo", choices=["redpo", "dpo", "sft"], help="training loss (ablations)")
    p.add_argument("--beta", type=float, default=5000.0, help="DPO temperature")
    p.add_argument("--w-sft", type=float, default=1.0, help="SFT weight in ReDPO")
    p.add_argument("--train-steps", type=int, default=60, help="ReDPO optimizer steps per round")
    p.add_argument("--train-batch-size", type=int, default=4, help="pairs per ReDPO step")
    p.add_argument("--lr", type=float, default=0.0, help="ReDPO learning rate (0 = family default)")
    p.add_argument("--importance", default="reward", choices=["reward", "output"], help="pruning importance")
    p.add_argument("--prompt-pool", default="", help="prompts to curate pairs from (toy: its train prompts)")
    p.add_argument("--probe-prompts", default="", help="prompts for importance and targets (toy: built in)")
    p.add_argument("--eval-prompts", default="", help="held-out prompts for evaluation (toy: built in)")
    p.add_argument("--max-pair-prompts", type=int, default=-1,
                   help="curated prompts made into pairs per round (0 = all; -1 = toy 24, other families all)")
    p.add_argument("--num-probe", type=int, default=4, help="probe prompts used for pruning importance")
    p.add_argument("--scorer", default="toy", choices=["clip", "toy"], help="reward model (rewards.py)")
    p.add_argument("--scorer-path", default="", help="scorer weights (clip: ARCH:FILE or an open_clip folder)")
    p.add_argument("--tau", type=float, default=0.0, help="pair filter floor tau_p: keep S(w) > S(l) > tau")
    p.add_argument("--no-filter", action="store_true", help="ablation: train on every pair (scored, none dropped)")
    models.add_sampling_args(p)
    p.add_argument("--probe-steps", type=int, default=5, help="DDIM steps of pruning's probe videos")
    p.add_argument("--nproc", type=int, default=1, help="processes per heavy stage (torchrun) ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return p


def budgets(rounds, final_ratio, schedule):
    """Prunable fraction kept after each round, reaching final_ratio after the last one."""
    if schedule == "geometric":
        return [final_ratio ** (k / rounds) for k in range(1, rounds + 1)]
    return [1 - (1 - final_ratio) * k / rounds for k in range(1, rounds + 1)]


# ----------------------------------------------------------------------------- running steps
def run_step(name, marker, argv, log_path, nproc=1):
    """Run one stage as a process unless `marker` exists; stream and save its output."""
    if os.path.exists(marker):
        print(f"[skip] {name}: {os.path.relpath(marker)} exists")
        return False
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launcher + [os.path.join(HERE, argv[0])] + [str(a) for a in argv[1:]]
    print(f"[run ] {name}: {' '.join(argv[:1] + [str(a) for a in argv[1:]])}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=HERE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for raw in proc.stdout:  # bytes split on "\n" only: a progress bar's "\r" updates stay one line
            line = raw.decode(errors="replace")
            log.write(line)
            sys.stdout.write("       " + line.split("\r")[-1])  # a progress bar shows its final state
        code = proc.wait()
    if code != 0:
        raise models.UserError(f"step '{name}' failed with exit code {code}; its log is {log_path}")
    print(f"       {name} done in {time.time() - t0:.0f}s", flush=True)
    return True


def count_lines(path):
    return sum(1 for ln in open(path) if ln.strip()) if os.path.exists(path) else 0


def check_work_dir(args, path):
    """A work dir belongs to one configuration: refuse to mix results made with other arguments."""
    mine = {k: v for k, v in vars(args).items() if k not in ("nproc", "device")}
    if os.path.exists(path):
        old = models.read_json(path)
        diff = [k for k in mine if old.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise models.UserError(f"{path}: this work dir was made with --{k.replace('_', '-')}={old.get(k)!r}, "
                                   f"not {mine[k]!r}; use another --work-dir")
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
    head = "| round | model | params | GFLOPs | " + " | ".join(DIM_SHORT.values()) + " | avg | pairs made | kept |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        lines.append(f"| {r['round']} | {r['model']} | {fmt(r['params'], ',')} | "
                     f"{fmt(r['flops'] and r['flops'] / 1e9, '.3f')} | "
                     + " | ".join(fmt(r[d], ".3f") for d in (*models.DIMS, "average"))
                     + f" | {fmt(r['pairs_made'], 'd')} | {fmt(r['pairs_kept'], 'd')} |")
    return "\n".join(lines)


def main(args):
    family = models.get_family(args.model)
    rounds = 1 if args.no_online else (args.rounds or family.rounds)
    final = args.final_ratio or family.final_ratio
    if not 0 < final < 1:
        raise models.UserError(f"--final-ratio must be in (0, 1), got {final}")
    toy = args.model == "toy"
    max_pairs = args.max_pair_prompts if args.max_pair_prompts >= 0 else (24 if toy else 0)  # toy: minutes on a CPU
    pool = args.prompt_pool or (TOY_PROMPTS["pool"] if toy else "")
    probe = args.probe_prompts or (TOY_PROMPTS["probe"] if toy else "")
    evalp = args.eval_prompts or (TOY_PROMPTS["eval"] if toy else "")
    for flag, path in (("--prompt-pool", pool), ("--probe-prompts", probe), ("--eval-prompts", evalp)):
        if not path:
            raise models.UserError(f"{flag} is required for --model {args.model}")
        models.read_prompts(path)  # fail early on a bad prompt file
    teacher = args.teacher or family.default_teacher
    if not teacher or not os.path.isdir(teacher):
        raise models.UserError(f"teacher folder '{teacher}' not found: pass --teacher"
                               + (" (the toy teacher ships in toy/teacher; see README)" if toy else ""))
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    check_work_dir(args, os.path.join(work, "loop.args.json"))

    base = ["--model", args.model, "--teacher", teacher, "--device", args.device]
    if args.motion_adapter:
        base += ["--motion-adapter", args.motion_adapter]
    sampling = []
    for flag in ("steps", "cfg", "eta", "frames", "height", "width"):
        value = getattr(args, flag)
        if value not in (0, 0.0, -1.0):
            sampling += [f"--{flag}", value]
    if args.no_x0_rescale:
        sampling.append("--no-x0-rescale")
    scorer = ["--scorer", args.scorer] + (["--scorer-path", args.scorer_path] if args.scorer_path else [])
    t0 = time.time()

    # Round 0: the teacher's own scores and cost on the eval prompts, once.
    r0 = os.path.join(work, "round-0")
    run_step("evaluate teacher", os.path.join(r0, "eval", "report.json"),
             ["evaluate.py", *base, "--prompts", evalp, "--out-dir", os.path.join(r0, "eval"), *scorer, *sampling,
              "--seed", args.seed], os.path.join(r0, "logs", "evaluate.log"), args.nproc)

    names, previous = [], ""
    ratios = [final] if args.no_online else budgets(rounds, final, args.schedule)
    # one-shot trains once with every round's steps, so both variants train equally long
    steps = args.train_steps * ((args.rounds or family.rounds) if args.no_online else 1)
    for k, ratio in enumerate(ratios, 1):
        name = "oneshot" if args.no_online else f"round-{k}"
        names.append(name)
        rd = os.path.join(work, name)
        log = lambda step: os.path.join(rd, "logs", f"{step}.log")
        pruned, student = os.path.join(rd, "pruned.safetensors"), os.path.join(rd, "student.safetensors")
        report = os.path.join(rd, "probe", "report.json")
        pairs, kept = os.path.join(rd, "pairs", "pairs.jsonl"), os.path.join(rd, "pairs", "filtered.jsonl")
        print(f"\n=== {name}: prune to {ratio:.3f} of the teacher's prunable parameters ===")
        run_step("prune", pruned, ["prune.py", *base, *(["--student", previous] if previous else []), "--prompts", probe,
                                   "--num-prompts", args.num_probe, "--importance", args.importance, *scorer,
                                   "--target-ratio", ratio, "--out", pruned, *sampling, "--steps", args.probe_steps,
                                   "--seed", args.seed], log("prune"))
        run_step("probe evaluation", report,
                 ["evaluate.py", *base, "--students", pruned, "--labels", "pruned", "--prompts", probe, "--out-dir",
                  os.path.join(rd, "probe"), *scorer, *sampling, "--no-efficiency", "--no-side-by-side",
                  "--seed", args.seed], log("probe"), args.nproc)
        curated = os.path.join(rd, "prompts.txt")
        run_step("curate prompts", curated,
                 ["filter_pairs.py", "--job", "curate", "--prompts", pool, "--report", report, "--out", curated,
                  "--max-prompts", max_pairs], log("curate"))
        run_step("make pairs", pairs,
                 ["make_pairs.py", *base, "--student", pruned, "--prompts", curated, "--out-dir",
                  os.path.join(rd, "pairs"), "--teacher-cache", os.path.join(work, "teacher_cache"), *sampling,
                  "--seed", args.seed], log("make_pairs"), args.nproc)
        run_step("filter pairs", kept,
                 ["filter_pairs.py", "--job", "filter", "--pairs", pairs, "--report", report, "--out", kept, *scorer,
                  "--score-cache", os.path.join(work, "score_cache.jsonl"), *(["--keep-all"] if args.no_filter else []),
                  "--tau", args.tau, "--device", args.device], log("filter"), args.nproc)
        if not os.path.exists(student):
            if count_lines(kept) == 0:  # nothing to learn from: the round keeps the pruned student
                print(f"[warn] {name}: no pair passed the filter; the round's student is the pruned model")
                shutil.copyfile(pruned, student + ".tmp")
                os.replace(student + ".tmp", student)
            else:
                run_step("redpo", student,
                         ["redpo.py", *base, "--student", pruned, "--pairs", kept, "--out", student, "--loss", args.loss,
                          "--beta", args.beta, "--w-sft", args.w_sft, "--max-steps", steps, "--batch-size",
                          args.train_batch_size, "--lr", args.lr, "--seed", args.seed], log("redpo"), args.nproc)
        run_step("evaluate", os.path.join(rd, "eval", "report.json"),
                 ["evaluate.py", *base, "--no-teacher", "--students", pruned, student, "--labels", "pruned", "student",
                  "--prompts", evalp, "--out-dir", os.path.join(rd, "eval"), *scorer, *sampling, "--seed", args.seed],
                 log("evaluate"), args.nproc)
        previous = student

    rows = round_rows(work, names)
    text = table(rows)
    models.write_json(os.path.join(work, "results.json"), {"args": vars(args), "rows": rows})
    with models.atomic_path(os.path.join(work, "results.md")) as tmp, open(tmp, "w") as f:
        f.write(f"V.I.P. on {args.model}: {'one-shot (no online)' if args.no_online else f'{rounds} online rounds'}, "
                f"loss {args.loss}, final ratio {final:.3f}\n\n{text}\n")
    print(f"\n{text}\n\nV.I.P. finished in {time.time() - t0:.0f}s; results in {os.path.relpath(work)}/results.md")


if __name__ == "__main__":
    models.cli(main, get_parser())
