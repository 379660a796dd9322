"""Long runs that survive: a bad input file is one line naming it (exit 2, no traceback), a full disk leaves
no half-written file, one loop per work dir, and heavy stages across nodes through torchrun's c10d rendezvous."""
import argparse
import builtins
import errno
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import filter_pairs
import make_pairs
import models
import online_loop
import prune
import redpo
from conftest import ROOT, TINY_SAMPLING, run

NOT_UTF8 = "a red square at the caf\xe9\n".encode("latin-1")  # a prompt file saved as Latin-1


def unreadable(monkeypatch, path):
    """`path` as a file without read permission (root reads anything, so open() is patched to refuse it)."""
    real_open = builtins.open

    def fake_open(file, *a, **k):
        if os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)


def raises(error):
    def f(*args):
        raise error
    return f


def make(tmp_path, monkeypatch, kind, name):
    """A bad input file of `kind` named `name`."""
    path = tmp_path / name
    if kind == "not-utf8":
        path.write_bytes(b'{"prompt": "ok"}\n' + NOT_UTF8 if name.endswith(".jsonl") else NOT_UTF8)
    elif kind == "folder":
        path.mkdir()
    elif kind == "unreadable":
        path.write_text('{"prompt": "ok"}\n')
        unreadable(monkeypatch, path)
    elif kind == "cut":  # a checkpoint whose copy stopped half-way
        save_file({"w": torch.zeros(256)}, str(tmp_path / "whole.safetensors"), metadata={"format": models.STUDENT_FORMAT})
        path.write_bytes((tmp_path / "whole.safetensors").read_bytes()[:600])
    return str(path)


READERS = {"prompts .txt": (models.read_prompts, "p.txt"), "prompts .jsonl": (models.read_prompts, "p.jsonl"),
           "pairs": (models.read_jsonl, "pairs.jsonl"), "report": (models.read_json, "report.json"),
           "student": (models.read_student_meta, "s.safetensors")}
WHAT = {"not-utf8": "not UTF-8 text", "folder": "is a folder", "unreadable": "permission denied", "cut": "not a safetensors"}


@pytest.mark.parametrize("kind,reader", [(k, r) for k in ("not-utf8", "folder", "unreadable") for r in READERS
                                         if not (r == "student" and k != "folder")] + [("cut", "student")])
def test_every_reader_names_the_bad_file(kind, reader, tmp_path, monkeypatch):
    fn, name = READERS[reader]
    path = make(tmp_path, monkeypatch, kind, name)
    with pytest.raises(models.UserError) as e:
        fn(path)
    msg = str(e.value)
    assert msg.startswith(path) and WHAT[kind] in msg and "\n" not in msg
    if kind == "not-utf8":  # the line of the first bad byte
        assert msg.startswith(f"{path}:{2 if name.endswith('.jsonl') else 1}: not UTF-8 text (byte 0xe9)")


@pytest.mark.parametrize("stage,kind", [("prune", "not-utf8"), ("make_pairs", "folder"), ("curate", "not-utf8"),
                                        ("redpo", "not-utf8"), ("redpo latents", "cut"), ("online_loop", "unreadable")])
