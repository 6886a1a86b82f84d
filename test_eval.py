"""Tests of eval.py: accuracy, benchmarks, the student's time split and memory, the results tables, the linear probe's
CLI, the GPU report's parts run small on the CPU, and its bad flags."""
import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import data
import distributed
import eval as evaluate_cli
import scan_kernel as sk
import train
import vitlinearizer as vl
from conftest import (TINY_ADVENTURER, TINY_STUDENT, TINY_TEACHER, TINY, run_train, tiny_teacher, one_error_line,
                      write_tree)

pytestmark = pytest.mark.usefixtures("cpu_dispatch")   # the scan dispatch a CPU user gets (conftest)


def test_eval_accuracy_on_a_hand_made_case():
    logits = torch.tensor([[5., 4, 3, 2, 1, 0],        # label 0: top-1 hit
                           [0, 5, 4, 3, 2, 1],         # label 5: top-5 hit only
                           [0, 0, 0, 0, 0, 9],         # label 5: top-1 hit
                           [1, 2, 3, 4, 5, 6]])        # label 0: miss (its lowest score)

    class Fixed(torch.nn.Module):                      # image i is filled with the value i: logits row i
        cfg = vl.ViTConfig()                           # its pixel mean / std: ImageNet's

        def forward(self, x):
            i = ((x[:, 0, 0, 0] * data.STD[0] + data.MEAN[0]) * 255).round().long()
            return vl.Output(logits[i], None, [])
    samples = [(torch.full((3, 2, 2), i, dtype=torch.uint8), label, None) for i, label in enumerate([0, 5, 5, 0])]
    samples.insert(2, (None, 3, "x.JPEG: broken"))     # an unreadable image is skipped, not counted
    loader = [data.collate(samples[:3]), data.collate(samples[3:])]
    args = type("Args", (), dict(amp="none", max_bad_frac=0.5))()
    assert train.evaluate(Fixed(), loader, args, distributed.Ctx()) == dict(top1=50.0, top5=75.0)


