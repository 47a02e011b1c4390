"""Sample-quality metrics (trainer/metrics/) and the `evaluate` / `ref-stats` commands.

CPU and offline: the Inception network has seeded random weights (no weights file exists here),
and a weights file written from that network exercises the file-loading path. Inception costs
about a second per image on this shared CPU, so the tests run it on a few tiny images only; the
metric maths are checked on synthetic features against independent computations.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
import typer
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from typer.testing import CliRunner

from pipeline import uri as U
from pipeline.cli.evaluate import register
from pipeline.preprocess import preprocess_image_bytes
from trainer import metrics as M
from trainer.metrics.inception import _ImagesNHWC

runner = CliRunner()
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
register(app)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The CPU is shared by several test runs; one thread each is several times faster than two
    # competing ones for these small Inception batches. Restored afterwards.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def extractor():
    ext, _ = M.load_inception("random", "cpu")
    return ext


@pytest.fixture(scope="module")
def weights_file(extractor, tmp_path_factory) -> str:
    """The random network's weights as a torch-fidelity-style .pth state dict."""
    path = str(tmp_path_factory.mktemp("weights") / "inception-random.pth")
    torch.save(extractor.network.state_dict(), path)
    return path


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory) -> dict:
    """Two sets of 4 non-square images (H 40, W 56: a transposed layout would show): A is noise, B
    smooth colour fields. Each as an ADM .npz and as a folder of PNGs."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(4, 40, 56, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:40, 0:56]
    b = np.stack(
        [np.stack([(xx * 4 + 60 * i) % 256, (yy * 6 + 30 * i) % 256, np.full_like(xx, 50 * i)], -1) for i in range(4)]
    ).astype(np.uint8)
    out = {"A": a, "B": b}
    for name, images in (("A", a), ("B", b)):
        np.savez(root / f"{name}.npz", arr_0=images)
        folder = root / name
        folder.mkdir()
        for i, image in enumerate(images):
            (folder / f"{i:03d}.png").write_bytes(_png_bytes(image))
        out[f"{name}_npz"], out[f"{name}_dir"] = str(root / f"{name}.npz"), str(folder)
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def our_features(extractor, image_sets) -> dict:
    return {name: M.inception_features(image_sets[name], extractor, batch_size=64) for name in ("A", "B")}


def _fid_low_rank(x: np.ndarray, y: np.ndarray) -> float:
    """FID of two feature sets, computed independently of the eigenvalue route: with centred
    features A1, A2, S1 S2 = A1^T A1 A2^T A2 / c has the non-zero eigenvalues of M M^T, M = A1 A2^T,
    so tr sqrt(S1 S2) is the nuclear norm of M over sqrt(c) (exact, and cheap for few samples)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    a1, a2 = x - x.mean(0), y - y.mean(0)
    c1, c2 = len(x) - 1, len(y) - 1
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + (a1**2).sum() / c1 + (a2**2).sum() / c2 - 2 * nuclear)

