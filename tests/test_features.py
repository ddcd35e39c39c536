"""Feature extraction (core/features.py): geometry, inputs, layers, weights, windows.

No network: Hugging Face downloads fail here, so every model is either randomly initialised
(``pretrained=False``) or loaded from weight files these tests write themselves. Random
weights make meaningless features; the tests check plumbing (geometry, loading, blending),
never feature quality.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import timm
import torch
from conftest import hub_offline

from napari_upsample_anything.core.errors import Cancelled, MemoryBudgetError
from napari_upsample_anything.core.features import (
    DINOV2_BACKBONES,
    Backbone,
    FeatureGeometry,
    FeatureMap,
    WeightsMismatchError,
    WeightsUnavailableError,
    blend_weights,
    clear_model_cache,
    extract_features,
    load_backbone,
    plan_windows,
    resolve_backbone_name,
    window_bytes,
)

# Random-init models warn on every call; the warning itself is tested in test_random_init_warns_and_geometry.
pytestmark = pytest.mark.filterwarnings("ignore:.*random weights.*:UserWarning")

VITS = "vit_small_patch14_dinov2.lvd142m"
VITS_REG = "vit_small_patch14_reg4_dinov2.lvd142m"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CPU is shared; two threads on two busy cores run these tiny forwards ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vits() -> Backbone:
    return load_backbone("dinov2_vits14", pretrained=False, device="cpu")


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    # No LayerScale (unlike DINOv2's 1e-5 at init), so its random blocks change the tokens a lot.
    return load_backbone("vit_tiny_patch16_224", pretrained=False, device="cpu")


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def u8(shape, seed: int = 0) -> np.ndarray:
    return rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def perturbed_state(bb: Backbone, seed: int) -> dict:
    """The backbone's weights plus noise: a file that differs from the seed-0 random init."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in bb.model.state_dict().items()}


def module_with(bb: Backbone, state: dict) -> torch.nn.Module:
    ref = copy.deepcopy(bb.model)
    ref.load_state_dict(state)
    return ref


def meta_random_state(timm_name: str, seed: int) -> dict:
    """A random state dict of an architecture without paying for its random init."""
    with torch.device("meta"):
        m = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in m.state_dict().items():
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            out[k] = torch.ones(v.shape)
        elif k.endswith(".gamma"):
            out[k] = torch.full(v.shape, 0.1)
        else:
            out[k] = 0.02 * torch.randn(v.shape, generator=g)
    return out


# ----------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------


def test_short_names_map_to_timm_pretrained_models():
    available = set(timm.list_models(pretrained=True))
    assert len(DINOV2_BACKBONES) == 8
    assert set(DINOV2_BACKBONES.values()) <= available
    assert resolve_backbone_name("dinov2_vits14") == VITS
    assert resolve_backbone_name("dinov2_vitg14_reg") == "vit_giant_patch14_reg4_dinov2.lvd142m"
    # An untagged timm name gets timm's default pretrained tag.
    assert resolve_backbone_name("vit_small_patch14_dinov2") == VITS
    assert resolve_backbone_name(VITS_REG) == VITS_REG
    with pytest.raises(ValueError) as err:
        resolve_backbone_name("dinov2_vits16")
    msg = str(err.value)
    assert "dinov2_vits14" in msg and "dinov2_vitl14_reg" in msg and "Did you mean" in msg
    with pytest.raises(ValueError, match="tag"):
        resolve_backbone_name("vit_small_patch14_dinov2.nosuchtag")


def test_non_vit_backbones_are_refused():
    with pytest.raises(ValueError, match="not a Vision Transformer"):
        load_backbone("resnet18", pretrained=False, device="cpu")
    with pytest.raises(ValueError, match="not a timm Vision Transformer"):
        Backbone.from_module(torch.nn.Linear(3, 3))
    with torch.device("meta"):
        fixed = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        Backbone.from_module(fixed)


# ----------------------------------------------------------------------------------------
# Geometry and inputs
# ----------------------------------------------------------------------------------------


