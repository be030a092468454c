"""``python -m funcloss check``: the report a user reads to verify parity on their device."""

from __future__ import annotations

import dataclasses
import io
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from funcloss._bench import cases as bench_cases
from funcloss._bench.check import run

from .registry import DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_check_passes_and_lists_every_transform(device: str) -> None:
    out = io.StringIO()
    assert run(device, torch.float64, names=["mse_loss", "ctc_loss"], out=out) == 0
    text = out.getvalue()
    assert f"funcloss check on {device}" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("mse_loss", "ctc_loss"))}
    assert set(rows) == {"mse_loss", "ctc_loss"}
    # seven transforms, funcloss/torch in each cell; torch's CTC cannot be vmapped without a loop
    assert len(rows["ctc_loss"]) == 3 + 7
    assert all(cell.startswith("ok/") for cell in rows["ctc_loss"][3:])
    assert rows["ctc_loss"][4] == "ok/loop"
    assert "2 of 2 losses compared with torch; all match" in text


def test_check_flags_a_loss_that_disagrees_with_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    case = bench_cases.CASES["l1_loss"]
    wrong = dataclasses.replace(case, ours=lambda x, y, **kw: case.ours(x, y, **kw) * 1.01)
    monkeypatch.setitem(bench_cases.CASES, "l1_loss", wrong)
    out = io.StringIO()
    assert run("cpu", torch.float64, names=["l1_loss"], out=out) == 1
    assert "MISMATCH" in out.getvalue()
    assert "1 problem" in out.getvalue()


def test_check_says_which_losses_torch_could_not_run() -> None:
    # torch has no float16 multi_margin_loss on the CPU; funcloss's own transforms still run.
    out = io.StringIO()
    assert run("cpu", torch.float16, names=["multi_margin_loss", "mse_loss"], out=out) == 0
    text = out.getvalue()
    assert "1 of 2 losses compared with torch" in text
    assert "multi_margin_loss: NotImplementedError" in text


def test_check_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "funcloss", "check", "--loss", "huber_loss", "--dtype", "float64"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "huber_loss" in result.stdout


def test_check_under_autocast_compares_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    """``check --autocast``: inside an autocast region every loss matches torch, result dtype
    included; a loss that returned the half dtype where torch returns float32 is flagged."""
    out = io.StringIO()
    assert run("cpu", torch.bfloat16, names=["cross_entropy", "mse_loss"], autocast=True, out=out) == 0
    assert "inside torch.autocast('cpu', dtype=torch.bfloat16)" in out.getvalue()
    case = bench_cases.CASES["mse_loss"]
    half = dataclasses.replace(case, ours=lambda x, y, **kw: case.ours(x, y, **kw).to(torch.bfloat16))
    monkeypatch.setitem(bench_cases.CASES, "mse_loss", half)
    out = io.StringIO()
    assert run("cpu", torch.bfloat16, names=["mse_loss"], autocast=True, out=out) == 1
    assert "MISMATCH" in out.getvalue()


def test_check_counts_a_refusal_shared_with_torch_as_no_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch refuses binary_cross_entropy inside CUDA autocast and funcloss refuses it with the
    same exception: ``check`` reports that as agreement. A refusal of another class is a problem."""

    def refuse(exc: type[Exception]) -> Callable[..., Tensor]:
        def loss(*args: Any, **kwargs: Any) -> Tensor:
            raise exc("expected no autocast region")

        return loss

    case = bench_cases.CASES["mse_loss"]
    monkeypatch.setitem(
        bench_cases.CASES, "mse_loss", dataclasses.replace(case, ours=refuse(RuntimeError), theirs=refuse(RuntimeError))
    )
    out = io.StringIO()
    assert run("cpu", names=["mse_loss"], out=out) == 0
    assert "mse_loss: RuntimeError, as torch" in out.getvalue()
    assert "0 of 1 losses compared" in out.getvalue()
    monkeypatch.setitem(
        bench_cases.CASES, "mse_loss", dataclasses.replace(case, ours=refuse(ValueError), theirs=refuse(RuntimeError))
    )
    out = io.StringIO()
    assert run("cpu", names=["mse_loss"], out=out) == 1
    assert "not compared" in out.getvalue()


def test_check_autocast_needs_a_half_dtype() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "funcloss", "check", "--autocast", "--dtype", "float32"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "--autocast: expected --dtype float16 or bfloat16, got float32" in result.stderr


@pytest.mark.parametrize(("what", "default"), [("memory", 5), ("persample", 15), ("losses", 15)])
def test_bench_rounds_reach_every_benchmark(what: str, default: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """--rounds is passed to whichever benchmark runs (memory ignored it), and each keeps its
    own default without it; a non-positive count is a usage error."""
    from funcloss import __main__ as cli
    from funcloss._bench import memory, persample, timing

    seen: list[int] = []

    def fake(*args: object, rounds: int, **kwargs: object) -> int:
        seen.append(rounds)
        return 0

    target = {"memory": (memory, "run"), "persample": (persample, "run"), "losses": (timing, "run_losses")}[what]
    monkeypatch.setattr(*target, fake)
    assert cli.main(["bench", what, "--rounds", "2"]) == 0
    assert cli.main(["bench", what]) == 0
    assert seen == [2, default]
    with pytest.raises(SystemExit):
        cli.main(["bench", what, "--rounds", "0"])


def test_bench_memory_reports_every_method_and_its_progress(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The memory benchmark's table has a row per method with its ratios against its own
    baseline, and says on stderr where it is (a full run takes minutes). Small sizes, and the
    fresh-process RSS measurement replaced by a fixed figure."""
    from funcloss._bench import memory

    monkeypatch.setattr(memory, "_SIZES", (64, 8, 50))
    monkeypatch.setattr(memory, "_peak", lambda label: 10.0 if "funcloss" in label else 40.0)
    assert memory.run(rounds=2) == 0
    out, err = capsys.readouterr()
    n = len(memory._methods("cpu"))
    assert f"peak memory {n}/{n}" in err and "timing round 2/2" in err
    rows = {
        line.split("  ")[1].strip(): line.split()
        for line in out.splitlines()
        if line.startswith("  ") and "MiB" not in line
    }
    for label in memory._methods("cpu"):
        if label in rows:
            continue
        raise AssertionError(f"no row for {label!r} in:\n{out}")
    assert rows["func.grad: funcloss"][-2] == "0.25"  # 10 MiB against its baseline's 40
    assert rows["cross_entropy(linear(...))"][-2] == "1.00"


