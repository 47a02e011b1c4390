"""Sampling (trainer/sample.py, `rae-pipeline sample`) and reconstruction metrics (trainer/rfid.py,
`rae-pipeline rfid`), with tiny DiT^DH and decoder checkpoints written here in train-dit's and
fit-decoder's meta layout (CPU, one thread). Multi-process runs: tests/test_sample_ddp.py."""
from __future__ import annotations

import copy
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import to_dict
from trainer.checkpoint import save_checkpoint
from trainer.flow import euler_sample, heun_sample, reference_grid, shift_alpha
from trainer.models import model_meta
from trainer.models.decoder import RAEDecoder, decoder_config
from trainer.models.dit import build_model, dit_config
from trainer.images import grid_indices
from trainer.loading import LoadError, check_compatible, load_decoder, load_dit
from trainer.sample import SampleConfig, SampleInterrupted, SamplingJob, sample
from trainer.sampling import SampleError, generate_latents, sample_labels, sample_noise, write_preview_grid
from trainer.train_dit import resolve_config

SHAPE = (8, 4, 4)  # latent C, H, W
CLASSES = 4
ENCODER = {"name": "dinov2", "arch": "vit_base_patch14_reg4_dinov2.lvd142m", "input_size": 224,
           "weights_sha256": "ab" * 32, "weights_source": "hub"}
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per process


def _perturb(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Seeded noise on every trainable weight: a fresh DiT has zero-initialized adaLN and output
    layers (velocity 0 everywhere), which would make every sampling test pass vacuously."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _stats(seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"mean": torch.randn(SHAPE, generator=g) * 0.5, "var": torch.rand(SHAPE, generator=g) + 0.5}


def save_dit(run_dir, *, seed=0, depth=2, encoder=ENCODER, stats=True, extra_alpha=True, num_classes=CLASSES,
             ema=True, imported=False, stats_mode=None) -> str:
    """A DiT^DH checkpoint with train-dit's meta (DiTTrainer.checkpoint_meta); EMA weights differ from the model's.
    stats_mode None: written before the statistics mode was recorded (no data.stats_mode, no extra.stats_mode);
    "var": as a data.stats_mode=var run writes it (the variance alone in stats.safetensors)."""
    torch.manual_seed(seed)
    model = build_model(dit_config("dit_dh_s", SHAPE[0], SHAPE[1], hidden_size=64, depth=depth, num_heads=4,
                                   head_hidden_size=128, head_depth=1, head_num_heads=4, num_classes=num_classes))
    _perturb(model, seed, 0.05)
    ema_model = _perturb(copy.deepcopy(model), seed + 1000, 0.02)
    cfg = resolve_config("debug", ["flow.shift_base=64"])  # alpha = sqrt(128 / 64): a real shift at this size
    alpha = shift_alpha(SHAPE, 64)
    config = json.loads(json.dumps(to_dict(cfg)))
    saved_stats = _stats() if stats else None
    if stats_mode is None:
        del config["data"]["stats_mode"]
    else:
        config["data"]["stats_mode"] = stats_mode
        if stats_mode == "var":
            saved_stats = {"var": _stats()["var"]}
    meta = {
        "kind": "dit", "epoch": 2.0, "samples_seen": 96, "config": config,
        "model": model_meta(model),
        "store": {"store_id": "0123456789abcdef0123", "uri": "/stores/synthetic", "latent_shape": list(SHAPE)},
        "encoder": encoder,
        "statistics": {"mean": "mean" in saved_stats, "var": True, "source": "store"} if stats else None,
        "data_state": None,
        "extra": {**({"shift_alpha": alpha} if extra_alpha else {}), "world_size": 1, "total_steps": 6,
                  "init_from": None, **({"stats_mode": stats_mode} if stats_mode else {})},
    }
    if imported:  # import-rae's meta: no store, no training config, no recorded shift
        meta.update(config={"import": {"dit": "dit.pt"}}, store=None, extra={})
    return save_checkpoint(str(run_dir), 6, model_state=model, ema_state=ema_model.state_dict() if ema else None,
                           meta=meta, stats=saved_stats)


def save_decoder(run_dir, *, encoder=ENCODER, in_channels=SHAPE[0], grid=SHAPE[1], patch=4, seed=1) -> str:
    """A tiny RAE decoder checkpoint (tokens [C, g, g] -> 4g x 4g pixels), fit-decoder's meta layout."""
    torch.manual_seed(seed)
    model = RAEDecoder(decoder_config("decoder_tiny", in_channels=in_channels, num_tokens=grid * grid,
                                      patch_size=patch))
    meta = {"kind": "decoder", "epoch": 1.0, "samples_seen": 16, "config": {"preset": "test"},
            "model": model_meta(model), "store": None, "encoder": encoder, "statistics": None}
    return save_checkpoint(str(run_dir), 3, model_state=model, ema_state=model.state_dict(), meta=meta)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpts")
    return {"dit": save_dit(root / "dit"), "decoder": save_decoder(root / "decoder"),
            "weak": save_dit(root / "weak", seed=5, depth=1)}


def _cfg(**kw) -> SampleConfig:
    return SampleConfig(**{"num": 6, "block_size": 4, "batch_size": 3, "progress": False, **kw})


def _npz(out) -> tuple[np.ndarray, np.ndarray]:
    with np.load(os.path.join(out, "samples.npz")) as z:
        return z["arr_0"], z["arr_1"]


def _manual_images(dit_uri, decoder_uri, labels, seed, *, steps=50, which="ema", stats=None, sampler="euler"):
    """The samples computed independently of trainer/sample.py's plumbing: flow's sampler with the raw
    model call, the statistics applied by hand, the decoder, rounding."""
    from trainer.checkpoint import load_checkpoint
    from trainer.models import build_model_from_meta

    ck = load_checkpoint(dit_uri, load_train_state=False)
    model = build_model_from_meta(ck.meta.model)
    model.load_state_dict(ck.ema_state if which == "ema" else ck.model_state)
    model.eval()
    dec_ck = load_checkpoint(decoder_uri, load_train_state=False)
    decoder = build_model_from_meta(dec_ck.meta.model)
    decoder.load_state_dict(dec_ck.ema_state)
    decoder.eval()
    st = stats if stats is not None else ck.stats
    y = torch.as_tensor(labels)
    grid = reference_grid(steps, alpha=shift_alpha(SHAPE, 64))
    noise = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(_seed_of(seed, i)))
                         for i in range(len(labels))])
    integrate = euler_sample if sampler == "euler" else heun_sample
    with torch.no_grad():
        z = integrate(lambda x, t: model(x, t, y), noise, grid)
        raw = z * torch.sqrt(st["var"] + 1e-5) + st["mean"]
        pixels = decoder.unnormalize(decoder(raw)).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _seed_of(seed: int, i: int) -> int:
    from trainer.sampling import _NOISE_TAG, _seed64

    return _seed64(_NOISE_TAG, seed, i)


