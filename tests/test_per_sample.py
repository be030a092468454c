"""Per-sample gradients, streamed statistics and sign inspection against their definitions."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Literal

import pytest
import torch
from torch import Tensor, nn

import funcloss as fl
import funcloss._moments as moments

D = torch.float64


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x))
        out: Tensor = self.fc(nn.functional.max_pool2d(h, 2).flatten(1))
        return out


class Bag(nn.Module):
    """Embedding + Linear: token ids -> class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(self.emb(x).mean(1))
        return out


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _setup(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return _mlp().double(), torch.randn(11, 5, generator=g, dtype=D), torch.randint(0, 3, (11,), generator=g)
    if kind == "cnn":
        return (
            SmallCNN().double(),
            torch.randn(7, 1, 8, 8, generator=g, dtype=D),
            torch.randint(0, 4, (7,), generator=g),
        )
    return Bag().double(), torch.randint(0, 20, (9, 5), generator=g), torch.randint(0, 3, (9,), generator=g)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "cross_entropy": fl.cross_entropy,
    "smoothed_ce": functools.partial(fl.cross_entropy, label_smoothing=0.2),
    "multi_margin": fl.multi_margin_loss,
}


def _loop(model: nn.Module, loss: Callable[..., Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients of the trainable parameters by a loop of single-sample backwards."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = [torch.autograd.grad(loss(model(x[i : i + 1]), y[i : i + 1]), [p for _, p in named]) for i in range(len(x))]
    return {n: torch.stack([r[k] for r in rows]) for k, (n, _) in enumerate(named)}


def _assert_stats_match(s: fl.GradStats, expected: dict[str, Tensor]) -> None:
    """Every statistic in ``s`` against its definition over the per-sample gradients."""
    flat = torch.cat([v.flatten(1) for v in expected.values()], dim=1)
    assert list(s.mean) == list(expected)
    for name, v in expected.items():
        torch.testing.assert_close(s.mean[name], v.mean(0))
        torch.testing.assert_close(s.variance[name], v.var(0))
        torch.testing.assert_close(s.sign_sum[name], v.sign().sum(0))
        torch.testing.assert_close(s.zeros[name], (v == 0).sum(0).to(v.dtype))
    torch.testing.assert_close(s.sq_norms, (flat**2).sum(1))
    torch.testing.assert_close(s.coherence, flat.sum(0).pow(2).sum() / (flat**2).sum())


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("kind", ["mlp", "cnn", "bag"])
def test_per_sample_grads_match_a_loop(kind: str, loss: str, chunk: int | None) -> None:
    model, x, y = _setup(kind)
    ours = fl.per_sample_grads(model, LOSSES[loss], x, y, chunk_size=chunk)
    expected = _loop(model, LOSSES[loss], x, y)
    assert list(ours) == list(expected)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "bag"])
def test_grad_stats_match_their_definitions(kind: str, chunk: int) -> None:
    model, x, y = _setup(kind)
    g = _loop(model, fl.cross_entropy, x, y)
    s = fl.grad_stats(model, fl.cross_entropy, x, y, chunk_size=chunk)
    assert s.count == len(x)
    flat = torch.cat([v.reshape(len(x), -1) for v in g.values()], dim=1)
    for name, v in g.items():
        torch.testing.assert_close(s.mean[name], v.mean(0))
        torch.testing.assert_close(s.variance[name], v.var(0, unbiased=True))
        torch.testing.assert_close(s.sign_agreement[name], v.sign().mean(0).abs())
        torch.testing.assert_close(s.zeros[name], (v == 0).sum(0).to(D))
        # Untouched parameters (unused embedding rows) have 0 / 0: NaN on both sides.
        torch.testing.assert_close(s.gsnr[name], v.mean(0) ** 2 / v.var(0), equal_nan=True)
    torch.testing.assert_close(s.sq_norms, (flat**2).sum(1))
    torch.testing.assert_close(s.coherence, flat.sum(0).pow(2).sum() / (flat**2).sum())


@pytest.mark.parametrize("chunk", [256, 100])
def test_grad_stats_in_float32_keeps_float32_accuracy(chunk: int) -> None:
    """One chunk sums in float32 and forms the variance there; several chunks keep float64
    totals. Either way, with gradients whose mean is several times their spread (where
    sum-of-squares variances lose digits), float32 statistics stay within float32 accuracy of a
    float64 run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(256, 16) + 3.0, torch.zeros(256, dtype=torch.long)
    reference = fl.grad_stats(model.double(), fl.cross_entropy, x.double(), y, chunk_size=chunk)
    stats = fl.grad_stats(model.float(), fl.cross_entropy, x, y, chunk_size=chunk)
    for name, v in reference.variance.items():
        assert stats.mean[name].dtype == torch.float32
        torch.testing.assert_close(stats.mean[name].double(), reference.mean[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats.variance[name].double(), v, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("method", ["auto", "vmap", "loop"])
def test_grad_stats_default_chunk_follows_the_memory_budget(
    method: Literal["auto", "vmap", "loop"], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default chunk is the budget over (P + 16 x sample size) samples, at least 1; an
    explicit chunk_size must be at least 1."""
    from funcloss import _per_sample

    model, x, y = _setup("mlp")
    n, per_sample = len(x), sum(p.numel() for p in model.parameters()) + 16 * x[0].numel()
    monkeypatch.setattr(_per_sample, "_CHUNK_ELEMENTS", 3 * per_sample + 1)  # 3 samples per chunk
    chunked = fl.grad_stats(model, fl.cross_entropy, x, y, progress=True, method=method)
    ends = [int(m.split("/")[0]) for m in capsys.readouterr().err.split("grad_stats: ")[1:]]
    assert ends == [*range(3, n, 3), n]
    whole = fl.grad_stats(model, fl.cross_entropy, x, y, chunk_size=n, method=method)
    for name in whole.mean:
        torch.testing.assert_close(chunked.mean[name], whole.mean[name])
        torch.testing.assert_close(chunked.variance[name], whole.variance[name])
    monkeypatch.setattr(_per_sample, "_CHUNK_ELEMENTS", 1)  # fewer than P: one sample per chunk
    fl.grad_stats(model, fl.cross_entropy, x[:2], y[:2], progress=True, method=method)
    assert [int(m.split("/")[0]) for m in capsys.readouterr().err.split("grad_stats: ")[1:]] == [1, 2]
    with pytest.raises(ValueError, match="chunk_size >= 1"):
        fl.grad_stats(model, fl.cross_entropy, x, y, chunk_size=0)


def test_grad_stats_over_groups_use_group_means() -> None:
    model, x, y = _setup("mlp")
    groups = torch.tensor([0, 1, 1, 2, 0, 2, 2, 1, 0, 0, 1])
    g = _loop(model, fl.cross_entropy, x, y)
    s = fl.grad_stats(model, fl.cross_entropy, x, y, groups=groups, chunk_size=4)
    assert s.count == 3
    for name, v in g.items():
        means = torch.stack([v[groups == k].mean(0) for k in range(3)])
        torch.testing.assert_close(s.mean[name], means.mean(0))
        torch.testing.assert_close(s.variance[name], means.var(0))
        torch.testing.assert_close(s.sign_agreement[name], means.sign().mean(0).abs())