def test_random_init_warns_and_geometry():
    with pytest.warns(UserWarning, match="random weights"):
        fm = extract_features(u8((100, 73)), "dinov2_vits14", pretrained=False, device="cpu")
    assert isinstance(fm, FeatureMap)
    features, geometry = fm  # unpackable
    assert isinstance(geometry, FeatureGeometry)
    assert features.shape == (384, 7, 5)  # round(100/14) = 7, round(73/14) = 5
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert bool(torch.isfinite(features).all())
    assert geometry.image_shape == (100, 73)
    assert geometry.working_shape == (100, 73)
    assert geometry.input_shape == (98, 70)
    assert geometry.patch_size == (14, 14)
    assert geometry.lr_shape == (7, 5)
    assert geometry.scale == pytest.approx((100 / 7, 73 / 5))
    assert geometry.windows == ((0, 7, 0, 5),) and geometry.overlap == 0
    # The last token ends exactly on the image's last pixel edge: no fractional-patch shift.
    assert geometry.token_box(6, 4) == pytest.approx((600 / 7, 100.0, 58.4, 73.0))
    assert fm.backbone == VITS
    assert fm.weights_source == "random-init"
    assert fm.layer == 11 and fm.num_layers == 12
    # Random init is seeded: a rebuilt model gives the same features.
    clear_model_cache()
    again = extract_features(u8((100, 73)), "dinov2_vits14", pretrained=False, device="cpu")
    assert torch.equal(again.features, features)


def _kinds():
    base = u8((100, 73, 3), seed=1)
    g16 = rng(2).integers(0, 4096, size=(100, 73), dtype=np.uint16)  # a 12-bit camera
    # (image, channel_axis given, channel axis used, mode); ambiguous layouts need the axis.
    return {
        "gray_u8": (base[..., 0], None, None, "gray"),
        "rgb_u8": (base, None, 2, "RGB"),
        "rgba_u8": (np.concatenate([base, u8((100, 73, 1), seed=3)], axis=2), None, 2, "RGBA, alpha dropped"),
        "chw_u16": (rng(4).integers(0, 65535, size=(5, 100, 73), dtype=np.uint16), 0, 0, "mean of 5 normalised channels"),
        "hwc_float": (rng(5).normal(size=(100, 73, 6)).astype(np.float32), -1, 2, "mean of 6 normalised channels"),
        "gray_u16": (g16, None, None, "gray"),
        "gray_float": (rng(6).uniform(-3, 1000, size=(100, 73)), None, None, "gray"),
        "one_channel_first": (base[None, ..., 0], 0, 0, "gray"),
        "bool": (base[..., 0] > 128, None, None, "gray"),
    }


@pytest.mark.parametrize("kind", list(_kinds()))
def test_input_kinds_shapes(vits, kind):
    image, given, axis, mode = _kinds()[kind]
    fm = extract_features(image, vits, channel_axis=given)
    assert fm.features.shape == (384, 7, 5)
    assert fm.geometry.image_shape == (100, 73)
    assert bool(torch.isfinite(fm.features).all())
    assert fm.preprocessing["channel_axis"] == axis
    assert fm.preprocessing["channels"] == mode


