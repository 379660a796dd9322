import os
import signal
import subprocess
import sys
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread, and OpenMP's spinning threads slow down ~50x when the cores are
# shared (measured: 0.07 s vs 5 s per tiny UNet forward on a loaded 2-core machine). Stage processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import tiny  # noqa: E402

torch.set_num_threads(1)

# Tiny videos for every stage that samples: 4 frames of 16x16 pixels, 3 DDIM steps.
TINY_SAMPLING = ["--steps", "3", "--frames", "4", "--height", "16", "--width", "16"]
PROMPTS = ["a red square moving left quickly", "a blue circle moving up slowly",
           "a green triangle moving right quickly", "a yellow square moving down slowly"]


def run(script, *args, check=True):
    """Run a project script as a real process; returns the CompletedProcess (stdout + stderr text)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_and_kill(script, *args, when, timeout=600):
    """Start a project script as a real process and SIGKILL it as soon as `when()` is true (polled every
    10 ms); fails if the script exits before, so a test built on it cannot pass without a kill."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    t0 = time.monotonic()
    try:
        while not when():
            assert proc.poll() is None, f"{script} exited {proc.returncode} before the kill point"
            assert time.monotonic() - t0 < timeout, f"{script}: no kill point after {timeout} s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
    assert code == -signal.SIGKILL, f"{script} finished (exit {code}) before it could be killed"


@pytest.fixture(scope="session")
def vc2_dir(tmp_path_factory):
    return tiny.make_vc2(str(tmp_path_factory.mktemp("vc2") / "teacher"))


@pytest.fixture(scope="session")
def animatediff_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ad")
    return tiny.make_animatediff(str(d / "sd15"), str(d / "adapter"))


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return tiny.make_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny"))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# probe prompts\n" + "\n".join(PROMPTS) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def pruned(vc2_dir, prompts_file, tmp_path_factory):
    """A tiny vc2 student pruned to 80 % with the cheap output importance."""
    out = str(tmp_path_factory.mktemp("pruned") / "pruned.safetensors")
    run("prune.py", "--model", "vc2", "--teacher", vc2_dir, "--prompts", prompts_file, "--importance", "output",
        "--timesteps", "2", "--target-ratio", "0.8", "--out", out, *TINY_SAMPLING)
    return out


@pytest.fixture(scope="session")
def pairs(vc2_dir, pruned, prompts_file, tmp_path_factory):
    """make_pairs.py output for the pruned tiny student: (out_dir, first run's CompletedProcess)."""
    out = str(tmp_path_factory.mktemp("pairs") / "pairs")
    proc = run("make_pairs.py", "--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--prompts",
               prompts_file, "--out-dir", out, "--batch-size", "3", *TINY_SAMPLING)
    return out, proc


def train_step_inputs(vc2_dir, pruned):
    """The tiny vc2 teacher, a float32 student that differs from its reference (the pruned model), and one
    batch of two pairs for redpo.train_step: (family, teacher, student, reference, (x0_w, x0_l, emb, t, eps))."""
    import models

    fam = models.get_family("vc2")
    teacher = models.load_teacher(fam, vc2_dir)
    student, _ = models.load_model(teacher, pruned, torch.float32)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    reference, _ = models.load_model(teacher, pruned)
    g = torch.Generator().manual_seed(0)
    x0_w, x0_l, eps = (torch.randn(2, 4, 4, 4, 4, generator=g) for _ in range(3))
    emb, t = models.encode_prompts(teacher, ["a", "b"]), torch.tensor([100, 700])
    return fam, teacher, student, reference, (x0_w, x0_l, emb, t, eps)