# --------------------------------------------------------------------------------------------
# metric maths on synthetic features


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 24))
    y = rng.normal(size=(300, 24)) @ (0.4 * rng.normal(size=(24, 24))) + 0.7
    mu1, s1 = M.feature_statistics(x)
    mu2, s2 = M.feature_statistics(y)
    np.testing.assert_allclose(mu1, x.mean(0))
    np.testing.assert_allclose(s1, np.cov(x, rowvar=False))
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)
    # Identical sets: 0 up to rounding (relative to the traces involved).
    assert abs(M.frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)
    # Fewer samples than dimensions (rank-deficient covariances, as in the tests below): the
    # eigenvalue route agrees with the exact low-rank formula, up to the square roots of the
    # rounding-level eigenvalues of the null space (sqrt(1e-16) each).
    xs, ys = x[:9, :], y[:7, :] * 2
    assert M.frechet_distance(*M.feature_statistics(xs), *M.feature_statistics(ys)) == pytest.approx(
        _fid_low_rank(xs, ys), rel=1e-7)
    # The N x N route compute_metrics takes for N - 1 < D, against the same two; and for N - 1 >= D
    # it hands over to frechet_distance.
    assert M.frechet_distance_from_features(xs, *M.feature_statistics(ys)) == pytest.approx(_fid_low_rank(xs, ys), rel=1e-11)
    assert M.frechet_distance_from_features(xs, mu2, s2) == pytest.approx(
        M.frechet_distance(*M.feature_statistics(xs), mu2, s2), rel=1e-7)
    assert M.frechet_distance_from_features(x, mu2, s2) == M.frechet_distance(mu1, s1, mu2, s2)
    with pytest.raises(M.EvaluationError, match="shape"):
        M.frechet_distance(mu1, s1, mu2[:10], s2[:10, :10])
    with pytest.raises(M.EvaluationError, match="N >= 2"):
        M.feature_statistics(x[:1])


def test_inception_score_uniform_confident_and_hand_formula():
    assert M.inception_score(np.zeros((100, 10))) == pytest.approx((1.0, 0.0), abs=1e-12)
    # Confident and evenly spread over 10 classes: IS = 10, from logits or probabilities.
    labels = np.tile(np.arange(10), 10)
    onehot = np.eye(10)[labels]
    assert M.inception_score(onehot, splits=1, kind="probs")[0] == pytest.approx(10.0, rel=1e-9)
    assert M.inception_score(100.0 * onehot, splits=1)[0] == pytest.approx(10.0, rel=1e-9)
    # Every block of 10 rows holds each class once: in file order, each split scores 10.
    assert M.inception_score(onehot, splits=10, kind="probs", shuffle=False) == pytest.approx((10.0, 0.0), abs=1e-9)
    # Random predictions against ADM's formula, one split (shuffling cannot matter then).
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(64, 7)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    kl = p * (np.log(p) - np.log(p.mean(0, keepdims=True)))
    assert M.inception_score(logits, splits=1)[0] == pytest.approx(float(np.exp(kl.sum(1).mean())), rel=1e-10)
    with pytest.raises(M.EvaluationError, match="sum to 1"):
        M.inception_score(logits, kind="probs")


