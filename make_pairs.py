"""Make pairs: one teacher video (candidate winner) and one student video (candidate loser) per prompt.

METHOD.md section 5.3. Both start from the same seed, hence the same initial noise (and the same
eta noise). Writes playable mp4s, the final latents and the text embedding as safetensors, and a
pairs JSONL (DESIGN.md) whose paths are relative to the JSONL's folder. The teacher never changes,
so its outputs are cached under --teacher-cache by (teacher fingerprint, prompt, seed, sampler
settings) and reused by later runs. Pair k of a prompt (--samples-per-prompt K) starts from a seed
derived from (--seed, --round, prompt, k): a prompt keeps its seeds whatever its position in the
file, and every round gets fresh pairs (new initial noise, new teacher videos) for the same prompt.

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


def save_tensors(path, **tensors):
    from safetensors.torch import save_file

    with models.atomic_path(path) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, tmp)


def main(args):
    from tqdm import tqdm

    family = models.get_family(args.model)
    prompts = list(dict.fromkeys(models.read_prompts(args.prompts)))  # unique, in order
    if args.samples_per_prompt < 1:
        raise models.UserError(f"--samples-per-prompt must be >= 1 (got {args.samples_per_prompt})")
    jobs = [(j, k) for j in range(len(prompts)) for k in range(args.samples_per_prompt)]  # (prompt, sample)
    rank, world, device = models.dist_setup(args.device)
    teacher = models.load_teacher(family, args.teacher, args.motion_adapter, device)
    student, meta = models.load_model(teacher, args.student)
    student.eval().requires_grad_(False)
    settings = models.sampling_settings(args, family)
    models.latent_shape(teacher, settings["frames"], settings["height"], settings["width"])  # validates the size
    cache_dir = args.teacher_cache or os.path.join(args.out_dir, "teacher_cache")
    out = os.path.abspath(args.out_dir)
    rel = lambda p: os.path.relpath(p, out)
    uncond = models.encode_prompts(teacher, [""])
    mine = jobs[rank::world]  # this rank's share of the (prompt, sample) jobs
    rows, made, reused = [], 0, 0
    for i in tqdm(range(0, len(mine), args.batch_size), desc="make_pairs", disable=rank != 0):
        idx = mine[i:i + args.batch_size]
        batch = [prompts[j] for j, _ in idx]
        seeds = [prompt_seed(args.seed, prompts[j], args.round, k) for j, k in idx]
        cond = models.encode_prompts(teacher, batch)  # (N, L, D)
        keys = [cache_key(teacher.fingerprint, p, s, settings) for p, s in zip(batch, seeds)]
        t_lat = [os.path.join(cache_dir, f"{k}.safetensors") for k in keys]
        t_vid = [os.path.join(cache_dir, f"{k}.mp4") for k in keys]
        todo = [n for n in range(len(batch)) if not (os.path.exists(t_lat[n]) and os.path.exists(t_vid[n]))]
        if todo:  # the teacher only samples what the cache lacks
            lat, vid = models.generate(teacher, teacher.unet, cond[todo], uncond, [seeds[n] for n in todo], settings)
            for n, lat_n, vid_n in zip(todo, lat, vid):
                models.write_video(t_vid[n], vid_n, family.fps)
                save_tensors(t_lat[n], latents=lat_n)  # the latents last: they mark the entry complete
            made += len(todo)
        reused += len(batch) - len(todo)
        s_lat, s_vid = models.generate(teacher, student, cond, uncond, seeds, settings)
        for n, (j, k) in enumerate(idx):
            pid = f"{j:06d}" if args.samples_per_prompt == 1 else f"{j:06d}-{k}"
            emb_path = os.path.join(out, "latents", f"{pid}_text.safetensors")
            lat_path = os.path.join(out, "latents", f"{pid}_student.safetensors")
            vid_path = os.path.join(out, "videos", f"{pid}_student.mp4")
            save_tensors(emb_path, text_emb=cond[n])
            save_tensors(lat_path, latents=s_lat[n])
            models.write_video(vid_path, s_vid[n], family.fps)
            rows.append({"id": pid, "prompt": batch[n], "seed": seeds[n], "round": args.round, "sample": k,
                         "winner": {"model": "teacher", "video": rel(t_vid[n]), "latents": rel(t_lat[n])},
                         "loser": {"model": "student", "video": rel(vid_path), "latents": rel(lat_path)},
                         "text_emb": rel(emb_path)})
    if world > 1:  # merge every rank's rows on rank 0
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, (rows, made, reused))
        rows = [r for g in gathered for r in g[0]]
        made, reused = sum(g[1] for g in gathered), sum(g[2] for g in gathered)
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
