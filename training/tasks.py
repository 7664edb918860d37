"""Tasks and task families: what an optimizer is meta-trained on.

A :class:`Task` is one optimization problem: initial parameters, and a loss of the parameters at a
given step (drawing its own minibatches). A :class:`TaskFamily` samples tasks from a
``torch.Generator``. Both are small base classes; users subclass them for their own problems.

Tasks are written functionally (the loss takes the parameters as a list of tensors) so that the
meta-trainer can differentiate through the optimizer's updates.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import load_fashion_mnist

__all__ = [
    "ModuleTask",
    "ConvFamily",
    "FAMILIES",
    "resolve_family",
    "Task",
    "TaskFamily",
    "QuadraticTask",
    "QuadraticFamily",
    "MLPTask",
    "MLPFamily",
    "MixtureFamily",
    "NormMLPFamily",
    "RescaledTask",
    "RescaledFamily",
    "ACTIVATIONS",
]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
}


def _choice(options: Sequence, generator: torch.Generator):
    """One of ``options``, drawn uniformly with ``generator``."""
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def _minibatch(x: Tensor, y: Tensor, batch_size: int, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """The minibatch of ``step``: examples drawn with a generator seeded by the task and the step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(0, len(x), (batch_size,), generator=g)
    return x[idx], y[idx]


def _check_dataset(dataset: str) -> None:
    if dataset not in ("fashion_mnist", "synthetic"):
        raise ValueError(f"dataset must be 'fashion_mnist' or 'synthetic', got {dataset!r}")


class Task:
    """One optimization problem.

    Subclasses implement :meth:`init_params` and :meth:`loss`; :attr:`roles` may name the update
    network of each tensor (``None``: chosen from the tensor's shape).
    """

    name: str = "task"

    def init_params(self) -> list[Tensor]:
        """Fresh initial parameters (plain tensors, no ``requires_grad``)."""
        raise NotImplementedError

    def loss(self, params: Sequence[Tensor], step: int) -> Tensor:
        """Scalar training loss at inner ``step`` (its minibatch is a function of the step)."""
        raise NotImplementedError

    def eval_loss(self, params: Sequence[Tensor]) -> Tensor:
        """Loss used to report progress; defaults to the loss at step 0's batch."""
        return self.loss(params, 0)

    def losses(self, params: Sequence[Tensor], step: int) -> tuple[Tensor, Tensor]:
        """``(loss the optimizee's gradient comes from, its term in the meta-loss)``.

        The same tensor by default; batched tasks (:mod:`learnedopt.training.batched`) weight
        their tasks differently in the meta-loss without changing each task's gradient.
        """
        loss = self.loss(params, step)
        return loss, loss

    @property
    def roles(self) -> list[str | None]:
        return [None] * len(self.init_params())


class TaskFamily:
    """A distribution over tasks."""

    name: str = "family"

    def sample(self, generator: torch.Generator) -> Task:
        raise NotImplementedError


# ---------------------------------------------------------------------- quadratics
class QuadraticTask(Task):
    """The paper's ``f(θ) = ||W θ - y||²`` with Gaussian ``W`` and ``y``."""

    name = "quadratic"

    def __init__(self, w: Tensor, y: Tensor, theta0: Tensor) -> None:
        self.w, self.y, self.theta0 = w, y, theta0

    def init_params(self) -> list[Tensor]:
        return [self.theta0.clone()]

    def loss(self, params: Sequence[Tensor], step: int) -> Tensor:
        r = self.w @ params[0] - self.y
        return (r * r).sum()

    @property
    def roles(self) -> list[str | None]:
        return ["dense"]


@dataclass
class QuadraticFamily(TaskFamily):
    """10-dimensional quadratics as in the paper (``θ0``, ``W`` and ``y`` standard normal)."""

    dim: int = 10
    name: str = "quadratic"

    def sample(self, generator: torch.Generator) -> QuadraticTask:
        d = self.dim
        w = torch.randn(d, d, generator=generator)
        y = torch.randn(d, generator=generator)
        theta0 = torch.randn(d, generator=generator)
        return QuadraticTask(w, y, theta0)