def test_bench_and_bench_scan_run_small(tmp_path, capsys):
    assert evaluate_cli.main(["--bench", "--teacher-preset", "demo", "--teacher-opts", "dim=32,depth=2,heads=2",
                              "--student", "demo", "--student-opts", "dim=32,depth=2", "--resolutions", "16,32",
                              "--batch-sizes", "2", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| teacher | demo | 32 | 2 |" in out and "| student | demo | 32 | 2 |" in out
    assert len(open(tmp_path / "bench.csv").readlines()) == 5
    student_row = [line for line in out.splitlines() if line.startswith("| student | demo | 32 |")][0]
    assert "x |" in student_row and "scan " in student_row and "rest " in student_row   # speed-up and time split
    assert evaluate_cli.main(["--bench-scan", "--scan-shapes", "2,8,4,9", "--warmup", "0", "--repeats", "1",
                              "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("baseline (per-step slicing)" in out and "selective_scan_ref" in out and "chunked" in out
            and "fwd+bwd" in out)


def test_student_time_split_restores_the_model():
    model = vl.VisionMamba(replace(TINY_STUDENT, scan_backend="chunked")).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x).logits
    parts, total = evaluate_cli.student_time_split(model, x, torch.device("cpu"))
    assert set(parts) == {"scan", "projections", "depthwise conv", "norms", "rest"}
    assert all(parts[k] > 0 for k in ("scan", "projections", "depthwise conv", "norms"))
    assert abs(sum(parts.values()) - total) < 1e-9
    assert vl.bidirectional_selective_scan is sk.bidirectional_selective_scan and vl.BiMamba.conv.__name__ == "conv"
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_bench_time_split_and_speed_rows_take_the_adventurer_student(tmp_path, capsys):
    assert evaluate_cli.main(["--bench", "--teacher-preset", "demo", "--teacher-opts", "dim=32,depth=2,heads=2",
                              "--student", "adventurer_demo", "--student-opts", "dim=16,depth=2,d_state=4,headdim=8",
                              "--resolutions", "16,32", "--batch-sizes", "2", "--warmup", "0", "--repeats", "1",
                              "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| student | adventurer_demo | 32 | 2 |")][0]
    assert "x |" in row and "scan " in row and "depthwise " in row and "rest " in row
    model = vl.Adventurer(TINY_ADVENTURER).eval()
    x = torch.randn(2, 3, 16, 16)
    parts, total = evaluate_cli.student_time_split(model, x, torch.device("cpu"))
    assert all(parts[k] > 0 for k in ("scan", "projections", "depthwise conv", "norms"))
    assert abs(sum(parts.values()) - total) < 1e-9
    rows = evaluate_cli.model_speed(16, 2, {"t": vl.ViT(TINY_TEACHER), "s": model}, torch.device("cpu"), repeats=1)
    assert [r["model"] for r in rows] == ["t", "s"] and float(rows[1]["GFLOPs"]) > 0


def test_cpu_train_memory_counts_activations_once_and_chunked_scan_saves_less():
    class Tiny(nn.Module):                       # saved for backward: the input and relu's output (not the weight)
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(512, 512)

        def forward(self, x):
            return vl.Output(self.lin(x).relu(), None, None)
    got = evaluate_cli.train_step_mem(Tiny(), torch.randn(2048, 512), torch.device("cpu"), None)
    assert float(got) == round((2 * 2048 * 512 * 4 + 4 * (512 * 512 + 512) * 4) / 2**20) == 12
    x = torch.randn(2, 3, 32, 32)
    mem = {b: float(evaluate_cli.train_step_mem(vl.VisionMamba(vl.MambaConfig(
        img_size=32, patch_size=4, dim=32, depth=2, d_state=16, scan_backend=b)), x, torch.device("cpu"), None))
        for b in ("reference", "chunked")}
    assert mem["chunked"] < mem["reference"] / 2


def test_scan_baseline_matches_reference():
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 2, 6, 4, 11
    u, delta, z = (torch.randn(b, d, L, generator=g) for _ in range(3))
    B, C = torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    A, D, bias = -torch.rand(d, n, generator=g) - 0.5, torch.randn(d, generator=g), torch.randn(d, generator=g)
    y = evaluate_cli.scan_baseline(u, delta, A, B, C, D, z, bias)
    ref = evaluate_cli.scan_kernel.selective_scan_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_runs_table_over_seeds(tmp_path, capsys):
    import statistics
    top1 = {"am+mp": [40.0, 50.5, 45.25], "labels_only": [30.0, 36.0]}
    for config, values in top1.items():
        for seed, v in enumerate(values):
            (tmp_path / f"{config}-s{seed}" / "finetune").mkdir(parents=True)
            (tmp_path / f"{config}-s{seed}" / "finetune" / "log.jsonl").write_text(
                json.dumps({"step": 1, "loss": 2.0}) + "\n"
                + json.dumps({"step": 9, "val_top1": v, "val_top5": 99}) + "\n"
                + json.dumps({"step": 9, "finished": True}) + "\n")
    (tmp_path / "mp_only-s0" / "distill").mkdir(parents=True)                # no finetune yet
    (tmp_path / "am_only-s0" / "finetune").mkdir(parents=True)               # validated, then stopped: not counted
    (tmp_path / "am_only-s0" / "finetune" / "log.jsonl").write_text(json.dumps({"step": 4, "val_top1": 99.0}) + "\n")
    assert evaluate_cli.main(["--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out[2:] if line.startswith("|")}
    assert set(rows) == {"am+mp", "labels_only"}
    assert out[-1] == "unfinished, not counted: am_only-s0/finetune (step 4)"
    for config, values in top1.items():
        seeds, mean, std = (c.strip() for c in rows[config][:3])
        assert (int(seeds), float(mean), float(std)) == (len(values), round(statistics.mean(values), 1),
                                                         round(statistics.stdev(values), 1))
    assert evaluate_cli.main(["--runs", str(tmp_path / "nope")]) == 2


def test_runs_reads_a_log_whose_last_line_was_cut_mid_write(tmp_path, capsys):
    """a log.jsonl that ends in half a line (a run killed mid-write, or writing now): the complete lines count, the run
    stays unfinished; a broken line before the end is a damaged log: one line"""
    run_dir = tmp_path / "am+mp-s0" / "finetune"
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"step": 9, "val_top1": 50.0}), json.dumps({"step": 10, "loss": 1.0})]
    (run_dir / "log.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[1][:9])
    (tmp_path / "am+mp-s1" / "finetune").mkdir(parents=True)                           # another seed, finished
    (tmp_path / "am+mp-s1" / "finetune" / "log.jsonl").write_text(lines[0] + "\n" + json.dumps(
        {"step": 9, "finished": True}) + "\n")
    assert evaluate_cli.main(["--runs", str(tmp_path)]) == 0
    assert "unfinished, not counted: am+mp-s0/finetune (step 10)" in capsys.readouterr().out
    (run_dir / "log.jsonl").write_text(lines[0] + "\n" + lines[1][:9] + "\n" + json.dumps({"step": 9, "finished": 1}))
    assert evaluate_cli.main(["--runs", str(tmp_path)]) == 2
    assert "log.jsonl: line 2 is not JSON" in one_error_line(capsys.readouterr().err)


def test_gpu_report_parts_run_small_on_cpu(monkeypatch):
    """The report's checks and timers on tiny shapes, on the CPU: the kernel (interpreter) passes its check, a wrong
    scan fails it, the three bidirectional ways agree, and the tables have the rows the README quotes."""
    monkeypatch.setattr(sk, "_INTERPRET", True)  # this test runs the kernel itself, under the interpreter
    cpu = torch.device("cpu")
    for directions, layout in ((2, "transposed"), (1, "L-contiguous")):
        x = evaluate_cli.scan_inputs(2, 3, 4, 5, torch.float32, layout, directions, cpu)
        assert x["z"].shape == (2, 3, 5) and x["u"].shape == (2,) * (directions == 2) + (2, 3, 5)
        assert evaluate_cli.scan_check(x, True, directions)[0] < 1e-5
    chunked = sk.selective_scan_chunked

    def wrong_scan(*args):  # 1 % off
        out, last = chunked(*args)
        return 1.01 * out, last
    monkeypatch.setattr(sk, "selective_scan_chunked", wrong_scan)
    x = evaluate_cli.scan_inputs(1, 3, 4, 6, torch.float32, "L-contiguous", 1, cpu)
    err, worst = evaluate_cli.scan_check(x, False, 1, backend="chunked")
    assert err > 1e-3
    monkeypatch.undo()
    ins = evaluate_cli.scan_inputs(1, 3, 4, 6, torch.float32, "transposed", 2, cpu)
    outs = [fn() for fn in evaluate_cli.bidirectional_three_ways(ins, backend="reference").values()]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])
    rows = evaluate_cli.scan_speed((1, 3, 4, 6), torch.float32, "L-contiguous", 1.0, cpu, backend="chunked", repeats=1)
    assert [r["mode"] for r in rows] == ["fwd"] * 3 + ["fwd+bwd"] * 3 and rows[0]["fused_speedup"] == "1.00x"
    act, small = 2 * 3 * 5 * 2, 2 * 4 * 5 * 2  # batch 2, dim 3, N 4, L 5, 2-byte elements
    assert evaluate_cli.scan_bytes(2, 3, 4, 5, 2, 2, False) == 2 * (2 * act + 2 * small) + 2 * act
    teacher = vl.ViT(replace(TINY_TEACHER, img_size=16))
    student = vl.VisionMamba(replace(TINY_STUDENT, scan_backend="chunked"))
    rows = evaluate_cli.model_speed(16, 2, {"t": teacher, "s": student}, cpu, repeats=1)
    assert [r["model"] for r in rows] == ["t", "s"] and rows[0]["speed vs teacher (train / infer)"] == "1.00 / 1.00"
    assert float(rows[1]["GFLOPs"]) > 0


