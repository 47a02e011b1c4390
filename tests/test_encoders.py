"""Frozen encoders: parity with the transformers models the reference runs, weight loading, shapes.

The reference RAE code (bytetriper/RAE, ``src/stage1/rae.py`` ``RAE.encode`` and the encoder
wrappers ``Dinov2withNorm``, ``SigLIP2wNorm``, ``MAEwNorm``) resizes the crop to the encoder input
with bicubic (antialias off), normalizes, runs the transformers model (interpolating position
embeddings inside), removes the final LayerNorm's affine, drops the prefix tokens and reshapes to
[C, H, W]. ``reference_latents`` below does exactly that with transformers 5.x models built from
their configs (random weights, perturbed so that every tensor matters), and our encoder, loaded
with the converted weights, must give the same latents.
"""
from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline import encoders as enc_lib
from pipeline.weights import WeightsFileError, read_state_dict
from pipeline.encoders import (
    ALIASES,
    ENCODER_NAMES,
    ENCODERS,
    EncoderWeightsError,
    HubWeightsUnavailableError,
    RAEEncoder,
    build_encoder,
    convert_hf_state_dict,
    encoder_input_size,
    latent_shape,
    resolve_encoder_name,
    state_dict_checksum,
)

PARITY_ATOL = 1e-4
# Two images where a forward is cheap (checks that images do not mix), one elsewhere.
NUM_IMAGES = {"dinov2": 2, "siglip2": 1, "mae": 1}


# ---------------------------------------------------------------------------------------------
# The reference: transformers models run the way the RAE code runs them
# ---------------------------------------------------------------------------------------------


def _fill_random(model: torch.nn.Module, seed: int) -> None:
    """Random weights in one cheap pass (transformers' own init costs seconds per ViT-B here).

    Every tensor gets its own noise, so a wrong mapping cannot hide behind zero biases, zero
    registers or equal layer scales; LayerNorm gains and layer scales stay near 1.
    """
    gen = torch.Generator().manual_seed(seed)
    norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in [m.weight]}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02, generator=gen)
            if id(p) in norm_params or name.endswith("lambda1"):
                p.mul_(5.0).add_(1.0)  # 1 + N(0, 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("position_ids"):  # SigLIP's arange(num_positions)
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
            else:
                raise AssertionError(f"unexpected buffer {name}: fill it")


def build_hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    """The transformers model of encoder ``name`` with the real (base) config, random weights."""
    if name == "dinov2":
        from transformers import Dinov2WithRegistersConfig as Config, Dinov2WithRegistersModel as Model

        # facebook/dinov2-with-registers-base: the defaults, pretrained at 518 px.
        config = Config(image_size=518, patch_size=14, num_register_tokens=4)
    elif name == "siglip2":
        from transformers import SiglipVisionConfig as Config, SiglipVisionModel as Model

        # google/siglip2-base-patch16-256 vision tower (what SiglipModel(...).vision_model is in 5.x).
        config = Config(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=256, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        )
    else:
        from transformers import ViTMAEConfig as Config, ViTMAEModel as Model

        # facebook/vit-mae-base encoder (ViTMAEForPreTraining(...).vit); MAEwNorm sets mask_ratio 0.
        config = Config()
        config.mask_ratio = 0.0
    with torch.device("meta"):
        model = Model(config)
    model.to_empty(device="cpu")
    _fill_random(model, seed)
    return model.eval()