# ---------------------------------------------------------------------- MLPs
def synthetic_classification(
    generator: torch.Generator, n: int, dim: int, classes: int
) -> tuple[Tensor, Tensor]:
    """Inputs ``N(0, I)`` labelled by a random two-layer teacher network (a learnable problem)."""
    x = torch.randn(n, dim, generator=generator)
    w1 = torch.randn(dim, 32, generator=generator) / math.sqrt(dim)
    w2 = torch.randn(32, classes, generator=generator)
    y = (torch.tanh(x @ w1 * 2) @ w2).argmax(dim=1)
    return x, y


class MLPTask(Task):
    """A fully connected classifier trained with minibatches of a fixed data set."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        sizes: Sequence[int],
        activation: str,
        batch_size: int,
        seed: int,
        name: str = "mlp",
    ) -> None:
        self.x, self.y = x, y
        self.sizes = list(sizes)
        self.activation = ACTIVATIONS[activation]
        self.batch_size = batch_size
        self.seed = seed
        self.name = name

    def init_params(self) -> list[Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        params = []
        for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # torch.nn.Linear's default initialisation
            params.append((torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound)
            params.append((torch.rand(fan_out, generator=g) * 2 - 1) * bound)
        return params

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        return _minibatch(self.x, self.y, self.batch_size, self.seed, step)

    def forward(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        n_layers = len(params) // 2
        for layer in range(n_layers):
            x = F.linear(x, params[2 * layer], params[2 * layer + 1])
            if layer < n_layers - 1:
                x = self.activation(x)
        return x

    def loss(self, params: Sequence[Tensor], step: int) -> Tensor:
        x, y = self.batch(step)
        return F.cross_entropy(self.forward(params, x), y)

    def eval_loss(self, params: Sequence[Tensor]) -> Tensor:
        return F.cross_entropy(self.forward(params, self.x), self.y)

    @property
    def roles(self) -> list[str | None]:
        return [None] * (2 * (len(self.sizes) - 1))


@dataclass
class MLPFamily(TaskFamily):
    """MLP classifiers: the paper's Fashion/MNIST setup by default, or generated data.

    Attributes:
        dataset: ``"fashion_mnist"`` (read from ``data_dir``) or ``"synthetic"``.
        hidden: Choices of hidden-layer widths; one tuple is drawn per task.
        activations: Choices of activation.
        batch_sizes: Choices of batch size.
        data_dir: Folder holding ``fashion-mnist/`` (see :func:`learnedopt.training.data.data_dir`).
        synthetic_dims: Choices of input dimension for generated data.
        eval_examples: Examples of the training set used by ``eval_loss``.
        download: Fetch Fashion-MNIST if it is missing (needs internet).
    """

    dataset: str = "fashion_mnist"
    hidden: Sequence[Sequence[int]] = ((20,),)
    activations: Sequence[str] = ("sigmoid",)
    batch_sizes: Sequence[int] = (128,)
    data_dir: str | None = None
    synthetic_dims: Sequence[int] = (16, 32, 64)
    eval_examples: int = 4096
    download: bool = False
    name: str = "mlp"

    def __post_init__(self) -> None:
        _check_dataset(self.dataset)
        for act in self.activations:
            if act not in ACTIVATIONS:
                raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")

    def sample(self, generator: torch.Generator) -> MLPTask:
        hidden = list(_choice(self.hidden, generator))
        activation = _choice(self.activations, generator)
        batch_size = _choice(self.batch_sizes, generator)
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        if self.dataset == "fashion_mnist":
            x, y = load_fashion_mnist("train", self.data_dir, self.download)
            dim, classes = 784, 10
        else:
            dim = _choice(self.synthetic_dims, generator)
            classes = 10
            x, y = synthetic_classification(generator, 4096, dim, classes)
        # a fixed random subset for the reported (full-batch) loss keeps evaluation cheap
        sub = torch.randperm(len(x), generator=generator)[: self.eval_examples]
        x_eval, y_eval = x[sub], y[sub]
        task = MLPTask(x, y, [dim, *hidden, classes], activation, batch_size, seed,
                       name=f"{self.name}-{self.dataset}-{'x'.join(map(str, hidden))}-{activation}")
        task.eval_loss = lambda params, _t=task: F.cross_entropy(_t.forward(params, x_eval), y_eval)  # type: ignore[method-assign]
        return task


# ---------------------------------------------------------------------- mixtures
@dataclass
class MixtureFamily(TaskFamily):
    """Samples a family with probability proportional to its weight, then a task from it."""

    families: Sequence[TaskFamily] = field(default_factory=list)
    weights: Sequence[float] | None = None
    name: str = "mixture"

    def __post_init__(self) -> None:
        if not self.families:
            raise ValueError("MixtureFamily needs at least one family")
        if self.weights is not None and len(self.weights) != len(self.families):
            raise ValueError(
                f"MixtureFamily has {len(self.families)} families but {len(self.weights)} weights"
            )

    def sample(self, generator: torch.Generator) -> Task:
        weights = torch.tensor(self.weights if self.weights is not None else [1.0] * len(self.families))
        k = int(torch.multinomial(weights, 1, generator=generator))
        return self.families[k].sample(generator)


# ---------------------------------------------------------------------- tasks from nn.Modules
@lru_cache(maxsize=4)
def _pooled_fashion_mnist(size: int, data_dir: str | None, download: bool = False) -> tuple[Tensor, Tensor]:
    x, y = load_fashion_mnist("train", data_dir, download)
    return F.adaptive_avg_pool2d(x.view(-1, 1, 28, 28), size), y


class ModuleTask(Task):
    """A task made from a freshly initialised ``nn.Module``, a batch function and a loss function.

    The module's parameters are the task's parameters (their order is ``module.parameters()``);
    the loss runs the module functionally (``torch.func.functional_call``), so the meta-trainer can
    differentiate through the optimizer's updates.

    Args:
        module: The model, freshly initialised.
        batch: ``batch(step) -> (inputs, targets)``; a function of the step only.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        eval_batch: Data for :meth:`eval_loss` (default: the batch of step 0).
    """

    def __init__(self, module: torch.nn.Module, batch: Callable[[int], tuple[Tensor, Tensor]],
                 loss_fn: Callable[[Tensor, Tensor], Tensor], eval_batch: tuple[Tensor, Tensor] | None = None,
                 name: str = "module") -> None:
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]
        self.initial = [p.detach().clone() for p in module.parameters()]
        self.batch = batch
        self.loss_fn = loss_fn
        self.eval_batch = eval_batch
        self.name = name

    def init_params(self) -> list[Tensor]:
        return [p.clone() for p in self.initial]

    def _loss_on(self, params: Sequence[Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        out = torch.func.functional_call(self.module, dict(zip(self.names, params)), (x,))
        return self.loss_fn(out, y)

    def loss(self, params: Sequence[Tensor], step: int) -> Tensor:
        return self._loss_on(params, self.batch(step))

    def eval_loss(self, params: Sequence[Tensor]) -> Tensor:
        return self._loss_on(params, self.eval_batch if self.eval_batch is not None else self.batch(0))

    @property
    def roles(self) -> list[str | None]:
        return [None] * len(self.initial)


@dataclass
class ConvFamily(TaskFamily):
    """A small conv net with a dense head on Fashion-MNIST (or generated images).

    Two 3x3 conv layers (``channels`` each, ReLU, 2x2 max-pool) on images downsampled to
    ``image_size``, then a dense classifier: conv kernels and dense weights both get updates, so
    a bundle's ``conv`` and ``dense`` networks are meta-trained together.
    """

    dataset: str = "fashion_mnist"
    channels: Sequence[int] = (8,)
    image_size: int = 14
    batch_sizes: Sequence[int] = (64,)
    data_dir: str | None = None
    eval_examples: int = 1024
    download: bool = False
    name: str = "conv"

    def sample(self, generator: torch.Generator) -> ModuleTask:
        c, batch_size = _choice(self.channels, generator), _choice(self.batch_sizes, generator)
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        if self.dataset == "fashion_mnist":
            x, y = _pooled_fashion_mnist(self.image_size, self.data_dir, self.download)
        else:
            x = torch.randn(2048, 1, self.image_size, self.image_size, generator=generator)
            y = (x.mean(dim=(1, 2, 3)) * 4 + torch.randn(2048, generator=generator)).clamp(-2, 1.99).add(2).mul(2.5).long()
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        side = self.image_size // 4
        module = torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(c * side * side, 10),
        )
        torch.random.set_rng_state(torch_state)
        sub = torch.randperm(len(x), generator=generator)[: self.eval_examples]

        batch = functools.partial(_minibatch, x, y, batch_size, seed)
        return ModuleTask(module, batch, F.cross_entropy, (x[sub], y[sub]), name=f"conv-{self.dataset}-{c}")


# ---------------------------------------------------------------------- MLPs with normalisation, regression
@dataclass
class NormMLPFamily(TaskFamily):
    """MLPs with optional LayerNorm after each hidden layer, for classification or regression.

    Regression targets come from a random teacher network (``synthetic``) or, on Fashion-MNIST,
    from predicting the one-hot label with a squared error. Norm scales and shifts are 1-d
    parameters, so a bundle's ``bias`` network meets them.

    Attributes:
        dataset: ``"fashion_mnist"`` or ``"synthetic"``.
        objective: Choices among ``"classification"`` (cross-entropy) and ``"regression"`` (MSE).
        norms: Choices among ``"layer"`` (LayerNorm after each hidden layer) and ``"none"``.
        hidden, activations, batch_sizes, synthetic_dims: Choices, one drawn per task.
    """

    dataset: str = "synthetic"
    objective: Sequence[str] = ("classification", "regression")
    norms: Sequence[str] = ("layer", "none")
    hidden: Sequence[Sequence[int]] = ((32,), (32, 32))
    activations: Sequence[str] = ("relu", "tanh", "gelu")
    batch_sizes: Sequence[int] = (32, 128)
    synthetic_dims: Sequence[int] = (16, 32)
    data_dir: str | None = None
    eval_examples: int = 2048
    download: bool = False
    name: str = "mlp-norm"

    def __post_init__(self) -> None:
        _check_dataset(self.dataset)
        for value, allowed, what in ((self.objective, ("classification", "regression"), "objective"),
                                     (self.norms, ("layer", "none"), "norms"),
                                     (self.activations, tuple(ACTIVATIONS), "activations")):
            bad = [v for v in value if v not in allowed]
            if bad or not value:
                raise ValueError(f"{what} must be a non-empty list from {list(allowed)}, got {list(value)}")

    def sample(self, generator: torch.Generator) -> ModuleTask:
        def choice(options):
            return _choice(options, generator)

        objective, norm, hidden = choice(self.objective), choice(self.norms), list(choice(self.hidden))
        activation, batch_size = choice(self.activations), choice(self.batch_sizes)
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        if self.dataset == "fashion_mnist":
            x, labels = _pooled_fashion_mnist(14, self.data_dir, self.download)
            x = x.flatten(1)
            dim, out = x.shape[1], 10
            y = labels if objective == "classification" else F.one_hot(labels, 10).float()
        else:
            dim = choice(self.synthetic_dims)
            if objective == "classification":
                x, y = synthetic_classification(generator, 4096, dim, 10)
                out = 10
            else:
                out = 4
                x = torch.randn(4096, dim, generator=generator)
                w1 = torch.randn(dim, 32, generator=generator) / math.sqrt(dim)
                w2 = torch.randn(32, out, generator=generator) / math.sqrt(32)
                y = torch.tanh(x @ w1 * 2) @ w2 + 0.1 * torch.randn(4096, out, generator=generator)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        for fan_in, width in zip([dim, *hidden[:-1]], hidden):
            layers.append(torch.nn.Linear(fan_in, width))
            if norm == "layer":
                layers.append(torch.nn.LayerNorm(width))
            layers.append(_Activation(activation))
        layers.append(torch.nn.Linear(hidden[-1], out))
        module = torch.nn.Sequential(*layers)
        torch.random.set_rng_state(torch_state)
        sub = torch.randperm(len(x), generator=generator)[: self.eval_examples]

        batch = functools.partial(_minibatch, x, y, batch_size, seed)
        loss_fn = F.cross_entropy if objective == "classification" else F.mse_loss
        name = f"{self.name}-{self.dataset}-{objective}-{norm}-{'x'.join(map(str, hidden))}-{activation}"
        return ModuleTask(module, batch, loss_fn, (x[sub], y[sub]), name=name)


class _Activation(torch.nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return ACTIVATIONS[self.name](x)


# ---------------------------------------------------------------------- task augmentation
class RescaledTask(Task):
    """A task reparameterised as ``θ_i = s_i φ_i`` with one scale per tensor (task augmentation).

    The optimizer sees parameters ``φ = θ / s`` and gradients ``s ∂L/∂θ``: the same problem at a
    different scale, which teaches an update network not to rely on one gradient magnitude.
    """

    def __init__(self, task: Task, scales: Sequence[float]) -> None:
        self.task, self.scales = task, list(scales)
        self.name = f"{task.name}-rescaled"

    def _theta(self, params: Sequence[Tensor]) -> list[Tensor]:
        return [p * s for p, s in zip(params, self.scales)]

    def init_params(self) -> list[Tensor]:
        return [p / s for p, s in zip(self.task.init_params(), self.scales)]

    def loss(self, params: Sequence[Tensor], step: int) -> Tensor:
        return self.task.loss(self._theta(params), step)

    def eval_loss(self, params: Sequence[Tensor]) -> Tensor:
        return self.task.eval_loss(self._theta(params))

    @property
    def roles(self) -> list[str | None]:
        return self.task.roles


@dataclass
class RescaledFamily(TaskFamily):
    """Wraps a family: with ``probability``, a task's tensors get scales ``10**U(-log10_range, log10_range)``."""

    family: TaskFamily = field(default_factory=lambda: QuadraticFamily())
    probability: float = 0.5
    log10_range: float = 1.0
    name: str = "rescaled"

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0 or not self.log10_range >= 0:
            raise ValueError("probability must be in [0, 1] and log10_range >= 0")

    def sample(self, generator: torch.Generator) -> Task:
        task = self.family.sample(generator)
        if float(torch.rand((), generator=generator)) >= self.probability:
            return task
        n = len(task.init_params())
        exps = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * self.log10_range
        return RescaledTask(task, [10.0 ** float(e) for e in exps])


