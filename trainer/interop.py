"""Import and export the published RAE checkpoints (``docs/checkpoint-format.md`` sections 1-5): the
``import-rae`` / ``export-rae`` stage. Reading the published files, their layout and the architecture
inference described below live in ``trainer/published.py``.

People hold the released RAE files: DiT^DH models (bare state dicts or training checkpoints), ViT
decoders and ``stat.pt`` latent statistics. This module turns them into our checkpoint format
(``schemas/checkpoint_v1``) and writes our checkpoints back in the published layout.

Our models (``trainer/models/dit.py``, ``trainer/models/decoder.py``) use the published parameter
names, so a published state dict *is* our model state; converting is: read the file safely, pick
the weights, infer the architecture from the shapes, check every key and shape, and record where
everything came from. Two layout differences exist and are converted here:

- A plain DiT (reference ``LightningDiT``) built with ``learn_sigma=True`` (the released code's
  default is False; an early version defaulted to True) has 2C output values per pixel and discards
  the second C; we predict the velocity only. Import keeps the first C channels; export writes C
  channels, or 2C (zeros after the first C) with ``learn_sigma``.
- Decoder-training checkpoints hold a whole autoencoder: ``decoder.*`` is the decoder, the frozen
  ``encoder.*`` weights are dropped.

Inference rules (what each config field is read from):

- DiT^DH vs plain DiT: ``s_embedder.proj.weight`` present -> DiT^DH, else plain DiT.
- Backbone width D0 and latent channels C: ``s_embedder.proj.weight`` [D0, C, p, p] (plain DiT:
  ``x_embedder``); head width D1: ``x_embedder.proj.weight`` [D1, C, p, p]; patch p: the kernel.
- Token grid G: ``pos_embed`` [1, G*G, D0]; latent side = G * p.
- Blocks: ``blocks.{i}``, one list; with D0 != D1 the leading blocks of width D0 (``norm1.weight``)
  are the backbone, the rest the head. With D0 == D1 the split is not in the shapes: ``head_depth``
  (default 2, every published DiT^DH) decides.
- Heads: not in the weight shapes. Read from the RoPE table width (``enc_feat_rope.freqs_cos``
  [G*G, D0/heads], ``dec_feat_rope`` for the head, ``feat_rope`` for plain DiT), else from the size
  table (``MODEL_SIZES``), else the caller's value. The RoPE tables are checked against the theta =
  10000 tables; a difference is reported (the file's tables are kept: they are what the model ran).
- SwiGLU ratio: hidden H of ``mlp.w3.weight`` [D, H] with H = int(2/3 * ratio * D), ratio 4 checked
  first. Fourier frequencies: ``t_embedder.W`` [F]. Classes: ``y_embedder.embedding_table`` rows - 1
  (the last row is the null label).
- Decoder: width/in-channels from ``decoder_embed.weight``, tokens from ``decoder_pos_embed`` - 1,
  depth from ``decoder_layers.{i}``, MLP from ``intermediate.dense``, pixel patch from
  ``decoder_pred`` rows / 3; heads from the caller or the decoder size table (``DECODER_SIZES``).

Encoder identity of an import: the encoder is named by the user (DINOv2, SigLIP2 and MAE are all 768
wide), with the architecture and input size of ``pipeline/encoders.py`` at the given resolution,
``weights_source`` "imported" and ``weights_sha256`` null: the hash of the encoder weights the
published model was trained on cannot be known offline. ``schemas.store_v1.encoder_mismatch`` is the comparison
rule: name, arch and input_size must agree; weights hashes are compared only when both are known.
A model of a width none of our encoders has (a custom or tiny encoder) is imported with no encoder
(``--encoder none``): no identity is recorded and no latent shape is checked against an encoder
(the DiT and the decoder are still checked against each other); ``sample`` and ``reconstruct`` then
accept it when the latent shapes match and say that no identity could be checked
(``trainer/loading.py``). Its decoder un-normalizes with the ImageNet mean/std.

Everything is loaded with ``torch.load(weights_only=True)`` (or safetensors); a file that needs
arbitrary unpickling is refused. A file whose keys or shapes differ from the published layout of
the inferred architecture fails with an error listing every missing, unexpected and mis-shaped key.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch

from pipeline import uri as uri_lib
from trainer.flow import shift_alpha
from trainer.loading import DECODER_CLASS, DIT_CLASSES
from trainer.published import (
    DECODER_FILE, DIT_FILE, STATS_FILE, InteropError, PublishedWeights, Use, check_layout, decoder_part,
    infer_decoder_config, infer_dit_config, load_published_file, published_layout, published_state_dict,
    read_published_stats, rope_report, select_weights, state_dict_from_published,
)

# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImportedModel:
    """A published model converted to our layout (not yet saved): ``kind`` "dit" | "decoder",
    ``model_meta`` {"class", "config"}, ``state_dict`` in our layout, provenance and inference notes."""

    kind: str
    model_meta: dict
    state_dict: dict[str, torch.Tensor]
    source: PublishedWeights
    how: dict[str, str]
    learn_sigma: bool = False
    autoencoder: bool = False

    @property
    def config(self) -> dict:
        return self.model_meta["config"]


def import_dit_weights(uri: str, *, use: Use = "auto", num_heads: int | None = None,
                       head_num_heads: int | None = None, head_depth: int | None = None,
                       storage_options: dict | None = None) -> ImportedModel:
    """A published DiT^DH or plain DiT file -> our state dict and architecture (checked strictly)."""
    pub = select_weights(load_published_file(uri, storage_options), str(uri), use)
    inferred = infer_dit_config(pub.state_dict, str(uri), num_heads=num_heads, head_num_heads=head_num_heads,
                                head_depth=head_depth)
    what = "a DiT^DH (DiTwDDTHead)" if inferred.model_meta["class"] == "DiTDH" else "a plain DiT (LightningDiT)"
    check_layout(published_layout(inferred.model_meta, inferred.learn_sigma), pub.state_dict, str(uri), what)
    inferred.how["rope_tables"] = rope_report(pub.state_dict, inferred.model_meta, str(uri))
    state = state_dict_from_published(pub.state_dict, inferred.model_meta, inferred.learn_sigma)
    return ImportedModel("dit", inferred.model_meta, state, pub, inferred.how, learn_sigma=inferred.learn_sigma)


def import_decoder_weights(uri: str, *, use: Use = "auto", num_heads: int | None = None,
                           image_mean: tuple[float, float, float] | None = None,
                           image_std: tuple[float, float, float] | None = None,
                           storage_options: dict | None = None) -> ImportedModel:
    """A published decoder file (bare, or a decoder-training checkpoint of the whole autoencoder)
    -> our state dict and architecture (checked strictly)."""
    pub = select_weights(load_published_file(uri, storage_options), str(uri), use)
    sd, autoencoder = decoder_part(pub.state_dict, str(uri))
    pub.state_dict = sd
    inferred = infer_decoder_config(sd, str(uri), num_heads=num_heads, image_mean=image_mean, image_std=image_std)
    check_layout(published_layout(inferred.model_meta), sd, str(uri), "an RAE decoder")
    return ImportedModel("decoder", inferred.model_meta, dict(sd), pub, inferred.how, autoencoder=autoencoder)


def imported_encoder_identity(name: str, resolution: int = 256) -> dict:
    """The encoder identity an import records: name, the timm arch and input size of
    ``pipeline/encoders.py`` at ``resolution``, ``weights_sha256`` None (unknown offline) and
    ``weights_source`` "imported"."""
    from pipeline.encoders import ENCODERS, encoder_input_size, resolve_encoder_name

    spec = ENCODERS[resolve_encoder_name(name)]
    return {"name": spec.name, "arch": spec.timm_arch, "input_size": encoder_input_size(spec.name, resolution),
            "weights_sha256": None, "weights_source": "imported"}


def _check_against_encoder(imported: ImportedModel, encoder_name: str, resolution: int) -> None:
    """The latents an imported model reads must be the encoder's at that resolution (channels, grid)."""
    from pipeline.encoders import latent_shape

    C, grid, _ = latent_shape(encoder_name, resolution)
    cfg = imported.config
    if imported.kind == "dit":
        have = (cfg["in_channels"], cfg["input_size"])
        what = f"latents of {cfg['in_channels']} x {cfg['input_size']} x {cfg['input_size']}"
    else:
        have = (cfg["in_channels"], math.isqrt(cfg["num_tokens"]))
        what = f"{cfg['num_tokens']} tokens of width {cfg['in_channels']}"
    if have != (C, grid):
        raise InteropError(
            f"{imported.source.source}: the model reads {what}, but {encoder_name} at {resolution}px gives "
            f"{C} x {grid} x {grid}; check --encoder and --resolution"
        )


