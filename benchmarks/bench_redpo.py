"""Benchmark: one ReDPO training step and one sampled video, ours vs the diffusers way, side by side.

DESIGN.md "Performance". Random weights at the family's native size (vc2: UNet3DConditionModel at 320x512x16,
latents 4x16x40x64; animatediff: SD-1.5 UNet + MotionAdapter at 512x512x16; toy: the shipped toy teacher's
architecture at 32x32x8), or --tiny configs like tests/tiny.py's (CPU, under a minute).
  train:  "ours" = redpo.train_step + backward + clip_grad_norm_ + AdamW (fused on CUDA), the teacher and the
          reference in models.frozen_dtype weights, the student in float32 under autocast; "baseline" = the way of
          diffusers' Diffusion-DPO example: the policy on [w; l] under autocast, the reference forward apart under
          no_grad, the SFT target from another teacher forward on the winners, torch's default AdamW, the same
          loss (redpo.redpo_loss). Both with and without gradient checkpointing (train+gc); one pair a step.
  sample: models.sample (our DDIM loop as shipped: fp32 on CPU, native bf16 weights on CUDA) vs diffusers'
          TextToVideoSDPipeline / AnimateDiffPipeline with the same UNet, DDIM settings and prompt embeddings,
          latents out; the VAE decode (models.decode) timed as its own row.
  checks: the step-1 losses (student == teacher == reference, so log 2) of ours and the baseline on identical
          inputs; a 2-step eta-0 run of ours (x0 rescaling off) vs the pipeline from the same noise, both on
          a float32 copy of the UNet in float32 (with torch's TF32 defaults and in strict float32).
--variants: more 'ours' train rows with models.for_speed options (cudnn-benchmark, channels-last, compile,
          compile-blocks) or bf16-weights (every UNet natively in bf16, float32 master weights in AdamW);
          --profile: where each 'ours' step's (and our sampler's) kernel time goes, by kind and by kernel.
--compile: the 'ours' train and sample rows with torch.compile'd UNets (not yet measured on a GPU: the vc2 run
          did not finish within 220 s, benchmarks/RESULTS.md).
FLOPs are counted once, on the meta device, with FlopCounterMode (attention in its math form; model FLOPs: the
recompute of gradient checkpointing is not counted). MFU = counted FLOPs / median time / --peak-tflops.
Prints a markdown table (for benchmarks/RESULTS.md); --out also writes everything as JSON.

Tiny CPU:  python benchmarks/bench_redpo.py --tiny
One GPU:   python benchmarks/bench_redpo.py --model vc2 --out vc2.json          (the train+gc rows are in every run)
           python benchmarks/bench_redpo.py --model animatediff --out animatediff.json
Pruned:    python benchmarks/bench_redpo.py --model vc2 --remove down_blocks.0.temp_attentions.1,mid_block.attentions.0
Counting:  python benchmarks/bench_redpo.py --model vc2 --flops-only   (any machine: meta device only, nothing timed)
Profile:   python benchmarks/bench_redpo.py --model vc2 --groups train --profile --variants channels-last
"""
import argparse
import contextlib
import copy
import gc
import math
import os
import platform
import re
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
import redpo  # noqa: E402

