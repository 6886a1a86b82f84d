"""Tests of bench.py: the side-by-side table and its ratios, the scan benchmark, the student's time split and memory,
the GPU report's parts run small on the CPU, the results tables over seeds, the figures' data, and bad flags."""
import csv
import json
import statistics
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import bench
import scan_kernel as sk
import vitlinearizer as vl
from conftest import TINY_ADVENTURER, TINY_STUDENT, one_error_line

pytestmark = pytest.mark.usefixtures("cpu_dispatch")   # the scan dispatch a CPU user gets (conftest)

TINY_MODELS = ["--models", "demo,adventurer_demo,demo_alt", "--resolutions", "32"]   # a teacher, then two students


def cells(line):
    return [c.strip() for c in line.split("|")[1:-1]]


def test_bench_and_bench_scan_run_small(tmp_path, capsys):
    assert bench.main([*TINY_MODELS, "--resolutions", "16,32", "--batch-size", "2", "--rounds", "1",
                       "--csv", str(tmp_path / "speed.csv")]) == 0
    out = capsys.readouterr().out
    rows = [cells(line) for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [(r[0], r[1], r[2]) for r in rows] == [(m, px, "2") for px in ("16", "32")
                                                  for m in ("demo", "adventurer_demo", "demo_alt")]
    assert all(r[7].endswith(")") and "x (" in r[7] for r in rows)                      # speed-up ratios
    assert rows[0][12] == "" and all("scan " in r[12] and "rest " in r[12] for r in rows[1:3])   # the time split
    table = list(csv.DictReader(open(tmp_path / "speed.csv")))
    assert [(r["model"], r["px"]) for r in table] == [(r[0], r[1]) for r in rows]
    assert bench.main(["--scan", "--scan-shapes", "2,8,4,9", "--rounds", "1", "--csv", str(tmp_path / "scan.csv")]) == 0
    out = capsys.readouterr().out
    assert ("baseline (per-step slicing)" in out and "selective_scan_ref" in out and "chunked" in out
            and "fwd+bwd" in out)
    assert len(open(tmp_path / "scan.csv").readlines()) == 1 + 6


def test_side_by_side_ratios_are_teacher_time_over_model_time(monkeypatch, capsys):
    """each printed ratio is the median (min - max) over rounds of the teacher's seconds / the model's seconds, from
    the very timings side_by_side collected"""
    collected, real = [], bench.side_by_side
    monkeypatch.setattr(bench, "side_by_side", lambda *a: collected.extend(real(*a)) or collected[-3:])
    assert bench.main([*TINY_MODELS, "--rounds", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]   # (the header)
    assert [cells(line)[:3] for line in lines] == [["demo", "32", "1"], ["adventurer_demo", "32", "1"],
                                                  ["demo_alt", "32", "1"]]
    teacher = collected[0]
    for line, row in zip(lines, collected):
        assert len(row["train"]) == len(row["infer"]) == 3
        for col, key in ((7, "train"), (9, "infer")):
            r = [t / m for t, m in zip(teacher[key], row[key])]
            assert cells(line)[col] == f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"
            assert cells(line)[col - 1] == f"{1e3 * statistics.median(row[key]):.0f}"
    assert cells(lines[0])[7] == cells(lines[0])[9] == "1.00x (1.00-1.00)"


def test_vit_flops_count_every_matmul_and_the_attention_products():
    """model_flops of a ViT against its FLOPs written out: patch embedding, per block qkv, proj, MLP and the attention
    products Q K^T and A V (which torch's counter misses for the CPU flash-attention kernel), and the head."""
    cfg = vl.ViTConfig(img_size=32, patch_size=8, dim=16, depth=2, heads=2, num_classes=5)
    for res in (32, 64):
        N = (res // 8) ** 2
        L = N + 1
        want = (2 * N * 3 * 8 * 8 * 16 + cfg.depth * (2 * L * 16 * (3 * 16 + 16 + 2 * 4 * 16) + 4 * L * L * 16)
                + 2 * 16 * 5)
        assert bench.model_flops(vl.ViT(cfg).eval(), res, torch.device("cpu")) == want


def test_models_take_changed_fields():
    assert bench.preset_config("adventurer_base:chunk_size=32,depth=2").chunk_size == 32
    assert bench.preset_config("vit_b16").depth == 12
    for bad in ("adventurer_base:chunk=32", "adventurer_base:chunk_size=x", "nope"):
        with pytest.raises(bench.BenchError, match="--models"):
            bench.preset_config(bad)


def test_student_time_split_restores_the_model():
    model = vl.VisionMamba(replace(TINY_STUDENT, scan_backend="chunked")).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x).logits
    parts, total = bench.student_time_split(model, x, torch.device("cpu"))
    assert set(parts) == {"scan", "projections", "depthwise conv", "norms", "rest"}
    assert all(parts[k] > 0 for k in ("scan", "projections", "depthwise conv", "norms"))
    assert abs(sum(parts.values()) - total) < 1e-9
    assert vl.bidirectional_selective_scan is sk.bidirectional_selective_scan and vl.BiMamba.conv.__name__ == "conv"
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_bench_time_split_and_speed_rows_take_the_adventurer_student():
    rows = bench.side_by_side(["demo", "adventurer_demo"], 16, 2, 1, torch.device("cpu"))
    assert [r["model"] for r in rows] == ["demo", "adventurer_demo"] and rows[1]["gflops"] > 0
    assert all(w in rows[1]["split"] for w in ("scan ", "depthwise ", "rest ")) and rows[0]["split"] == ""
    assert "x (" in bench.table_lines(rows)[1]
    model = vl.Adventurer(TINY_ADVENTURER).eval()
    x = torch.randn(2, 3, 16, 16)
    parts, total = bench.student_time_split(model, x, torch.device("cpu"))
    assert all(parts[k] > 0 for k in ("scan", "projections", "depthwise conv", "norms"))
    assert abs(sum(parts.values()) - total) < 1e-9


def test_cpu_train_memory_counts_activations_once_and_chunked_scan_saves_less():
    class Tiny(nn.Module):                       # saved for backward: the input and relu's output (not the weight)
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(512, 512)

        def forward(self, x):
            return vl.Output(self.lin(x).relu(), None, None)
    got = bench.train_step_mem(Tiny(), torch.randn(2048, 512), torch.device("cpu"), None)
    assert float(got) == round((2 * 2048 * 512 * 4 + 4 * (512 * 512 + 512) * 4) / 2**20) == 12
    x = torch.randn(2, 3, 32, 32)
    mem = {b: float(bench.train_step_mem(vl.VisionMamba(vl.MambaConfig(
        img_size=32, patch_size=4, dim=32, depth=2, d_state=16, scan_backend=b)), x, torch.device("cpu"), None))
        for b in ("reference", "chunked")}
    assert mem["chunked"] < mem["reference"] / 2


def test_scan_baseline_matches_reference():
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 2, 6, 4, 11
    u, delta, z = (torch.randn(b, d, L, generator=g) for _ in range(3))
    B, C = torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g)
    A, D, bias = -torch.rand(d, n, generator=g) - 0.5, torch.randn(d, generator=g), torch.randn(d, generator=g)
    y = bench.scan_baseline(u, delta, A, B, C, D, z, bias)
    ref = bench.scan_kernel.selective_scan_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_gpu_report_parts_run_small_on_cpu(monkeypatch):
    """The report's checks and timers on tiny shapes, on the CPU: the kernel (interpreter) passes its check, a wrong
    scan fails it, the three bidirectional ways agree, and the tables have the rows the README quotes."""
    monkeypatch.setattr(sk, "_INTERPRET", True)  # this test runs the kernel itself, under the interpreter
    cpu = torch.device("cpu")
    for directions, layout in ((2, "transposed"), (1, "L-contiguous")):
        x = bench.scan_inputs(2, 3, 4, 5, torch.float32, layout, directions, cpu)
        assert x["z"].shape == (2, 3, 5) and x["u"].shape == (2,) * (directions == 2) + (2, 3, 5)
        assert bench.scan_check(x, True, directions)[0] < 1e-5
    chunked = sk.selective_scan_chunked

    def wrong_scan(*args):  # 1 % off
        out, last = chunked(*args)
        return 1.01 * out, last
    monkeypatch.setattr(sk, "selective_scan_chunked", wrong_scan)
    x = bench.scan_inputs(1, 3, 4, 6, torch.float32, "L-contiguous", 1, cpu)
    err, worst = bench.scan_check(x, False, 1, backend="chunked")
    assert err > 1e-3
    monkeypatch.undo()
    ins = bench.scan_inputs(1, 3, 4, 6, torch.float32, "transposed", 2, cpu)
    outs = [fn() for fn in bench.bidirectional_three_ways(ins, backend="reference").values()]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])
    rows = bench.scan_speed((1, 3, 4, 6), torch.float32, "L-contiguous", 1.0, cpu, backend="chunked", repeats=1)
    assert [r["mode"] for r in rows] == ["fwd"] * 3 + ["fwd+bwd"] * 3 and rows[0]["fused_speedup"] == "1.00x"
    act, small = 2 * 3 * 5 * 2, 2 * 4 * 5 * 2  # batch 2, dim 3, N 4, L 5, 2-byte elements
    assert bench.scan_bytes(2, 3, 4, 5, 2, 2, False) == 2 * (2 * act + 2 * small) + 2 * act
    rows = bench.side_by_side(["demo", "demo_alt"], 16, 2, 1, cpu)                # the report's model table
    assert [r["model"] for r in rows] == ["demo", "demo_alt"] and rows[1]["gflops"] > 0
    assert cells(bench.table_lines(rows)[0])[7] == "1.00x (1.00-1.00)"