class Masked(nn.Module):
    """Token ids and a padding mask (two inputs) -> class scores; with ``norm`` a LayerNorm,
    which the per-layer path does not cover (so the vmap path runs)."""

    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.norm = nn.LayerNorm(6) if norm else nn.Identity()
        self.fc = nn.Linear(6, 3)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        pooled = (self.emb(ids) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        out: Tensor = self.fc(self.norm(pooled))
        return out


def _masked(norm: bool) -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 20, (9, 5), generator=g), torch.randint(0, 3, (9,), generator=g)
    mask = (torch.rand(9, 5, generator=g) < 0.7).to(D)
    weights = torch.rand(9, generator=g, dtype=D)
    return Masked(norm).double(), ids, mask, labels, weights


def _weighted_ce(out: Tensor, target: tuple[Tensor, Tensor]) -> Tensor:
    """A loss whose target is a pair: labels and a weight per sample."""
    labels, weights = target
    return (fl.cross_entropy(out, labels, reduction="none") * weights).mean()


def _loop_several(
    model: nn.Module, loss: Callable[..., Tensor], inputs: tuple[Tensor, ...], target: Callable[[int], object]
) -> dict[str, Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = [
        torch.autograd.grad(loss(model(*(t[i : i + 1] for t in inputs)), target(i)), [p for _, p in named])
        for i in range(len(inputs[0]))
    ]
    return {n: torch.stack([r[k] for r in rows]) for k, (n, _) in enumerate(named)}


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("norm", [False, True], ids=["layers", "layernorm"])
@pytest.mark.parametrize("packing", ["tuple", "mapping"])
def test_models_of_several_inputs_and_targets(packing: str, norm: bool, method: Literal["auto", "vmap"]) -> None:
    """Inputs as a tuple (``model(*inputs)``) or a mapping (``model(**inputs)``), and a pair of
    targets, on the per-layer and the vmap paths: per-sample gradients and statistics against a
    loop of single-sample backwards."""
    model, ids, mask, labels, weights = _masked(norm)
    inputs: tuple[Tensor, ...] | dict[str, Tensor] = (ids, mask) if packing == "tuple" else {"ids": ids, "mask": mask}
    expected = _loop_several(model, fl.cross_entropy, (ids, mask), lambda i: labels[i : i + 1])
    ours = fl.per_sample_grads(model, fl.cross_entropy, inputs, labels, method=method)
    assert list(ours) == list(expected)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-10, atol=1e-12)
    for chunk in (4, None):
        stats = fl.grad_stats(model, fl.cross_entropy, inputs, labels, chunk_size=chunk, method=method)
        _assert_stats_match(stats, expected)

    paired = _loop_several(model, _weighted_ce, (ids, mask), lambda i: (labels[i : i + 1], weights[i : i + 1]))
    ours = fl.per_sample_grads(model, _weighted_ce, inputs, (labels, weights), method=method, chunk_size=4)
    for name in paired:
        torch.testing.assert_close(ours[name], paired[name], rtol=1e-10, atol=1e-12)
    _assert_stats_match(fl.grad_stats(model, _weighted_ce, inputs, (labels, weights), method=method), paired)

    groups = torch.tensor([0, 1, 1, 2, 0, 2, 2, 1, 0])
    by_group = fl.grad_stats(model, fl.cross_entropy, inputs, labels, groups=groups, chunk_size=4)
    _assert_stats_match(
        by_group, {k: torch.stack([v[groups == g].mean(0) for g in range(3)]) for k, v in expected.items()}
    )


def test_gradient_conflicts_through_a_model_of_several_inputs() -> None:
    model, ids, mask, labels, _ = _masked(norm=True)
    terms: dict[str, Callable[..., Tensor]] = {"ce": fl.cross_entropy, "margin": fl.multi_margin_loss}
    mix = fl.loss_sum(terms)
    params = {k: v.detach() for k, v in model.named_parameters()}
    c = fl.gradient_conflicts(fl.model_terms(model, mix), params, {"ids": ids, "mask": mask}, labels)
    margin = torch.autograd.grad(fl.multi_margin_loss(model(ids, mask), labels), list(model.parameters()))
    for k, (name, _) in enumerate(model.named_parameters()):
        torch.testing.assert_close(c.grads["margin"][name], margin[k])


def test_several_inputs_are_checked() -> None:
    model, ids, mask, labels, _ = _masked(norm=False)
    with pytest.raises(ValueError, match=r"same batch size on dim 0, got shapes \(9, 5\), \(8, 5\), \(9,\)"):
        fl.per_sample_grads(model, fl.cross_entropy, (ids, mask[:8]), labels)
    with pytest.raises(TypeError, match="expected inputs made of Tensors, got int"):
        fl.grad_stats(model, fl.cross_entropy, (ids, 3), labels)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected targets as a Tensor, a tuple.*got ndarray"):
        fl.per_sample_grads(model, fl.cross_entropy, (ids, mask), labels.numpy())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected targets made of Tensors, got int"):
        fl.per_sample_grads(model, fl.cross_entropy, (ids, mask), labels.tolist())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected inputs made of Tensors, got none"):
        fl.per_sample_grads(model, fl.cross_entropy, (), labels)
    # A list is taken as a tuple.
    ours = fl.per_sample_grads(model, fl.cross_entropy, [ids, mask], labels)  # type: ignore[arg-type]
    expected = _loop_several(model, fl.cross_entropy, (ids, mask), lambda i: labels[i : i + 1])
    torch.testing.assert_close(ours["fc.weight"], expected["fc.weight"])


def test_model_is_left_untouched() -> None:
    model, x, y = _setup("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fl.per_sample_grads(model, fl.cross_entropy, x, y)
    fl.grad_stats(model, fl.cross_entropy, x, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_batchnorm_in_training_mode_is_refused_with_advice() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=D), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"BatchNorm1d.*mixes the batch.*eval\(\).*GroupNorm"):
        fl.per_sample_grads(model, fl.cross_entropy, x, y)
    model.eval()
    ours = fl.per_sample_grads(model, fl.cross_entropy, x, y)
    expected = _loop(model, fl.cross_entropy, x, y)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name])


def test_dropout_follows_the_randomness_option() -> None:
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 5, dtype=D), torch.randint(0, 3, (6,))
    fl.per_sample_grads(model, fl.cross_entropy, x, y)  # "different" by default
    with pytest.raises(RuntimeError, match="randomness"):
        fl.per_sample_grads(model, fl.cross_entropy, x, y, randomness="error")


def test_bad_batches_are_refused() -> None:
    model, x, y = _setup("mlp")
    with pytest.raises(ValueError, match="same batch size"):
        fl.per_sample_grads(model, fl.cross_entropy, x, y[:3])
    with pytest.raises(ValueError, match="integer groups"):
        fl.grad_stats(model, fl.cross_entropy, x, y, groups=torch.zeros(11))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"per_sample_grads\(...\): expected a model with trainable parameters"):
        fl.per_sample_grads(model, fl.cross_entropy, x, y)
    with pytest.raises(ValueError, match=r"grad_stats\(...\): expected a model with trainable parameters"):
        fl.grad_stats(model, fl.cross_entropy, x, y)