def _check_pair(dit: ImportedModel, decoder: ImportedModel) -> None:
    """The decoder must read the latents the DiT generates (channels and token grid)."""
    d, e = dit.config, decoder.config
    if (d["in_channels"], d["input_size"] ** 2) != (e["in_channels"], e["num_tokens"]):
        raise InteropError(
            f"{dit.source.source} generates {d['in_channels']} x {d['input_size']} x {d['input_size']} latents but "
            f"{decoder.source.source} reads {e['num_tokens']} tokens of width {e['in_channels']}"
        )


def _checkpoint_meta(imported: ImportedModel, *, encoder: dict | None, stats: dict | None,
                     stats_uri: str | None, request: dict) -> dict:
    pub = imported.source
    extra = {"imported": {**pub.describe(), "inferred": imported.how, "learn_sigma_dropped": imported.learn_sigma,
                          "autoencoder_checkpoint": imported.autoencoder}}
    if stats is not None:
        extra["imported"]["stats_file"] = stats_uri
    if imported.kind == "dit":  # the reference's shift, sqrt(C*H*W / 4096), recorded where train-dit records it
        conf = imported.model_meta["config"]
        extra["shift_alpha"] = shift_alpha((int(conf["in_channels"]), int(conf["input_size"]), int(conf["input_size"])))
    return {
        "kind": imported.kind,
        "epoch": 0.0,  # our epochs count our samples; the source's step/epoch are in extra.imported
        "samples_seen": 0,
        "config": {"import": request},
        "model": imported.model_meta,
        "store": None,
        "encoder": encoder,
        "statistics": None if stats is None else {"mean": "mean" in stats, "var": "var" in stats, "source": "imported"},
        "extra": extra,
    }


