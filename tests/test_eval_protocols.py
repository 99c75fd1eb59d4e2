"""Protocol presets, the pinned COCO selection on a synthetic captions file, the COCO runner end to
end on a synthetic COCO folder, and the unchanged digits protocol."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffdistill.eval import features as F
from diffdistill.eval import metrics
from diffdistill.eval.coco import check_image_folder, read_captions, select_coco_pairs
from diffdistill.eval.protocols import PROTOCOLS, coco_protocol, digits_protocol, get_protocol

COCO = ("coco2014-30k-256", "coco2014-10k-512-clipg", "coco2017-5k")


pytestmark = pytest.mark.usefixtures("one_thread")


def _captions_json(path, n_images=12, per_image=3, first_id=100):
    images = [{"id": first_id + 7 * i, "file_name": f"COCO_val_{first_id + 7 * i:012d}.png", "height": 1}
              for i in range(n_images)]
    anns, k = [], 5000
    for img in images:
        for j in range(per_image):
            anns.append({"id": k, "image_id": img["id"], "caption": f"  image {img['id']} caption {j}\n"})
            k += 3
    anns.reverse()  # file order must not matter
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return path


# -- presets ------------------------------------------------------------------------------------------
def test_registry_holds_the_documented_presets():
    assert set(PROTOCOLS) == {"digits", *COCO}
    assert (PROTOCOLS["coco2014-30k-256"].num_images, PROTOCOLS["coco2014-30k-256"].resolution) == (30_000, 256)
    assert PROTOCOLS["coco2014-30k-256"].reference == "folder"  # GigaGAN/DMD2: the whole val2014 folder
    assert (PROTOCOLS["coco2014-10k-512-clipg"].num_images, PROTOCOLS["coco2014-10k-512-clipg"].resolution) == (10_000, 512)
    assert PROTOCOLS["coco2017-5k"].dataset == "coco2017" and PROTOCOLS["coco2017-5k"].num_images == 5_000
    assert PROTOCOLS["digits"].fid_features == "digits-clip"
    assert all(p.description and p.sources for p in PROTOCOLS.values())


def test_coco_protocols_pin_the_prefix_and_the_mean_cosine_scale():
    img = np.array([[3.0, 4.0], [1.0, 0.0]])
    txt = np.array([[4.0, 3.0], [-1.0, 0.0]])
    mean_cosine = (24 / 25 - 1) / 2
    for name in COCO:
        p = get_protocol(name)
        assert p.clip_prefix == "A photo depicts "
        assert p.clip_prompts(["a cat on a mat"]) == ["A photo depicts a cat on a mat"]
        assert (p.clip_model, p.clip_pretrained) == ("ViT-g-14", "laion2b_s12b_b42k")
        assert p.fid_features == "clean-fid-inception" and p.clip_resolution == 256
        assert p.clip_score_scale == 1.0  # DMD2/GigaGAN report the raw mean cosine (e.g. 0.32), not x100
        assert metrics.clip_score(img, txt, scale=p.clip_score_scale) == pytest.approx(mean_cosine)


def test_unknown_protocol_suggests_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'coco2014-30k-256'"):
        get_protocol("coco2014-30k")
    with pytest.raises(ValueError, match="Known protocols"):
        get_protocol("imagenet")


# -- the COCO selection -------------------------------------------------------------------------------
def test_selection_follows_the_documented_hash_rule(tmp_path):
    path = _captions_json(tmp_path / "captions.json")
    pairs = select_coco_pairs(path, 5, seed=0)
    _, caps = read_captions(path)

    def h(s):
        return hashlib.sha256(s.encode()).hexdigest()

    expected_ids = sorted(sorted(caps, key=lambda i: h(f"0:image:{i}"))[:5])
    assert [p.image_id for p in pairs] == expected_ids
    for p in pairs:
        _, text = min(caps[p.image_id], key=lambda a: h(f"0:caption:{a[0]}"))
        assert p.caption == text and p.caption == p.caption.strip() and f"image {p.image_id} " in p.caption
        assert p.file_name == f"COCO_val_{p.image_id:012d}.png"
    assert select_coco_pairs(path, 5, seed=0) == pairs  # deterministic
    assert {p.image_id for p in pairs} <= {p.image_id for p in select_coco_pairs(path, 8, seed=0)}  # nested
    assert select_coco_pairs(path, 5, seed=1) != pairs
    assert len(select_coco_pairs(path, 12)) == 12


def test_selection_errors_name_the_problem(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="'annotations'"):
        select_coco_pairs(path, 1)
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 2, "image_id": 1}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\] has no 'caption'"):
        select_coco_pairs(path, 1)
    with pytest.raises(ValueError, match="12 captioned images; 13 were asked for"):
        select_coco_pairs(_captions_json(tmp_path / "ok.json"), 13)
    with pytest.raises(FileNotFoundError, match="captions file"):
        select_coco_pairs(tmp_path / "absent.json", 1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference image folder .*absent does not exist"):
        check_image_folder(tmp_path / "absent")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        check_image_folder(tmp_path / "imgs")
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "a.png")
    assert check_image_folder(tmp_path / "imgs") == [tmp_path / "imgs" / "a.png"]
    with pytest.raises(FileNotFoundError, match="1 of 2 reference images are missing"):
        check_image_folder(tmp_path / "imgs", ["a.png", "b.png"])


# -- the COCO runner ----------------------------------------------------------------------------------
class _ColourFeatures(F.FeatureExtractor):
    """A cheap deterministic extractor: 4x4 block means per channel and per-channel stds (51-d);
    text embeddings seeded by the prompt's characters."""

    name = "test-colour"

    def features(self, images):
        x = torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)
        return torch.cat([x, images.flatten(2).std(-1)], 1)

    def image_features(self, images, normalize=False):
        f = self(images)
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f

    def text_features(self, prompts, normalize=False):
        g = torch.Generator()
        f = torch.stack([torch.randn(51, generator=g.manual_seed(sum(map(ord, p)))) for p in prompts])
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f


