"""bf16 where it belongs: frozen models in bf16 weights on CUDA (tested here on the CPU, where bf16 is forced
with --precision bf16), the trained student in float32 master weights, the CPU default unchanged."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import models
import redpo
from conftest import train_step_inputs


def test_frozen_dtype_is_bf16_on_cuda_only():
    assert models.frozen_dtype("cuda") == models.frozen_dtype("cuda:1") == torch.bfloat16
    assert models.frozen_dtype("cpu") == torch.float32
    assert models.frozen_dtype("cuda", "fp32") == torch.float32 and models.frozen_dtype("cpu", "bf16") == torch.bfloat16


def test_bf16_teacher_keeps_its_fingerprint_and_students_load_exactly(vc2_dir, pruned):
    fam = models.get_family("vc2")
    t32 = models.load_teacher(fam, vc2_dir)
    t16 = models.load_teacher(fam, vc2_dir, dtype=torch.bfloat16)
    assert {p.dtype for m in (t16.unet, t16.vae, t16.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in t32.unet.parameters()} == {torch.float32}
    assert t16.fingerprint == t32.fingerprint  # a checkpoint made on a GPU loads on a CPU and back
    # a float32 copy of a bf16 teacher is the teacher's exact weights (read again), not their bf16 rounding
    copy32, _ = models.load_model(t16, "", torch.float32)
    ref = t32.unet.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in copy32.state_dict().items())
    assert not all(torch.equal(v.float(), ref[k]) for k, v in t16.unet.state_dict().items())
    # a student checkpoint loads exactly in float32 next to a bf16 teacher, in bf16 by default
    student32, _ = models.load_model(t16, pruned, torch.float32)
    stored = load_file(pruned)
    sd = student32.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in stored.items())
    student16, _ = models.load_model(t16, pruned)
    assert next(student16.parameters()).dtype == torch.bfloat16


def test_bf16_sampling_is_close_to_float32(vc2_dir):
    fam = models.get_family("vc2")
    t32 = models.load_teacher(fam, vc2_dir)
    t16 = models.load_teacher(fam, vc2_dir, dtype=torch.bfloat16)
    shape = models.latent_shape(t32, 4, 16, 16)
    out = {}
    for name, t, bf16 in (("fp32", t32, False), ("bf16", t16, True), ("fp32 weights, autocast", t32, True)):
        cond, uncond = models.encode_prompts(t, ["a red square"]), models.encode_prompts(t, [""])
        out[name] = models.sample(fam, t.unet, t.scheduler, cond, uncond, [3], shape, 3, 6.0, bf16=bf16)
        assert out[name].dtype == torch.float32
    scale = out["fp32"].abs().mean()
    for name in ("bf16", "fp32 weights, autocast"):
        err = (out[name] - out["fp32"]).abs().mean() / scale
        assert 0 < err < 0.05, (name, err)
    # bf16 weights run natively, as diffusers' pipelines run them: autocast is off for them (the same videos
    # with and without the flag), on for float32 weights; a bf16 UNet takes float32 inputs (cast to its dtype)
    with models.autocast("cpu", True, t16.unet):
        assert not torch.is_autocast_enabled("cpu")
    with models.autocast("cpu", True, t32.unet):
        assert torch.is_autocast_enabled("cpu")
    cond, uncond = models.encode_prompts(t16, ["a red square"]), models.encode_prompts(t16, [""])
    native = models.sample(fam, t16.unet, t16.scheduler, cond, uncond, [3], shape, 3, 6.0, bf16=False)
    assert torch.equal(native, out["bf16"])


def test_redpo_bf16_trains_float32_master_weights(vc2_dir, pruned, pairs, tmp_path):
    """The GPU recipe on the CPU: teacher and reference in bf16, student float32 under autocast. The
    student starts equal to its reference, so the DPO term starts at log 2 (up to bf16 rounding)."""
    out = str(tmp_path / "s.safetensors")
    argv = ["--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--pairs", os.path.join(pairs[0], "pairs.jsonl"),
            "--out", out, "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--warmup", "1",
            "--precision", "bf16", "--beta", "50", "--uncond-prob", "0", "--device", "cpu"]
    redpo.main(redpo.get_parser().parse_args(argv))
    tensors, before = load_file(out), load_file(pruned)
    assert {v.dtype for v in tensors.values()} == {torch.float32}
    changed = [k for k in before if not torch.equal(before[k], tensors[k])]
    assert len(changed) > len(before) // 2
    # an update of lr 1e-3 on float32 weights: most changes are far below a bf16 step of the weight
    k = changed[0]
    assert not torch.equal(tensors[k].bfloat16().float(), tensors[k])
    log = [json.loads(ln) for ln in open(str(tmp_path / "s.log.jsonl"))]
    assert log[0]["dpo"] == pytest.approx(math.log(2), abs=0.02) and all(math.isfinite(r["loss"]) for r in log)


def test_train_step_loss_is_the_reference_math_on_the_models_predictions(vc2_dir, pruned):
    """The CPU path is unchanged: train_step's loss (the teacher on the winners only when the reference is
    the initial student) equals METHOD.md's loss on predictions made the plain way, to float rounding."""
    fam, teacher, student, reference, (x0_w, x0_l, emb, t, eps) = train_step_inputs(vc2_dir, pruned)
    args = redpo.get_parser().parse_args(["--pairs", "x", "--out", "y", "--beta", "50"])
    for ref in (reference, None):  # the initial student, or the teacher as the DPO reference
        loss, stats = redpo.train_step(fam, teacher.scheduler, student, teacher.unet, ref,
                                       (x0_w, x0_l, emb, t, eps), args, False, "cpu")
        x_t = models.add_noise(fam, teacher.scheduler, torch.cat([x0_w, x0_l]), eps.repeat(2, 1, 1, 1, 1), t.repeat(2))
        with torch.no_grad():
            pred = lambda unet: models.predict_noise(fam, unet, x_t, t.repeat(2), torch.cat([emb, emb]))  # noqa: E731
            eps_teacher = pred(teacher.unet)
            eps_ref = eps_teacher if ref is None else pred(ref)
            expected, _ = redpo.redpo_loss_reference(pred(student), eps_ref, eps.repeat(2, 1, 1, 1, 1), 50.0, 1.0,
                                                     eps_teacher_w=None if ref is None else eps_teacher[:2])
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and stats["sft"] > 0
