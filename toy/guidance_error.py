"""How far students' noise predictions are from the teacher's where the sampler uses them.

Follows the teacher's own DDIM path (its CFG sampler, the family's steps and scale, eta 0) from seeded
noise for every prompt, and at each step compares each student's predictions with the teacher's on the
same x_t: conditional eps(c), unconditional eps(0), and guided eps(0) + cfg (eps(c) - eps(0)), the one
the sampler follows. Prints mean squared differences over the path (all steps, all prompts and seeds).
A student can come closer to the teacher in eps(c) and eps(0) taken apart while its guided prediction,
which CFG extrapolates from their difference (x cfg), moves away: this is what the toy's plain SFT did
(toy/RESULTS.md). With --path own each student follows its own DDIM path instead and is compared with the
teacher's predictions on the states it visits itself: training on noised teacher videos can bring a student
closer on the teacher's path and not on its own (exposure bias), which is the path its samples come from.

    python toy/guidance_error.py --students runs/vip/round-1/pruned.safetensors runs/vip/round-1/student.safetensors \\
        --prompts toy/prompts/val.txt --seeds 2
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import models  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", choices=list(models.FAMILIES), help="model family")
    p.add_argument("--teacher", default="", help="teacher folder (default: the family's shipped teacher)")
    p.add_argument("--students", nargs="+", required=True, help="student checkpoints (prune.py / redpo.py)")
    p.add_argument("--prompts", default=os.path.join(HERE, "prompts", "val.txt"), help="prompt file")
    p.add_argument("--seeds", type=int, default=2, help="initial noises a prompt")
    p.add_argument("--seed", type=int, default=11, help="first noise seed")
    p.add_argument("--per-step", action="store_true", help="also the guided error at each DDIM step (timestep)")
    p.add_argument("--path", default="teacher", choices=["teacher", "own"],
                   help="whose DDIM path the predictions are compared on: the teacher's, or each student's own")
    return p


@torch.no_grad()
def path_errors(teacher, students, prompts, seeds, seed0=11, own=False):
    """{student index: {"cond", "uncond", "guided", "by_step"}}: mean |eps_student - eps_teacher|^2 along the
    teacher's DDIM path (eta 0) from seeds seed0.. for every prompt, or (own) along each student's own path;
    "by_step" the guided one at each DDIM step (its mean is "guided")."""
    fam = teacher.family
    cond, uncond = models.encode_prompts(teacher, prompts), models.encode_prompts(teacher, [""])
    n = len(prompts)
    emb = torch.cat([uncond.expand(n, -1, -1), cond])  # (2n, L, D): [uncond; cond]
    shape = models.latent_shape(teacher, fam.frames, fam.height, fam.width)
    teacher.scheduler.set_timesteps(fam.steps)
    steps = teacher.scheduler.timesteps.tolist()
    sums = {i: {"cond": 0.0, "uncond": 0.0, "guided": 0.0, "by_step": [0.0] * len(steps)} for i in range(len(students))}
    for s in range(seeds):
        x = models.seeded_noise([(seed0 + s) * 100_000 + i for i in range(n)], shape)  # (n, C, F, h, w)
        xs = [x] * len(students)  # each student's state on its own path (own)
        for i, t in enumerate(steps):
            tt = torch.full((2 * n,), t, dtype=torch.long)
            prev = steps[i + 1] if i + 1 < len(steps) else -1

            def predict(unet, x):  # (uncond, cond, guided), each (n, C, F, h, w)
                e_u, e_c = models.predict_noise(fam, unet, torch.cat([x, x]), tt, emb).float().chunk(2)
                return e_u, e_c, models.guide(e_u, e_c, fam.cfg)

            ref = None if own else predict(teacher.unet, x)  # on the teacher's path, one teacher forward for all
            for k, unet in enumerate(students):
                mine = predict(unet, xs[k] if own else x)
                theirs = predict(teacher.unet, xs[k]) if own else ref
                e_u, e_c, e_g = [(a - b).pow(2).mean().item() for a, b in zip(mine, theirs)]
                sums[k]["uncond"] += e_u / (len(steps) * seeds)
                sums[k]["cond"] += e_c / (len(steps) * seeds)
                sums[k]["by_step"][i] += e_g / seeds
                if own:  # the student's own path
                    xs[k] = models.ddim_step(fam, teacher.scheduler, xs[k], mine[2], t, prev)
            if not own:  # the teacher's own path
                x = models.ddim_step(fam, teacher.scheduler, x, ref[2], t, prev)
    for e in sums.values():  # the guided error over the path: the mean of its steps'
        e["guided"] = sum(e["by_step"]) / len(steps)
    return sums


def main(args):
    fam = models.get_family(args.model)
    if args.seeds < 1:
        raise models.UserError(f"--seeds must be at least 1 (got {args.seeds})")
    prompts = models.read_prompts(args.prompts)
    teacher = models.load_teacher(fam, args.teacher, device="cpu", dtype=torch.float32)
    students = [models.load_model(teacher, path, torch.float32)[0].eval() for path in args.students]
    errors = path_errors(teacher, students, prompts, args.seeds, args.seed, own=args.path == "own")
    where = "each student's own DDIM path" if args.path == "own" else "the teacher's DDIM path"
    print(f"along {where} ({fam.steps} steps, CFG {fam.cfg:g}), {len(prompts)} prompts x {args.seeds} "
          f"noises of {args.prompts}: mean |eps_student - eps_teacher|^2")
    print("| student | cond | uncond | guided |\n|---|---|---|---|")
    for path, e in zip(args.students, errors.values()):
        print(f"| {path} | {e['cond']:.4g} | {e['uncond']:.4g} | {e['guided']:.4g} |")
    if args.per_step:  # where along the path the guided error is
        teacher.scheduler.set_timesteps(fam.steps)
        ts = teacher.scheduler.timesteps.tolist()
        print("\nguided, per DDIM step\n| student | " + " | ".join(f"t={t}" for t in ts) + " |\n|---|" + "---|" * len(ts))
        for path, e in zip(args.students, errors.values()):
            print(f"| {path} | " + " | ".join(f"{v:.4f}" for v in e["by_step"]) + " |")
    return errors


if __name__ == "__main__":
    models.cli(main, get_parser())
