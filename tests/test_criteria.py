"""funcloss.nn criteria against torch.nn's classes: results, state dicts, module behaviour."""

from __future__ import annotations

import copy
import functools
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import funcloss as fl
import funcloss.nn as fnn
from funcloss._bench.cases import Example, Sampler

from .harness import assert_close, quiet_call, value_and_grads
from .registry import DEVICES, ROWS, Row

# One row per criterion: the registry row whose examples drive it.
CRITERIA = {
    "L1Loss": "l1_loss",
    "MSELoss": "mse_loss",
    "HuberLoss": "huber_loss",
    "SmoothL1Loss": "smooth_l1_loss",
    "SoftMarginLoss": "soft_margin_loss",
    "HingeEmbeddingLoss": "hinge_embedding_loss",
    "MarginRankingLoss": "margin_ranking_loss",
    "PoissonNLLLoss": "poisson_nll_loss",
    "GaussianNLLLoss": "gaussian_nll_loss",
    "BCELoss": "binary_cross_entropy",
    "BCEWithLogitsLoss": "binary_cross_entropy_with_logits",
    "KLDivLoss": "kl_div",
    "CrossEntropyLoss": "cross_entropy",
    "NLLLoss": "nll_loss",
    "MultiMarginLoss": "multi_margin_loss",
    "MultiLabelMarginLoss": "multilabel_margin_loss",
    "MultiLabelSoftMarginLoss": "multilabel_soft_margin_loss",
    "CosineEmbeddingLoss": "cosine_embedding_loss",
    "TripletMarginLoss": "triplet_margin_loss",
    "TripletMarginWithDistanceLoss": "triplet_margin_with_distance_loss",
    "CTCLoss": "ctc_loss",
}


def test_every_torch_loss_class_has_a_criterion() -> None:
    torch_losses = {n for n in dir(nn) if n.endswith("Loss") and isinstance(getattr(nn, n), type)}
    torch_losses |= {"AdaptiveLogSoftmaxWithLoss"}
    assert torch_losses <= set(fnn.__all__), sorted(torch_losses - set(fnn.__all__))


def test_criteria_offer_torchs_public_interface() -> None:
    """A drop-in replacement: every public method and attribute of torch's class exists on the
    criterion, and the call methods take the same parameter names."""
    import inspect

    for name in fnn.__all__:
        theirs = getattr(nn, name, None)
        if not isinstance(theirs, type):
            continue
        ours = getattr(fnn, name)
        missing = [a for a in dir(theirs) if not a.startswith("_") and not hasattr(ours, a)]
        assert not missing, (name, missing)
        for method in ("forward", "log_prob", "predict"):
            if hasattr(theirs, method):
                ours_params = list(inspect.signature(getattr(ours, method)).parameters)
                assert ours_params == list(inspect.signature(getattr(theirs, method)).parameters), (name, method)


@pytest.mark.parametrize("name", sorted(set(fnn.__all__) - {"Criterion"}))
def test_criteria_are_instances_of_torchs_classes(name: str) -> None:
    """A drop-in replacement passes the type checks code makes on criteria: skorch's classifier,
    for one, takes the log of its predictions only when ``isinstance(criterion, nn.NLLLoss)``,
    and would otherwise train on the wrong values without a word. Every method torch's class
    defines (forward first), except private helpers, is funcloss's own, so none runs torch's loss."""
    theirs, ours = getattr(nn, name), getattr(fnn, name)
    assert issubclass(ours, theirs)
    own = [
        a
        for klass in theirs.__mro__[: theirs.__mro__.index(nn.Module)]
        for a, v in vars(klass).items()
        if callable(v) and not a.startswith("_")
    ]
    assert "forward" in own
    inherited = [a for a in own if getattr(ours, a) is getattr(theirs, a)]
    assert not inherited, (name, inherited)


def test_triplet_distance_criterion_defaults_to_a_pairwise_distance_module_like_torch() -> None:
    """torch's criterion holds an nn.PairwiseDistance when given no distance function: so does
    funcloss's (same children), computing its formula, changed settings included."""
    ours, theirs = fnn.TripletMarginWithDistanceLoss(), nn.TripletMarginWithDistanceLoss()
    assert isinstance(ours.distance_function, nn.PairwiseDistance)
    assert [type(c) for c in ours.children()] == [type(c) for c in theirs.children()]
    a, p, n = (torch.randn(5, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3))
    torch.testing.assert_close(ours(a, p, n), theirs(a, p, n))
    for module in (ours, theirs):
        module.distance_function = nn.PairwiseDistance(p=1.0, eps=1e-3)
    torch.testing.assert_close(ours(a, p, n), theirs(a, p, n))
    assert torch.func.grad(lambda x: ours(x, p, n))(a).abs().sum() > 0


