"""The decoder stage: trainer/fit_decoder.py (on the shared trainer/loop.py), trainer/decoder_data.py,
trainer/reconstruct.py and their commands `rae-pipeline fit-decoder` / `rae-pipeline reconstruct`.

Stores: the session's `sample_store` (the built-in sample data encoded by a 1-block DINOv2 with random
weights) and tiny "encoded" stores written here with StoreWriter, whose latents are a fixed function of
PNG files the test writes (so a decoder can learn them, and the files can be changed or removed).
The adaptive-weight hand computation and the noise statistics are in tests/test_losses.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline import uri as uri_lib
from pipeline.store import LatentStore, StoreLayout, StorePlan, StoreWriter
from schemas import store_v1
from tests.conftest import free_port
from trainer.checkpoint import list_checkpoints, load_checkpoint, read_meta
from trainer.decoder_data import (
    DecoderDataConfig,
    DecoderDataError,
    DecoderLoader,
    SourceMismatchError,
    build_store_encoder,
    epoch_order,
)
from trainer.fit_decoder import DecoderTrainer, decoder_config_for, fit_decoder, resolve_config
from trainer.loop import TrainError
from trainer.models import build_model_from_meta, model_meta
from trainer.models.decoder import RAEDecoder
from trainer.images import grid_png
from trainer.loading import LoadError
from trainer.reconstruct import reconstruct

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["train.progress=false", "train.tensorboard=false"]
CHEAP = QUIET + ["loss.use_lpips=false", "loss.use_gan=false", "train.grid_samples=0"]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_PORT")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per process


# ------------------------------------------------------------------------------------------------
# tiny encoded stores over PNG files written here
# ------------------------------------------------------------------------------------------------


def _image(i: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth colour image (H, W, 3) uint8, different for each i."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    phase = np.array([0.0, 2.1, 4.2]) + i
    img = 0.5 + 0.4 * np.sin(2 * np.pi * (xx[..., None] * (1 + i % 3) + yy[..., None] * (1 + i % 2)) + phase)
    return (img * 255).round().astype(np.uint8)


def _latent_of(img: np.ndarray, channels: int, grid: int) -> np.ndarray:
    """A latent the decoder can learn: the image's grid x grid cell means, lifted to ``channels`` by a
    fixed linear map (the same for every image)."""
    h, w, _ = img.shape
    cells = img[: h // grid * grid, : w // grid * grid].reshape(grid, h // grid, grid, w // grid, 3).mean((1, 3))
    lift = np.random.default_rng(123).normal(size=(3, channels)) / 128.0
    return (cells - 127.5) @ lift + 0.0  # (g, g, C)


def encoded_store(root, n=8, channels=8, grid=16, resolution=256, image_size=(64, 48), sha=None, name="dinov2",
                  arch="vit_base_patch14_reg4_dinov2[depth=1]"):
    """A complete 'encoded' store of n PNG files under root/src (ImageFolder); returns (store, files)."""
    from pipeline.preprocess import preprocess_image_bytes

    src = os.path.join(str(root), "src", "train", "cls")
    os.makedirs(src, exist_ok=True)
    files, refs, latents = [], [], []
    for i in range(n):
        path = os.path.join(src, f"img{i}.png")
        Image.fromarray(_image(i, image_size)).save(path)
        data = open(path, "rb").read()
        crop = preprocess_image_bytes(data, resolution).transpose(1, 2, 0)
        latents.append(_latent_of(crop, channels, grid).transpose(2, 0, 1))
        files.append(path)
        refs.append({"index": i, "id": i, "key": f"cls/img{i}.png", "uri": path, "row": None, "size": len(data),
                     "sha256": uri_lib.sha256_bytes(data), "label": 0})
    encoder = {"name": name, "arch": arch, "input_size": resolution * 7 // 8,
               "patch_size": 14, "hidden_size": channels, "num_prefix_tokens": 5,
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "output": "test latents",
               "weights": {"source": "random", "ref": "seed=0", "layout": None, "seed": 0,
                           "sha256": sha or "0" * 64}}
    plan = StorePlan(
        kind="encoded", num_samples=n, latent_shape=(channels, grid, grid),
        layout=StoreLayout(dtype="float32", samples_per_shard=4, samples_per_chunk=2, flips=False),
        source={"kind": "imagefolder", "uri": os.path.join(str(root), "src"), "split": "train",
                "fingerprint": "1" * 64, "num_items": n, "order": {"seed": 0, "granularity": "file"}},
        classes={"num_classes": 1, "names": ["cls"]}, encoder=encoder,
        preprocessing={"crop": "adm_center_crop", "resolution": resolution, "encoder_resize": "bicubic",
                       "antialias": False, "align_corners": False, "flip": "none"})
    uri = os.path.join(str(root), "store")
    writer = StoreWriter(uri, plan).create()
    lat = np.stack(latents).astype(np.float32)
    for shard in range(plan.num_shards):
        a, b = plan.shard_bounds(shard)
        writer.write_shard(shard, latents=lat[a:b], labels=np.zeros(b - a), valid=np.ones(b - a, bool),
                           sample_ids=np.arange(a, b), samples=refs[a:b])
    writer.finalize()
    return LatentStore.open(uri), files


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "logs", "metrics.jsonl"))]


# ------------------------------------------------------------------------------------------------
# shapes and data
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid,resolution", [(16, 256), (32, 512)])
def test_output_resolution_follows_the_token_grid(tmp_path, grid, resolution):
    store, _ = encoded_store(tmp_path, n=2, grid=grid, resolution=resolution, image_size=(40, 30))
    cfg = resolve_config("debug", CHEAP + ["model.patch_size=null"])
    model_cfg = decoder_config_for(cfg, store)
    assert (model_cfg.num_tokens, model_cfg.patch_size, model_cfg.in_channels) == (grid * grid, 16, 8)
    decoder = RAEDecoder(model_cfg)
    loader = DecoderLoader(store, DecoderDataConfig(global_batch=2, num_workers=0))
    batch = next(iter(loader))
    assert batch.latents.shape == (2, 8, grid, grid) and batch.latents.dtype == torch.float32
    assert batch.pixels.shape == (2, 3, resolution, resolution) and batch.pixels.dtype == torch.uint8
    out = decoder(batch.latents)
    assert out.shape == (2, 3, resolution, resolution)
    # Unpatchify order (format doc): token (i, j), value (pr * p + pc) * 3 + ch -> pixel [ch, i*p + pr, j*p + pc].
    patches = torch.arange(grid * grid * 16 * 16 * 3, dtype=torch.float32).reshape(1, grid * grid, -1)
    img = decoder.unpatchify(patches)
    i, j, pr, pc, ch = 1, grid - 1, 3, 5, 2
    assert img[0, ch, i * 16 + pr, j * 16 + pc] == patches[0, i * grid + j, (pr * 16 + pc) * 3 + ch]
    # The cached pairs are the store's unflipped latents and the same ADM crops the store encoded.
    rows = batch.rows.tolist()
    np.testing.assert_array_equal(batch.latents.numpy(), np.stack([store.read_rows(r, r + 1)[0] for r in rows]))


def test_the_order_visits_every_row_once_an_epoch_and_resumes_exactly(tmp_path):
    valid = np.ones(20, bool)
    valid[[3, 11]] = False
    order = epoch_order(valid, samples_per_chunk=4, block_chunks=2, seed=0, epoch=0)
    assert sorted(order.tolist()) == np.flatnonzero(valid).tolist()
    assert not np.array_equal(order, epoch_order(valid, 4, 2, 0, 1))
    # Blocks of 2 chunks: the first 8 positions come from 2 chunks only (valid rows per chunk: 3 or 4).
    assert len(set((order[:6] // 4).tolist())) <= 2

    store, _ = encoded_store(tmp_path, n=8)
    cfg = DecoderDataConfig(global_batch=4, num_workers=0, block_chunks=2)
    whole = DecoderLoader(store, cfg)
    it = iter(whole)
    batches = [next(it).rows.tolist() for _ in range(5)]  # 2.5 epochs: the third epoch starts mid-run
    assert sorted(batches[0] + batches[1]) == list(range(8))
    resumed = DecoderLoader(store, cfg)
    resumed.load_state_dict({**whole.state_dict(), "samples_seen": 8})
    assert [b.rows.tolist() for _, b in zip(range(3), resumed)] == batches[2:]
    # Two ranks split each global batch in contiguous halves.
    ranks = [DecoderLoader(store, cfg, rank=r, world_size=2) for r in (0, 1)]
    halves = [next(iter(loader)).rows.tolist() for loader in ranks]
    assert halves[0] + halves[1] == batches[0]
    with pytest.raises(DecoderDataError, match="data.global_batch=4"):
        DecoderLoader(store, DecoderDataConfig(global_batch=2, num_workers=0)).load_state_dict(whole.state_dict())


def test_a_changed_or_missing_source_file_names_the_sample(tmp_path):
    store, files = encoded_store(tmp_path, n=4)
    cfg = DecoderDataConfig(global_batch=4, num_workers=0)
    # Same size, other bytes: only the checksum can tell.
    data = bytearray(open(files[2], "rb").read())
    data[-20] ^= 0xFF
    open(files[2], "wb").write(bytes(data))
    with pytest.raises(SourceMismatchError, match=r"sample 2 \(cls/img2.png\).*changed.*sha256"):
        next(iter(DecoderLoader(store, cfg)))
    open(files[2], "ab").write(b"more")
    with pytest.raises(SourceMismatchError, match=r"sample 2 \(cls/img2.png\).*bytes, the store recorded"):
        next(iter(DecoderLoader(store, cfg)))
    os.remove(files[2])
    with pytest.raises(SourceMismatchError, match=r"sample 2 \(cls/img2.png\).*is missing"):
        next(iter(DecoderLoader(store, cfg)))
    # The command says so in one line, exit code 1.
    from pipeline.cli import app

    res = CliRunner().invoke(app, ["fit-decoder", "--store", store.uri, "--run-dir", str(tmp_path / "run"),
                                   "--preset", "debug", *sum((["--set", s] for s in CHEAP), [])])
    assert res.exit_code == 1 and "sample 2 (cls/img2.png)" in res.output and "missing" in res.output


def test_parquet_sources_are_read_by_file_and_row(tmp_path):
    """A store encoded from Parquet pairs each row with the image cell its reference names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.preprocess import preprocess_image_bytes

    store, files = encoded_store(tmp_path / "folder", n=4)
    blobs = [open(f, "rb").read() for f in files]
    os.makedirs(tmp_path / "pq" / "train")
    path = str(tmp_path / "pq" / "train" / "part-0.parquet")
    table = pa.table({"image": pa.array([{"bytes": b, "path": None} for b in blobs]), "label": [0, 0, 0, 0]})
    pq.write_table(table, path, row_group_size=3)  # rows 0-2 and 3 in two row groups
    refs = [{**store.source_ref(i), "uri": path, "row": i, "key": f"part-0.parquet#{i}"} for i in range(4)]
    spec = json.loads(json.dumps(store.spec))
    spec["source"].update(kind="parquet", uri=str(tmp_path / "pq"))

    class ParquetStore(LatentStore):  # the same rows, with Parquet references
        def source_ref(self, index):
            return refs[index]

    pstore = ParquetStore(store.uri, spec)
    from trainer.decoder_data import SourceFetcher

    fetcher = SourceFetcher(pstore)
    assert fetcher.fetch([3, 0], [refs[3], refs[0]]) == [blobs[3], blobs[0]]
    assert preprocess_image_bytes(fetcher.fetch([1], [refs[1]])[0], 256).shape == (3, 256, 256)
    with pytest.raises(SourceMismatchError, match=r"sample 2 \(part-0.parquet#2\).*row 2.*sha256"):
        fetcher.fetch([2], [{**refs[2], "sha256": "0" * 64}])
    with pytest.raises(SourceMismatchError, match="is missing"):
        fetcher.fetch([2], [{**refs[2], "row": 9}])


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_short_cpu_run_lowers_the_l1_loss(tmp_path):
    store, _ = encoded_store(tmp_path, n=8)
    cfg = resolve_config("debug", CHEAP + [
        "model.patch_size=null", "loss.noise_tau=0.0", "optim.lr=2e-3", "optim.warmup_epochs=0.5",
        "data.global_batch=4", "train.max_steps=60", "train.epochs=null", "train.log_every=5",
        "train.ckpt_every=60"])
    result = DecoderTrainer(cfg, store.uri, str(tmp_path / "run")).train()
    assert result.step == 60 and result.stopped_by == "end"
    rec = [r["rec"] for r in _records(tmp_path / "run")]
    assert rec[-1] < 0.5 * rec[0], rec  # L1 on [0, 1] pixels at 256 px
    meta = read_meta(str(tmp_path / "run"))
    assert meta.kind == "decoder" and meta.model["class"] == "RAEDecoder"
    assert meta.encoder == store_v1.encoder_identity(store.spec) and meta.store["store_id"] == store.store_id
    rebuilt = build_model_from_meta(meta.model)  # the registry's decoder hook round-trips
    assert model_meta(rebuilt) == meta.model and rebuilt.config.patch_size == 16