def test_per_sample_grad_transform_on_a_params_dict() -> None:
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 2, generator=g, dtype=D), "b": torch.zeros(2, dtype=D)}
    xs, ys = torch.randn(5, 4, generator=g, dtype=D), torch.randn(5, 2, generator=g, dtype=D)

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return fl.huber_loss(x @ p["w"] + p["b"], y)

    grads = fl.per_sample_grad(loss)(params, xs, ys)
    for i in range(5):
        w = params["w"].clone().requires_grad_(True)
        b = params["b"].clone().requires_grad_(True)
        gw, gb = torch.autograd.grad(loss({"w": w, "b": b}, xs[i], ys[i]), (w, b))
        torch.testing.assert_close(grads["w"][i], gw)
        torch.testing.assert_close(grads["b"][i], gb)
    # Both arguments, by position, chunked.
    gx = fl.per_sample_grad(loss, argnums=1, in_dims=(None, 0, 0), chunk_size=2)(params, xs, ys)
    assert gx.shape == xs.shape


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 9])
def test_per_sample_grad_in_chunks_is_the_whole_batch(chunk_size: int) -> None:
    """Chunked (sizes dividing the batch or not, or past it), the transform gives the unchunked
    gradients: a params dict, a batched pytree argument, a batch on another dim, a shared
    argument; in-dims given as a pytree go to vmap's own chunking. chunk_size < 1 is refused."""
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 2, generator=g, dtype=D), "b": torch.randn(2, generator=g, dtype=D)}
    xs = (torch.randn(5, 4, generator=g, dtype=D), torch.randn(4, 5, generator=g, dtype=D))
    ys, scale = torch.randn(5, 2, generator=g, dtype=D), torch.tensor(0.5, dtype=D)

    def loss(p: dict[str, Tensor], x: tuple[Tensor, Tensor], y: Tensor, c: Tensor) -> Tensor:
        return fl.mse_loss((x[0] + c * x[1]) @ p["w"] + p["b"], y)

    transposed = ((0, 1), 0, None)
    whole = fl.per_sample_grad(loss, in_dims=(None, *transposed))(params, xs, ys, scale)
    chunked = fl.per_sample_grad(loss, in_dims=(None, *transposed), chunk_size=chunk_size)(params, xs, ys, scale)
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k])
    plain_xs = (xs[0], xs[1].T.contiguous())
    whole = fl.per_sample_grad(loss, in_dims=(None, 0, 0, None))(params, plain_xs, ys, scale)
    chunked = fl.per_sample_grad(loss, in_dims=(None, 0, 0, None), chunk_size=chunk_size)(params, plain_xs, ys, scale)
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k])
    with pytest.raises(ValueError, match="chunk_size >= 1"):
        fl.per_sample_grad(loss, chunk_size=0)