def test_adaptive_criterion_resets_its_parameters_like_torch() -> None:
    torch.manual_seed(0)
    ours = fnn.AdaptiveLogSoftmaxWithLoss(8, 12, [3, 7], div_value=2.0, head_bias=True)
    theirs = nn.AdaptiveLogSoftmaxWithLoss(8, 12, [3, 7], div_value=2.0, head_bias=True)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    torch.manual_seed(1)
    ours.reset_parameters()
    torch.manual_seed(1)
    theirs.reset_parameters()
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
        assert not torch.equal(a, before[k]), k


# torch's classes for these take no weight (only the functions do, since torch 2.13).
NO_WEIGHT = {"L1Loss", "MSELoss", "HuberLoss"}


def _device_consistent(criterion: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """The criterion as `device_consistent` treats torch's function: for an unbatched input
    whose one target is the criterion's ignore_index, under "mean", torch's CUDA kernel gives 0
    where its CPU kernel (and funcloss, everywhere) gives NaN; there, a CPU copy answers."""

    def call(x: Tensor, y: Tensor) -> Tensor:
        unbatched = x.is_cuda and x.dim() == 1 and y.dim() == 0
        if unbatched and criterion.reduction == "mean" and int(y) == criterion.ignore_index:
            out: Tensor = copy.deepcopy(criterion).cpu()(x.cpu(), y.cpu())
            return out.to(x.device)
        result: Tensor = criterion(x, y)
        return result

    return call


def _pair(name: str, ex: Example, device: str) -> tuple[Any, Any]:
    """(funcloss criterion, torch criterion) configured from an example's options."""
    config = {k: v for k, v in ex.kwargs.items() if not (k == "weight" and name in NO_WEIGHT)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = getattr(fnn, name)(**config).to(device), getattr(nn, name)(**config).to(device)
    if name in ("NLLLoss", "CrossEntropyLoss"):
        return ours, _device_consistent(theirs)
    if name != "CTCLoss":
        return ours, theirs

    # Compared through log_softmax, where torch's CTC gradient convention and the true
    # derivative agree (see funcloss.ctc_loss).
    def through_log_softmax(crit: nn.Module) -> Any:
        return lambda logits, *rest: crit(torch.log_softmax(logits, -1), *rest)

    return through_log_softmax(ours), through_log_softmax(theirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_criterion_matches_torch(name: str, device: str) -> None:
    row: Row = ROWS[CRITERIA[name]]

    @given(options=row.options(), seed=st.integers(0, 2**16))
    def run(options: dict[str, Any], seed: int) -> None:
        if name in NO_WEIGHT:
            options = {**options, "weight": False}
        ex = row.case.make(Sampler(seed, torch.float64, device), options)
        ours, theirs = _pair(name, ex, device)
        call = Example(ex.args, {}, ex.diff, None)
        value, grads = value_and_grads(ours, call)
        expected, expected_grads = value_and_grads(theirs, call)
        tol = row.tolerance(torch.float64)
        assert_close(value, expected, tol, f"{name} {options}")
        for g, h in zip(grads, expected_grads):
            assert_close(g, h, tol, f"{name} grad {options}")

    run()


WEIGHTED = [
    ("BCELoss", {"weight": torch.rand(3)}),
    ("BCEWithLogitsLoss", {"weight": torch.rand(3), "pos_weight": torch.rand(3)}),
    ("CrossEntropyLoss", {"weight": torch.rand(3)}),
    ("NLLLoss", {"weight": torch.rand(3)}),
    ("MultiMarginLoss", {"weight": torch.rand(3)}),
    ("MultiLabelSoftMarginLoss", {"weight": torch.rand(3)}),
    ("CrossEntropyLoss", {}),
]


@pytest.mark.parametrize(("name", "config"), WEIGHTED)
def test_state_dict_interchanges_both_ways(name: str, config: dict[str, torch.Tensor]) -> None:
    ours, theirs = getattr(fnn, name)(**config), getattr(nn, name)(**config)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    other = {k: v + 1 for k, v in config.items()}
    theirs.load_state_dict(getattr(fnn, name)(**other).state_dict())
    ours.load_state_dict(getattr(nn, name)(**other).state_dict())
    for key in config:
        torch.testing.assert_close(getattr(ours, key), other[key])
        torch.testing.assert_close(getattr(theirs, key), other[key])


def _linear_ce(m: Any) -> nn.Module:
    module: nn.Module = m.LinearCrossEntropyLoss(6, 5, bias=True)
    return module


def _adaptive(m: Any) -> nn.Module:
    module: nn.Module = m.AdaptiveLogSoftmaxWithLoss(8, 12, [3, 7], div_value=2.0, head_bias=True)
    return module


def test_parametrised_criteria_share_names_and_initialisation() -> None:
    for make in (_linear_ce, _adaptive):
        torch.manual_seed(0)
        theirs = make(nn)
        torch.manual_seed(0)
        ours = make(fnn)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, msg=k)
        ours.load_state_dict(theirs.state_dict())


def test_linear_cross_entropy_criterion_matches_torch() -> None:
    torch.manual_seed(0)
    theirs = nn.LinearCrossEntropyLoss(6, 5, bias=True, label_smoothing=0.1, ignore_index=2).double()
    ours = fnn.LinearCrossEntropyLoss(6, 5, bias=True, label_smoothing=0.1, ignore_index=2).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 2, 1])
    a, b = ours(x, y), theirs(x, y)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])