def test_input_kinds_are_interpreted_consistently(vits):
    rgb = u8((100, 73, 3), seed=1)
    f = lambda img, **kw: extract_features(img, vits, **kw).features  # noqa: E731
    f_rgb = f(rgb)
    # RGBA: the alpha channel has no influence.
    rgba = np.concatenate([rgb, u8((100, 73, 1), seed=9)], axis=2)
    assert torch.equal(f(rgba), f_rgb)
    # (C, H, W) and (H, W, C) of the same data agree (the axis must be given: never guessed).
    multi = rng(4).integers(0, 65535, size=(5, 100, 73), dtype=np.uint16)
    f_chw = f(multi, channel_axis=0)
    assert torch.allclose(f(np.moveaxis(multi, 0, -1), channel_axis=-1), f_chw, atol=1e-5)
    assert torch.allclose(f(np.moveaxis(multi, 0, 1), channel_axis=1), f_chw, atol=1e-5)
    # An explicit axis with 4 channels means 4 channels, not RGBA.
    four = extract_features(rgba, vits, channel_axis=-1)
    assert four.preprocessing["channels"] == "mean of 4 normalised channels"
    assert not torch.allclose(four.features, f_rgb)
    # uint8 is divided by 255: the same image as floats in [0, 1] gives the same features.
    assert torch.allclose(f(rgb.astype(np.float32) / 255), f_rgb, atol=1e-5)
    # Gray is copied to R, G and B.
    gray = rgb[..., 0]
    assert torch.allclose(f(gray), f(np.repeat(gray[..., None], 3, axis=2)), atol=1e-6)
    # 2 channels in [0, 1] are averaged to gray.
    two = rng(7).uniform(size=(100, 73, 2)).astype(np.float32)
    assert torch.allclose(f(two, channel_axis=-1), f(two.mean(axis=2)), atol=1e-5)
    # uint16: robust percentiles, so an affine intensity change does not matter ...
    g16 = rng(2).integers(0, 4096, size=(100, 73), dtype=np.uint16)
    f16 = f(g16)
    assert torch.allclose(f(g16.astype(np.float64) * 3 + 100), f16, atol=1e-4)
    # ... whereas dividing a 12-bit image by 65535 (normalize="unit") would look almost black.
    assert not torch.allclose(f(g16, normalize="unit"), f16, atol=1e-3)


@pytest.mark.parametrize("shape", [(40, 100, 73), (70, 100, 100), (5, 64, 64), (64, 64, 2), (3, 64, 64), (64, 64, 5)])
def test_ambiguous_axes_are_never_guessed(vits, shape):
    with pytest.raises(ValueError, match=r"ambiguous.*channel_axis=0 for \(C, H, W\).*image\[z\] separately"):
        extract_features(np.zeros(shape, np.float32), vits)


def test_channel_axis_guess_and_errors(vits):
    with pytest.raises(ValueError, match="ambiguous"):
        extract_features(np.zeros((40, 100, 73), np.float32), vits)
    # ... unless the caller says it is a 40-channel image.
    fm = extract_features(rng(0).uniform(size=(40, 100, 73)).astype(np.float32), vits, channel_axis=0)
    assert fm.preprocessing["channels"] == "mean of 40 normalised channels"
    with pytest.raises(ValueError, match="channel_axis"):
        extract_features(u8((100, 73)), vits, channel_axis=0)
    with pytest.raises(ValueError, match="channel_axis"):
        extract_features(u8((100, 73, 3)), vits, channel_axis=3)


@pytest.mark.parametrize(
    "image, exc, match",
    [
        (np.full((100, 73), np.nan, np.float32), ValueError, "NaN"),
        (np.where(np.eye(100, 73) > 0, np.inf, 0.0), ValueError, "NaN or Inf"),
        (np.zeros((0, 73), np.uint8), ValueError, "empty"),
        (np.zeros((2, 3, 100, 73), np.uint8), ValueError, "one plane at a time"),
        (np.zeros(100, np.uint8), ValueError, "must be 2D"),
        (np.zeros((10, 100), np.uint8), ValueError, "smaller than one 14 x 14 patch"),
        (np.zeros((100, 73), np.complex64), TypeError, "dtype"),
        ([[1, 2], [3, 4]], TypeError, "numpy array or a torch tensor"),
    ],
)
def test_invalid_images(vits, image, exc, match):
    with pytest.raises(exc, match=match):
        extract_features(image, vits)


def test_too_small_image_is_refused_before_the_model_is_built(monkeypatch):
    import napari_upsample_anything.core.features as features

    def no_model(*args, **kwargs):
        raise AssertionError("the backbone was loaded for an image smaller than one patch")

    monkeypatch.setattr(features, "load_backbone", no_model)
    with pytest.raises(ValueError, match="smaller than one 14 x 14 patch of dinov2_vitg14"):
        extract_features(np.zeros((10, 100), np.uint8), "dinov2_vitg14", pretrained=False)
    with pytest.raises(ValueError, match="smaller than one 16 x 16 patch"):
        extract_features(np.zeros((100, 15), np.uint8), "vit_small_patch16_224", pretrained=False)


