"""Sample-quality metrics: references computed independently here, MNIST read straight from the IDX files."""
from __future__ import annotations

import gzip
import logging
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from pipelines.config import EvalConfig
from pipelines.metrics import (
    METRICS,
    ClassifierCacheError,
    compute_cheap_metrics,
    compute_metrics,
    frechet_distance_from_features,
    kernel_distance,
    load_or_train_classifier,
    manifold_metrics,
    metric_direction,
    real_floor,
    to_uint8,
    train_domain_classifier,
)
from pipelines.metrics import classifier as classifier_mod
from pipelines.metrics import inception as inception_mod

import pipelines.data

MNIST = Path(pipelines.data.__file__).resolve().parent / "mnist"  # the copy bundled with the package


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads oversubscribe and run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mnist():
    if not (MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST IDX files not found under {MNIST}")
    return {
        "xtr": read_idx(MNIST / "train-images-idx3-ubyte.gz")[:, None],
        "ytr": read_idx(MNIST / "train-labels-idx1-ubyte.gz").astype(np.int64),
        "xte": read_idx(MNIST / "t10k-images-idx3-ubyte.gz")[:, None],
        "yte": read_idx(MNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64),
    }


@pytest.fixture(scope="module")
def clf(mnist):
    t0 = time.perf_counter()
    model = train_domain_classifier(mnist["xtr"], mnist["ytr"], mnist["xte"], mnist["yte"], num_classes=10,
                                    epochs=1, seed=0, max_train=20_000)
    print(f"classifier: {time.perf_counter() - t0:.1f} s, held-out accuracy {model.heldout_accuracy:.4f}")
    return model


CFG = EvalConfig(num_samples=2000, kid_subset_size=500, kid_num_subsets=10, inception=False)


# ------------------------------------------------------------------------------------------ independent references
def ref_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = (a - mu1).T @ (a - mu1) / (len(a) - 1)
    s2 = (b - mu2).T @ (b - mu2) / (len(b) - 1)
    # Tr (S1 S2)^1/2 = sum sqrt(eig(S1^1/2 S2 S1^1/2)), the symmetric form, via eigh
    w, v = linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sqrt(np.clip(linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


def ref_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (np.einsum("id,jd->ij", a, b) / d + 1) ** 3  # noqa: E731
    m = len(x)
    off = ~np.eye(m, dtype=bool)
    return float(k(x, x)[off].mean() + k(y, y)[off].mean() - 2 * k(x, y).mean())


def ref_manifold(g: np.ndarray, r: np.ndarray, kp: int, kd: int) -> dict:
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def kth(a, k):  # k-th nearest neighbour distance, self excluded
        return np.array([np.sort(np.delete(dist(a[i:i + 1], a)[0], i))[k - 1] for i in range(len(a))])

    drg = dist(r, g)
    rp, rd, gp = kth(r, kp), kth(r, kd), kth(g, kp)
    precision = np.mean([any(drg[i, j] <= rp[i] for i in range(len(r))) for j in range(len(g))])
    recall = np.mean([any(drg[i, j] <= gp[j] for j in range(len(g))) for i in range(len(r))])
    density = np.mean([sum(drg[i, j] < rd[i] for i in range(len(r))) for j in range(len(g))]) / kd
    coverage = np.mean([drg[i].min() < rd[i] for i in range(len(r))])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


# ------------------------------------------------------------------------------------------------------ math
def test_frechet_matches_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    b = rng.normal(0.3, 1.5, size=(150, 8)) @ rng.normal(size=(8, 8))
    assert frechet_distance_from_features(a, b) == pytest.approx(ref_frechet(a, b), rel=1e-6)
    assert frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_singular_covariance_is_finite():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.normal(size=(50, 4)), np.zeros((50, 4))], 1)  # rank 4 of 8
    b = np.concatenate([rng.normal(size=(50, 4)), np.zeros((50, 4))], 1)
    fd = frechet_distance_from_features(a, b)
    assert np.isfinite(fd) and fd == pytest.approx(ref_frechet(a, b), rel=1e-3, abs=1e-6)


def test_kid_matches_reference():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 6)), rng.normal(0.5, 1.0, size=(40, 6))
    mean, std = kernel_distance(x, y, subset_size=40, num_subsets=3)  # whole sets: permutation-invariant
    assert mean == pytest.approx(ref_mmd2(x, y), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)
    # subsets: the mean of per-subset references over the same draws
    xs, ys = rng.normal(size=(100, 6)), rng.normal(0.2, 1.0, size=(120, 6))
    mean, std = kernel_distance(xs, ys, subset_size=30, num_subsets=5, seed=7)
    draw = np.random.default_rng(7)
    vals = []
    for _ in range(5):
        vals.append(ref_mmd2(xs[draw.choice(100, 30, replace=False)], ys[draw.choice(120, 30, replace=False)]))
    assert mean == pytest.approx(np.mean(vals), rel=1e-9) and std == pytest.approx(np.std(vals), rel=1e-6)