def import_rae(out: str, *, dit: str | None = None, decoder: str | None = None, stats: str | None = None,
               encoder: str | None, resolution: int = 256, use: Use = "auto",
               decoder_num_heads: int | None = None, head_depth: int | None = None, overwrite: bool = False,
               storage_options: dict | None = None) -> dict[str, str]:
    """Convert published files into our checkpoints under ``out``: ``<out>/dit`` and
    ``<out>/decoder`` run directories, one checkpoint each. Returns {"dit"?, "decoder"?: checkpoint URI}.

    The DiT carries the statistics of ``stats`` (a ``stat.pt``; absent mean = 0, absent var = 1).
    ``encoder`` names the encoder the models were trained on (recorded as the identity and checked
    against the latent shape; None records no identity). Everything is read and checked before
    anything is written. An existing ``<out>/<kind>`` is refused unless ``overwrite``.
    """
    from trainer.checkpoint import save_checkpoint

    if stats is not None and dit is None:
        raise InteropError("statistics are imported with the DiT they normalize for: give the DiT file too")
    if dit is None and decoder is None:
        raise InteropError("nothing to import: give a DiT file, a decoder file or both")
    identity = imported_encoder_identity(encoder, resolution) if encoder is not None else None
    jobs = _read_imports(dit, decoder, stats, encoder, use, decoder_num_heads, head_depth, storage_options)
    _check_imports(jobs, out, encoder, resolution, overwrite, storage_options)
    request = {"dit": dit, "decoder": decoder, "stats": stats, "encoder": encoder, "resolution": resolution, "use": use}
    written = {}
    for model, stat_tensors in jobs:
        run_dir = uri_lib.join(out, model.kind)
        if overwrite:
            uri_lib.rm(run_dir, storage_options)
        meta = _checkpoint_meta(model, encoder=identity, stats=stat_tensors, stats_uri=stats, request=request)
        written[model.kind] = save_checkpoint(run_dir, model.source.step or 0, model_state=model.state_dict,
                                              meta=meta, stats=stat_tensors, storage_options=storage_options)
    return written


