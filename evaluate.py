"""Evaluate: rewards on an eval prompt set + efficiency (params, FLOPs, latency, memory) + a report.

METHOD.md section 7. For the teacher and any number of student checkpoints (prune.py, redpo.py),
sample `--samples` videos per eval prompt, score the four dimensions (VQ, TC, DD, TA) with a reward
model (rewards.py) and summarise them with 95 % intervals; measure each model's prunable and total
UNet parameters, the FLOPs and the latency of one UNet forward, the latency and peak memory of one
whole video. Sample k of a prompt starts from the noise of a seed derived from (--seed, prompt, k),
the same for every model, so teacher and students are compared on identical initial noise.

Outputs (OUT_DIR):
  videos/<label>/<prompt>-<k>.mp4   every video, named as VBench expects (run VBench on the folder)
  side_by_side/<prompt>.mp4         sample 0 of every model, teacher | students ..., labelled
  report.json                       args, settings, per model: params, FLOPs, latency, memory,
                                    scores (mean, ci95, n per dimension and 'average'), per-video rows
  report.md                         the table (also printed)
  report.partial.<rank>-of-<world>.jsonl   while running: every finished batch's rows and model results,
                                    appended and fsynced; removed once report.json is written

A rerun of the same command resumes: it skips every batch whose rows are in the partial file (a torn
last line of a killed run is dropped), and every model whose results are; records of other arguments,
checkpoints or scorers are dropped. The report equals an uninterrupted run's except the measured
fields (MEASURED); on CPU the rest is identical, scores included (a batch runs whole, so its float
rounding never depends on a resume). Videos are never re-scored from their lossy mp4s.

Tiny CPU:  python evaluate.py --model toy --prompts eval.txt --students runs/r1/pruned.safetensors \
               runs/r1/redpo.safetensors --labels pruned vip --out-dir runs/eval
One GPU:   python evaluate.py --model vc2 --teacher ckpt/vc2 --prompts eval.txt --samples 2 \
               --students runs/r2/pruned.safetensors runs/r2/redpo.safetensors --labels pruned vip \
               --scorer clip --scorer-path ViT-H-14:ckpt/clip.safetensors --out-dir runs/eval
Many GPUs: torchrun --nproc_per_node 8 evaluate.py ...  (videos split by rank, rank 0 measures and writes)
"""
import argparse
import contextlib
import hashlib
import json
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch

import models
import rewards

SHORT = models.DIM_SHORT
MEASURED = ("latency.unet_forward_s", "latency.video_s", "memory.peak_mib")  # per model: timings, not results


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", choices=list(models.FAMILIES), help="model family")
    p.add_argument("--teacher", default="", help="teacher folder (default: the family's shipped teacher)")
    p.add_argument("--motion-adapter", default="", help="MotionAdapter folder (animatediff)")
    p.add_argument("--students", nargs="*", default=[], metavar="CKPT", help="student checkpoints to evaluate")
    p.add_argument("--labels", nargs="+", default=None, help="one label per student (default: file stems)")
    p.add_argument("--no-teacher", action="store_true", help="do not evaluate the teacher itself")
    p.add_argument("--prompts", required=True, help="eval prompt file (.txt one a line, or .jsonl with 'prompt')")
    p.add_argument("--num-prompts", type=int, default=0, help="use the first N prompts (0 = all)")
    p.add_argument("--samples", type=int, default=1, help="videos per prompt (VBench uses 5)")
    p.add_argument("--out-dir", required=True, help="folder for videos/, side_by_side/, report.json, report.md")
    p.add_argument("--scorer", default="toy", choices=list(rewards.SCORERS), help="reward model (rewards.py)")
    p.add_argument("--scorer-path", default="", help="scorer weights (clip: ARCH:FILE or an open_clip folder)")
    p.add_argument("--batch-size", type=int, default=4, help="videos per sampling batch")
    models.add_sampling_args(p)
    p.add_argument("--latency-repeats", type=int, default=3, help="timed runs per latency (median reported)")
    p.add_argument("--no-efficiency", action="store_true", help="skip FLOPs, latency and memory")
    p.add_argument("--side-by-side", action=argparse.BooleanOptionalAction, default=True,
                   help="write one labelled side-by-side video per prompt")
    p.add_argument("--seed", type=int, default=0, help="base seed; sample k of a prompt derives its seed from it")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return p