def test_kid_too_few_samples_is_a_clear_error():
    x = np.zeros((99, 4))
    with pytest.raises(ValueError, match=r"at least 100 .*eval\.kid_subset_size.*99 generated"):
        kernel_distance(x, np.zeros((500, 4)), subset_size=100)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_manifold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(45, 5))
    r = rng.normal(0.3, 1.2, size=(60, 5))
    got = manifold_metrics(torch.tensor(g), r, pr_k=3, dc_k=5, chunk=7)  # tiny chunks: the chunking is exercised
    want = ref_manifold(g, r, 3, 5)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_to_uint8():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 255]
    assert to_uint8(np.array([-1.0, 1.0], np.float32)).dtype == torch.uint8


# ------------------------------------------------------------------------------------------- MNIST behaviour
def test_classifier_accuracy(clf):
    assert clf.heldout_accuracy > 0.95
    assert clf.features(torch.zeros(3, 1, 28, 28, dtype=torch.uint8)).shape == (3, clf.feature_dim)


def test_real_vs_real_far_below_noise(mnist, clf):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(2000, 1, 28, 28), dtype=np.uint8)
    real = mnist["xte"][:2000]
    cache: dict = {}
    fd_real = compute_metrics(mnist["xtr"][:2000], None, real, None, clf, CFG, False, 10, names=["domain_fd"],
                              cache=cache)["domain_fd"]
    fd_noise = compute_metrics(noise, None, real, None, clf, CFG, False, 10, names=["domain_fd"],
                               cache=cache)["domain_fd"]
    assert fd_real < 0.02 * fd_noise, (fd_real, fd_noise)
    floor = real_floor(mnist["xtr"], real, clf, CFG, names=["domain_fd", "precision_recall"], cache=cache)
    assert floor["domain_fd"] < 0.02 * fd_noise and floor["precision"] > 0.6 and floor["recall"] > 0.6
    assert floor["num_generated"] == CFG.num_samples
    cheap = compute_cheap_metrics(noise, real, clf, CFG, num_samples=2000, cache=cache)
    assert cheap["domain_fd"] == pytest.approx(fd_noise)


def test_single_class_generator_is_flagged(mnist, clf):
    real = mnist["xte"][:2000]
    ones = mnist["xtr"][mnist["ytr"] == 1][:2000]
    mixed = mnist["xtr"][:2000]
    names = ["precision_recall", "density_coverage", "class_kl", "classifier_score"]
    bad = compute_metrics(ones, None, real, None, clf, CFG, False, 10, names=names)
    good = compute_metrics(mixed, None, real, None, clf, CFG, False, 10, names=names)
    assert bad["recall"] < 0.3 < good["recall"]
    assert bad["coverage"] < 0.3 < good["coverage"]
    assert bad["class_kl"] > 1.0 > 20 * good["class_kl"]
    assert bad["classifier_score"] < 2.0 < 8.0 < good["classifier_score"]


def test_perfect_conditional_generator(mnist, clf):
    x, y = mnist["xte"], mnist["yte"]
    cfg = CFG.model_copy(update={"kid_subset_size": 1000})
    out = compute_metrics(x[:3000], y[:3000], x[5000:8000], y[5000:8000], clf, cfg, True, 10)
    held = clf.accuracy(x[:3000], y[:3000])
    assert out["label_accuracy"] == pytest.approx(held, abs=1e-6)
    assert abs(out["label_accuracy"] - clf.heldout_accuracy) < 0.02
    assert {f"domain_fd_class_{k}" for k in range(10)} <= set(out) and "domain_fd_class_mean" in out
    for key, value in out.items():  # every value a direction-bearing or informational finite float
        assert np.isfinite(value), key
    wrong = compute_metrics(x[:1000], (y[:1000] + 1) % 10, x[5000:], y[5000:], clf, cfg, True, 10,
                            names=["label_accuracy"])
    assert wrong["label_accuracy"] < 0.1


def test_code_purity_says_how_well_the_categories_line_up_with_the_classes(mnist, clf):
    x, y = mnist["xte"][:2000], mnist["yte"][:2000]
    predicted = clf.probs(x).argmax(1)
    names = ["code_purity"]
    # each category one class: as pure as the classifier is accurate; the classes' order does not matter
    lined_up = compute_metrics(x, None, x, None, clf, CFG, False, 10, names=names, generated_codes=(y * 3 + 1) % 10)
    assert lined_up["code_purity"] == pytest.approx(float((predicted == y).float().mean()), abs=0.01)
    assert lined_up["code_purity"] > 0.95 and lined_up["code_majority_classes"] == 10
    # two classes per category (a coarser code), then categories blind to the class
    paired = compute_metrics(x, None, x, None, clf, CFG, False, 10, names=names, generated_codes=y // 2)
    assert 0.4 < paired["code_purity"] < 0.6 and paired["code_majority_classes"] == 5
    blind = compute_metrics(x, None, x, None, clf, CFG, False, 10, names=names,
                            generated_codes=torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(0)))
    assert blind["code_purity"] < 0.25
    # the default set has it only for a coded generator
    assert "code_purity" in compute_metrics(x[:600], None, x[:600], None, clf, CFG, False, 10,
                                            generated_codes=y[:600] % 10)
    assert "code_purity" not in compute_metrics(x[:600], None, x[:600], None, clf, CFG, False, 10)