@torch.no_grad()
def reference_latents(name: str, model: torch.nn.Module, x: torch.Tensor, input_size: int) -> torch.Tensor:
    """RAE.encode (no noising, no latent normalization) around the reference encoder wrappers."""
    spec = ENCODERS[name]
    if x.shape[-1] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False)
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    final_norm = model.post_layernorm if name == "siglip2" else model.layernorm
    weight, bias = final_norm.weight, final_norm.bias
    # The wrappers remove the affine this way: elementwise_affine False, weight and bias None.
    final_norm.elementwise_affine = False
    final_norm.weight = None
    final_norm.bias = None
    try:
        if name == "dinov2":
            tokens = model(x).last_hidden_state[:, 1 + 4:]
        elif name == "siglip2":
            tokens = model(x, interpolate_pos_encoding=True).last_hidden_state
        else:
            num_patches = (input_size // spec.patch_size) ** 2
            noise = torch.arange(num_patches).unsqueeze(0).expand(x.shape[0], -1).to(x.dtype)
            tokens = model(x, noise, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
    finally:
        final_norm.weight, final_norm.bias = weight, bias
        final_norm.elementwise_affine = True
    batch, num, channels = tokens.shape
    grid = int(num ** 0.5)
    return tokens.transpose(1, 2).reshape(batch, channels, grid, grid)


def images(resolution: int, count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def _parity_case(name: str) -> dict:
    hf_model = build_hf_model(name, seed={"dinov2": 0, "siglip2": 10, "mae": 20}[name])
    timm_sd = convert_hf_state_dict(name, hf_model.state_dict())
    encoder = RAEEncoder(name, 256, seed=None)
    encoder.load_timm_state_dict(timm_sd, source=f"converted transformers {name}")
    x = images(256, NUM_IMAGES[name], seed=7)
    with torch.no_grad():
        z = encoder(x)
    z_ref = reference_latents(name, hf_model, x, encoder.input_size)
    return {"hf": hf_model, "encoder": encoder, "x": x, "z": z, "z_ref": z_ref}


@pytest.fixture(scope="module")
def case_dinov2():
    return _parity_case("dinov2")


@pytest.fixture(scope="module")
def case_siglip2():
    return _parity_case("siglip2")


@pytest.fixture(scope="module")
def case_mae():
    return _parity_case("mae")


# ---------------------------------------------------------------------------------------------
# Names, sizes, registry
# ---------------------------------------------------------------------------------------------


def test_names_sizes_and_specs():
    assert ENCODER_NAMES == ("dinov2", "siglip2", "mae") and ALIASES == {"siglip": "siglip2"}
    assert resolve_encoder_name("siglip") == "siglip2"
    assert resolve_encoder_name(" DINOv2 ") == "dinov2"
    with pytest.raises(ValueError, match="dinov2, siglip2, mae"):
        resolve_encoder_name("clip")
    assert [encoder_input_size(n, 256) for n in ENCODER_NAMES] == [224, 256, 256]
    assert [encoder_input_size(n, 512) for n in ENCODER_NAMES] == [448, 512, 512]
    for n in ENCODER_NAMES:
        assert latent_shape(n, 256) == (768, 16, 16)
        assert latent_shape(n, 512) == (768, 32, 32)
    with pytest.raises(ValueError, match="multiple of 256"):
        encoder_input_size("dinov2", 300)
    with pytest.raises(ValueError, match="positive int"):
        latent_shape("mae", 0)
    assert [ENCODERS[n].num_prefix_tokens for n in ENCODER_NAMES] == [5, 0, 1]
    assert ENCODERS["siglip2"].mean == (0.5, 0.5, 0.5) and ENCODERS["siglip2"].std == (0.5, 0.5, 0.5)
    assert ENCODERS["dinov2"].mean == ENCODERS["mae"].mean == (0.485, 0.456, 0.406)
    assert ENCODERS["dinov2"].std == ENCODERS["mae"].std == (0.229, 0.224, 0.225)


def test_timm_architectures_and_hub_ids_exist():
    import timm

    for spec in ENCODERS.values():
        assert timm.is_model(spec.timm_arch), spec.timm_arch
        assert spec.timm_hub_id.removeprefix("timm/") in timm.list_pretrained(spec.timm_arch), spec.timm_hub_id


def test_import_touches_neither_timm_nor_the_hub():
    """Module-level imports only: timm and huggingface_hub are imported inside the functions."""
    tree = ast.parse(Path(enc_lib.__file__).read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"timm", "huggingface_hub", "transformers", "requests", "httpx"}, top_level


# ---------------------------------------------------------------------------------------------
# Parity with the transformers models
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_latents_match_transformers_reference(name, request):
    case = request.getfixturevalue(f"case_{name}")
    z, z_ref = case["z"], case["z_ref"]
    assert z.shape == z_ref.shape == (NUM_IMAGES[name], 768, 16, 16)
    assert z.dtype == torch.float32
    diff = (z - z_ref).abs().max().item()
    assert diff <= PARITY_ATOL, f"{name}: max |ours - transformers| = {diff:.3g}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_position_embedding_filter_matters(case_dinov2):
    """timm's own resampling (no antialias) would not match: the HF filter is what gives parity."""
    encoder = case_dinov2["encoder"]
    pos = encoder.pos_embed
    ours = enc_lib.resize_pos_embed(pos, 16, antialias=True)
    other = enc_lib.resize_pos_embed(pos, 16, antialias=False)
    assert ours.shape == (1, 256, 768)
    assert (ours - other).abs().max().item() > 1e-3
    assert enc_lib.resize_pos_embed(pos, 37, antialias=True) is pos  # pretraining grid: untouched


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dinov2_512px_matches_transformers_reference(case_dinov2):
    """448 input, 37x37 -> 32x32 position grid. The first 3 blocks of both models are enough:
    the 512px path differs from the 256px one only before the blocks."""
    depth = 3
    hf_model = case_dinov2["hf"]
    all_layers = hf_model.encoder.layer
    timm_sd = {k: v for k, v in case_dinov2["encoder"].state_dict().items()
               if not k.startswith("blocks.") or int(k.split(".")[1]) < depth}
    encoder = RAEEncoder("dinov2", 512, seed=None, depth=depth)
    encoder.load_timm_state_dict(timm_sd)
    assert encoder.input_size == 448
    x = images(512, 1, seed=8)
    with torch.no_grad():
        z = encoder(x)
    hf_model.encoder.layer = all_layers[:depth]
    try:
        z_ref = reference_latents("dinov2", hf_model, x, 448)
    finally:
        hf_model.encoder.layer = all_layers
    assert z.shape == (1, 768, 32, 32)
    diff = (z - z_ref).abs().max().item()
    assert diff <= PARITY_ATOL, f"dinov2 512px: max |ours - transformers| = {diff:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_tokens_are_standardized(name, request):
    z = request.getfixturevalue(f"case_{name}")["z"]
    assert z.shape == (NUM_IMAGES[name], 768, 16, 16)
    mean = z.mean(dim=1)
    var = z.var(dim=1, unbiased=False)
    assert mean.abs().max().item() < 1e-4
    assert (var - 1).abs().max().item() < 1e-3


@pytest.mark.slow
def test_encoder_is_frozen_and_checks_its_input(case_mae):
    encoder = case_mae["encoder"]
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    assert not any(k.startswith(("norm.", "head.")) for k in encoder.state_dict())
    with pytest.raises(ValueError, match=r"\[B, 3, 256, 256\]"):
        encoder(torch.rand(1, 3, 224, 224))


# ---------------------------------------------------------------------------------------------
# Weights from files, the hub, or a seed
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_weights_files_in_timm_and_transformers_layouts(case_dinov2, tmp_path):
    reference_encoder = case_dinov2["encoder"]
    timm_file = tmp_path / "dinov2_timm.safetensors"
    save_file(reference_encoder.state_dict(), str(timm_file))
    # save_pretrained writes the hub files' classic key names (attention.attention.query, ...).
    case_dinov2["hf"].save_pretrained(tmp_path / "hf")
    hf_file = tmp_path / "hf" / "model.safetensors"
    with safe_open(str(hf_file), framework="pt") as f:
        assert "encoder.layer.0.attention.attention.query.weight" in f.keys()

    from_timm, info_timm = build_encoder("dinov2", 256, weights=str(timm_file))
    from_hf, info_hf = build_encoder("dinov2", 256, weights=str(hf_file))
    assert info_timm == {"source": "file", "ref": str(timm_file), "layout": "timm",
                         "sha256": info_timm["sha256"], "seed": None}
    assert info_hf["source"] == "file" and info_hf["layout"] == "hf"
    assert info_timm["sha256"] == info_hf["sha256"] == state_dict_checksum(reference_encoder.state_dict())
    assert not from_hf.training and not any(p.requires_grad for p in from_hf.parameters())

    x = case_dinov2["x"]
    with torch.no_grad():
        z_timm, z_hf = from_timm(x), from_hf(x)
    assert torch.equal(z_timm, z_hf)
    assert torch.equal(z_timm, case_dinov2["z"])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_hub_like_torch_bin_with_prefix_and_extra_towers(case_mae, tmp_path):
    """A ViTMAEForPreTraining-style .bin: ``vit.`` prefix, decoder weights to ignore."""
    sd = {f"vit.{k}": v for k, v in case_mae["hf"].state_dict().items()}
    sd["decoder.decoder_embed.weight"] = torch.randn(8, 768)
    sd["decoder.mask_token"] = torch.zeros(1, 1, 8)
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    encoder, info = build_encoder("mae", 256, weights=str(path))
    assert info["layout"] == "hf"
    # Same weights as the encoder that passed the parity test, so the same function.
    assert info["sha256"] == state_dict_checksum(case_mae["encoder"].state_dict())


@pytest.mark.slow
def test_siglip_full_model_keys_convert_to_the_vision_trunk(case_siglip2):
    """The hub file is a whole SiglipModel: vision_model.* (with its MAP head), text_model.*, logits."""
    vision = case_siglip2["hf"].state_dict()
    full = {f"vision_model.{k}": v for k, v in vision.items()}
    full.update({"text_model.embeddings.token_embedding.weight": torch.randn(4, 8),
                 "logit_scale": torch.zeros(1), "logit_bias": torch.zeros(1)})
    converted = convert_hf_state_dict("siglip", full)
    expected = case_siglip2["encoder"].state_dict()
    assert set(converted) - {"norm.weight", "norm.bias"} == set(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_wrong_architecture_files_fail_clearly(tmp_path):
    import timm

    # DINOv2-S/14 weights (384 wide) offered as DINOv2-B: every tensor has the wrong shape.
    torch.manual_seed(0)
    small = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0)
    small_file = tmp_path / "dinov2_small.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(small_file))
    with pytest.raises(EncoderWeightsError) as err:
        build_encoder("dinov2", weights=str(small_file))
    message = str(err.value)
    assert str(small_file) in message and "mis-shaped keys" in message
    assert "pos_embed: file (1, 1369, 384) vs model (1, 1369, 768)" in message

    # SigLIP (no class token, no registers) weights offered as DINOv2: missing + unexpected keys.
    siglip = RAEEncoder("siglip2", seed=None, depth=1)
    siglip_sd = {k: torch.zeros(v.shape) for k, v in siglip.state_dict().items()}
    siglip_file = tmp_path / "siglip_depth1.safetensors"
    save_file(siglip_sd, str(siglip_file))
    with pytest.raises(EncoderWeightsError) as err:
        build_encoder("dinov2", weights=str(siglip_file))
    message = str(err.value)
    assert "missing keys" in message and "reg_token" in message and "blocks.{1-11}.attn.qkv.weight" in message
    assert "mis-shaped keys" in message and "patch_embed.proj.weight" in message

    # A transformers-layout file of another model: its keys do not convert and are reported.
    mae_like = {"vit.encoder.layer.0.attention.attention.query.weight": torch.zeros(768, 768)}
    with pytest.raises(EncoderWeightsError, match=r"unexpected keys \(1\): vit\.encoder\.layer\.0"):
        enc_lib.RAEEncoder("dinov2", seed=None).load_timm_state_dict(convert_hf_state_dict("dinov2", mae_like))


def test_unreadable_or_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_encoder("dinov2", weights=str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsFileError, match="bad.safetensors"):
        read_state_dict(str(bad))
    with pytest.raises(EncoderWeightsError, match="bad.safetensors"):
        build_encoder("dinov2", weights=str(bad))
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(WeightsFileError, match="unsupported weights file type"):
        read_state_dict(str(other))
    nested = tmp_path / "ckpt.pt"
    torch.save({"step": 3, "model": {"a": torch.ones(2)}}, nested)
    assert torch.equal(read_state_dict(str(nested))["a"], torch.ones(2))
    with pytest.raises(EncoderWeightsError, match="neither in timm layout"):
        enc_lib.detect_layout({"a": torch.ones(2)})


def test_read_state_dict_skips_prefixes(tmp_path):
    path = tmp_path / "siglip_like.safetensors"
    save_file({"vision_model.a": torch.ones(2), "text_model.b": torch.zeros(3)}, str(path))
    assert list(read_state_dict(str(path), skip_prefixes=("text_model.",))) == ["vision_model.a"]
    assert sorted(read_state_dict(str(path))) == ["text_model.b", "vision_model.a"]


def test_read_state_dict_from_a_uri():
    import fsspec
    from safetensors.torch import save as save_bytes

    fs = fsspec.filesystem("memory")
    tensors = {"blocks.0.attn.qkv.weight": torch.arange(6.0).view(2, 3)}
    fs.pipe("/encoder-test/w.safetensors", save_bytes(tensors))
    buffer = __import__("io").BytesIO()
    torch.save(tensors, buffer)
    fs.pipe("/encoder-test/w.pt", buffer.getvalue())
    for name in ("w.safetensors", "w.pt"):
        sd = read_state_dict(f"memory://encoder-test/{name}")
        assert torch.equal(sd["blocks.0.attn.qkv.weight"], tensors["blocks.0.attn.qkv.weight"])


def test_hub_offline_fails_at_once(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    start = time.monotonic()
    with pytest.raises(HubWeightsUnavailableError) as err:
        build_encoder("dinov2", weights="hub")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "facebook/dinov2-with-registers-base" in message and "HF_HUB_OFFLINE" in message
    assert "local weights file path" in message and "'random'" in message


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_random_weights_are_seeded():
    """At reduced depth: the init code is the same at full depth, which costs seconds per build."""
    rng_before = torch.random.get_rng_state()
    encoder, info = build_encoder("mae", weights="random", seed=0, depth=2)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert info == {"source": "random", "ref": "seed=0", "layout": None, "sha256": info["sha256"], "seed": 0}
    assert info["sha256"] == state_dict_checksum(encoder.state_dict())
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert build_encoder("mae", weights="random", seed=0, depth=2)[1]["sha256"] == info["sha256"]
    assert build_encoder("mae", weights="random", seed=1, depth=2)[1]["sha256"] != info["sha256"]
    with pytest.raises(ValueError, match="depth"):
        build_encoder("mae", weights="random", depth=13)


def test_checksum_covers_keys_dtype_shape_and_bytes():
    base = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    reference = state_dict_checksum(base)
    assert state_dict_checksum({"b": base["b"], "a": base["a"]}) == reference  # order-independent
    assert state_dict_checksum({**base, "a": base["a"].double()}) != reference
    assert state_dict_checksum({**base, "b": base["b"].view(4)}) != reference
    assert state_dict_checksum({"a": base["a"], "c": base["b"]}) != reference
    changed = base["a"].clone()
    changed[0] = 1e-7
    assert state_dict_checksum({**base, "a": changed}) != reference
    assert state_dict_checksum({"x": torch.ones(2, dtype=torch.bfloat16)})  # any dtype hashes


# ---------------------------------------------------------------------------------------------
# save_pretrained folders: config.json + weights, single or sharded
# ---------------------------------------------------------------------------------------------

FOLDER_DEPTH = 2  # the loader builds any depth up to 12; two blocks keep the folders small


@pytest.fixture(scope="module")
def dinov2_folders(tmp_path_factory):
    """A 2-block DINOv2-with-registers-B (the real widths, random weights) saved by transformers'
    save_pretrained twice: one model.safetensors, and shards of at most 20 MB with their index."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(image_size=518, patch_size=14, num_register_tokens=4,
                                       num_hidden_layers=FOLDER_DEPTH)
    with torch.device("meta"):
        model = Dinov2WithRegistersModel(config)
    model.to_empty(device="cpu")
    _fill_random(model, seed=5)
    root = tmp_path_factory.mktemp("save_pretrained")
    single, sharded = root / "single", root / "sharded"
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="20MB")
    expected = convert_hf_state_dict("dinov2", model.state_dict())
    return {"single": single, "sharded": sharded, "model": model, "expected": expected}


@pytest.mark.timeout(120)
def test_save_pretrained_folders_load_single_and_sharded(dinov2_folders):
    single, sharded = dinov2_folders["single"], dinov2_folders["sharded"]
    assert (single / "config.json").exists() and (single / "model.safetensors").exists()
    shards = sorted(p.name for p in sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (sharded / "model.safetensors.index.json").exists()

    want = RAEEncoder("dinov2", 256, seed=None, depth=FOLDER_DEPTH)
    want.load_timm_state_dict(dinov2_folders["expected"])
    sha = state_dict_checksum(want.state_dict())
    for folder in (single, sharded):
        encoder, info = build_encoder("dinov2", 256, weights=str(folder), depth=FOLDER_DEPTH)
        assert info == {"source": "file", "ref": str(folder), "layout": "hf", "sha256": sha, "seed": None}
    x = images(256, 1, seed=3)
    with torch.no_grad():
        assert torch.equal(encoder(x), want(x))

    # What `encode --weights DIR` runs first (the job's encoder, before any source is listed).
    from pipeline.encode import EncodeConfig, build_configured_encoder

    _, info = build_configured_encoder(EncodeConfig(encoder="dinov2", weights=str(sharded),
                                                    encoder_overrides={"depth": FOLDER_DEPTH}))
    assert info["sha256"] == sha


def _edited_copy(folder, tmp_path, **changes):
    import json
    import shutil

    dest = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.timeout(120)
def test_a_folder_whose_config_is_another_encoder_names_the_key(dinov2_folders, tmp_path):
    single = dinov2_folders["single"]
    cases = [
        ({"model_type": "dinov2"}, "model_type is 'dinov2'"),
        ({"num_register_tokens": 0}, "num_register_tokens is 0, expected 4"),
        ({"hidden_size": 384}, "hidden_size is 384, expected 768"),
        ({"patch_size": 16}, "patch_size is 16, expected 14"),
        ({"image_size": 224}, "image_size is 224, expected 518"),
    ]
    for changes, message in cases:
        folder = _edited_copy(single, tmp_path, **changes)
        with pytest.raises(EncoderWeightsError, match=message) as err:
            build_encoder("dinov2", weights=str(folder), depth=FOLDER_DEPTH)
        assert str(folder / "config.json") in str(err.value)
    with pytest.raises(EncoderWeightsError, match="num_hidden_layers is 2, expected 12"):
        build_encoder("dinov2", weights=str(single))  # the real depth: the folder has 2 blocks
    # A DINOv2 folder offered as MAE: refused on the config, before any weight is looked at.
    with pytest.raises(EncoderWeightsError, match="model_type is 'dinov2_with_registers'.*'vit_mae'"):
        build_encoder("mae", weights=str(single), depth=FOLDER_DEPTH)
    # A field the file leaves out is not checked (older hub configs omit defaults); the shapes are.
    build_encoder("dinov2", weights=str(_edited_copy(single, tmp_path, mlp_ratio=None)), depth=FOLDER_DEPTH)


def test_folder_config_rules_for_siglip_mae_and_timm():
    """Configs alone (no weights): a whole SigLIP model's vision_config, MAE, a timm folder."""
    from pipeline.encoders import check_hf_config, expected_hf_config

    siglip = {"model_type": "siglip", "vision_config": {**expected_hf_config("siglip2"), "image_size": 224}}
    with pytest.raises(EncoderWeightsError, match="vision_config.image_size is 224, expected 256"):
        check_hf_config("siglip", siglip, "x/config.json")
    check_hf_config("siglip2", {"model_type": "siglip_vision_model", **expected_hf_config("siglip2")}, "x")
    mae = {"model_type": "vit_mae", **expected_hf_config("mae"), "mask_ratio": 0.75, "decoder_hidden_size": 512}
    check_hf_config("mae", mae, "x")
    with pytest.raises(EncoderWeightsError, match="layer_norm_eps is 1e-06, expected 1e-12"):
        check_hf_config("mae", {**mae, "layer_norm_eps": 1e-6}, "x")
    check_hf_config("dinov2", {"architecture": "vit_base_patch14_reg4_dinov2", "num_classes": 0}, "x")
    with pytest.raises(EncoderWeightsError, match="architecture is 'vit_small_patch14_reg4_dinov2'"):
        check_hf_config("dinov2", {"architecture": "vit_small_patch14_reg4_dinov2"}, "x")


@pytest.mark.timeout(120)
def test_broken_folders_name_the_missing_file(dinov2_folders, tmp_path):
    import json
    import shutil

    with pytest.raises(FileNotFoundError, match="not found"):
        build_encoder("dinov2", weights=str(tmp_path / "no-such-folder"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EncoderWeightsError, match="config.json"):
        build_encoder("dinov2", weights=str(empty), depth=FOLDER_DEPTH)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(dinov2_folders["single"] / "config.json", no_weights / "config.json")
    with pytest.raises(EncoderWeightsError, match="no weights.*model.safetensors"):
        build_encoder("dinov2", weights=str(no_weights), depth=FOLDER_DEPTH)
    lost = tmp_path / "lost-shard"
    shutil.copytree(dinov2_folders["sharded"], lost)
    index = json.loads((lost / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (lost / gone).unlink()
    with pytest.raises(EncoderWeightsError, match=f"names the shard {gone}"):
        build_encoder("dinov2", weights=str(lost), depth=FOLDER_DEPTH)