def test_bench_losses_compiled_column(monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench losses --compile`` adds a column timing both sides under torch.compile: each side
    is compiled (recorded here), and the column holds their ratio."""
    from funcloss._bench import timing

    seen: list[Callable[..., Tensor]] = []
    real = timing.compiled

    def recording(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        seen.append(fn)
        return real(fn)

    monkeypatch.setattr(timing, "compiled", recording)
    out = io.StringIO()
    assert timing.run_losses("cpu", rounds=1, names=["l1_loss"], compile=True, out=out) == 0
    case = bench_cases.CASES["l1_loss"]
    assert seen == [case.ours, case.theirs]
    header = next(line for line in out.getvalue().splitlines() if line.startswith("loss"))
    row = next(line for line in out.getvalue().splitlines() if line.startswith("l1_loss"))
    assert header.split()[7] == "compiled"
    assert float(row.split()[7]) > 0


@pytest.mark.parametrize("command", [["check"], ["bench", "persample"], ["bench", "memory"]])
@pytest.mark.parametrize(
    ("device", "message"),
    [("meta", "the meta device holds no values"), ("gpu0", "expected a device such as cpu or cuda")],
)
def test_device_without_values_or_unknown_is_a_usage_error(
    command: list[str], device: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from funcloss import __main__ as cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--device", device])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "--loss", "nope_loss"], "--loss: unknown loss ['nope_loss']"),
        (["bench", "--loss", "nope_loss"], "--loss: unknown loss ['nope_loss']"),
        (["bench", "persample", "--loss", "mse_loss"], "--loss: only for 'bench losses'"),
        (["bench", "memory", "--loss", "mse_loss"], "--loss: only for 'bench losses'"),
    ],
)
def test_loss_option_errors_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown loss name, or --loss where the benchmark has no per-loss rows, is refused
    before anything runs (not a traceback, not silently ignored)."""
    from funcloss import __main__ as cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_refuses_a_plot_path_in_a_missing_folder_before_training(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from funcloss import __main__ as cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--plot", str(tmp_path / "missing" / "plot.png")])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "expected a path in an existing folder" in err
    assert "training" not in out  # refused before the run, not after it


def test_bench_compile_is_for_the_losses_benchmark_only() -> None:
    from funcloss import __main__ as cli

    with pytest.raises(SystemExit):
        cli.main(["bench", "persample", "--compile"])


def test_bench_persample_memory_is_what_a_call_needs() -> None:
    """The per-sample benchmark's peak memory is that of a call, not of the lazy imports and
    torch.func initialisation a process's first call pays: `grad_stats` on the MLP needs far
    less than the B x P floats of per-sample gradients (13 MiB), and `per_sample_grads` about
    that (measured first calls: 45-52 MiB). Without Opacus installed, the BLAS library's
    one-time setup (about 3 MiB) used to count too, and grad_stats measured 6.2-7.2 MiB."""
    from funcloss._bench.persample import _setup, peak_memory_mb

    model, x, _ = _setup("mlp")
    per_sample_mib = len(x) * sum(p.numel() for p in model.parameters()) * 4 / 2**20
    assert peak_memory_mb("mlp", "funcloss grad_stats") < per_sample_mib / 2
    assert peak_memory_mb("mlp", "funcloss per_sample_grads") < per_sample_mib * 1.5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads resident memory from /proc")
def test_peak_memory_counts_what_the_call_returns() -> None:
    """A call's peak counts the tensor it returns, as the CUDA allocator's peak does, even when
    its one kernel finishes between two samples: the result is held until the last sample
    (without it, a compiled cross-entropy's 62 MiB gradient was once seen as 48 MiB)."""
    from funcloss._bench.rss import peak_extra_bytes

    size = 64 * 2**20
    peak = peak_extra_bytes(lambda: torch.ones(size // 4), interval=60.0)
    assert size <= peak < 1.25 * size, peak


def test_bench_losses_reports_page_faults_at_the_large_size() -> None:
    """The losses table has a column of page faults per call at the large size, funcloss's
    and torch's, counted from the process's minor faults (on Linux: fresh memory's first
    touch counts)."""
    import re

    from funcloss._bench import timing

    if sys.platform.startswith("linux"):
        before = timing._minor_faults()
        torch.ones(1 << 24).add_(1)  # 64 MiB of fresh pages
        assert timing._minor_faults() - before > 1000
    out = io.StringIO()
    assert timing.run_losses("cpu", rounds=1, names=["l1_loss"], out=out) == 0
    lines = out.getvalue().splitlines()
    header = next(line for line in lines if line.startswith("loss"))
    row = next(line for line in lines if line.startswith("l1_loss"))
    assert "large faults" in header
    assert re.search(r"\s\d+/\d+\s+batched$", row), row
