"""benchmarks/bench_redpo.py: a tiny run as a real process has every row, the log 2 step-1 losses, the sampler
agreement and FLOP counts that add up; --remove makes the counted student cheaper."""
import json
import math
import os
import re
import sys

import pytest

from conftest import ROOT, run

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_redpo  # noqa: E402

ROWS = [("train", "ours"), ("train", "baseline"), ("train+gc", "ours"), ("train+gc", "baseline"),
        ("sample", "ours (models.sample)"), ("sample", "diffusers TextToVideoSDPipeline"),
        ("decode", "VAE decode (models.decode)")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    proc = run("benchmarks/bench_redpo.py", "--tiny", "--warmup", "1", "--repeats", "2", "--steps", "2",
               "--peak-tflops", "0.5", "--out", out, "--device", "cpu")
    return proc.stdout, json.loads(out.read_text())


def test_tiny_run_has_every_row_timed(tiny):
    stdout, report = tiny
    rows = {(r["group"], r["row"]): r for r in report["rows"]}
    assert list(rows) == ROWS
    for r in rows.values():
        assert len(r["times"]) == 2 and 0 < r["p10_s"] <= r["median_s"] <= r["p90_s"]
        assert r["rate"] == pytest.approx(1 / r["median_s"]) and r["tflop"] > 0
        assert r["tflops"] == pytest.approx(r["tflop"] / r["median_s"]) and r["mfu"] == pytest.approx(r["tflops"] / 0.5)
        assert r["peak_gib"] is None  # not measured on the CPU
    for group in ("train", "train+gc", "sample"):
        assert next(r for r in rows.values() if r["group"] == group and r["baseline"])["speedup"] == 1.0
    # the printed markdown table: header, separator, one line per row
    table = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    assert table[0].startswith("| group | row |") and len(table) == 2 + len(ROWS)
    assert "device: CPU" in stdout and "attention (SDPA)" in stdout and report["header"]["matmul_tflops"] > 0


def test_tiny_run_step1_losses_are_log2_and_the_samplers_agree(tiny):
    _, report = tiny
    for r in report["rows"][:4]:  # student == teacher == reference: L_DPO = log 2, L_SFT = 0
        assert r["step1_loss"] == pytest.approx(math.log(2), abs=1e-4), r["row"]
    for group in ("train", "train+gc"):
        assert report["checks"][group]["abs_diff"] < 1e-6
    assert report["checks"]["agreement_max_abs_diff"] < 1e-4
    assert report["checks"]["agreement_max_abs_latent"] > 1  # a real video's latents, not zeros


def test_tiny_run_flop_counts_add_up(tiny):
    _, report = tiny
    rows = {(r["group"], r["row"]): r for r in report["rows"]}
    ours, base = rows["train", "ours"]["flops_by_role"], rows["train", "baseline"]["flops_by_role"]
    assert ours["student"] == base["student"] > 0          # forward + backward on [w; l], both ways
    assert ours["reference"] == base["reference"] > 0      # one forward on [w; l] (--reference student0)
    assert ours["teacher"] == base["teacher"] == ours["reference"] / 2  # the SFT target: the winners only
    assert ours["student"] > 2.5 * ours["reference"]       # a backward costs about two forwards
    for flops in (ours, base):  # every counted FLOP is in a UNet
        assert flops["total"] == flops["student"] + flops["teacher"] + flops["reference"]
    for kind in ("ours", "baseline"):  # model FLOPs: checkpointing's recompute is not counted
        assert rows["train+gc", kind]["tflop"] == rows["train", kind]["tflop"]
    sample = [r for (group, _), r in rows.items() if group == "sample"]
    assert sample[0]["tflop"] == sample[1]["tflop"] == pytest.approx(
        2 * 2 * report["header"]["forward_one_video_tflop"])  # --steps 2 of the [uncond; cond] forward
    assert sample[0]["tflop"] == pytest.approx(2 * ours["reference"] / 1e12)  # the reference's: 2 videos too


def test_flops_only_counts_a_pruned_student(tmp_path, capsys):
    """--flops-only --remove --reference teacher: nothing timed; the DPO reference is the teacher (no reference
    model: the baseline's teacher runs on [w; l] and on the winners); a sampled pruned video costs less than
    the teacher's forwards on as many videos."""
    out = tmp_path / "flops.json"
    args = bench_redpo.get_parser().parse_args(["--tiny", "--flops-only", "--remove", "down_blocks.0.temp_attentions.0",
                                                "--reference", "teacher", "--out", str(out), "--device", "cpu"])
    bench_redpo.main(args)
    report = json.loads(out.read_text())
    assert "| train | ours |" in capsys.readouterr().out
    assert all("median_s" not in r and r["tflop"] > 0 for r in report["rows"])
    ours, base = report["rows"][0]["flops_by_role"], report["rows"][1]["flops_by_role"]
    assert "reference" not in ours and ours["total"] == ours["student"] + ours["teacher"]
    assert base["teacher"] == pytest.approx(1.5 * ours["teacher"])  # 2 videos (reference) + 1 (SFT target)
    sample = next(r for r in report["rows"] if r["group"] == "sample")  # 3 steps, 2 videos a forward
    assert 0 < sample["tflop"] < 3 * ours["teacher"] / 1e12


def test_variants_rows_and_profile(tmp_path, capsys):
    """--variants adds an 'ours' train row per option set, timed from the same student == teacher start (step-1 loss
    log 2 up to the rounding a new memory layout brings, times beta); --profile files every op's time by kind (of the
    'ours' train rows and our sampler);
    --groups leaves out what it does not name; the agreement is also checked in strict float32."""
    out = tmp_path / "variants.json"
    args = bench_redpo.get_parser().parse_args(["--tiny", "--groups", "train", "sample", "agreement", "--variants",
                                                "channels-last", "bf16-weights", "--profile", "--warmup", "1",
                                                "--repeats", "1", "--out", str(out), "--device", "cpu"])
    bench_redpo.main(args)
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["ours", "baseline", "ours + channels-last", "ours + bf16-weights", *[r for g, r in ROWS
                                                                                         if g in ("sample", "decode")]]
    for name, options in (("ours + channels-last", ["channels-last"]), ("ours + bf16-weights", ["bf16-weights"])):
        variant = rows[name]
        assert variant["options"] == options and variant["tflop"] == rows["ours"]["tflop"]
        assert variant["step1_loss"] == pytest.approx(math.log(2), abs=1e-3) and variant["speedup"] > 0
    # AdamW moved the (master) weights in every train row
    assert all(r["param_change"] > 0 for r in rows.values() if r["group"] == "train")
    assert rows["ours + bf16-weights"]["precision"].startswith("bf16 weights") and rows["ours"]["precision"] == "fp32"
    for name in ("ours", "ours + channels-last", "ours (models.sample)"):
        prof = rows[name]["profile"]
        assert prof["kernel_s"] == pytest.approx(sum(prof["by_kind"].values())) and prof["kernel_s"] > 0
        assert set(prof["by_kind"]) <= {k for k, _ in bench_redpo.KERNEL_KINDS} | {"elementwise & other"}
        assert {"attention", "convolution", "matmul"} <= set(prof["by_kind"])  # the UNet's own ops, on the CPU
        assert len(prof["top"]) == 8 and prof["top"][0][1] >= prof["top"][-1][1]
    assert all("profile" not in rows[name] for name in ("baseline", "diffusers TextToVideoSDPipeline"))
    checks = report["checks"]
    assert checks["agreement_max_abs_diff"] < 1e-4 and checks["agreement_max_abs_diff_strict_fp32"] < 1e-4
    assert "- profile of train ours + channels-last: op (self CPU) time" in stdout
    assert re.search(r"- profile of sample ours \(models.sample\): op \(self CPU\) time [0-9.e-]+ s a video", stdout)
    assert "in strict float32" in stdout


def test_kernel_kinds_of_cuda_kernel_names():
    kind = bench_redpo.kernel_kind
    assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x") == "attention"
    assert kind("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_") == "layout transposes"
    assert kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "matmul" and kind("aten::mm") == "matmul"
    assert kind("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float") == "normalization"
    assert kind("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_k") == "elementwise & other"
    assert kind("void at::native::fused_adamw_kernel") == "optimizer"


def test_bad_variant_is_one_line_error(tmp_path):
    proc = run("benchmarks/bench_redpo.py", "--tiny", "--flops-only", "--variants", "channels-last+warp-speed",
               "--device", "cpu", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--variants channels-last+warp-speed" in proc.stderr and "cudnn-benchmark" in proc.stderr


GRANDCHILD = """
import subprocess, sys, torch
torch.nn.functional.conv2d(torch.ones(1, 3, 8, 8), torch.ones(4, 3, 3, 3))  # 2 * (3*3*3) * 4 * (6*6)
if sys.argv[-1] == "deep":
    subprocess.run([sys.executable, "-c", "import torch; torch.ones(4, 5) @ torch.ones(5, 6)"])
"""
CHILD = f"""
import subprocess, sys, torch
import torch.nn.functional as F
torch.ones(64, 32) @ torch.ones(32, 16)                      # 2*64*32*16
q = torch.ones(2, 3, 10, 4, requires_grad=True)              # (B, H, S, D): the CPU attention kernel
F.scaled_dot_product_attention(q, q.detach(), q.detach()).sum().backward()
for unit in ("flat", "deep"):
    subprocess.run([sys.executable, "-c", {GRANDCHILD!r}, "--shared", unit])
sys.exit(3)
"""


def test_flop_meter_counts_every_process_of_a_command(tmp_path):
    out = tmp_path / "meter.jsonl"
    proc = run("benchmarks/flop_meter.py", "--peak-gflops", "10", "--cores", "2", "--out", out, "--",
               sys.executable, "-c", CHILD, check=False)
    assert proc.returncode == 3, proc.stderr  # the command's own exit code, after the table
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["start"])
    assert len(rows) == 4 and rows[1]["ppid"] == rows[2]["ppid"] == rows[0]["pid"]
    assert rows[3]["ppid"] == rows[2]["pid"]  # the child, its two children, and the second one's child
    B, H, S, D = 2, 3, 10, 4
    # forward: q k^T and p v; backward (torch's formula, a flash kernel's): q k^T again, then dv, dp, dq, dk
    attention = 2 * (2 * B * H * S * S * D) + 5 * (2 * B * H * S * S * D)
    conv = 2 * (3 * 3 * 3) * 4 * (6 * 6)
    assert rows[0]["by_op"]["mm"] == 2 * 64 * 32 * 16
    assert sum(v for k, v in rows[0]["by_op"].items() if "attention" in k) == attention
    assert rows[1]["flops"] == rows[2]["flops"] == conv and rows[3]["flops"] == 2 * 4 * 5 * 6
    total = 2 * 64 * 32 * 16 + attention + 2 * conv + 2 * 4 * 5 * 6
    assert sum(r["flops"] for r in rows) == total and all(r["cpu_s"] > 0 for r in rows)
    assert "| python -c | 4 |" in proc.stdout and "| all | 4 | - |" in proc.stdout
    assert f"{total / 1e9 / 10 / 2:.0f} s" in proc.stdout
    again = run("benchmarks/flop_meter.py", "--report", out, "--peak-gflops", "10", "--cores", "2")
    assert [ln for ln in again.stdout.splitlines() if ln.startswith("|")] == \
        [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    units = run("benchmarks/flop_meter.py", "--report", out, "--peak-repeats", "2", "--by", "unit").stdout
    assert float(re.match(r"Peak: ([0-9.]+) GFLOP/s on one core", units).group(1)) > 0  # measured, not given
    table = {ln.split(" | ")[0][2:]: ln.split(" | ")[1:] for ln in units.splitlines() if ln.startswith("| ")}
    assert table["python -c (the command)"][0] == "1" and table["python -c flat"][0] == "1"
    assert table["python -c deep"][0] == "2"  # its child counted with it
    assert set(table) == {"unit", "python -c (the command)", "python -c flat", "python -c deep", "all"}


def test_flop_meter_bad_input_is_one_line_error(tmp_path):
    proc = run("benchmarks/flop_meter.py", "--peak-gflops", "10", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no command to meter" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"argv": [], "wall_s": 1, "cpu_s": 1, "flops": 0, "by_op": {}}\nnot json\n')
    proc = run("benchmarks/flop_meter.py", "--report", bad, "--peak-gflops", "10", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and f"{bad}:2: not valid JSON" in proc.stderr
    before = bad.read_text()  # an earlier run's file is neither appended to nor overwritten
    proc = run("benchmarks/flop_meter.py", "--peak-gflops", "10", "--out", bad, "--", sys.executable, "-c", "1",
               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and f"{bad}: exists" in proc.stderr
    assert bad.read_text() == before