def test_per_sample_grad_in_chunks_holds_the_result_once() -> None:
    """The transform in chunks: peak RSS growth about the result's B x P floats (vmap's own
    chunking would hold the chunks and then their concatenation, twice that)."""
    script = textwrap.dedent(
        """
        import resource, torch
        import funcloss as fl
        torch.manual_seed(0)
        params = {"w1": torch.randn(256, 256), "w2": torch.randn(256, 4)}
        x, y = torch.randn(512, 256), torch.randint(0, 4, (512,))
        def loss(p, x, y):
            return fl.cross_entropy(torch.tanh(x @ p["w1"]) @ p["w2"], y)
        fn = fl.per_sample_grad(loss, chunk_size=16)
        fn(params, x[:16], y[:16])  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        grads = fn(params, x, y)
        size = sum(g.numel() * g.element_size() for g in grads.values()) // 1024
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, size)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown, result = map(int, out.stdout.split())  # KiB
    assert grown <= 1.3 * result, (grown, result)


# ---------------------------------------------------------------- signs


def test_sign_agreement_and_and_mask_definitions() -> None:
    g = {"w": torch.tensor([[1.0, -2.0, 0.0, 3.0], [2.0, 1.0, 0.0, 1.0], [0.5, -1.0, 1.0, -1.0], [1.0, 2.0, 0.0, 1.0]])}
    agreement = fl.sign_agreement(g)["w"]
    torch.testing.assert_close(agreement, torch.tensor([1.0, 0.0, 0.25, 0.5]))
    mask = fl.and_mask(g, 0.5)["w"]
    torch.testing.assert_close(mask, torch.tensor([1.125, 0.0, 0.0, 1.0]))
    rescaled = fl.and_mask(g, 0.5, rescale=True)["w"]
    torch.testing.assert_close(rescaled, mask * 2)
    with pytest.raises(ValueError, match="threshold in"):
        fl.and_mask(g, 1.5)


def test_sign_functions_accept_grad_stats() -> None:
    model, x, y = _setup("mlp")
    s = fl.grad_stats(model, fl.cross_entropy, x, y)
    g = _loop(model, fl.cross_entropy, x, y)
    for name in g:
        torch.testing.assert_close(fl.sign_agreement(s)[name], fl.sign_agreement(g)[name])
        torch.testing.assert_close(fl.and_mask(s, 0.3)[name], fl.and_mask(g, 0.3)[name])
    report = str(fl.sign_report(s))
    assert "0.weight" in report and "GSNR" in report


def test_grad_stats_from_grads_at_hand_matches_the_definitions() -> None:
    """`GradStats.from_grads` of per-sample gradients: each statistic against its definition
    over the sample axis, and the same as `grad_stats` of the model."""
    model, x, y = _setup("mlp")
    g = _loop(model, fl.cross_entropy, x, y)
    g["0.weight"][:3] = 0.0  # exact zeros, counted apart
    s = fl.GradStats.from_grads(g)
    assert s.count == x.size(0)
    flat = torch.cat([v.reshape(v.size(0), -1) for v in g.values()], 1)
    for name, v in g.items():
        torch.testing.assert_close(s.mean[name], v.mean(0))
        torch.testing.assert_close(s.variance[name], v.var(0, unbiased=True))
        torch.testing.assert_close(s.sign_sum[name], v.sign().sum(0))
        torch.testing.assert_close(s.zeros[name], (v == 0).sum(0).to(v.dtype))
    torch.testing.assert_close(s.sq_norms, (flat**2).sum(1))
    torch.testing.assert_close(s.sum_sq_norm, (flat.sum(0) ** 2).sum())
    from_model = fl.grad_stats(model, fl.cross_entropy, x, y)
    untouched = fl.GradStats.from_grads(_loop(model, fl.cross_entropy, x, y))
    for name in g:
        torch.testing.assert_close(untouched.variance[name], from_model.variance[name])
    with pytest.raises(ValueError, match="one B >= 1"):
        fl.GradStats.from_grads({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="got none"):
        fl.GradStats.from_grads({})


def test_sign_report_takes_per_sample_gradients_too() -> None:
    """The report of per-sample gradients is the report of their statistics."""
    model, x, y = _setup("mlp")
    g = _loop(model, fl.cross_entropy, x, y)
    from_grads = fl.sign_report(g).rows
    from_stats = fl.sign_report(fl.grad_stats(model, fl.cross_entropy, x, y)).rows
    assert [r["name"] for r in from_grads] == list(g)
    for a, b in zip(from_grads, from_stats):
        assert a["shape"] == b["shape"]
        for key in ("positive", "negative", "zero", "agreement", "gsnr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["name"], key)


def test_printed_tables_keep_long_names_whole_and_aligned() -> None:
    """Deep models have long parameter names (``encoder.layers.11.self_attn.out_proj.weight``)
    and shapes; the printed report and conflict table show them in full, columns aligned."""
    name = "encoder.layers.11.self_attn.out_proj.weight"
    g = {name: torch.randn(4, 3, 2, 5, 7, dtype=D), "b": torch.randn(4, 3, dtype=D)}
    rows = [
        {
            "name": k,
            "shape": tuple(v.shape[1:]),
            "positive": 0.5,
            "negative": 0.5,
            "zero": 0.0,
            "agreement": 0.1,
            "gsnr": 0.2,
        }
        for k, v in g.items()
    ]
    lines = str(fl.SignReport(rows)).splitlines()
    assert lines[2].startswith(name + " ") and "(3, 2, 5, 7)" in lines[2]
    assert len({len(line) for line in lines}) == 1  # every row as wide as the header: aligned
    long_terms = {"reconstruction_loss": lambda p: p["w"].sum(), "kl_divergence_term": lambda p: -p["w"].sum()}
    table = str(fl.gradient_conflicts(long_terms, {"w": torch.ones(3, dtype=D)})).splitlines()
    assert "reconstruction_loss" in table[1] and "kl_divergence_term" in table[1]
    assert len({len(line) for line in table[1:]}) == 1


def test_gradient_conflicts_between_terms() -> None:
    a = torch.tensor([1.0, -2.0, 0.0, 3.0], dtype=D)
    params = {"w": torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=D)}
    terms = {
        "pull": lambda p: (p["w"] * a).sum(),
        "push": lambda p: -(p["w"] * a).sum(),
        "other": lambda p: (p["w"] * torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=D)).sum(),
    }
    c = fl.gradient_conflicts(terms, params)
    torch.testing.assert_close(c.cosine[0, 1], torch.tensor(-1.0, dtype=D))
    torch.testing.assert_close(c.sign_disagreement[0, 1], torch.tensor(0.75, dtype=D))
    expected = float((a @ torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=D)) / (a.norm() * 3**0.5))
    assert c.cosine[0, 2].item() == pytest.approx(expected)
    assert c.conflicting_pairs()[0][:2] == ("pull", "push")
    assert "cosine" in str(c)


def test_gradient_conflicts_of_a_loss_sum_through_a_model() -> None:
    model, x, y = _setup("mlp")
    terms: dict[str, Callable[..., Tensor]] = {"ce": fl.cross_entropy, "margin": fl.multi_margin_loss}
    mix = fl.loss_sum(terms, weights={"margin": 0.5})
    params = {k: v.detach() for k, v in model.named_parameters()}
    c = fl.gradient_conflicts(fl.model_terms(model, mix), params, x, y)
    (g_ce,) = [torch.autograd.grad(fl.cross_entropy(model(x), y), list(model.parameters()))]
    for k, (name, _) in enumerate(model.named_parameters()):
        torch.testing.assert_close(c.grads["ce"][name], g_ce[k])
    margin = torch.autograd.grad(0.5 * fl.multi_margin_loss(model(x), y), list(model.parameters()))
    for k, (name, _) in enumerate(model.named_parameters()):
        torch.testing.assert_close(c.grads["margin"][name], margin[k])


def test_grad_stats_memory_does_not_grow_with_the_batch() -> None:
    """Peak RSS at B=1024 within 10% of B=256 (holding B x P gradients would quadruple it)."""
    script = textwrap.dedent(
        """
        import resource, sys, torch
        import funcloss as fl
        torch.manual_seed(0)
        n = int(sys.argv[1])
        model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Tanh(), torch.nn.Linear(512, 10))
        x, y = torch.randn(n, 512), torch.randint(0, 10, (n,))
        fl.grad_stats(model, fl.cross_entropy, x[:32], y[:32], chunk_size=32)  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fl.grad_stats(model, fl.cross_entropy, x, y, chunk_size=32)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, before)
        """
    )

    def peak(n: int) -> int:
        out = subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[0])

    small, large = peak(256), peak(1024)
    # B x P for B = 1024 would be 1024 * 267k * 4 bytes ~ 1 GiB more than the 256 case.
    assert large <= small * 1.10, (small, large)


@pytest.mark.parametrize("method", ["auto", "vmap", "loop"])
def test_per_sample_grads_in_chunks_report_progress(
    method: Literal["auto", "vmap", "loop"], capsys: pytest.CaptureFixture[str]
) -> None:
    """Chunks give the same gradients as one call, a progress update per chunk, and a chunk
    size below 1 is refused."""
    model, x, y = _setup("mlp")
    whole = fl.per_sample_grads(model, fl.cross_entropy, x, y, method=method)
    chunked = fl.per_sample_grads(model, fl.cross_entropy, x, y, chunk_size=4, method=method, progress=True)
    ends = [int(m.split("/")[0]) for m in capsys.readouterr().err.split("per_sample_grads: ")[1:]]
    assert ends == [4, 8, 11]
    for name, v in whole.items():
        torch.testing.assert_close(chunked[name], v)
    with pytest.raises(ValueError, match="chunk_size >= 1"):
        fl.per_sample_grads(model, fl.cross_entropy, x, y, chunk_size=0, method=method)


def test_per_sample_grads_in_chunks_hold_the_result_once() -> None:
    """The vmap path in chunks: peak RSS growth about the result's B x P floats (vmap's own
    chunking would hold the chunks and then their concatenation, twice that)."""
    script = textwrap.dedent(
        """
        import resource, sys, torch
        import funcloss as fl
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))
        x, y = torch.randn(512, 256), torch.randint(0, 4, (512,))
        fl.per_sample_grads(model, fl.cross_entropy, x[:16], y[:16], chunk_size=16, method="vmap")  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        grads = fl.per_sample_grads(model, fl.cross_entropy, x, y, chunk_size=16, method="vmap")
        size = sum(g.numel() * g.element_size() for g in grads.values()) // 1024
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, size)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown, result = map(int, out.stdout.split())  # KiB
    assert grown <= 1.3 * result, (grown, result)


def test_sample_disagreement_definition() -> None:
    g = {
        "w": torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, -1.0, 1.0]]),
        "b": torch.tensor([[2.0], [3.0], [1.0], [0.0]]),
    }
    # Consensus at threshold 0.5: w[0], w[1] (3 of 4 positive), w[2] (3 of 4 positive); b: 3 of 4
    # positive, one zero (an abstention, never "against").
    out = fl.sample_disagreement(g, threshold=0.5)
    torch.testing.assert_close(out, torch.tensor([1 / 4, 0.0, 0.0, 2 / 4]))
    with pytest.raises(ValueError, match="threshold in"):
        fl.sample_disagreement(g, threshold=2.0)