BAD_EVAL_FLAGS = [(["--batch-size", 0], "--batch-size 0"), (["--workers", -1], "--workers -1"),
                  (["--img-size", 0], "--img-size 0"), (["--repeats", 0], "--repeats 0"),
                  (["--warmup", -1], "--warmup -1"), (["--max-seconds", 0], "--max-seconds 0"),
                  (["--max-seconds", "nan"], "--max-seconds nan"), (["--threads", 0], "--threads 0"),
                  (["--resolutions", "224,abc"], "--resolutions '224,abc'"),
                  (["--resolutions", 0], "--resolutions '0'"), (["--batch-sizes", "0"], "--batch-sizes '0'"),
                  (["--scan-shapes", "1,2"], "b,dim,N,L")]


@pytest.mark.parametrize("extra,words", BAD_EVAL_FLAGS, ids=[" ".join(map(str, e)) for e, _ in BAD_EVAL_FLAGS])
def test_bad_eval_flags_get_one_line(tmp_path, capsys, extra, words):
    tiny_bench = ["--bench", "--bench-scan", "--teacher-preset", "demo", "--teacher-opts", "dim=32,depth=2,heads=2",
                  "--student", "demo", "--student-opts", "dim=32,depth=2", "--resolutions", "16", "--batch-sizes", "1",
                  "--scan-shapes", "1,4,2,5", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)]
    capsys.readouterr()
    assert evaluate_cli.main(tiny_bench + [str(a) for a in extra]) == 2
    assert words in one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.glob("*.csv"))