# Stable Diffusion's VAE (VC2 and AnimateDiff decode with it) and DDIM scheduler, random weights.
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
              sample_size=512, scaling_factor=0.18215)
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                    timestep_spacing="leading", set_alpha_to_one=False, clip_sample=False)
# tests/tiny.py's shapes with one layer per block (counting FLOPs costs time per op)
TINY_UNET3D = dict(block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
                   layers_per_block=1, sample_size=8, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                   up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
TINY_UNET2D = dict(block_out_channels=(8, 8), norm_num_groups=2, cross_attention_dim=8, layers_per_block=1,
                   sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
TINY_ADAPTER = dict(block_out_channels=(8, 8), motion_layers_per_block=1, motion_norm_num_groups=2,
                    motion_num_attention_heads=4)
GROUPS = ("train", "train+gc", "sample", "agreement")
# --variants: models.for_speed's options, and bf16-weights: every UNet in bf16 weights run natively (no autocast, so
# no casts and no float32 norms), the student's float32 master weights in AdamW (not in redpo.py: measured first)
VARIANT_OPTIONS = (*models.SPEED_OPTIONS, "bf16-weights")
TINY_VAE = dict(block_out_channels=(8, 8), down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vc2", choices=list(models.FAMILIES), help="model family (native size)")
    p.add_argument("--tiny", action="store_true", help="tiny configs instead of the native size (CPU, seconds)")
    p.add_argument("--reference", default=redpo.get_parser().get_default("reference"), choices=["teacher", "student0"],
                   help="DPO reference, as redpo.py's flag (default: redpo.py's)")
    p.add_argument("--remove", default="",
                   help="comma list of module paths to remove from the student (models.remove_layers)")
    p.add_argument("--steps", type=int, default=0, help="DDIM steps of the sample rows (0 = the family's; --tiny: 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before each row")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row (median, p10, p90)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="device peak for MFU (0 = 989 on H100/H200 (bf16 dense), else the measured matmul TFLOP/s)")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta device, time nothing")
    p.add_argument("--out", default="", help="also write the header, rows and checks to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNets of the 'ours' train and sample rows (as redpo.py --compile; the "
                        "train+gc rows and the baselines stay eager; compile time is in the warm-up, not the timing)")
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS), metavar="GROUP",
                   help=f"what to run: {', '.join(GROUPS)} (default: all; 'sample' includes the decode row)")
    p.add_argument("--variants", nargs="*", default=[], metavar="OPT[+OPT...]",
                   help="extra 'ours' train rows, each with options joined by '+' (models.for_speed's "
                        f"{', '.join(models.SPEED_OPTIONS)}, and bf16-weights: the UNets natively in bf16, "
                        "float32 master weights in AdamW), e.g. bf16-weights+compile-blocks")
    p.add_argument("--profile", action="store_true",
                   help="after timing each 'ours' train row (and our sampler), profile 2 more steps (1 more video) "
                        "and print where the time goes (kernel time by kind, the top kernels, and on CUDA the share "
                        "of the step the GPU is busy)")
    return p


# ----------------------------------------------------------------------------- models at size
def setup(args):
    """(UNet config, MotionAdapter config or None, VAE config, (frames, height, width), text tokens L)."""
    fam = models.get_family(args.model)
    if args.tiny:
        unet = (TINY_UNET2D, TINY_ADAPTER) if fam.name == "animatediff" else (TINY_UNET3D, None)
        return (*unet, TINY_VAE, (4, 16, 16), 16)
    size = (fam.frames, fam.height, fam.width)
    if fam.name == "toy":  # the shipped toy teacher's architecture
        def read(part):
            cfg = models.read_json(os.path.join(fam.default_teacher, part, "config.json"))
            return {k: v for k, v in cfg.items() if not k.startswith("_")}
        return read("unet"), None, read("vae"), size, read("text_encoder")["max_position_embeddings"]
    if fam.name == "animatediff":
        return models.SD15_UNET_CONFIG, models.MOTION_ADAPTER_CONFIG, SD_VAE, size, 77
    return models.VC2_UNET_CONFIG, None, SD_VAE, size, 77


def build(args, device):
    """(unet, vae), random float32 weights made on `device` (no CPU init; nothing allocated on meta), frozen."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel

    unet_cfg, adapter_cfg, vae_cfg, _, _ = setup(args)
    with torch.device(device):
        if adapter_cfg:
            unet = UNetMotionModel.from_unet2d(UNet2DConditionModel(**unet_cfg), MotionAdapter(**adapter_cfg))
        else:
            unet = UNet3DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
    if device != "meta":  # diffusers zero-inits some last layers: fan-in weights instead, so every path is live
        with torch.no_grad():
            for p in unet.parameters():
                if p.ndim > 1 and not p.any():
                    p.normal_(std=p[0].numel() ** -0.5)
    return unet.requires_grad_(False).eval(), vae.requires_grad_(False).eval()


def removed(args):
    return [p for p in args.remove.split(",") if p]


def sampled_model(args, base):
    """What the sample rows run: `base` without the --remove layers (a copy when any are removed)."""
    return models.remove_layers(copy.deepcopy(base), removed(args)) if removed(args) else base


def ddim(family):
    """The family's DDIM scheduler (as models.load_teacher sets it: AnimateDiff's is linear-beta, linspace)."""
    from diffusers import DDIMScheduler

    s = DDIMScheduler(**SD_SCHEDULER)
    if family.name == "animatediff":
        s = DDIMScheduler.from_config(s.config, beta_schedule="linear", clip_sample=False, timestep_spacing="linspace",
                                      steps_offset=1)
    return s


# ----------------------------------------------------------------------------- the two training steps
def redpo_args(args):
    """redpo.py's arguments with its defaults (beta, w_sft, loss, SFT target, x0 rescaling, lr, clipping)."""
    return redpo.get_parser().parse_args(["--model", args.model, "--reference", args.reference, "--pairs", "-",
                                          "--out", "-"])