def test_demo_finds_the_flipped_labels(tmp_path: object) -> None:
    import io

    from funcloss._demo import run

    out = io.StringIO()
    assert run(steps=120, plot=None, out=out) == 0
    text = out.getvalue()
    assert "per-layer gradient signs" in text and "GSNR" in text
    # The baseline is the entropy of the class counts it prints; the last skill follows from it.
    counts = torch.tensor([int(c) for c in text.split("class counts [")[1].split("]")[0].split(", ")])
    freq = counts / counts.sum()
    entropy = float(-(freq * freq.log()).sum())
    assert f"costs {entropy:.4f} nats" in text, text
    last = text.split("step 120/120")[1].split("\n")[0]
    loss, skill = float(last.split("loss ")[1].split()[0]), float(last.split("skill ")[1].split()[0])
    assert skill == pytest.approx(1 - loss / entropy, abs=0.006) and 0 < skill < 1
    found = int(text.split(" of these ")[0].rsplit("\n", 1)[-1])
    assert found >= 6, text  # 12 flipped labels among 600: chance finds 0.2 of them


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))],
)
@pytest.mark.parametrize("kind", ["cnn", "bag", "sequence", "image", "several inputs"])
def test_per_sample_and_stats_on_each_device(device: str, kind: str) -> None:
    """Every per-layer rule (convolutions, embeddings, normalisations, several inputs) on each
    device, against a loop there."""
    inputs: Tensor | tuple[Tensor, Tensor]
    if kind in ("sequence", "image"):
        model, x = _normed(kind)
        y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(6))
    elif kind == "several inputs":
        model, ids, mask, y, _ = _masked(norm=False)
        x = ids
    else:
        model, x, y = _setup(kind)
    model, x, y = model.to(device), x.to(device), y.to(device)
    if kind == "several inputs":
        inputs = (x, mask.to(device))
        expected = _loop_several(model, fl.cross_entropy, inputs, lambda i: y[i : i + 1])
    else:
        inputs = x
        expected = _loop(model, fl.cross_entropy, x, y)
    grads = fl.per_sample_grads(model, fl.cross_entropy, inputs, y, chunk_size=3)
    for name in expected:
        assert grads[name].device.type == device
        torch.testing.assert_close(grads[name], expected[name])
    stats = fl.grad_stats(model, fl.cross_entropy, inputs, y, chunk_size=4)
    _assert_stats_match(stats, expected)


class SeqModel(nn.Module):
    """Embedding with padding, a Linear on (B, T, D) sequences, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(15, 4, padding_idx=0)
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(torch.tanh(self.mix(self.emb(x))).mean(1))
        return out


class WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.out(self.norm(self.fc(x)))
        return out


@pytest.mark.parametrize("kind", ["seq", "norm", "shared"])
def test_layer_moments_agree_with_per_sample_gradients(kind: str) -> None:
    """The per-layer-moment path (or its fallback) against a loop of single-sample gradients."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    model: nn.Module
    if kind == "seq":
        model = SeqModel().double()
        x = torch.randint(0, 15, (9, 6), generator=g)
        x[:, -2:] = 0  # padding tokens
    elif kind == "norm":
        model, x = WithNorm().double(), torch.randn(9, 5, generator=g, dtype=D)
    else:
        layer = nn.Linear(5, 5)
        model, x = (
            nn.Sequential(layer, nn.Tanh(), layer, nn.Linear(5, 3)).double(),
            torch.randn(9, 5, generator=g, dtype=D),
        )
    y = torch.randint(0, 3, (9,), generator=g)
    expected = _loop(model, fl.cross_entropy, x, y)
    for method in ("auto", "vmap"):
        grads = fl.per_sample_grads(model, fl.cross_entropy, x, y, chunk_size=4, method=method)
        assert list(grads) == list(expected)
        for name, v in expected.items():
            torch.testing.assert_close(grads[name], v)
        _assert_stats_match(fl.grad_stats(model, fl.cross_entropy, x, y, chunk_size=4, method=method), expected)
    with pytest.raises(ValueError, match="method"):
        fl.grad_stats(model, fl.cross_entropy, x, y, method="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method"):
        fl.per_sample_grads(model, fl.cross_entropy, x, y, method="fast")  # type: ignore[arg-type]


class Sequence1d(nn.Module):
    """Conv1d, GroupNorm, BatchNorm1d (eval), a bias-free LayerNorm and Linear on (b, C, L)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.bn = nn.BatchNorm1d(4)
        self.ln = nn.LayerNorm(4, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(torch.tanh(self.gn(self.conv(x))))
        out: Tensor = self.fc(self.ln(h.transpose(1, 2)).mean(1))
        return out


def _normed(kind: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    model: nn.Module
    if kind == "sequence":
        model, x = Sequence1d(), torch.randn(9, 2, 11, generator=g, dtype=D)
        model.gn.bias.requires_grad_(False)  # a frozen leaf beside a trainable one
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.GroupNorm(2, 4),
            nn.LayerNorm([4, 6, 6]),  # normalised over several dims
            nn.Flatten(),
            nn.Linear(144, 3),
        )
        x = torch.randn(7, 1, 6, 6, generator=g, dtype=D)
    model = model.double().eval()
    for m in model.modules():  # running statistics away from (0, 1), affine maps away from (1, 0)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.normal_(generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            with torch.no_grad():
                m.weight.normal_(generator=g)
                if m.bias is not None:
                    m.bias.normal_(generator=g)
    return model, x


@pytest.mark.parametrize("chunk", [4, None])
@pytest.mark.parametrize("kind", ["sequence", "image"])
def test_normalisation_and_conv1d_layers_take_the_per_layer_path(kind: str, chunk: int | None) -> None:
    """LayerNorm (over one or several dims, with or without bias), GroupNorm, BatchNorm in eval
    mode and Conv1d get their per-sample gradients from the batched forward and backward (the
    per-layer path answers, not the vmap fallback), against a loop of single-sample backwards."""
    from funcloss._moments import layer_grads, layer_moments

    model, x = _normed(kind)
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(6))
    expected = _loop(model, fl.cross_entropy, x, y)
    size = chunk or len(x)
    grads = layer_grads(model, fl.cross_entropy, x, y, chunk_size=size, loss_kwargs={})
    assert grads is not None, "the per-layer path fell back"
    stats = layer_moments(
        model, fl.cross_entropy, x, y, chunk_size=size, loss_kwargs={}, params=dict(model.named_parameters())
    )
    assert stats is not None, "the per-layer path fell back"
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    stats = layer_moments(model, fl.cross_entropy, x, y, chunk_size=size, loss_kwargs={}, params=params)
    assert stats is not None
    assert list(grads) == list(expected)
    for name, v in expected.items():
        torch.testing.assert_close(grads[name], v)
    _assert_stats_match(stats, expected)
    public = fl.per_sample_grads(model, fl.cross_entropy, x, y, chunk_size=chunk)
    for name, v in expected.items():
        torch.testing.assert_close(public[name], v)
    _assert_stats_match(fl.grad_stats(model, fl.cross_entropy, x, y, chunk_size=chunk), expected)


def test_batchnorm_without_running_statistics_is_refused() -> None:
    """Without running statistics BatchNorm normalises by the batch in eval mode too."""
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)).eval()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fl.per_sample_grads(model, fl.cross_entropy, x, y)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fl.grad_stats(model, fl.cross_entropy, x, y)


@pytest.mark.parametrize("way", ["timed", "patches", "grouped"])
@pytest.mark.parametrize("chunk", [3, None])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_layers_with_stride_padding_dilation(
    groups: int, chunk: int | None, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conv2d per-sample gradients with stride, padding and dilation, each way: the samples as
    groups of one convolution, the patches' einsum, or whichever measured faster per layer
    ("timed", the default); for grouped convs the vmap fallback. Strides, paddings and kernels
    differ between height and width, and the last conv's stride does not divide its input. In
    chunks, and as one chunk (the convolutions' gradients then are the result)."""
    if way != "timed":

        def forced(key: object, ways: Mapping[str, Callable[[], Tensor]], *, default: str, timed: bool) -> Tensor:
            return ways[way]()

        monkeypatch.setattr(moments, "_fastest", forced)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=(2, 3), padding=(3, 2)),
        nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=2, bias=False, groups=groups),
        nn.Tanh(),
        nn.Conv2d(4, 2, (2, 1), stride=(1, 2), padding=(1, 0)),
        nn.Conv2d(2, 2, (2, 1), stride=(3, 2)),
        nn.Flatten(),
        nn.LazyLinear(3),
    ).double()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(7, 1, 9, 9, generator=g, dtype=D), torch.randint(0, 3, (7,), generator=g)
    model(x)  # materialise the lazy layer
    expected = _loop(model, fl.cross_entropy, x, y)
    grads = fl.per_sample_grads(model, fl.cross_entropy, x, y, chunk_size=chunk)
    assert list(grads) == list(expected)
    for name, v in expected.items():
        torch.testing.assert_close(grads[name], v)
    s = fl.grad_stats(model, fl.cross_entropy, x, y, chunk_size=chunk)
    for name, v in expected.items():
        torch.testing.assert_close(s.mean[name], v.mean(0))
        torch.testing.assert_close(s.variance[name], v.var(0))
        torch.testing.assert_close(s.sign_sum[name], v.sign().sum(0))


