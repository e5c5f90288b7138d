"""reformer-bench CLI and benchmark harness: smoke runs, table arithmetic, validation."""

import json
import math
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

    def fake_run(command, capture_output, text, timeout, env, preexec_fn):
        seen.update(env)
        return subprocess.CompletedProcess(command, 0, stdout='{"impl": "ours", "seq_len": 16}\n', stderr="")

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    assert cli._run_subprocess(dict(impl="ours", seq_len=16), 10, "retain") == {"impl": "ours", "seq_len": 16}
    assert seen["MALLOC_MMAP_MAX_"] == "0" and int(seen["MALLOC_TRIM_THRESHOLD_"]) >= 2**32
    with pytest.raises(SystemExit, match="--malloc needs subprocess"):
        cli.main(["--malloc", "retain", "--in-process"])


# the published configurations, field by field (google/reformer-crime-and-punishment and
# google/reformer-enwik8 config.json; see the source note at harness.PRESETS)
PUBLISHED = {
    "crime-and-punishment": dict(
        hidden_size=256,
        num_attention_heads=2,
        attention_head_size=64,
        feed_forward_size=512,
        attn_layers=["local", "lsh"] * 3,
        local_attn_chunk_length=64,
        lsh_attn_chunk_length=64,
        num_hashes=1,
        num_buckets=[64, 128],
        vocab_size=320,
        is_decoder=True,
        hidden_dropout_prob=0.05,
        local_attention_probs_dropout_prob=0.05,
        lsh_attention_probs_dropout_prob=0.0,
        max_position_embeddings=524288,
        axial_pos_shape=[512, 1024],
        axial_pos_embds_dim=[64, 192],
        tie_word_embeddings=False,
    ),
    "enwik8": dict(
        hidden_size=1024,
        num_attention_heads=8,
        attention_head_size=128,
        feed_forward_size=4096,
        attn_layers=[
            "local",
            "local",
            "lsh",
            "local",
            "local",
            "local",
            "lsh",
            "local",
            "local",
            "local",
            "lsh",
            "local",
        ],
        local_attn_chunk_length=128,
        lsh_attn_chunk_length=256,
        num_hashes=4,
        num_buckets=512,
        vocab_size=258,
        is_decoder=True,
        hidden_dropout_prob=0.2,
        local_attention_probs_dropout_prob=0.2,
        lsh_attention_probs_dropout_prob=0.1,
        max_position_embeddings=65536,
        axial_pos_shape=[128, 512],
        axial_pos_embds_dim=[256, 768],
        tie_word_embeddings=False,
    ),
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_presets_match_the_checkpoints_and_build(preset):
    transformers = pytest.importorskip("transformers")
    full_length = PUBLISHED[preset]["max_position_embeddings"]
    config = harness.model_config(preset, full_length)
    assert {key: config[key] for key in PUBLISHED[preset]} == PUBLISHED[preset]
    hf_config = transformers.ReformerConfig(**config)
    assert hf_config.num_hidden_layers == len(PUBLISHED[preset]["attn_layers"])
    # a reduced model (2 layers, eval at a short length with the published axial grid) builds under both
    # implementations and gives transformers' logits
    length = 2 * PUBLISHED[preset]["lsh_attn_chunk_length"]
    result = harness.run_case("ours", preset, length, num_layers=2, repeats=1, parity=True)
    assert result["num_layers"] == 2 and result["axial_pos_shape"] == PUBLISHED[preset]["axial_pos_shape"]
    assert result["max_abs_diff_vs_transformers"] < 1e-4


def test_published_grid_trains_only_at_its_length():
    # transformers trains only at prod(axial_pos_shape): shorter training runs get a derived grid
    assert harness.model_config("crime-and-punishment", 524288, mode="train")["axial_pos_shape"] == [512, 1024]
    train = harness.model_config("crime-and-punishment", 4096, mode="train")
    assert train["axial_pos_shape"] == [64, 64] and train["axial_pos_embds_dim"] == [64, 192]
    assert harness.model_config("crime-and-punishment", 4096)["axial_pos_shape"] == [512, 1024]
    with pytest.raises(ValueError, match="exceeds the 65536 positions"):
        harness.model_config("enwik8", 131072)
    with pytest.raises(ValueError, match="prod\\(axial_pos_shape\\) == seq_len"):
        harness.model_config("enwik8", 4096, mode="train", overrides={"axial_pos_shape": [128, 512]})


def test_memory_cap_reports_an_out_of_memory_child(tmp_path, capsys):
    # tiny model, 300k-word vocabulary: the [1, 2048, 300000] fp32 logits (2.3 GiB) exceed the 2 GB
    # address-space cap of the measurement subprocess, which fails its allocation at once
    pytest.importorskip("transformers")
    argv = ["--preset", "tiny", "--lengths", "2048", "--impls", "ours", "--set", "vocab_size=300000"]
    argv += ["--memory-cap", "2", "--repeats", "1", "--no-plot", "--no-tensor-peak", "--out", str(tmp_path)]
    assert cli.main(argv) == 1  # every measurement failed
    printed = capsys.readouterr().out
    assert "| 2048 | reformer-kernels | out of memory (cap 2 GB) |" in printed
    data = json.loads((tmp_path / "reformer-bench_cpu_eval.json").read_text())
    (result,) = data["results"]
    assert result["error"] == "out of memory (cap 2 GB)" and result["out_of_memory"] is True
    assert "allocate" in result["error_detail"]
    assert data["meta"]["memory_cap_gb"] == 2


@pytest.mark.parametrize(
    "returncode, stdout, stderr, expected",
    [
        (
            0,
            '{"impl": "ours", "seq_len": 16, "error": "RuntimeError: DefaultCPUAllocator: can\'t allocate memory"}\n',
            "",
            "out of memory (cap 20 GB)",
        ),
        (0, '{"impl": "ours", "seq_len": 16, "error": "MemoryError: "}\n', "", "out of memory (cap 20 GB)"),
        (-6, "", "terminate called after throwing an instance of 'std::bad_alloc'", "out of memory (cap 20 GB)"),
        (-9, "", "", "exit -9: killed by SIGKILL (the kernel's OOM killer?)"),
        (1, "", "ValueError: seq_len", "exit 1: ValueError: seq_len"),
    ],
    ids=["torch-allocator", "python", "c++-abort", "sigkill", "other-error"],
)
def test_failures_are_classified(monkeypatch, returncode, stdout, stderr, expected):
    def fake_run(command, capture_output, text, timeout, env, preexec_fn):
        assert preexec_fn is not None  # the cap is applied in the child
        return subprocess.CompletedProcess(command, returncode, stdout=stdout, stderr=stderr)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    result = cli._run_subprocess(dict(impl="ours", seq_len=16), 10, memory_cap_gb=20.0)
    assert result["error"] == expected
    assert result.get("out_of_memory", False) == expected.startswith("out of memory")


def test_isa_option_restricts_the_workers_and_labels_the_run(tmp_path, monkeypatch, capsys):
    seen = []
    real_run = subprocess.run

    def fake_run(command, **kwargs):
        if "--worker" not in command:  # the CPU probe runs for real
            return real_run(command, **kwargs)
        seen.append(kwargs["env"])
        return subprocess.CompletedProcess(
            command,
            0,
            stdout=json.dumps(
                dict(impl="ours", seq_len=16, time_s=1.0, tokens_per_s=16.0, peak_mb=1.0, description="stub")
            ),
            stderr="",
        )

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    from reformer_kernels import cpu_info

    if cpu_info.cpu_info()["hardware_isa"] in (None, "sse", "avx"):
        pytest.skip("needs an AVX2 CPU")
    argv = [
        "--preset",
        "tiny",
        "--lengths",
        "16",
        "--impls",
        "ours",
        "--isa",
        "avx2",
        "--no-plot",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    assert seen and all(
        env["ATEN_CPU_CAPABILITY"] == "avx2"
        and env["DNNL_MAX_CPU_ISA"] == "AVX2"
        and env["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
        for env in seen
    )
    meta = json.loads((tmp_path / "reformer-bench_cpu_eval.json").read_text())["meta"]
    assert meta["isa"] == "avx2" and meta["cpu"]["isa"] == "avx2" and meta["cpu_probe"]["torch_capability"] == "AVX2"
    native = cpu_info.cpu_info()["hardware_isa"]
    assert meta["isa_label"] == (
        "AVX2 code paths (native)" if native == "avx2" else f"AVX2 code paths on an {cpu_info.ISA_NAMES[native]} CPU"
    )
    total_gib = int(open("/proc/meminfo").readline().split()[1]) / 2**20
    assert 1 <= meta["memory_cap_gb"] <= 0.85 * total_gib and meta["memory_cap_gb"] == int(meta["memory_cap_gb"])
    assert meta["isa_label"] in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--in-process", "--isa", "avx2"], "--isa needs subprocess"),
        (["--in-process", "--memory-cap", "4"], "--memory-cap needs subprocess"),
        (["--memory-cap", "-1"], "--memory-cap must be >= 0"),
    ],
)
def test_cap_and_isa_need_subprocesses(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)


def test_logits_check_only_at_short_lengths(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(
        cli,
        "run_spec",
        lambda spec: (
            ran.append(spec["parity"])
            or dict(
                impl=spec["impl"], seq_len=spec["seq_len"], time_s=1.0, tokens_per_s=1.0, peak_mb=1.0, description="s"
            )
        ),
    )
    argv = ["--preset", "tiny", "--impls", "ours", "transformers", "--in-process", "--no-plot", "--out", str(tmp_path)]
    assert cli.main([*argv, "--lengths", str(cli.PARITY_MAX_LEN * 2)]) == 0
    assert ran == [False, False]


# ==================================================================================================
# --mode generate
# ==================================================================================================
GENERATE_FIELDS = {
    "prefill_s",
    "prefill_times_s",
    "first_step_s",
    "step_times_s",
    "step_cpu_times_s",
    "step_median_s",
    "step_p10_s",
    "step_p90_s",
    "step_min_s",
    "step_max_s",
    "step_spread",
    "step_cpu_median_s",
    "peak_mb",
    "step_peak_mb",
    "greedy_tokens",
    "time_s",
    "tokens_per_s",
}


def test_generate_mode_runs_end_to_end_in_subprocesses(tmp_path):
    pytest.importorskip("transformers")
    # tiny preset: chunks of 8, so the 32-token prompt spans four chunks; two hash rounds
    command = [sys.executable, "-m", "reformer.bench.cli", "--mode", "generate", "--preset", "tiny"]
    command += ["--lengths", "32", "--impls", "ours", "transformers", "--steps", "4", "--repeats", "1"]
    command += ["--threads", "1", "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "| 32 | reformer-kernels |" in completed.stdout and "6/6 equal" in completed.stdout
    data = json.loads((tmp_path / "reformer-bench_cpu_generate.json").read_text())
    assert data["meta"]["mode"] == "generate" and data["meta"]["steps"] == 4
    ours, theirs = data["results"]
    assert (ours["impl"], theirs["impl"]) == ("ours", "transformers")
    for r in (ours, theirs):
        assert "error" not in r, r
        assert GENERATE_FIELDS <= set(r), GENERATE_FIELDS - set(r)
        assert len(r["step_times_s"]) == 4
        assert r["step_median_s"] == pytest.approx(sum(sorted(r["step_times_s"])[1:3]) / 2)
        assert r["step_min_s"] <= r["step_p10_s"] <= r["step_median_s"] <= r["step_p90_s"] <= r["step_max_s"]
        assert r["time_s"] == r["step_median_s"] and r["tokens_per_s"] == pytest.approx(1 / r["step_median_s"])
        assert r["peak_rss_reset"] is True and r["peak_mb"] >= 0 and r["step_peak_mb"] >= 0
        # the prefill's token, the untimed first step's, and the 4 timed steps'
        assert len(r["greedy_tokens"]) == 1 and len(r["greedy_tokens"][0]) == 6
        # the grid holds the prompt and every new token (eval embeds any length up to it)
        assert math.prod(r["axial_pos_shape"]) >= 32 + 6 and r["num_hashes"] == 2
        assert "prefill_last_logits" not in r and "final_logits" not in r  # compared, then dropped
    assert ours["greedy_tokens_compared"] == 6 and ours["greedy_mismatches"] == 0 and ours["first_mismatch"] is None
    assert ours["max_abs_logits_diff_vs_transformers"] < 1e-4
    assert ours["greedy_tokens"] == theirs["greedy_tokens"]
    png = (tmp_path / "reformer-bench_cpu_generate.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_step_statistics_on_fixed_numbers():
    times = [0.010, 0.001, 0.009, 0.002, 0.008, 0.003, 0.007, 0.004, 0.006, 0.005]  # 1..10 ms, shuffled
    stats = harness.step_statistics(times)
    assert stats["median"] == pytest.approx(0.0055)
    # linear interpolation between order statistics: position 0.1 * 9 = 0.9 -> 1 + 0.9 ms; 0.9 * 9 = 8.1 -> 9.1 ms
    assert stats["p10"] == pytest.approx(0.0019) and stats["p90"] == pytest.approx(0.0091)
    assert stats["min"] == 0.001 and stats["max"] == 0.010
    assert stats["spread"] == pytest.approx((0.0091 - 0.0019) / 0.0055)
    single = harness.step_statistics([0.004])
    assert single == dict(median=0.004, p10=0.004, p90=0.004, min=0.004, max=0.004, spread=0.0)
    assert harness.percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and harness.percentile([1.0, 2.0], 0.25) == 1.25
    with pytest.raises(ValueError, match="empty"):
        harness.percentile([], 0.5)
    with pytest.raises(ValueError, match="fraction"):
        harness.percentile([1.0], 1.5)


def _generate_row(impl, seq_len, step_s, prefill_s, tokens, logits_shift=0.0, page_faults=None):
    stats = harness.step_statistics([step_s, step_s * 1.1, step_s * 0.9])
    faults = {} if page_faults is None else {"step_page_faults": page_faults}
    return dict(
        **faults,
        impl=impl,
        seq_len=seq_len,
        description="stub",
        prefill_s=prefill_s,
        first_step_s=step_s * 3,
        step_cpu_median_s=step_s,
        peak_mb=10.0,
        step_peak_mb=1.0,
        greedy_tokens=tokens,
        prefill_last_logits=[0.5, -0.25 + logits_shift],
        final_logits=[0.125, 1.0],
        time_s=stats["median"],
        tokens_per_s=1 / stats["median"],
        **{f"step_{key}_s" if key != "spread" else "step_spread": value for key, value in stats.items()},
    )


def test_generate_greedy_mismatch_is_reported_and_rounds_merge(tmp_path, capsys, monkeypatch):
    # fake measurements: ours' tokens differ from transformers' at position 3 in round 2 only (at L=32)
    fakes = iter(
        [
            _generate_row("ours", 16, 0.002, 0.05, [[1, 2, 3, 4, 5]]),
            _generate_row("transformers", 16, 0.008, 0.20, [[1, 2, 3, 4, 5]]),
            _generate_row("ours", 32, 0.002, 0.09, [[7, 7, 7, 7, 7]], page_faults=0.0),
            _generate_row("transformers", 32, 0.020, 0.40, [[7, 7, 7, 7, 7]], page_faults=4100.0),
            _generate_row("ours", 16, 0.001, 0.06, [[1, 2, 3, 4, 5]]),
            _generate_row("transformers", 16, 0.009, 0.10, [[1, 2, 3, 4, 5]]),
            _generate_row("ours", 32, 0.004, 0.08, [[7, 7, 7, 9, 7]], logits_shift=0.5, page_faults=2.0),
            _generate_row("transformers", 32, 0.016, 0.50, [[7, 7, 7, 7, 7]], page_faults=12.0),
        ]
    )
    ran = []
    monkeypatch.setattr(cli, "run_spec", lambda spec: ran.append((spec["impl"], spec["steps"])) or next(fakes))
    argv = ["--mode", "generate", "--preset", "tiny", "--lengths", "16", "32", "--steps", "3", "--rounds", "2"]
    assert cli.main([*argv, "--in-process", "--no-plot", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    # dense attention (in the default --impls) has no cached decoding: never run
    assert "dense attention has no cached decoding" in printed
    assert ran == [("ours", 3), ("transformers", 3)] * 4
    assert "WARNING: at L=32 our greedy tokens differ from transformers' in 1 of 5 positions (first at token 3" in (
        printed
    )
    data = json.loads((tmp_path / "reformer-bench_cpu_generate.json").read_text())
    ours16, theirs16, ours32, theirs32 = data["results"]
    assert ours16["greedy_mismatches"] == 0 and ours16["greedy_tokens_compared"] == 5
    assert ours32["greedy_mismatches"] == 1 and ours32["first_mismatch"] == 3
    assert ours32["max_abs_logits_diff_vs_transformers"] == 0.5
    assert "| 16 | reformer-kernels |" in data["table"] and "5/5 equal" in data["table"]
    assert "MISMATCH: 1/5 differ, first at token 3" in data["table"]
    # each row: its fastest round's steps, its fastest prefill, every round's step ratio over transformers
    assert (
        ours16["step_median_s"] == 0.001 and ours16["prefill_s"] == 0.05 and ours16["round_prefill_s"] == [0.05, 0.06]
    )
    assert ours16["round_step_speedups"] == pytest.approx([4.0, 9.0])
    assert theirs16["step_median_s"] == 0.008 and theirs16["prefill_s"] == 0.10
    assert ours32["step_median_s"] == 0.002 and theirs32["step_median_s"] == 0.016
    # merged ratios: transformers' best median over ours' best, prefill likewise; step time vs the shortest prompt
    assert "| 16 | reformer-kernels | 0.050 | 3.00 | 1.00 |" in data["table"]
    assert "8.00x (4.00 / 9.00) | 2.00x | 1.00 (vs 16) | 5/5 equal |" in data["table"]
    assert "8.00x (10.00 / 4.00) | 5.00x | 2.00 (vs 16) | MISMATCH" in data["table"]
    assert all("prefill_last_logits" not in r for one in data["rounds"] for r in one)
    # page faults per step: the fastest round's, then every round's ("-" where a row has none)
    assert theirs32["step_page_faults"] == 12.0 and theirs32["round_step_page_faults"] == [4100.0, 12.0]
    assert ours32["round_step_page_faults"] == [0.0, 2.0] and "round_step_page_faults" not in ours16
    assert "| 12 (4,100 / 12) |" in data["table"] and "| 0 (0 / 2) |" in data["table"]


def test_generate_batch_rows_are_not_compared(tmp_path, capsys, monkeypatch):
    fakes = iter(
        [
            _generate_row("ours", 16, 0.002, 0.05, [[1, 2, 3], [4, 5, 6]]),
            _generate_row("transformers", 16, 0.008, 0.20, [[1, 2, 3], [9, 9, 9]]),
        ]
    )
    monkeypatch.setattr(cli, "run_spec", lambda spec: next(fakes))
    argv = ["--mode", "generate", "--preset", "tiny", "--lengths", "16", "--batch-size", "2"]
    assert (
        cli.main([*argv, "--impls", "ours", "transformers", "--in-process", "--no-plot", "--out", str(tmp_path)]) == 0
    )
    printed = capsys.readouterr().out
    assert "greedy tokens are not compared" in printed and "not compared (batch > 1)" in printed
    assert "WARNING" not in printed


def test_minor_page_faults_count_fresh_memory_only():
    """The page-fault counter behind the generate table's column: a buffer written again takes none, fresh
    4 MiB tensors (mmaps, the threshold pinned below them) take one per page touched."""
    code = (
        "import torch\n"
        "from reformer.bench.harness import minor_page_faults\n"
        "kept = torch.zeros(1 << 20)\n"
        "kept.add_(1); torch.ones(1 << 20)  # the kernels' first calls\n"
        "before = minor_page_faults()\n"
        "for _ in range(5):\n"
        "    kept.add_(1)\n"
        "reused = minor_page_faults() - before\n"
        "before = minor_page_faults()\n"
        "for _ in range(5):\n"
        "    torch.ones(1 << 20)\n"
        "print(reused, minor_page_faults() - before)\n"
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr
    reused, fresh = map(int, completed.stdout.split())
    assert reused <= 4
    # 1,024 pages of 4 KiB per tensor, unless transparent huge pages back every mapping (then a few each)
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            huge_pages = "[always]" in setting.read()
    except OSError:
        huge_pages = False
    assert fresh >= (5 if huge_pages else 5 * 1024)


def test_compare_generation_counts_every_row():
    ours = dict(greedy_tokens=[[1, 2, 3], [4, 5, 6]], prefill_last_logits=[0.0, 1.0], final_logits=[2.0, 3.0])
    theirs = dict(greedy_tokens=[[1, 2, 0], [4, 0, 6]], prefill_last_logits=[0.0, 1.25], final_logits=[2.0, 2.0])
    assert cli.compare_generation(ours, theirs) == dict(
        greedy_tokens_compared=6, greedy_mismatches=2, first_mismatch=1, max_abs_logits_diff_vs_transformers=1.0
    )
    with pytest.raises(ValueError, match="differ in shape"):
        cli.compare_generation(ours, dict(theirs, greedy_tokens=[[1, 2, 3]]))


def test_model_config_generate_grid_holds_prompt_and_new_tokens():
    config = harness.model_config("small", 1024, mode="generate", new_tokens=34)
    assert config["axial_pos_shape"] == [64, 32] and config["max_position_embeddings"] == 2048
    assert config["num_buckets"] == 32  # transformers' rule for the 1,024-token prompt
    config = harness.model_config("small", 65536, mode="generate", new_tokens=34)
    assert config["axial_pos_shape"] == [512, 256] and config["num_buckets"] == [32, 64]
    # a published grid is kept while it holds the prompt and the new tokens
    assert harness.model_config("enwik8", 4096, mode="generate", new_tokens=34)["axial_pos_shape"] == [128, 512]
    with pytest.raises(ValueError, match="seq_len 65536 \\+ 34 new tokens exceeds the 65536 positions"):
        harness.model_config("enwik8", 65536, mode="generate", new_tokens=34)
    with pytest.raises(ValueError, match="new_tokens"):
        harness.model_config("small", 1024, new_tokens=34)
    with pytest.raises(ValueError, match="mode"):
        harness.model_config("small", 1024, mode="decode")
    with pytest.raises(ValueError, match="no cached decoding"):
        harness.run_generate_case("dense", "tiny", 16)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mode", "generate", "--steps", "0"], "--steps must be >= 1"),
        (["--mode", "generate", "--attention-throughput", "on"], "--attention-throughput is for --mode eval"),
    ],
)
def test_generate_rejects_bad_options(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)


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


def test_run_generate_case_compiles_before_timing(monkeypatch):
    """Generate mode compiles (a prefill and warm-up steps on a cache of their own) before the measurement, whose
    prefill and steps compile nothing more; the greedy tokens are eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")  # the wiring, not inductor, is under test
    compile_model = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_model(model, backend=counter))
    frames_at_measurement = []
    measure = harness.measure

    def measure_after_warmup(*args, **kwargs):
        frames_at_measurement.append(counter.frame_count)
        return measure(*args, **kwargs)

    monkeypatch.setattr(harness, "measure", measure_after_warmup)
    torch._dynamo.reset()
    result = harness.run_generate_case("ours", "tiny", 16, steps=6, repeats=2, compile=True)
    torch._dynamo.reset()
    eager = harness.run_generate_case("ours", "tiny", 16, steps=6, repeats=2)
    assert frames_at_measurement[0] > 0 and counter.frame_count == frames_at_measurement[0]
    assert result["compile_s"] > 0 and result["description"].endswith(", torch.compile")
    assert result["greedy_tokens"] == eager["greedy_tokens"] and "compile_s" not in eager
    assert all(r["step_page_faults"] >= 0 for r in (result, eager))
    with pytest.raises(ValueError, match="compile applies to impl 'ours' only"):
        harness.run_generate_case("transformers", "tiny", 16, compile=True)