def _read_imports(dit, decoder, stats, encoder, use, decoder_num_heads, head_depth, storage_options
                  ) -> list[tuple[ImportedModel, dict[str, torch.Tensor] | None]]:
    """(imported model, its statistics) for the DiT and/or the decoder, every file read and checked."""
    jobs = []
    if dit is not None:
        model = import_dit_weights(dit, use=use, head_depth=head_depth, storage_options=storage_options)
        stat_tensors = read_published_stats(stats, storage_options) if stats is not None else None
        want = (model.config["in_channels"], model.config["input_size"], model.config["input_size"])
        for key, t in (stat_tensors or {}).items():
            if tuple(t.shape) != want:
                raise InteropError(f"{stats}: {key!r} has shape {list(t.shape)}, the DiT's latents are {list(want)}")
        jobs.append((model, stat_tensors))
    if decoder is not None:
        mean = std = None
        if encoder is not None:
            from pipeline.encoders import ENCODERS, resolve_encoder_name

            spec = ENCODERS[resolve_encoder_name(encoder)]
            mean, std = spec.mean, spec.std
        jobs.append((import_decoder_weights(decoder, use=use, num_heads=decoder_num_heads, image_mean=mean,
                                            image_std=std, storage_options=storage_options), None))
    return jobs


def _check_imports(jobs, out, encoder, resolution, overwrite, storage_options) -> None:
    """Latent shapes against the encoder and each other; outputs that would be replaced."""
    for model, _ in jobs:
        if encoder is not None:
            _check_against_encoder(model, encoder, resolution)
    if len(jobs) == 2:
        _check_pair(jobs[0][0], jobs[1][0])
    for model, _ in jobs:
        run_dir = uri_lib.join(out, model.kind)
        if uri_lib.exists(run_dir, storage_options) and not overwrite:
            raise InteropError(f"{run_dir} exists; choose another output or pass overwrite (--overwrite)")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportResult:
    """Files written (role -> URI: "dit" or "decoder", "stats"), which of the checkpoint's weights
    were exported ("ema" or "model") and where those came from, in words (``description``: for an
    imported checkpoint, which weights of which published file)."""

    files: dict[str, str]
    weights: str
    description: str = ""


def describe_exported_weights(meta, used: str, which: str) -> str:
    """What an export of ``used`` weights (asked: ``which``) writes, in words. An imported checkpoint
    holds one set of weights, the ones import-rae picked from the published file (a training
    checkpoint's EMA by default): its model weights are those, not a fallback for missing EMA ones."""
    imported = (meta.extra or {}).get("imported") if isinstance(meta.extra, dict) else None
    if imported:
        picked = imported.get("weights")
        source = (f"the {picked} weights of the training checkpoint {imported.get('file')}" if picked
                  else f"the state dict {imported.get('file')}")
        return f"the imported weights: {source} (an import holds that one set)"
    if used == which:
        return f"the {'EMA' if used == 'ema' else 'trained model'} weights"
    return "the trained model weights (the checkpoint has no EMA weights)"


