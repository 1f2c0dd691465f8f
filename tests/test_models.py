"""Networks and batched partition gradients: exact against autograd run on each partition alone."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from minibatch_reference import assert_minibatch_grads

from cocoef_cli import config
from cocoef_cli.data import Dataset, partition_indices
from cocoef_cli.errors import ConfigError
from cocoef_cli.models import Objective, build_model
from cocoef_cli.rng import SeedRNG
from cocoef_cli.sim.engine import build_experiment, simulate

SEEDS = [3, 4]  # two replicates: different θ and different partitions


def image_data(n=23, shape=(1, 28, 28), classes=4, seed=0) -> Dataset:
    g = np.random.default_rng(seed)
    f = int(np.prod(shape))
    X, y = g.random((n, f)), np.arange(n) % classes
    return Dataset("tiny", X, y, g.random((7, f)), np.arange(7) % classes, "classification", classes, tuple(shape))


def reference_grad(
    model_name: str, model, theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor, scale: float
) -> torch.Tensor:
    """scale · Σ_s ∇ℓ_s(θ) by autograd through torch.nn layers built independently of the model code."""
    th = theta.detach().clone().requires_grad_(True)
    if model_name == "softmax":
        W = th.view(model.C, model.f)  # class-major, bias last: torch.nn.Linear.weight with the bias column
        z = Fn.linear(torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1), W)
    elif model_name == "mlp":
        act = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[model.activation]
        z, off = X, 0
        for l, (i, o) in enumerate(zip(model.sizes[:-1], model.sizes[1:])):
            W = th[off : off + i * o].view(o, i)  # (out, in), as torch.nn.Linear.weight
            b = th[off + i * o : off + i * o + o]
            off += i * o + o
            z = Fn.linear(z, W, b)
            if l < len(model.sizes) - 2:
                z = act(z)
    else:  # cnn: a torch.nn LeNet, parameters loaded from θ in nn.Module order
        C, H, W_ = model.shape
        act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}[model.activation]
        layers, c = [], C
        for l, co in enumerate(model.channels):
            layers += [
                torch.nn.Conv2d(c, co, model.kernel, padding=model.pad if l == 0 else 0),
                act(),
                torch.nn.MaxPool2d(2),
            ]
            c = co
        layers.append(torch.nn.Flatten())
        sizes = [model.flat, *model.hidden, model.C]
        for l, (i, o) in enumerate(itertools.pairwise(sizes)):
            layers.append(torch.nn.Linear(i, o))
            if l < len(sizes) - 2:
                layers.append(act())
        net = torch.nn.Sequential(*layers).double()
        torch.nn.utils.vector_to_parameters(th.detach(), net.parameters())
        z = net(X.view(len(X), C, H, W_))
        loss = scale * Fn.cross_entropy(z, y, reduction="sum")
        grads = torch.autograd.grad(loss, list(net.parameters()))
        return torch.nn.utils.parameters_to_vector(grads)
    loss = scale * Fn.cross_entropy(z, y, reduction="sum")
    return torch.autograd.grad(loss, th)[0]


CASES = [
    ("softmax", {"name": "softmax", "bias": True}, (1, 6, 5)),
    ("mlp", {"name": "mlp", "hidden": [7], "activation": "relu"}, (1, 6, 5)),
    ("mlp", {"name": "mlp", "hidden": [6, 5], "activation": "tanh"}, (12,)),
    ("mlp", {"name": "mlp", "hidden": [4], "activation": "sigmoid", "init": "xavier"}, (12,)),
    ("mlp", {"name": "mlp", "hidden": [], "activation": "relu"}, (12,)),  # one layer: the first is the last
    ("cnn", {"name": "cnn", "channels": [2, 3], "kernel": 5, "hidden": [6, 5]}, (1, 28, 28)),
    ("cnn", {"name": "cnn", "channels": [2], "kernel": 3, "hidden": [], "activation": "tanh"}, (3, 32, 32)),
]


@pytest.mark.parametrize("name,mcfg,shape", CASES, ids=[f"{c[0]}-{c[1].get('activation', '')}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_grads_equal_autograd_per_partition(name, mcfg, shape, scheme):
    n = 23
    data = (
        image_data(n, shape)
        if len(shape) == 3
        else Dataset(
            "flat",
            np.random.default_rng(1).random((n, shape[0])),
            np.arange(n) % 4,
            np.zeros((0, shape[0])),
            np.zeros(0, np.int64),
            "classification",
            4,
        )
    )
    model = build_model({**mcfg, "init": mcfg.get("init", "torch")} if name != "softmax" else mcfg, data)
    parts = partition_indices(data.y_train, 4, {"partition": scheme, "alpha": 0.3}, SEEDS)
    sizes = (parts < n).sum(-1)
    assert len(set(sizes.ravel().tolist())) > 1  # unequal partition sizes
    l2 = 0.05
    obj = Objective(model, data, parts, l2, torch.float64, torch.device("cpu"))
    if name == "softmax":
        theta = 0.3 * torch.randn(len(SEEDS), model.D, dtype=torch.float64)
    else:
        theta = model.init(SeedRNG(SEEDS, "init"), torch.float64)
    G = obj.partition_grads(theta)
    assert G.shape == (len(SEEDS), 4, model.D)
    X, Y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)
    for r in range(len(SEEDS)):
        for j in range(4):
            idx = torch.as_tensor(parts[r, j][parts[r, j] < n])
            ref = reference_grad(name, model, theta[r], X[idx], Y[idx], 1.0 / n) + (len(idx) / n) * l2 * theta[r]
            torch.testing.assert_close(G[r, j], ref, rtol=1e-9, atol=1e-12)
    # Σ_j g_j = ∇F, and full_grad agrees with autograd on all samples
    full = torch.stack([reference_grad(name, model, theta[r], X, Y, 1.0 / n) for r in range(len(SEEDS))]) + l2 * theta
    torch.testing.assert_close(G.sum(1), full, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(obj.grad(theta), full, rtol=1e-9, atol=1e-12)
    # the blocks the engine encodes are G split by columns; evaluation's one-pass loss and gradient
    blocks = obj.partition_grad_blocks(theta)
    assert sum(b.shape[-1] for b in blocks) == model.D and all(b.is_contiguous() for b in blocks)
    torch.testing.assert_close(torch.cat(blocks, -1), G, rtol=0, atol=0)
    F, g = obj.loss_and_grad(theta)
    torch.testing.assert_close(F, obj.loss(theta), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, full, rtol=1e-9, atol=1e-12)
    # the evaluation's F from the partitions' own forward pass (padding rows weigh nothing)
    blocks, F = obj.partition_loss_grad_blocks(theta)
    torch.testing.assert_close(torch.cat(blocks, -1), G, rtol=0, atol=0)
    torch.testing.assert_close(F, obj.loss(theta), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["linear", "logistic", "softmax", "mlp"])
def test_partition_loss_is_the_training_loss_with_unequal_padded_partitions(name):
    """F from the partition forward pass (Σ_{j,b} ℓ/n + ½ l2 ‖θ‖²) equals F(θ) computed on the
    training set directly, for every model that fuses it; the gradients are the same bits."""
    n, g = 29, np.random.default_rng(3)
    task = "regression" if name == "linear" else "classification"
    classes = 2 if name == "logistic" else 3
    y = g.normal(size=n) if task == "regression" else np.arange(n) % classes
    data = Dataset("flat", g.normal(size=(n, 5)), y, np.zeros((0, 5)), np.zeros(0), task, classes)
    mcfg = {"name": name, "hidden": [4], "activation": "tanh", "init": "torch"} if name == "mlp" else {"name": name}
    model = build_model(mcfg, data)
    assert hasattr(model, "weighted_loss_grads")
    scheme = {"partition": "iid"} if task == "regression" else {"partition": "dirichlet", "alpha": 0.3}
    parts = partition_indices(data.y_train, 5, scheme, SEEDS)
    assert len(set((parts < n).sum(-1).ravel().tolist())) > 1
    obj = Objective(model, data, parts, 0.1, torch.float64, torch.device("cpu"))
    theta = 0.5 * torch.randn(len(SEEDS), model.D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = torch.cat(obj.partition_grad_blocks(theta), -1).clone()
    blocks, F = obj.partition_loss_grad_blocks(theta)
    torch.testing.assert_close(torch.cat(blocks, -1), G, rtol=0, atol=0)
    torch.testing.assert_close(F, obj.loss(theta), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(F, obj.loss(theta + 0.1))  # F depends on θ: the check can fail
    m = obj.evaluate(theta, blocks, F)
    torch.testing.assert_close(m.train_loss, F, rtol=0, atol=0)
    torch.testing.assert_close(m.grad, obj.grad(theta), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "softmax", "mlp"])
@pytest.mark.parametrize("batch", [None, 2])
def test_partition_gradients_by_rows_are_the_bits_of_the_whole(name, batch):
    """G written a range of rows at a time (PartitionGradients.write, ranges that cut a replicate
    in two or span two, l2 included, also a minibatch) are the same bits as G formed whole."""
    n, g = 31, np.random.default_rng(5)
    task = "regression" if name == "linear" else "classification"
    y = g.normal(size=n) if task == "regression" else np.arange(n) % 3
    data = Dataset("flat", g.normal(size=(n, 6)), y, np.zeros((0, 6)), np.zeros(0), task, 3)
    mcfg = {"name": name, "hidden": [5, 4], "activation": "relu", "init": "torch"} if name == "mlp" else {"name": name}
    model = build_model(mcfg, data)
    parts = partition_indices(data.y_train, 5, {"partition": "iid"}, SEEDS)
    theta = 0.5 * torch.randn(len(SEEDS), model.D, dtype=torch.float32, generator=torch.Generator().manual_seed(2))

    def objective():
        rng = SeedRNG(SEEDS, "batch") if batch else None
        return Objective(model, data, parts, 0.1, torch.float32, torch.device("cpu"), batch_size=batch, batch_rng=rng)

    whole = [b.clone() for b in objective().partition_grad_blocks(theta)]
    src = objective().partition_gradients(theta)  # the same minibatch draw: a fresh stream
    assert src.by_rows and src.rows == len(SEEDS) * 5 and src.widths == tuple(model.blocks)
    cuts = [0, 2, 3, 7, src.rows]  # 0–2, 2–3 in replicate 0; 3–7 spans replicates 0 and 1
    for a, b in itertools.pairwise(cuts):
        out = [torch.full((b - a, w), float("nan")) for w in src.widths]
        src.write(a, b, out)
        for o, ref in zip(out, whole):
            assert torch.equal(o, ref.reshape(-1, ref.shape[-1])[a:b])
    assert not torch.equal(whole[0], objective().partition_grad_blocks(theta + 0.1)[0])  # G depends on θ


@pytest.mark.parametrize("name", ["softmax", "mlp"])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_single_row_of_g_is_the_bits_of_the_whole_at_any_thread_count(name, threads):
    """Ranges shorter than the thread count (a batched product of one matrix can round otherwise
    than the same matrix in a larger batch when several threads share it: sgc's wrap-around reads
    one partition, uncoded's last part can hold one row) are the bits of G whole, at shapes
    large enough for the products to run on several threads."""
    n, g = 300, np.random.default_rng(5)
    data = Dataset(
        "flat", g.normal(size=(n, 64)), np.arange(n) % 10, np.zeros((0, 64)), np.zeros(0), "classification", 10
    )
    mcfg = {"name": "mlp", "hidden": [32], "activation": "relu", "init": "torch"} if name == "mlp" else {"name": name}
    model = build_model(mcfg, data)
    parts = partition_indices(data.y_train, 5, {"partition": "iid"}, SEEDS)
    theta = 0.5 * torch.randn(len(SEEDS), model.D, dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        obj = Objective(model, data, parts, 0.1, torch.float32, torch.device("cpu"))
        whole = [b.clone().reshape(-1, b.shape[-1]) for b in obj.partition_grad_blocks(theta)]
        src = obj.partition_gradients(theta)
        for a in range(src.rows):
            out = [torch.full((1, w), float("nan")) for w in src.widths]
            src.write(a, a + 1, out)
            assert all(torch.equal(o, w[a : a + 1]) for o, w in zip(out, whole)), a
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["linear", "logistic", "softmax", "mlp", "mlp0"])
def test_replicates_share_the_first_product_and_equal_each_seed_alone(name):
    """With R > 1 replicates the first product runs once on the shared rows (``Objective.rows``);
    replicate r's partition gradients and F equal the objective of its seed alone (R = 1, which
    keeps its own product) to rounding."""
    n, g = 31, np.random.default_rng(5)
    task = "regression" if name == "linear" else "classification"
    classes = 2 if name == "logistic" else 3
    y = g.normal(size=n) if task == "regression" else np.arange(n) % classes
    data = Dataset("flat", g.normal(size=(n, 6)), y, np.zeros((0, 6)), np.zeros(0), task, classes)
    hidden = [] if name == "mlp0" else [4]
    mcfg = (
        {"name": "mlp", "hidden": hidden, "activation": "tanh", "init": "torch"}
        if name.startswith("mlp")
        else {"name": name}
    )
    model = build_model(mcfg, data)
    seeds = [0, 1, 2]
    parts = partition_indices(data.y_train, 4, {"partition": "iid"}, seeds)
    obj = Objective(model, data, parts, 0.1, torch.float64, torch.device("cpu"))
    assert obj.rows is not None
    theta = 0.5 * torch.randn(3, model.D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    blocks, F = obj.partition_loss_grad_blocks(theta)
    G = torch.cat(blocks, -1)
    for r, seed in enumerate(seeds):
        alone = Objective(
            model,
            data,
            partition_indices(data.y_train, 4, {"partition": "iid"}, [seed]),
            0.1,
            torch.float64,
            torch.device("cpu"),
        )
        assert alone.rows is None
        b1, F1 = alone.partition_loss_grad_blocks(theta[r : r + 1])
        torch.testing.assert_close(G[r : r + 1], torch.cat(b1, -1), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(F[r : r + 1], F1, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(G[0], G[1])  # replicates differ (θ and partitions): the check can fail


def test_a_subclass_whose_partition_gradients_take_no_rows_keeps_the_per_replicate_product():
    from cocoef_cli.nets import MLP

    class Own(MLP):  # a plugin overriding weighted_grads with the older signature
        def weighted_grads(self, theta, Xp, Yp, Wp, out=None):
            return super().weighted_grads(theta, Xp, Yp, Wp, out)

    data = image_data(12, (1, 3, 3))
    parts = partition_indices(data.y_train, 3, {"partition": "iid"}, SEEDS)
    mcfg = {"name": "mlp", "hidden": [3], "activation": "tanh", "init": "torch"}
    assert Objective(build_model(mcfg, data), data, parts, 0.0, torch.float64, torch.device("cpu")).rows is not None
    own = Objective(Own(mcfg, data), data, parts, 0.0, torch.float64, torch.device("cpu"))
    assert own.rows is None
    theta = own.model.init(SeedRNG(SEEDS, "init"), torch.float64)
    assert own.partition_grads(theta).shape == (len(SEEDS), 3, own.model.D)


@pytest.mark.parametrize("name", ["softmax", "mlp"])
def test_a_subclass_overriding_only_weighted_grads_is_used_in_every_path(name):
    """A plugin that extends a built-in model and overrides only ``weighted_grads`` (here: twice
    the built-in's) gets its override in G formed whole, in G by parts and in the evaluation's
    (G, F): the built-in's ``weighted_terms`` and ``weighted_loss_grads``, which it inherits, do
    not bypass it."""
    from cocoef_cli.models import Softmax
    from cocoef_cli.nets import MLP

    base = MLP if name == "mlp" else Softmax

    class Twice(base):  # type: ignore[valid-type, misc]
        def weighted_grads(self, theta, Xp, Yp, Wp, out=None, rows=None):
            return [2 * b for b in super().weighted_grads(theta, Xp, Yp, Wp, rows=rows)]

    data = image_data(12, (1, 3, 3))
    parts = partition_indices(data.y_train, 3, {"partition": "iid"}, SEEDS)
    mcfg = {"name": name, "hidden": [3], "activation": "tanh", "init": "torch"} if name == "mlp" else {"name": name}

    def objective(model):
        return Objective(model, data, parts, 0.0, torch.float64, torch.device("cpu"))

    plain, twice = objective(build_model(mcfg, data)), objective(Twice(mcfg, data))
    theta = plain.model.init(SeedRNG(SEEDS, "init"), torch.float64)
    want = [2 * b for b in plain.partition_grad_blocks(theta)]
    got = twice.partition_gradients(theta)
    assert not got.by_rows
    for g_, w in zip(got.blocks(), want):
        torch.testing.assert_close(g_, w)
    blocks, F = twice.partition_loss_grad_blocks(theta)
    for g_, w in zip(blocks, want):
        torch.testing.assert_close(g_, w)
    torch.testing.assert_close(F, plain.train_loss(theta))
    assert plain.partition_gradients(theta).by_rows  # the built-in itself keeps G by parts


@pytest.mark.parametrize(
    "name,mcfg",
    [
        ("mlp", {"name": "mlp", "hidden": [5], "activation": "relu"}),
        ("softmax", {"name": "softmax"}),
        ("cnn", {"name": "cnn", "channels": [2], "kernel": 5, "hidden": [4]}),
    ],
)
def test_minibatch_grads_are_autograd_on_the_drawn_samples(name, mcfg):
    """batch_size=b: g_j = (|P_j| / (b_j n)) Σ_{s ∈ batch_j} ∇ℓ_s with b_j = min(b, |P_j|) distinct samples
    of P_j, drawn from the run's ``batch`` stream (reproduced here from a fresh copy of the stream)."""
    n, b = 30, 4
    data = image_data(n, (1, 12, 12))
    model = build_model({**mcfg, "init": "torch"} if name != "softmax" else mcfg, data)
    theta = 0.2 * torch.randn(len(SEEDS), model.D, dtype=torch.float64)
    assert_minibatch_grads(  # 9 partitions of 30: sizes 4 and 3, so b_j < b too
        model, data, SEEDS, b, theta, lambda r, th, Xb, Yb, w: reference_grad(name, model, th, Xb, Yb, w)
    )


def test_minibatch_at_least_the_partition_is_the_full_partition_gradient():
    data = image_data(26, (1, 6, 6))
    model = build_model({"name": "mlp", "hidden": [5], "activation": "tanh", "init": "kaiming"}, data)
    parts = partition_indices(data.y_train, 5, {"partition": "iid"}, SEEDS)
    theta = model.init(SeedRNG(SEEDS, "init"), torch.float64)
    full = Objective(model, data, parts, 0.1, torch.float64, torch.device("cpu")).partition_grads(theta)
    mb = Objective(
        model, data, parts, 0.1, torch.float64, torch.device("cpu"), batch_size=50, batch_rng=SeedRNG(SEEDS, "batch")
    ).partition_grads(theta)
    torch.testing.assert_close(mb, full, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("init", ["torch", "kaiming", "xavier"])
def test_network_init_is_per_replicate_seeded_and_bounded(init):
    data = image_data(10, (1, 28, 28))
    model = build_model({"name": "cnn", "channels": [6, 16], "kernel": 5, "hidden": [120, 84], "init": init}, data)
    assert model.D == (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 4 + 4)  # LeNet-5
    th = model.init(SeedRNG([0, 1], "init"), torch.float64)
    again = model.init(SeedRNG([1], "init"), torch.float64)
    torch.testing.assert_close(th[1:], again)  # replicate r is the run with seed r alone
    assert not torch.equal(th[0], th[1])
    W1 = model.unflatten(th)[0]  # conv0.weight, fan_in 25
    bound = {"torch": 1 / 5, "kaiming": (6 / 25) ** 0.5, "xavier": (6 / (25 + 150)) ** 0.5}[init]
    assert W1.abs().max() <= bound and W1.abs().max() > 0.8 * bound
    b1 = model.unflatten(th)[1]
    assert (b1 == 0).all() if init != "torch" else (b1.abs() > 0).all()


def test_network_logits_shared_and_per_replicate_agree():
    data = image_data(9, (1, 28, 28))
    for cfg in ({"name": "cnn", "channels": [2, 3], "kernel": 5, "hidden": [5]}, {"name": "mlp", "hidden": [5]}):
        model = build_model({**cfg, "init": "torch"}, data)
        th = model.init(SeedRNG([0, 1], "init"), torch.float64)
        X = torch.as_tensor(data.X_train)
        Z = model.logits(th, X)
        assert Z.shape == (2, 9, 4)
        Zr = model.logits(th, X.reshape(1, 3, 3, -1).expand(2, 3, 3, X.shape[1]))  # (R, N, B, f) layout
        torch.testing.assert_close(Zr.reshape(2, 9, 4), Z)


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"name": "mlp", "hidden": [64], "activation": "gelu"}, "model.activation"),
        ({"name": "mlp", "hidden": [0]}, "model.hidden"),
        ({"name": "mlp", "hidden": 64}, "model.hidden"),
        ({"name": "mlp", "hidden": [8], "init": "zeros"}, "model.init"),
        ({"name": "cnn", "channels": [6, 16], "hidden": [8], "kernel": 0}, "model.kernel"),
    ],
)
def test_bad_network_config_names_the_key(cfg, key):
    with pytest.raises(ConfigError) as e:
        build_model(cfg, image_data(5, (1, 28, 28)))
    assert e.value.key == key


