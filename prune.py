"""Prune: remove whole layers of the student, least important first (METHOD.md section 3).

Candidates are residual sub-layers whose removal keeps every shape: spatial transformers,
temporal transformers, temporal convs, `transformer_in` and same-width ResNets (vc2, toy), or the
21 motion modules (animatediff). Importance of a candidate l:
  reward  dR_l = R(M) - R(M without l): sample probe videos without l, score them, compare (paper)
  output  the increase of the noise-prediction error against the teacher when l is removed,
          averaged over timesteps on N(0, I) inputs (a cheap proxy: no sampling, no scorer)
Layers are removed in order of importance until the prunable parameters (as the paper counts
them) reach --target-params or --target-ratio of the teacher's; with --passes P the cut is made in
P equal shares, importance measured again on what the earlier shares left (one layer of a kind
that the others back up looks unimportant alone; the last ones do not). Where temporal convolutions
are cut to the last N of --keep-temporal-convs N, the N that stay are those with the highest R measured
as the only one of their kind left (--keep-by alone). Input: the teacher and optionally
the previous student; output: a student checkpoint whose metadata holds the removed layers and
the importance table.

Counts only:  python prune.py --model vc2 --architecture-only
Tiny CPU:     python prune.py --model toy --prompts probe.txt --target-ratio 0.8 --out runs/pruned.safetensors
One GPU:      python prune.py --model vc2 --teacher ckpt/vc2 --prompts probe.txt --scorer clip \
                  --scorer-path ViT-H-14:ckpt/clip.safetensors --target-ratio 0.81 --out runs/r1/pruned.safetensors
"""
import argparse
import contextlib
import json
import os
import time

import torch