def _adm_inception_score(probs: np.ndarray, split_size: int) -> float:
    """guided-diffusion evaluations/evaluator.py compute_inception_score, on its softmax output."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_adm_splits_are_consecutive_chunks_in_file_order():
    from trainer.metrics.fid import ADM_ISC_SPLIT_SIZE

    assert ADM_ISC_SPLIT_SIZE == 5000
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(23, 6)) * 3  # 23 = 4 chunks of 5 and a short one of 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    mean, std = M.inception_score(logits, split_size=5)
    assert mean == pytest.approx(_adm_inception_score(p, 5), rel=1e-10) and std > 0
    assert M.inception_score(logits, split_size=5, seed=1, splits=2) == (mean, std)  # no shuffle, no `splits`
    assert M.inception_score(logits, split_size=100)[0] == pytest.approx(M.inception_score(logits, splits=1)[0])
    with pytest.raises(M.EvaluationError, match="split_size >= 1"):
        M.inception_score(logits, split_size=0)


@pytest.mark.timeout(120)
def test_inception_score_adm_and_shuffled_splits_agree_on_a_permuted_equal_label_file():
    """Logits of a 50,000-sample class-conditional file (a bump at each sample's class over random
    logits of 1000 classes; IS ~185): in the seeded order of `sample --labels equal` the ADM
    splits (5,000 consecutive samples) and the shuffled ones agree within 2%; written class by
    class (100 classes per ADM split), the ADM convention caps the score below 100."""
    from trainer.metrics.fid import ADM_ISC_SPLIT_SIZE
    from trainer.sampling import sample_labels

    permuted = sample_labels("equal", 50_000, 1000, seed=0)
    logits = np.random.default_rng(0).random((50_000, 1000), dtype=np.float32) * 3
    logits[np.arange(50_000), permuted] += 9.0
    adm, _ = M.inception_score(logits, split_size=ADM_ISC_SPLIT_SIZE)
    shuffled, _ = M.inception_score(logits, splits=10)
    assert adm > 150 and abs(adm - shuffled) / shuffled < 0.02, (adm, shuffled)
    in_class_order = logits[np.argsort(permuted, kind="stable")]
    assert M.inception_score(in_class_order, split_size=ADM_ISC_SPLIT_SIZE)[0] < 100


def _brute_force_precision_recall(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    d = np.sqrt(((fake[:, None] - real[None]) ** 2).sum(-1))  # [fake, real]
    precision = (d <= radii(real)[None, :]).any(1).mean()
    recall = (d.T <= radii(fake)[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall_identical_disjoint_and_definition():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(50, 16)).astype(np.float32)
    assert M.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert M.precision_recall(real, real + 1000.0) == (0.0, 0.0)
    fake = (rng.normal(size=(40, 16)) * 1.3 + 0.8).astype(np.float32)
    got = M.precision_recall(real, fake, k=3)
    want = _brute_force_precision_recall(real.astype(np.float64), fake.astype(np.float64), 3)
    assert got == pytest.approx(want, abs=1e-6)  # torch-fidelity averages in float32
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0
    with pytest.raises(M.EvaluationError, match="at least 4"):
        M.precision_recall(real[:3], fake)


# --------------------------------------------------------------------------------------------
# PSNR and SSIM


def _ssim_scipy(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of one [C, H, W] 0..255 image pair with scipy's Gaussian filter (truncate 3.5 -> an
    11-tap window for sigma 1.5), valid positions only."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for xc, yc in zip(x.astype(np.float64), y.astype(np.float64)):
        f = lambda z: scipy.ndimage.gaussian_filter(z, 1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731
        mx, my = f(xc), f(yc)
        vx, vy, cxy = f(xc * xc) - mx**2, f(yc * yc) - my**2, f(xc * yc) - mx * my
        values.append((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())
    return float(np.mean(values))


def test_psnr_and_ssim():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, size=(2, 3, 32, 24), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, size=a.shape), 0, 255).astype(np.uint8)
    # PSNR: a constant offset of 10 has MSE 100.
    flat = np.full((1, 3, 16, 16), 100, np.uint8)
    assert M.psnr(flat, flat + 10) == pytest.approx(10 * np.log10(255**2 / 100))
    assert M.psnr(a, a) == float("inf")
    mse = ((a.astype(float) - b) ** 2).reshape(2, -1).mean(1)
    np.testing.assert_allclose(M.psnr(a, b, per_image=True), 10 * np.log10(255**2 / mse))
    # float [0, 1] images mean value / 255; channels-last gives the same numbers.
    assert M.psnr(a / 255.0, torch.from_numpy(b)) == pytest.approx(M.psnr(a, b), rel=1e-12)
    assert M.ssim(a.transpose(0, 2, 3, 1), b.transpose(0, 2, 3, 1), channels_last=True) == pytest.approx(M.ssim(a, b))
    # SSIM against scipy's filter, per image.
    per_image = M.ssim(a, b, per_image=True)
    for i in range(2):
        assert per_image[i] == pytest.approx(_ssim_scipy(a[i], b[i]), rel=1e-10)
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < M.ssim(a, b) < 1.0
    # An 11 x 11 image is a single window: the weighted statistics by hand.
    x, y = a[0, :1, :11, :11].astype(float), b[0, :1, :11, :11].astype(float)
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * x[0]).sum(), (w * y[0]).sum()
    vx, vy, cxy = (w * (x[0] - mx) ** 2).sum(), (w * (y[0] - my) ** 2).sum(), (w * (x[0] - mx) * (y[0] - my)).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    hand = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert M.ssim(x.astype(np.uint8), y.astype(np.uint8)) == pytest.approx(hand, rel=1e-10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.psnr(a / 255.0 * 1.5, a / 255.0)
    with pytest.raises(ValueError, match="at least 11"):
        M.ssim(a[:, :, :8, :8], b[:, :, :8, :8])


# --------------------------------------------------------------------------------------------
# Inception weights


def test_random_weights_and_the_file_loading_path(extractor, weights_file, tmp_path):
    info = extractor.info
    assert info["source"] == "random" and info["sha256"] is None and info["seed"] == 0
    assert info["reference_weights"] is False
    from pipeline.encoders import state_dict_checksum

    # Seeded: a fresh init is the same network.
    assert state_dict_checksum(M.random_inception_state_dict(0)) == info["state_dict_sha256"]

    loaded, file_info = M.load_inception(weights_file)
    assert file_info["source"] == "file" and file_info["path"] == weights_file
    assert file_info["sha256"] == hashlib.sha256(open(weights_file, "rb").read()).hexdigest()
    assert file_info["state_dict_sha256"] == info["state_dict_sha256"]
    assert file_info["reference_weights"] is False
    assert isinstance(loaded.network, FeatureExtractorInceptionV3) and not loaded.network.training

    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(M.InceptionWeightsError, match="bad.pth.*inception-v3-compat"):
        M.load_inception(str(bad))
    with pytest.raises(M.InceptionWeightsError, match="not found"):
        M.load_inception(str(tmp_path / "missing.pth"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_weights_offline_fail_at_once_with_advice(monkeypatch, tmp_path, weights_file, image_sets):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(M.InceptionWeightsUnavailable, match="HF_HUB_OFFLINE.*--inception-weights PATH"):
        M.load_inception("hub")
    assert time.perf_counter() - t < 5
    # The default of the CLI says the same, as a usage error on --inception-weights.
    result = runner.invoke(app, ["evaluate", "--samples", image_sets["A_npz"], "--ref", image_sets["B_npz"]])
    assert result.exit_code == 2 and "--inception-weights" in result.output and "Traceback" not in result.output

    # Not offline, but the host does not answer: the HEAD probe fails at once.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    url = f"http://127.0.0.1:{_free_port()}/weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(M.InceptionWeightsUnavailable, match="cannot reach"):
        M.load_inception("hub", hub_url=url)

    # A cached file is used offline, and checked against the hash in its name.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    os.symlink(weights_file, cache / "weights-inception-2015-12-05-6726825d.pth")
    with pytest.raises(M.InceptionWeightsError, match="corrupt or was replaced"):
        M.load_inception("hub")


# --------------------------------------------------------------------------------------------
# Features and metrics against torch-fidelity's own path


def test_dataset_items_are_what_torch_fidelity_reads_from_files(image_sets):
    from torch_fidelity.datasets import ImagesPathDataset

    ours = _ImagesNHWC(image_sets["A"])
    files = sorted(os.path.join(image_sets["A_dir"], f) for f in os.listdir(image_sets["A_dir"]))
    theirs = ImagesPathDataset(files)
    assert len(ours) == len(theirs) == 4
    for i in range(4):
        assert ours[i].dtype == theirs[i].dtype == torch.uint8
        assert ours[i].shape == theirs[i].shape == (3, 40, 56)
        assert torch.equal(ours[i], theirs[i])


@pytest.mark.timeout(180)
def test_features_and_metrics_match_torch_fidelity(our_features, weights_file, image_sets, tmp_path):
    import torch_fidelity
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id_cached

    kwargs = dict(
        input1=image_sets["A_dir"], input2=image_sets["B_dir"], input1_cache_name="A", input2_cache_name="B",
        cache_root=str(tmp_path / "cache"), cuda=False, batch_size=64, save_cpu_ram=True, verbose=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=weights_file, samples_find_ext="png",
    )
    # No FID here: its 2048 x 2048 eigenproblem costs tens of seconds on this CPU, and our
    # frechet_distance is torch-fidelity's own function on the statistics of these features.
    theirs = torch_fidelity.calculate_metrics(
        isc=True, prc=True, feature_layer_prc="2048", isc_splits=2, prc_neighborhood=3, **kwargs
    )
    # Their features, from their cache (filled by the call above: no second forward).
    fe = create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased"], **kwargs)
    for slot, name in ((1, "A"), (2, "B")):
        feats = extract_featuresdict_from_input_id_cached(slot, fe, **kwargs)
        np.testing.assert_allclose(our_features[name]["pool"], feats["2048"].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            our_features[name]["logits_unbiased"], feats["logits_unbiased"].numpy(), rtol=1e-5, atol=1e-6
        )

    a, b = our_features["A"], our_features["B"]
    is_mean, is_std = M.inception_score(a["logits_unbiased"], splits=2)
    assert is_mean == pytest.approx(theirs[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-6)
    assert is_std == pytest.approx(theirs[torch_fidelity.KEY_METRIC_ISC_STD], rel=1e-4, abs=1e-9)
    precision, recall = M.precision_recall(b["pool"], a["pool"], k=3)
    assert (precision, recall) == (theirs[torch_fidelity.KEY_METRIC_PRECISION], theirs[torch_fidelity.KEY_METRIC_RECALL])
    assert a["spatial"].shape == (4, 7 * 17 * 17) and (a["spatial"] >= 0).all()  # post-ReLU map


# --------------------------------------------------------------------------------------------
# CLI: ref-stats and evaluate



@pytest.mark.timeout(180)
def test_ref_stats_from_npz_then_evaluate_writes_json(our_features, image_sets, tmp_path):
    stats_path = str(tmp_path / "ref_stats.npz")
    result = runner.invoke(app, ["ref-stats", "--from", "npz", image_sets["B_npz"], "--out", stats_path,
                                 "--inception-weights", "random", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == stats_path
    assert "NOT comparable" in result.stderr
    with np.load(stats_path, allow_pickle=False) as z:
        stats = {k: z[k] for k in z.files}
    assert set(stats) == {"format", "version", "mu", "sigma", "mu_s", "sigma_s", "pool", "logits_unbiased",
                          "num_images", "inception", "source"}
    assert str(stats["format"]) == "rae-inception-ref-stats" and int(stats["num_images"]) == 4
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048) and stats["mu_s"].shape == (2023,)
    np.testing.assert_allclose(stats["mu"], our_features["B"]["pool"].mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["sigma"], np.cov(our_features["B"]["pool"].astype(np.float64), rowvar=False),
                               rtol=1e-5, atol=1e-9)
    assert json.loads(str(stats["inception"]))["source"] == "random"
    assert json.loads(str(stats["source"]))["uri"] == image_sets["B_npz"]

    out = str(tmp_path / "metrics.json")
    result = runner.invoke(app, ["evaluate", "--samples", image_sets["A_npz"], "--ref", stats_path,
                                 "--inception-weights", "random", "--out", out, "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "FID" in result.stdout and "comparable to published" in result.stdout
    m = json.loads(open(out).read())
    assert m["inception"]["source"] == "random" and m["inception"]["sha256"] is None
    assert m["comparable_to_published"] is False and "not comparable" in m["warning"]
    assert m["num_samples"] == 4 and m["num_ref"] == 4 and m["image_size"] == [40, 56]
    a, b = our_features["A"], our_features["B"]
    assert m["fid"] > 1.0 and m["sfid"] > 1.0
    assert m["fid"] == pytest.approx(_fid_low_rank(a["pool"], b["pool"]), rel=1e-5)
    assert m["sfid"] == pytest.approx(_fid_low_rank(a["spatial"], b["spatial"]), rel=1e-5)
    assert m["inception_score_mean"] == pytest.approx(M.inception_score(a["logits_unbiased"])[0], rel=1e-6)
    assert (m["precision"], m["recall"]) == M.precision_recall(b["pool"], a["pool"])
    assert m["reference"]["fid_statistics"] == "reference statistics file (ref-stats)"
    assert m["settings"]["isc_split_mode"] == "shuffle" and m["settings"]["isc_shuffle_seed"] == 2020

    # --is-splits adm: consecutive 5,000-sample chunks in file order (here one chunk of 4).
    result = runner.invoke(app, ["evaluate", "--samples", image_sets["A_npz"], "--ref", stats_path, "--is-splits",
                                 "adm", "--inception-weights", "random", "--out", out, "--device", "cpu",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    m = json.loads(open(out).read())
    assert (m["settings"]["isc_split_mode"], m["settings"]["isc_splits"], m["settings"]["isc_split_size"]) == \
        ("adm", 1, 5000) and m["settings"]["isc_shuffle_seed"] is None
    assert m["inception_score_mean"] == pytest.approx(M.inception_score(a["logits_unbiased"], splits=1)[0], rel=1e-6)
    assert m["reference"]["inception_score_mean"] == pytest.approx(
        M.inception_score(b["logits_unbiased"], splits=1)[0], rel=1e-6)

    # Statistics of another network are refused before any image is looked at.
    info = json.loads(str(stats["inception"]))
    info["state_dict_sha256"] = "0" * 64
    M.save_reference_stats({**stats, "inception": np.array(json.dumps(info))}, str(tmp_path / "other.npz"))
    result = runner.invoke(app, ["evaluate", "--samples", image_sets["A_npz"], "--ref", str(tmp_path / "other.npz"),
                                 "--inception-weights", "random", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1 and "another Inception network" in result.output


def test_adm_reference_batch_with_random_weights(extractor, our_features, image_sets, tmp_path):
    # ADM's precomputed mu/sigma belong to the TensorFlow network: with random weights they are
    # not used, and the statistics come from arr_0.
    b = image_sets["B"][:2]
    np.savez(tmp_path / "adm.npz", arr_0=b, mu=np.zeros(2048), sigma=np.eye(2048))
    ref = M.load_reference(str(tmp_path / "adm.npz"), extractor)
    assert "not used" in ref.origin and ref.num_images == 2 and ref.pool.shape == (2, 2048)
    direct = M.inception_features(b, extractor)
    np.testing.assert_allclose(ref.mu, direct["pool"].mean(0), rtol=1e-6)
    np.testing.assert_allclose(ref.pool, our_features["B"]["pool"][:2], rtol=1e-4, atol=1e-5)
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(M.EvaluationError, match="no images"):
        M.load_reference(str(tmp_path / "stats_only.npz"), extractor)
    np.savez(tmp_path / "nothing.npz", foo=np.zeros(3))
    with pytest.raises(M.EvaluationError, match="neither images"):
        M.load_reference(str(tmp_path / "nothing.npz"), extractor)


# --------------------------------------------------------------------------------------------
# Image sets: npz, folders, stores


def _write_tree(root) -> dict[str, bytes]:
    """Three PNGs of different shapes (one large enough for the ADM crop's halving at 32 px), in
    nested folders, plus a hidden image and a text file that are not images of the set."""
    rng = np.random.default_rng(5)
    files = {"c0/a.png": (40, 56), "c0/sub/b.png": (90, 70), "c1/c.png": (33, 33)}
    out = {}
    for rel, (h, w) in files.items():
        data = _png_bytes(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        out[rel] = data
    (root / "c1" / ".hidden.png").write_bytes(out["c1/c.png"])
    (root / "c1" / "notes.txt").write_text("not an image")
    return out


def _crop(data: bytes, r: int) -> np.ndarray:
    return preprocess_image_bytes(data, r).transpose(1, 2, 0)


def _write_store(uri: str, kind: str, source_uri: str, refs: list[dict]):
    from pipeline.store import StoreLayout, StorePlan, StoreWriter

    n = len(refs)
    plan = StorePlan(
        kind="synthetic", num_samples=n, latent_shape=(2, 2, 2), layout=StoreLayout(flips=False),
        source={"kind": kind, "uri": source_uri, "split": "train", "fingerprint": "0" * 64, "num_items": n,
                "order": {"seed": 0, "granularity": "none"}},
        classes={"num_classes": 2, "names": ["c0", "c1"]},
        content_hash=hashlib.sha256(json.dumps(refs).encode()).hexdigest(),
    )
    writer = StoreWriter(uri, plan).create()
    for shard in range(plan.num_shards):
        a, b = plan.shard_bounds(shard)
        writer.write_shard(shard, latents=np.zeros((b - a, 2, 2, 2), np.float32), labels=[r["label"] for r in refs[a:b]],
                           valid=np.ones(b - a, bool), sample_ids=np.arange(a, b), samples=refs[a:b])
    writer.finalize()
    return uri


def _parquet_source(tmp_path, tree: dict[str, bytes], rows_per_group: int, num_files: int):
    """The images of ``tree`` as a Parquet source: (its root, each item's bytes, each item's store
    source reference), items in listing order."""
    from pipeline.sample_data import write_sample_parquet
    from pipeline.sources import open_source

    (tmp_path / "if" / "train").mkdir(parents=True)
    for rel, data in tree.items():
        dest = tmp_path / "if" / "train" / rel.split("/")[0] / rel.split("/")[-1]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    root = write_sample_parquet(str(tmp_path / "if"), str(tmp_path / "pq"), rows_per_group=rows_per_group,
                                num_files=num_files)
    listing = open_source(root, "train")
    blobs = listing.read_group(listing.items)
    refs = [{"index": i, "id": it.index, "key": it.key, "uri": it.uri, "row": it.row, "size": len(d),
             "sha256": U.sha256_bytes(d), "label": it.label} for i, (it, d) in enumerate(zip(listing.items, blobs))]
    return root, blobs, refs


def test_image_sets_read_the_right_pixels(tmp_path, image_sets):
    # npz: memory-mapped when stored uncompressed; a seeded subset in file order.
    mapped = M.read_npz_images(image_sets["A_npz"])
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, image_sets["A"])
    np.savez_compressed(tmp_path / "c.npz", arr_0=image_sets["A"])
    assert np.array_equal(M.read_npz_images(str(tmp_path / "c.npz")), image_sets["A"])
    subset = M.npz_image_set(image_sets["A_npz"], num=2, seed=3)
    idx = np.sort(np.random.default_rng(3).choice(4, 2, replace=False))
    assert np.array_equal(np.concatenate(list(subset.chunks())), image_sets["A"][idx])
    with pytest.raises(M.EvaluationError, match="has 4 image"):
        M.npz_image_set(image_sets["A_npz"], num=5)
    np.savez(tmp_path / "f.npz", arr_0=image_sets["A"].astype(np.float32))
    with pytest.raises(M.EvaluationError, match="uint8"):
        M.read_npz_images(str(tmp_path / "f.npz"))

    # folder: sorted, recursive, hidden files and non-images skipped, ADM crop.
    tree = _write_tree(tmp_path / "tree")
    got = M.folder_image_set(str(tmp_path / "tree"), resolution=32)
    assert got.count == 3
    want = np.stack([_crop(tree[k], 32) for k in sorted(tree)])
    assert np.array_equal(np.concatenate(list(got.chunks())), want)

    # store over an ImageFolder: each row's file through its recorded reference.
    refs = []
    for i, rel in enumerate(sorted(tree)):
        path = str(tmp_path / "tree" / rel)
        refs.append({"index": i, "id": i, "key": rel, "uri": path, "row": None, "size": len(tree[rel]),
                     "sha256": U.sha256_bytes(tree[rel]), "label": 0})
    store = _write_store(str(tmp_path / "store_if"), "imagefolder", str(tmp_path / "tree"), refs)
    assert np.array_equal(np.concatenate(list(M.store_image_set(store, resolution=32).chunks())), want)

    # store over Parquet: file + row.
    pq_root, blobs, pq_refs = _parquet_source(tmp_path, tree, rows_per_group=2, num_files=2)
    pq_store = _write_store(str(tmp_path / "store_pq"), "parquet", pq_root, pq_refs)
    got = np.concatenate(list(M.store_image_set(pq_store, resolution=32).chunks()))
    assert np.array_equal(got, np.stack([_crop(d, 32) for d in blobs]))

    # A source file changed since encoding is refused, naming it.
    (tmp_path / "tree" / "c1" / "c.png").write_bytes(_png_bytes(np.zeros((33, 33, 3), np.uint8)))
    with pytest.raises(M.EvaluationError, match="c.png"):
        list(M.store_image_set(store, resolution=32).chunks())


def test_store_images_read_each_parquet_row_group_once_per_chunk(tmp_path, monkeypatch):
    """Store rows are a shuffle of the source, so a chunk's rows alternate between row groups; each
    group is still read once per chunk, not once per row."""
    import pyarrow.parquet as pq

    tree = _write_tree(tmp_path / "tree")
    pq_root, blobs, refs = _parquet_source(tmp_path, tree, rows_per_group=1, num_files=1)  # 3 groups of 1 row
    order = [0, 1, 2, 0, 1, 2, 2, 1, 0]
    store = _write_store(str(tmp_path / "store"), "parquet", pq_root,
                         [{**refs[item], "index": row} for row, item in enumerate(order)])
    images = M.store_image_set(store, resolution=32, chunk=len(order))
    reads = []
    read_row_group = pq.ParquetFile.read_row_group

    def counted(self, group, *args, **kwargs):
        reads.append(group)
        return read_row_group(self, group, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    got = np.concatenate(list(images.chunks()))
    assert np.array_equal(got, np.stack([_crop(blobs[item], 32) for item in order]))
    assert sorted(reads) == [0, 1, 2]


@pytest.mark.timeout(180)
def test_ref_stats_from_folder_and_store_cli(tmp_path):
    tree = _write_tree(tmp_path / "tree")
    out = str(tmp_path / "folder_stats.npz")
    result = runner.invoke(app, ["ref-stats", "--from", "folder", str(tmp_path / "tree"), "--out", out, "--num", "2",
                                 "--resolution", "32", "--inception-weights", "random", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    with np.load(out) as z:
        assert int(z["num_images"]) == 2 and z["pool"].shape == (2, 2048)
        source = json.loads(str(z["source"]))
    assert source == {"kind": "folder", "uri": str(tmp_path / "tree"), "num": 2, "seed": 0, "resolution": 32,
                      "crop": "adm_center_crop"}

    refs = [{"index": i, "id": i, "key": rel, "uri": str(tmp_path / "tree" / rel), "row": None, "size": len(tree[rel]),
             "sha256": U.sha256_bytes(tree[rel]), "label": 0} for i, rel in enumerate(sorted(tree)[:2])]
    store = _write_store(str(tmp_path / "store"), "imagefolder", str(tmp_path / "tree"), refs)
    out = str(tmp_path / "store_stats.npz")
    result = runner.invoke(app, ["ref-stats", "--from", "store", store, "--out", out, "--resolution", "32",
                                 "--inception-weights", "random", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    with np.load(out) as z:
        assert int(z["num_images"]) == 2 and json.loads(str(z["source"]))["kind"] == "store"

    result = runner.invoke(app, ["ref-stats", "--from", "folder", str(tmp_path / "nope"), "--out", out,
                                 "--inception-weights", "random", "--no-progress"])
    assert result.exit_code == 1 and "not a folder" in result.output