def test_a_non_finite_loss_stops_without_saving(tmp_path):
    from trainer.optim import NonFiniteLossError

    store, _ = encoded_store(tmp_path, n=4)
    cfg = resolve_config("debug", CHEAP + ["data.global_batch=4", "train.max_steps=4", "train.ckpt_every=1",
                                           "train.debug_nan_at_step=3"])
    with pytest.raises(NonFiniteLossError, match="step 3"):
        DecoderTrainer(cfg, store.uri, str(tmp_path / "run")).train()
    assert [e.step for e in list_checkpoints(str(tmp_path / "run")) if e.complete] == [1, 2]


@pytest.fixture(scope="module")
def debug_run(sample_store, tmp_path_factory):
    """The debug preset through `rae-pipeline fit-decoder` on the sample store, 8 steps of 8 samples
    (2 steps an epoch): L1 from epoch 0, LPIPS from 1, D updates from 2, the GAN term from 3."""
    from pipeline.cli import app

    run = tmp_path_factory.mktemp("debug-run") / "run"
    sets = QUIET + ["train.max_steps=8", "train.log_every=1", "train.ckpt_every=8"]
    res = CliRunner().invoke(app, ["fit-decoder", "--store", sample_store, "--run-dir", str(run), "--preset", "debug",
                                   *sum((["--set", s] for s in sets), [])])
    assert res.exit_code == 0, res.output
    return run, res.output


