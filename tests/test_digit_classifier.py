"""The second digits evaluator (assets/evaluators/digits-cnn): it loads, it is deterministic, it reads held-out real
digits, and it sees broken strokes that the CLIP evaluator forgives; the digits protocol reports both."""

import json

import pytest
import torch

from diffdistill.data import eval_prompts, load_split
from diffdistill.eval.digit_classifier import CONFIG_FILE, DEFAULT_PATH, WEIGHTS_FILE, DigitClassifier
from diffdistill.eval.protocols import digits_protocol


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier.load()


@pytest.fixture(scope="module")
def held_out():
    return load_split("held_out")


def test_it_loads_from_safetensors_and_is_deterministic(classifier, held_out, tmp_path):
    from safetensors import safe_open

    assert (DEFAULT_PATH / WEIGHTS_FILE).is_file() and json.loads((DEFAULT_PATH / CONFIG_FILE).read_text())
    with safe_open(str(DEFAULT_PATH / WEIGHTS_FILE), "pt") as f:
        assert f.metadata()["trained_on"] == "held_in"
    x = held_out.images[:64]
    again = DigitClassifier.load()
    assert torch.equal(classifier.logits(x), again.logits(x)) and torch.equal(classifier.logits(x), classifier.logits(x))
    assert classifier.features(x).shape == (64, classifier.model.head.in_features)
    assert torch.allclose(classifier.logits(x), classifier.logits(x, batch_size=7), atol=1e-4)  # batching: rounding only
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        classifier.logits(x[:, :1])
    with pytest.raises(FileNotFoundError, match="train_digit_classifier"):
        DigitClassifier.load(tmp_path)


def test_held_out_real_digits_score_at_least_98_percent(classifier, held_out):
    pred = classifier.classify(held_out.images)
    assert (pred == held_out.labels).double().mean() >= 0.98
    per_digit = [(pred[held_out.labels == d] == d).double().mean().item() for d in range(10)]
    assert min(per_digit) >= 0.94, per_digit
    bigger = torch.nn.functional.interpolate(held_out.images[:200], size=(64, 64), mode="bilinear")
    assert (classifier.classify(bigger) == held_out.labels[:200]).double().mean() >= 0.95  # resized back to 32


def _broken_strokes(images: torch.Tensor) -> torch.Tensor:
    """Strokes cut by one-pixel background lines: every fourth row set to black (on the 1000 held-out digits the
    CLIP evaluator still reads 97.7% of them, the classifier 81.7%)."""
    out = images.clone()
    out[..., 2::4, :] = -1.0
    return out


def test_broken_strokes_lower_the_classifiers_accuracy_and_both_are_reported(held_out):
    """Real held-out digits for each prompt, whole and with their strokes cut: the classifier's accuracy must fall;
    the CLIP evaluator's prompt accuracy is reported beside it, and a large gap is flagged."""
    _, labels = eval_prompts(20)
    seen = {d: 0 for d in range(10)}
    real = []
    for d in labels:  # the i-th held-out real image of its prompt's digit, in the protocol's prompt order
        real.append(held_out.images[held_out.labels == d][seen[d]])
        seen[d] += 1
    real = torch.stack(real)

    def sample(corrupt):
        done = [0]

        def fn(batch_prompts, generator):
            x = real[done[0]:done[0] + len(batch_prompts)]
            done[0] += len(batch_prompts)
            return ((_broken_strokes(x) if corrupt else x) + 1) / 2  # [0, 1], as a sampler returns
        return fn

    clean, _ = digits_protocol(sample(False), n_per_digit=20)
    broken, _ = digits_protocol(sample(True), n_per_digit=20)
    for r in (clean, broken):
        assert {"prompt_accuracy", "classifier_accuracy", "classifier_accuracy_per_digit", "classifier_fd",
                "classifier_fd_real_floor", "evaluators_disagree"} <= set(r)
    assert clean["classifier_accuracy"] >= 0.95 and not clean["evaluators_disagree"]
    assert broken["classifier_accuracy"] < clean["classifier_accuracy"] - 0.1, (clean, broken)
    assert broken["classifier_fd"] > 5 * clean["classifier_fd"]
    # the CLIP evaluator forgives the cuts: the two disagree, and the protocol says so
    assert broken["prompt_accuracy"] > broken["classifier_accuracy"] + 0.05 and broken["evaluators_disagree"]


def test_the_report_shows_both_evaluators_and_flags_a_disagreement(tmp_path):
    from diffdistill.eval.harness import write_report

    base = {"num_images": 20, "fid": 7.0, "fid_real_floor": 4.0, "diversity_real": 0.3, "classifier_fd": 60.0,
            "classifier_fd_real_floor": 54.2, "speed": {"batch_size": 10, "device": "cpu", "dtype": "float32"}}
    rows = [{**base, "model": "agrees", "prompt_accuracy": 0.97, "classifier_accuracy": 0.96, "evaluators_disagree": False},
            {**base, "model": "lenient", "prompt_accuracy": 0.98, "classifier_accuracy": 0.72, "evaluators_disagree": True}]
    text = (write_report(tmp_path, rows, [torch.zeros(2, 3, 8, 8)] * 2, "digits") / "report.md").read_text()
    assert "| classifier acc | classifier FD |" in text and "| 0.720 | 60.00 |" in text
    assert "disagree on lenient" in text and "disagree on agrees" not in text and "floor 54.20" in text