# ------------------------------------------------------------------------------------------------
# labels, noise, checkpoint facts
# ------------------------------------------------------------------------------------------------


def test_equal_labels_are_a_seeded_permutation_every_adm_split_sees_all_classes():
    """`equal`: exactly N/K per class in a permutation that depends on (seed, N, K) only, so the ADM
    evaluator's consecutive 5,000-sample Inception Score splits each see (nearly) every class."""
    equal = sample_labels("equal", 50_000, 1000)
    assert equal.dtype == np.int64 and np.array_equal(np.bincount(equal, minlength=1000), np.full(1000, 50))
    blocks = [len(np.unique(equal[s:s + 5000])) for s in range(0, 50_000, 5000)]
    assert min(blocks) >= 990, blocks  # in class order each block held 100 classes
    assert np.array_equal(equal, sample_labels("equal", 50_000, 1000, seed=0))  # a pure function
    other = sample_labels("equal", 50_000, 1000, seed=1)
    assert not np.array_equal(other, equal) and np.array_equal(np.sort(other), np.sort(equal))
    # The reference sampler's construction: torch.randperm of the class-ordered pool under manual_seed(seed).
    pool = torch.arange(1000).repeat_interleave(50)
    assert np.array_equal(equal, pool[torch.randperm(50_000, generator=torch.Generator().manual_seed(0))].numpy())
    # Over seeds, a block misses on average ~5 classes (a uniform permutation: a split's class counts
    # are those of a random split, as the shuffled Inception Score assumes); none misses 20.
    for seed in range(2, 6):
        cover = [len(np.unique(b)) for b in sample_labels("equal", 50_000, 1000, seed=seed).reshape(10, 5000)]
        assert np.mean(cover) >= 990 and min(cover) >= 980, (seed, cover)
    # N not a multiple of K: floor(N/K) or ceil(N/K) per class, exactly the class-ordered multiset.
    for num, classes in ((10, 4), (1003, 7), (3, 4)):
        labels = sample_labels("equal", num, classes, seed=5)
        ordered = sample_labels("equal", num, classes, seed=5, class_order=True)
        assert np.array_equal(ordered, np.arange(num) * classes // num)
        assert np.array_equal(np.sort(labels), ordered)
        assert np.bincount(labels, minlength=classes).max() - np.bincount(labels, minlength=classes).min() <= 1
    assert sample_labels("equal", 10, 4, class_order=True).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert sample_labels("equal", 3, 4, class_order=True).tolist() == [0, 1, 2]


def test_label_policies(tmp_path):
    rand = sample_labels("random", 1000, 7, seed=3)
    assert np.array_equal(rand, sample_labels("random", 1000, 7, seed=3))
    assert not np.array_equal(rand, sample_labels("random", 1000, 7, seed=4))
    assert rand.min() == 0 and rand.max() == 6 and rand.dtype == np.int64
    assert sample_labels("2,0,3", 6, 4).tolist() == [2, 2, 0, 0, 3, 3]
    assert sample_labels("2,0,3", 3, 4).tolist() == [2, 0, 3]
    path = tmp_path / "labels.txt"
    path.write_text("1 3\n0, 2\n")
    assert sample_labels(str(path), 4, 4).tolist() == [1, 3, 0, 2]
    with pytest.raises(SampleError, match="outside 0..3"):
        sample_labels("1,4", 4, 4)
    with pytest.raises(SampleError, match="at most --num"):
        sample_labels("1,2,3", 2, 4)
    with pytest.raises(SampleError, match="existing file"):
        sample_labels("balanced", 4, 4)
    path.write_text("1 x 2")
    with pytest.raises(SampleError, match="x"):
        sample_labels(str(path), 4, 4)


def test_statistics_mode_recorded_in_the_checkpoint_is_honoured(ckpts, tmp_path):
    """A data.stats_mode=var DiT samples with the variance alone (mean zero), also from a --stats
    file that holds a mean; the sample plan records the statistics used."""
    file = tmp_path / "stats.npz"
    np.savez(file, mean=np.full(SHAPE, 2.0), var=np.full(SHAPE, 3.0))
    var_ckpt = save_dit(tmp_path / "var", stats_mode="var")
    dit = load_dit(var_ckpt)
    assert dit.stats_mode == "var" and dit.normalizer.mean is None
    assert torch.equal(dit.normalizer.var, _stats()["var"])
    z = torch.ones((1, *SHAPE))
    torch.testing.assert_close(dit.normalizer.denormalize(z), torch.sqrt(_stats()["var"] + 1e-5)[None])
    over = load_dit(var_ckpt, stats=str(file))
    assert over.normalizer.mean is None and float(over.normalizer.var.mean()) == 3.0
    assert float(load_dit(ckpts["dit"], stats=str(file)).normalizer.mean.mean()) == 2.0  # mean_var keeps it
    # Where the mode is read from: meta.extra, else the config's data section, else mean_var.
    from types import SimpleNamespace

    from trainer.loading import checkpoint_stats_mode

    assert checkpoint_stats_mode(SimpleNamespace(extra={}, config={"data": {"stats_mode": "var"}})) == "var"
    assert checkpoint_stats_mode(SimpleNamespace(extra={}, config={"import": {"dit": "x.pt"}})) == "mean_var"
    with pytest.raises(LoadError, match="statistics mode 'centred'"):
        checkpoint_stats_mode(SimpleNamespace(extra={"stats_mode": "centred"}, config={}))
    job = SamplingJob(_cfg(num=2), dit, load_decoder(ckpts["decoder"]), None, np.zeros(2, np.int64),
                      torch.device("cpu"))
    assert job.plan((16, 16, 3))["statistics"]["mean"] is False
    # AutoGuidance needs the weak model in the same normalized space.
    check_compatible(dit, load_decoder(ckpts["decoder"]), load_dit(save_dit(tmp_path / "weak_var", stats_mode="var")))
    with pytest.raises(LoadError, match="statistics mode mean_var; DiT .* with var"):
        check_compatible(dit, load_decoder(ckpts["decoder"]), load_dit(ckpts["weak"]))


def test_noise_depends_on_seed_and_index_only():
    a = sample_noise(0, [5, 6, 7], SHAPE)
    assert a.shape == (3, *SHAPE) and a.dtype == torch.float32
    assert torch.equal(a[1], sample_noise(0, [6], SHAPE)[0])
    assert torch.equal(a[2:], sample_noise(0, range(7, 8), SHAPE))
    assert not torch.equal(a[0], sample_noise(1, [5], SHAPE)[0])
    assert not torch.equal(a[0], a[1])


def test_checkpoint_rebuilds_model_shift_and_statistics(ckpts, tmp_path):
    dit = load_dit(ckpts["dit"])
    assert dit.weights == "ema" and dit.latent_shape == SHAPE and dit.num_classes == CLASSES
    assert dit.shift_alpha == pytest.approx(math.sqrt(128 / 64)) and dit.shift_alpha_source == "meta.extra.shift_alpha"
    assert torch.equal(dit.normalizer.mean, _stats()["mean"]) and dit.normalizer.source.startswith("checkpoint:")
    assert dit.stats_mode == "mean_var"  # a checkpoint that records no mode: mean and var, as before
    assert not dit.model.training
    # EMA weights by default; --weights model gives the raw ones.
    model_w = load_dit(ckpts["dit"], weights="model")
    assert model_w.weights == "model"
    assert not torch.equal(model_w.model.blocks[0].attn.qkv.weight, dit.model.blocks[0].attn.qkv.weight)
    # Without meta.extra.shift_alpha the config's flow section decides (shift_base 64 here).
    no_extra = load_dit(save_dit(tmp_path / "no_extra", extra_alpha=False))
    assert no_extra.shift_alpha == pytest.approx(math.sqrt(2)) and "shift_base 64" in no_extra.shift_alpha_source
    # --stats replaces the checkpoint's statistics; a checkpoint without any samples raw latents.
    file = tmp_path / "stats.npz"
    np.savez(file, mean=np.full(SHAPE, 2.0), var=np.full(SHAPE, 3.0))
    over = load_dit(ckpts["dit"], stats=str(file))
    assert over.normalizer.source == f"file:{file}" and float(over.normalizer.mean.mean()) == 2.0
    assert load_dit(save_dit(tmp_path / "raw", stats=False)).normalizer is None
    with pytest.raises(LoadError, match="does not exist"):
        load_dit(ckpts["dit"], stats=str(tmp_path / "missing.npz"))
    # An imported checkpoint: the reference's base 4096 on the model's latent shape.
    imported = load_dit(save_dit(tmp_path / "imported", imported=True, ema=False))
    assert imported.shift_alpha == pytest.approx(math.sqrt(128 / 4096)) and imported.weights == "model"
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros((8, 2, 2)))
    with pytest.raises(LoadError, match="shape"):
        load_dit(ckpts["dit"], stats=str(bad))
    with pytest.raises(LoadError, match="RAEDecoder"):
        load_dit(ckpts["decoder"])