def test_input_size(vits):
    img = u8((100, 73))
    fm = extract_features(img, vits, input_size=224)  # long side 224: 100 x 73 -> 224 x 164
    g = fm.geometry
    assert g.working_shape == (224, 164)
    assert g.lr_shape == (16, 12)  # 164 / 14 = 11.7 -> 12
    assert g.input_shape == (224, 168)
    assert g.scale == pytest.approx((100 / 16, 73 / 12))
    assert fm.features.shape == (384, 16, 12)
    fm = extract_features(img, vits, input_size=(140, 70))
    assert fm.geometry.lr_shape == (10, 5) and fm.features.shape == (384, 10, 5)
    fm = extract_features(torch.from_numpy(img), vits, input_size=10)  # tiny: still one token
    assert fm.geometry.lr_shape == (1, 1)
    for bad in (0, -5, "big", (10,), (10, 0), 1.5):
        with pytest.raises(ValueError, match="input_size"):
            extract_features(img, vits, input_size=bad)
    with pytest.raises(ValueError, match="finer than"):
        extract_features(img, vits, input_size=2000)


@pytest.mark.parametrize("transpose", [False, True])
def test_edge_lands_in_the_right_token_column(vits, transpose):
    """An intensity edge inside token column 5 of a 45 x 101 image changes column 5 only.

    101 px -> 7 tokens of 101/7 = 14.43 px: token 5 covers [72.1, 86.6). Pixels 84 and 85
    belong to token 5 by the resize rule, but to token 6 (84 // 14) if the image were cropped
    or padded to 98 px instead: this catches a fractional-patch shift.
    """

    def edge(x0):
        img = np.zeros((45, 101), np.float32)
        img[:, x0:] = 1.0
        return img.T.copy() if transpose else img

    fa = extract_features(edge(84), vits)
    fb = extract_features(edge(86), vits)
    g = fa.geometry
    assert g.lr_shape == ((7, 3) if transpose else (3, 7))
    y0, y1, x0, x1 = g.token_box(5, 0) if transpose else g.token_box(0, 5)
    lo, hi = (y0, y1) if transpose else (x0, x1)
    assert lo <= 84 and 86 <= hi
    diff = (fa.features - fb.features).abs().mean(dim=0)
    per_col = diff.mean(dim=1) if transpose else diff.mean(dim=0)
    assert int(per_col.argmax()) == 5
    others = torch.cat([per_col[:5], per_col[6:]])
    # Random DINOv2 blocks start with LayerScale 1e-5, so tokens barely mix: a local change
    # stays local, and the changed column stands out by orders of magnitude.
    assert float(per_col[5]) > 100 * float(others.max())


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------


def test_last_layer_matches_timm_patch_tokens(vits):
    # 112 x 84 = 8 x 6 patches: no resize, so the network input is known exactly.
    img = rng(3).uniform(size=(112, 84, 3)).astype(np.float32)
    fm = extract_features(img, vits)
    mean = torch.tensor(vits.mean)[:, None, None]
    std = torch.tensor(vits.std)[:, None, None]
    x = ((torch.from_numpy(img).permute(2, 0, 1) - mean) / std)[None]
    with torch.inference_mode():
        tokens = vits.model.forward_features(x)  # final norm applied, class token first
    ref = tokens[0, vits.num_prefix_tokens :].reshape(8, 6, -1).permute(2, 0, 1)
    assert fm.features.shape == (384, 8, 6)
    assert torch.allclose(fm.features, ref, atol=1e-5)


