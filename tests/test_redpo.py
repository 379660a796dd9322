"""redpo.py: the loss (oracle vs fused, the log 2 fact, reductions) and training runs that change weights."""
import copy
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import models
import redpo
from conftest import ROOT, run, train_step_inputs

LOSS_TYPES = ["redpo", "dpo", "sft"]
SFT_TARGETS = ["teacher", "noise"]


def preds(B=3, shape=(4, 3, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(B, *shape, generator=g).repeat(2, 1, 1, 1, 1)  # winners and losers share eps
    return (eps + 0.3 * torch.randn(2 * B, *shape, generator=g), eps + 0.3 * torch.randn(2 * B, *shape, generator=g), eps)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("sft_target", SFT_TARGETS)
def test_fused_loss_matches_reference(loss_type, sft_target):
    eps_theta, eps_ref, eps = preds()
    teacher_w = eps_ref[:3] + 0.1
    both = [(eps_ref + 0.1, eps_theta - 0.05)] if sft_target == "teacher" else []  # --sft-on both: 2B rows
    for extra, sft_pred in ((None, None), (teacher_w, None), *both):
        a, sa = redpo.redpo_loss_reference(eps_theta, eps_ref, eps, 37.0, 0.7, loss_type, sft_target, extra, sft_pred)
        b, sb = redpo.redpo_loss(eps_theta, eps_ref, eps, 37.0, 0.7, loss_type, sft_target, extra, sft_pred)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        for k in ("dpo", "sft", "implicit_acc"):
            assert torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [redpo.redpo_loss, redpo.redpo_loss_reference])
def test_student_equal_to_reference_gives_log2_and_zero_sft(fn):
    eps_theta, _, eps = preds()
    loss, stats = fn(eps_theta, eps_theta.clone(), eps)  # defaults: beta 5000, w_sft 1, redpo, teacher
    assert stats["dpo"].item() == pytest.approx(math.log(2), abs=1e-7)
    assert stats["sft"].item() == 0.0
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert stats["implicit_acc"].item() == 0.0  # inside == 0 is not > 0


def test_loss_values_by_hand():
    """One pair, scalar-like tensors: the loss equals the formula of METHOD.md evaluated by hand."""
    shape = (1, 1, 1, 1)
    eps = torch.zeros(2, *shape)
    eps_theta = torch.tensor([0.1, 0.5]).view(2, *shape)  # e_theta_w = 0.01, e_theta_l = 0.25
    eps_ref = torch.tensor([0.2, 0.3]).view(2, *shape)    # e_ref_w = 0.04,  e_ref_l = 0.09
    beta, w = 10.0, 2.0
    inside = -(beta / 2) * ((0.01 - 0.04) - (0.25 - 0.09))
    want = -math.log(1 / (1 + math.exp(-inside))) + w * (0.1 - 0.2) ** 2
    loss, stats = redpo.redpo_loss(eps_theta, eps_ref, eps, beta, w)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert stats["implicit_acc"].item() == 1.0
    assert redpo.redpo_loss(eps_theta, eps_ref, eps, beta, w, "sft", "noise")[0].item() == pytest.approx(0.01, rel=1e-5)


def test_errors_average_over_all_non_batch_axes():
    """A difference confined to one frame must count with weight 1/(C*F*H*W), as a full mean does."""
    eps_theta, eps_ref, eps = preds(B=1)
    bumped = eps_theta.clone()
    bumped[0, :, 2] += 1.0  # winner, one frame
    d = redpo.redpo_loss_reference(bumped, eps_ref, eps, 1.0, 1.0, "sft", "noise")[0] - \
        redpo.redpo_loss_reference(eps_theta, eps_ref, eps, 1.0, 1.0, "sft", "noise")[0]
    want = ((eps_theta[0] + (torch.arange(3) == 2).view(1, 3, 1, 1) - eps[0]).pow(2).mean()
            - (eps_theta[0] - eps[0]).pow(2).mean())
    assert d.item() == pytest.approx(want.item(), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(vc2_dir):
    teacher = models.load_teacher(models.get_family("vc2"), vc2_dir)
    fam = teacher.family
    x = torch.randn(2, 4, 4, 4, 4)
    t = torch.tensor([10, 700])
    emb = models.encode_prompts(teacher, ["a", "b"])
    grads = []
    for ckpt in (False, True):
        unet = copy.deepcopy(teacher.unet).requires_grad_(True).eval()  # redpo trains with dropout off
        if ckpt:
            redpo.checkpoint_blocks(unet)
        models.predict_noise(fam, unet, x, t, emb).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def changed(before, after_path, teacher=None):
    after = load_file(after_path)
    return [k for k in after if not torch.equal(before[k], after[k])]


def test_training_changes_parameters_and_records_provenance(vc2_dir, pruned, pairs, tmp_path):
    out = tmp_path / "student.safetensors"
    proc = run("redpo.py", "--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--pairs",
               os.path.join(pairs[0], "pairs.jsonl"), "--out", out, "--max-steps", "4", "--log-every", "2",
               "--batch-size", "2", "--lr", "1e-3", "--warmup", "2", "--grad-accum", "2")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert [int(ln.split()[1]) for ln in lines] == [1, 2, 4]  # the first step, then every --log-every
    assert all(k in lines[0] for k in ("loss", "dpo", "sft", "implicit_acc", "margin", "grad dpo", "dist_teacher",
                                       "lr", "steps/s"))
    before = load_file(pruned)
    assert set(load_file(out)) == set(before)  # the same pruned architecture
    assert len(changed(before, out)) > len(before) // 2
    meta, pmeta = models.read_student_meta(str(out)), models.read_student_meta(pruned)
    assert meta["removed"] == pmeta["removed"] and meta["removed"]
    assert meta["stage"] == "redpo" and json.loads(meta["args"])["lr"] == 1e-3 and meta["round"] == pmeta["round"]
    log = [json.loads(ln) for ln in open(tmp_path / "student.log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    assert log[0]["lr"] == pytest.approx(5e-4) and log[1]["lr"] == pytest.approx(1e-3)  # warmup
    # the balance of the loss, logged at steps 1, 2, 4: each term's gradient norm, the margin, the
    # held-out distance to the teacher with and without the prompt
    for r in (log[0], log[1], log[3]):
        assert r["grad_norm_dpo"] > 0 and r["grad_norm_sft"] > 0 and math.isfinite(r["margin"])
        assert r["dist_teacher_cond"] > 0 and r["dist_teacher_uncond"] > 0 and r["dist_teacher_guided"] > 0
    assert "grad_norm_dpo" not in log[2] and "dist_teacher_cond" not in log[2]


def test_term_gradient_norms_are_those_of_each_term_alone():
    """grad_norm_of on one term equals the norm of a backward of that term by itself."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6)
    eps = torch.randn(2, 1, 1, 1, 6).repeat(2, 1, 1, 1, 1)
    eps_ref = eps + 0.1 * torch.randn_like(eps)
    params = list(lin.parameters())
    _, stats = redpo.redpo_loss(lin(eps + 0.2), eps_ref, eps, beta=50.0)
    norms = {k: redpo.grad_norm_of(stats[f"{k}_term"], params) for k in ("dpo", "sft")}
    for k in ("dpo", "sft"):
        lin.zero_grad()
        redpo.redpo_loss(lin(eps + 0.2), eps_ref, eps, beta=50.0, loss_type=k)[0].backward()
        assert norms[k] == pytest.approx(torch.cat([p.grad.flatten() for p in params]).norm().item(), rel=1e-5)


@pytest.mark.parametrize("p_uncond", [0.0, 1.0])
def test_prompt_dropout_reaches_the_unconditional_branch(vc2_dir, pruned, pairs, tmp_path, monkeypatch, p_uncond):
    """With --uncond-prob 1 every training forward sees the empty prompt's embedding (both members of
    every pair); with 0 none does."""
    teacher = models.load_teacher(models.get_family("vc2"), vc2_dir)
    uncond = models.encode_prompts(teacher, [""])[0]
    seen = []
    real = models.predict_noise

    def spy(family, unet, x_t, t, emb):
        if torch.is_grad_enabled() and x_t.shape[0] == emb.shape[0] and emb.shape[0] % 2 == 0:
            seen.append(torch.tensor([torch.allclose(e, uncond) for e in emb]))
        return real(family, unet, x_t, t, emb)

    monkeypatch.setattr(models, "predict_noise", spy)
    out = str(tmp_path / "s.safetensors")
    redpo.main(redpo.get_parser().parse_args([
        "--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--pairs", os.path.join(pairs[0], "pairs.jsonl"),
        "--out", out, "--max-steps", "3", "--batch-size", "2", "--lr", "1e-3", "--loss", "sft",
        "--uncond-prob", str(p_uncond), "--heldout-pairs", "0", "--log-every", "100"]))
    flags = torch.cat(seen)
    assert len(flags) >= 3 * 4  # 3 steps of [2 winners; 2 losers] through the student
    assert bool(flags.all()) if p_uncond == 1.0 else not bool(flags.any())


def test_heldout_pairs_are_never_trained_on():
    train, held = redpo.split_heldout(40, -1, seed=0)
    assert len(held) == 4 and len(train) == 36 and not set(train.tolist()) & set(held.tolist())
    assert torch.equal(held, redpo.split_heldout(40, -1, seed=0)[1])  # seeded
    assert len(redpo.split_heldout(9, -1, seed=0)[1]) == 0 and len(redpo.split_heldout(200, -1, seed=0)[1]) == 8
    with pytest.raises(models.UserError):
        redpo.split_heldout(3, 3, seed=0)


@pytest.mark.parametrize("flags", [
    ["--loss", "dpo", "--reference", "student0", "--precision", "fp32"],
    ["--loss", "sft", "--sft-target", "noise", "--grad-checkpointing", "--no-x0-rescale"],
    ["--loss", "redpo", "--sft-target", "teacher", "--reference", "teacher", "--precision", "auto",
     "--max-grad-norm", "0", "--weight-decay", "0.01", "--seed", "3", "--device", "cpu", "--lr-schedule", "cosine",
     "--warmup", "1"],
])
def test_every_loss_option_trains(vc2_dir, pruned, pairs, tmp_path, flags):
    out = str(tmp_path / "s.safetensors")
    args = redpo.get_parser().parse_args(["--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--pairs",
                                          os.path.join(pairs[0], "pairs.jsonl"), "--out", out, "--max-steps", "2",
                                          "--batch-size", "2", "--lr", "1e-3", *flags])
    redpo.main(args)
    assert changed(load_file(pruned), out)
    assert json.loads(models.read_student_meta(out)["args"])["loss"] == args.loss
    log = [json.loads(ln) for ln in open(tmp_path / "s.log.jsonl")]  # the rate each step took: warmup, then the schedule
    assert [r["lr"] for r in log] == pytest.approx([1e-3 * redpo.lr_factor(s, args.warmup, 2, args.lr_schedule) for s in (0, 1)])


def test_lr_schedule_warms_up_then_stays_or_decays_to_zero():
    f = lambda step, schedule: redpo.lr_factor(step, 2, 10, schedule)
    assert [f(s, "constant") for s in (0, 1, 5, 9, 10)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    cos = [f(s, "cosine") for s in range(11)]
    assert cos[0] == pytest.approx(0.5) and cos[5] == pytest.approx(0.5) and cos[10] == pytest.approx(0.0, abs=1e-12)
    assert cos[1] < 1 and all(a > b for a, b in zip(cos[1:], cos[2:]))  # falls from the end of the warmup on
    # the cosine is shaped by --max-steps: a training state resumes only with the same one then (else it may change)
    parse = lambda *a: redpo.get_parser().parse_args(["--pairs", "p.jsonl", "--out", "o.safetensors", *a])
    assert "max_steps" not in redpo.run_config(parse("--max-steps", "5"), 1)
    assert redpo.run_config(parse("--max-steps", "5", "--lr-schedule", "cosine"), 1)["max_steps"] == 5


def test_train_layers_temporal_moves_only_temporal_layers(vc2_dir, pruned, pairs, tmp_path):
    out = str(tmp_path / "s.safetensors")
    redpo.main(redpo.get_parser().parse_args(["--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--pairs",
                                              os.path.join(pairs[0], "pairs.jsonl"), "--out", out, "--max-steps", "2",
                                              "--batch-size", "2", "--lr", "1e-3", "--train-layers", "temporal"]))
    before = load_file(pruned)
    moved = changed(before, out)
    temporal = {k for k in before if any(p in f".{k}" for p in (".temp_convs.", ".temp_attentions.", ".transformer_in."))}
    assert moved and set(moved) <= temporal and len(moved) > len(temporal) // 2  # the spatial layers stay the pruned model's
    assert set(models.trainable_keys(models.get_family("vc2"), models.load_model(
        models.load_teacher(models.get_family("vc2"), vc2_dir), pruned)[0], "temporal")) == temporal


def test_interpolate_writes_the_blend_of_the_start_and_the_trained_weights(vc2_dir, pruned, pairs, tmp_path, capsys):
    """--interpolate A: the same training, then start + A (trained - start) written, the tensors the blend's to
    float rounding (the start read again from its file), and A recorded in the checkpoint's arguments."""
    common = ["--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--pairs", os.path.join(pairs[0], "pairs.jsonl"),
              "--max-steps", "2", "--batch-size", "2", "--lr", "1e-2"]
    for name, a in (("full", "1"), ("blend", "0.25")):
        redpo.main(redpo.get_parser().parse_args([*common, "--out", str(tmp_path / f"{name}.safetensors"), "--interpolate", a]))
    assert "0.25 of the way from the start" in capsys.readouterr().out
    start, full, blend = (load_file(str(p)) for p in (pruned, tmp_path / "full.safetensors", tmp_path / "blend.safetensors"))
    moved = [k for k in full if not torch.equal(full[k], start[k])]
    assert len(moved) > len(full) // 2
    for k in full:
        torch.testing.assert_close(blend[k], start[k] + 0.25 * (full[k] - start[k]), rtol=1e-5, atol=1e-6)
    assert json.loads(models.read_student_meta(str(tmp_path / "blend.safetensors"))["args"])["interpolate"] == 0.25
    (tmp_path / "refused").mkdir()
    for bad in ("0", "1.5"):
        assert_refused(vc2_dir, pruned, pairs, tmp_path / "refused", ["--interpolate", bad], "--interpolate must be in")


def test_animatediff_trains_only_motion_modules(animatediff_dirs, prompts_file, tmp_path):
    sd, adapter = animatediff_dirs
    common = ["--model", "animatediff", "--teacher", sd, "--motion-adapter", adapter]
    run("make_pairs.py", *common, "--prompts", prompts_file, "--out-dir", tmp_path / "pairs", "--steps", "2",
        "--frames", "4", "--height", "16", "--width", "16")
    args = redpo.get_parser().parse_args([*common, "--pairs", str(tmp_path / "pairs" / "pairs.jsonl"), "--out",
                                          str(tmp_path / "s.safetensors"), "--max-steps", "2", "--lr", "1e-2"])
    redpo.main(args)
    teacher = models.load_teacher(models.get_family("animatediff"), sd, adapter)
    student, _ = models.load_student(str(tmp_path / "s.safetensors"), teacher)
    t_sd, s_sd = teacher.unet.state_dict(), student.state_dict()
    moved = {k for k in t_sd if not torch.equal(t_sd[k], s_sd[k])}
    assert moved and all(".motion_modules." in k for k in moved)
    assert set(load_file(str(tmp_path / "s.safetensors"))) == {k for k in t_sd if ".motion_modules." in k}


def test_two_processes_train_as_one_with_the_global_batch(vc2_dir, pruned, pairs, tmp_path):
    """Real DDP: two nodes of one CPU process each (torchrun, c10d rendezvous on localhost, gloo) with
    --batch-size 1 train as one process with --batch-size 2: the ranks split one seeded global batch (pairs,
    t, eps, prompt dropout), DDP averages their gradients, and rank 0 writes one checkpoint and the log of the
    global batch. SFT, whose gradient does not amplify float rounding by beta; Adam turns the rounding of other
    batch shapes (~1e-7 relative) into a few 1e-6 on the weights (1.1e-5 on one Xeon, 2026-12-02), against ~3e-4
    that training moves them; the bound is 3e-5, ten times below that.
    Two micro-batches of 2 pairs a step: a step reads all 4 pairs, the next a new epoch's order."""
    common = ["--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--pairs",
              os.path.join(pairs[0], "pairs.jsonl"), "--max-steps", "2", "--grad-accum", "2", "--lr", "1e-3",
              "--log-every", "1", "--loss", "sft", "--reference", "teacher", "--uncond-prob", "0.5"]
    out, one = tmp_path / "ddp.safetensors", tmp_path / "one.safetensors"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
            "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]  # c10d numbers the nodes as they join
    nodes = [subprocess.Popen([*node, os.path.join(ROOT, "redpo.py"), *common, "--out", str(out), "--batch-size", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=600) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    stdouts = sorted((o for o, _ in outputs), key=lambda o: "world=2" in o)
    assert "world=2" not in stdouts[0] and stdouts[0].count("step ") == 0  # rank 0 logs alone
    assert "world=2" in stdouts[1] and stdouts[1].count("step ") == 2 and stdouts[1].count("redpo: wrote") == 1
    redpo.main(redpo.get_parser().parse_args([*common, "--out", str(one), "--batch-size", "2"]))
    a, b, before = load_file(str(out)), load_file(str(one)), load_file(pruned)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=3e-5) for k in a)
    assert max((b[k] - before[k]).abs().max().item() for k in b) > 1e-4  # it trained
    logs = [[json.loads(ln) for ln in open(tmp_path / f"{n}.log.jsonl")] for n in ("ddp", "one")]
    for r2, r1 in zip(*logs):
        assert "grad_norm_dpo" not in r2  # term-wise gradient norms: one process only
        assert r2 == pytest.approx({k: r1[k] for k in r2}, rel=1e-3, abs=1e-6)
    assert [r["step"] for r in logs[0]] == [1, 2] and len(logs[1]) == 2


def test_bad_pairs_file_is_a_one_line_error(vc2_dir, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"id": "0", "prompt": "x", "winner": {"latents": "a"}, "loser": {"latents": "b"}, "text_emb": "c"}\n'
                   '{"id": "1", "prompt": "y"\n')
    proc = run("redpo.py", "--model", "vc2", "--teacher", vc2_dir, "--pairs", bad, "--out", tmp_path / "o.safetensors",
               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and f"{bad}:2" in proc.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_guided_sft_compares_the_predictions_a_cfg_sampler_follows(vc2_dir, pruned, pairs, tmp_path):
    """--sft-cfg w: the SFT term is |g_student - g_teacher|^2 with g = eps(0) + w (eps(c) - eps(0)) on the
    winners, the DPO term unchanged; w = 1 is the plain conditional SFT; a scale with --sft-target noise is refused."""
    fam, teacher, student, reference, (x0_w, x0_l, emb, t, eps) = train_step_inputs(vc2_dir, pruned)
    uncond = models.encode_prompts(teacher, [""])
    x_t = models.add_noise(fam, teacher.scheduler, torch.cat([x0_w, x0_l]), eps.repeat(2, 1, 1, 1, 1), t.repeat(2))
    with torch.no_grad():
        pred = lambda unet, e: models.predict_noise(fam, unet, x_t, t.repeat(2), torch.cat([e, e]))  # noqa: E731
        u = uncond.expand_as(emb)
        guided = lambda unet, w: pred(unet, u)[:2] + w * (pred(unet, emb)[:2] - pred(unet, u)[:2])  # noqa: E731
        eps_s, eps_t = pred(student, emb), pred(teacher.unet, emb)
    params = redpo.trainable_parameters(fam, student)
    for w in (1.0, 3.0):  # the last, w = 3 against the teacher, is also checked for its gradient
        args = redpo.get_parser().parse_args(["--pairs", "x", "--out", "y", "--beta", "50", "--sft-cfg", str(w)])
        for ref in (reference, None):
            loss, stats = redpo.train_step(fam, teacher.scheduler, student, teacher.unet, ref,
                                           (x0_w, x0_l, emb, t, eps), args, False, "cpu", uncond=uncond)
            eps_ref = eps_t if ref is None else pred(ref, emb)
            want, want_stats = redpo.redpo_loss_reference(eps_s, eps_ref, eps.repeat(2, 1, 1, 1, 1), 50.0, 1.0,
                                                          eps_teacher_w=guided(teacher.unet, w),
                                                          eps_theta_sft=guided(student, w))
            plain, plain_stats = redpo.redpo_loss_reference(eps_s, eps_ref, eps.repeat(2, 1, 1, 1, 1), 50.0, 1.0,
                                                            eps_teacher_w=eps_t[:2])
            assert loss.item() == pytest.approx(want.item(), rel=1e-5)
            assert stats["sft"].item() == pytest.approx(want_stats["sft"].item(), rel=1e-5)
            assert stats["dpo"].item() == pytest.approx(plain_stats["dpo"].item(), rel=1e-5)
            if w == 1.0:
                assert stats["sft"].item() == pytest.approx(plain_stats["sft"].item(), rel=1e-4)
            else:  # the guided error is not the conditional one
                assert abs(stats["sft"].item() - plain_stats["sft"].item()) > 0.05 * plain_stats["sft"].item()
    # the guided SFT term's gradient reaches the student through both branches (the reference math, with grad)
    got = torch.autograd.grad(stats["sft_term"], params, allow_unused=True)
    want = (guided(student, w) - guided(teacher.unet, w).detach()).pow(2).mean()
    want = torch.autograd.grad(want, params, allow_unused=True)
    norm = lambda gs: torch.sqrt(sum(g.pow(2).sum() for g in gs if g is not None))  # noqa: E731
    assert norm(got) > 0
    assert norm([a - b for a, b in zip(got, want) if a is not None]) < 1e-4 * norm(want)
    assert_refused(vc2_dir, pruned, pairs, tmp_path, ["--sft-cfg", "6", "--sft-target", "noise"], "--sft-cfg 6")


def assert_refused(vc2_dir, pruned, pairs, out_dir, flags, match):
    """redpo.py with these flags stops with a one-line error matching `match` and writes nothing."""
    args = redpo.get_parser().parse_args(["--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--pairs",
                                          os.path.join(pairs[0], "pairs.jsonl"), "--out", str(out_dir / "s.safetensors"),
                                          *flags])
    with pytest.raises(models.UserError, match=match):
        redpo.main(args)
    assert not os.listdir(out_dir)


def test_sft_on_both_members_distills_the_teacher_on_the_losers_too(vc2_dir, pruned, pairs, tmp_path):
    """--sft-on both: a pair's SFT term is the mean of its winner's and its loser's (the student's own sample),
    each against the teacher's prediction (guided with --sft-cfg, plain without); the DPO term is unchanged.
    With the noise as SFT target it is refused (a loser's own noise is no target)."""
    fam, teacher, student, reference, (x0_w, x0_l, emb, t, eps) = train_step_inputs(vc2_dir, pruned)
    uncond = models.encode_prompts(teacher, [""])
    x_t = models.add_noise(fam, teacher.scheduler, torch.cat([x0_w, x0_l]), eps.repeat(2, 1, 1, 1, 1), t.repeat(2))
    B = len(x0_w)
    with torch.no_grad():
        pred = lambda unet, e: models.predict_noise(fam, unet, x_t, t.repeat(2), torch.cat([e, e]))  # noqa: E731
        u = uncond.expand_as(emb)
        guided = lambda unet, w: pred(unet, u) + w * (pred(unet, emb) - pred(unet, u))  # noqa: E731, (2B, ...)
    member = lambda a, b: (a - b).pow(2).flatten(1).mean(1)  # noqa: E731, per row
    for w in (0.0, 3.0):
        for ref in (reference, None):
            got = {}
            for on in ("winners", "both"):
                args = redpo.get_parser().parse_args(["--pairs", "x", "--out", "y", "--beta", "50", "--sft-cfg",
                                                      str(w), "--sft-on", on])
                got[on] = redpo.train_step(fam, teacher.scheduler, student, teacher.unet, ref,
                                           (x0_w, x0_l, emb, t, eps), args, False, "cpu", uncond=uncond)[1]
            per_member = member(guided(student, w), guided(teacher.unet, w)) if w else member(
                pred(student, emb), pred(teacher.unet, emb))
            assert got["winners"]["sft"].item() == pytest.approx(per_member[:B].mean().item(), rel=1e-5)
            assert got["both"]["sft"].item() == pytest.approx(per_member.mean().item(), rel=1e-5)
            assert abs(per_member[B:].mean() - per_member[:B].mean()) > 1e-3 * per_member.mean()  # they differ
            assert got["both"]["dpo"].item() == pytest.approx(got["winners"]["dpo"].item(), rel=1e-6)
            if w:  # --sft-branches: the guided, unconditional and conditional errors averaged, per member
                args = redpo.get_parser().parse_args(["--pairs", "x", "--out", "y", "--beta", "50", "--sft-cfg",
                                                      str(w), "--sft-on", "both", "--sft-branches"])
                br = redpo.train_step(fam, teacher.scheduler, student, teacher.unet, ref, (x0_w, x0_l, emb, t, eps),
                                      args, False, "cpu", uncond=uncond)[1]
                three = (per_member + member(pred(student, u), pred(teacher.unet, u)) +
                         member(pred(student, emb), pred(teacher.unet, emb))) / 3
                assert br["sft"].item() == pytest.approx(three.mean().item(), rel=1e-5)
                assert br["dpo"].item() == pytest.approx(got["winners"]["dpo"].item(), rel=1e-6)
    assert_refused(vc2_dir, pruned, pairs, tmp_path, ["--sft-on", "both", "--sft-target", "noise"],
                   "--sft-on both: needs --sft-target teacher")
    assert_refused(vc2_dir, pruned, pairs, tmp_path, ["--sft-branches"], "--sft-branches: needs --sft-cfg")


def test_min_snr_weighting_scales_each_pairs_sft_term_by_its_timestep(vc2_dir, pruned, pairs, tmp_path):
    """--snr-gamma g: a pair's SFT term times min(1, g (1 - abar_t) / abar_t) (min-SNR-g for a noise prediction), the
    nearly clean t down-weighted and the noisy ones untouched, guided or plain, on the winners or both members; the
    DPO term is unchanged; with --sft-target noise it is refused."""
    fam, teacher, student, reference, (x0_w, x0_l, emb, t, eps) = train_step_inputs(vc2_dir, pruned)
    uncond = models.encode_prompts(teacher, [""])
    abar = teacher.scheduler.alphas_cumprod[t].float()
    weight = (5.0 * (1 - abar) / abar).clamp(max=1)  # t = 100, 700
    assert weight[0] < 0.9 and weight[1] == 1.0
    for flags in ([], ["--sft-cfg", "3"], ["--sft-on", "both"]):
        for ref in (reference, None):
            got = {}
            for gamma in ("0", "5"):
                args = redpo.get_parser().parse_args(["--pairs", "x", "--out", "y", "--beta", "50", "--snr-gamma",
                                                      gamma, *flags])
                got[gamma] = redpo.train_step(fam, teacher.scheduler, student, teacher.unet, ref,
                                              (x0_w, x0_l, emb, t, eps), args, False, "cpu", uncond=uncond)[1]
            # per pair: recover the unweighted terms from loss_fn's own inputs by running one pair at a time
            per_pair = []
            for i in range(2):
                args = redpo.get_parser().parse_args(["--pairs", "x", "--out", "y", "--beta", "50", *flags])
                one = (x0_w[i:i + 1], x0_l[i:i + 1], emb[i:i + 1], t[i:i + 1], eps[i:i + 1])
                per_pair.append(redpo.train_step(fam, teacher.scheduler, student, teacher.unet, ref, one, args, False,
                                                 "cpu", uncond=uncond)[1]["sft"].item())
            per_pair = torch.tensor(per_pair)
            assert got["0"]["sft"].item() == pytest.approx(per_pair.mean().item(), rel=1e-4)
            assert got["5"]["sft"].item() == pytest.approx((weight * per_pair).mean().item(), rel=1e-4)
            assert got["5"]["sft"].item() < got["0"]["sft"].item()
            assert got["5"]["dpo"].item() == pytest.approx(got["0"]["dpo"].item(), rel=1e-6)
    assert_refused(vc2_dir, pruned, pairs, tmp_path, ["--snr-gamma", "5", "--sft-target", "noise"], "--snr-gamma 5")