def test_stages_name_the_bad_file(stage, kind, tmp_path, monkeypatch):
    """Each stage's main(args) in this process: the UserError names the file before any model loads."""
    good = tmp_path / "good.txt"
    good.write_text("a red square\n")
    if stage == "redpo latents":  # a pairs file whose latents file is cut short
        bad = make(tmp_path, monkeypatch, kind, "w.safetensors")
        named = tmp_path / "pairs.jsonl"
        named.write_text(json.dumps({"id": "0", "prompt": "p", "winner": {"latents": "w.safetensors"},
                                     "loser": {"latents": "w.safetensors"}, "text_emb": "w.safetensors"}) + "\n")
        module, argv = redpo, ["--pairs", str(named), "--out", str(tmp_path / "s.safetensors")]
    else:
        bad = make(tmp_path, monkeypatch, kind, "bad.jsonl" if stage == "redpo" else "bad.txt")
        module, argv = {
            "prune": (prune, ["--prompts", bad, "--target-ratio", "0.5", "--out", str(tmp_path / "p.safetensors")]),
            "make_pairs": (make_pairs, ["--prompts", bad, "--out-dir", str(tmp_path / "o")]),
            "curate": (filter_pairs, ["--job", "curate", "--prompts", str(good), "--report", bad, "--out",
                                      str(tmp_path / "c.txt")]),
            "redpo": (redpo, ["--pairs", bad, "--out", str(tmp_path / "s.safetensors")]),
            "online_loop": (online_loop, ["--prompt-pool", bad, "--work-dir", str(tmp_path / "w")]),
        }[stage]
    with pytest.raises(models.UserError) as e:
        module.main(module.get_parser().parse_args(argv))
    named = [str(tmp_path / "pairs.jsonl"), "w.safetensors"] if stage == "redpo latents" else [bad]
    assert all(n in str(e.value) for n in named) and WHAT[kind] in str(e.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()  # nothing started


@pytest.mark.parametrize("damage", ["unet weights cut", "vae config not JSON"])
def test_a_damaged_teacher_folder_is_one_line_naming_it(vc2_dir, tmp_path, damage):
    import shutil

    bad = str(tmp_path / "teacher")
    shutil.copytree(vc2_dir, bad)
    if damage == "unet weights cut":
        path = os.path.join(bad, "unet", "diffusion_pytorch_model.safetensors")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    else:
        open(os.path.join(bad, "vae", "config.json"), "w").write("{ not json")
    with pytest.raises(models.UserError, match=f"^{bad}: cannot load this model folder"):
        models.load_teacher(models.get_family("vc2"), bad)


def test_a_full_disk_leaves_the_older_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    models.write_json(path, {"old": 1})

    def half_then_full(obj, f, **kw):
        f.write('{"new": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models.json, "dump", half_then_full)
    with pytest.raises(models.UserError, match=f"{path}: cannot write it \\(no space left on device\\)"):
        models.write_json(path, {"new": 2})
    monkeypatch.undo()

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", src, None, dst)

    monkeypatch.setattr(models.os, "replace", full)  # the rename of a whole file fails too
    with pytest.raises(models.UserError, match="pairs.jsonl: cannot write it"):
        models.write_jsonl(tmp_path / "pairs.jsonl", [{"id": 1}])
    monkeypatch.undo()
    assert models.read_json(path) == {"old": 1} and sorted(os.listdir(tmp_path)) == ["report.json"]


def test_cli_turns_file_errors_into_one_line_and_keeps_bugs(monkeypatch, capsys):
    def fails(error):
        monkeypatch.setattr(sys, "argv", ["stage.py"])
        with pytest.raises(SystemExit) as e:
            models.cli(raises(error), argparse.ArgumentParser())
        return e.value.code, capsys.readouterr().err

    assert fails(PermissionError(errno.EACCES, "Permission denied", "x.bin")) == (2, "error: x.bin: permission denied\n")
    assert fails(OSError(errno.ENOSPC, "No space left on device")) == (2, "error: no space left on device\n")
    with pytest.raises(ConnectionResetError):  # an OSError naming no file is no bad input: its traceback stays
        fails(ConnectionResetError(errno.ECONNRESET, "reset"))
    # a stage run inside the loop does the same
    monkeypatch.setattr(models, "read_prompts", raises(IsADirectoryError(errno.EISDIR, "Is a directory", "dir.txt")))
    with open(os.devnull, "w") as log:
        assert online_loop.run_inline(["make_pairs.py", "--prompts", "dir.txt", "--out-dir", "o"], log) == 2
    assert "error: dir.txt: is a folder, expected a file" in capsys.readouterr().out


def test_a_prompt_file_not_in_utf8_is_one_line_in_a_real_process(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(NOT_UTF8)
    proc = run("make_pairs.py", "--prompts", tmp_path / "latin1.txt", "--out-dir", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'latin1.txt'}:1: not UTF-8 text (byte 0xe9); "
                                                "save it as UTF-8"]


# ----------------------------------------------------------------------------- one loop per work dir
def test_lock_refuses_a_live_holder_takes_over_a_dead_one(tmp_path, capsys):
    lock, host = str(tmp_path / "loop.lock"), socket.gethostname()
    models.take_lock(lock)
    assert models.lock_holder(lock) == (os.getpid(), host)
    with pytest.raises(models.UserError, match=f"pid {os.getpid()} on {host}"):
        models.take_lock(lock)  # alive: refused
    models.release_lock(lock)
    assert not os.path.exists(lock)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "loop.lock").write_text(f"{dead.pid} {host}\n")
    models.take_lock(lock)  # a dead pid on this host: taken over, with a notice
    assert models.lock_holder(lock) == (os.getpid(), host)
    assert f"its pid {dead.pid} is no longer running" in capsys.readouterr().out
    (tmp_path / "loop.lock").write_text("1 another-host\n")
    with pytest.raises(models.UserError, match="pid 1 on another-host"):
        models.take_lock(lock)  # another host's process cannot be checked: refused
    models.release_lock(lock)
    assert os.path.exists(lock)  # not ours: left alone


def test_the_loop_refuses_a_held_work_dir_and_releases_its_lock_on_error(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "loop.lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live loop holds it
    parse = online_loop.get_parser().parse_args
    with pytest.raises(models.UserError, match=f"loop.lock: another run \\(pid {os.getppid()} "):
        online_loop.main(parse(["--work-dir", str(work)]))
    assert os.listdir(work) == ["loop.lock"]  # refused before any work
    os.remove(work / "loop.lock")
    (work / "loop.args.json").write_text('{"model": "vc2"}')  # the work dir of another run: an error after locking
    with pytest.raises(models.UserError, match="--model='vc2'"):
        online_loop.main(parse(["--work-dir", str(work)]))
    assert not (work / "loop.lock").exists()  # released on the error
    with pytest.raises(models.UserError, match="--nnodes > 1 needs --rdzv-endpoint"):
        online_loop.main(parse(["--work-dir", str(work), "--nnodes", "2", "--node-rank", "1"]))
    with pytest.raises(models.UserError, match="--node-rank 2 is not in 0..1"):
        online_loop.main(parse(["--work-dir", str(work), "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"]))


# ----------------------------------------------------------------------------- many nodes
def test_launcher_for_one_and_many_nodes():
    py = sys.executable
    assert online_loop.launcher(1) == [py]  # in this process (or a plain one with --isolate)
    assert online_loop.launcher(4) == [py, "-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone"]
    cmd = online_loop.launcher(8, 2, "node0:29500", "round-1-pairs-pairs-jsonl")  # the same on every node
    assert cmd == [py, "-m", "torch.distributed.run", "--nproc-per-node=8", "--nnodes=2", "--rdzv-backend=c10d",
                   "--rdzv-endpoint=node0:29500", "--rdzv-id=round-1-pairs-pairs-jsonl"]


def test_other_nodes_wait_for_node_0s_file(tmp_path):
    marker, work = tmp_path / "prompts.txt", str(tmp_path)
    threading.Timer(0.3, marker.write_text, ["made by node 0\n"]).start()
    online_loop.wait_for("curate prompts", str(marker), work, poll=0.05)
    assert marker.exists()
    with pytest.raises(models.UserError, match="node 0 did not make it and its loop is not running"):
        online_loop.wait_for("prune", str(tmp_path / "pruned.safetensors"), work, poll=0.01, grace=0.05)


def test_two_nodes_make_the_same_pairs_as_one_process(pairs, vc2_dir, pruned, prompts_file, tmp_path):
    """make_pairs.py on two 'nodes' (two torchruns joined by a c10d rendezvous on this machine, gloo)."""
    out, _ = pairs
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--model", "vc2", "--teacher", vc2_dir, "--student", pruned, "--prompts", prompts_file,
            "--out-dir", str(tmp_path), "--batch-size", "3", "--device", "cpu", *TINY_SAMPLING]
    procs = [subprocess.Popen(online_loop.launcher(1, 2, f"127.0.0.1:{port}", "test")
                              + [os.path.join(ROOT, "make_pairs.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-4000:]
    one, two = models.read_jsonl(os.path.join(out, "pairs.jsonl")), models.read_jsonl(str(tmp_path / "pairs.jsonl"))
    assert one == two  # ids, prompts, seeds and file names
    for r in one:
        for f in (r["winner"]["latents"], r["loser"]["latents"]):
            a, b = load_file(os.path.join(out, f))["latents"], load_file(str(tmp_path / f))["latents"]
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)  # batches of 3 vs 2: float rounding