import models
import rewards


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", choices=list(models.FAMILIES), help="model family")
    p.add_argument("--teacher", default="", help="teacher folder (default: the family's shipped teacher)")
    p.add_argument("--motion-adapter", default="", help="MotionAdapter folder (animatediff)")
    p.add_argument("--student", default="", help="previous student checkpoint to prune further")
    p.add_argument("--out", default="", help="student checkpoint to write")
    p.add_argument("--architecture-only", action="store_true",
                   help="build the real architecture on the meta device, print counts and candidates, exit")
    p.add_argument("--rounds", type=int, default=0,
                   help="--architecture-only: show a schedule over this many rounds (0 = the paper's)")
    p.add_argument("--target-params", type=int, default=0, help="prunable parameters to keep (paper's count)")
    p.add_argument("--target-ratio", type=float, default=0.0, help="fraction of the teacher's prunable parameters to keep")
    p.add_argument("--importance", default="reward", choices=["reward", "output"], help="importance criterion")
    p.add_argument("--prompts", default="", help="probe prompts (.txt one a line, or .jsonl)")
    p.add_argument("--num-prompts", type=int, default=8, help="probe prompts used (the first N)")
    p.add_argument("--passes", type=int, default=1,
                   help="measure importance this many times, each pass removing an equal share of the round's cut "
                        "from the model the earlier passes left (1 = measure once, the paper's; more sees that the "
                        "last of a kind of layer matters more than any one of them)")
    p.add_argument("--keep-temporal-convs", type=int, default=0, metavar="N",
                   help="never remove the last N temporal convolutions (vc2, toy): with none left the UNet cannot "
                        "tell frame order (its temporal attention has no positional embedding), which one-layer-at-"
                        "a-time importance cannot see (0 = no such rule, the paper's)")
    p.add_argument("--keep-by", default="importance", choices=["importance", "alone"],
                   help="where temporal convs are cut to the last N of --keep-temporal-convs, which N stay: alone = "
                        "the highest R measured with each as the only one left (one probe run per conv); importance = "
                        "the N most important one at a time, each measured with all the others present")
    p.add_argument("--probe-seeds", type=int, default=2,
                   help="seed sets per probe prompt: importance is their mean; with 2 or more, the rank "
                        "correlation between the mean importances of the first and the second half of the sets is "
                        "reported (stability; with 2, of sets 1 and 2)")
    p.add_argument("--importance-from", default="",
                   help="skip measuring: reuse the importance table stored in this prune.py checkpoint "
                        "(e.g. nested masks for several rounds from one measurement on the teacher)")
    p.add_argument("--layers-from", default="",
                   help="skip importance: remove exactly the layers that this student checkpoint removed "
                        "(shares one pruning mask between runs that compare losses)")
    p.add_argument("--scorer", default="toy", choices=list(rewards.SCORERS), help="reward model (rewards.py)")
    p.add_argument("--scorer-path", default="", help="scorer weights (clip: ARCH:FILE or an open_clip folder)")
    models.add_sampling_args(p)  # the probe videos' sampler
    p.add_argument("--timesteps", type=int, default=8, help="output importance: timesteps averaged")
    p.add_argument("--batch-size", type=int, default=8, help="probe videos per forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return p


# ----------------------------------------------------------------------------- candidates
def candidates(family, unet):
    """[(module path, parameters)] of the layers that can be removed without changing any shape."""
    from diffusers.models.resnet import ResnetBlock2D

    names = []
    for name, module in unet.named_modules():
        parts = name.split(".")
        if isinstance(module, models.Removed) or len(parts) < 2:
            if name == "transformer_in" and not isinstance(module, models.Removed):
                names.append(name)
            continue
        kind = parts[-2]
        if family.trains_motion_only:
            ok = kind == "motion_modules"
        elif kind in ("attentions", "temp_attentions", "temp_convs"):
            ok = True
        elif kind == "resnets":  # same width and not on the up path (whose inputs are concatenated skips)
            ok = (isinstance(module, ResnetBlock2D) and not name.startswith("up_blocks")
                  and module.in_channels == module.out_channels)
        else:
            ok = False
        if ok and parts[-1].isdigit():
            names.append(name)
    return [(n, sum(p.numel() for p in unet.get_submodule(n).parameters())) for n in names]


def kind_of(path):
    return "transformer_in" if path == "transformer_in" else path.split(".")[-2]


# ----------------------------------------------------------------------------- importance
def probe_reward(teacher, unet, scorer, cond, uncond, prompts, seeds, settings, batch):
    """R per probe video of `unet`: the mean of its four reward dimensions, a (N,) tensor."""
    rows = []
    for i in range(0, len(prompts), batch):
        _, videos = models.generate(teacher, unet, cond[i:i + batch], uncond, seeds[i:i + batch], settings)
        rows += scorer.score(videos, prompts[i:i + batch])
    return torch.tensor([sum(r[d] for d in models.DIMS) / len(models.DIMS) for r in rows])


def spearman(a, b):
    """Rank correlation of two equally long lists (average ranks for ties)."""
    def ranks(x):
        x = torch.as_tensor(x, dtype=torch.float64)
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in x.unique():  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt()
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


@torch.no_grad()
def predictions(family, unet, cond, x_t, t, bf16=False):
    """eps of `unet` on probe inputs x_t (N, C, F, h, w) at each timestep of t (K,): (K, N, C, F, h, w).
    Autocast for the bf16 teacher too (not models.autocast's native bf16): the float32 student's error is
    measured against it, so the two follow the same numerics."""
    with models.autocast(x_t.device, bf16):
        return torch.stack([models.predict_noise(family, unet, x_t, torch.full((x_t.shape[0],), tk, device=x_t.device),
                                                 cond).float() for tk in t.tolist()])


def prober(args, family, unet, teacher, prompts, device):
    """measure() -> (S,): R of `unet` as it is now on each of the --probe-seeds sets of the probe prompts (reward:
    the mean score of its probe videos; output: minus its noise-prediction error against the teacher)."""
    S = args.probe_seeds
    prompts_all = [p for _ in range(S) for p in prompts]                       # S sets of the probe prompts
    seeds = [args.seed + 10007 * s + i for s in range(S) for i in range(len(prompts))]
    cond = models.encode_prompts(teacher, prompts_all).to(device)
    settings = models.sampling_settings(args, family, device)
    bf16 = settings["precision"] == "bf16"
    if args.importance == "reward":
        scorer = rewards.get_scorer(args.scorer, args.scorer_path, device)
        uncond = models.encode_prompts(teacher, [""]).to(device)
        measure = lambda: probe_reward(teacher, unet, scorer, cond, uncond, prompts_all, seeds, settings,
                                       args.batch_size)
    else:
        shape = models.latent_shape(teacher, settings["frames"], settings["height"], settings["width"])
        x_t = models.seeded_noise(seeds, shape).to(device)  # (N, C, F, h, w) ~ N(0, I)
        t = torch.linspace(0, teacher.scheduler.config.num_train_timesteps - 1, args.timesteps).long()
        eps_teacher = predictions(family, teacher.unet, cond, x_t, t, bf16)  # (K, N, C, F, h, w), computed once
        # higher = better, like a reward: minus the error against the teacher, per probe input
        measure = lambda: -(predictions(family, unet, cond, x_t, t, bf16) - eps_teacher).pow(2).mean(dim=(0, 2, 3, 4, 5))
    return lambda: measure().view(S, len(prompts)).mean(1)


@contextlib.contextmanager
def without(unet, paths):
    """`unet` with the layers `paths` removed, each put back on exit."""
    saved = []
    for path in paths:
        parent_name, _, child = path.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        saved.append((parent, child, parent.get_submodule(child)))
    models.remove_layers(unet, paths)
    try:
        yield unet
    finally:
        for parent, child, original in saved:
            if isinstance(parent, torch.nn.ModuleList):
                parent[int(child)] = original
            else:
                setattr(parent, child, original)


def importance(measure, unet, cands, desc="importance"):
    """(R(M), {layer: importance}, {layer: [importance per seed set]}) for every candidate; each is
    removed in turn and then put back."""
    from tqdm import tqdm

    base = measure()
    table, by_set = {}, {}
    for path, _ in tqdm(cands, desc=desc):
        with without(unet, [path]):
            d = base - measure()  # dR_l = R(M) - R(M without l), per seed set
        by_set[path], table[path] = d.tolist(), d.mean().item()
    return base.mean().item(), table, by_set


def alone(measure, unet, layers):
    """{layer: [R per seed set] of the model with that layer the only one of `layers` left}: which of a kind to
    keep when all but a few go. One-at-a-time importance measures each with all the others present, where none is
    needed; the one that stays has to carry the kind's work by itself (the toy: frame order)."""
    from tqdm import tqdm

    out = {}
    for path in tqdm(layers, desc="kept alone"):
        with without(unet, [p for p in layers if p != path]):
            out[path] = measure().tolist()
    return out


def halves(n):
    """The seed sets split_half compares, as 1-based names: "1 and 2", "1-2 and 3-4", "1 and 2" for 3 sets."""
    h = n // 2
    name = lambda a, b: f"{a}" if a == b else f"{a}-{b}"
    return f"{name(1, h)} and {name(h + 1, 2 * h)}"


def split_half(by_set, layers):
    """Spearman correlation between the layers' mean importances over the first half of the seed sets and
    over the second half (an odd last set is left out): how stable a ranking from half the probe videos is."""
    h = len(by_set[layers[0]]) // 2
    first = [sum(by_set[p][:h]) / h for p in layers]
    second = [sum(by_set[p][h:2 * h]) / h for p in layers]
    return spearman(first, second)


def kept_kinds(args):
    """select()'s {kind: layers never removed}."""
    return {"temp_convs": args.keep_temporal_convs} if args.keep_temporal_convs else {}


def passes(args, family, unet, teacher, cands, prompts, device, current, target, table, by_set, measured_in, kept):
    """Remove layers down to `target` in --passes passes, each measuring importance on the model the earlier
    ones left and cutting an equal share of what remains (the last pass reaches the target). Fills table,
    by_set and measured_in with each layer's latest measurement (a removed layer's: the one that removed it),
    and kept with alone()'s R per seed set where temporal convs are cut to their last N (--keep-by alone);
    returns (layers removed, pass 1's seed-set rank correlation, R of the unpruned model)."""
    chosen, stability, base, left = [], None, None, list(cands)
    measure = prober(args, family, unet, teacher, prompts, device)
    for j in range(args.passes):
        if current <= target or not left:
            break
        share = target if j == args.passes - 1 else round(current - (current - target) / (args.passes - j))
        reward, t, s = importance(measure, unet, left, desc=f"importance ({args.importance})")
        if j == 0:
            base = reward
            if args.probe_seeds >= 2:
                stability = split_half(s, [p for p, _ in left])
        fill, keep = j == args.passes - 1, kept_kinds(args)
        if args.keep_by == "alone":
            for layers, _ in binding(left, t, current, share, fill, keep).values():
                kept.update(alone(measure, unet, layers))
        now, current = select(left, t, current, share, fill=fill, keep=keep, alone=mean_of(kept))
        models.remove_layers(unet, now)
        table.update(t)
        by_set.update(s)
        measured_in.update({p: j + 1 for p in t})
        chosen += now
        left = [(p, n) for p, n in left if p not in now]
        if args.passes > 1:
            print(f"prune: pass {j + 1}/{args.passes}: R {reward:.4f}; removed {len(now)} layers -> {current:,} "
                  f"(this pass's target {share:,})")
    return chosen, stability, base


def mean_of(by_set):
    return {p: sum(v) / len(v) for p, v in by_set.items() if v}


def stored_importance(path, teacher, cands):
    """({layer: importance} for every candidate of this student, {layer: kept-alone R per seed set} where
    measured) from a prune.py checkpoint's metadata."""
    from safetensors import safe_open

    models.check_student(path, models.read_student_meta(path), teacher)
    with safe_open(path, "pt") as f:
        rows = json.loads((f.metadata() or {}).get("importance", "[]"))
    measured = max((r.get("pass", 1) for r in rows), default=1)
    if measured > 1:  # rows of later passes were measured on models without the earlier passes' layers
        raise models.UserError(f"{path}: its importance table comes from {measured} passes, each measured on the model "
                               f"the earlier ones left, so one selection over it is not that run's mask; reuse the "
                               f"mask with --layers-from")
    table = {r["layer"]: r["importance"] for r in rows}
    missing = [p for p, _ in cands if p not in table]
    if missing:
        raise models.UserError(f"{path}: its importance table has no entry for candidate {missing[0]}")
    return {p: table[p] for p, _ in cands}, {r["layer"]: r["kept_alone"] for r in rows if r.get("kept_alone")}


def binding(cands, table, current, target, fill, keep):
    """{kind: (its candidates, N)} for each kind of keep {kind: N} cut to its last N: the selection without the
    rule would remove some of that kind and leave N or fewer."""
    if not keep:
        return {}
    free, _ = select(cands, table, current, target, fill)
    of = lambda kind: [p for p, _ in cands if kind_of(p) == kind]
    cut = lambda k: sum(kind_of(p) == k for p in free)
    return {k: (of(k), n) for k, n in keep.items() if cut(k) and len(of(k)) - cut(k) <= n}


def select(cands, table, current, target, fill=True, keep=None, alone=None):
    """Remove the least important layers first, skipping any that would cross the target, then close
    the gap with the least important layer that crosses it: the result is at or below the target by
    less than one layer (never a large layer dropped just to cover a small remainder). With fill=False
    (a pass before the last) stop at the first layer that would cross instead: the remainder is left
    to the next pass, not filled with small layers from further down the ranking. keep {kind: N}: never
    leave fewer than N layers of that kind (those are skipped). Where the kind is cut to its last N and
    alone {layer: R with it the only one of its kind left} covers it, the N of highest R alone stay (not
    the N most important) and the rest of the kind goes by the ranking."""
    chosen, keep, fixed = [], dict(keep or {}), set()
    for kind, (layers, n) in (binding(cands, table, current, target, fill, keep) if alone else {}).items():
        if all(p in alone for p in layers):
            fixed |= set(sorted(layers, key=lambda p: -alone[p])[:n])
            del keep[kind]
    left = {k: sum(kind_of(p) == k for p, _ in cands) for k in keep}
    ranked = sorted(cands, key=lambda c: (table[c[0]], -c[1]))
    allowed = lambda p: p not in fixed and (not keep or kind_of(p) not in keep or left[kind_of(p)] > keep[kind_of(p)])
    for path, n in ranked:
        if not allowed(path):
            continue
        if current - n >= target:
            if keep and kind_of(path) in left:
                left[kind_of(path)] -= 1
            chosen.append(path)
            current -= n
        elif not fill:
            return chosen, current
    if current > target:
        crossing = [(p, n) for p, n in ranked if p not in chosen and current - n < target and allowed(p)]
        if crossing:  # the least important of the layers that finish the round
            path, n = crossing[0]
            chosen.append(path)
            current -= n
    return chosen, current


# ----------------------------------------------------------------------------- architecture report
def meta_flops(family, unet):
    """FLOPs of one UNet forward on one latent video at the family's native size (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    f = family.latent_factor
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        x = torch.zeros(1, unet.config.in_channels, family.frames, family.height // f, family.width // f)
        emb = torch.zeros(1, 77, unet.config.cross_attention_dim)
        models.predict_noise(family, unet, x, torch.zeros(1, dtype=torch.long), emb)
    return counter.get_total_flops()


def largest_first(cands, current, target):
    """An example set of whole layers reaching `target` from above: the largest that still fit."""
    chosen = []
    for path, n in sorted(cands, key=lambda c: -c[1]):
        if current - n >= target:
            chosen.append(path)
            current -= n
    return chosen, current


def architecture_report(family, config_dir, rounds):
    """Counts as the paper counts them, every candidate, and a schedule reaching the paper's size."""
    unet = models.build_meta_unet(family, config_dir)
    total = models.count_params(family, unet)
    cands = candidates(family, unet)
    print(f"family {family.name}: prunable parameters {total:,} as the paper counts them")
    if family.fps_folded:
        print(f"  = {models.count_params(family, unet, paper=False):,} in the diffusers UNet3DConditionModel + "
              f"{models.folded_params(family, unet):,} of lvdm's fps embedding, which this port folds into "
              f"time_embedding.linear_2.bias")
    print(f"  UNet total {sum(p.numel() for p in unet.parameters()):,} parameters")
    print(f"\n{len(cands)} candidate layers:\n  {'layer':48s} {'kind':15s} {'params':>13s}")
    for path, n in cands:
        print(f"  {path:48s} {kind_of(path):15s} {n:13,d}")
    removable = sum(n for _, n in cands)
    print(f"  candidates hold {removable:,} parameters ({removable / total:.1%} of the prunable count); "
          f"the smallest student has {(total - removable) / 1e9:.3f} B")
    final = round(family.final_ratio * total)
    size = f"{family.frames}x{family.height}x{family.width}"
    flops0 = meta_flops(family, unet)
    print(f"\nthe paper's final size {final / 1e9:.3f} B ({1 - family.final_ratio:.1%} fewer) in "
          f"{rounds or family.rounds} rounds, linear schedule; an example set of layers, largest first "
          f"(reward importance chooses the real ones); FLOPs of one forward at {size}:")
    print(f"  round 0: {total:,} params, {flops0 / 1e12:.2f} TFLOPs")
    # the final set first (largest first, within 0.5 % of the paper's size), then split over the rounds
    final_set, _ = largest_first(cands, total, final * 0.995)
    current, rounds = total, rounds or family.rounds
    for k in range(1, rounds + 1):
        target = round(total * (1 - (1 - family.final_ratio) * k / rounds))
        gone = set(models.removed_layers(unet))  # one scan of the modules, not one per candidate
        left = [(p, n) for p, n in cands if p in final_set and p not in gone]
        chosen = [p for p, _ in left] if k == rounds else largest_first(left, current, target * 0.995)[0]
        current -= sum(n for p, n in left if p in chosen)
        models.remove_layers(unet, chosen)
        flops = meta_flops(family, unet)
        print(f"  round {k}: target {target:,}, removed {len(chosen)} layers -> {current:,} params "
              f"({current / total:.1%}), {flops / 1e12:.2f} TFLOPs ({1 - flops / flops0:.1%} fewer)")
        for path in chosen:
            print(f"      - {path} ({dict(cands)[path]:,})")
    reachable = abs(current - final) <= 0.005 * final
    print(f"  {'reachable' if reachable else 'NOT reachable within 0.5%'}: {current / 1e9:.4f} B "
          f"({1 - current / total:.1%} fewer) against the paper's {final / 1e9:.3f} B")
    return total, cands


def main(args):
    family = models.get_family(args.model)
    if args.architecture_only:
        architecture_report(family, args.teacher or None, args.rounds)
        return
    if not args.out:
        raise models.UserError("--out is required (or use --architecture-only)")
    if not args.layers_from and bool(args.target_params) == bool(args.target_ratio):
        raise models.UserError("give exactly one of --target-params and --target-ratio (or --layers-from)")
    if args.target_ratio and not 0 < args.target_ratio <= 1:
        raise models.UserError(f"--target-ratio must be in (0, 1], got {args.target_ratio}")
    if args.keep_temporal_convs < 0:
        raise models.UserError(f"--keep-temporal-convs must be >= 0 (got {args.keep_temporal_convs})")
    if args.passes < 1:
        raise models.UserError(f"--passes must be >= 1 (got {args.passes})")
    if args.passes > 1 and (args.importance_from or args.layers_from):
        raise models.UserError("--passes measures importance again after each pass: not with --importance-from or "
                               "--layers-from")
    if args.probe_seeds < 1:
        raise models.UserError(f"--probe-seeds must be >= 1 (got {args.probe_seeds})")
    if not args.prompts and not args.layers_from and not args.importance_from:
        raise models.UserError("--prompts is required: the probe prompt file")
    prompts = models.read_prompts(args.prompts)[:args.num_prompts] if args.prompts else []
    device = models.resolve_device(args.device)
    torch.manual_seed(args.seed)
    teacher = models.load_teacher(family, args.teacher, args.motion_adapter, device,
                                  models.frozen_dtype(device, args.precision))
    unet, meta = models.load_model(teacher, args.student, torch.float32)  # saved exactly: float32 weights
    unet.eval().requires_grad_(False)
    full = models.count_params(family, teacher.unet)
    current = models.count_params(family, unet)
    cands = candidates(family, unet)
    t0 = time.time()
    table, by_set, measured_in, kept, base, stability = {}, {}, {}, {}, None, None
    if args.layers_from:  # a mask made elsewhere: the same layers, whatever this student's weights
        mask = models.check_student(args.layers_from, models.read_student_meta(args.layers_from), teacher)["removed"]
        missing = [p for p in meta["removed"] if p not in mask]
        if missing:
            raise models.UserError(f"{args.layers_from}: keeps layer {missing[0]}, which --student already removed")
        chosen = [p for p in mask if p not in meta["removed"]]
        target = current - sum(n for p, n in cands if p in chosen)
    else:
        target = args.target_params or round(args.target_ratio * full)
        if current <= target:
            print(f"prune: already at {current:,} <= target {target:,}; nothing removed")
            chosen = []
        elif args.importance_from:
            table, kept = stored_importance(args.importance_from, teacher, cands)
            by_set = {p: [] for p in table}
            binds = binding(cands, table, current, target, True, kept_kinds(args))
            if args.keep_by == "alone" and any(p not in kept for layers, _ in binds.values() for p in layers):
                print(f"prune: {args.importance_from} has no kept-alone R for every {'/'.join(binds)} layer (not cut to its "
                      f"last N where it was measured): the ones kept are the most important, as --keep-by importance")
            chosen, _ = select(cands, table, current, target, keep=kept_kinds(args),
                               alone=mean_of(kept) if args.keep_by == "alone" else None)
        else:
            chosen, stability, base = passes(args, family, unet, teacher, cands, prompts, device, current, target,
                                             table, by_set, measured_in, kept)
    models.remove_layers(unet, chosen)
    after = models.count_params(family, unet)
    rows = [{"layer": p, "kind": kind_of(p), "params": n, "importance": table[p], "by_seed_set": by_set[p],
             "removed": p in chosen, "pass": measured_in.get(p, 1), "kept_alone": kept.get(p, [])}
            for p, n in sorted(cands, key=lambda c: (measured_in.get(c[0], 1), table.get(c[0], 0.0)))] if table else []
    print(f"{'layer':48s} {'params':>12s} {'importance':>12s} {'pass':>4s}  per seed set")
    for r in rows:
        alone_r = f"  (R kept alone {sum(r['kept_alone']) / len(r['kept_alone']):.5f})" if r["kept_alone"] else ""
        print(f"{r['layer']:48s} {r['params']:12,d} {r['importance']:12.5f} {r['pass']:4d}  "
              f"{' '.join(f'{v:8.5f}' for v in r['by_seed_set'])}{'  removed' if r['removed'] else ''}{alone_r}")
    if stability is not None:
        print(f"prune: rank correlation (Spearman) of the importances from seed sets "
              f"{halves(args.probe_seeds)}: {stability:.3f} "
              f"({len(cands)} candidates, {len(prompts)} probe prompts, {models.sampling_settings(args, family)['steps']}"
              f" DDIM steps)")
    round_ = int(meta.get("round", 0)) + 1
    models.save_student(args.out, family, unet, teacher, round_, args, stage="prune", importance=rows,
                        base_reward=base, removed_now=chosen, importance_rank_correlation=stability,
                        mask_from=os.path.abspath(args.layers_from) if args.layers_from else "",
                        seconds=round(time.time() - t0, 1))
    how = f"the mask of {args.layers_from}" if args.layers_from else f"target {target:,}"
    print(f"prune: {len(chosen)} layers removed, {current:,} -> {after:,} prunable parameters "
          f"({after / full:.1%} of the teacher's {full:,}; {how}); wrote {args.out}")


if __name__ == "__main__":
    models.cli(main, get_parser())