def ours_loss(family, scheduler, student, teacher, reference, batch, rargs, bf16, device, loss_fn):
    """The shipped ReDPO micro-batch: the benchmark's only call of redpo.train_step (adapt here when it changes)."""
    return redpo.train_step(family, scheduler, student, teacher, reference, batch, rargs, bf16, device, loss_fn)


def baseline_loss(family, scheduler, student, teacher, reference, batch, rargs, bf16, device, loss_fn):
    """diffusers' Diffusion-DPO example's way: the policy forward on [w; l], then the reference forward apart
    under no_grad, then a teacher forward on the winners for the SFT target; the same loss."""
    x0_w, x0_l, emb, t, eps = batch
    B = x0_w.shape[0]
    t2, eps2, emb2 = t.repeat(2), eps.repeat(2, 1, 1, 1, 1), torch.cat([emb, emb])  # (2B,) (2B, C, F, h, w) (2B, L, D)
    x_t = models.add_noise(family, scheduler, torch.cat([x0_w, x0_l]), eps2, t2, not rargs.no_x0_rescale)  # [w; l]
    with models.autocast(device, bf16):
        eps_theta = models.predict_noise(family, student, x_t, t2, emb2)
        with torch.no_grad():
            eps_ref = models.predict_noise(family, teacher if reference is None else reference, x_t, t2, emb2)
            eps_teacher_w = models.predict_noise(family, teacher, x_t[:B], t, emb)  # (B, C, F, h, w)
    return loss_fn(eps_theta, eps_ref, eps2, rargs.beta or family.beta, rargs.w_sft, rargs.loss, rargs.sft_target,
                   eps_teacher_w)


LOSSES = {"ours": ours_loss, "baseline": baseline_loss}


def step_models(family, base, args, rargs, frozen):
    """(student, its trainable parameters, teacher, reference or None) as redpo.main builds them: a float32
    student (base without the --remove layers), the teacher = base, the reference a frozen copy of the student."""
    student = models.remove_layers(copy.deepcopy(base), removed(args)).float()
    params = redpo.trainable_parameters(family, student)
    student.eval()  # dropout off, as redpo.main
    reference = None
    if rargs.reference == "student0":
        reference = copy.deepcopy(student).to(frozen).requires_grad_(False).eval()
    return student, params, base, reference


# ----------------------------------------------------------------------------- FLOPs on the meta device
class OnMeta(torch.nn.Module):
    """A meta UNet fed CPU timesteps (models.add_noise reads t on the CPU, so the counted step keeps it there)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, **kwargs):
        return self.unet(x, t.to(x.device), **kwargs)


class Roles(torch.nn.Module):
    """The models of one step as children, so FlopCounterMode files their FLOPs by role ('Roles.student')."""

    def __init__(self, **unets):
        super().__init__()
        for role, unet in unets.items():
            setattr(self, role, None if unet is None else OnMeta(unet))

    def forward(self, fn):
        return fn(self)


def count_flops(fn, **unets):
    """{role: FLOPs, ..., "total": FLOPs} of fn(roles), attention counted in its math form."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        Roles(**unets)(fn)
    by_module = counter.get_flop_counts()
    return {**{r: sum(by_module.get(f"Roles.{r}", {}).values()) for r, u in unets.items() if u is not None},
            "total": counter.get_total_flops()}