def _write_torch(obj: Any, uri: str, storage_options: dict | None = None) -> None:
    """torch.save to a path or URI; readers see the whole file or nothing."""
    uri_lib.atomic_write_with(uri, lambda f: torch.save(obj, f), storage_options)


def _stats_object(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference ``stat.pt`` dict: the present statistics as float32 [C, H, W]."""
    return {k: stats[k].detach().to("cpu", torch.float32).contiguous() for k in ("mean", "var") if k in stats}


def export_rae(ckpt: str, out: str, *, which: Literal["ema", "model"] = "ema", learn_sigma: bool = False,
               storage_options: dict | None = None) -> ExportResult:
    """Write one of our checkpoints (checkpoint or run directory) in the published layout under ``out``:
    ``dit.pt`` or ``decoder.pt`` (a bare state dict loadable strictly by the reference classes) and,
    when the checkpoint carries statistics, ``stat.pt``.

    ``which="ema"`` exports the EMA weights, or the model weights when the checkpoint has no EMA
    (``ExportResult.weights`` says which, ``ExportResult.description`` in words: an imported
    checkpoint's one set of weights is named after the published weights it came from).
    ``learn_sigma`` (plain DiT): write the 2C-output final layer of ``LightningDiT(learn_sigma=True)``
    (the default of early reference code), zeros for sigma.
    """
    from trainer.checkpoint import load_checkpoint

    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    ck = load_checkpoint(ckpt, load_train_state=False, storage_options=storage_options)
    model_meta = ck.meta.model
    cls_name = model_meta.get("class")
    if cls_name not in (*DIT_CLASSES, DECODER_CLASS):
        raise InteropError(f"{ck.uri}: a {cls_name!r} checkpoint has no published RAE layout (DiTDH, DiT, RAEDecoder)")
    used = "ema" if which == "ema" and ck.ema_state is not None else "model"
    state = ck.ema_state if used == "ema" else ck.model_state
    sd = published_state_dict(state, model_meta, learn_sigma)
    check_layout(published_layout(model_meta, learn_sigma), sd, f"{ck.uri} ({used} weights)", f"a {cls_name}")
    files = {}
    role = "decoder" if cls_name == DECODER_CLASS else "dit"
    files[role] = uri_lib.join(out, DECODER_FILE if role == "decoder" else DIT_FILE)
    _write_torch(sd, files[role], storage_options)
    if ck.stats:
        files["stats"] = uri_lib.join(out, STATS_FILE)
        _write_torch(_stats_object(ck.stats), files["stats"], storage_options)
    return ExportResult(files, used, describe_exported_weights(ck.meta, used, which))


def export_store_stats(store: str, out: str, storage_options: dict | None = None) -> str:
    """A latent store's statistics as the reference ``stat.pt`` under ``out`` (float32 mean and var)."""
    from pipeline.store import LatentStore

    mean, var = LatentStore.open(store, storage_options).stats()
    target = uri_lib.join(out, STATS_FILE)
    _write_torch(_stats_object({"mean": torch.as_tensor(mean), "var": torch.as_tensor(var)}), target, storage_options)
    return target


def model_from_checkpoint(ckpt: str, which: Literal["ema", "model"] = "ema",
                          storage_options: dict | None = None) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode with the checkpoint's weights, loaded Checkpoint). ``which="ema"`` falls
    back to the model weights when the checkpoint has no EMA."""
    from trainer.checkpoint import load_checkpoint
    from trainer.models import build_model_from_meta

    ck = load_checkpoint(ckpt, load_train_state=False, storage_options=storage_options)
    model = build_model_from_meta(ck.meta.model)
    state = ck.ema_state if which == "ema" and ck.ema_state is not None else ck.model_state
    model.load_state_dict(state, strict=True)
    return model.eval(), ck