def test_adaptive_criterion_matches_torch() -> None:
    theirs = nn.AdaptiveLogSoftmaxWithLoss(8, 12, [3, 7], div_value=2.0, head_bias=True).double()
    ours = fnn.AdaptiveLogSoftmaxWithLoss(8, 12, [3, 7], div_value=2.0, head_bias=True).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(9, 8, dtype=torch.float64)
    y = torch.tensor([0, 2, 3, 6, 7, 11, 5, 1, 9])
    a, b = ours(x, y), theirs(x, y)
    torch.testing.assert_close(a.output, b.output)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(ours.log_prob(x), theirs.log_prob(x))
    assert torch.equal(ours.predict(x), theirs.predict(x))
    # An unbatched row (torch's log_prob and predict refuse it): the row of the batch's result.
    with pytest.raises(IndexError):
        theirs.log_prob(x[0])
    torch.testing.assert_close(ours.log_prob(x[0]), theirs.log_prob(x[:1])[0])
    assert torch.equal(ours.predict(x[0]), theirs.predict(x[:1])[0])


@pytest.mark.parametrize(
    ("size_average", "reduce", "expected"),
    [(None, False, "none"), (False, None, "sum"), (True, True, "mean"), (False, False, "none")],
)
def test_legacy_flags_map_and_warn_like_torch(size_average: bool | None, reduce: bool | None, expected: str) -> None:
    with pytest.warns(UserWarning, match=f"reduction='{expected}'"):
        ours = fnn.MSELoss(size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning, match=f"reduction='{expected}'"):
        theirs = nn.MSELoss(size_average=size_average, reduce=reduce)
    assert ours.reduction == theirs.reduction == expected


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda m: m.MultiMarginLoss(p=3), ValueError, "p"),
        (lambda m: m.MultiMarginLoss(weight=torch.ones(2, 2)), ValueError, "1D|one-dimensional"),
        (lambda m: m.TripletMarginLoss(margin=0), ValueError, "margin"),
        (lambda m: m.TripletMarginWithDistanceLoss(margin=-1.0), ValueError, "margin"),
        (lambda m: m.LinearCrossEntropyLoss(3, 4, weight=torch.ones(3)), RuntimeError, r"weight shape to be \(4,\)"),
        (lambda m: m.LinearCrossEntropyLoss(3, 4, label_smoothing=2.0), RuntimeError, "label_smoothing"),
        (lambda m: m.AdaptiveLogSoftmaxWithLoss(4, 10, []), ValueError, "cutoffs"),
        (lambda m: m.AdaptiveLogSoftmaxWithLoss(4, 10, [5, 3]), ValueError, "cutoffs"),
    ],
)
def test_constructor_errors_match_torch(make: Any, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc):
        make(nn)
    with pytest.raises(exc, match=match):
        make(fnn)


def test_invalid_reduction_is_refused_at_construction() -> None:
    """torch accepts it and fails at the first call; funcloss says so at once."""
    with pytest.raises(ValueError, match="expected reduction to be one of"):
        fnn.MSELoss(reduction="avg")
    assert str(fnn.KLDivLoss(reduction="batchmean").reduction) == "batchmean"


