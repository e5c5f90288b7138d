"""reformer-bench CLI and benchmark harness: smoke runs, table arithmetic, validation."""

import json
import os
import subprocess
import sys

import pytest
import torch

from reformer.bench import cli, harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_args(tmp_path, *extra):
    return ["--preset", "tiny", "--lengths", "16", "32", "--repeats", "1", "--out", str(tmp_path), *extra]


def test_in_process_sweep_writes_table_json_and_plot(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert cli.main(_tiny_args(tmp_path, "--in-process", "--attention-throughput", "on")) == 0
    printed = capsys.readouterr().out
    assert "speed-up vs transformers" in printed and "[6/6]" in printed
    data = json.loads((tmp_path / "reformer-bench_cpu_eval.json").read_text())
    results = data["results"]
    assert [(r["seq_len"], r["impl"]) for r in results] == [
        (16, "ours"),
        (16, "transformers"),
        (16, "dense"),
        (32, "ours"),
        (32, "transformers"),
        (32, "dense"),
    ]
    assert not any("error" in r for r in results)
    # "ours" is this project's model on transformers' weights, never a stand-in
    assert results[0]["description"] == "reformer (this project)"
    for r in results:
        assert r["time_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["seq_len"] / r["time_s"])
    # our model gives transformers' logits on the same weights (checked at the smallest length)
    assert results[0]["max_abs_diff_vs_transformers"] < 1e-4
    # attention-op throughput rows (the GPU table's code path, here timed on CPU without a peak)
    assert {(a["layer"], a["pass"]) for a in results[0]["attention"]} == {("local", "fwd"), ("lsh", "fwd")}
    png = (tmp_path / "reformer-bench_cpu_eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_subprocess_measurement_reports_peak_rss(tmp_path):
    pytest.importorskip("transformers")
    command = [
        sys.executable,
        "-m",
        "reformer.bench.cli",
        "--preset",
        "tiny",
        "--lengths",
        "64",
        "--impls",
        "ours",
        "--mode",
        "train",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
        "--no-plot",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr
    result = json.loads((tmp_path / "reformer-bench_cpu_train.json").read_text())["results"][0]
    assert "error" not in result, result
    assert result["mode"] == "train" and result["peak_total_mb"] > 50  # a fresh Python with torch
    assert result["peak_mb"] >= 0 and result["peak_rss_reset"] is True


def test_format_table_ratios_against_transformers():
    results = [
        dict(impl="ours", seq_len=1024, time_s=0.5, cpu_time_s=0.9, tokens_per_s=2048.0, peak_mb=100.0),
        dict(impl="transformers", seq_len=1024, time_s=2.0, cpu_time_s=3.9, tokens_per_s=512.0, peak_mb=400.0),
        dict(impl="dense", seq_len=1024, error="exit -9: killed (out of memory?)"),
        dict(impl="ours", seq_len=2048, time_s=1.0, cpu_time_s=1.9, tokens_per_s=2048.0, peak_mb=200.0),
    ]
    table = cli.format_table(results, "peak (MB)").splitlines()
    assert "| 1024 | reformer-kernels | 0.500 | 0.900 | 2,048 | 100 | 4.00x | 0.25 |" in table
    assert "| 1024 | transformers | 2.000 | 3.900 | 512 | 400 | 1.00x | 1.00 |" in table
    assert any("exit -9" in line for line in table)
    # no transformers row at 2048: no ratio
    assert "| 2048 | reformer-kernels | 1.000 | 1.900 | 2,048 | 200 | - | - |" in table


def test_merge_rounds_keeps_fastest_round_and_largest_peak():
    def row(impl, time_s, peak_mb, **extra):
        return dict(impl=impl, seq_len=64, time_s=time_s, tokens_per_s=64 / time_s, peak_mb=peak_mb, **extra)

    rounds = [
        [
            row("ours", 0.30, 100, max_abs_diff_vs_transformers=1e-6, tensor_peak_mb=80),
            row("transformers", 0.90, 400),
            dict(impl="dense", seq_len=64, error="exit -9"),
        ],
        [
            row("ours", 0.25, 120),
            dict(impl="transformers", seq_len=64, error="timed out"),
            dict(impl="dense", seq_len=64, error="exit -9 again"),
        ],
        [
            row("ours", 0.28, 90),
            row("transformers", 0.80, 380),
            dict(impl="dense", seq_len=64, error="exit -9 once more"),
        ],
    ]
    ours, theirs, dense = cli.merge_rounds(rounds)
    assert ours["time_s"] == 0.25 and ours["tokens_per_s"] == 64 / 0.25 and ours["round_times_s"] == [0.30, 0.25, 0.28]
    assert ours["peak_mb"] == 120 and ours["tensor_peak_mb"] == 80 and ours["max_abs_diff_vs_transformers"] == 1e-6
    assert theirs["time_s"] == 0.80 and theirs["peak_mb"] == 400 and theirs["round_times_s"] == [0.90, 0.80]
    assert dense == dict(impl="dense", seq_len=64, error="exit -9")
    assert rounds[0][0]["time_s"] == 0.30  # the rounds themselves are left as measured


def test_rounds_interleave_whole_sweeps(tmp_path, capsys, monkeypatch):
    ran = []
    times = iter([0.5, 2.0, 0.4, 2.2])
    monkeypatch.setattr(
        cli,
        "run_spec",
        lambda spec: (
            ran.append((spec["impl"], spec["parity"]))
            or dict(
                impl=spec["impl"],
                seq_len=spec["seq_len"],
                time_s=next(times),
                tokens_per_s=1.0,
                peak_mb=1.0,
                description="stub",
            )
        ),
    )
    args = [
        "--preset",
        "tiny",
        "--lengths",
        "16",
        "--impls",
        "ours",
        "transformers",
        "--rounds",
        "2",
        "--in-process",
        "--no-plot",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(args) == 0
    assert ran == [("ours", True), ("transformers", False), ("ours", False), ("transformers", False)]
    assert "[4/4]" in capsys.readouterr().out
    data = json.loads((tmp_path / "reformer-bench_cpu_eval.json").read_text())
    assert [r["time_s"] for r in data["results"]] == [0.4, 2.0] and data["meta"]["rounds"] == 2
    assert [[r["time_s"] for r in one] for one in data["rounds"]] == [[0.5, 2.0], [0.4, 2.2]]


def test_missing_transformers_skips_its_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(harness, "transformers_available", lambda: False)
    ran = []
    monkeypatch.setattr(
        cli,
        "run_spec",
        lambda spec: (
            ran.append(spec["impl"])
            or dict(
                impl=spec["impl"],
                seq_len=spec["seq_len"],
                time_s=1.0,
                tokens_per_s=1.0,
                peak_mb=1.0,
                description="stub",
            )
        ),
    )
    assert cli.main(_tiny_args(tmp_path, "--in-process", "--no-plot")) == 0
    assert "transformers is not installed" in capsys.readouterr().out
    assert ran == ["ours", "ours"]


def test_worker_reports_errors_instead_of_crashing():
    result = cli.run_spec(dict(impl="ours", preset="tiny", seq_len=20, mode="eval"))
    assert "error" in result and "multiple of" in result["error"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lengths", "0"], "--lengths must be positive"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--num-hashes", "0"], "--num-hashes must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_cli_rejects_bad_options(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)


def test_model_config_derives_grid_and_buckets_like_transformers():
    config = harness.model_config("small", 16384, num_hashes=4, num_layers=12)
    assert config["axial_pos_shape"] == [128, 128] and config["max_position_embeddings"] == 16384
    assert config["num_hashes"] == 4 and config["attn_layers"] == ["local", "lsh"] * 6
    assert config["num_buckets"] == [16, 32]  # what transformers' _set_num_buckets logged for this model
    assert harness.axial_shape(6 * 64) == [24, 16]
    with pytest.raises(ValueError, match="preset"):
        harness.model_config("huge", 1024)
    with pytest.raises(ValueError, match="multiple of local_attn_chunk_length"):
        harness.model_config("small", 1000)
    with pytest.raises(ValueError, match="impl"):
        harness.build_model("flash", config)


def test_attention_cost_counts_both_matmuls():
    inputs = dict(
        query=torch.zeros(2, 3, 128, 16),
        sorted_idx=torch.zeros(2, 3, 256, dtype=torch.long),
        chunk_length=32,
        num_chunks_before=1,
        num_chunks_after=0,
    )
    flops, bytes_moved = harness.attention_cost(inputs)
    assert flops == 4 * 2 * 3 * 256 * 64 * 16
    assert bytes_moved == 2 * 3 * 256 * (3 * 16 * 4 + 16 * 4 + 4) + 2 * 3 * 256 * 8


def test_gpu_peak_lookup():
    assert harness.gpu_peak("NVIDIA H100 80GB HBM3 SXM", torch.bfloat16) == (989e12, 3350e9)
    assert harness.gpu_peak("NVIDIA A100-SXM4-80GB", torch.float32) == (19.5e12, 2039e9)
    assert harness.gpu_peak("Some CPU", torch.float32) == (None, None)


def test_set_overrides_are_python_literals():
    assert cli._parse_override("num_buckets=[16, 32]") == ("num_buckets", [16, 32])
    assert cli._parse_override("hidden_act=gelu") == ("hidden_act", "gelu")
    assert cli._parse_override("lsh_num_chunks_after=1") == ("lsh_num_chunks_after", 1)
    args = cli.build_parser().parse_args(["--set", "num_hashes=2", "--set", "is_decoder=False"])
    assert dict(args.overrides) == {"num_hashes": 2, "is_decoder": False}
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--set", "no-equals-sign"])


def test_malloc_retain_sets_glibc_policy_for_workers(monkeypatch):
    seen = {}

    def fake_run(command, capture_output, text, timeout, env):
        seen.update(env)
        return subprocess.CompletedProcess(command, 0, stdout='{"impl": "ours", "seq_len": 16}\n', stderr="")

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    assert cli._run_subprocess(dict(impl="ours", seq_len=16), 10, "retain") == {"impl": "ours", "seq_len": 16}
    assert seen["MALLOC_MMAP_MAX_"] == "0" and int(seen["MALLOC_TRIM_THRESHOLD_"]) >= 2**32
    with pytest.raises(SystemExit, match="--malloc needs subprocess"):
        cli.main(["--malloc", "retain", "--in-process"])


def test_compile_option_compiles_ours_only(tmp_path, capsys, monkeypatch):
    specs = []
    monkeypatch.setattr(
        cli,
        "run_spec",
        lambda spec: (
            specs.append(spec)
            or dict(impl=spec["impl"], seq_len=spec["seq_len"], time_s=1.0, tokens_per_s=1.0, peak_mb=1.0,
                    description="stub", **({"compile_s": 3.0} if spec.get("compile") else {}))
        ),
    )  # fmt: skip
    args = ["--preset", "tiny", "--lengths", "16", "--impls", "ours", "transformers", "--compile", "--in-process"]
    assert cli.main([*args, "--no-plot", "--out", str(tmp_path)]) == 0
    assert [(spec["impl"], spec.get("compile", False)) for spec in specs] == [("ours", True), ("transformers", False)]
    assert "compiled in 3.0 s (not timed)" in capsys.readouterr().out
    data = json.loads((tmp_path / "reformer-bench_cpu_eval_compiled.json").read_text())
    assert data["meta"]["compile"] is True


def test_run_case_compiles_before_timing(monkeypatch):
    """The model is compiled once, by a step outside the measurement: the warm-up and timed steps reuse it."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")  # the wiring, not inductor, is under test
    compile_model = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_model(model, backend=counter))
    torch._dynamo.reset()
    result = harness.run_case("ours", "tiny", 16, mode="train", repeats=2, compile=True)
    torch._dynamo.reset()
    assert counter.frame_count == 1 and result["compile_s"] > 0 and len(result["times"]) == 2
    assert result["description"].endswith(", torch.compile")
    with pytest.raises(ValueError, match="compile applies to impl 'ours' only"):
        harness.run_case("transformers", "tiny", 16, compile=True)
