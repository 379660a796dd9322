"""ReDPO: distill a pruned student back with Diffusion-DPO + SFT on teacher-vs-student pairs.

METHOD.md section 4. Input: a pairs JSONL (make_pairs.py / filter_pairs.py) whose rows point at cached latents
and text embeddings, the teacher folder, and a student checkpoint (prune.py). Output: the trained student
checkpoint (same format) and a JSONL training log beside it. Training never runs the VAE or the text encoder.
One step = one student forward+backward on [winners; losers] at a shared t and eps and one teacher forward
(no_grad): the DPO reference and the SFT target. --uncond-prob: a pair trains on the empty prompt (both members),
so the unconditional branch CFG samples with is distilled too. Every --log-every steps the log adds the DPO and
SFT terms' gradient norms apart, the DPO margin and the distance to the teacher (conditional, unconditional, and
guided as the sampler combines them) on held-out pairs never trained on. --sft-cfg w: the SFT term compares the
guided predictions eps(0) + w (eps(c) - eps(0)), what a CFG sampler follows (--sft-branches: each branch's too).
One seeded stream over the global batch (--batch-size x processes) draws data order, t, eps and prompt dropout,
so N processes train as one with N times the --batch-size (up to float rounding). --save-every N writes the
training state atomically to <out>.state.pt, from which the same command resumes to an uninterrupted run's weights.
A non-finite input, loss or gradient norm stops with one line before the optimizer step, keeping the last good state.
--interpolate A writes start + A (trained - start) (WiSE-FT), the trained weights pulled back toward the start's.

Tiny CPU:  python redpo.py --model toy --pairs runs/pairs.jsonl --student runs/pruned.safetensors \
               --out runs/redpo.safetensors --max-steps 50
One GPU:   python redpo.py --model vc2 --teacher ckpt/vc2 --pairs runs/r1/pairs.jsonl \
               --student runs/r1/pruned.safetensors --out runs/r1/redpo.safetensors --max-steps 2000
Many GPUs: torchrun --nproc_per_node 8 redpo.py ... --batch-size 1 --save-every 100  (DDP: the run of one
               process with --batch-size 8; killed, the same command resumes)
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F

import models


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", choices=list(models.FAMILIES), help="model family")
    p.add_argument("--teacher", default="", help="teacher folder (default: the family's shipped teacher)")
    p.add_argument("--motion-adapter", default="", help="MotionAdapter folder (animatediff)")
    p.add_argument("--pairs", required=True, help="pairs JSONL with cached latents and text embeddings")
    p.add_argument("--student", default="", help="student checkpoint to train (default: the teacher itself)")
    p.add_argument("--out", required=True, help="where to write the trained student checkpoint")
    p.add_argument("--loss", default="redpo", choices=["redpo", "dpo", "sft"], help="ReDPO or an ablation")
    p.add_argument("--beta", type=float, default=0.0,
                   help="DPO temperature, the 1/2 applied in the loss (0 = the family's: toy 500, others 5000)")
    p.add_argument("--w-sft", type=float, default=1.0, help="weight of the SFT term in ReDPO")
    p.add_argument("--sft-target", default="teacher", choices=["teacher", "noise"], help="SFT onto the teacher's prediction or the noise")
    p.add_argument("--sft-cfg", type=float, default=0.0, help="SFT on the guided prediction eps(0) + w (eps(c) - eps(0)) at this "
                   "CFG scale w, the sampler's noise estimate (0 = on the conditional one alone; needs --sft-target teacher)")
    p.add_argument("--sft-branches", action="store_true", help="with --sft-cfg: SFT on each branch too (the mean of the "
                   "guided, unconditional and conditional errors): the branches cannot drift where the guided sum is blind")
    p.add_argument("--snr-gamma", type=float, default=0.0, help="min-SNR-gamma weighting of the SFT term: each pair's "
                   "term x min(1, gamma / SNR(t)), so the nearly clean timesteps count less (0 = off, uniform in t)")
    p.add_argument("--sft-on", default="winners", choices=["winners", "both"], help="SFT on the winners (the paper's) or on both")
    p.add_argument("--reference", default="student0", choices=["teacher", "student0"], help="DPO reference: the frozen initial "
                   "student (Diffusion-DPO's convention; chosen on the toy's validation prompts) or the frozen teacher M_0 (the paper's)")
    p.add_argument("--train-layers", default="all", choices=["all", "temporal"], help="what trains: the whole student (animatediff: "
                   "its motion modules) or only its temporal layers (temporal convs and transformers, transformer_in)")
    p.add_argument("--lr", type=float, default=0.0, help="AdamW learning rate (0 = the family's default)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"], help="after the warmup: constant or cosine to 0")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--save-every", type=int, default=0,
                   help="every N steps write the training state to <out>.state.pt; a rerun resumes from it (0 = off)")
    p.add_argument("--uncond-prob", type=float, default=0.1, help="prompt dropout: a pair trains on the empty prompt (both members)")
    p.add_argument("--interpolate", type=float, default=1.0, metavar="A", help="write start + A (trained - start), A in (0, 1]: "
                   "the trained weights pulled back toward the starting student's (WiSE-FT's weight interpolation; 1 = off)")
    p.add_argument("--heldout-pairs", type=int, default=-1, help="pairs kept out of training to measure the distance to "
                   "the teacher (-1 = auto: n/10, at most 8; with none held out the first 4 training pairs are used)")
    p.add_argument("--log-every", type=int, default=10, help="every N steps a log line: term-wise gradient norms, distance to teacher")
    p.add_argument("--no-x0-rescale", action="store_true", help="vc2: noise x0 without VC2's scale_t")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute UNet blocks in backward")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto = on CUDA bf16 (teacher and "
                   "reference in bf16 weights, the student's float32 master weights under bf16 autocast), float32 elsewhere")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNets (student, teacher, reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return p


# ----------------------------------------------------------------------------- the loss
def redpo_loss_reference(eps_theta, eps_ref, eps, beta=5000.0, w_sft=1.0, loss_type="redpo",
                         sft_target="teacher", eps_teacher_w=None, eps_theta_sft=None):
    """ReDPO written step by step like METHOD.md section 4 (the oracle the fused loss is tested on).

    eps_theta, eps_ref, eps: (2B, C, F, H, W), winners first. eps_teacher_w: the teacher's prediction
    on the winners when the reference is not the teacher (None = eps_ref's winners). eps_theta_sft: the
    student's winner prediction the SFT term compares (None = eps_theta's winners; --sft-cfg: the guided one).
    With --sft-on both the last two hold 2B rows, [winners; losers]: a pair's SFT term is their mean.
    """
    B = eps_theta.shape[0] // 2
    eps_theta_w, eps_theta_l = eps_theta[:B], eps_theta[B:]
    eps_ref_w, eps_ref_l = eps_ref[:B], eps_ref[B:]
    eps_w, eps_l = eps[:B], eps[B:]
    all_but_batch = (1, 2, 3, 4)  # channels, frames, height, width

    # per-sample errors e = mean |eps - eps_model(x_t, c, t)|^2 over all non-batch dimensions
    e_theta_w = (eps_w - eps_theta_w).pow(2).mean(dim=all_but_batch)
    e_theta_l = (eps_l - eps_theta_l).pow(2).mean(dim=all_but_batch)
    e_ref_w = (eps_w - eps_ref_w).pow(2).mean(dim=all_but_batch)
    e_ref_l = (eps_l - eps_ref_l).pow(2).mean(dim=all_but_batch)

    # L_DPO = -log sigmoid( -(beta/2) * [(e_theta_w - e_ref_w) - (e_theta_l - e_ref_l)] )
    inside = -(beta / 2) * ((e_theta_w - e_ref_w) - (e_theta_l - e_ref_l))
    L_dpo = -F.logsigmoid(inside)

    # L_SFT = mean |eps_theta(x_t_w) - eps_ref(x_t_w)|^2 on the winner only (or against the true noise)
    if sft_target == "teacher":
        target_w = eps_ref_w if eps_teacher_w is None else eps_teacher_w
    else:
        target_w = eps_w
    pred_w = eps_theta_w if eps_theta_sft is None else eps_theta_sft
    L_sft = (pred_w - target_w).pow(2).mean(dim=all_but_batch)
    if len(L_sft) == 2 * B:  # SFT on both members: a pair's term is the mean of its winner's and loser's
        L_sft = (L_sft[:B] + L_sft[B:]) / 2

    # L_ReDPO = L_DPO + w_sft * L_SFT, averaged over the batch
    if loss_type == "redpo":
        loss = (L_dpo + w_sft * L_sft).mean()
    elif loss_type == "dpo":
        loss = L_dpo.mean()
    else:
        loss = L_sft.mean()
    stats = {"dpo": L_dpo.mean().detach(), "sft": L_sft.mean().detach(),
             "implicit_acc": (inside > 0).float().mean().detach(), "margin": inside.mean().detach()}
    return loss, stats


def redpo_loss(eps_theta, eps_ref, eps, beta=5000.0, w_sft=1.0, loss_type="redpo", sft_target="teacher",
               eps_teacher_w=None, eps_theta_sft=None):
    """The loss used in training: the same math over the batched predictions in fp32, one reduction
    per model. Shapes as redpo_loss_reference; returns (loss, stats)."""
    if loss_type not in ("redpo", "dpo", "sft") or sft_target not in ("teacher", "noise"):
        raise ValueError(f"loss_type={loss_type!r}, sft_target={sft_target!r}")
    eps_theta, eps_ref, eps = eps_theta.float(), eps_ref.float(), eps.float()
    B = eps_theta.shape[0] // 2
    err_theta = (eps - eps_theta).pow(2).flatten(1).mean(1)  # (2B,) = [e_theta_w; e_theta_l]
    err_ref = (eps - eps_ref).pow(2).flatten(1).mean(1)      # (2B,) = [e_ref_w; e_ref_l]
    diff_w, diff_l = (err_theta - err_ref).chunk(2)          # (B,), (B,)
    inside = -0.5 * beta * (diff_w - diff_l)                 # the 1/2 of -(beta/2)
    L_dpo = -F.logsigmoid(inside)
    target_w = (eps_ref[:B] if eps_teacher_w is None else eps_teacher_w.float()) if sft_target == "teacher" else eps[:B]
    pred_w = eps_theta[:B] if eps_theta_sft is None else eps_theta_sft.float()
    L_sft = (pred_w - target_w).pow(2).flatten(1).mean(1).view(-1, B).mean(0)  # (B,): on both members, their mean
    per_sample = {"redpo": L_dpo + w_sft * L_sft, "dpo": L_dpo, "sft": L_sft}[loss_type]
    stats = {"dpo": L_dpo.mean().detach(), "sft": L_sft.mean().detach(),
             "implicit_acc": (inside > 0).float().mean().detach(), "margin": inside.mean().detach(),
             "dpo_term": L_dpo.mean(), "sft_term": L_sft.mean()}  # the last two keep their graph (grad norms)
    return per_sample.mean(), stats


# ----------------------------------------------------------------------------- helpers
def load_pairs(path):
    """(x0_w, x0_l, emb) tensors (N, C, F, h, w), (N, C, F, h, w), (N, L, D) from a pairs JSONL."""
    from safetensors.torch import load_file

    rows = models.read_jsonl(path, required=("id", "prompt", "winner.latents", "loser.latents", "text_emb"))
    if not rows:
        raise models.UserError(f"{path}: no pairs in file")
    base = os.path.dirname(os.path.abspath(path))
    cache = {}

    def tensor(n, rel, key):
        f = os.path.join(base, rel)
        if f not in cache:
            if not os.path.exists(f):
                raise models.UserError(f"{path}:{n}: missing file {rel}")
            try:
                cache[f] = load_file(f)
            except Exception as e:  # safetensors' error on a corrupt or cut file, or an OSError (a folder, no permission)
                raise models.UserError(f"{path}:{n}: {rel}: not a safetensors file ({e})") from None
        if key not in cache[f]:
            raise models.UserError(f"{path}:{n}: {rel} holds no '{key}' tensor")
        if not torch.isfinite(cache[f][key]).all():
            raise models.UserError(f"{path}:{n}: {rel} holds non-finite values (NaN or inf) in '{key}'")
        return cache[f][key]

    x0_w, x0_l, emb = [], [], []
    for n, row in enumerate(rows, 1):
        x0_w.append(tensor(n, row["winner"]["latents"], "latents"))
        x0_l.append(tensor(n, row["loser"]["latents"], "latents"))
        emb.append(tensor(n, row["text_emb"], "text_emb"))
        if x0_w[-1].shape != x0_l[-1].shape or x0_w[-1].shape != x0_w[0].shape:
            raise models.UserError(f"{path}:{n}: latent shapes differ ({tuple(x0_w[-1].shape)} vs "
                                   f"{tuple(x0_l[-1].shape)}, first row {tuple(x0_w[0].shape)})")
    return torch.stack(x0_w).float(), torch.stack(x0_l).float(), torch.stack(emb).float()


def checkpoint_blocks(unet):
    """Gradient checkpointing: UNetMotionModel has it; for UNet3DConditionModel wrap each block."""
    from torch.utils.checkpoint import checkpoint

    if getattr(unet, "_supports_gradient_checkpointing", False) and not hasattr(unet, "transformer_in"):
        unet.enable_gradient_checkpointing()
        return
    for block in models.unet_blocks(unet):
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(block.forward)


def trainable_parameters(family, unet, layers="all"):
    """Freeze everything but the student's own tensors (all of the UNet, or the motion modules), or with
    layers="temporal" but their temporal layers."""
    names = set(models.trainable_keys(family, unet, layers))
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if n in names]
    for p in params:
        p.requires_grad_(True)
    return params


def train_step(family, scheduler, student, teacher_unet, reference, batch, args, use_bf16, device, loss_fn=redpo_loss,
               uncond=None):
    """One micro-batch of ReDPO: noise [winners; losers] with a shared t and eps, one student forward (with grad)
    and, under no_grad, the teacher's forward as DPO reference and SFT target; with a separate reference (the
    initial student) its forward on [winners; losers] and the teacher's on the winners only (the SFT target).
    Returns (loss, stats). batch = (x0_w, x0_l, emb, t, eps) on `device`: winners' and losers' latents (B, C, F, h, w),
    the text embeddings (B, L, D) (the empty prompt's where dropped), and the pairs' timesteps (B,) and noise
    (B, C, F, h, w), drawn by the caller (the seeded stream of `draw_batch`).
    With --sft-cfg w > 0 (needs `uncond`, the empty prompt's (1, L, D) embedding) the student and the
    teacher also see the winners with the empty prompt (in the same forwards), and SFT compares their
    guided predictions eps(0) + w * (eps(c) - eps(0)), the noise estimate a CFG-w sampler follows.
    With --sft-on both, "the winners" of the SFT term are the first m = 2B rows, winners and losers."""
    x0_w, x0_l, emb, t, eps = batch
    B = x0_w.shape[0]
    w_cfg = getattr(args, "sft_cfg", 0.0)
    guided = w_cfg > 0 and args.sft_target == "teacher" and args.loss != "dpo"
    x0 = torch.cat([x0_w, x0_l])                                     # (2B, C, F, h, w): [winners; losers]
    t = t.repeat(2)                                                  # (2B,) shared t per pair
    eps = eps.repeat(2, 1, 1, 1, 1)                                  # (2B, C, F, h, w) shared noise
    x_t = models.add_noise(family, scheduler, x0, eps, t, not args.no_x0_rescale)
    emb2 = torch.cat([emb, emb])                                     # (2B, L, D)
    # with guided SFT the SFT members come once more, with the empty prompt: inputs (2B + m, ...) / teacher's (2m, ...)
    m = 2 * B if getattr(args, "sft_on", "winners") == "both" else B  # the SFT term's members: x_t[:m]
    x_s, t_s, emb_s = x_t, t, emb2
    x_tw, t_w, emb_w = x_t[:m], t[:m], emb2[:m]
    if guided:
        u = uncond.to(emb.dtype).expand_as(emb2[:m])                 # (m, L, D)
        x_s, t_s, emb_s = torch.cat([x_t, x_t[:m]]), torch.cat([t, t[:m]]), torch.cat([emb2, u])
        x_tw, t_w, emb_w = torch.cat([x_t[:m]] * 2), torch.cat([t[:m]] * 2), torch.cat([emb2[:m], u])
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
        with torch.no_grad():
            if reference is None:  # the teacher is both the DPO reference and the SFT target
                eps_ref = models.predict_noise(family, teacher_unet, x_s, t_s, emb_s)
                # the SFT target: its guided parts, or its prediction on the SFT members
                eps_teacher_w = torch.cat([eps_ref[:m], eps_ref[2 * B:]]) if guided else eps_ref[:m]
                eps_ref = eps_ref[:2 * B]
            else:  # DPO against the initial student; SFT on the teacher, which it needs on the winners only
                eps_ref = models.predict_noise(family, reference, x_t, t, emb2)
                eps_teacher_w = models.predict_noise(family, teacher_unet, x_tw, t_w, emb_w)  # (m or 2m, C, F, h, w)
        eps_theta = models.predict_noise(family, student, x_s, t_s, emb_s)
    beta = args.beta or family.beta  # 0 = the family default
    eps_theta_sft = eps_theta[:m]
    if guided:  # eps(0) + w (eps(c) - eps(0)) for the student and the teacher, in float32
        s_uc, t_uc = (eps_theta[2 * B:].float(), eps_theta[:m].float()), (eps_teacher_w[m:].float(), eps_teacher_w[:m].float())
        eps_theta_sft, eps_teacher_w = models.guide(*s_uc, w_cfg), models.guide(*t_uc, w_cfg)
        if args.sft_branches:  # [guided, uncond, cond] along channels: the SFT error is the mean of the three
            eps_theta_sft, eps_teacher_w = torch.cat([eps_theta_sft, *s_uc], 1), torch.cat([eps_teacher_w, *t_uc], 1)
        eps_theta = eps_theta[:2 * B]
    if getattr(args, "snr_gamma", 0.0) > 0:  # min-SNR-gamma: both sides x sqrt(min(1, gamma / SNR)), the term x that
        ab = scheduler.alphas_cumprod.to(t.device)[t[:m]].float()
        w = (args.snr_gamma * (1 - ab) / ab).clamp(max=1).sqrt().view(-1, 1, 1, 1, 1)
        eps_theta_sft, eps_teacher_w = eps_theta_sft * w, eps_teacher_w * w
    return loss_fn(eps_theta, eps_ref, eps, beta, args.w_sft, args.loss, args.sft_target, eps_teacher_w,
                   eps_theta_sft)


def grad_norm_of(term, params):
    """The L2 norm of d term / d params (graph kept for the real backward)."""
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None)).item()


@torch.no_grad()
def teacher_distance(family, scheduler, student, teacher_unet, heldout, uncond, args, use_bf16, device):
    """Mean |eps_student - eps_teacher|^2 on held-out winners at fixed t and noise: with their prompts
    (cond), with the empty prompt (uncond, the branch CFG extrapolates from) and guided as the sampler
    combines them, eps(0) + cfg (eps(c) - eps(0)) at the family's CFG scale."""
    x0_w, emb = heldout
    g = torch.Generator().manual_seed(1234)
    T = scheduler.config.num_train_timesteps
    t = torch.randint(0, T, (x0_w.shape[0],), generator=g).to(device)
    eps = torch.randn(x0_w.shape, generator=g).to(device)
    x_t = models.add_noise(family, scheduler, x0_w.to(device), eps, t, not args.no_x0_rescale)
    d = {}
    for name, e in (("cond", emb.to(device)), ("uncond", uncond.expand_as(emb).to(device))):
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
            d[name] = models.predict_noise(family, student, x_t, t, e).float() - models.predict_noise(
                family, teacher_unet, x_t, t, e).float()
    d["guided"] = models.guide(d["uncond"], d["cond"], family.cfg)
    return {name: v.pow(2).mean().item() for name, v in d.items()}


def split_heldout(n_pairs, requested, seed):
    """(train indices, held-out indices): a seeded choice of pairs never trained on."""
    k = requested if requested >= 0 else (min(8, n_pairs // 10) if n_pairs >= 10 else 0)
    if k >= n_pairs:
        raise models.UserError(f"--heldout-pairs {k} leaves no pair to train on ({n_pairs} pairs)")
    perm = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[k:].sort().values, perm[:k].sort().values


def draw_batch(g, order, cursor, global_batch, T, latent_shape, uncond_prob):
    """The next global micro-batch from the seeded stream `g`, drawn alike by every rank: pair indices, prompt-dropout
    flags, t (each (G,)) and eps (G, C, F, h, w), and (order, cursor); a new epoch's order when fewer than G are left."""
    if cursor + global_batch > len(order):
        order, cursor = torch.randperm(len(order), generator=g), 0
    idx = order[cursor:cursor + global_batch]
    drop = torch.rand(len(idx), generator=g) < uncond_prob  # prompt dropout, one draw per pair
    t = torch.randint(0, T, (len(idx),), generator=g)        # (G,) one t per pair
    eps = torch.randn(len(idx), *latent_shape, generator=g)  # (G, C, F, h, w) one noise per pair
    return idx, drop, t, eps, order, cursor + global_batch


# Flags a rerun may change and still resume a training state; the ranks' --batch-size may change too
# as long as the global batch (--batch-size x processes) does not.
RESUME_FREE = ("out", "save_every", "max_steps", "log_every", "device", "batch_size")


def lr_factor(step, warmup, max_steps, schedule="constant"):
    """The learning rate's multiplier before optimizer step `step` + 1: a linear warmup, then 1 or a cosine to 0."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm if schedule == "constant" else warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, max_steps))))


def run_config(args, world):
    """What a training state must share with the run that resumes it (paths absolute; --max-steps under a cosine)."""
    cfg = {k: v for k, v in vars(args).items() if k not in RESUME_FREE or (k, args.lr_schedule) == ("max_steps", "cosine")}
    cfg.update({k: os.path.abspath(cfg[k]) for k in ("pairs", "student", "teacher", "motion_adapter") if cfg[k]})
    return {**cfg, "global_batch": args.batch_size * world}


def load_state(path, config, max_steps):
    """A training state written by --save-every; one line if unreadable or made with other arguments."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        made = state["config"]
    except Exception as e:
        raise models.UserError(f"{path}: not a readable training state ({type(e).__name__}); delete it to start over")
    diff = models.first_change(made, config, get_parser())
    if diff:
        k, was, now = diff
        flag = "--batch-size x processes" if k == "global_batch" else "--" + k.replace("_", "-")
        raise models.UserError(f"{path}: a training state made with {flag}={was!r}, not "
                               f"{now!r}; rerun with that, or delete it to start over")
    if state["step"] > max_steps:
        raise models.UserError(f"{path}: a training state at step {state['step']}, past --max-steps {max_steps}")
    return state


def stop_if_non_finite(step, values, state_path, before):
    """One line and exit 2 on a non-finite (name, value), before it reaches the weights or a file."""
    for what, v in values:
        if not math.isfinite(v):
            kept = (f"the last good training state is {state_path}" if os.path.exists(state_path)
                    else "no training state was saved (--save-every)")
            raise models.UserError(f"step {step}: non-finite {what} ({v}) before {before}; {kept}")


def largest_weight(params):
    return torch.stack([p.detach().float().abs().amax() for p in params]).amax().item()  # NaN if any is


def main(args):
    rank, world, device = models.dist_setup(args.device)
    family = models.get_family(args.model)
    lr = args.lr or family.lr
    beta = args.beta or family.beta
    frozen = models.frozen_dtype(device, args.precision)  # bf16 on CUDA: the teacher and the reference
    use_bf16 = frozen == torch.bfloat16
    if not 0 <= args.uncond_prob <= 1:
        raise models.UserError(f"--uncond-prob must be in [0, 1] (got {args.uncond_prob})")
    if not 0 < args.interpolate <= 1:
        raise models.UserError(f"--interpolate must be in (0, 1] (got {args.interpolate})")
    if args.sft_on == "both" and args.sft_target != "teacher":
        raise models.UserError("--sft-on both: needs --sft-target teacher (the losers' own noise is no target)")
    if args.sft_branches and not args.sft_cfg:
        raise models.UserError("--sft-branches: needs --sft-cfg w > 0 (without it SFT is on the conditional branch)")
    for flag, v in (("--sft-cfg", args.sft_cfg), ("--snr-gamma", args.snr_gamma)):
        if v < 0 or (v and args.sft_target != "teacher"):
            raise models.UserError(f"{flag} {v:g}: needs a value >= 0 and --sft-target teacher")

    x0_w_all, x0_l_all, emb_all = load_pairs(args.pairs)  # validate inputs before any heavy work
    train_idx, held_idx = split_heldout(x0_w_all.shape[0], args.heldout_pairs, args.seed)
    heldout = (x0_w_all[held_idx], emb_all[held_idx]) if len(held_idx) else (x0_w_all[:4], emb_all[:4])
    x0_w_all, x0_l_all, emb_all = x0_w_all[train_idx], x0_l_all[train_idx], emb_all[train_idx]
    state_path, config = os.path.splitext(args.out)[0] + ".state.pt", run_config(args, world)
    state = load_state(state_path, config, args.max_steps) if os.path.exists(state_path) else None
    torch.manual_seed(args.seed)  # the same on every rank; the batches come from the stream `g` below
    teacher = models.load_teacher(family, args.teacher, args.motion_adapter, device, frozen)
    uncond = models.encode_prompts(teacher, [""]).to(device)  # (1, L, D): the empty prompt
    student, meta = models.load_model(teacher, args.student, torch.float32)  # float32 master weights
    params = trainable_parameters(family, student, args.train_layers)
    student.eval()  # dropout off (diffusers' temporal convs have 0.1): the student is compared with a
    #                 dropout-free reference, and L_DPO = log 2 must hold while they are equal
    reference = copy.deepcopy(student).to(frozen).requires_grad_(False).eval() if args.reference == "student0" else None
    if args.grad_checkpointing:
        checkpoint_blocks(student)
    model = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device] if device.startswith("cuda") else None)
    teacher_unet = teacher.unet
    if args.compile:  # the UNets' forwards compiled (off by default: benchmarks/RESULTS.md)
        model, teacher_unet, reference = torch.compile(model), torch.compile(teacher.unet), reference and torch.compile(reference)
    loss_fn = torch.compile(redpo_loss) if device.startswith("cuda") else redpo_loss
    on_cuda = device.startswith("cuda")  # fused AdamW: one kernel for all parameters
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, fused=True if on_cuda else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup, args.max_steps, args.lr_schedule))
    scheduler = teacher.scheduler
    n_pairs, G = x0_w_all.shape[0], args.batch_size * world  # G: the global micro-batch, all ranks together
    if world > 1 and G > n_pairs:
        raise models.UserError(f"{args.pairs}: {n_pairs} training pairs, fewer than --batch-size x processes = {G}")
    g = torch.Generator().manual_seed(args.seed)  # data order, prompt dropout, t, eps: one stream for all ranks
    order, cursor, start, log, seconds0 = torch.randperm(n_pairs, generator=g), 0, 1, [], 0.0
    if state is not None:  # a stopped run's training state: continue it as if never stopped
        student.load_state_dict(state["student"], strict=False)  # the trainable tensors only
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        g.set_state(state["rng"]["data"])
        if on_cuda:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        order, cursor, log, seconds0 = state["order"], state["cursor"], state["log"], state["seconds"]
        start = state["step"] + 1
        if rank == 0:
            print(f"redpo: resuming from step {state['step']} of {args.max_steps} ({state_path})")
        del state  # its copies of the weights and optimizer are in place now
    t0, last = time.time(), time.time()
    if rank == 0:
        print(f"redpo: {n_pairs} pairs to train on ({len(held_idx)} held out), "
              f"{sum(p.numel() for p in params):,} trainable parameters ({args.train_layers} layers), "
              f"loss={args.loss} beta={beta:g} w_sft={args.w_sft} sft_cfg={args.sft_cfg:g} sft_branches={args.sft_branches} "
              f"snr_gamma={args.snr_gamma:g} sft_on={args.sft_on} reference={args.reference} uncond_prob={args.uncond_prob} lr={lr:g} ({args.lr_schedule}) "
              f"interpolate={args.interpolate:g} steps={args.max_steps} (~{args.max_steps * args.batch_size * args.grad_accum * world / n_pairs:.1f} "
              f"epochs) world={world} device={device}")
    from tqdm import tqdm
    T = scheduler.config.num_train_timesteps
    mine = slice(rank * args.batch_size, (rank + 1) * args.batch_size)  # this rank's pairs of a global batch
    for step in tqdm(range(start, args.max_steps + 1), desc="redpo", disable=rank != 0, initial=start - 1,
                     total=args.max_steps):
        logging = step % args.log_every == 0 or step == args.max_steps or step == 1
        totals = {"loss": 0.0, "dpo": 0.0, "sft": 0.0, "implicit_acc": 0.0, "margin": 0.0}
        row = {"step": step}
        for micro in range(args.grad_accum):
            idx, drop, t, eps, order, cursor = draw_batch(g, order, cursor, G, T, x0_w_all.shape[1:], args.uncond_prob)
            idx, drop, t, eps = idx[mine], drop[mine], t[mine], eps[mine]  # (B,), (B,), (B,), (B, C, F, h, w)
            emb = emb_all[idx].to(device)
            emb = torch.where(drop.to(device).view(-1, 1, 1), uncond.expand_as(emb), emb)  # dropped: empty prompt
            batch = (x0_w_all[idx].to(device), x0_l_all[idx].to(device), emb, t.to(device), eps.to(device))
            loss, stats = train_step(family, scheduler, model, teacher_unet, reference, batch, args, use_bf16, device,
                                     loss_fn, uncond)
            if logging and micro == 0 and world == 1:  # the two terms' gradients taken apart
                row["grad_norm_dpo"] = round(grad_norm_of(stats["dpo_term"], params), 6)
                row["grad_norm_sft"] = round(grad_norm_of(stats["sft_term"], params), 6)
            (loss / args.grad_accum).backward()
            totals["loss"] += loss.item() / args.grad_accum
            for k in ("dpo", "sft", "implicit_acc", "margin"):
                totals[k] += stats[k].item() / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
        if world > 1:  # log the global batch's means, as one process would
            means = torch.tensor(list(totals.values()), dtype=torch.float64, device=device)
            torch.distributed.all_reduce(means)
            totals = dict(zip(totals, (means / world).tolist()))
        stop_if_non_finite(step, [("loss", totals["loss"]), ("gradient norm", grad_norm.item())], state_path,
                           "the optimizer step")
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        row.update({**{k: round(v, 6) for k, v in totals.items()}, "grad_norm": round(grad_norm.item(), 6), "lr": lr_now})
        if logging:
            dist = teacher_distance(family, scheduler, student, teacher.unet, heldout, uncond, args, use_bf16, device)
            row.update({f"dist_teacher_{k}": round(v, 6) for k, v in dist.items()})
        log.append(row)
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            stop_if_non_finite(step, [("weight", largest_weight(params))], state_path, "saving the training state")
            if rank == 0:  # every rank holds the same weights, optimizer and streams
                with models.atomic_path(state_path) as tmp:
                    torch.save({"step": step, "config": config, "seconds": seconds0 + time.time() - t0, "log": log,
                                "student": {n: p.detach().cpu() for n, p in student.named_parameters()
                                            if p.requires_grad},  # the trainable tensors
                                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                "order": order, "cursor": cursor,
                                "rng": {"torch": torch.get_rng_state(), "data": g.get_state(),
                                        "cuda": torch.cuda.get_rng_state(device) if on_cuda else None}}, tmp)
        if rank == 0 and logging:
            rate = (args.log_every / (time.time() - last) if step % args.log_every == 0
                    else (step - start + 1) / (time.time() - t0))
            last = time.time()
            norms = f" | grad dpo {row['grad_norm_dpo']:.3g} sft {row['grad_norm_sft']:.3g}" if "grad_norm_dpo" in row else ""
            tqdm.write(f"step {step:5d} | loss {totals['loss']:.4f} | dpo {totals['dpo']:.4f} | sft {totals['sft']:.6f}"
                       f" | implicit_acc {totals['implicit_acc']:.3f} | margin {totals['margin']:.3g}{norms}"
                       f" | dist_teacher {row['dist_teacher_cond']:.5f}/{row['dist_teacher_uncond']:.5f}"
                       f"/{row['dist_teacher_guided']:.4f} | lr {row['lr']:.2e} | {rate:.2f} steps/s")
    stop_if_non_finite(args.max_steps, [("weight", largest_weight(params))], state_path, f"writing {args.out}")
    if args.interpolate < 1:  # WiSE-FT: A of the way from the starting weights (read again, float32) to the trained
        start = trainable_parameters(family, models.load_model(teacher, args.student, torch.float32)[0], args.train_layers)
        with torch.no_grad():
            for p, p0 in zip(params, start):  # the same names in the same order
                p.lerp_(p0.to(p.device), 1 - args.interpolate)
    if rank == 0:
        seconds = seconds0 + time.time() - t0
        models.save_student(args.out, family, student, teacher, meta.get("round", "0"), args, stage="redpo",
                            pairs=os.path.abspath(args.pairs), steps=args.max_steps, train_seconds=round(seconds, 1),
                            heldout_ids=[int(i) for i in held_idx])
        models.write_jsonl(os.path.splitext(args.out)[0] + ".log.jsonl", log)
        if os.path.exists(state_path):  # the checkpoint is complete: nothing left to resume
            os.remove(state_path)
        print(f"redpo: wrote {args.out} ({models.count_params(family, student):,} prunable parameters, "
              f"{args.max_steps} steps in {seconds:.1f}s" + (f", {args.interpolate:g} of the way from the start" if args.interpolate < 1 else "") + ")")
    models.dist_cleanup()


if __name__ == "__main__":
    models.cli(main, get_parser())