@pytest.fixture
def synthetic_coco(tmp_path, monkeypatch):
    monkeypatch.setenv(F.CACHE_ENV, str(tmp_path / "cache"))
    captions = _captions_json(tmp_path / "captions_val2017.json")
    folder = tmp_path / "val2017"
    folder.mkdir()
    files, _ = read_captions(captions)
    rng = np.random.default_rng(0)
    for i, name in enumerate(files.values()):  # non-square, of varying sizes
        Image.fromarray(rng.integers(0, 256, size=(40 + i, 56, 3), dtype=np.uint8)).save(folder / name)
    return captions, folder


def test_coco_runner_end_to_end_and_reference_cache(synthetic_coco, monkeypatch):
    captions, folder = synthetic_coco
    pairs = {p.caption: p for p in select_coco_pairs(captions, 12)}

    def real_sampler(prompts, generator):  # returns the reference image of each caption: FID must be ~0
        return (F.load_image_files([folder / pairs[c].file_name for c in prompts], 512) + 1) / 2

    loads = []
    original = F.load_image_files
    monkeypatch.setattr(F, "load_image_files", lambda *a, **k: loads.append(1) or original(*a, **k))
    ext = _ColourFeatures()
    result, kept = coco_protocol(real_sampler, "coco2017-5k", captions, folder, fid_extractor=ext, clip_extractor=ext,
                                 num_images=12, batch_size=5, keep_images=7, nfe=4)
    assert result["fid"] == pytest.approx(0.0, abs=1e-6)
    assert result["num_images"] == 12 and result["num_reference_images"] == 12 and result["nfe"] == 4
    assert -1 <= result["clip_score"] <= 1 and result["ms_per_image"] > 0
    assert result["prompt_accuracy"] is None and result["fid_features"] == "test-colour"
    assert kept.shape == (7, 3, 512, 512)
    assert list((F.cache_root() / "reference_stats").glob("coco2017-5k-n12--test-colour--res512.safetensors"))
    n_loads = len(loads)

    def noise_sampler(prompts, generator):
        return torch.rand(len(prompts), 3, 48, 48, generator=generator)

    result2, _ = coco_protocol(noise_sampler, "coco2017-5k", captions, folder, fid_extractor=ext, clip_extractor=ext,
                               num_images=12, batch_size=5)
    assert len(loads) == n_loads  # reference statistics came from the cache
    assert result2["fid"] > 1e-2 + result["fid"]


def test_coco_runner_checks_the_folder_before_generating(synthetic_coco, tmp_path):
    captions, _ = synthetic_coco

    def never(prompts, generator):
        raise AssertionError("generation started despite a bad reference folder")

    with pytest.raises(FileNotFoundError, match="reference image folder"):
        coco_protocol(never, "coco2017-5k", captions, tmp_path / "no-such-folder", fid_extractor=_ColourFeatures(),
                      clip_extractor=_ColourFeatures(), num_images=4)
    with pytest.raises(ValueError, match="not a COCO protocol"):
        coco_protocol(never, "digits", captions, tmp_path)


# -- digits (unchanged signature and keys, plus precision/recall) --------------------------------------
def test_digits_protocol_keeps_its_keys(monkeypatch):
    from diffdistill.data import DigitSplit
    from diffdistill.eval import protocols
    from diffdistill.eval.evaluator import DigitsEvaluator

    def small_split(name):  # stands in for the 5000 real digits (loading them takes ~6 s per split)
        g = torch.Generator().manual_seed(len(name))
        x = -torch.ones(120, 3, 32, 32)
        for i, (r, c) in enumerate(torch.randint(4, 20, (120, 2), generator=g).tolist()):
            x[i, :, r:r + 8, c:c + 3] = 1.0  # a white stroke on black, at random places
        return DigitSplit(images=x, labels=torch.arange(120) % 10, indices=list(range(120)))

    monkeypatch.setattr(protocols, "load_split", small_split)

    def sample(prompts, generator):
        return torch.rand(len(prompts), 3, 32, 32, generator=generator)

    result, images = digits_protocol(sample, DigitsEvaluator.load(), n_per_digit=2, batch_size=8, nfe=3)
    keys = {"protocol", "num_images", "fid", "fid_real_floor", "clip_score", "prompt_accuracy", "diversity",
            "diversity_real", "nfe", "ms_per_image", "fid_ratio_to_floor", "precision", "recall"}
    assert keys <= set(result) and result["num_images"] == 20 and images.shape == (20, 3, 32, 32)
    assert result["precision"] < 0.5  # uniform noise is not on the manifold of real digits
    assert all(np.isfinite(result[k]) for k in keys - {"protocol"})
