"""How fast could a command possibly run here? Count the FLOPs every Python process of it does, and set them
against this machine's measured peak.

The command runs with a sitecustomize put first on its PYTHONPATH, so every Python process it starts (the loop,
each stage it launches, a study's units) counts the FLOPs of its PyTorch ops from start to exit, with a lean
TorchDispatchMode over torch.utils.flop_counter's formulas (matmuls, convolutions and attention, forward and
backward, plus the CPU attention kernels that torch's table lacks; elementwise ops count nothing, as in MFU),
and appends one JSON line to --out when it exits (it takes the place of any other sitecustomize module). The
command runs with OMP_NUM_THREADS=1 (unless set): a dispatch mode is per thread, so the videos that
models.in_threads would put on worker threads are counted only when they stay on the main one.

The peak is a float32 matmul on one thread (1024 x 1024, the median of --peak-repeats), measured before the
command runs, or --peak-gflops. The report gives, per script (or per unit, --by unit): processes, wall and CPU
seconds, counted GFLOP, GFLOP per CPU second (and its share of the peak); then the whole command's FLOPs at
that peak on --cores cores: the wall time it would take if every FLOP ran as fast as a large matmul and
nothing else (elementwise ops, Python, I/O) took any time.

    python benchmarks/flop_meter.py --out runs/meter/loop.jsonl -- python online_loop.py --work-dir runs/meter/loop
    python benchmarks/flop_meter.py --report runs/meter/loop.jsonl --peak-gflops 92   # the table again
    python benchmarks/flop_meter.py --out runs/meter/study.jsonl -- python toy/study.py --seeds 0 --jobs 2
    python benchmarks/flop_meter.py --report runs/meter/study.jsonl --peak-gflops 92 --by unit

Meant for CPU runs: the peak is a CPU core's (on CUDA the counts hold, the bound does not).
The counting costs time per op (about 15 % on the toy's training, more where ops are small), so the wall and
CPU seconds of a metered run are an upper bound; time the same command unmetered for the achieved speed.
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402

# What each metered process runs first (its PYTHONPATH starts with the folder this is written to).
SITECUSTOMIZE = r'''
import atexit, json, os, resource, sys, time
_t0 = time.time()
try:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count
except ImportError:  # a Python without torch: nothing to count
    torch = None

if torch is not None:
    _cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    _formulas = {**flop_registry,  # the CPU attention kernels, which torch's table leaves out (q, k, v: B, H, S, D)
                 _cpu_sdpa: lambda q, k, v, *a, **kw: sdpa_flop_count(q.shape, k.shape, v.shape),
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                     lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)}

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.by_op = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = _formulas.get(func._overloadpacket)
            if formula is not None:
                name = func._overloadpacket.__name__
                self.by_op[name] = self.by_op.get(name, 0) + int(formula(*args, **kwargs, out_val=out))
            return out

    _count = _Count()
    _count.__enter__()

    @atexit.register
    def _write():
        _count.__exit__(None, None, None)
        use = resource.getrusage(resource.RUSAGE_SELF)
        row = {"argv": sys.argv, "pid": os.getpid(), "ppid": os.getppid(), "start": _t0,
               "wall_s": time.time() - _t0, "cpu_s": use.ru_utime + use.ru_stime,
               "flops": sum(_count.by_op.values()), "by_op": _count.by_op}
        with open(os.environ["FLOP_METER_OUT"], "a") as f:
            f.write(json.dumps(row) + "\n")
'''


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="", help="the processes' JSON lines, a new file (default: a temporary one)")
    p.add_argument("--report", default="", help="only print the table of an earlier run's --out file")
    p.add_argument("--peak-gflops", type=float, default=0.0,
                   help="one core's peak in GFLOP/s (0 = measure a float32 matmul on one thread)")
    p.add_argument("--peak-repeats", type=int, default=20, help="timed matmuls for the peak")
    p.add_argument("--cores", type=int, default=0, help="cores for the bound (0 = the cores this process may use)")
    p.add_argument("--by", choices=["script", "unit"], default="script",
                   help="table rows: per script, or per unit (each process under the command's own child it "
                        "descends from, named by the arguments that child does not share with its siblings: "
                        "toy/study.py's units)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to meter")
    return p


def peak_gflops(repeats):
    """One thread's float32 1024 x 1024 matmul GFLOP/s (median of `repeats`, after 3 warm-up products)."""
    import torch

    import bench_redpo  # beside this file

    with models.intra_op_threads(1):
        return bench_redpo.matmul_tflops(1024, torch.float32, "cpu", warmup=3, repeats=repeats) * 1e3


def script_of(argv):
    """A process's name in the table: its script's file name (a module's __main__.py for `python -m`), or
    `python -c`."""
    return os.path.basename(argv[0]) if argv and argv[0] not in ("", "-c") else "python -c"