# ---------------------------------------------------------------------- registry
def _default_mix(data_dir: str | None = None) -> MixtureFamily:
    """Quadratics, Fashion-MNIST MLPs (the paper's and variants) and MLPs on generated data."""
    return MixtureFamily(
        [
            QuadraticFamily(),
            MLPFamily("fashion_mnist", hidden=((20,),), activations=("sigmoid",), data_dir=data_dir),
            MLPFamily("fashion_mnist", hidden=((20,), (32,), (16, 16)), activations=("relu", "tanh"),
                      batch_sizes=(64, 128), data_dir=data_dir),
            MLPFamily("synthetic", hidden=((32,), (16, 16)), activations=("sigmoid", "relu", "tanh")),
        ],
        weights=[1.0, 1.0, 1.0, 1.0],
    )


def _default_mix_wide(data_dir: str | None = None, rescale_probability: float = 0.5) -> TaskFamily:
    """``default-mix`` widened: LayerNorm MLPs, regression, small conv nets, batch sizes 32-256,
    GELU, and a share ``rescale_probability`` of all tasks rescaled per tensor by up to 10x either
    way (task augmentation)."""
    mix = MixtureFamily(
        [
            QuadraticFamily(),
            MLPFamily("fashion_mnist", hidden=((20,),), activations=("sigmoid",), data_dir=data_dir),
            MLPFamily("fashion_mnist", hidden=((20,), (32,), (16, 16)), activations=("relu", "tanh", "gelu"),
                      batch_sizes=(32, 128, 256), data_dir=data_dir),
            MLPFamily("synthetic", hidden=((32,), (16, 16)), activations=("sigmoid", "relu", "tanh")),
            NormMLPFamily("synthetic"),
            NormMLPFamily("fashion_mnist", hidden=((32,), (32, 16)), data_dir=data_dir),
            ConvFamily(channels=(4, 8), batch_sizes=(32, 64), data_dir=data_dir),
        ],
        weights=[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5],
        name="default-mix-wide",
    )
    if not rescale_probability:
        return mix
    return RescaledFamily(mix, probability=rescale_probability, log10_range=1.0, name="default-mix-wide")