def test_training_matches_torch_for_20_steps() -> None:
    def train(criterion: nn.Module) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 5, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (32,), generator=g)
        for _ in range(20):
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]

    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    ours = train(fnn.CrossEntropyLoss(weight=w, label_smoothing=0.1))
    theirs = train(nn.CrossEntropyLoss(weight=w, label_smoothing=0.1))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_criteria_behave_as_modules() -> None:
    crit = fnn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0]), reduction="sum")
    moved = crit.to(torch.float64)
    assert moved.pos_weight is not None and moved.pos_weight.dtype == torch.float64
    clone = copy.deepcopy(crit)
    again = pickle.loads(pickle.dumps(crit))
    x, y = torch.randn(3, 2, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    torch.testing.assert_close(clone(x, y), crit(x, y))
    torch.testing.assert_close(again(x, y), crit(x, y))
    assert "reduction='sum'" in repr(crit)
    # functional_call swaps the buffer for one call.
    swapped = torch.func.functional_call(crit, {"pos_weight": torch.tensor([5.0, 5.0], dtype=torch.float64)}, (x, y))
    torch.testing.assert_close(
        swapped,
        fl.binary_cross_entropy_with_logits(
            x, y, reduction="sum", pos_weight=torch.full((2,), 5.0, dtype=torch.float64)
        ),
    )


def test_compiled_criterion_has_no_graph_break() -> None:
    torch._dynamo.reset()
    crit = fnn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]), label_smoothing=0.2)
    compiled = torch.compile(crit, fullgraph=True)
    x, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(compiled(x, y), crit(x, y))


