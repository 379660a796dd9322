"""Make pairs: one teacher video (candidate winner) and one student video (candidate loser) per prompt.

METHOD.md section 5.3. Both start from the same seed, hence the same initial noise (and the same
eta noise). Writes playable mp4s, the final latents and the text embedding as safetensors, and a
pairs JSONL (DESIGN.md) whose paths are relative to the JSONL's folder. The teacher never changes,
so its outputs are cached under --teacher-cache by (teacher fingerprint, prompt, seed, sampler
settings) and reused by later runs. Pair k of a prompt (--samples-per-prompt K) starts from a seed
derived from (--seed, --round, prompt, k): a prompt keeps its seeds whatever its position in the
file, and every round gets fresh pairs (new initial noise, new teacher videos) for the same prompt.
A rerun of the same command resumes: it skips every batch whose pairs are complete (all files there,
and the student latents, written last, carry the key of teacher, student, prompt, seed and settings)
and writes the JSONL of an uninterrupted run. The same command twice gives a byte-identical JSONL
and, on CPU, identical tensors (a batch runs whole, so its float rounding never depends on a resume).

Tiny CPU:  python make_pairs.py --model toy --prompts prompts.txt --student runs/pruned.safetensors --out-dir runs/pairs
One GPU:   python make_pairs.py --model vc2 --teacher ckpt/vc2 --prompts prompts.txt \
               --student runs/r1/pruned.safetensors --out-dir runs/r1/pairs --teacher-cache runs/teacher_cache
Many GPUs: torchrun --nproc_per_node 8 make_pairs.py ...  (prompts split by rank, rank 0 writes the JSONL)
"""
import argparse
import hashlib
import json
import os

import torch

import models


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", choices=list(models.FAMILIES), help="model family")
    p.add_argument("--teacher", default="", help="teacher folder (default: the family's shipped teacher)")
    p.add_argument("--motion-adapter", default="", help="MotionAdapter folder (animatediff)")
    p.add_argument("--student", default="", help="student checkpoint (default: the teacher itself)")
    p.add_argument("--prompts", required=True, help="prompt file (.txt one a line, or .jsonl with 'prompt')")
    p.add_argument("--out-dir", required=True, help="folder for pairs.jsonl, videos/ and latents/")
    p.add_argument("--teacher-cache", default="", help="teacher cache folder (default: OUT_DIR/teacher_cache)")
    models.add_sampling_args(p)
    p.add_argument("--samples-per-prompt", type=int, default=1, help="pairs per prompt, each from its own seed")
    p.add_argument("--round", type=int, default=0, help="the loop's round: part of every pair's seed")
    p.add_argument("--batch-size", type=int, default=8, help="videos per sampling batch")
    p.add_argument("--seed", type=int, default=0, help="base seed; each pair's seed derives from it")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return p


def prompt_seed(seed, prompt, round_=0, k=0):
    """A stable seed per (base seed, round, prompt, sample k); round 0, sample 0 is the plain (seed, prompt)."""
    key = f"{seed}:{prompt}" if (round_, k) == (0, 0) else f"{seed}:{round_}:{k}:{prompt}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % (2 ** 31)