@pytest.mark.timeout(240)
def test_lpips_and_gan_terms_are_finite_and_start_at_their_epochs(debug_run):
    run, output = debug_run
    assert "trained to step 8 (end)" in output and "LPIPS from epoch 1 (random)" in output
    records = {r["step"]: r for r in _records(run)}
    assert sorted(records) == list(range(1, 9))
    for step, r in records.items():
        epoch = (step - 1) // 2  # the epoch a step starts in
        assert ("lpips" in r) == (epoch >= 1), (step, r)
        assert ("disc_loss" in r) == (epoch >= 2), (step, r)
        assert ("gan" in r and "adaptive_weight" in r) == (epoch >= 3), (step, r)
        for key, value in r.items():
            if key not in ("time",):
                assert np.isfinite(float(value)), (step, key, value)
        assert r["loss"] == pytest.approx(r["rec"] + r.get("lpips", 0.0)
                                          + 0.75 * r.get("adaptive_weight", 0.0) * r.get("gan", 0.0), rel=1e-4, abs=1e-6)
    assert records[3]["lpips"] > 0 and records[8]["adaptive_weight"] > 0
    ckpt = load_checkpoint(str(run))
    assert ckpt.step == 8 and set(ckpt.extra_weights) == {"disc"}
    assert {"optimizer", "scheduler", "disc_optimizer", "disc_scheduler", "data"} <= set(ckpt.train_state)
    assert ckpt.meta.extra["lpips"]["source"] == "random" and ckpt.meta.extra["discriminator"]["source"] == "random"
    assert ckpt.meta.config["loss"]["disc_input_size"] == 64
    grid = Image.open(run / "reconstructions" / "step-0000008.png")
    assert grid.size == (4 * 2 * 64 + 3 * 12 + 4, 64)  # 4 (original | reconstruction) pairs of 64 px
    assert (run / "loss_curve.png").exists() and (run / "config.json").exists()