#: Built-in task families by name. Each is called with the family's keyword arguments (and
#: ``data_dir`` for those that read data).
FAMILIES: dict[str, Callable[..., TaskFamily]] = {
    "quadratic": QuadraticFamily,
    "mlp": lambda data_dir=None, **kw: MLPFamily("fashion_mnist", data_dir=data_dir, **kw),
    "mlp-synthetic": lambda data_dir=None, **kw: MLPFamily(
        "synthetic", **{"hidden": ((32,),), "activations": ("sigmoid", "relu"), **kw}),
    "conv": lambda data_dir=None, **kw: ConvFamily(data_dir=data_dir, **kw),
    "default-mix": _default_mix,
    "mlp-norm": lambda data_dir=None, **kw: NormMLPFamily(data_dir=data_dir, **kw),
    "default-mix-wide": _default_mix_wide,
}
_NEEDS_DATA = {"mlp", "mlp-synthetic", "conv", "default-mix", "mlp-norm", "default-mix-wide"}


def resolve_family(spec: str | TaskFamily, kwargs: dict | None = None, data_dir: str | None = None) -> TaskFamily:
    """A task family from a built-in name, ``"module.path:ClassName"``, or an instance.

    ``"mixture:NAME=WEIGHT,NAME=WEIGHT"`` mixes built-in families.
    """
    import importlib

    kwargs = dict(kwargs or {})
    if isinstance(spec, TaskFamily):
        return spec
    if spec.startswith("mixture:"):
        parts = [p.split("=") for p in spec[len("mixture:"):].split(",") if p]
        try:
            names, weights = [p[0] for p in parts], [float(p[1]) if len(p) > 1 else 1.0 for p in parts]
        except ValueError:
            raise ValueError(f"bad mixture {spec!r}; write it as mixture:quadratic=1,mlp=2") from None
        return MixtureFamily([resolve_family(n, None, data_dir) for n in names], weights)
    if spec in FAMILIES:
        if spec in _NEEDS_DATA:
            kwargs.setdefault("data_dir", data_dir)
        return FAMILIES[spec](**kwargs)
    if ":" not in spec:
        raise ValueError(
            f"unknown task family {spec!r}; built-in families: {sorted(FAMILIES)}, a mixture "
            "'mixture:quadratic=1,mlp=1', or your own class as 'module.path:ClassName'"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"cannot import module {module_name!r} for task family {spec!r} ({err}); check the module "
            "path and that its folder is on PYTHONPATH"
        ) from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r} (task family {spec!r})") from None
    family = obj(**kwargs) if isinstance(obj, type) else obj
    if not isinstance(family, TaskFamily):
        raise TypeError(f"{spec} is not a learnedopt.training.TaskFamily (got {type(family).__name__})")
    return family