def test_cnn_needs_images():
    flat = Dataset(
        "flat", np.zeros((4, 5)), np.arange(4) % 2, np.zeros((0, 5)), np.zeros(0, np.int64), "classification", 2
    )
    with pytest.raises(ConfigError) as e:
        build_model({"name": "cnn", "channels": [6, 16], "kernel": 5, "hidden": [8]}, flat)
    assert e.value.key == "model" and "image" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_model(
            {"name": "cnn", "channels": [6, 16, 32, 64], "kernel": 5, "hidden": [8]}, image_data(4, (1, 28, 28))
        )
    assert e.value.key == "model.channels"


def test_short_mnist5k_run_improves_test_accuracy():
    cfg = config.load(
        [
            "dataset=mnist5k",
            "model=mlp",
            "model.hidden=[32]",
            "devices=20",
            "code=sgc",
            "code.d=2",
            "straggler.p=0.2",
            "compressor=topk",
            "compressor.ratio=0.05",
            "optim.lr=0.5",
            "iters=25",
            "eval_every=25",
            "seeds=2",
        ]
    )
    exp = build_experiment(cfg)
    assert (exp.data.n, len(exp.data.y_test), exp.data.shape) == (4000, 1000, (1, 28, 28))
    df = simulate(exp).metrics
    first, last = df[df.iter == 0], df[df.iter == 25]
    assert (first.test_acc < 0.25).all()  # the random initial network is near chance (10 classes)
    assert (last.test_acc.to_numpy() > first.test_acc.to_numpy() + 0.4).all()
    assert (last.train_loss.to_numpy() < first.train_loss.to_numpy()).all()


def test_mlp_theta_loads_into_the_matching_torch_nn_sequential():
    """θ has torch.nn's layout: vector_to_parameters(θ, nn.Sequential(Linear, act, Linear)) gives
    a network with the same logits (docs/workloads.md, Models)."""
    data = image_data(9, (1, 6, 5))
    model = build_model({"name": "mlp", "hidden": [7], "activation": "tanh", "init": "torch"}, data)
    theta = model.init(SeedRNG([3], "init"), torch.float64)
    net = torch.nn.Sequential(torch.nn.Linear(30, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4)).double()
    torch.nn.utils.vector_to_parameters(theta[0], net.parameters())
    X = torch.as_tensor(data.X_train)
    torch.testing.assert_close(model.logits(theta, X)[0], net(X), rtol=1e-12, atol=1e-12)