def meta_flops(args, family, rargs, base, vae, batch, steps):
    """Counted FLOPs of one train step each way (by role), of one sampled video, of one video's decode."""
    student, _, teacher, reference = step_models(family, base, args, rargs, torch.float32)
    out = {kind: count_flops(lambda m: loss(family, ddim(family), m.student, m.teacher, m.reference, batch, rargs,
                                            False, "cpu", redpo.redpo_loss)[0].backward(),
                             student=student, teacher=teacher, reference=reference) for kind, loss in LOSSES.items()}
    x0_w, _, emb, t, _ = batch
    cfg_batch = (torch.cat([x0_w, x0_w]), t.repeat(2), torch.cat([emb, emb]))  # a sampling step's [uncond; cond]
    fwd2 = count_flops(lambda m: models.predict_noise(family, m.unet, *cfg_batch), unet=sampled_model(args, base))
    z = x0_w[0].transpose(0, 1)  # (C, F, h, w) -> (F, C, h, w): one video's frames
    return {**out, "sample": steps * fwd2["total"], "forward_one_video": fwd2["total"] // 2,
            "decode": count_flops(lambda m: vae.decode(z))["total"]}


# ----------------------------------------------------------------------------- measuring
def timed(fn, warmup, repeats, device):
    """Seconds of each of `repeats` calls of fn() after `warmup` untimed ones (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def matmul_tflops(n, dtype, device, warmup=2, repeats=5):
    """A square n x n matmul's TFLOP/s on `device` (the median of `repeats` timed products)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / float(np.median(timed(lambda: a @ a, warmup, repeats, device))) / 1e12


@contextlib.contextmanager
def fresh_memory(device, row):
    """CUDA: free what earlier rows left, reset the peak counter, file the row's peak GiB (CPU: not measured)."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.startswith("cuda") else None


def sdpa_kernel_name(head_dims, device):
    """On CUDA the first of flash > efficient > math (torch's default order) that takes every head dim in bf16."""
    if not device.startswith("cuda"):
        return f"the CPU kernel (head dims {head_dims})"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                for d in head_dims:
                    q = torch.randn(1, 2, 64, d, device=device, dtype=torch.bfloat16)
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)
            return f"{backend.name.lower()} (head dims {head_dims}, bf16)"
        except RuntimeError:
            continue
    return f"none of flash, efficient, math (head dims {head_dims})"


def header(args, device, head_dims):
    """Device, versions, the attention kernel, a measured matmul TFLOP/s (bf16 on CUDA, fp32 on CPU), the MFU peak."""
    import diffusers

    cuda = device.startswith("cuda")
    if cuda:
        name = torch.cuda.get_device_name(device)
    else:
        cpu = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")] \
            if os.path.exists("/proc/cpuinfo") else [platform.machine()]
        name = f"CPU {cpu[0]} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    matmul = matmul_tflops(n, dtype, device)
    return {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "sdpa": sdpa_kernel_name(head_dims, device), "matmul": f"{'bf16' if cuda else 'fp32'} {n}^2",
            "matmul_tflops": matmul,
            "peak_tflops": args.peak_tflops or (989.0 if "H100" in name or "H200" in name else matmul),
            "memory": "CUDA max_memory_allocated per row" if cuda else "not measured on the CPU (-)"}


