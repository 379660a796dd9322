"""Write the real families' prompt files: prompts/pool.txt, prompts/probe.txt, prompts/eval.txt.

Deterministic (a seeded `random.Random`), no network, no model. Every prompt is one *scene*, a subject,
an action and a place from the same category (animals, people, cars, boats, sea life, things in the sky,
nature, objects), optionally followed by a camera motion and a style:

    "a red fox sniffing the ground in a snowy forest, the camera slowly pans left, cinematic lighting"

Each scene goes to exactly one file, so no prompt (and no near-copy that differs only in camera or
style) is in two files. Scenes are drawn round-robin over the categories, so every file mixes them.
Prompts have 5-25 words (METHOD.md 5.2's rule) and are unique within and across files.

    python tools/make_prompts.py                     # the shipped files (seed 0: 2000 / 32 / 64)
    python tools/make_prompts.py --out-dir /tmp/p --seed 1 --pool 500
"""
import argparse
import os
import random

# (subjects, actions, places): any subject with any action in any place of its category.
CATEGORIES = {
    "animals": (
        ["a golden retriever", "a black cat", "two white kittens", "a red fox", "a brown horse", "a herd of elephants",
         "a giant panda", "a polar bear", "a small gray rabbit", "a young deer", "a group of penguins", "a tiger",
         "a squirrel", "a pair of gray wolves", "a baby goat", "a raccoon"],
        ["running quickly", "walking slowly", "jumping over a fallen log", "sniffing the ground",
         "looking around curiously", "chasing a butterfly", "playing with a red ball", "sleeping peacefully",
         "trotting forward", "leaping into the air", "shaking off water", "digging in the ground"],
        ["in a snowy forest", "on a sunny meadow", "at the edge of a misty lake", "in a desert at sunset",
         "on a sandy beach", "in a city park in autumn", "on a rocky mountain slope", "in a backyard garden",
         "in tall golden grass", "on a quiet country road"]),
    "people": (
        ["a young woman", "an old man", "a little girl", "two children", "a chef in a white hat", "a ballet dancer",
         "a skateboarder", "a street musician", "a group of friends", "a firefighter", "an astronaut", "a jogger",
         "a painter", "a boy in a red jacket", "a woman in a yellow raincoat", "a couple holding hands"],
        ["walking toward the camera", "dancing", "laughing and talking", "running", "waving hello",
         "jumping up and down", "spinning around", "riding a bicycle", "playing the guitar", "reading a book",
         "throwing a frisbee", "carrying a blue umbrella"],
        ["on a busy city street", "in a neon-lit alley at night", "in a sunlit kitchen", "on a rainy sidewalk",
         "in a quiet library", "on a rooftop at sunset", "in a crowded market", "in a snowy village square",
         "in an empty parking lot", "on a wooden pier"]),
    "cars": (
        ["a red sports car", "a yellow school bus", "a blue pickup truck", "a black motorcycle", "a police car",
         "a white delivery van", "a vintage convertible", "an old green tractor"],
        ["driving fast", "speeding around a sharp corner", "slowly pulling away", "splashing through puddles",
         "racing past the camera", "drifting sideways", "accelerating forward", "turning left"],
        ["on a coastal highway", "through a desert canyon", "on a wet city street at night", "along a mountain road",
         "on a snowy forest road", "on a dusty country lane", "across a long bridge", "through a brightly lit tunnel"]),
    "boats": (
        ["a white sailboat", "a small fishing boat", "a speedboat", "a kayaker", "a large cargo ship",
         "two people in a canoe", "a paddle boarder", "a wooden rowboat"],
        ["sailing", "gliding across the water", "bobbing on the waves", "racing", "turning in a wide circle",
         "drifting slowly"],
        ["on a calm lake at dawn", "across a stormy sea", "on a turquoise bay", "along a misty river",
         "near a lighthouse", "under a bright full moon"]),
    "sea life": (
        ["a pair of dolphins", "a sea turtle", "a school of colorful fish", "a humpback whale", "a pink jellyfish",
         "an octopus", "a manta ray", "a gray seal"],
        ["swimming slowly", "gliding through the water", "swimming in circles", "diving down",
         "rising toward the surface", "darting left and right"],
        ["over a coral reef", "in deep blue water", "through a kelp forest", "near a sunken ship",
         "in clear shallow water", "under sunlit waves"]),
    "sky": (
        ["a white airplane", "a hot air balloon", "a flock of birds", "a bald eagle", "a red helicopter",
         "a colorful kite", "a swarm of butterflies", "a paper airplane", "a small drone"],
        ["flying", "soaring slowly", "circling", "gliding", "rising upward", "diving downward", "drifting"],
        ["over snowy mountains", "above a city skyline", "across a cloudy sky", "over the ocean at sunrise",
         "above green hills", "over a wheat field", "through a light rain"]),
    "nature": (
        [""],  # the subject is part of each action
        ["ocean waves crashing against rocks", "a waterfall pouring into a pool", "storm clouds rolling",
         "a campfire flickering", "autumn leaves falling", "snowflakes falling softly",
         "sunflowers swaying in the wind", "cherry blossom petals drifting", "a volcano erupting",
         "the northern lights dancing", "thick fog drifting", "lightning striking a lone tree", "a wide river flowing",
         "tall grass swaying", "heavy rain falling", "a candle flame flickering"],
        ["at sunset", "at night", "at dawn", "under a cloudy sky", "in the mountains", "in a quiet valley"]),
    "objects": (
        [""],
        ["a red ball bouncing", "a wooden top spinning", "milk pouring into a glass",
         "coffee swirling in a white cup", "colorful ink spreading in water", "a paper boat floating",
         "a row of dominoes falling one after another", "soap bubbles floating", "a metal pendulum swinging",
         "popcorn popping", "ice cubes melting", "the hands of a clock turning quickly"],
        ["in a sunlit room", "on a dark background", "in a cozy kitchen", "in a studio with soft light",
         "next to a window"]),
}
CAMERAS = ["the camera pans left", "the camera pans right", "the camera slowly zooms in", "the camera zooms out",
           "tracking shot", "aerial drone shot", "the camera orbits around", "handheld close-up", "static wide shot",
           "low-angle shot", "the camera tilts up", "the camera follows from behind", "slow dolly forward"]