def test_fastest_way_is_timed_once_per_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_fastest` returns the result of the way that measured faster, keeps its name for the
    problem, and runs only that way afterwards; untimed (accelerators, tracing) it runs the
    default."""
    monkeypatch.setattr(moments, "_fastest_choice", {})
    calls: list[str] = []

    def way(name: str, seconds: float) -> Callable[[], Tensor]:
        def run() -> Tensor:
            calls.append(name)
            time.sleep(seconds)
            return torch.tensor(float(len(name)))

        return run

    ways = {"slow": way("slow", 0.02), "fast": way("fast", 0.0)}
    first = moments._fastest(("k",), ways, default="slow", timed=True)
    assert first.item() == len("fast") and sorted(calls) == ["fast", "fast", "fast", "slow", "slow"]
    calls.clear()
    again = moments._fastest(("k",), ways, default="slow", timed=True)
    assert again.item() == len("fast") and calls == ["fast"]
    calls.clear()
    untimed = moments._fastest(("other",), ways, default="slow", timed=False)
    assert untimed.item() == len("slow") and calls == ["slow"]
    assert ("other",) not in moments._fastest_choice


@pytest.mark.parametrize("method", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("api", ["per_sample_grads", "grad_stats"])
def test_an_unreduced_loss_is_refused_by_every_method(api: str, method: str) -> None:
    """A loss that returns one value per element for a sample has no gradient to take: every
    method says so (the per-layer path used to sum it silently, the others raised torch's own
    errors)."""
    model = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    with pytest.raises(
        RuntimeError,
        match=rf"{api}\(\.\.\.\): expected loss_fn to return a scalar for one sample, got a tensor of shape \(1, 3\)",
    ):
        getattr(fl, api)(model, fl.mse_loss, x, y, method=method, reduction="none")


def test_deterministic_mode_takes_the_fixed_convolution_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``torch.use_deterministic_algorithms(True)`` no convolution way is timed: the fixed
    rule gives the same bits in every process."""
    model, x, y = _setup("cnn")
    monkeypatch.setattr(moments, "_fastest_choice", {})
    flags: list[bool] = []
    fastest = moments._fastest

    def spy(key: tuple[object, ...], ways: Mapping[str, Callable[[], Tensor]], *, default: str, timed: bool) -> Tensor:
        flags.append(timed)
        return fastest(key, ways, default=default, timed=timed)

    monkeypatch.setattr(moments, "_fastest", spy)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = fl.per_sample_grads(model, fl.cross_entropy, x, y)
    finally:
        torch.use_deterministic_algorithms(was)
    assert flags and not any(flags) and not moments._fastest_choice
    expected = _loop(model, fl.cross_entropy, x, y)
    for name, v in expected.items():
        torch.testing.assert_close(grads[name], v)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_works_inside_no_grad(method: str) -> None:
    model, x, y = _setup("mlp")
    expected = _loop(model, fl.cross_entropy, x, y)
    with torch.no_grad():
        grads = fl.per_sample_grads(model, fl.cross_entropy, x, y, method=method)  # type: ignore[arg-type]
        stats = fl.grad_stats(model, fl.cross_entropy, x, y, method=method)  # type: ignore[arg-type]
    for name, v in expected.items():
        torch.testing.assert_close(grads[name], v)
        torch.testing.assert_close(stats.mean[name], v.mean(0))


def _recipe_fails_under_autocast(model: nn.Module, x: Tensor, y: Tensor) -> bool:
    """Whether the plain torch.func recipe raises under bfloat16 autocast."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return fl.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, y)
    except RuntimeError:
        return True
    return False


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "bag", "sequence", "image"])
def test_under_autocast_match_a_loop_under_autocast(kind: str, method: Literal["auto", "vmap"]) -> None:
    """Under bfloat16 autocast (the model's matmuls in bfloat16, the loss and normalisations
    in float32), the per-sample gradients equal a loop of single-sample backward passes under
    the same autocast to bfloat16's precision, in the parameters' dtype; the statistics stay
    float32."""
    if kind in ("sequence", "image"):
        model, x = _normed(kind)
        y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(6))
    else:
        model, x, y = _setup(kind)
    model = model.float()
    x = x.float() if x.is_floating_point() else x
    if method == "vmap" and _recipe_fails_under_autocast(model, x, y):
        # torch 2.13's vmap of an eval-mode BatchNorm under autocast refuses the bfloat16 input
        # beside float32 running statistics (eager takes it): where the plain recipe fails so
        # does the vmap path, with torch's error; the per-layer path ("auto") computes it.
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError):
            fl.per_sample_grads(model, fl.cross_entropy, x, y, method=method)
        assert kind == "image", "only the eval-mode BatchNorm model is known to fail"
        return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _loop(model, fl.cross_entropy, x, y)
        grads = fl.per_sample_grads(model, fl.cross_entropy, x, y, method=method)
        stats = fl.grad_stats(model, fl.cross_entropy, x, y, method=method)
    for name, v in expected.items():
        scale = float(v.abs().max())
        assert grads[name].dtype == stats.mean[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], v, rtol=0, atol=2e-2 * scale)
        torch.testing.assert_close(stats.mean[name], v.mean(0), rtol=0, atol=1e-2 * scale)


# Losses whose per-sample values the layer path computes in one batched call (no vmap).
ROWWISE: list[tuple[str, Callable[..., Tensor], str]] = [
    ("fl.cross_entropy", fl.cross_entropy, "index"),
    ("F.cross_entropy", nn.functional.cross_entropy, "index"),
    ("smoothed F.cross_entropy", functools.partial(nn.functional.cross_entropy, label_smoothing=0.3), "index"),
    ("fl.nll_loss", fl.nll_loss, "index"),
    ("F.nll_loss", nn.functional.nll_loss, "index"),
    ("fl.mse_loss", fl.mse_loss, "float"),
    ("F.l1_loss", nn.functional.l1_loss, "float"),
    ("huber delta", functools.partial(fl.huber_loss, delta=0.3), "float"),
    ("F.smooth_l1_loss", nn.functional.smooth_l1_loss, "float"),
    ("fl.bce_with_logits", fl.binary_cross_entropy_with_logits, "prob"),
]


def _rowwise_targets(kind: str, n: int, classes: int, g: torch.Generator) -> Tensor:
    if kind == "index":
        return torch.randint(0, classes, (n,), generator=g)
    if kind == "prob":
        return torch.rand(n, classes, generator=g, dtype=D)
    return torch.randn(n, classes, generator=g, dtype=D)


@pytest.mark.parametrize(("label", "loss", "kind"), ROWWISE, ids=[r[0] for r in ROWWISE])
def test_batched_per_sample_losses_equal_losses_of_one_sample(
    label: str, loss: Callable[..., Tensor], kind: str
) -> None:
    from funcloss._moments import _rowwise

    g = torch.Generator().manual_seed(3)
    out = torch.randn(6, 4, generator=g, dtype=D)
    y = _rowwise_targets(kind, 6, 4, g)
    rowwise = _rowwise(loss, {})
    assert rowwise is not None, f"{label} should take the batched path"
    ours = rowwise(out, y)
    assert ours is not None
    torch.testing.assert_close(ours, torch.stack([loss(out[i : i + 1], y[i : i + 1]) for i in range(6)]))


@pytest.mark.parametrize(("label", "loss", "kind"), ROWWISE, ids=[r[0] for r in ROWWISE])
def test_per_sample_work_with_batched_losses_match_a_loop(label: str, loss: Callable[..., Tensor], kind: str) -> None:
    model, x, _ = _setup("mlp")
    y = _rowwise_targets(kind, len(x), 3, torch.Generator().manual_seed(4))
    expected = _loop(model, loss, x, y)
    grads = fl.per_sample_grads(model, loss, x, y)
    stats = fl.grad_stats(model, loss, x, y, chunk_size=4)
    for name, v in expected.items():
        torch.testing.assert_close(grads[name], v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats.mean[name], v.mean(0))
        torch.testing.assert_close(stats.variance[name], v.var(0))


def test_losses_that_do_not_reduce_to_rows_keep_the_per_sample_definition() -> None:
    """With class weights and smoothing, a batch of one divides by its own target's weight, which
    is not the unreduced loss; an ignored target gives 0/0. Both go through vmap."""
    from funcloss._moments import _rowwise

    w = torch.tensor([0.5, 2.0, 1.0], dtype=D)
    assert _rowwise(fl.cross_entropy, {"weight": w, "label_smoothing": 0.2}) is None
    assert _rowwise(fl.mse_loss, {"weight": torch.ones(3, dtype=D)}) is None
    model, x, y = _setup("mlp")
    cases: list[tuple[Callable[..., Tensor], Tensor]] = [
        (functools.partial(fl.cross_entropy, weight=w, label_smoothing=0.2), y),
        (fl.cross_entropy, torch.where(torch.arange(len(y)) == 2, -100, y)),
    ]
    for loss, targets in cases:
        expected = _loop(model, loss, x, targets)
        grads = fl.per_sample_grads(model, loss, x, targets)
        for name, v in expected.items():
            torch.testing.assert_close(grads[name], v, equal_nan=True)


@pytest.mark.parametrize(
    ("label", "loss", "kind"), [r for r in ROWWISE if r[2] == "index"], ids=[r[0] for r in ROWWISE if r[2] == "index"]
)
def test_closed_form_output_gradient_equals_autograd_of_the_summed_losses(
    label: str, loss: Callable[..., Tensor], kind: str
) -> None:
    from funcloss._moments import _output_grad

    g = torch.Generator().manual_seed(5)
    out = torch.randn(6, 4, generator=g, dtype=D, requires_grad=True)
    y = _rowwise_targets(kind, 6, 4, g)
    closed = _output_grad(loss, {})
    assert closed is not None, f"{label} should have a closed-form output gradient"
    ours = closed(out, y)
    assert ours is not None and not ours.requires_grad
    summed = torch.stack([loss(out[i : i + 1], y[i : i + 1]) for i in range(6)]).sum()
    (expected,) = torch.autograd.grad(summed, out)
    torch.testing.assert_close(ours, expected)


def test_closed_form_output_gradient_only_where_it_holds() -> None:
    """Other losses, weights, ignored or float targets, K-dimensional scores, float16 and
    autocast take the loss's own graph; a target out of range raises the loss's IndexError."""
    from funcloss._moments import _output_grad

    w = torch.ones(4, dtype=D)
    assert _output_grad(fl.multi_margin_loss, {}) is None
    assert _output_grad(fl.cross_entropy, {"weight": w}) is None
    assert _output_grad(fl.nll_loss, {"label_smoothing": 0.1}) is None
    closed = _output_grad(fl.cross_entropy, {"label_smoothing": 0.1})
    assert closed is not None
    out = torch.randn(5, 4, dtype=D)
    y = torch.tensor([0, 1, 2, 3, 1])
    assert closed(out, torch.where(y == 2, -100, y)) is None
    assert closed(out, torch.rand(5, 4, dtype=D)) is None
    assert closed(out.unsqueeze(2), y.unsqueeze(1)) is None
    assert closed(out.half(), y) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert closed(out, y) is None
    with pytest.raises(IndexError, match="out of bounds"):
        closed(out, torch.tensor([0, 1, 4, 3, 1]))
    model, x, targets = _setup("mlp")
    with pytest.raises(IndexError, match="out of bounds"):
        fl.grad_stats(model, fl.cross_entropy, x, torch.full_like(targets, 3))


class Frozen(nn.Module):
    """Linear layers with a frozen weight (bias trainable), no bias, and ReLU zeros between."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 6, bias=False)
        self.c = nn.Linear(6, 4)
        self.c.bias.requires_grad_(False)
        self.d = nn.Linear(4, 3)
        self.a.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))
        return out


def test_linear_layers_summed_together_match_a_loop() -> None:
    """The Linear layers of a chunk share one powers buffer: frozen weights, missing and frozen
    biases, and ReLU's exact zeros (counted in ``zeros``) against a loop; twice, so the second
    call reuses the kept scratch, and once with no scratch kept."""
    import funcloss._moments as moments

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    model = Frozen().double()
    x, y = torch.randn(10, 5, generator=g, dtype=D), torch.randint(0, 3, (10,), generator=g)
    expected = _loop(model, fl.cross_entropy, x, y)
    assert list(expected) == ["a.bias", "b.weight", "c.weight", "d.weight", "d.bias"]
    assert any(bool((v == 0).any()) for v in expected.values()), "the ReLUs should give exact zeros"
    limits = [moments._SCRATCH_LIMIT, moments._SCRATCH_LIMIT, 0]
    for chunk, limit in zip([None, 3, 4], limits):
        moments._SCRATCH_LIMIT = limit
        try:
            s = fl.grad_stats(model, fl.cross_entropy, x, y, chunk_size=chunk)
        finally:
            moments._SCRATCH_LIMIT = limits[0]
        _assert_stats_match(s, expected)


def test_kept_scratch_is_per_thread() -> None:
    """Two threads computing statistics of different models at once (each reusing its kept
    scratch on every call) get the same results as one thread alone."""
    import threading

    cases = [_setup("mlp"), _setup("bag")]
    expected = [fl.grad_stats(m, fl.cross_entropy, x, y) for m, x, y in cases]
    failures: list[BaseException] = []

    def work(k: int) -> None:
        model, x, y = cases[k]
        try:
            for _ in range(20):
                s = fl.grad_stats(model, fl.cross_entropy, x, y)
                for name, v in expected[k].variance.items():
                    torch.testing.assert_close(s.variance[name], v, rtol=0, atol=0)
                torch.testing.assert_close(s.sq_norms, expected[k].sq_norms, rtol=0, atol=0)
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def test_embedding_moments_with_int32_token_ids() -> None:
    model, x, y = _setup("bag")
    expected = _loop(model, fl.cross_entropy, x, y)
    s = fl.grad_stats(model, fl.cross_entropy, x.int(), y, chunk_size=4)
    for name, v in expected.items():
        torch.testing.assert_close(s.mean[name], v.mean(0))
        torch.testing.assert_close(s.variance[name], v.var(0))


class _Recurrent(nn.Module):
    def __init__(self, cell: bool) -> None:
        super().__init__()
        self.cell = cell
        self.rnn: nn.Module = nn.LSTMCell(4, 6) if cell else nn.LSTM(4, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        if not self.cell:
            out: Tensor = self.fc(self.rnn(x)[0][:, -1])
            return out
        h = c = x.new_zeros(x.size(0), 6)
        for t in range(x.size(1)):
            h, c = self.rnn(x[:, t], (h, c))
        out = self.fc(h)
        return out


def test_fused_recurrent_layers_are_refused_with_advice_and_cells_work() -> None:
    """torch.func cannot batch nn.LSTM's fused kernel: the error names the layer, method='loop'
    and the cell to unroll instead; the unrolled LSTMCell model matches a loop."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, 4, dtype=D), torch.randint(0, 3, (5,))
    fused = _Recurrent(cell=False).double()
    with pytest.raises(RuntimeError, match=r"per_sample_grads.*LSTM 'rnn'.*method='loop'.*nn\.LSTMCell"):
        fl.per_sample_grads(fused, fl.cross_entropy, x, y)
    with pytest.raises(RuntimeError, match=r"grad_stats.*LSTM 'rnn'.*method='loop'.*nn\.LSTMCell"):
        fl.grad_stats(fused, fl.cross_entropy, x, y)
    unrolled = _Recurrent(cell=True).double()
    ours = fl.per_sample_grads(unrolled, fl.cross_entropy, x, y)
    for name, v in _loop(unrolled, fl.cross_entropy, x, y).items():
        torch.testing.assert_close(ours[name], v)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))],
)
@pytest.mark.parametrize("chunk", [None, 2])
def test_loop_method_takes_models_vmap_cannot_batch(chunk: int | None, device: str) -> None:
    """method='loop' differentiates the fused LSTM sample by sample: per-sample gradients,
    streamed statistics and per-group statistics all match a loop of single-sample backwards,
    and the model's .grad stays untouched."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, 4, dtype=D, device=device), torch.randint(0, 3, (5,), device=device)
    fused = _Recurrent(cell=False).double().to(device)
    expected = _loop(fused, fl.cross_entropy, x, y)
    ours = fl.per_sample_grads(fused, fl.cross_entropy, x, y, method="loop", chunk_size=chunk)
    assert list(ours) == list(expected)
    for name, v in expected.items():
        torch.testing.assert_close(ours[name], v)
    _assert_stats_match(fl.grad_stats(fused, fl.cross_entropy, x, y, method="loop", chunk_size=chunk), expected)
    groups = torch.tensor([0, 1, 0, 2, 1], device=device)
    by_group = fl.grad_stats(fused, fl.cross_entropy, x, y, method="loop", groups=groups, chunk_size=chunk)
    group_means = {k: torch.stack([v[groups == g].mean(0) for g in range(3)]) for k, v in expected.items()}
    _assert_stats_match(by_group, group_means)
    assert all(p.grad is None for p in fused.parameters())


class _Dropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(self.drop(torch.relu(self.fc1(x))))
        return out


def test_loop_method_randomness() -> None:
    """Under method='loop', 'same' gives every sample the draw of one seeded single-sample
    backward, 'different' gives them their own draws, and 'error' refuses a model that draws
    (and takes it in eval mode)."""
    model = _Dropped().double()
    x, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    named = [p for p in model.parameters()]
    torch.manual_seed(7)
    same = fl.per_sample_grads(model, fl.cross_entropy, x, y, method="loop", randomness="same")
    for i in range(6):
        torch.manual_seed(7)
        one = torch.autograd.grad(fl.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), named)
        for (name, _), g in zip(model.named_parameters(), one):
            torch.testing.assert_close(same[name][i], g)
    torch.manual_seed(7)
    different = fl.per_sample_grads(model, fl.cross_entropy, x, y, method="loop", randomness="different")
    assert not torch.equal(different["fc1.weight"], same["fc1.weight"])
    with pytest.raises(RuntimeError, match=r"draw no random numbers.*model\.eval"):
        fl.per_sample_grads(model, fl.cross_entropy, x, y, method="loop", randomness="error")
    with pytest.raises(RuntimeError, match="draw no random numbers"):
        fl.grad_stats(model, fl.cross_entropy, x, y, method="loop", randomness="error")
    model.eval()
    strict = fl.per_sample_grads(model, fl.cross_entropy, x, y, method="loop", randomness="error")
    for name, v in _loop(model, fl.cross_entropy, x, y).items():
        torch.testing.assert_close(strict[name], v)


def test_unknown_method_is_refused() -> None:
    model, x, y = nn.Linear(3, 2).double(), torch.randn(4, 3, dtype=D), torch.randint(0, 2, (4,))
    for fn in (fl.per_sample_grads, fl.grad_stats):
        with pytest.raises(ValueError, match="expected method 'auto', 'vmap' or 'loop', got 'loops'"):
            fn(model, fl.cross_entropy, x, y, method="loops")  # type: ignore[arg-type]


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(self.enc(self.emb(x)).mean(1))
        return out


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_batches_under_vmap_without_a_per_sample_loop(dtype: torch.dtype, device: str) -> None:
    """A transformer layer: torch's fused attention kernels have no vmap batching rule (vmap
    would loop over samples and warn, an error in this suite). per_sample_grads and grad_stats
    take attention's math form and match a loop of single-sample backwards."""
    torch.manual_seed(0)
    model = _Attention().to(device, dtype).eval()
    x = torch.randint(0, 30, (6, 5), device=device)
    y = torch.randint(0, 3, (6,), device=device)
    expected = _loop(model, fl.cross_entropy, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a per-sample fallback would warn
        grads = fl.per_sample_grads(model, fl.cross_entropy, x, y, chunk_size=4)
        stats = fl.grad_stats(model, fl.cross_entropy, x, y, chunk_size=4)
        grouped = fl.grad_stats(model, fl.cross_entropy, x, y, groups=torch.tensor([0, 0, 1, 1, 2, 2], device=device))
    atol, rtol = (1e-12, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    for name, v in expected.items():
        torch.testing.assert_close(grads[name], v, atol=atol, rtol=rtol)
        torch.testing.assert_close(stats.mean[name], v.mean(0), atol=atol, rtol=rtol)
        torch.testing.assert_close(grouped.mean[name], v.mean(0), atol=atol, rtol=rtol)