# ----------------------------------------------------------------------------- rows
def train_row(row, family, base, args, rargs, batch, frozen, device, loss_fn):
    """Time the row's training step (loss, backward, clipping, AdamW) from a fresh student == teacher; with
    row["options"] (models.for_speed) the student, a copy of the teacher and the reference are set up for speed."""
    student, params, teacher, reference = step_models(family, base, args, rargs, frozen)
    if row["group"] == "train+gc":
        redpo.checkpoint_blocks(student)
    ours = row["row"].startswith("ours")  # ours: fused AdamW on CUDA, the loss as redpo.main runs it; baseline: defaults
    kind = "ours" if ours else "baseline"
    options = set(row.get("options", ()))
    if ours and args.compile and row["group"] == "train" and not options:  # as redpo.main --compile
        options = {"compile"}
    cudnn_benchmark, on_autocast, master = torch.backends.cudnn.benchmark, frozen == torch.bfloat16, None
    if options & {"channels-last", "compile", "compile-blocks", "bf16-weights"}:
        teacher = copy.deepcopy(teacher)  # the base model stays as the other rows use it
    if "bf16-weights" in options:  # every UNet in bf16, run natively (no autocast); AdamW on float32 master weights
        master = [p.detach().float().clone() for p in params]
        student, teacher, on_autocast = student.to(torch.bfloat16), teacher.to(torch.bfloat16), False
        reference = reference.to(torch.bfloat16) if reference is not None else None
    speed = options - {"bf16-weights"}  # models.for_speed's own options
    if speed:
        student, teacher = models.for_speed(student, speed), models.for_speed(teacher, speed)
        reference = models.for_speed(reference, speed) if reference is not None else None
    opt = torch.optim.AdamW(master or params, lr=rargs.lr or family.lr, weight_decay=rargs.weight_decay,
                            fused=True if ours and device.startswith("cuda") else None)
    loss_fn, scheduler, losses = loss_fn if ours else redpo.redpo_loss, ddim(family), []

    def step():
        loss, _ = LOSSES[kind](family, scheduler, student, teacher, reference, batch, rargs, on_autocast, device,
                               loss_fn)
        loss.backward()
        if master:  # the bf16 gradients to the float32 master weights, and after the step the weights back
            for m, p in zip(master, params):
                m.grad, p.grad = p.grad.float(), None
        max_norm = rargs.max_grad_norm if rargs.max_grad_norm > 0 else math.inf
        torch.nn.utils.clip_grad_norm_(master or params, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if master:
            with torch.no_grad():
                torch._foreach_copy_(params, master)
        losses.append(loss.detach())
    first = (master or params)[0]  # what AdamW updates: did the steps train anything?
    before = first.detach().clone()
    try:
        row["times"] = timed(step, args.warmup, args.repeats, device)
        row["param_change"] = (first.detach() - before).abs().max().item()
        if ours and args.profile:
            row["profile"] = profile_steps(step, 2, device)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark  # for_speed's switch is global: the next row starts clean
    row["step1_loss"] = losses[0].item()


KERNEL_KINDS = [("attention", r"flash|fmha|attention|sdpa|softmax"), ("layout transposes", r"nchwtonhwc|nhwctonchw"),
                ("convolution", r"conv|fprop|dgrad|wgrad|cudnn"),
                ("matmul", r"gemm|cutlass|nvjet|xmma|::mm$|addmm|bmm|matmul|linear"),
                ("normalization", r"norm|moments|fusedparams"), ("optimizer", r"adam|multi_tensor"),
                ("compiled (triton)", r"triton")]


def kernel_kind(name):
    """The kind of a CUDA kernel or a CPU op, by its name (the first of KERNEL_KINDS that matches, else other)."""
    return next((k for k, pattern in KERNEL_KINDS if re.search(pattern, name.lower())), "elementwise & other")


def profile_steps(step, n, device):
    """Profile n calls of step(): {"kernel_s": kernel (CUDA) or op (CPU, self) seconds a step, "by_kind":
    {kind: seconds a step}, "top": [[name, seconds a step, calls a step], ...] (the 8 largest)}."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    by_name = {}
    for e in prof.events():
        if e.device_type != (DeviceType.CUDA if cuda else DeviceType.CPU):
            continue
        seconds = (e.time_range.elapsed_us() if cuda else e.self_cpu_time_total) / 1e6 / n
        total, calls = by_name.get(e.name, (0.0, 0))
        by_name[e.name] = (total + seconds, calls + 1 / n)
    by_kind = {}
    for name, (seconds, _) in by_name.items():
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:8]
    return {"kernel_s": sum(by_kind.values()), "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top": [[name, seconds, calls] for name, (seconds, calls) in top]}


def samplers(family, vae, args, cond, uncond, shape, size, frozen):
    """(pipeline(unet), ours(unet, steps, eta, x0_rescale), theirs(pipe, steps, eta, latents)): our DDIM loop
    and diffusers' pipeline on the same prompt embeddings, scheduler settings and seed (latents out)."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, TextToVideoSDPipeline

    scheduler = ddim(family)
    frames, height, width = size

    def pipeline(unet):
        parts = dict(vae=vae, text_encoder=None, tokenizer=None, unet=unet,  # no text encoder: embeddings are passed
                     scheduler=DDIMScheduler.from_config(scheduler.config))
        if family.name == "animatediff":
            pipe = AnimateDiffPipeline(**parts, motion_adapter=None)  # the UNet is already a UNetMotionModel
        else:
            pipe = TextToVideoSDPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def ours(unet, steps, eta, x0_rescale=True, bf16=frozen == torch.bfloat16):
        return models.sample(family, unet, scheduler, cond, uncond, [args.seed], shape, steps, family.cfg, eta,
                             x0_rescale, bf16=bf16)

    def theirs(pipe, steps, eta, latents=None):
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_frames=frames, height=height, width=width,
                    num_inference_steps=steps, guidance_scale=family.cfg, eta=eta, latents=latents,
                    generator=torch.Generator().manual_seed(args.seed), output_type="latent").frames
    return pipeline, ours, theirs