def read_rows(path):
    rows = models.read_jsonl(path, required=("argv", "wall_s", "cpu_s", "flops", "by_op"))
    if not rows:
        raise models.UserError(f"{path}: no metered process wrote a line (was the command a Python one?)")
    return rows


def unit_names(rows):
    """{pid: row name} for --by unit: each process under the command's own child it descends from (the command's
    first process is a unit of its own), named by its script and its arguments beyond those the children share."""
    pids, parent = {r["pid"] for r in rows}, {r["pid"]: r["ppid"] for r in rows}
    root = [r for r in rows if r["ppid"] not in pids]
    kids = {r["pid"]: r["argv"] for r in rows if parent.get(r["ppid"]) is not None and r["ppid"] in
            {q["pid"] for q in root}}
    common = os.path.commonprefix([argv[1:] for argv in kids.values()]) if len(kids) > 1 else []
    names = {r["pid"]: f"{script_of(r['argv'])} (the command)" for r in root}
    names.update({pid: " ".join([script_of(argv), *argv[1 + len(common):]])[:70] for pid, argv in kids.items()})

    def name(pid):
        while pid not in names and pid in parent:
            pid = parent[pid]
        return names.get(pid, "?")
    return {r["pid"]: name(r["pid"]) for r in rows}


def report(rows, peak, cores, wall=None, by_unit=False):
    """The markdown table and the bound, as lines."""
    by, units = collections.OrderedDict(), unit_names(rows) if by_unit else {}
    for r in sorted(rows, key=lambda r: r.get("start", 0)):
        key = units[r["pid"]] if by_unit else script_of(r["argv"])
        s = by.setdefault(key, {"n": 0, "wall_s": 0.0, "cpu_s": 0.0, "flops": 0})
        s["n"] += 1
        for k in ("wall_s", "cpu_s", "flops"):
            s[k] += r[k]
    ops = collections.Counter()
    for r in rows:
        ops.update(r["by_op"])
    total, cpu = sum(r["flops"] for r in rows), sum(r["cpu_s"] for r in rows)
    eff = lambda flops, sec: f"{flops / sec / 1e9:.1f} ({100 * flops / sec / 1e9 / peak:.0f} %)" if sec else "-"
    lines = [f"Peak: {peak:.1f} GFLOP/s on one core (float32 matmul); bound on {cores} core(s).", "",
             f"| {'unit' if by_unit else 'script'} | processes | wall s (sum) | CPU s | GFLOP | GFLOP per CPU s "
             "(of peak) |", "|---|---|---|---|---|---|"]
    for name, s in sorted(by.items(), key=lambda kv: -kv[1]["flops"]):
        lines.append(f"| {name} | {s['n']} | {s['wall_s']:.0f} | {s['cpu_s']:.0f} | {s['flops'] / 1e9:,.0f} | "
                     f"{eff(s['flops'], s['cpu_s'])} |")
    lines.append(f"| all | {len(rows)} | - | {cpu:.0f} | {total / 1e9:,.0f} | {eff(total, cpu)} |")
    lines += ["", "Counted GFLOP by op: " + ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in ops.most_common(8)), "",
              f"All of it at the peak on {cores} core(s): {total / 1e9 / peak / cores:.0f} s "
              f"({total / 1e9 / peak / cores / 60:.1f} min), if every FLOP ran as fast as a large matmul and nothing "
              "else took any time" + (f"; the metered run took {wall:.0f} s" if wall is not None else "") + "."]
    return lines


def main(args):
    cores = args.cores or models.cpu_cores()
    if args.report:
        print("\n".join(report(read_rows(args.report), args.peak_gflops or peak_gflops(args.peak_repeats), cores,
                                by_unit=args.by == "unit")))
        return
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise models.UserError("no command to meter: give it after --, e.g. -- python online_loop.py")
    if args.out and os.path.exists(args.out) and os.path.getsize(args.out):
        raise models.UserError(f"{args.out}: exists, with another run's lines; give a new --out (or --report it)")
    peak = args.peak_gflops or peak_gflops(args.peak_repeats)
    with tempfile.TemporaryDirectory() as site:
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        out = args.out or os.path.join(site, "meter.jsonl")
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        env = {**os.environ, "FLOP_METER_OUT": os.path.abspath(out),
               "PYTHONPATH": os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])]),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        t0 = time.time()
        try:
            code = subprocess.call(command, env=env)
        except FileNotFoundError:
            raise models.UserError(f"{command[0]}: no such command")
        wall = time.time() - t0
        print("\n".join(report(read_rows(out), peak, cores, wall, args.by == "unit")))
    if code:
        sys.exit(code)  # the command's own failure, after its table


if __name__ == "__main__":
    models.cli(main, get_parser())