def test_layer_selection(tiny, vits):
    img = u8((96, 80, 3))  # 6 x 5 patches of 16 px
    last = extract_features(img, tiny)
    mid = extract_features(img, tiny, layer=3)
    assert last.features.shape == mid.features.shape == (192, 6, 5)
    assert mid.layer == 3 and last.layer == 11
    assert float((last.features - mid.features).abs().mean()) > 0.1 * float(last.features.abs().mean())
    assert torch.equal(extract_features(img, tiny, layer=-12).features, extract_features(img, tiny, layer=0).features)
    # Intermediate layers get the final LayerNorm too (DINOv2's get_intermediate_layers(norm=True)).
    m = tiny.model
    mean = torch.tensor(tiny.mean)[:, None, None]
    std = torch.tensor(tiny.std)[:, None, None]
    x = ((torch.from_numpy(img).permute(2, 0, 1).float() / 255 - mean) / std)[None]
    with torch.inference_mode():
        t = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        for blk in m.blocks[:4]:
            t = blk(t)
        ref = m.norm(t)[0, tiny.num_prefix_tokens :].reshape(6, 5, -1).permute(2, 0, 1)
    assert torch.allclose(mid.features, ref, atol=1e-5)
    # DINOv2: intermediate layers have the embedding width too, and differ from the last.
    v_mid = extract_features(img, vits, layer=5)
    v_last = extract_features(img, vits)
    assert v_mid.features.shape == v_last.features.shape == (384, 7, 6)
    assert not torch.equal(v_mid.features, v_last.features)
    with pytest.raises(ValueError, match=r"0\.\.11"):
        extract_features(img, tiny, layer=12)
    with pytest.raises(ValueError, match="out of range"):
        extract_features(img, tiny, layer=-13)
    with pytest.raises(TypeError, match="layer"):
        extract_features(img, tiny, layer=1.5)


