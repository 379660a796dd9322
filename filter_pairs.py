"""Filter pairs: this stage's targets, prompt curation, and the pair filter (METHOD.md section 5).

Targets (5.1): the reward dimensions where the student is worse than the teacher: from an evaluate.py
report (--report), by hand (--targets), or (filter only) from the pairs themselves (dimensions where
the losers' mean is below the winners'). Worse nowhere = all four are targets. Two jobs (--job):
  curate (5.2)  prompt pool -> FILE.txt (one prompt a line) + FILE.json (arguments, targets, each
                prompt's decision and reason): prompts of --min-words to --max-words words relevant to
                the targets, judged by documented keyword lists (default, no model) or by a local
                causal LM answering yes/no (--curator PATH).
  filter (5.4)  pairs JSONL (make_pairs.py) -> OUT.jsonl (the input rows that pass S(v_w) > S(v_l) >
                tau_p, plus "scores", "S", "targets"; paths relative to OUT's folder) + OUT.json
                (summary). S = mean reward over the targets (--score targets) or all four (avg).
                Scores are cached by (scorer fingerprint, video content hash, prompt): a rerun scores
                nothing. Inputs are never overwritten.

Tiny CPU:  python filter_pairs.py --job curate --prompts pool.txt --targets dynamic_degree --out runs/prompts.txt
           python filter_pairs.py --job filter --pairs runs/pairs/pairs.jsonl --out runs/filtered.jsonl
One GPU:   python filter_pairs.py --job curate --prompts pool.jsonl --report runs/r1/eval.json \
               --curator ckpt/qwen2.5-7b-instruct --out runs/r1/prompts.txt
           python filter_pairs.py --job filter --pairs runs/r1/pairs/pairs.jsonl --report runs/r1/eval.json \
               --scorer clip --scorer-path ViT-H-14:ckpt/clip.safetensors --out runs/r1/filtered.jsonl
Many GPUs: torchrun --nproc_per_node 8 filter_pairs.py --job filter ...  (videos to score split by rank)
"""
import argparse
import hashlib
import json
import os
import re
import sys

import torch

import models
import rewards

DIMS = models.DIMS
PATH_FIELDS = (("winner", "video"), ("winner", "latents"), ("loser", "video"), ("loser", "latents"), ("text_emb",))

# The keyword curator (--curator keywords). A prompt is relevant to a dimension when it names one of
# the dimension's words (plurals count: 'squares' matches 'square'); to text_alignment when it names
# at least TA_MIN_ATTRIBUTES attribute words (colors, shapes, directions, numbers, spatial relations).
COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "grey", "brown",
          "golden", "gold", "silver", "cyan", "magenta", "violet", "turquoise", "beige")
SHAPES = ("square", "circle", "triangle", "rectangle", "cube", "sphere", "ball", "box", "cone", "cylinder", "star",
          "heart", "ring", "line", "dot", "diamond", "hexagon", "pyramid")
DIRECTIONS = ("left", "right", "up", "down", "upward", "upwards", "downward", "downwards", "forward", "forwards",
              "backward", "backwards", "clockwise", "counterclockwise", "north", "south", "east", "west")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "single", "pair", "couple",
           "several", "many", "few", "dozen", "both")
SPATIAL = ("above", "below", "behind", "under", "over", "between", "beside", "inside", "outside", "near", "top",
           "bottom", "center", "middle", "corner", "next to", "in front of", "on top of", "far from")