def sample_rows(rows, family, base, vae, args, steps, device, sampler):
    """Time models.sample, the diffusers pipeline (latents out) and models.decode (the rows, in that order)."""
    pipeline, ours, theirs = sampler
    unet = sampled_model(args, base)
    ours_unet, pipe = torch.compile(unet) if args.compile else unet, pipeline(unet)  # built once, outside the timing
    for row, fn in zip(rows, (lambda: ours(ours_unet, steps, family.eta), lambda: theirs(pipe, steps, family.eta))):
        with fresh_memory(device, row):
            row["times"] = timed(fn, args.warmup, args.repeats, device)
    if args.profile:  # our sampler's video, once more
        rows[0]["profile"] = profile_steps(lambda: ours(ours_unet, steps, family.eta), 1, device)
    latents = ours(unet, steps, family.eta)  # (1, C, F, h, w)
    with fresh_memory(device, rows[2]):
        rows[2]["times"] = timed(lambda: models.decode(vae, latents), args.warmup, args.repeats, device)


@contextlib.contextmanager
def strict_fp32():
    """float32 matmuls and convolutions without TF32 (cuDNN allows TF32 by default); a no-op on the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def agreement(args, base, frozen, shape, device, sampler):
    """The 2-step eta-0 agreement of ours (no x0 rescaling) with the pipeline from the same noise, both on a
    float32 copy of the UNet (in bf16 the two differ by rounding: the pipeline keeps its latents and its DDIM
    update in bf16, ours in float32): with torch's default TF32 settings, and in strict float32."""
    pipeline, ours, theirs = sampler
    unet = sampled_model(args, base)
    unet32 = unet if frozen == torch.float32 else copy.deepcopy(unet).float()
    pipe, noise = pipeline(unet32), models.seeded_noise([args.seed], shape).to(device)
    out = {}
    for key, context in (("", contextlib.nullcontext), ("_strict_fp32", strict_fp32)):
        with context():
            a = ours(unet32, 2, 0.0, x0_rescale=False, bf16=False)  # no autocast: float32 as the pipeline runs it
            b = theirs(pipe, 2, 0.0, latents=noise).float()
        out[f"agreement_max_abs_diff{key}"] = (a - b).abs().max().item()
    out["agreement_max_abs_latent"] = a.abs().max().item()
    return out


def summarise(rows, peak_tflops):
    """Median, p10, p90, rate, TFLOP/s and MFU of every timed row; speed-up against its group's baseline row."""
    for r in rows:
        if r.get("times"):
            p10, med, p90 = np.percentile(r["times"], [10, 50, 90])
            r.update(median_s=med, p10_s=p10, p90_s=p90, rate=1 / med, tflops=r["tflop"] / med,
                     mfu=r["tflop"] / med / peak_tflops)
    for r in rows:
        base = [x for x in rows if x["group"] == r["group"] and x["baseline"] and "median_s" in x]
        r["speedup"] = base[0]["median_s"] / r["median_s"] if base and "median_s" in r else None


COLUMNS = [("group", "group", "s"), ("row", "row", "s"), ("precision", "precision", "s"),
           ("median s", "median_s", ".4g"), ("p10 s", "p10_s", ".4g"), ("p90 s", "p90_s", ".4g"),
           ("per s", "rate", ".3g"), ("unit", "unit", "s"),
           ("peak GiB", "peak_gib", ".2f"), ("TFLOP/unit", "tflop", ".4g"), ("TFLOP/s", "tflops", ".3g"),
           ("MFU", "mfu", ".1%"), ("speed-up", "speedup", ".2f")]


def device_is_cuda(info):
    return not info["device"].startswith("CPU")