@pytest.mark.parametrize(
    "make",
    [
        lambda: fnn.MSELoss(),
        lambda: fnn.AdaptiveLogSoftmaxWithLoss(8, 20, [5]),
        lambda: fnn.Criterion(fl.mse_loss),
        lambda: nn.Sequential(nn.Linear(2, 2), fnn.L1Loss()),  # a criterion inside a model
    ],
    ids=["criterion", "adaptive", "wrapper", "submodule"],
)
def test_torchscript_is_refused_with_the_way_out(make: Callable[[], nn.Module]) -> None:
    """funcloss is not TorchScript: scripting a criterion, or a model holding one, names the
    criterion and the alternatives instead of failing on an annotation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own deprecation
        with pytest.raises(RuntimeError, match=r"not TorchScript.*torch\.compile or torch\.export"):
            torch.jit.script(make())


def test_criterion_wraps_any_function() -> None:
    """Write a function, wrap it: options become configuration, tensors become buffers."""

    def focal_like(input: torch.Tensor, target: torch.Tensor, *, gamma: float, alpha: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(input)
        pt = torch.where(target > 0.5, p, 1 - p)
        return (-alpha * (1 - pt) ** gamma * pt.log()).mean()

    crit = fnn.Criterion(focal_like, gamma=2.0, alpha=torch.tensor(0.25))
    assert list(crit.state_dict()) == ["alpha"]
    x, y = torch.randn(6), (torch.rand(6) > 0.5).float()
    torch.testing.assert_close(crit(x, y), focal_like(x, y, gamma=2.0, alpha=torch.tensor(0.25)))
    torch.testing.assert_close(crit(x, y, gamma=0.0), focal_like(x, y, gamma=0.0, alpha=torch.tensor(0.25)))
    assert "focal_like" in repr(crit) and "gamma=2.0" in repr(crit)
    # Built-ins and combinators wrap the same way, and pickle.
    mix = fl.loss_sum({"huber": fl.huber_loss, "l1": fl.l1_loss}, weights={"l1": 0.5})
    crit2 = pickle.loads(pickle.dumps(fnn.Criterion(mix)))
    a, b = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(crit2(a, b), mix(a, b))
    masked = fnn.Criterion(fl.masked(functools.partial(fl.mse_loss, reduction="none"), a > 0, reduction="mean"))
    torch.testing.assert_close(masked(a, b), ((a - b) ** 2)[a > 0].mean())
    with pytest.raises(TypeError, match="callable"):
        fnn.Criterion("mse")  # type: ignore[arg-type]


def test_criterion_checks_its_options_at_construction() -> None:
    """As the named criteria do: an option the loss does not take, or a reduction outside its
    ``Literal``, fails when the criterion is built, not at its first call. Functions taking
    ``**kwargs`` (combinators) accept any option."""
    with pytest.raises(TypeError, match=r"options that mse_loss takes \(input, target, reduction, weight\), got foo"):
        fnn.Criterion(fl.mse_loss, foo=1)
    with pytest.raises(ValueError, match=r"'none', 'mean', 'sum', 'batchmean'.*got 'avg'"):
        fnn.Criterion(fl.kl_div, reduction="avg")
    with pytest.raises(ValueError, match="got 'batchmean'"):
        fnn.Criterion(fl.mse_loss, reduction="batchmean")
    assert fnn.Criterion(fl.kl_div, reduction="batchmean").options == {"reduction": "batchmean"}
    assert fnn.Criterion(functools.partial(fl.huber_loss, delta=2.0), reduction="sum").options["reduction"] == "sum"
    fnn.Criterion(fl.loss_sum({"a": fl.mse_loss}), reduction="sum")


def test_criterion_buffers_move_and_swap() -> None:
    crit = fnn.Criterion(fl.cross_entropy, weight=torch.tensor([1.0, 3.0]))
    crit = crit.to(torch.float64)
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(crit(x, y), fl.cross_entropy(x, y, torch.tensor([1.0, 3.0], dtype=torch.float64)))
    out = torch.func.functional_call(crit, {"weight": torch.tensor([1.0, 1.0], dtype=torch.float64)}, (x, y))
    torch.testing.assert_close(out, fl.cross_entropy(x, y))
    assert quiet_call(crit, x, y).dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_tensors_held_inside_a_loss_are_buffers(device: str) -> None:
    """A combinator's weight or mask, or a keyword bound with functools.partial, at any depth:
    buffers named by their path, moved by ``.to()``, loaded from a state dict and swapped by
    functional_call, each call using the buffers' current tensors."""
    class_w = torch.tensor([1.0, 2.0, 3.0])
    rows = torch.tensor([True, False, True, True, True])
    ce_none = functools.partial(fl.cross_entropy, reduction="none")
    terms: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "ce": fl.weighted(ce_none, class_w, by="class", reduction="mean"),
        "focal": functools.partial(fl.focal_loss, weight=class_w),
        "kept": fl.masked(ce_none, rows, reduction="mean"),
    }
    mix = fl.loss_sum(terms)
    crit = fnn.Criterion(mix)
    assert list(crit.state_dict()) == ["loss_terms_ce_weight", "loss_terms_focal_weight", "loss_terms_kept_mask"]
    crit = crit.to(device, torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, device=device)
    y = torch.tensor([0, 2, 1, 1, 0], device=device)
    w64 = class_w.to(device, torch.float64)
    expected = (
        fl.cross_entropy(x, y, w64)
        + fl.focal_loss(x, y, w64)
        + fl.cross_entropy(x, y, reduction="none")[rows.to(device)].mean()
    )
    torch.testing.assert_close(crit(x, y), expected)
    assert "float64" in repr(crit)  # the repr shows the loss as it holds the buffers now
    # A loaded state dict and a functional_call swap both reach the loss.
    ones = torch.ones(3, dtype=torch.float64, device=device)
    crit.load_state_dict({**crit.state_dict(), "loss_terms_ce_weight": ones})
    swapped = torch.func.functional_call(crit, {"loss_terms_focal_weight": ones}, (x, y))
    plain = (
        fl.cross_entropy(x, y) + fl.focal_loss(x, y) + fl.cross_entropy(x, y, reduction="none")[rows.to(device)].mean()
    )
    torch.testing.assert_close(swapped, plain)
    with pytest.raises(ValueError, match=r"other than the buffer names.*loss_weight"):
        fnn.Criterion(fl.weighted(ce_none, class_w, by="class"), loss_weight=1.0)


def test_criterion_with_held_tensors_compiles_in_one_graph() -> None:
    """Rebuilding the wrapped loss from the buffers at each call is no graph break."""
    torch._dynamo.reset()
    ce_none = functools.partial(fl.cross_entropy, reduction="none")
    crit = fnn.Criterion(fl.weighted(ce_none, torch.tensor([1.0, 2.0, 3.0]), by="class", reduction="mean"))
    x, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(torch.compile(crit, fullgraph=True)(x, y), crit(x, y))


def test_linear_cross_entropy_criterion_with_out_features() -> None:
    torch.manual_seed(3)
    theirs = nn.LinearCrossEntropyLoss(4, 3, out_features=(2,), bias=True).double()
    torch.manual_seed(3)
    ours = fnn.LinearCrossEntropyLoss(4, 3, out_features=(2,), bias=True).double()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5, 2))
    torch.testing.assert_close(ours(x, y), theirs(x, y))
