"""DINOv3 backbones (timm ``vit_*_patch16_dinov3``) and multi-block features.

No network: every model is loaded from a random weights file this module writes (random
tensors of the right shapes, never a random initialisation of the network, which takes
~20 s for ViT-L on a busy CPU). Random weights give meaningless features: the tests check
loading, the patch-16 geometry, register-token handling and channel bookkeeping.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch
from conftest import hub_offline

from napari_upsample_anything.core.features import (
    BACKBONES,
    DINOV3_BACKBONES,
    WeightsMismatchError,
    WeightsUnavailableError,
    clear_model_cache,
    extract_features,
    load_backbone,
    resolve_backbone_name,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights.*:UserWarning")

#: short name -> (timm name, embedding width, blocks)
ARCHS = {
    "dinov3_vits16": ("vit_small_patch16_dinov3.lvd1689m", 384, 12),
    "dinov3_vits16plus": ("vit_small_plus_patch16_dinov3.lvd1689m", 384, 12),
    "dinov3_vitb16": ("vit_base_patch16_dinov3.lvd1689m", 768, 12),
    "dinov3_vitl16": ("vit_large_patch16_dinov3.lvd1689m", 1024, 24),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    clear_model_cache()  # the ViT-L weights are 1.2 GB


def random_state(timm_name: str, seed: int, dtype=torch.float32) -> dict:
    """Random tensors shaped like the architecture's state dict (built on the meta device: free)."""
    with torch.device("meta"):
        m = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in m.state_dict().items():
        if "norm" in k and k.endswith("weight"):
            out[k] = torch.ones(v.shape, dtype=dtype)
        elif "gamma" in k:  # LayerScale
            out[k] = torch.full(v.shape, 0.1, dtype=dtype)
        else:
            out[k] = (0.02 * torch.randn(v.shape, generator=g)).to(dtype)
    return out


def write_weights(path, timm_name: str, seed: int = 0, dtype=torch.float32, state=None):
    state = random_state(timm_name, seed, dtype) if state is None else state
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def test_short_names_resolve_to_the_tagged_timm_models():
    assert set(DINOV3_BACKBONES) == set(ARCHS)
    assert set(DINOV3_BACKBONES) <= set(BACKBONES)
    available = set(timm.list_models("*dinov3*", pretrained=True))
    for short, (timm_name, _, _) in ARCHS.items():
        assert resolve_backbone_name(short) == timm_name
        assert resolve_backbone_name(short.upper()) == timm_name
        assert timm_name in available
    with pytest.raises(ValueError, match="dinov3_vits16"):
        resolve_backbone_name("dinov3_vits15")


@pytest.mark.parametrize("short", list(ARCHS))
def test_each_dinov3_loads_from_a_file_and_extracts_on_the_patch16_grid(short, tmp_path):
    timm_name, dim, depth = ARCHS[short]
    # ViT-L as float16 safetensors (half the bytes to write; loading casts to float32).
    big = short == "dinov3_vitl16"
    path = tmp_path / ("w.safetensors" if big or short == "dinov3_vitb16" else "w.pth")
    state = random_state(timm_name, seed=1, dtype=torch.float16 if big else torch.float32)
    write_weights(path, timm_name, state=state)
    key = "blocks.0.attn.qkv.weight"
    expected_weight = state[key].float()
    del state
    try:
        bb = load_backbone(short, weights=path, device="cpu")
        assert bb.name == timm_name and bb.weights_source == f"file:{path.resolve()}"
        assert bb.patch_size == (16, 16) and bb.embed_dim == dim and bb.depth == depth
        assert bb.num_prefix_tokens == 5  # class token + 4 registers
        # Every tensor is real (the rotary tables were recomputed, not left on the meta device).
        assert not any(t.is_meta for t in list(bb.model.parameters()) + list(bb.model.buffers()))
        # The file's weights are the model's.
        assert torch.equal(bb.model.state_dict()[key], expected_weight)

        # Non-square, not a multiple of 16: 40 x 72 -> round(2.5) x round(4.5) = 3 x 5 tokens.
        img = np.random.default_rng(0).integers(0, 256, (40, 72), dtype=np.uint8)
        fm = extract_features(img, bb)
        assert fm.features.shape == (dim, 3, 5)
        assert fm.geometry.patch_size == (16, 16) and fm.geometry.input_shape == (48, 80)
        assert fm.geometry.scale == (40 / 3, 72 / 5)
        assert bool(torch.isfinite(fm.features).all())

        # An exact multiple of 16 goes in unresized: the map is timm's patch tokens after the
        # class and 4 register tokens, with the final norm.
        rgb = np.random.default_rng(1).uniform(size=(48, 80, 3)).astype(np.float32)
        fm = extract_features(rgb, bb)
        mean = torch.tensor(bb.mean)[:, None, None]
        std = torch.tensor(bb.std)[:, None, None]
        x = ((torch.from_numpy(rgb).permute(2, 0, 1) - mean) / std)[None]
        with torch.inference_mode():
            tokens = bb.model.forward_features(x)
        assert tokens.shape[1] == 5 + 3 * 5
        expect = tokens[0, 5:].reshape(3, 5, dim).permute(2, 0, 1)
        assert torch.allclose(fm.features, expect, atol=1e-4)
    finally:
        clear_model_cache()
        path.unlink()