STYLES = ["cinematic lighting", "4k, highly detailed", "photorealistic", "watercolor painting style", "35mm film",
          "slow motion", "golden hour light", "vivid colors", "soft focus", "anime style", "time lapse",
          "shot on a vintage camera", "dramatic shadows", "bright and colorful", "black and white film"]
MIN_WORDS, MAX_WORDS = 5, 25
FILES = ("eval", "probe", "pool")  # the order in which files take scenes


def scenes(rng):
    """Every (subject, action, place) of every category, shuffled within a category, then drawn
    round-robin over the categories (a category that runs out drops out)."""
    queues = []
    for subjects, actions, places in CATEGORIES.values():
        q = [(s, a, p) for s in subjects for a in actions for p in places]
        rng.shuffle(q)
        queues.append(q)
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop())
    return out


def dress(scene, rng):
    """A scene with an optional camera motion and style, within MAX_WORDS."""
    subject, action, place = scene
    parts = [" ".join(w for w in (subject, action, place) if w)]
    if rng.random() < 0.6:
        parts.append(rng.choice(CAMERAS))
    if rng.random() < 0.6:
        parts.append(rng.choice(STYLES))
    while len(", ".join(parts).split()) > MAX_WORDS:
        parts.pop()
    if len(", ".join(parts).split()) < MIN_WORDS:
        parts.append(rng.choice(CAMERAS))
    return ", ".join(parts)


def make(sizes, seed=0):
    """{file: prompts} for sizes {'eval': n, 'probe': n, 'pool': n}; each scene in one file only."""
    rng = random.Random(seed)
    pool = scenes(rng)
    need = sum(sizes.values())
    if need > len(pool):
        raise SystemExit(f"error: {need} prompts asked for, only {len(pool)} distinct scenes")
    out, i = {}, 0
    for name in FILES:
        out[name] = [dress(s, rng) for s in pool[i:i + sizes[name]]]
        i += sizes[name]
    every = [p.lower() for ps in out.values() for p in ps]
    assert len(set(every)) == len(every), "duplicate prompt"
    assert all(MIN_WORDS <= len(p.split()) <= MAX_WORDS for p in every), "prompt length"
    return out


def main(args):
    sizes = {"eval": args.eval, "probe": args.probe, "pool": args.pool}
    files = make(sizes, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    for name in FILES:
        path = os.path.join(args.out_dir, f"{name}.txt")
        head = (f"# {len(files[name])} {name} prompts made by tools/make_prompts.py --seed {args.seed} "
                f"--pool {args.pool} --probe {args.probe} --eval {args.eval}; no prompt is in two files\n")
        with open(path + ".tmp", "w") as f:
            f.write(head + "".join(p + "\n" for p in files[name]))
        os.replace(path + ".tmp", path)
        print(f"wrote {path}: {len(files[name])} prompts")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--out-dir", default=os.path.join(root, "prompts"), help="folder for pool/probe/eval.txt")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffles and of camera/style choices")
    p.add_argument("--pool", type=int, default=2000, help="prompts to curate training pairs from")
    p.add_argument("--probe", type=int, default=32, help="prompts for pruning importance and targets")
    p.add_argument("--eval", type=int, default=64, help="held-out prompts for evaluation")
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