def test_eval_warns_about_a_distillation_checkpoint(tmp_path, capsys):
    teacher = tiny_teacher(tmp_path / "t.pt")
    assert run_train(capsys, "--stage", "distill", "--teacher", teacher, *TINY, "--epochs", 1,
                     "--out", tmp_path / "r")[0] == 0
    assert evaluate_cli.main(["--ckpt", str(tmp_path / "r" / "distill" / "last.pt")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "class head was never trained" in err and "--stage finetune --init" in err
    assert evaluate_cli.main(["--ckpt", str(tmp_path / "r" / "distill" / "last.pt"), "--img-size", "18"]) == 2
    assert "--img-size 18 is not a multiple of the model patch size 4" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors"])
def test_eval_reads_the_teacher_files_its_help_names(tmp_path, capsys, fmt):
    root = write_tree(tmp_path / "d", corrupt=0)
    torch.manual_seed(0)
    vit = vl.ViT(vl.ViTConfig(img_size=16, patch_size=4, dim=32, depth=2, heads=2, num_classes=3)).eval()
    if fmt == "torchscript":                                          # a TorchScript archive, keys as timm writes them
        class Holder(nn.Module):
            def __init__(self):
                super().__init__()
                self.module = vit                                     # -> module.* keys, which load_teacher strips

            def forward(self, x):
                return self.module(x).logits
        path = tmp_path / "teacher.pt"
        torch.jit.save(torch.jit.trace(Holder(), torch.randn(1, 3, 16, 16)), str(path))
    else:
        path = tmp_path / "teacher.safetensors"                       # the format: header length, JSON header, bytes
        header, blobs = {}, []
        for k, v in vit.state_dict().items():
            offset = sum(map(len, blobs))
            blobs.append(v.contiguous().numpy().tobytes())
            header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(blobs[-1])]}
        text = json.dumps(header).encode()
        path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    classes, samples = data.list_split(root, "val")
    args = type("Args", (), dict(amp="none", max_bad_frac=0.01, batch_size=64, workers=0, seed=0))()
    want = train.evaluate(vit, data.make_loader(data.ImageFolder(samples, classes, 16, False), args, distributed.Ctx(),
                                                  train=False), args, distributed.Ctx())
    capsys.readouterr()
    assert evaluate_cli.main(["--ckpt", str(path), "--data", root]) == 0
    assert f"top-1 {want['top1']:.2f}  top-5 {want['top5']:.2f}" in capsys.readouterr().out