KEYWORDS = {
    "dynamic_degree": (  # motion and speed
        "moving", "moves", "move", "running", "runs", "quickly", "slowly", "fast", "slow", "rapidly", "speed", "flying",
        "flies", "jumping", "jumps", "falling", "falls", "rolling", "spinning", "rotating", "racing", "dancing",
        "swimming", "walking", "driving", "bouncing", "waving", "shaking", "rushing", "sprinting", "accelerating",
        "zooming", "galloping", "chasing", "crashing", "exploding", "pouring", "flowing"),
    "temporal_consistency": (  # continuous action, persistence of the same object
        "moving", "walking", "rolling", "rotating", "turning", "gliding", "drifting", "floating", "flowing", "sliding",
        "orbiting", "circling", "continues", "continuously", "continuous", "steadily", "steady", "smoothly",
        "gradually", "constant", "constantly", "throughout", "across", "along", "through", "while", "keeps", "same",
        "stays", "remains", "follows", "following", "time lapse", "timelapse", "tracking"),
    "visual_quality": COLORS + (  # appearance
        "detailed", "details", "sharp", "colorful", "colourful", "vivid", "high quality", "hd", "4k", "8k", "realistic",
        "photorealistic", "cinematic", "beautiful", "bright", "clear", "crisp", "lighting", "texture", "textured",
        "glossy", "shiny", "saturated", "dark", "light", "sunlit", "glowing", "soft"),
}
ATTRIBUTES = COLORS + SHAPES + DIRECTIONS + NUMBERS + SPATIAL
TA_MIN_ATTRIBUTES = 2
# The LLM curator's question names each target like this.
DIM_QUESTIONS = {
    "visual_quality": "visual quality (appearance, detail, colors)",
    "temporal_consistency": "temporal consistency (the same objects acting continuously over time)",
    "dynamic_degree": "motion (how much and how fast things move)",
    "text_alignment": "text alignment (several attributes such as colors, shapes, counts, directions)",
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", required=True, choices=["curate", "filter"], help="curate prompts or filter pairs")
    p.add_argument("--out", required=True, help="curate: FILE.txt; filter: OUT.jsonl (summary: its stem + .json)")
    p.add_argument("--targets", default="", help="target dimensions: a comma list of models.DIMS, or 'all'")
    p.add_argument("--report", default="", help="evaluate.py report: targets = dimensions where the student is worse")
    p.add_argument("--student-label", default="", help="the report's student (default: its last non-teacher model)")
    p.add_argument("--margin", type=float, default=0.0, help="a dimension is a target if teacher - student > margin")
    # curate
    p.add_argument("--prompts", default="", help="curate: the prompt pool (.txt one a line, or .jsonl with 'prompt')")
    p.add_argument("--min-words", type=int, default=5, help="curate: shortest prompt kept, in words")
    p.add_argument("--max-words", type=int, default=25, help="curate: longest prompt kept, in words")
    p.add_argument("--curator", default="keywords", help="curate: 'keywords', or a local transformers causal LM folder")
    p.add_argument("--max-prompts", type=int, default=0,
                   help="curate: keep N relevant prompts, most targets matched first, balanced over keywords (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="curate: breaks ties in the selection (the pool's order never does)")
    p.add_argument("--min-keep", type=int, default=1, help="curate: fail if fewer prompts are kept")
    # filter
    p.add_argument("--pairs", default="", help="filter: the pairs JSONL (make_pairs.py)")
    p.add_argument("--scorer", default="toy", choices=list(rewards.SCORERS), help="filter: reward model (rewards.py)")
    p.add_argument("--scorer-path", default="", help="filter: scorer weights (clip: ARCH:FILE or an open_clip folder)")
    p.add_argument("--score-cache", default="", help="filter: score cache JSONL (default: OUT_DIR/score_cache.jsonl)")
    p.add_argument("--score", default="targets", choices=["targets", "avg"],
                   help="filter: S = the mean over the targets or over all four dimensions")
    p.add_argument("--tau", type=float, default=0.0, help="filter: the floor tau_p in S(w) > S(l) > tau_p")
    p.add_argument("--guard", type=float, default=None, metavar="M",
                   help="filter: also drop a pair whose winner scores more than M below its loser on any of the "
                        "four dimensions, targets or not (default: off; on the toy it did not help: toy/RESULTS.md)")
    p.add_argument("--keep-all", action="store_true",
                   help="filter, ablation: score and annotate every pair but drop none (reasons still counted)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per scorer call / prompts per LLM forward")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    return p


# ----------------------------------------------------------------------------- the rules
def targets_from_scores(teacher_means, student_means, margin=0.0):
    """Section 5.1: the dimensions (DIMS order) where the student's mean is below the teacher's by > margin."""
    return [d for d in DIMS if teacher_means[d] - student_means[d] > margin]


REASONS = ("kept", "winner_not_better", "loser_below_tau", "winner_worse_on_a_dim")


def keep_pair(s_win, s_lose, tau, scores=None, guard=None):
    """Section 5.4: keep iff S(v_w) > S(v_l) > tau_p. Returns (kept, reason); the winner is checked first.
    **Choice** (--guard M, off by default): also drop the pair when the winner is more than M below the loser
    on any one dimension, `scores` = {"winner": {dim: r}, "loser": {...}}. S averages the targets only, so
    without it a winner that moves less (say) than its loser still teaches the student to move less."""
    if not s_win > s_lose:
        return False, "winner_not_better"
    if not s_lose > tau:
        return False, "loser_below_tau"
    if guard is not None and any(scores["winner"][d] < scores["loser"][d] - guard for d in DIMS):
        return False, "winner_worse_on_a_dim"
    return True, "kept"


def length_reason(prompt, min_words, max_words):
    """Section 5.2's length rule: 'too_short' / 'too_long' / None (words = whitespace-separated)."""
    n = len(prompt.split())
    return "too_short" if n < min_words else "too_long" if n > max_words else None


def keyword_matches(prompt):
    """{dimension: [the prompt's words that make it relevant]} for the dimensions it is relevant to."""
    tokens = re.findall(r"[a-z0-9]+", prompt.lower())
    text = f" {' '.join(tokens)} "
    words = set(tokens) | {t[:-1] for t in tokens if t.endswith("s")}

    def found(vocab):
        return [w for w in vocab if (f" {w} " in text if " " in w else w in words)]

    out = {d: found(vocab) for d, vocab in KEYWORDS.items()}
    attrs = found(ATTRIBUTES) + sorted({t for t in tokens if t.isdigit()})
    out["text_alignment"] = attrs if len(attrs) >= TA_MIN_ATTRIBUTES else []
    return {d: out[d] for d in DIMS if out[d]}


def select_prompts(rows, max_prompts, seed=0):
    """Section 5.2's selection, independent of the pool's order: the prompts relevant to the most
    targets first; within a tier, greedily the prompt whose keywords are least covered by the prompts
    chosen so far (a stratified sample over colors, shapes, directions, speeds, ...), ties broken by a
    seeded hash. `rows` hold 'prompt', 'relevance' and 'matched'; returns the chosen rows in order."""
    key = lambda r: hashlib.sha256(f"{seed}:{r['prompt']}".encode()).hexdigest()
    if not max_prompts or max_prompts >= len(rows):
        return sorted(rows, key=lambda r: (-r["relevance"], key(r)))
    words = {id(r): sorted({w for ws in r["matched"].values() for w in ws}) for r in rows}
    left, chosen, counts = sorted(rows, key=key), [], {}
    while left and len(chosen) < max_prompts:
        best = min(left, key=lambda r: (-r["relevance"], sum(counts.get(w, 0) for w in words[id(r)]), key(r)))
        left.remove(best)
        chosen.append(best)
        for w in words[id(best)]:
            counts[w] = counts.get(w, 0) + 1
    return chosen


def llm_question(prompt, targets):
    names = "; ".join(DIM_QUESTIONS[d] for d in targets)
    return f'Would the video prompt "{prompt}" be a good test of a video generator\'s {names}? Answer yes or no.'


# ----------------------------------------------------------------------------- helpers
def parse_targets(text):
    if text.strip().lower() == "all":
        return list(DIMS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in DIMS]
    if bad or not names:
        raise models.UserError(f"--targets: unknown {bad or [text]} (choose from {', '.join(DIMS)}, or all)")
    return [d for d in DIMS if d in names]


def report_means(path, student_label=""):
    """(teacher means, student means, student label) of an evaluate.py report: its first model labelled
    'teacher' and its last other model (or the one labelled `student_label`)."""
    report = models.read_json(path)
    entries = report.get("models") if isinstance(report, dict) else None
    if not isinstance(entries, list) or not all(isinstance(m, dict) and "label" in m for m in entries):
        raise models.UserError(f"{path}: expected 'models': a list of {{'label', 'scores'}} objects")
    teacher = next((m for m in entries if m["label"] == "teacher"), None)
    others = [m for m in entries if m["label"] != "teacher" and student_label in ("", m["label"])]
    if teacher is None or not others:
        raise models.UserError(f"{path}: needs a model labelled 'teacher' and a student"
                               f"{f' labelled {student_label!r}' if student_label else ''} "
                               f"(labels: {[m['label'] for m in entries]})")
    try:
        means = [{d: float(m["scores"][d]["mean"]) for d in DIMS} for m in (teacher, others[-1])]
    except (KeyError, TypeError, ValueError):
        raise models.UserError(f"{path}: models 'teacher' and '{others[-1]['label']}' need a numeric "
                               f"scores.DIM.mean for each of {', '.join(DIMS)}")
    return means[0], means[1], others[-1]["label"]


def given_targets(args):
    """(targets, where they came from) from --targets or --report, or (None, '') when neither is given."""
    if args.targets and args.report:
        raise models.UserError("give at most one of --targets and --report")
    if args.targets:
        return parse_targets(args.targets), "--targets"
    if args.report:
        teacher, student, label = report_means(args.report, args.student_label)
        return or_all(targets_from_scores(teacher, student, args.margin), f"{args.report}, student '{label}'")
    return None, ""


def or_all(targets, source):
    if not targets:
        if os.environ.get("RANK", "0") == "0":
            print(f"filter_pairs: the student is not worse than the teacher on any dimension ({source}); "
                  f"targeting all four")
        return list(DIMS), source + ", none worse: all"
    return targets, source


def check_out(args, inputs):
    """The summary path; refuses outputs that would overwrite one of `inputs` or each other."""
    summary = os.path.splitext(args.out)[0] + ".json"
    if os.path.realpath(summary) == os.path.realpath(args.out):
        raise models.UserError(f"--out {args.out}: must not end in .json (the summary goes to {summary})")
    for path in inputs:
        for mine in (args.out, summary):
            if path and os.path.realpath(mine) == os.path.realpath(path):
                raise models.UserError(f"--out {args.out} would overwrite {path}: choose another output")
    return summary


class LLMCurator:
    """A local causal LM that answers the yes/no question of `llm_question` for each prompt.

    The answer is the next token after the question: the log-sum-exp of the logits of the first tokens
    of ' yes', 'yes', ' Yes', 'Yes' against the same for 'no'. A tokenizer with a chat template gets
    the question as a user message (the template's generation prompt appended)."""

    def __init__(self, path, device):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isdir(path):
            raise models.UserError(f"--curator {path}: not 'keywords' and not a model folder")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise models.UserError(f"--curator {path}: no causal LM here ({type(e).__name__}: {e})".splitlines()[0])
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model.to(device, dtype).eval()
        self.device = device
        first = lambda words: {self.tokenizer(w, add_special_tokens=False).input_ids[0] for w in words}
        yes, no = first([" yes", "yes", " Yes", "Yes"]), first([" no", "no", " No", "No"])
        self.yes, self.no = sorted(yes - no), sorted(no - yes)
        if not self.yes or not self.no:
            raise models.UserError(f"--curator {path}: 'yes' and 'no' start with the same token")

    def ids(self, question):
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False).input_ids
        ids = tok(question + "\nAnswer:").input_ids
        return ids[:-1] if len(ids) > 1 and ids[-1] == tok.eos_token_id else ids  # no end token before the answer

    @torch.no_grad()
    def __call__(self, prompts, targets):
        """Per prompt (yes, no): log-sum-exp logits of the answer tokens."""
        seqs = [self.ids(llm_question(p, targets)) for p in prompts]
        n = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs], device=self.device)  # (B, n) right-padded
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs], device=self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()  # (B, n, V)
        last = logits[torch.arange(len(seqs)), mask.sum(1) - 1]  # (B, V): the next token after each question
        yes = last[:, self.yes].logsumexp(-1)
        no = last[:, self.no].logsumexp(-1)
        return list(zip(yes.tolist(), no.tolist()))


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(fingerprint, sha256, prompt):
    """A video's score depends on the scorer, the video's content and (text alignment) its prompt."""
    return hashlib.sha256(json.dumps([fingerprint, sha256, prompt]).encode()).hexdigest()[:24]