def report(args, info, rows, checks):
    lines = [f"- device: {info['device']}; torch {info['torch']}, diffusers {info['diffusers']}",
             f"- attention (SDPA): {info['sdpa']}; FLOPs counted on the meta device in the math form",
             f"- measured {info['matmul']} matmul: {info['matmul_tflops']:.3g} TFLOP/s; MFU against "
             f"{info['peak_tflops']:.4g} TFLOP/s",
             f"- peak memory: {info['memory']}; one UNet forward on one video: "
             f"{info['forward_one_video_tflop']:.4g} TFLOP",
             f"- --model {args.model}{' --tiny' if args.tiny else ''} --reference {args.reference}"
             f"{' --remove ' + args.remove if args.remove else ''}{' --compile' if args.compile else ''} "
             f"--warmup {args.warmup} --repeats {args.repeats}; "
             f"{info['ddim_steps']} DDIM steps a video; per s: pairs (train) or videos; speed-up: the group's baseline "
"median / the row's", "",
             "| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        r = {**r, "row": r["row"] + (" (out of memory)" if r.get("oom") else " (failed)" if r.get("error") else "")}
        lines.append("| " + " | ".join("-" if r.get(k) is None else format(r[k], f) for _, k, f in COLUMNS) + " |")
    lines.append("")
    for group in ("train", "train+gc"):
        if group in checks:
            c = checks[group]
            lines.append(f"- {group} step-1 loss: ours {c['ours']:.6f}, baseline {c['baseline']:.6f} (log 2 = "
                         f"{math.log(2):.6f}), |ours - baseline| = {c['abs_diff']:.3g}")
    for r in rows:
        if r.get("options") and "step1_loss" in r:
            lines.append(f"- {r['group']} step-1 loss, {r['row']}: {r['step1_loss']:.6f}")
        if r.get("error"):
            lines.append(f"- {r['group']} {r['row']} failed: {r['error']}")
    if "agreement_max_abs_diff" in checks:
        why = " (differs by design: AnimateDiff's DDIM steps to t - 1000 // steps)" if args.model == "animatediff" \
            else ""
        lines.append(f"- 2-step eta-0 agreement, float32 UNet, ours (no x0 rescaling) vs the pipeline: max |diff| = "
                     f"{checks['agreement_max_abs_diff']:.3g} with torch's default TF32 settings, "
                     f"{checks['agreement_max_abs_diff_strict_fp32']:.3g} in strict float32 (max |latent| "
                     f"{checks['agreement_max_abs_latent']:.3g}){why}")
    for r in rows:
        if "profile" in r:
            pr, busy = r["profile"], ""
            if device_is_cuda(info) and r.get("median_s"):
                busy = f" = {pr['kernel_s'] / r['median_s']:.0%} of the timed step (the rest: the GPU waits)"
            kinds = ", ".join(f"{k} {v / pr['kernel_s']:.0%}" for k, v in pr["by_kind"].items())
            top = "; ".join(f"{name[:70]} {sec / pr['kernel_s']:.0%} ({calls:g} calls)"
                            for name, sec, calls in pr["top"])
            lines.append(f"- profile of {r['group']} {r['row']}: {'kernel' if busy else 'op (self CPU)'} time "
                         f"{pr['kernel_s']:.4g} s a {'video' if r['group'] == 'sample' else 'step'}{busy}; by kind: "
                         f"{kinds}; top: {top}")
    print("\n".join(lines))
    if args.out:
        models.write_json(args.out, {"args": vars(args), "header": info, "rows": rows, "checks": checks})


# ----------------------------------------------------------------------------- main
def main(args):
    from diffusers.models.attention_processor import Attention

    variants = [v.split("+") for v in args.variants]
    for v in variants:
        if not v or set(v) - set(VARIANT_OPTIONS):
            raise models.UserError(f"--variants {'+'.join(v)}: options joined by '+' from "
                                   f"{', '.join(VARIANT_OPTIONS)}")
    if variants and "train" not in args.groups:
        raise models.UserError("--variants: they are train rows, so --groups needs train")
    device = models.resolve_device(args.device)
    family = models.get_family(args.model)
    rargs = redpo_args(args)
    frozen = models.frozen_dtype(device)  # bf16 on CUDA: the teacher, the reference, sampled models
    bf16 = frozen == torch.bfloat16
    unet_cfg, _, vae_cfg, size, L = setup(args)
    steps = args.steps or (3 if args.tiny else family.steps)
    f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)  # pixels per latent pixel
    shape = (4, size[0], size[1] // f, size[2] // f)  # (C, F, h, w)
    g = torch.Generator().manual_seed(args.seed)  # the same inputs for every row
    x0_w, x0_l, eps = (torch.randn(1, *shape, generator=g) for _ in range(3))  # (1, C, F, h, w) each: one pair
    emb, uncond = (torch.randn(1, L, unet_cfg["cross_attention_dim"], generator=g) for _ in range(2))  # (1, L, D)
    t = torch.randint(0, 1000, (1,), generator=g)

    meta_unet, meta_vae = build(args, "meta")
    head_dims = sorted({m.inner_dim // m.heads for m in meta_unet.modules() if isinstance(m, Attention)})
    info = header(args, device, head_dims)
    meta_batch = (x0_w.to("meta"), x0_l.to("meta"), emb.to("meta"), t, eps.to("meta"))  # t stays on the CPU (OnMeta)
    flops = meta_flops(args, family, rargs, meta_unet, meta_vae, meta_batch, steps)
    info["forward_one_video_tflop"], info["ddim_steps"] = flops["forward_one_video"] / 1e12, steps
    train = [{"group": group, "row": kind, "unit": "pair", "baseline": kind == "baseline", "flops_by_role": flops[kind],
              "tflop": flops[kind]["total"] / 1e12, "precision": "fp32 master + bf16 autocast" if bf16 else "fp32"}
             for group in ("train", "train+gc") for kind in LOSSES]
    if args.compile:
        train[0]["row"] = "ours (compiled)"
    train[2:2] = [{**train[0], "row": "ours + " + "+".join(v), "options": v} for v in variants]
    for r in train[2:2 + len(variants)]:
        if "bf16-weights" in r["options"]:
            r["precision"] = "bf16 weights, no autocast, fp32 master in AdamW"
    pipe_name = f"diffusers {'AnimateDiff' if family.name == 'animatediff' else 'TextToVideoSD'}Pipeline"
    sample = [{"group": "sample", "row": name, "unit": "video", "baseline": name == pipe_name, "steps": steps,
               "tflop": flops["sample"] / 1e12, "precision": "bf16" if bf16 else "fp32"}
              for name in ("ours (models.sample" + (", compiled)" if args.compile else ")"), pipe_name)]
    sample.append({"group": "decode", "row": "VAE decode (models.decode)", "unit": "video", "baseline": False,
                   "tflop": flops["decode"] / 1e12, "precision": "bf16" if bf16 else "fp32"})
    train = [r for r in train if r["group"] in args.groups]
    rows, checks = train + (sample if "sample" in args.groups else []), {}
    if not args.flops_only:
        torch.manual_seed(args.seed)
        base, vae = (m.to(frozen) for m in build(args, device))
        batch = tuple(v.to(device) for v in (x0_w, x0_l, emb, t, eps))
        loss_fn = torch.compile(redpo.redpo_loss) if device.startswith("cuda") else redpo.redpo_loss  # as redpo.main
        for row in train:
            with fresh_memory(device, row):
                try:
                    train_row(row, family, base, args, rargs, batch, frozen, device, loss_fn)
                except torch.cuda.OutOfMemoryError:  # reported in the table; the other rows still run
                    row["oom"] = True
                except Exception as e:  # noqa: BLE001 -- a --variants row that fails is reported; the others run
                    if not row.get("options"):
                        raise
                    row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
                    print(f"{row['row']}: {row['error']}", file=sys.stderr, flush=True)
            if row.get("times"):  # progress, so a run stopped part way leaves its rows on stderr
                pr = row.get("profile", {})
                kinds = ", ".join(f"{k} {v:.4g} s" for k, v in pr.get("by_kind", {}).items())
                print(f"{row['group']} {row['row']}: median {np.median(row['times']):.4g} s"
                      + (f"; profiled kernel time {pr['kernel_s']:.4g} s ({kinds})" if pr else ""),
                      file=sys.stderr, flush=True)
        for group in ("train", "train+gc"):
            loss = {r["row"].split(" ")[0]: r["step1_loss"] for r in train
                    if r["group"] == group and "step1_loss" in r and not r.get("options")}
            if len(loss) == 2:
                checks[group] = {"ours": loss["ours"], "baseline": loss["baseline"],
                                 "abs_diff": abs(loss["ours"] - loss["baseline"])}
        sampler = samplers(family, vae, args, emb.to(device), uncond.to(device), shape, size, frozen)
        if "sample" in args.groups:
            sample_rows(sample, family, base, vae, args, steps, device, sampler)
        if "agreement" in args.groups:
            checks.update(agreement(args, base, frozen, shape, device, sampler))
        summarise(rows, info["peak_tflops"])
    report(args, info, rows, checks)


if __name__ == "__main__":
    models.cli(main, get_parser())