# ----------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_roundtrip(vits, tmp_path, suffix):
    state = perturbed_state(vits, seed=11)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    img = u8((100, 73, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fm = extract_features(img, "dinov2_vits14", weights=path, device="cpu")
    assert not [w for w in caught if "random weights" in str(w.message)]
    assert fm.weights_source == f"file:{path.resolve()}"
    assert fm.backbone == VITS
    ref = extract_features(img, module_with(vits, state))
    assert ref.weights_source == "user-model"
    assert torch.allclose(fm.features, ref.features, atol=1e-6)
    assert not torch.allclose(fm.features, extract_features(img, vits).features, atol=1e-3)
    # A weights file is used even with pretrained=False.
    assert extract_features(img, "dinov2_vits14", weights=str(path), pretrained=False, device="cpu").weights_source.startswith(
        "file:"
    )


def test_original_dinov2_checkpoint_layout(tmp_path):
    """A facebookresearch DINOv2 (registers) state dict is converted by timm's filter."""
    timm_state = meta_random_state(VITS_REG, seed=5)
    torch.save(timm_state, tmp_path / "timm.pth")
    # The original layout: class-token position inside pos_embed, "register_tokens", "mask_token".
    pos0 = 0.02 * torch.randn(1, 1, 384, generator=torch.Generator().manual_seed(6))
    orig = {k: v for k, v in timm_state.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    orig["pos_embed"] = torch.cat([pos0, timm_state["pos_embed"]], dim=1)
    orig["cls_token"] = timm_state["cls_token"] - pos0
    orig["register_tokens"] = timm_state["reg_token"]
    orig["mask_token"] = torch.zeros(1, 384)
    torch.save(orig, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    img = u8((112, 84, 3), seed=2)
    a = extract_features(img, "dinov2_vits14_reg", weights=tmp_path / "timm.pth", device="cpu")
    b = extract_features(img, "dinov2_vits14_reg", weights=tmp_path / "dinov2_vits14_reg4_pretrain.pth", device="cpu")
    assert a.backbone == VITS_REG
    assert a.features.shape == (384, 8, 6)
    assert torch.allclose(a.features, b.features, atol=1e-5)
    # Class and 4 register tokens are dropped: the map is the last 48 tokens of timm's output.
    bb = load_backbone("dinov2_vits14_reg", weights=tmp_path / "timm.pth", device="cpu")
    assert bb.num_prefix_tokens == 5
    x = (
        (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - torch.tensor(bb.mean)[:, None, None])
        / torch.tensor(bb.std)[:, None, None]
    )[None]
    with torch.inference_mode():
        tokens = bb.model.forward_features(x)
    assert tokens.shape[1] == 5 + 48
    assert torch.allclose(a.features, tokens[0, 5:].reshape(8, 6, -1).permute(2, 0, 1), atol=1e-5)


def test_bad_weight_files(tiny, tmp_path):
    with pytest.raises(ValueError, match="only used with a backbone name"):
        extract_features(u8((100, 73)), tiny, weights=tmp_path / "w.pth")
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_backbone("dinov2_vits14", weights=missing, device="cpu")
    with pytest.raises(FileNotFoundError, match="folder"):
        load_backbone("dinov2_vits14", weights=tmp_path, device="cpu")
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_backbone("dinov2_vits14", weights=garbage, device="cpu")
    # A ViT-Ti/16 file for a ViT-S/14 model: the keys with the wrong shapes are named.
    wrong = tmp_path / "tiny.pth"
    torch.save(tiny.model.state_dict(), wrong)
    with pytest.raises(WeightsMismatchError) as err:
        load_backbone("dinov2_vits14", weights=wrong, device="cpu")
    msg = str(err.value)
    assert "vit_small_patch14_dinov2" in msg and "shape mismatch" in msg
    assert "cls_token: file (1, 1, 192) vs model (1, 1, 384)" in msg
    assert "missing key(s): blocks.0.ls1.gamma" in msg
    assert len(msg) < 1500  # brief, not a dump of 150 keys
    # A file with register tokens for a model without them.
    reg = tmp_path / "reg.pth"
    torch.save(meta_random_state(VITS_REG, seed=1), reg)
    with pytest.raises(WeightsMismatchError, match="_reg"):
        load_backbone("dinov2_vits14", weights=reg, device="cpu")


def test_offline_without_weights_says_what_to_download(monkeypatch, tmp_path):
    import socket

    hub_offline(monkeypatch, tmp_path)
    attempts = []

    def no_network(sock, address, *args):
        attempts.append(address)
        raise OSError(f"test: no network connection may be attempted (to {address})")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # offline means: not even one try
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    with pytest.raises(WeightsUnavailableError) as err:
        extract_features(u8((100, 73)), "dinov2_vits14", device="cpu")
    assert attempts == []  # no network calls (and so no retries)
    e = err.value
    assert isinstance(e, RuntimeError)
    assert (e.repo_id, e.filename) == ("timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors")
    assert e.cache_dir == str(tmp_path / "hub")
    msg = str(e)
    for needed in (
        "'dinov2_vits14'",
        "timm/vit_small_patch14_dinov2.lvd142m",
        "model.safetensors",
        "hf download timm/vit_small_patch14_dinov2.lvd142m model.safetensors",
        str(tmp_path / "hub"),
        "HF_HOME",
        "weights='/path/to/model.safetensors'",
        "https://huggingface.co/timm/vit_small_patch14_dinov2.lvd142m/resolve/main/model.safetensors",
        "dinov2_vits14_pretrain.pth",
        "offline",
    ):
        assert needed in msg, needed
    # The registers variant names its own repo.
    with pytest.raises(WeightsUnavailableError, match="timm/vit_small_patch14_reg4_dinov2.lvd142m"):
        load_backbone("dinov2_vits14_reg", device="cpu")


def test_pretrained_weights_from_the_hf_cache(vits, monkeypatch, tmp_path):
    """``pretrained=True`` reads the file from the Hugging Face cache layout without network.

    The file placed in this temporary cache holds random test weights, not DINOv2's.
    """
    from safetensors.torch import save_file

    hub_offline(monkeypatch, tmp_path)
    repo = tmp_path / "hub" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    state = perturbed_state(vits, seed=21)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    img = u8((100, 73, 3), seed=4)
    fm = extract_features(img, "dinov2_vits14", device="cpu")
    assert fm.weights_source == "hf-cache:timm/vit_small_patch14_dinov2.lvd142m"
    assert torch.allclose(fm.features, extract_features(img, module_with(vits, state)).features, atol=1e-6)


def test_model_cache(tiny, tmp_path):
    name = "vit_tiny_patch16_224"
    paths = []
    for seed in range(3):
        p = tmp_path / f"w{seed}.pth"
        torch.save(perturbed_state(tiny, seed=100 + seed), p)
        paths.append(p)
    clear_model_cache()
    a = load_backbone(name, weights=paths[0], device="cpu")
    assert load_backbone(name, weights=str(paths[0]), device="cpu") is a
    b = load_backbone(name, weights=paths[1], device="cpu")
    assert b is not a
    assert load_backbone(name, weights=paths[0], device="cpu") is a  # 2 fit
    load_backbone(name, weights=paths[2], device="cpu")  # evicts the least recently used (b)
    assert load_backbone(name, weights=paths[0], device="cpu") is a
    assert load_backbone(name, weights=paths[1], device="cpu") is not b
    # A rewritten file is a new model.
    torch.save(perturbed_state(tiny, seed=7), paths[0])
    a2 = load_backbone(name, weights=paths[0], device="cpu")
    assert a2 is not a
    assert not torch.equal(a2.model.cls_token, a.model.cls_token)
    clear_model_cache()
    assert load_backbone(name, weights=paths[0], device="cpu") is not a2


# ----------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------


def test_plan_windows_and_blend_weights():
    windows = plan_windows((20, 17), (8, 8), 2)
    assert len(windows) == 9
    cover = torch.zeros(20, 17, dtype=torch.int64)
    for i0, i1, j0, j1 in windows:
        assert (i1 - i0, j1 - j0) == (8, 8)
        cover[i0:i1, j0:j1] += 1
    assert bool((cover >= 1).all())
    rows = sorted({(b[0], b[1]) for b in windows})
    assert all(a[1] - b[0] >= 2 for a, b in zip(rows, rows[1:]))  # overlap >= 2 tokens
    wts = blend_weights((20, 17), windows)
    assert torch.allclose(wts.sum(0), torch.ones(20, 17, dtype=torch.float64), atol=1e-12)
    raw = blend_weights((20, 17), windows, normalize=False)
    # The linear ramps sum to one by themselves (no three windows overlap here).
    assert torch.allclose(raw.sum(0), torch.ones(20, 17, dtype=torch.float64), atol=1e-12)
    for k, (i0, i1, j0, j1) in enumerate(windows):
        inside = torch.zeros(20, 17, dtype=torch.bool)
        inside[i0:i1, j0:j1] = True
        assert bool((wts[k][inside] > 0).all()) and bool((wts[k][~inside] == 0).all())
    assert float(wts[0, 0, 0]) == 1.0  # a corner only one window sees
    # Heavy overlap: three windows meet, the normalised weights still sum to one.
    heavy = plan_windows((20, 17), (8, 8), 6)
    assert torch.allclose(blend_weights((20, 17), heavy).sum(0), torch.ones(20, 17, dtype=torch.float64), atol=1e-12)
    assert plan_windows((5, 4), (8, 8), 2) == [(0, 5, 0, 4)]
    with pytest.raises(ValueError, match="overlap"):
        plan_windows((20, 17), (8, 8), 8)


def test_windowed_extraction_constant_image_and_progress(vits):
    img = np.full((280, 238), 0.5, np.float32)  # exactly 20 x 17 patches
    calls = []
    fm = extract_features(img, vits, window=8, overlap=2, progress=lambda d, n, info: calls.append((d, n, info)))
    g = fm.geometry
    assert fm.features.shape == (384, 20, 17)
    assert g.window_shape == (8, 8) and g.overlap == 2 and g.n_windows == 9
    assert g.windows == tuple(plan_windows((20, 17), (8, 8), 2))
    assert [(d, n) for d, n, _ in calls] == [(k, 9) for k in range(1, 10)]
    assert [info["window"] for _, _, info in calls] == list(g.windows)
    assert all(info["stage"] == "features" for _, _, info in calls)
    # Every window of a constant image sees the same 8 x 8-token image, so wherever a window's
    # blend weight is 1 the map equals a single pass over one window-sized image.
    single = extract_features(np.full((112, 112), 0.5, np.float32), vits).features
    wts = blend_weights((20, 17), g.windows)
    checked = 0
    for k, (i0, i1, j0, j1) in enumerate(g.windows):
        own = wts[k, i0:i1, j0:j1] == 1.0
        got = fm.features[:, i0:i1, j0:j1][:, own]
        assert torch.allclose(got, single[:, own], atol=1e-5)
        checked += int(own.sum())
    assert checked >= 100
    # Everywhere, overlaps included, the map is the blend-weighted sum of the window outputs.
    expected = torch.zeros_like(fm.features)
    for k, (i0, i1, j0, j1) in enumerate(g.windows):
        expected[:, i0:i1, j0:j1] += wts[k, i0:i1, j0:j1].float() * single
    assert torch.allclose(fm.features, expected, atol=1e-5)
    assert float((fm.features - single[:, :1, :1]).abs().max()) > 1e-3  # positions do differ
    # Heavy overlap (three windows on some tokens): the ramps are renormalised.
    heavy = extract_features(np.full((196, 154), 0.5, np.float32), vits, window=8, overlap=5)
    hg = heavy.geometry
    assert hg.n_windows == 6
    hw = blend_weights((14, 11), hg.windows)
    assert float(blend_weights((14, 11), hg.windows, normalize=False).sum(0).max()) > 1.01
    expected = torch.zeros_like(heavy.features)
    for k, (i0, i1, j0, j1) in enumerate(hg.windows):
        expected[:, i0:i1, j0:j1] += hw[k, i0:i1, j0:j1].float() * single
    assert torch.allclose(heavy.features, expected, atol=1e-5)


def test_window_size_follows_max_memory(vits):
    img = np.full((196, 168), 0.25, np.float32)  # 14 x 12 tokens
    budget = window_bytes(vits, (6, 6)) + 1000
    calls = []
    fm = extract_features(img, vits, max_memory=budget, progress=lambda d, n, info: calls.append(d))
    g = fm.geometry
    assert g.window_shape == (6, 6)  # the largest square window inside the budget
    assert window_bytes(vits, (7, 7)) > budget
    assert g.n_windows > 1 and len(calls) == g.n_windows
    assert g.overlap == 2  # 0.25 * 6 tokens, rounded
    assert fm.features.shape == (384, 14, 12)
    assert all(window_bytes(vits, (i1 - i0, j1 - j0)) <= budget for i0, i1, j0, j1 in g.windows)
    # A budget for a full-height strip: windows grow along the other axis.
    strip = extract_features(np.full((84, 560), 0.25, np.float32), vits, max_memory=window_bytes(vits, (6, 15)))
    assert strip.geometry.window_shape == (6, 15)
    # Enough memory: one pass. Far too little: a clear error.
    assert extract_features(img, vits, max_memory="8GiB").geometry.n_windows == 1
    with pytest.raises(MemoryBudgetError, match="max_memory"):
        extract_features(img, vits, max_memory="1kB")
    with pytest.raises(ValueError, match="overlap"):
        extract_features(img, vits, window=6, overlap=0.7)
    with pytest.raises(ValueError, match="window"):
        extract_features(img, vits, window=(6, 0))


def test_cancel(vits):
    img = np.full((280, 238), 0.5, np.float32)
    calls = []
    with pytest.raises(Cancelled):
        extract_features(img, vits, window=8, overlap=2, progress=lambda d, n, i: calls.append(d), cancel=lambda: len(calls) >= 2)
    assert calls == [1, 2]  # polled before every window: the third never ran
    # Cancel is polled before the backbone is loaded (this file does not even exist).
    with pytest.raises(Cancelled):
        extract_features(img, "dinov2_vits14", weights="/nonexistent/w.pth", cancel=lambda: True)