def test_mismatched_encoders_are_refused(ckpts, tmp_path):
    dit, weak = load_dit(ckpts["dit"]), load_dit(ckpts["weak"])
    check_compatible(dit, load_decoder(ckpts["decoder"]), weak)
    siglip = dict(ENCODER, name="siglip2", arch="vit_base_patch16_siglip_256")
    other = load_decoder(save_decoder(tmp_path / "siglip", encoder=siglip))
    with pytest.raises(LoadError, match="different encoders.*name differs"):
        check_compatible(dit, other)
    reweighted = load_decoder(save_decoder(tmp_path / "rew", encoder=dict(ENCODER, weights_sha256="cd" * 32)))
    with pytest.raises(LoadError, match="weights differ"):
        check_compatible(dit, reweighted)
    # An imported decoder (weights hash unknown) of the same encoder is accepted.
    check_compatible(dit, load_decoder(save_decoder(tmp_path / "imp", encoder=dict(ENCODER, weights_sha256=None))))
    with pytest.raises(LoadError, match="reads 8 x 2 x 2"):
        check_compatible(dit, load_decoder(save_decoder(tmp_path / "grid2", grid=2)))
    weak_other = load_dit(save_dit(tmp_path / "weak_other", seed=5, depth=1, encoder=siglip))
    with pytest.raises(LoadError, match="AutoGuidance model .* different encoders"):
        check_compatible(dit, load_decoder(ckpts["decoder"]), weak_other)
    with pytest.raises(LoadError, match="classes"):
        check_compatible(dit, load_decoder(ckpts["decoder"]), load_dit(save_dit(tmp_path / "w5", num_classes=5)))
    # The command refuses before sampling anything.
    result = runner.invoke(app, ["sample", "--dit-ckpt", ckpts["dit"], "--decoder-ckpt", other.uri, "--out",
                                 str(tmp_path / "out"), "--num", "2", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 1 and "different encoders" in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_sample_writes_npz_and_grid_equal_to_an_independent_computation(ckpts, tmp_path):
    out = str(tmp_path / "a")
    result = sample(ckpts["dit"], ckpts["decoder"], out, _cfg(num=10, grid_max=4))
    images, labels = _npz(out)
    assert images.shape == (10, 16, 16, 3) and images.dtype == np.uint8 and result.image_shape == (16, 16, 3)
    assert labels.tolist() == sample_labels("equal", 10, CLASSES, seed=0).tolist() and labels.dtype == np.int64
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert images.std() > 5  # real pictures, not a constant
    # The same pixels from flow's sampler, the EMA weights, the checkpoint's shift and statistics.
    expected = _manual_images(ckpts["dit"], ckpts["decoder"], labels, seed=0)
    diff = np.abs(images.astype(int) - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # The .npz is np.savez's uncompressed layout: the evaluation code memory-maps it.
    from trainer.metrics.images import read_npz_images

    mapped = read_npz_images(os.path.join(out, "samples.npz"))
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, images)
    # Grid: 4 samples spread over the indices (0, 3, 6, 9), 2 x 2 with 2 px padding.
    assert grid_indices(10, 4).tolist() == [0, 3, 6, 9]
    grid = np.asarray(Image.open(os.path.join(out, "grid.png")))
    assert grid.shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    assert np.array_equal(grid[2:18, 20:36], images[3]) and np.array_equal(grid[20:36, 20:36], images[9])
    plan = json.load(open(os.path.join(out, "sample.json")))
    assert plan["dit"]["weights"] == "ema" and plan["shift_alpha"] == pytest.approx(math.sqrt(2))
    assert plan["result"]["blocks_sampled"] == 3 and plan["labels"]["policy"] == "equal"
    assert not os.path.exists(os.path.join(out, "parts"))  # merged and removed

    # Same seed: identical; another seed: different; the raw weights: different.
    again = sample(ckpts["dit"], ckpts["decoder"], str(tmp_path / "b"), _cfg(num=10, block_size=10, batch_size=10))
    assert again.blocks_sampled == 1
    rerun, _ = _npz(tmp_path / "b")
    # Other blocks and batches: only float rounding differs (a pixel moves by at most one level).
    diff = np.abs(rerun.astype(int) - images)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    sample(ckpts["dit"], ckpts["decoder"], str(tmp_path / "c"), _cfg(num=4, seed=1, weights="model", steps=10))
    other, _ = _npz(tmp_path / "c")
    assert np.abs(other.astype(int) - images[:4]).mean() > 2
    assert np.abs(other.astype(int) - _manual_images(ckpts["dit"], ckpts["decoder"], labels[:4], 1, steps=10,
                                                     which="model")).max() <= 1


def test_batch_size_changes_results_only_by_float_rounding(ckpts):
    """One model call over 8 samples vs 8 calls of one: the ODE's end states agree to 1e-5 (fp32)."""
    dit = load_dit(ckpts["dit"])
    grid = reference_grid(25, alpha=dit.shift_alpha)
    labels = torch.as_tensor(sample_labels("equal", 8, CLASSES))
    noise = sample_noise(0, range(8), SHAPE)
    batched = generate_latents(dit.model, labels, noise, grid, sampler="heun")
    single = torch.cat([generate_latents(dit.model, labels[i:i + 1], noise[i:i + 1], grid, sampler="heun")
                        for i in range(8)])
    assert (batched - noise).abs().mean() > 0.1  # the model moved the state
    torch.testing.assert_close(single, batched, rtol=0, atol=1e-5)


def test_cfg_only_inside_its_interval(ckpts):
    dit = load_dit(ckpts["dit"])
    grid = reference_grid(20, alpha=dit.shift_alpha)
    labels = torch.tensor([0, 1, 2, 3])
    noise = sample_noise(3, range(4), SHAPE)

    def run(**kw):
        return generate_latents(dit.model, labels, noise, grid, **kw)

    plain = run()
    # No grid point lies in [0, 0.001] (the grid stops at shift(0.001) > 0.001): exactly unguided.
    assert torch.equal(run(cfg_scale=4.0, cfg_interval=(0.0, 0.001)), plain)
    full = run(cfg_scale=4.0)
    late = run(cfg_scale=4.0, cfg_interval=(0.0, float(grid[10])))
    assert (full - plain).abs().max() > 1e-2 and (late - plain).abs().max() > 1e-2 and (late - full).abs().max() > 1e-2
    # Guidance at the points of the interval and only there: the first 10 steps are unguided.
    head = reference_grid(20, alpha=dit.shift_alpha)[:11]
    assert torch.equal(generate_latents(dit.model, labels, noise, head, cfg_scale=4.0,
                                        cfg_interval=(0.0, float(grid[11]))),
                       generate_latents(dit.model, labels, noise, head))
    # The scale: u + s (c - u) from the null label's prediction.
    null = torch.full_like(labels, CLASSES)
    x, t = noise, torch.full((4,), float(grid[0]))
    v = dit.model(x, t, labels)
    u = dit.model(x, t, null)
    one_step = generate_latents(dit.model, labels, noise, grid[:2], cfg_scale=4.0)
    torch.testing.assert_close(one_step, x + (grid[1] - grid[0]) * (u + 4.0 * (v - u)), rtol=0, atol=1e-5)


@pytest.mark.timeout(120)
def test_autoguidance_with_a_weaker_checkpoint(ckpts, tmp_path):
    out = str(tmp_path / "ag")
    sample(ckpts["dit"], ckpts["decoder"], out, _cfg(num=4, block_size=4, batch_size=4, steps=10, ag_scale=2.0),
           autoguidance_ckpt=ckpts["weak"])
    guided, _ = _npz(out)
    plan = json.load(open(os.path.join(out, "sample.json")))
    assert plan["autoguidance"]["uri"] == load_dit(ckpts["weak"]).uri and plan["ag_scale"] == 2.0
    sample(ckpts["dit"], ckpts["decoder"], str(tmp_path / "plain"), _cfg(num=4, block_size=4, batch_size=4, steps=10))
    plain, _ = _npz(tmp_path / "plain")
    assert np.abs(guided.astype(int) - plain).mean() > 1
    # weak + s (main - weak) at the first step, and s = 1 is the main model alone.
    dit, weak = load_dit(ckpts["dit"]), load_dit(ckpts["weak"])
    grid = reference_grid(10, alpha=dit.shift_alpha)
    labels, noise = torch.tensor([0, 1, 2, 3]), sample_noise(0, range(4), SHAPE)
    t = torch.full((4,), float(grid[0]))
    main, w = dit.model(noise, t, labels), weak.model(noise, t, labels)
    step = generate_latents(dit.model, labels, noise, grid[:2], weak_model=weak.model, ag_scale=2.0)
    torch.testing.assert_close(step, noise + (grid[1] - grid[0]) * (w + 2.0 * (main - w)), rtol=0, atol=1e-5)
    assert torch.equal(generate_latents(dit.model, labels, noise, grid, weak_model=weak.model, ag_scale=1.0),
                       generate_latents(dit.model, labels, noise, grid))
    with pytest.raises(SampleError, match="both"):
        sample(ckpts["dit"], ckpts["decoder"], str(tmp_path / "x"), _cfg(ag_scale=2.0))
    with pytest.raises(SampleError, match="not both"):
        sample(ckpts["dit"], ckpts["decoder"], str(tmp_path / "x"), _cfg(ag_scale=2.0, cfg_scale=2.0),
               autoguidance_ckpt=ckpts["weak"])


@pytest.mark.timeout(120)
def test_stats_file_overrides_the_checkpoint_statistics(ckpts, tmp_path):
    file = tmp_path / "stat.pt"
    stats = {"mean": torch.full(SHAPE, 0.3), "var": torch.full(SHAPE, 4.0)}
    torch.save(stats, file)  # the reference's stat.pt layout
    out = str(tmp_path / "s")
    sample(ckpts["dit"], ckpts["decoder"], out, _cfg(num=4, steps=10), stats=str(file))
    images, labels = _npz(out)
    expected = _manual_images(ckpts["dit"], ckpts["decoder"], labels, 0, steps=10, stats=stats)
    assert np.abs(images.astype(int) - expected).max() <= 1
    default = _manual_images(ckpts["dit"], ckpts["decoder"], labels, 0, steps=10)
    assert np.abs(images.astype(int) - default).mean() > 2
    assert json.load(open(os.path.join(out, "sample.json")))["statistics"]["source"] == f"file:{file}"


@pytest.mark.timeout(120)
def test_interrupted_run_resumes_and_other_settings_are_refused(ckpts, tmp_path):
    ref = str(tmp_path / "ref")
    sample(ckpts["dit"], ckpts["decoder"], ref, _cfg(num=10, steps=10))
    out = str(tmp_path / "out")
    with pytest.raises(SampleInterrupted):
        sample(ckpts["dit"], ckpts["decoder"], out, _cfg(num=10, steps=10, debug_exit_after_blocks=2))
    parts = sorted(os.listdir(os.path.join(out, "parts")))
    assert parts == ["part-00000000-00000004.npz", "part-00000004-00000008.npz", "plan.json"]
    # A rerun with a larger batch size still reuses the parts (batch size is not part of the plan).
    result = sample(ckpts["dit"], ckpts["decoder"], out, _cfg(num=10, steps=10, batch_size=2))
    assert (result.blocks_sampled, result.blocks_reused) == (1, 2)
    assert np.array_equal(_npz(out)[0], _npz(ref)[0])
    again = sample(ckpts["dit"], ckpts["decoder"], out, _cfg(num=10, steps=10))
    assert again.already_complete and again.blocks_sampled == 0
    with pytest.raises(SampleError, match="other settings.*seed"):
        sample(ckpts["dit"], ckpts["decoder"], out, _cfg(num=10, steps=10, seed=1))
    replaced = sample(ckpts["dit"], ckpts["decoder"], out, _cfg(num=10, steps=10, seed=1, overwrite=True))
    assert replaced.blocks_sampled == 3 and not np.array_equal(_npz(out)[0], _npz(ref)[0])


def test_parts_written_before_are_not_resampled(ckpts, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    with pytest.raises(SampleInterrupted):
        sample(ckpts["dit"], ckpts["decoder"], out, _cfg(num=8, steps=4, debug_exit_after_blocks=1))
    calls = []
    original = SamplingJob.sample_block

    def spy(self, start, stop, on_batch=None):
        calls.append((start, stop))
        return original(self, start, stop, on_batch)

    monkeypatch.setattr(SamplingJob, "sample_block", spy)
    sample(ckpts["dit"], ckpts["decoder"], out, _cfg(num=8, steps=4))
    assert calls == [(4, 8)]


def test_output_folder_on_an_object_store(ckpts, tmp_path):
    """Parts, merge and grid through fsspec (memory://: no rename, no local path) as on S3."""
    import fsspec

    out = "memory://sample-test/run"
    result = sample(ckpts["dit"], ckpts["decoder"], out, _cfg(num=5, steps=4))
    assert result.samples == out + "/samples.npz"
    fs = fsspec.filesystem("memory")
    with np.load(io.BytesIO(fs.cat_file("/sample-test/run/samples.npz"))) as z:
        remote = z["arr_0"]
    assert fs.exists("/sample-test/run/grid.png") and not fs.exists("/sample-test/run/parts")
    sample(ckpts["dit"], ckpts["decoder"], str(tmp_path / "local"), _cfg(num=5, steps=4))
    assert np.array_equal(remote, _npz(tmp_path / "local")[0])
    fs.rm("/sample-test", recursive=True)


def test_write_preview_grid_for_the_trainer(ckpts, tmp_path):
    dit, decoder = load_dit(ckpts["dit"], weights="model"), load_decoder(ckpts["decoder"])
    model = dit.model.train()  # the trainer's live model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = str(tmp_path / "preview.png")
    images = write_preview_grid(model, decoder.model, dit.normalizer, dit.shift_alpha, [3, 1, 0], out, steps=10,
                                seed=2)
    assert model.training and not decoder.model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert images.shape == (3, 16, 16, 3)
    assert np.asarray(Image.open(out)).shape == (2 * 18 + 2, 2 * 18 + 2, 3)
    # The same pixels as `sample` with those labels (noise of indices 0, 1, 2 under the seed).
    model.eval()
    job = SamplingJob(_cfg(num=3, steps=10, seed=2), dit, decoder, None, np.array([3, 1, 0]), torch.device("cpu"))
    assert np.abs(job.sample_indices([0, 1, 2]).astype(int) - images).max() <= 1
    # With EMA weights given: the EMA's pixels, the live weights untouched.
    ema = load_dit(ckpts["dit"])
    from_ema = write_preview_grid(model.train(), ckpts["decoder"], dit.normalizer, dit.shift_alpha, [3, 1, 0], out,
                                  steps=10, seed=2, ema_state=ema.model.state_dict())
    job_ema = SamplingJob(_cfg(num=3, steps=10, seed=2), ema, decoder, None, np.array([3, 1, 0]), torch.device("cpu"))
    assert np.abs(job_ema.sample_indices([0, 1, 2]).astype(int) - from_ema).max() <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.timeout(120)
def test_cli_sample(ckpts, tmp_path):
    out = str(tmp_path / "cli")
    args = ["sample", "--dit-ckpt", os.path.dirname(os.path.dirname(ckpts["dit"])), "--decoder-ckpt",
            ckpts["decoder"], "--out", out, "--num", "5", "--steps", "8", "--sampler", "heun", "--cfg-scale", "2",
            "--cfg-interval", "0.1,0.9", "--labels", "3,1", "--seed", "4", "--batch-size", "2", "--block-size", "3",
            "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == os.path.join(out, "samples.npz")
    assert "img/s" in result.stderr and "images/s" in result.stderr  # the progress bar and the rate
    images, labels = _npz(out)
    assert images.shape == (5, 16, 16, 3) and labels.tolist() == [3, 3, 3, 1, 1]
    plan = json.load(open(os.path.join(out, "sample.json")))
    assert (plan["sampler"], plan["steps"], plan["cfg_scale"], plan["cfg_interval"]) == ("heun", 8, 2.0, [0.1, 0.9])
    bad = runner.invoke(app, args[:-2] + ["--cfg-interval", "0.9,0.1", "--device", "cpu"])
    assert bad.exit_code == 1 and "cfg_interval" in bad.output
    bad = runner.invoke(app, ["sample", "--dit-ckpt", ckpts["dit"], "--decoder-ckpt", ckpts["decoder"], "--out", out,
                              "--num", "5", "--seed", "9", "--device", "cpu", "--no-progress"])
    assert bad.exit_code == 1 and "other settings" in bad.output


# ------------------------------------------------------------------------------------------------
# rfid
# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_rfid_on_the_sample_store(sample_store, tmp_path):
    from pipeline.store import LatentStore
    from schemas import store_v1

    store = LatentStore.open(sample_store)
    identity = store_v1.encoder_identity(store.spec)
    c, g, _ = store.latent_shape
    decoder = save_decoder(tmp_path / "dec", encoder=identity, in_channels=c, grid=g, patch=16)
    out, grid = str(tmp_path / "rfid.json"), str(tmp_path / "recon.png")
    result = runner.invoke(app, ["rfid", "--decoder-ckpt", decoder, "--store", sample_store, "--num", "6",
                                 "--inception-weights", "random", "--out", out, "--grid", grid, "--device", "cpu",
                                 "--batch-size", "6", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "rFID" in result.stderr and "NOT comparable" in result.stderr
    metrics = json.load(open(out))
    assert json.loads(result.stdout[result.stdout.index("{"):]) == metrics
    assert metrics["num_images"] == 6 and metrics["image_size"] == [256, 256]
    assert metrics["inception"]["source"] == "random" and metrics["comparable_to_published"] is False
    assert "warning" in metrics and metrics["store"]["store_id"] == store.store_id
    assert metrics["rfid"] > 0 and 0 < metrics["psnr"] < 40 and -1 <= metrics["ssim"] < 0.9
    assert np.asarray(Image.open(grid)).shape == (2 * 258 + 2, 6 * 258 + 2, 3)

    # PSNR and SSIM are those of the decoder's own reconstructions of the same rows vs the originals.
    from trainer.loading import load_decoder as load
    from trainer.metrics.images import _choose, store_image_set
    from trainer.metrics.pixels import psnr, ssim

    dec = load(decoder)
    rows = np.flatnonzero(store.valid())[_choose(int(store.valid().sum()), 6, 0, "rows")]
    originals = np.concatenate(list(store_image_set(sample_store, num=6).chunks()))
    with torch.no_grad():
        z = torch.from_numpy(np.stack([store.read_rows(int(r), int(r) + 1)[0] for r in rows]))
        recon = (dec.model.decode_to_pixels(z) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert metrics["psnr"] == pytest.approx(psnr(originals, recon, channels_last=True), rel=1e-9)
    assert metrics["ssim"] == pytest.approx(ssim(originals, recon, channels_last=True), rel=1e-9)

    # A decoder of another encoder is refused, naming both.
    other = save_decoder(tmp_path / "other", encoder=dict(identity, name="mae"), in_channels=c, grid=g, patch=16)
    result = runner.invoke(app, ["rfid", "--decoder-ckpt", other, "--store", sample_store, "--num", "2",
                                 "--inception-weights", "random", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1 and "different encoders" in result.output