def test_runs_table_over_seeds(tmp_path, capsys):
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
    assert bench.main(["--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out[2:] if line.startswith("|")}
    assert set(rows) == {"am+mp", "labels_only"}
    assert out[-1] == "unfinished, not counted: am_only-s0/finetune (step 4)"
    for config, values in top1.items():
        seeds, mean, std = (c.strip() for c in rows[config][:3])
        assert (int(seeds), float(mean), float(std)) == (len(values), round(statistics.mean(values), 1),
                                                         round(statistics.stdev(values), 1))
    assert bench.main(["--runs", str(tmp_path / "nope")]) == 2


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
    assert bench.main(["--runs", str(tmp_path)]) == 0
    assert "unfinished, not counted: am+mp-s0/finetune (step 10)" in capsys.readouterr().out
    (run_dir / "log.jsonl").write_text(lines[0] + "\n" + lines[1][:9] + "\n" + json.dumps({"step": 9, "finished": 1}))
    assert bench.main(["--runs", str(tmp_path)]) == 2
    assert "log.jsonl: line 2 is not JSON" in one_error_line(capsys.readouterr().err)


def test_runs_and_plot_stop_at_a_damaged_probe_json_with_one_line_naming_it(tmp_path, capsys):
    """a probe.json cut off, not text, not JSON, or JSON of another shape: one error line that names the file and the
    command that writes it again, for --runs and --plot (which read the same files); a table never misses a probe"""
    run_dir = tmp_path / "am+mp-s0" / "distill"
    run_dir.mkdir(parents=True)
    (run_dir / "log.jsonl").write_text(json.dumps({"step": 9, "val_top1": 50.0}) + "\n"
                                       + json.dumps({"step": 9, "finished": True}) + "\n")
    good = json.dumps({"step9.pt": dict(top1=70.0, train_top1=99.0)}).encode()
    (run_dir / "probe.json").write_bytes(good)
    assert bench.main(["--runs", str(tmp_path)]) == 0 and "| am+mp / distill/step9.pt | 1 | 70.0 |" in \
        capsys.readouterr().out
    for bad in (good[:len(good) // 2], b"\xff\xd8\xff\xe0", b"[1, 2]", b'{"step9.pt": 70.0}',
                b'{"step9.pt": {"top1": "n/a"}}', b'{"step9.pt": {"train_top1": 99.0}}'):
        (run_dir / "probe.json").write_bytes(bad)
        for argv in (["--runs", str(tmp_path)], ["--plot", str(tmp_path), "--out", str(tmp_path / "figs")]):
            assert bench.main(argv) == 2, (bad, argv)
            line = one_error_line(capsys.readouterr().err)
            assert f"{run_dir / 'probe.json'}: damaged" in line and "eval.py --probe" in line, line


def test_runs_tables_curves_and_probes_on_hand_made_logs(tmp_path, capsys):

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
    assert bench.main(["--runs", str(tmp_path)]) == 0
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


def test_figure_data_from_runs_and_the_side_by_side_csv(tmp_path, capsys):
    """what --plot draws, without matplotlib: the probe curve over distillation steps (last.pt at the run's last
    step), top-1 against labelled images for configurations run at two or more N, speed against resolution"""
    def write(run_dir, vals, last_step=None):
        run_dir.mkdir(parents=True)
        (run_dir / "log.jsonl").write_text("".join(json.dumps(dict(step=s, val_top1=v)) + "\n" for s, v in vals)
                                           + json.dumps(dict(step=last_step or vals[-1][0], finished=True)) + "\n")
    for s, (p0, p9, last) in enumerate([(20.0, 70.0, 80.0), (22.0, 74.0, 84.0)]):
        write(tmp_path / f"am+mp-s{s}" / "distill", [(50, 0.0)], last_step=50)
        (tmp_path / f"am+mp-s{s}" / "distill" / "probe.json").write_text(json.dumps(
            {"step0.pt": dict(top1=p0), "step9.pt": dict(top1=p9), "last.pt": dict(top1=last),
             "random-init-s0": dict(top1=p0)}))
        for n, (dist, lab) in {100: (60.0 + s, 30.0 + s), 300: (80.0 + s, 50.0 - s)}.items():
            write(tmp_path / f"am+mp-s{s}" / f"n{n}", [(10, dist)])
            write(tmp_path / f"labels_700-s{s}" / f"n{n}", [(10, lab)])
        write(tmp_path / f"mp_only-s{s}" / "n300", [(10, 70.0)])                        # one N: no curve
        write(tmp_path / f"teacher-s{s}" / "teacher", [(10, 95.0)])
        (tmp_path / f"teacher-s{s}" / "teacher" / "probe.json").write_text(json.dumps({"last.pt": dict(top1=90 + s)}))
    (tmp_path / "speed.csv").write_text(
        "model,px,batch,train_ms,infer_ms\nvit,224,1,10,4\nvim,224,1,12,5\nvit,448,1,50,20\nvim,448,1,25,9\n")
    data = bench.figure_data(str(tmp_path), str(tmp_path / "speed.csv"))
    assert data["probe_curve"] == {"am+mp/distill": [(0, 21.0, 20.0, 22.0, 2), (9, 72.0, 70.0, 74.0, 2),
                                                     (50, 82.0, 80.0, 84.0, 2)]}
    assert data["teacher_probe"] == 90.5
    assert data["label_efficiency"] == {"am+mp": [(100, 60.5, 60.0, 61.0, 2), (300, 80.5, 80.0, 81.0, 2)],
                                        "labels_700": [(100, 30.5, 30.0, 31.0, 2), (300, 49.5, 49.0, 50.0, 2)]}
    assert data["speed"] == {"vit": [(224, 10.0, 4.0), (448, 50.0, 20.0)], "vim": [(224, 12.0, 5.0), (448, 25.0, 9.0)]}
    capsys.readouterr()
    rc = bench.main(["--plot", str(tmp_path), "--csv", str(tmp_path / "speed.csv"), "--out", str(tmp_path / "figs")])
    try:
        import matplotlib  # noqa: F401
    except ImportError:                                                                 # optional: one error line
        assert rc == 2 and "--plot needs matplotlib" in one_error_line(capsys.readouterr().err)
    else:
        assert rc == 0 and {p.name for p in (tmp_path / "figs").iterdir()} == {
            f"{tmp_path.name}_label_efficiency.png", f"{tmp_path.name}_probe_curve.png", "speed.png"}


BAD_BENCH_FLAGS = [(["--rounds", 0], "--rounds 0"), (["--batch-size", 0], "--batch-size 0"),
                   (["--threads", 0], "--threads 0"), (["--models", "demo,nope"], "--models 'nope': not one of"),
                   (["--resolutions", "32,abc"], "--resolutions '32,abc'"), (["--resolutions", 0], "--resolutions '0'"),
                   (["--resolutions", 30], "--resolutions 30 is not a multiple of demo's patch size 4"),
                   (["--scan-shapes", "1,2"], "b,dim,N,L"), (["--scan", "--runs", "."], "one mode at a time"),
                   (["--plot"], "--plot: give a runs folder"),
                   (["--plot", "--csv", "nope.csv"], "--csv nope.csv: no such"),
                   (["--csv", "/nope/x.csv"], "no folder /nope")]


@pytest.mark.parametrize("extra,words", BAD_BENCH_FLAGS, ids=[" ".join(map(str, e)) for e, _ in BAD_BENCH_FLAGS])
def test_bad_bench_flags_get_one_line(tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "side_by_side", lambda *a: pytest.fail("ran despite a bad flag"))
    capsys.readouterr()
    assert bench.main(TINY_MODELS + [str(a) for a in extra]) == 2
    assert words in one_error_line(capsys.readouterr().err)


def test_grad_ckpt_side_by_side_says_so_and_counts_less_training_memory(capsys):
    """bench.py --grad-ckpt: every model of the table checkpointed; the training memory counted for the students
    drops (the activations kept for the backward), the parameters' share stays"""
    rows = {}
    for flag in ([], ["--grad-ckpt"]):
        assert bench.main([*TINY_MODELS, "--batch-size", "8", "--rounds", "1", *flag]) == 0
        out = capsys.readouterr().out
        assert ("activation checkpointing" in out.splitlines()[0]) == bool(flag)
        rows[bool(flag)] = {cells(line)[0]: float(cells(line)[11]) for line in out.splitlines()
                            if line.startswith("| ") and not line.startswith("| model")}
    assert all(rows[True][m] < rows[False][m] for m in ("adventurer_demo", "demo_alt")), rows