# ----------------------------------------------------------------------------- names and seeds
def sample_seed(seed, prompt, k):
    """A stable seed per (base seed, prompt, sample index), whatever the prompt's position or the model."""
    return int(hashlib.sha256(f"{seed}:{prompt}:{k}".encode()).hexdigest()[:8], 16) % (2 ** 31)


def safe_name(text, max_bytes=180):
    """A file name from free text: path separators and control characters become '_', length capped."""
    name = "".join("_" if c in '/\\:*?"<>|' or ord(c) < 32 else c for c in text).strip().strip(".") or "_"
    return name.encode()[:max_bytes].decode(errors="ignore")


def prompt_names(prompts):
    """One distinct file name per prompt (VBench reads the prompt back from it)."""
    names, used = [], set()
    for i, prompt in enumerate(prompts):
        name = safe_name(prompt)
        if name in used:  # two prompts that differ only in replaced characters
            name = f"{name}~{i}"
        used.add(name)
        names.append(name)
    return names


def model_labels(args):
    """[(label, checkpoint)] in evaluation order: the teacher (checkpoint '') first, then the students."""
    if args.labels is not None and len(args.labels) != len(args.students):
        raise models.UserError(f"--labels has {len(args.labels)} labels for {len(args.students)} --students "
                               f"(give one per student, or none)")
    labels = args.labels
    if labels is None:
        stems = [os.path.splitext(os.path.basename(c))[0] for c in args.students]
        labels = [f"{os.path.basename(os.path.dirname(os.path.abspath(c)))}-{s}" if stems.count(s) > 1 else s
                  for c, s in zip(args.students, stems)]
    entries = ([] if args.no_teacher else [("teacher", "")]) + list(zip(labels, args.students))
    if not entries:
        raise models.UserError("nothing to evaluate: give --students, or drop --no-teacher")
    names = [safe_name(label) for label, _ in entries]
    if len(set(names)) != len(names):
        raise models.UserError(f"model labels must be distinct as folder names, got {[e[0] for e in entries]} "
                               f"(use --labels)")
    return entries