def test_meta_loaded_rotary_tables_equal_a_real_construction(tmp_path):
    timm_name = ARCHS["dinov3_vits16"][0]
    path = write_weights(tmp_path / "w.pth", timm_name, seed=2)
    bb = load_backbone("dinov3_vits16", weights=path, device="cpu")
    with torch.random.fork_rng(devices=[]):
        real = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True)
    real.load_state_dict(torch.load(path, weights_only=True))
    mine = dict(bb.model.named_buffers())
    theirs = dict(real.named_buffers())
    assert set(mine) == set(theirs) and mine
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name
    img = np.random.default_rng(3).uniform(size=(37, 61)).astype(np.float32)
    assert torch.equal(extract_features(img, bb).features, extract_features(img, real.eval()).features)


def test_multi_block_features_are_the_blocks_concatenated(tmp_path):
    timm_name, dim, depth = ARCHS["dinov3_vits16"]
    path = write_weights(tmp_path / "w.pth", timm_name, seed=3)
    bb = load_backbone("dinov3_vits16", weights=path, device="cpu")
    img = np.random.default_rng(4).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    both = extract_features(img, bb, layers=(-1, -4))
    assert both.features.shape == (2 * dim, 3, 4)  # the summed channel count
    assert both.layers == (11, 8) and both.layer == 11
    last = extract_features(img, bb, layer=-1).features
    fourth = extract_features(img, bb, layer=8).features
    assert torch.allclose(both.features[:dim], last, atol=1e-6)
    assert torch.allclose(both.features[dim:], fourth, atol=1e-6)
    assert not torch.allclose(last, fourth)
    # Each block went through the final LayerNorm on its own: zero mean over its channels.
    for part in (both.features[:dim], both.features[dim:]):
        assert float(part.mean(0).abs().max()) < 1e-4
    # The order is the order given; layer= takes a sequence too.
    rev = extract_features(img, bb, layer=[8, -1]).features
    assert torch.equal(rev[:dim], both.features[dim:]) and torch.equal(rev[dim:], both.features[:dim])
    # Three blocks, windowed (2 x 2 token windows) as well: the channel count adds up.
    three = extract_features(img, bb, layers=(0, 5, -1), window=2, overlap=1)
    assert three.features.shape == (3 * dim, 3, 4) and three.geometry.n_windows > 1
    with pytest.raises(ValueError, match="same block twice"):
        extract_features(img, bb, layers=(-1, 11))
    with pytest.raises(ValueError, match="disagree"):
        extract_features(img, bb, layer=3, layers=(-1, -4))
    with pytest.raises(ValueError, match="out of range"):
        extract_features(img, bb, layers=(-1, 12))
    with pytest.raises(TypeError, match="int"):
        extract_features(img, bb, layers=(-1, 2.0))


def test_dinov2_file_for_a_dinov3_backbone_is_refused(tmp_path):
    path = tmp_path / "v2.pth"
    torch.save(random_state("vit_small_patch14_dinov2.lvd142m", seed=0), path)
    with pytest.raises(WeightsMismatchError, match="dinov3_"):
        load_backbone("dinov3_vits16", weights=path, device="cpu")


def test_dinov3_offline_says_what_to_download(monkeypatch, tmp_path):
    hub_offline(monkeypatch, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(WeightsUnavailableError) as err:
            extract_features(np.zeros((64, 48), np.uint8), "dinov3_vitb16", device="cpu")
    e = err.value
    assert e.repo_id == "timm/vit_base_patch16_dinov3.lvd1689m"
    assert e.cache_dir == str(tmp_path / "hub")
    assert "hf download timm/vit_base_patch16_dinov3.lvd1689m" in str(e) and "weights=" in str(e)