def read_cache(path):
    """{key: scores} of a score cache; lines a crash cut short, or that lack a dimension, are skipped."""
    cache = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:  # a garbled line is skipped like a cut one
            for line in f:
                try:
                    row = json.loads(line)
                    cache[row["key"]] = {d: float(row["scores"][d]) for d in DIMS}
                except (ValueError, KeyError, TypeError):
                    continue
    return cache


def append_cache(path, entries):
    """Append finished scores in one unbuffered write (O_APPEND: ranks appending at once do not interleave)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = "".join(json.dumps(e) + "\n" for e in entries)
    with open(path, "a+b", buffering=0) as f:
        if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
            text = "\n" + text  # a crash cut the last line short: start a new one
        f.write(text.encode())


def relocate(row, src_dir, dst_dir):
    """The row with every relative path field rewritten from src_dir to dst_dir."""
    row = json.loads(json.dumps(row))
    for keys in PATH_FIELDS:
        node = row
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str) and not os.path.isabs(node[keys[-1]]):
            node[keys[-1]] = os.path.relpath(os.path.join(src_dir, node[keys[-1]]), dst_dir)
    return row


# ----------------------------------------------------------------------------- jobs
def curate(args):
    if not args.prompts:
        raise models.UserError("--job curate needs --prompts (the prompt pool)")
    if not 0 < args.min_words <= args.max_words:
        raise models.UserError(f"need 0 < --min-words <= --max-words (got {args.min_words}, {args.max_words})")
    summary_path = check_out(args, [args.prompts])
    targets, source = given_targets(args)
    if targets is None:
        raise models.UserError("--job curate needs --targets or --report")
    pool = [" ".join(p.split()) for p in models.read_prompts(args.prompts)]  # one line each
    rows, seen = [], set()
    for p in pool:
        reason = length_reason(p, args.min_words, args.max_words)
        if reason is None and p.lower() in seen:
            reason = "duplicate"
        seen.add(p.lower())
        rows.append({"prompt": p, "words": len(p.split()), "kept": False, "reason": reason})
    judge = None if args.curator == "keywords" else LLMCurator(args.curator, models.resolve_device(args.device))
    todo = [r for r in rows if r["reason"] is None]
    for i in range(0, len(todo), args.batch_size):  # every candidate is judged: the pool's order must not matter
        batch = todo[i:i + args.batch_size]
        for r in batch:
            r["matched"] = keyword_matches(r["prompt"])
            r["relevance"] = sum(d in r["matched"] for d in targets)  # how many targets the prompt tests
        if judge is not None:
            answers = judge([r["prompt"] for r in batch], targets)
            for r, (yes, no) in zip(batch, answers):
                r["llm"] = {"yes": yes, "no": no}
                r["relevance"] = int(yes > no)
    relevant = [r for r in todo if r["relevance"] > 0]
    for r in todo:
        r["reason"] = "not_relevant" if r["relevance"] == 0 else None
    chosen = select_prompts(relevant, args.max_prompts, args.seed)
    for rank, r in enumerate(chosen):
        r["kept"], r["reason"], r["rank"] = True, "kept", rank
    kept = len(chosen)
    for r in rows:
        r["reason"] = r["reason"] or "over_max_prompts"
    counts = {k: sum(r["reason"] == k for r in rows)
              for k in ("kept", "too_short", "too_long", "duplicate", "not_relevant", "over_max_prompts")}
    if kept < args.min_keep:
        raise models.UserError(f"{args.prompts}: only {kept} of {len(rows)} prompts kept for targets {targets} "
                               f"(need --min-keep {args.min_keep}; {counts})")
    with models.atomic_path(args.out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(r["prompt"] + "\n" for r in chosen))
    models.write_json(summary_path, {"args": vars(args), "targets": targets, "targets_from": source,
                                     "curator": args.curator, "counts": {"in": len(rows), **counts}, "prompts": rows})
    print(f"filter_pairs curate: kept {kept}/{len(rows)} prompts for {', '.join(targets)} "
          f"({', '.join(f'{k} {v}' for k, v in counts.items() if k != 'kept')}); wrote {args.out}")


def score_videos(args, rows, rank, world, device):
    """Per row {'winner': scores, 'loser': scores}, scoring only what the cache lacks; and the counts."""
    from tqdm import tqdm

    base = os.path.dirname(os.path.abspath(args.pairs))
    scorer = rewards.get_scorer(args.scorer, args.scorer_path, device)
    cache_path = args.score_cache or os.path.join(os.path.dirname(args.out), "score_cache.jsonl")
    keys, where = [], {}  # keys[n][side]; where[key] = (row number, video path, prompt)
    for n, row in enumerate(rows, 1):
        keys.append({})
        for side in ("winner", "loser"):
            rel = row[side]["video"]
            if not isinstance(rel, str):
                raise models.UserError(f"{args.pairs}:{n}: '{side}.video' must be a path")
            path = os.path.join(base, rel)
            if not os.path.isfile(path):
                raise models.UserError(f"{args.pairs}:{n}: missing video {rel}")
            keys[-1][side] = k = cache_key(scorer.fingerprint, file_sha256(path), row["prompt"])
            where.setdefault(k, (n, path, row["prompt"]))
    cache = read_cache(cache_path)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank has read the cache before any rank appends: the same todo list everywhere
    todo = [k for k in where if k not in cache]
    mine = todo[rank::world]  # this rank's share
    new = {}
    for i in tqdm(range(0, len(mine), args.batch_size), desc="score", disable=rank != 0 or not mine):
        batch = mine[i:i + args.batch_size]
        videos = models.read_videos([where[k][1] for k in batch])  # a broken file fails naming itself
        try:
            scores = scorer.score(videos, [where[k][2] for k in batch])
        except ValueError as e:
            raise models.UserError(f"{args.pairs}: the {args.scorer} scorer refuses rows "
                                   f"{sorted({where[k][0] for k in batch})}: {e}")
        new.update(zip(batch, scores))
        append_cache(cache_path, [{"key": k, "scorer": scorer.fingerprint, "prompt": where[k][2],
                                   "video": os.path.relpath(where[k][1], os.path.dirname(os.path.abspath(cache_path))),
                                   "scores": s} for k, s in zip(batch, scores)])
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, new)
        new = {k: v for g in gathered for k, v in g.items()}
    cache.update(new)
    per_row = [{side: cache[k[side]] for side in ("winner", "loser")} for k in keys]
    counts = {"unique": len(where), "scored": len(todo), "cached": len(where) - len(todo)}
    return per_row, counts, scorer.fingerprint, cache_path


def filter_job(args):
    if not args.pairs:
        raise models.UserError("--job filter needs --pairs (a make_pairs.py JSONL)")
    summary_path = check_out(args, [args.pairs, args.score_cache])
    if args.score_cache and os.path.realpath(args.score_cache) == os.path.realpath(args.pairs):
        raise models.UserError(f"--score-cache {args.score_cache} would overwrite the input pairs")
    rows = models.read_jsonl(args.pairs, required=("id", "prompt", "winner.video", "loser.video"))
    if not rows:
        raise models.UserError(f"{args.pairs}: no pairs in file")
    targets, source = given_targets(args)  # a bad --report fails before any scoring
    rank, world, device = models.dist_setup(args.device)
    scores, counts, fingerprint, cache_path = score_videos(args, rows, rank, world, device)
    if rank != 0:
        return models.dist_cleanup()
    mean = lambda side, d: sum(s[side][d] for s in scores) / max(len(scores), 1)
    if targets is None:  # the pairs' own verdict: dims where the losers score lower than the winners
        targets, source = or_all(targets_from_scores({d: mean("winner", d) for d in DIMS},
                                                     {d: mean("loser", d) for d in DIMS}), f"the pairs {args.pairs}")
    dims = targets if args.score == "targets" else list(DIMS)
    src, dst = os.path.dirname(os.path.abspath(args.pairs)), os.path.dirname(os.path.abspath(args.out))
    out, decisions = [], []
    for row, s in zip(rows, scores):
        S = {side: rewards.mean_score(s[side], dims) for side in ("winner", "loser")}  # S(v) over `dims`
        kept, reason = keep_pair(S["winner"], S["loser"], args.tau, s, args.guard)  # S(v_w) > S(v_l) > tau_p
        decisions.append({"id": row["id"], "reason": reason, "S": S})
        if kept or args.keep_all:
            out.append({**relocate(row, src, dst), "scores": s, "S": S, "targets": targets})
    reasons = {r: sum(x["reason"] == r for x in decisions) for r in REASONS}
    models.write_jsonl(args.out, out)
    kept_rows = [s for s, x in zip(scores, decisions) if x["reason"] == "kept"]
    models.write_json(summary_path, {
        "args": vars(args), "scorer": {"name": args.scorer, "fingerprint": fingerprint}, "score_cache": cache_path,
        "targets": targets, "targets_from": source, "score": args.score, "score_dims": dims, "tau": args.tau,
        "guard": args.guard,
        "counts": {"in": len(rows), **reasons}, "videos": counts,
        "means": {group: {side: rewards.aggregate([s[side] for s in part]) for side in ("winner", "loser")}
                  for group, part in (("all", scores), ("kept", kept_rows))},
        "pairs": decisions})
    print(f"filter_pairs filter: kept {reasons['kept']}/{len(rows)} pairs (winner_not_better "
          f"{reasons['winner_not_better']}, loser_below_tau {reasons['loser_below_tau']}, "
          f"winner_worse_on_a_dim {reasons['winner_worse_on_a_dim']}); "
          f"targets {', '.join(targets)}; "
          f"S = mean over {'the targets' if args.score == 'targets' else 'all four'}, tau {args.tau}, "
          f"guard {'off' if args.guard is None else args.guard}; "
          f"videos scored {counts['scored']}, cached {counts['cached']}; "
          f"{f'--keep-all: wrote all {len(out)} to ' if args.keep_all else 'wrote '}{args.out}")
    if not out:
        print(f"warning: no pair kept; {args.out} is empty (redpo.py will refuse it)", file=sys.stderr)
    models.dist_cleanup()


def main(args):
    if args.batch_size < 1:
        raise models.UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.guard is not None and not args.guard >= 0:
        raise models.UserError(f"--guard must be >= 0 (got {args.guard})")
    return curate(args) if args.job == "curate" else filter_job(args)


if __name__ == "__main__":
    models.cli(main, get_parser())
