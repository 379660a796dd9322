"""CPU thread policy: videos are sampled side by side on threads with one intra-op thread each."""
import threading

import numpy as np
import torch

import models


def test_in_threads_splits_in_order_on_threads_and_restores_the_thread_count():
    seen, before = [], torch.get_num_threads()
    together = threading.Barrier(3, timeout=10)  # raises unless three slices run at the same time

    def part(sl):
        seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled()))
        if len(seen) <= 3:  # the first call's three slices
            together.wait()
        return list(range(10))[sl]

    with torch.no_grad():
        out = models.in_threads(part, 10, "cpu", workers=3)
    assert out == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]  # contiguous, in order
    assert len({t for t, _, _ in seen[:3]}) == 3 and threading.get_ident() not in {t for t, _, _ in seen}
    assert {(n, g) for _, n, g in seen} == {(1, False)}  # one intra-op thread each, the caller's grad mode
    assert torch.get_num_threads() == before
    assert models.in_threads(part, 2, "cpu", workers=8) == [[0], [1]]  # never more threads than items
    assert models.in_threads(part, 10, "cuda:0", workers=3) == [list(range(10))]  # a GPU: one call


def test_sampling_on_two_threads_matches_one(vc2_dir, monkeypatch):
    teacher = models.load_teacher(models.get_family("vc2"), vc2_dir)
    s = {"steps": 3, "cfg": 6.0, "eta": 1.0, "x0_rescale": True, "frames": 4, "height": 16, "width": 16,
         "precision": "fp32"}
    cond, uncond = models.encode_prompts(teacher, ["a", "b", "c"]), models.encode_prompts(teacher, [""])
    out = {}
    for workers in ("1", "2"):
        monkeypatch.setenv("OMP_NUM_THREADS", workers)
        assert models.cpu_workers() == int(workers)
        out[workers] = models.generate(teacher, teacher.unet, cond, uncond, [5, 6, 7], s)
    assert not out["2"][0].requires_grad
    close = lambda a, b: (a - b).abs().max() <= 1e-5 * a.abs().max()  # noqa: E731
    assert close(out["1"][0], out["2"][0])  # the same seeds, the same videos (to float rounding)
    assert np.abs(out["1"][1].astype(int) - out["2"][1]).max() <= 1
    alone = models.generate(teacher, teacher.unet, cond[2:], uncond, [7], s)[0]  # a video depends on its seed only
    assert close(alone[0], out["2"][0][2])