# ----------------------------------------------------------------------------- efficiency
def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats, device, warmup=1):
    """Median wall time of `fn()` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(device):
    """Peak memory: CUDA's allocator peak since the last reset, or on CPU the process's peak RSS
    (which cannot be reset: it is the peak of the whole run so far, not of one model)."""
    if str(device).startswith("cuda"):
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2 ** 20, "measure": "cuda_max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_mib": rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), "measure": "process_peak_rss"}


@torch.no_grad()
def efficiency(teacher, unet, cond, uncond, seed, settings, repeats, device):
    """FLOPs and latency of one UNet forward on one latent video (conditional only, batch 1), and the
    latency and peak memory of one whole video (all steps with CFG, then decoding)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    family = teacher.family
    shape = models.latent_shape(teacher, settings["frames"], settings["height"], settings["width"])
    x = models.seeded_noise([seed], shape).to(device)  # (1, C, F, h, w)
    t = torch.full((1,), teacher.scheduler.config.num_train_timesteps // 2, device=device, dtype=torch.long)
    bf16 = settings["precision"] == "bf16"
    forward = lambda: models.predict_noise(family, unet, x, t, cond)  # noqa: E731
    # the flop counter knows CUDA's fused attention kernels but not the CPU one: count the math form there
    on_cuda = str(device).startswith("cuda")
    with (contextlib.nullcontext() if on_cuda else sdpa_kernel([SDPBackend.MATH])), \
            FlopCounterMode(display=False) as counter, models.autocast(device, bf16, unet):
        forward()
    with models.autocast(device, bf16, unet):
        unet_s = median_seconds(forward, repeats, device, warmup=1)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # no warm-up: the evaluation videos were just sampled with this model and VAE
    video_s = median_seconds(lambda: models.generate(teacher, unet, cond, uncond, [seed], settings), repeats,
                             device, warmup=0)
    return {"flops": {"unet_forward": int(counter.get_total_flops()), "latent_shape": [1, *shape]},
            "latency": {"unet_forward_s": unet_s, "video_s": video_s, "repeats": repeats,
                        "precision": settings["precision"]},  # bf16 weights (run natively), or float32
            "memory": peak_memory(device)}


# ----------------------------------------------------------------------------- resuming
def model_key(args, teacher, scorer, settings, device, label, checkpoint, first_prompt):
    """A hash of everything a model's rows and results depend on; partial records of another key are stale."""
    stat = os.stat(checkpoint) if checkpoint else None
    blob = {"teacher": teacher.fingerprint, "label": label, "device": device, "settings": settings,
            "checkpoint": [os.path.abspath(checkpoint), stat.st_size, stat.st_mtime_ns] if checkpoint else "",
            "seed": args.seed, "scorer": [scorer.name, scorer.fingerprint],
            "efficiency": None if args.no_efficiency else [args.latency_repeats, first_prompt]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def read_partial(path):
    """The records of a partial file up to its first unreadable line (the torn last line of a killed run)."""
    records = []
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:  # garbled bytes end it like a torn line
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                if not isinstance(record, dict):
                    break
                records.append(record)
    return records


def append_partial(path, records):
    """Append records as JSON lines, on disk before this returns (a kill right after keeps them)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- side by side
def label_strip(label, width, size):
    """A black (strip, width, 3) uint8 image with `label` written in white (PIL's built-in font)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # an old Pillow or one without FreeType: the bitmap font
        font = ImageFont.load_default()
    img = Image.new("RGB", (width, strip_height(size)), (0, 0, 0))
    ImageDraw.Draw(img).text((2, 2), label, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def font_size(height):
    return max(10, height // 20)


def strip_height(size):
    return (size + 7) // 2 * 2  # even, so every frame keeps even dimensions for H.264


def panel_scale(height):
    """Whole-pixel enlargement of a side-by-side panel: at least 128 pixels high."""
    return max(1, 128 // height)


def side_by_side(videos, labels):
    """Videos (F, H, W, 3) -> one (F, strip + H, sum W, 3) video, each panel under its label. Small
    videos are enlarged (whole pixels) to at least 128 pixels high so that their labels fit."""
    f = min(len(v) for v in videos)
    k = panel_scale(videos[0].shape[1])
    videos = [v.repeat(k, axis=1).repeat(k, axis=2) if k > 1 else v for v in videos]
    size = font_size(videos[0].shape[1])
    panels = []
    for video, label in zip(videos, labels):
        strip = label_strip(label, video.shape[2], size)  # (strip, W, 3)
        panels.append(np.concatenate([np.broadcast_to(strip, (f, *strip.shape)), video[:f]], axis=1))
    return np.concatenate(panels, axis=2)  # (F, strip + H, n * W, 3)


# ----------------------------------------------------------------------------- the report
def human(n, units=("K", "M", "B", "T")):
    for i in range(len(units), 0, -1):
        if abs(n) >= 1000 ** i:
            return f"{n / 1000 ** i:.3g}{units[i - 1]}"
    return f"{n:g}"


def markdown(results, settings, args, teacher_params):
    lines = [f"Evaluation: {args.model}, scorer {args.scorer}, {results[0]['scores']['average']['n']} videos per "
             f"model ({settings['frames']}x{settings['height']}x{settings['width']}, {settings['steps']} steps, "
             f"CFG {settings['cfg']:g}, {settings['precision']}). Scores: mean ± 95 % interval half-width.", "",
             "| model | params | FLOPs | UNet latency | video latency | "
             + " | ".join(SHORT[d] for d in models.DIMS) + " | avg |",
             "|---" * (6 + len(models.DIMS)) + "|"]
    for r in results:
        params = f"{human(r['params']['prunable'])} ({r['params']['prunable'] / teacher_params:.1%})"
        flops = human(r["flops"]["unet_forward"], ("K", "M", "G", "T")) if r["flops"] else "–"
        lat = r["latency"]
        unet_ms, video_s = (f"{lat['unet_forward_s'] * 1e3:.1f} ms", f"{lat['video_s']:.2f} s") if lat else ("–", "–")
        cells = []
        for d in (*models.DIMS, "average"):
            s = r["scores"][d]
            cells.append(f"{s['mean']:.3f} ± {(s['ci95'][1] - s['ci95'][0]) / 2:.3f}")
        lines.append(f"| {r['label']} | {params} | {flops} | {unet_ms} | {video_s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def load_unet(teacher, checkpoint, device):
    """The teacher's UNet, or a student's; a student is built off the accelerator so that its peak
    memory never includes the teacher's weights."""
    if not checkpoint:
        return teacher.unet.to(device), {"removed": [], "round": "0"}
    teacher.unet.to("cpu")
    unet, meta = models.load_student(checkpoint, teacher)
    return unet.to(device).eval().requires_grad_(False), meta


def main(args):
    from tqdm import tqdm

    family = models.get_family(args.model)
    entries = model_labels(args)
    for flag in ("samples", "batch_size", "latency_repeats"):
        if getattr(args, flag) < 1:
            raise models.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.num_prompts < 0:
        raise models.UserError("--num-prompts must be 0 (all) or positive")
    prompts = list(dict.fromkeys(models.read_prompts(args.prompts)))[:args.num_prompts or None]  # unique, in order
    metas = {c: models.read_student_meta(c) for _, c in entries if c}  # bad files fail before any model loads
    rank, world, device = models.dist_setup(args.device)
    teacher = models.load_teacher(family, args.teacher, args.motion_adapter, device,
                                  models.frozen_dtype(device, args.precision))
    for c, meta in metas.items():  # a student of another teacher fails before any generation
        models.check_student(c, meta, teacher)
    settings = models.sampling_settings(args, family, device)
    models.latent_shape(teacher, settings["frames"], settings["height"], settings["width"])  # validates the size
    scorer = rewards.get_scorer(args.scorer, args.scorer_path, device)
    out = os.path.abspath(args.out_dir)
    names = prompt_names(prompts)
    uncond = models.encode_prompts(teacher, [""])  # (1, L, D): the unconditional embedding of CFG
    items = [(i, k, sample_seed(args.seed, p, k)) for i, p in enumerate(prompts) for k in range(args.samples)]
    mine = items[rank::world]  # this rank's share of the videos
    teacher_params = models.count_params(family, teacher.unet)
    os.makedirs(out, exist_ok=True)
    partial = os.path.join(out, f"report.partial.{rank}-of-{world}.jsonl")  # this rank's finished work
    keys = [model_key(args, teacher, scorer, settings, device, label, c, prompts[0]) for label, c in entries]
    records = [r for r in read_partial(partial) if r.get("key") in keys]
    if os.path.exists(partial):  # without a torn line or stale records, so that appends start on a fresh line
        models.write_jsonl(partial, records)
    batches = [mine[b:b + args.batch_size] for b in range(0, len(mine), args.batch_size)]  # each runs whole
    plans = []
    for key in keys:  # the rows of finished batches, the batches to run, the result if the model is done
        done = {(r["row"]["prompt"], r["row"]["sample"]): r["row"] for r in records if r["key"] == key
                and "row" in r and os.path.exists(os.path.join(out, r["row"]["video"]))}
        finished = [all((prompts[i], k) in done for i, k, _ in batch) for batch in batches]
        plans.append(([done[prompts[i], k] for batch, f in zip(batches, finished) if f for i, k, _ in batch],
                      [batch for batch, f in zip(batches, finished) if not f],
                      next((r["result"] for r in records if r["key"] == key and "result" in r), None)))
    skipped = sum(len(rows) for rows, _, _ in plans)
    if skipped and rank == 0:
        print(f"resuming: {skipped} of {len(entries) * len(mine)} videos already done"
              + (" (rank 0's share)" if world > 1 else ""))
    results = []
    for (label, checkpoint), key, (rows, todo, result) in zip(entries, keys, plans):
        if not todo and result is not None:  # finished by an earlier run
            results.append((result, rows))
            continue
        unet, meta = load_unet(teacher, checkpoint, device)
        for batch in tqdm(todo, desc=f"evaluate {label}", disable=rank != 0):
            texts = [prompts[i] for i, _, _ in batch]
            cond = models.encode_prompts(teacher, texts)  # (N, L, D)
            _, videos = models.generate(teacher, unet, cond, uncond, [s for _, _, s in batch], settings)  # (N, F, H, W, 3)
            paths = [os.path.join(out, "videos", safe_name(label), f"{names[i]}-{k}.mp4") for i, k, _ in batch]
            models.write_videos(paths, videos, family.fps)
            new = []
            for (i, k, seed), path, score in zip(batch, paths, scorer.score(videos, texts)):
                new.append({"prompt": prompts[i], "sample": k, "seed": seed, "video": os.path.relpath(path, out),
                            **{d: score[d] for d in models.DIMS}})
            append_partial(partial, [{"key": key, "row": row} for row in new])  # after its videos: they exist
            rows += new
        if result is None:
            prunable = models.count_params(family, unet)  # as the paper counts them
            result = {"label": label, "checkpoint": checkpoint, "removed": meta["removed"],
                      "round": int(meta["round"]),
                      "params": {"prunable": prunable, "unet": sum(p.numel() for p in unet.parameters()),
                                 "fraction_of_teacher": prunable / teacher_params},
                      "flops": None, "latency": None, "memory": None}
            if rank == 0 and not args.no_efficiency:
                i, _, seed = items[0]
                result.update(efficiency(teacher, unet, models.encode_prompts(teacher, [prompts[i]]), uncond, seed,
                                         settings, args.latency_repeats, device))
            append_partial(partial, [{"key": key, "result": result}])
        results.append((result, rows))
        del unet
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()

    if world > 1:  # every rank's rows to every rank (the videos are all written once this returns)
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, [rows for _, rows in results])
        results = [(r, [row for g in gathered for row in g[m]]) for m, (r, _) in enumerate(results)]
    order = {(p, k): n for n, (p, k) in enumerate((prompts[i], k) for i, k, _ in items)}
    report_models = []
    for result, rows in results:
        rows.sort(key=lambda row: order[row["prompt"], row["sample"]])
        report_models.append({**result, "scores": rewards.aggregate(rows), "videos": rows})

    sbs = []
    if args.side_by_side:
        labels = [label for label, _ in entries]
        share = range(rank, len(prompts), world)  # this rank's share of the prompts

        def write(sl):  # on threads: each read and write is an ffmpeg process
            for i in share[sl]:
                videos = [models.read_video(os.path.join(out, "videos", safe_name(label), f"{names[i]}-0.mp4"))
                          for label in labels]
                models.write_video(os.path.join(out, "side_by_side", f"{names[i]}.mp4"),
                                   side_by_side(videos, labels), family.fps)
        models.in_threads(write, len(share), "cpu")
        sbs = [os.path.join("side_by_side", f"{n}.mp4") for n in names]
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # every side-by-side is written before rank 0 reports
    if rank == 0:
        report = {
            "args": vars(args), "settings": settings, "family": family.name, "teacher": teacher.path,
            "motion_adapter": teacher.motion_adapter, "teacher_fingerprint": teacher.fingerprint,
            "teacher_params": teacher_params,
            "scorer": {"name": scorer.name, "fingerprint": scorer.fingerprint, "path": args.scorer_path},
            "device": device, "world_size": world, "prompts": prompts, "samples": args.samples,
            "side_by_side": {"label_strip_px": strip_height(font_size(settings["height"] * panel_scale(settings["height"]))),
                             "scale": panel_scale(settings["height"]), "videos": sbs}
            if args.side_by_side else None,
            "models": report_models,
        }
        table = markdown(report_models, settings, args, teacher_params)
        models.write_json(os.path.join(out, "report.json"), report)
        with models.atomic_path(os.path.join(out, "report.md")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(table)
        for name in os.listdir(out):  # every rank's rows are in the report now
            if name.startswith("report.partial."):
                os.remove(os.path.join(out, name))
        print(table)
        print(f"evaluate: {len(report_models)} models x {len(items)} videos; wrote "
              f"{os.path.join(args.out_dir, 'report.json')} and report.md")
    models.dist_cleanup()


if __name__ == "__main__":
    models.cli(main, get_parser())