def cache_key(fingerprint, prompt, seed, settings):
    blob = json.dumps({"teacher": fingerprint, "prompt": prompt, "seed": seed, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def save_tensors(path, metadata=None, **tensors):
    from safetensors.torch import save_file

    with models.atomic_path(path) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def pair_done(p):
    """A pair is complete when all its files exist and its student latents (written last) carry its key:
    the key names the teacher, the student, the prompt, the seed and the settings."""
    from safetensors import safe_open

    if not all(os.path.exists(p[f]) for f in ("t_vid", "t_lat", "emb", "vid", "lat")):
        return False
    try:
        with safe_open(p["lat"], "pt") as f:
            return (f.metadata() or {}).get("key") == p["key"]
    except Exception:  # an unreadable file is not a complete one
        return False


def main(args):
    from tqdm import tqdm

    family = models.get_family(args.model)
    prompts = list(dict.fromkeys(models.read_prompts(args.prompts)))  # unique, in order
    if args.samples_per_prompt < 1:
        raise models.UserError(f"--samples-per-prompt must be >= 1 (got {args.samples_per_prompt})")
    jobs = [(j, k) for j in range(len(prompts)) for k in range(args.samples_per_prompt)]  # (prompt, sample)
    rank, world, device = models.dist_setup(args.device)
    teacher = models.load_teacher(family, args.teacher, args.motion_adapter, device,
                                  models.frozen_dtype(device, args.precision))
    student, meta = models.load_model(teacher, args.student)
    student.eval().requires_grad_(False)
    settings = models.sampling_settings(args, family, device)
    models.latent_shape(teacher, settings["frames"], settings["height"], settings["width"])  # validates the size
    cache_dir = args.teacher_cache or os.path.join(args.out_dir, "teacher_cache")
    out = os.path.abspath(args.out_dir)
    rel = lambda p: os.path.relpath(p, out)
    student_fp = models.fingerprint(student)  # with the teacher's, it names the model behind every student video
    plan = []  # every pair's files; the rows follow from them alone, whatever is generated
    for j, k in jobs:
        prompt, seed = prompts[j], prompt_seed(args.seed, prompts[j], args.round, k)
        pid = f"{j:06d}" if args.samples_per_prompt == 1 else f"{j:06d}-{k}"
        teacher_entry = os.path.join(cache_dir, cache_key(teacher.fingerprint, prompt, seed, settings))
        plan.append({"id": pid, "prompt": prompt, "seed": seed, "sample": k,
                     "key": cache_key(f"{teacher.fingerprint}/{student_fp}", prompt, seed, settings),
                     "t_vid": teacher_entry + ".mp4", "t_lat": teacher_entry + ".safetensors",
                     "emb": os.path.join(out, "latents", f"{pid}_text.safetensors"),
                     "lat": os.path.join(out, "latents", f"{pid}_student.safetensors"),
                     "vid": os.path.join(out, "videos", f"{pid}_student.mp4")})
    mine = plan[rank::world]  # this rank's share of the pairs, in batches that run whole or not at all
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    todo = [b for b in batches if not all(pair_done(p) for p in b)]  # a rerun skips the finished batches
    done = len(mine) - sum(map(len, todo))
    if done and rank == 0:
        print(f"resuming: {done} of {len(mine)} pairs already done" + (" (rank 0's share)" if world > 1 else ""))
    uncond = models.encode_prompts(teacher, [""])
    made = 0
    for batch in tqdm(todo, desc="make_pairs", disable=rank != 0):
        seeds = [p["seed"] for p in batch]
        cond = models.encode_prompts(teacher, [p["prompt"] for p in batch])  # (N, L, D)
        missing = [n for n, p in enumerate(batch) if not (os.path.exists(p["t_lat"]) and os.path.exists(p["t_vid"]))]
        if missing:  # sampled as the whole batch: a smaller one would round otherwise than an uninterrupted run
            lat, vid = models.generate(teacher, teacher.unet, cond, uncond, seeds, settings)
            models.write_videos([batch[n]["t_vid"] for n in missing], vid[missing], family.fps)
            for n in missing:
                save_tensors(batch[n]["t_lat"], latents=lat[n])  # the latents last: they mark the entry complete
            made += len(missing)
        s_lat, s_vid = models.generate(teacher, student, cond, uncond, seeds, settings)
        models.write_videos([p["vid"] for p in batch], s_vid, family.fps)
        for n, p in enumerate(batch):
            save_tensors(p["emb"], text_emb=cond[n])
            save_tensors(p["lat"], {"key": p["key"]}, latents=s_lat[n])  # last, with its key: the pair is complete
    rows = [{"id": p["id"], "prompt": p["prompt"], "seed": p["seed"], "round": args.round, "sample": p["sample"],
             "winner": {"model": "teacher", "video": rel(p["t_vid"]), "latents": rel(p["t_lat"])},
             "loser": {"model": "student", "video": rel(p["vid"]), "latents": rel(p["lat"])},
             "text_emb": rel(p["emb"])} for p in plan]
    reused = len(mine) - made  # this rank's teacher videos not sampled by this run
    if world > 1:  # the teacher counts of every rank on rank 0
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, (made, reused))  # also waits until every rank's files are written
        made, reused = sum(g[0] for g in gathered), sum(g[1] for g in gathered)
    if rank == 0:
        rows.sort(key=lambda r: r["id"])
        models.write_jsonl(os.path.join(out, "pairs.jsonl"), rows)
        models.write_json(os.path.join(out, "pairs.args.json"), {
            "args": vars(args), "settings": settings, "teacher": teacher.path, "teacher_fingerprint": teacher.fingerprint,
            "student": os.path.abspath(args.student) if args.student else "", "student_removed": meta["removed"],
            "pairs": len(rows), "teacher_videos_made": made, "teacher_videos_reused": reused})
        print(f"make_pairs: {len(rows)} pairs in {os.path.join(args.out_dir, 'pairs.jsonl')} "
              f"(teacher videos: {made} made, {reused} reused from {cache_dir})")
    models.dist_cleanup()


if __name__ == "__main__":
    models.cli(main, get_parser())