def test_save_steps_probe_cli_and_random_init(tmp_path, capsys):
    teacher = tiny_teacher(tmp_path / "t.pt")
    args = ["--stage", "distill", "--teacher", teacher, *TINY, "--epochs", 2, "--save-steps", "0,3"]
    rc, out, err = run_train(capsys, "--out", tmp_path / "r", *args)
    assert rc == 0, err
    run = tmp_path / "r" / "distill"
    assert {"step0.pt", "step3.pt", "last.pt"} <= {p.name for p in run.iterdir()}
    ck0, ck3 = (torch.load(run / f, weights_only=True) for f in ("step0.pt", "step3.pt"))
    assert ck0["step"] == 0 and ck3["step"] == 3
    # --random-init rebuilds exactly the distillation's starting point (seed, sin-cos positions)
    rand = evaluate_cli.random_init(ck3, seed=0).state_dict()
    assert all(torch.equal(rand[k], v) for k, v in ck0["model"].items())
    assert not all(torch.equal(ck3["model"][k], v) for k, v in ck0["model"].items())
    capsys.readouterr()
    assert evaluate_cli.main(["--probe", str(run / "step0.pt"), str(run / "last.pt")]) == 0
    assert evaluate_cli.main(["--probe", str(run / "last.pt"), "--random-init"]) == 0
    out = capsys.readouterr().out
    assert out.count("linear probe top-1") == 3 and "; 32 probe images, 32 held out)" in out
    res = json.load(open(run / "probe.json"))
    assert set(res) == {"step0.pt", "last.pt", "random-init-s0"} and res["step0.pt"] == res["random-init-s0"]
    assert all(0 <= r["top1"] <= 100 for r in res.values())
    assert evaluate_cli.main(["--probe", str(tmp_path / "nope.pt")]) == 2


def test_runs_tables_curves_and_probes_on_hand_made_logs(tmp_path, capsys):
    import statistics

    def write(run_dir, vals, probe=None):
        run_dir.mkdir(parents=True)
        (run_dir / "log.jsonl").write_text("".join(json.dumps(dict(step=s, val_top1=v)) + "\n" for s, v in vals)
                                           + json.dumps(dict(step=vals[-1][0], finished=True)) + "\n")
        if probe:
            (run_dir / "probe.json").write_text(json.dumps({k: dict(top1=v, train_top1=99) for k, v in probe.items()}))
    for s, (ft, lab, p0, p9) in enumerate([(80.0, 60.0, 20.0, 70.0), (84.0, 62.0, 22.0, 74.0),
                                           (83.0, 55.0, 21.0, 72.5)]):
        write(tmp_path / f"am+mp-s{s}" / "n300", [(100, ft)])
        write(tmp_path / f"labels-s{s}" / "n300", [(100, lab - 10), (200, lab)])
        (tmp_path / f"am+mp-s{s}" / "distill").mkdir()
        (tmp_path / f"am+mp-s{s}" / "distill" / "probe.json").write_text(json.dumps(
            {"step9.pt": dict(top1=p9), "step0.pt": dict(top1=p0)}))
    assert evaluate_cli.main(["--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
            for l in out.splitlines() if l.startswith("| ")}
    assert rows["am+mp"][:3] == ["3", f"{statistics.mean([80, 84, 83]):.1f}", f"{statistics.stdev([80, 84, 83]):.1f}"]
    assert rows["am+mp"][4] == "s0: 80.0, s1: 84.0, s2: 83.0"
    gaps = [80 - 60, 84 - 62, 83 - 55]                                                 # paired with the labels-only run
    assert rows["am+mp"][5] == f"+{statistics.mean(gaps):.1f} ({statistics.stdev(gaps):.1f}), 3 seeds"
    assert rows["labels"][:2] == ["3", f"{statistics.mean([60, 62, 55]):.1f}"]           # the last validation counts
    assert rows["labels / n300"] == ["3", f"100: {statistics.mean([50, 52, 45]):.1f}, "
                                          f"200: {statistics.mean([60, 62, 55]):.1f}"]
    assert rows["am+mp / distill/step0.pt"][:2] == ["3", "21.0"] and rows["am+mp / distill/step9.pt"][1] == "72.2"
    assert out.index("distill/step0.pt") < out.index("distill/step9.pt")               # probe rows in step order
