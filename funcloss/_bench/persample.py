"""``python -m funcloss bench persample``: per-sample gradients, as ratios to one batched backward.

Methods, timed in interleaved rounds in random order (each round's times divided by that
round's batched backward; the median over rounds is reported): a naive loop over samples, the
plain torch.func recipe (``vmap(grad(...))`` with ``functional_call``), Opacus's
``GradSampleModule`` (if installed), funcloss's `per_sample_grads` and `grad_stats`. Peak
memory is measured per method in a fresh subprocess (growth of peak RSS during one call, after
a warm-up call on two samples).
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.func as tf
import torch.nn.functional as F
from torch import Tensor, nn

import funcloss as fl

from .rss import cuda_peak_extra_bytes, sync


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(1000, 64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(self.emb(x).mean(1))
        return out


def _setup(name: str, device: str = "cpu", batch: int | None = None) -> tuple[nn.Module, Tensor, Tensor]:
    model, x, y = _setup_cpu(name)
    return model.to(device), x[:batch].to(device), y[:batch].to(device)


def _setup_cpu(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        model: nn.Module = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
        return model, torch.randn(128, 64), torch.randint(0, 10, (128,))
    if name == "cnn":  # the MNIST-size CNN of Opacus's tutorial
        model = nn.Sequential(
            nn.Conv2d(1, 16, 8, 2, padding=3),
            nn.ReLU(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2),
            nn.ReLU(),
            nn.MaxPool2d(2, 1),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )
        return model, torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    if name == "norm":  # the same CNN with GroupNorm after each convolution and a LayerNorm
        model = nn.Sequential(
            nn.Conv2d(1, 16, 8, 2, padding=3),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.MaxPool2d(2, 1),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32),
            nn.LayerNorm(32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )
        return model, torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    return _Bag(), torch.randint(0, 1000, (128, 16)), torch.randint(0, 10, (128,))


MODELS = {
    "mlp": "MLP 64-128-128-10, B=128",
    "cnn": "CNN 28x28 (Opacus tutorial), B=64",
    "bag": "Embedding+Linear, B=128",
    "norm": "CNN 28x28 with GroupNorm and LayerNorm, B=64",
}


def _methods(name: str, device: str = "cpu", batch: int | None = None) -> dict[str, Callable[[], object]]:
    """The timed methods on model ``name``'s inputs (the first ``batch`` samples of them)."""
    model, x, y = _setup(name, device, batch)
    params = list(model.parameters())

    def batched() -> object:
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    def loop() -> object:
        return [torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params) for i in range(len(x))]

    detached = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(tf.functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    recipe_fn = tf.vmap(tf.grad(one), in_dims=(None, 0, 0))

    def recipe() -> object:
        return recipe_fn(detached, x, y)

    methods: dict[str, Callable[[], object]] = {
        "batched backward": batched,
        "naive loop": loop,
        "torch.func recipe": recipe,
    }
    try:
        from opacus import GradSampleModule

        wrapped = GradSampleModule(_setup(name, device)[0])
        wrapped_params = [p for p in wrapped.parameters() if p.requires_grad]

        def opacus() -> object:
            for p in wrapped_params:
                p.grad_sample = None
                p.grad = None
            F.cross_entropy(wrapped(x), y).backward()  # type: ignore[no-untyped-call]
            return [p.grad_sample for p in wrapped_params]

        methods["Opacus GradSampleModule"] = opacus
    except ImportError:
        pass
    methods["funcloss per_sample_grads"] = lambda: fl.per_sample_grads(model, fl.cross_entropy, x, y)
    methods["funcloss grad_stats"] = lambda: fl.grad_stats(model, fl.cross_entropy, x, y)  # default chunk
    return methods


def _time(fn: Callable[[], object], reps: int, device: str = "cpu") -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def ratios(name: str, rounds: int, device: str = "cpu") -> dict[str, float]:
    methods = _methods(name, device)
    reps = {}
    for label, fn in methods.items():
        fn()
        once = _time(fn, 1, device)
        reps[label] = max(1, min(50, int(0.05 / max(once, 1e-6))))
    per_round: dict[str, list[float]] = {label: [] for label in methods}
    for _ in range(rounds):
        order = list(methods)
        random.shuffle(order)
        times = {label: _time(methods[label], reps[label], device) for label in order}
        for label in methods:
            per_round[label].append(times[label] / times["batched backward"])
    return {label: statistics.median(r) for label, r in per_round.items()}


# The method runs once on two samples first: its first call imports modules and initialises
# torch.func lazily (30-70 MiB, depending on what was imported before), which is not memory the
# method needs per call. The warm-up's own buffers are small and freed. Before it, one 128 x 128
# matmul: a process's first matmul large enough for the BLAS library's threaded path sets up
# that library's buffers (about 3 MiB, once per process; the two-sample warm-up's matmuls are
# too small to), which every method would otherwise count, or not, depending on what the
# process imported before (Opacus's import does it).
_MEMORY_SCRIPT = """
import sys, warnings
warnings.simplefilter("ignore")
import torch
from funcloss._bench.persample import _methods
from funcloss._bench.rss import peak_extra_bytes
torch.randn(128, 128) @ torch.randn(128, 128)  # the BLAS library's one-time setup (about 3 MiB)
_methods(sys.argv[1], batch=2)[sys.argv[2]]()
fn = _methods(sys.argv[1])[sys.argv[2]]
print(peak_extra_bytes(fn))
"""


def peak_memory_mb(name: str, method: str, device: str = "cpu") -> float:
    """Peak memory growth (MiB) during one call of ``method``: on the CPU, of the peak RSS of a
    fresh process; on CUDA, of the caching allocator's peak allocation."""
    if device.startswith("cuda"):
        return cuda_peak_extra_bytes(_methods(name, device)[method]) / 2**20
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, name, method], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1]) / 2**20


def run(rounds: int = 15, memory: bool = True, device: str = "cpu") -> int:
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"funcloss bench persample on {device} (torch {torch.__version__}, {where})")
    print("time / time of one batched forward+backward in the same round, median of interleaved rounds")
    for name, title in MODELS.items():
        result = ratios(name, rounds, device)
        print(f"\n{title}")
        print(f"  {'method':<28} {'time ratio':>10}" + (f" {'peak extra MiB':>15}" if memory else ""))
        for label, r in result.items():
            mem = f" {peak_memory_mb(name, label, device):>15.1f}" if memory else ""
            print(f"  {label:<28} {r:>10.2f}{mem}", flush=True)
    return 0
