"""Feature extractors against their references (clean-fid's folder pipeline, DMD2's crop/resize,
open_clip checkpoints), offline behaviour, and the reference-statistics cache."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffdistill.eval import features as F

TINY_CLIP = "diffdistill-test-tiny-clip"


pytestmark = pytest.mark.usefixtures("one_thread")


def _uint8_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# -- images ----------------------------------------------------------------------------------------
def test_uint8_round_trip_and_range_check():
    arrays = _uint8_images(3, 9, 7)
    x = F.from_uint8(arrays)
    assert x.shape == (3, 3, 9, 7) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(F.to_uint8(x), arrays)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        F.check_images(x * 127.5 + 127.5)  # [0, 255] images
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        F.check_images(x[:, :1])


def test_center_crop_resize_matches_dmd2_path():
    """GigaGAN/DMD2: torchvision center_crop to the short side, then PIL LANCZOS."""
    import torchvision.transforms.functional as TF

    arrays = _uint8_images(2, 41, 64, seed=1)  # odd margin: exercises the offset rounding
    ours = F.to_uint8(F.center_crop_resize(F.from_uint8(arrays), 24))
    for a, o in zip(arrays, ours):
        img = Image.fromarray(a)
        ref = np.asarray(TF.center_crop(img, min(img.size)).resize((24, 24), Image.LANCZOS))
        assert np.array_equal(o, ref)
    assert F.center_crop_resize(F.from_uint8(arrays), None).shape == (2, 3, 41, 64)


def test_load_image_files_crops_and_resizes(tmp_path):
    paths = []
    for i, a in enumerate(_uint8_images(2, 30, 50, seed=2)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    x = F.load_image_files(paths, 16)
    assert x.shape == (2, 3, 16, 16)
    same = F.center_crop_resize(F.from_uint8(_uint8_images(2, 30, 50, seed=2)), 16)
    assert torch.equal(x, same)  # files and tensors take one path


# -- (a) clean-fid Inception -----------------------------------------------------------------------
def test_inception_folder_is_clean_fids_own(monkeypatch):
    import cleanfid.features

    seen = {}

    class Recorder:
        def __init__(self, path, download=True, resize_inside=False):
            seen["path"] = path
            raise RuntimeError("recorded")

    monkeypatch.setattr(cleanfid.features, "InceptionV3W", Recorder)
    with pytest.raises(RuntimeError, match="recorded"):
        cleanfid.features.feature_extractor(device=torch.device("cpu"), use_dataparallel=False)
    assert F.cleanfid_weights_folder() == type(F.cleanfid_weights_folder())(seen["path"])


def test_inception_missing_weights_is_a_clear_error_and_never_downloads(tmp_path, monkeypatch):
    import urllib.request

    def no_network(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(FileNotFoundError) as err:
        F.CleanFIDInception(folder=tmp_path)
    msg = str(err.value)
    assert F.INCEPTION_FILE in msg and str(tmp_path.resolve()) in msg and "inception-2015-12-05.pt" in msg


class _FakeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.conv = nn.Conv2d(3, 2048, 8)

    def forward(self, x):
        return torch.tanh(self.conv(self.pool(x)))  # (B, 2048, 1, 1)


class _FakeInception(nn.Module):
    """Stands in for inception-2015-12-05.pt: same TorchScript interface (``layers``, ``forward``)."""

    def __init__(self):
        super().__init__()
        self.layers = _FakeLayers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def test_inception_extractor_equals_clean_fid_folder_features(tmp_path):
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    torch.manual_seed(0)
    torch.jit.script(_FakeInception()).save(str(tmp_path / F.INCEPTION_FILE))
    arrays = _uint8_images(3, 40, 48, seed=3)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i}.png")
    ref_model = InceptionV3W(str(tmp_path), download=False)
    ref = get_folder_features(str(folder), model=ref_model, num_workers=0, batch_size=2,
                              device=torch.device("cpu"), mode="clean", verbose=False)
    ext = F.CleanFIDInception(folder=tmp_path, batch_size=2)
    ours = ext(F.from_uint8(arrays))
    assert ours.shape == (3, 2048) and ext.name == "clean-fid-inception"
    assert np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)


# -- (b) open_clip -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory):
    import open_clip

    from diffdistill.eval.evaluator import MODEL_CONFIG

    d = tmp_path_factory.mktemp("clip-cfg")
    (d / f"{TINY_CLIP}.json").write_text(json.dumps(MODEL_CONFIG))
    open_clip.add_model_config(d)
    return TINY_CLIP


def test_open_clip_random_init_plumbing(tiny_clip_name):
    torch.manual_seed(0)
    ext = F.OpenClipFeatures(tiny_clip_name, pretrained=None, batch_size=3)
    x = F.from_uint8(_uint8_images(5, 40, 40, seed=4))
    feats = ext(x)
    assert feats.shape == (5, 64) and torch.isfinite(feats).all()
    assert ext.name == f"open_clip-{tiny_clip_name}-random"
    unit = ext.image_features(x, normalize=True)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(5), atol=1e-5)
    txt = ext.text_features(["a cat", "a dog", "a photo"], normalize=True)
    assert txt.shape == (3, 64) and torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(txt[0], txt[1])


def test_open_clip_local_safetensors_checkpoint(tiny_clip_name, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = F.OpenClipFeatures(tiny_clip_name)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    torch.manual_seed(2)  # a different random init, overwritten by the checkpoint
    loaded = F.OpenClipFeatures(tiny_clip_name, pretrained=str(path))
    x = F.from_uint8(_uint8_images(2, 32, 32, seed=5))
    assert torch.equal(loaded(x), src(x))
    assert torch.equal(loaded.text_features(["seven"]), src.text_features(["seven"]))
    assert loaded.name.startswith(f"open_clip-{tiny_clip_name}-tiny-")
    torch.save({}, tmp_path / "tiny.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        F.OpenClipFeatures(tiny_clip_name, pretrained=str(tmp_path / "tiny.bin"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        F.OpenClipFeatures(tiny_clip_name, pretrained=str(tmp_path / "absent.safetensors"))


def test_open_clip_tags_resolve_only_from_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub
    import open_clip.pretrained

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", no_download)
    repo = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
    with pytest.raises(FileNotFoundError) as err:
        F.resolve_open_clip_weights("ViT-g-14", "laion2b_s12b_b42k", cache_dir=tmp_path)
    assert repo in str(err.value) and "open_clip_model.safetensors" in str(err.value)
    # the same file placed in a Hugging Face cache layout is found without any network
    snap = tmp_path / "models--laion--CLIP-ViT-g-14-laion2B-s12B-b42K"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0123abcd")
    (snap / "snapshots" / "0123abcd").mkdir(parents=True)
    (snap / "snapshots" / "0123abcd" / "open_clip_model.safetensors").write_bytes(b"x")
    found = F.resolve_open_clip_weights("ViT-g-14", "laion2b_s12b_b42k", cache_dir=tmp_path)
    assert found.endswith("snapshots/0123abcd/open_clip_model.safetensors")
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):  # unknown tag: the known ones are listed
        F.resolve_open_clip_weights("ViT-B-32", "no-such-tag")
    assert F.resolve_open_clip_weights("ViT-B-32", None) is None


# -- (c) digits ---------------------------------------------------------------------------------------
def test_digits_features_wrap_the_evaluator():
    from diffdistill.eval.evaluator import DigitsEvaluator

    ev = DigitsEvaluator.load()
    ext = F.DigitsFeatures(ev)
    x = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(9)) * 2 - 1
    assert ext.name == "digits-clip"
    assert torch.equal(ext(x), ev.image_features(x))
    assert torch.equal(ext.image_features(x, normalize=True), ev.image_features(x, normalize=True))
    assert torch.equal(ext.text_features(["a sketch of a two"]), ev.text_features(["a sketch of a two"], normalize=False))


# -- reference statistics cache --------------------------------------------------------------------
def test_reference_stats_cache_hits_on_the_second_call(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv(F.CACHE_ENV, str(tmp_path / "cache"))
    feats = np.random.default_rng(8).normal(size=(50, 6))
    calls = []

    def compute():
        calls.append(1)
        return feats

    mu, sigma = F.reference_stats("coco2014-30k-256", "clean-fid-inception", 256, compute, fingerprint="abc")
    path = tmp_path / "cache" / "reference_stats" / "coco2014-30k-256--clean-fid-inception--res256.safetensors"
    assert path.is_file() and F.reference_stats_path("coco2014-30k-256", "clean-fid-inception", 256) == path
    mu2, sigma2 = F.reference_stats("coco2014-30k-256", "clean-fid-inception", 256, compute, fingerprint="abc")
    assert len(calls) == 1  # the second call read the cache
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    np.testing.assert_allclose(mu, feats.mean(0))
    np.testing.assert_allclose(load_file(str(path))["sigma"].numpy(), np.cov(feats, rowvar=False))
    F.reference_stats("coco2014-30k-256", "clean-fid-inception", 512, compute, fingerprint="abc")
    assert len(calls) == 2  # another resize is another key
    with pytest.raises(ValueError, match="delete the file"):
        F.reference_stats("coco2014-30k-256", "clean-fid-inception", 256, compute, fingerprint="other")


def test_cache_root_default_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv(F.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert F.cache_root() == tmp_path / ".cache" / "diffdistill"
    monkeypatch.setenv(F.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert F.cache_root() == tmp_path / "elsewhere"