@pytest.mark.timeout(180)
def test_resume_is_exact(sample_store, tmp_path):
    """4 steps at once == 2 steps, stop, 2 more: decoder, EMA, both optimizers, discriminator heads."""
    sets = QUIET + ["loss.use_lpips=false", "loss.disc_start_epoch=0", "loss.gan_start_epoch=0",
                    "loss.disc_input_size=32", "data.global_batch=4", "train.epochs=1", "train.max_steps=4",
                    "train.grid_samples=0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    DecoderTrainer(resolve_config("debug", sets + ["train.ckpt_every=4"]), sample_store, str(whole)).train()
    DecoderTrainer(resolve_config("debug", sets + ["train.ckpt_every=2", "train.max_steps=2"]), sample_store,
                   str(split)).train()
    trainer = DecoderTrainer(resolve_config("debug", sets + ["train.ckpt_every=2"]), sample_store, str(split))
    assert trainer.step == 2 and trainer.resumed_from.endswith("step-0000002")
    trainer.train()
    a, b = load_checkpoint(str(whole)), load_checkpoint(str(split))
    assert a.step == b.step == 4 and a.meta.samples_seen == b.meta.samples_seen == 16
    for name in ("model_state", "ema_state"):
        for key, value in getattr(a, name).items():
            torch.testing.assert_close(getattr(b, name)[key], value, rtol=0, atol=0, msg=f"{name} {key}")
    for key, value in a.extra_weights["disc"].items():
        torch.testing.assert_close(b.extra_weights["disc"][key], value, rtol=0, atol=0, msg=f"disc {key}")
    for opt in ("optimizer", "disc_optimizer"):
        sa, sb = a.train_state[opt]["state"], b.train_state[opt]["state"]
        assert sa.keys() == sb.keys() and sa
        for p in sa:
            for k in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(sb[p][k], sa[p][k], rtol=0, atol=0, msg=f"{opt} {p} {k}")
    assert a.train_state["disc_scheduler"]["last_epoch"] == b.train_state["disc_scheduler"]["last_epoch"] == 4
    assert [r["step"] for r in _records(split)] == [2, 4]
    torch.manual_seed(0)  # train.seed: the trainer's initial weights
    initial = build_model_from_meta(a.meta.model).state_dict()
    moved = max((a.model_state[k] - initial[k]).abs().max().item() for k in a.model_state)
    assert moved > 1e-3  # trained weights are compared, not two copies of an init
    # Another store in the same run directory is refused.
    other, _ = encoded_store(tmp_path / "other", n=4)
    with pytest.raises(TrainError, match="Resuming needs the same store"):
        DecoderTrainer(resolve_config("debug", sets), other.uri, str(split))


@pytest.mark.timeout(120)
def test_encode_on_the_fly_rebuilds_the_stores_encoder_and_refuses_other_weights(sample_store, tmp_path):
    store = LatentStore.open(sample_store)
    encoder, info = build_store_encoder(store, "random")
    assert info["sha256"] == store.spec["encoder"]["weights"]["sha256"] and encoder.depth == 1
    cfg = resolve_config("debug", CHEAP + ["data.mode=encode_on_the_fly", "data.encoder_weights=random",
                                           "data.global_batch=4", "train.max_steps=2", "model.patch_size=null"])
    trainer = DecoderTrainer(cfg, sample_store, str(tmp_path / "run"))
    batch = next(iter(DecoderLoader(store, cfg.data)))
    assert batch.latents is None and batch.pixels.shape == (4, 3, 256, 256)
    z, target = trainer.inputs(batch)
    assert z.shape == (4, 768, 16, 16) and target.shape == (4, 3, 256, 256)
    # A random 256 crop of the 384-px resize, not the store's center crop: the latent differs.
    stored = torch.from_numpy(np.stack([store.read_rows(r, r + 1)[0] for r in batch.rows.tolist()]))
    assert (z - stored).abs().mean() > 0.05
    again = next(iter(DecoderLoader(store, cfg.data)))  # the same position draws the same crops
    assert torch.equal(again.pixels, batch.pixels)
    assert trainer.train().step == 2
    fake, _ = encoded_store(tmp_path / "fake", n=2, sha="ab" * 32)
    with pytest.raises(DecoderDataError, match="sha256.*pass the weights the store was encoded with"):
        build_store_encoder(fake, "random")


# ------------------------------------------------------------------------------------------------
# reconstruct
# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_reconstruct_writes_the_grid_and_prints_psnr_ssim(debug_run, sample_store, tmp_path):
    from pipeline.cli import app

    run, _ = debug_run
    out = tmp_path / "grid.png"
    res = CliRunner().invoke(app, ["reconstruct", "--decoder-ckpt", str(run), "--store", sample_store,
                                   "--out", str(out), "--num", "6"])
    assert res.exit_code == 0, res.output
    assert "PSNR" in res.output and "SSIM" in res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["num"] == 6 and summary["weights"] == "ema" and summary["step"] == 8
    assert 5.0 < summary["psnr"] < 60.0 and -1.0 < summary["ssim"] <= 1.0
    assert json.loads((tmp_path / "grid.json").read_text()) == summary
    assert Image.open(out).size == (4 * 2 * 64 + 3 * 12 + 4, 2 * 64 + 4)  # 6 pairs: rows of 4
    # The grid's metrics are those of the decoded images against the cropped originals.
    from trainer.images import decode_uint8, store_samples
    from trainer.loading import load_decoder
    from trainer.metrics.pixels import psnr

    decoder = load_decoder(str(run)).model
    latents, originals, rows = store_samples(LatentStore.open(sample_store), 6, 64)
    assert rows.tolist() == summary["rows"]
    assert psnr(originals, decode_uint8(decoder, latents, "cpu")) == pytest.approx(summary["psnr"])


def test_reconstruct_refuses_a_decoder_of_another_encoder(debug_run, tmp_path):
    from pipeline.cli import app

    run, _ = debug_run
    other, _ = encoded_store(tmp_path, n=2, channels=768)  # same grid and width, other encoder weights
    res = CliRunner().invoke(app, ["reconstruct", "--decoder-ckpt", str(run), "--store", other.uri,
                                   "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 1 and "another encoder" in res.output and "weights differ" in res.output
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(LoadError, match="another encoder"):
        reconstruct(str(run), other.uri, str(tmp_path / "g.png"))


def test_grid_png_lays_out_pairs():
    a = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    b = torch.full((3, 3, 8, 8), 255, dtype=torch.uint8)
    img = np.asarray(Image.open(__import__("io").BytesIO(grid_png(a, b, pairs_per_row=2))))
    assert img.shape == (2 * 8 + 4, 2 * (2 * 8 + 4) + 8, 3)
    assert (img[:8, :8] == 0).all() and (img[:8, 12:20] == 255).all()  # original, gap, reconstruction


# ------------------------------------------------------------------------------------------------
# DDP
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_equal_one_process(tmp_path):
    """Under DDP (2 gloo ranks, 2 rows each) the decoder's L1 steps equal the 1-process run on the
    same global batch (latent noise is keyed by the sample, not the rank); the discriminator trains
    from step 1 (head gradients averaged by hand) and the GAN term with its per-rank adaptive weight
    runs at step 3."""
    store, _ = encoded_store(tmp_path, n=8)
    common = QUIET + ["loss.use_lpips=false", "loss.disc_start_epoch=0", "loss.gan_start_epoch=1",
                      "loss.disc_input_size=32", "data.global_batch=4", "train.max_steps=3", "train.ckpt_every=2",
                      "train.grid_samples=0", "model.patch_size=8"]
    one, two = tmp_path / "one", tmp_path / "two"
    fit_decoder(resolve_config("debug", common), store.uri, str(one))
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "pipeline.cli", "fit-decoder", "--store", store.uri, "--run-dir", str(two), "--preset", "debug"]
    for s in common:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("fit-decoder: store") == 1 and "world size 2, global batch 4 = 2 x 2" in proc.stdout
    assert [e.step for e in list_checkpoints(str(two))] == [2, 3]
    a, b = (load_checkpoint(os.path.join(run, "checkpoints", "step-0000002")) for run in (one, two))
    assert b.meta.extra["world_size"] == 2
    for key, value in a.model_state.items():
        torch.testing.assert_close(b.model_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    last = load_checkpoint(str(two))
    assert "gan" in _records(two)[-1] and all(torch.isfinite(v).all() for v in last.extra_weights["disc"].values())


# ------------------------------------------------------------------------------------------------
# presets named after the released runs, and the released recipe's crops
# ------------------------------------------------------------------------------------------------


def test_decoder_presets_follow_the_released_code():
    """The released stage-1 trainer draws sigma = tau * U(0, 1) and runs fp32 by default; the
    ``*_reference`` preset adds its data (frozen encoder in the loop on random crops); cached
    center-crop latents stay the default data everywhere else."""
    for name in ("decoder_b_dinov2", "decoder_l_dinov2", "decoder_xl_dinov2", "decoder_b_dinov2_reference"):
        cfg = resolve_config(name)
        assert (cfg.loss.noise_rule, cfg.loss.noise_tau) == ("uniform", 0.8), name
        assert (cfg.train.precision, cfg.train.tf32) == ("fp32", True), name
        assert cfg.data.global_batch == 512 and cfg.train.epochs == 16.0, name
    assert resolve_config("decoder_b_dinov2").data.mode == "cached"
    ref = resolve_config("decoder_b_dinov2_reference")
    assert ref.data.mode == "encode_on_the_fly" and ref.model.size == "decoder_b" and ref.data.augment_resize is None
    assert DecoderDataConfig().mode == "cached"
    # The paper's half-normal noise and bf16 stay one override away.
    other = resolve_config("decoder_b_dinov2", ["loss.noise_rule=half_normal", "train.precision=bf16"])
    assert (other.loss.noise_rule, other.train.precision) == ("half_normal", "bf16")


@pytest.mark.parametrize("size", [(500, 375), (300, 420), (384, 384)])
def test_random_crops_are_torchvision_resize_384_then_random_crop_256(size):
    """The released stage-1 loader: ``Resize(384, BICUBIC)`` (short side 384 on a PIL image) then
    ``RandomCrop(256)`` (top, then left, uniform). Same window -> the same bytes."""
    import io

    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from trainer.decoder_data import random_resized_crop

    buf = io.BytesIO()
    Image.fromarray(_image(3, size)).save(buf, format="PNG")
    for seed in range(3):
        ours = random_resized_crop(buf.getvalue(), 384, 256, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        resized = TF.resize(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), 384,
                            interpolation=InterpolationMode.BICUBIC)
        w, h = resized.size
        assert min(w, h) == 384 and max(w, h) == int(384 * max(size) / min(size))
        top, left = int(rng.integers(0, h - 256 + 1)), int(rng.integers(0, w - 256 + 1))
        theirs = np.asarray(TF.crop(resized, top, left, 256, 256)).transpose(2, 0, 1)
        assert ours.shape == (3, 256, 256) and np.array_equal(ours, theirs)


def test_the_decoder_data_bench_fits_the_same_decoder_two_ways():
    """``bench --only decoder_data``: the two fits differ in their data alone, with the released
    noise rule."""
    import bench.bench  # noqa: F401  (registers every item in order)
    from bench.bench_decoder import MODES, fit_overrides
    from bench.common import BENCHMARKS
    from pipeline.config import to_dict

    assert "decoder_data" in BENCHMARKS
    cached, ref = (to_dict(resolve_config("debug", fit_overrides(mode, 8, 8))) for mode in MODES)
    differ = {(section, key) for section in cached for key in cached[section]
              if cached[section][key] != ref[section][key]}
    assert differ == {("data", "mode")} and ref["data"]["mode"] == "encode_on_the_fly"
    assert cached["loss"]["noise_rule"] == "uniform" and cached["train"]["max_steps"] == 8