def test_compute_metrics_guards(mnist, clf):
    x = mnist["xte"]
    with pytest.raises(ValueError, match="eval.kid_subset_size"):
        compute_metrics(x[:400], None, x[5000:], None, clf, CFG, False, 10)  # 400 < 500, before any work
    with pytest.raises(TypeError, match="to_uint8"):
        compute_metrics(torch.zeros(600, 1, 28, 28), None, x[:600], None, clf, CFG, False, 10)
    with pytest.raises(ValueError, match="conditional"):
        compute_metrics(x[:600], None, x[:600], None, clf, CFG, False, 10, names=["label_accuracy"])
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(x[:600], None, x[:600], None, clf, CFG, False, 10, names=["fid50k"])
    with pytest.raises(ValueError, match="code_categories"):
        compute_metrics(x[:600], None, x[:600], None, clf, CFG, False, 10, names=["code_purity"])


def test_directions():
    assert metric_direction("domain_fd") == "min" and metric_direction("recall") == "max"
    assert metric_direction("domain_fd_class_3") == "min" and metric_direction("num_real") is None
    assert {"domain_fd", "domain_kid", "precision_recall", "density_coverage", "classifier_score", "class_kl",
            "label_accuracy", "per_class_fd", "inception_fd", "inception_kid"} <= set(METRICS)


# ------------------------------------------------------------------------------------------- classifier cache
def test_classifier_cache_roundtrip_and_planted_pickle(mnist, tmp_path, monkeypatch):
    x, y = mnist["xtr"][:1500], mnist["ytr"][:1500]
    kw = dict(heldout_images=mnist["xte"][:500], heldout_labels=mnist["yte"][:500], num_classes=10, epochs=1, seed=3)
    first = load_or_train_classifier(tmp_path, "abc123", x, y, **kw)
    again = train_domain_classifier(x, y, num_classes=10, epochs=1, seed=3, heldout_images=None, heldout_labels=None)
    assert again.fingerprint == first.fingerprint  # deterministic for a fixed seed

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    def no_training(*a, **k):
        raise AssertionError("retrained although the cache was valid")

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(classifier_mod, "train_domain_classifier", no_training)
    loaded = load_or_train_classifier(tmp_path, "abc123", x, y, **kw)
    assert calls == [True]
    assert loaded.fingerprint == first.fingerprint and loaded.heldout_accuracy == first.heldout_accuracy
    probe = mnist["xte"][:50]
    assert torch.equal(loaded.features(probe), first.features(probe))

    # plant a malicious pickle at the cache path: it must be refused, not executed, and not silently replaced
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    weights, _ = classifier_mod.cache_paths(tmp_path, "abc123")
    weights.write_bytes(pickle.dumps({"body.0.0.weight": Evil()}))
    with pytest.raises(ClassifierCacheError, match="weights_only=True"):
        load_or_train_classifier(tmp_path, "abc123", x, y, **kw)
    assert not marker.exists()
    torch.save({"x": Evil()}, weights)  # the same through torch's zip format
    with pytest.raises(ClassifierCacheError, match="tampered"):
        load_or_train_classifier(tmp_path, "abc123", x, y, **kw)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- Inception
def test_inception_unavailable_is_one_warning_and_no_crash(mnist, clf, caplog, monkeypatch):
    monkeypatch.setattr(inception_mod, "_warned", set())
    monkeypatch.setenv("GAN_PIPELINE_OFFLINE", "1")
    caplog.set_level(logging.WARNING, logger="pipelines.metrics.inception")
    t0 = time.perf_counter()
    assert inception_mod.load_inception(None) is None
    assert inception_mod.load_inception(None) is None
    assert time.perf_counter() - t0 < 5
    lines = [r.getMessage() for r in caplog.records if "Inception metrics skipped" in r.getMessage()]
    assert len(lines) == 1 and "inception_weights" in lines[0], lines
    cfg = CFG.model_copy(update={"inception": True, "inception_weights": "/nonexistent/inception.pth"})
    out = compute_metrics(mnist["xte"][:600], None, mnist["xte"][600:1200], None, clf, cfg, False, 10,
                          names=["domain_fd", "inception_fd", "inception_kid"])
    assert "domain_fd" in out and "inception_fd" not in out


def test_inception_wrapper_preprocessing():
    seen = {}

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen["shape"], seen["dtype"] = tuple(x.shape), x.dtype
            return torch.ones(x.shape[0], 2048)

    feats = inception_mod.inception_features(inception_mod.InceptionFeatures(Stub()),
                                             torch.zeros(5, 1, 28, 28, dtype=torch.uint8), batch_size=2)
    assert feats.shape == (5, 2048) and seen == {"shape": (1, 3, 28, 28), "dtype": torch.uint8}
