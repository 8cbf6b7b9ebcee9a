"""Evaluation package: paired statistics, layout measurement, adherence, features, KID, diversity, CLIP, report."""

import csv
import json
from math import comb

import numpy as np
import pytest
import torch
from PIL import Image

from dualguide.evaluation.adherence import ATTRIBUTES, NEGATED, attribute_hits, negated_hits
from dualguide.evaluation.clip import check_clip_folder, clip_image_features, clip_scores, load_clip
from dualguide.evaluation.features import judge_features
from dualguide.evaluation.layout import measure_layout
from dualguide.evaluation.metrics import diversity, kid, kid_contributions
from dualguide.evaluation.reference import load_reference_images
from dualguide.evaluation.report import MetricResult, write_report
from dualguide.evaluation.statistics import paired_comparison, verdict
from dualguide.toy.data import caption, random_labels, render
from dualguide.toy.judge import JUDGE_DIR, ShapeJudge, as_batch

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: one thread avoids start and contention costs


@pytest.fixture(scope="module")
def judge():
    return ShapeJudge.load()


def ground_truth(count, seed, size_rate=0.3, position_rate=0.3):
    """``count`` ground-truth renders at 64 px with their labels."""
    rng = np.random.default_rng(seed)
    labels = [random_labels(rng, size_rate, position_rate) for _ in range(count)]
    return [render(label, 64, rng) for label in labels], labels


# Paired statistics


def test_paired_comparison_matches_hand_computed_values():
    mode = [3, 5, 4, 6, 2, 7, 5, 5]
    baseline = [2, 3, 4, 5, 3, 4, 4, 2]  # differences 1 2 0 1 -1 3 1 3: six up, one down, one tie
    result = paired_comparison(mode, baseline)
    assert (result.n, result.mean, result.baseline_mean, result.difference) == (8, 4.625, 3.375, 1.25)
    assert result.sign_test_p == pytest.approx(2 * (comb(7, 6) + comb(7, 7)) / 2**7)  # 0.125
    assert 0 < result.low < 1.25 < result.high
    assert result.verdict == "better"
    assert paired_comparison(mode, baseline, higher_is_better=False).verdict == "worse"
    assert paired_comparison(baseline, mode).verdict == "worse"
    assert paired_comparison(mode, baseline) == result  # seeded: the same interval again
    noisy = np.random.default_rng(0).normal(size=(2, 20))
    assert paired_comparison(*noisy, seed=1).low != paired_comparison(*noisy).low  # the seed is used


def test_paired_comparison_no_difference_and_degenerate_cases():
    baseline = np.array([0.5, 0.25, 1.0, 0.75, 0.0, 0.5])
    spread = paired_comparison(baseline + [0.25, -0.25, 0.0, 0.25, 0.25, -0.5], baseline)
    assert spread.low < 0 < spread.high and spread.verdict == "no difference"
    same = paired_comparison(baseline, baseline)
    assert (same.low, same.high, same.sign_test_p, same.verdict) == (0.0, 0.0, 1.0, "no difference")
    shifted = paired_comparison(baseline + 0.25, baseline, higher_is_better=False)
    assert (shifted.low, shifted.high, shifted.verdict) == (0.25, 0.25, "worse")
    assert shifted.sign_test_p == pytest.approx(2 / 2**6)
    assert verdict(-0.2, -0.1, True) == "worse" and verdict(-0.2, -0.1, False) == "better"
    assert verdict(-0.1, 0.0, True) == "no difference"


@pytest.mark.parametrize(
    "mode, baseline, name",
    [([1, 2, 3], [1, 2], "aligned"), ([1], [1], "mode"), ([1, 2], [1, float("nan")], "baseline")],
)
def test_paired_comparison_rejects_bad_input(mode, baseline, name):
    with pytest.raises(ValueError, match=name):
        paired_comparison(mode, baseline)


# Position and size from pixels; per-attribute adherence


def test_layout_measurement_is_accurate_on_held_out_ground_truth():
    images, labels = ground_truth(600, seed=2024, size_rate=0.7, position_rate=0.8)
    layouts = [measure_layout(image) for image in images]
    positioned = [(m.position, l["position"]) for m, l in zip(layouts, labels) if l["position"]]
    assert len(positioned) > 400
    assert np.mean([measured == wanted for measured, wanted in positioned]) >= 0.95
    assert np.mean([m.size == l["size"] for m, l in zip(layouts, labels)]) >= 0.95
    assert measure_layout(np.full((64, 64, 3), 90, np.uint8)).position == ""  # a plain picture has no shape


def test_attribute_hits_on_ground_truth(judge):
    images, labels = ground_truth(48, seed=7, size_rate=0.5, position_rate=0.5)
    prompts = [caption(label) for label in labels]
    hits = attribute_hits(images, prompts, judge)
    assert tuple(hits) == ATTRIBUTES and all(len(v) == 48 for v in hits.values())
    assert np.array_equal(np.isnan(hits["position"]), [not label["position"] for label in labels])
    assert all(np.nanmean(hits[name]) >= 0.9 for name in ATTRIBUTES)
    assert np.array_equal(hits["overall"], hits["shape"] * hits["color"])
    moved = [{**label, "position": "left" if label["position"] == "right" else "right"} for label in labels[:4]]
    assert np.all(attribute_hits(images[:4], [caption(label) for label in moved], judge)["position"] == 0)


# Features, KID, diversity


def test_judge_features_are_the_input_of_its_heads(judge):
    images, _ = ground_truth(6, seed=3)
    features = judge_features(images, judge, batch_size=4)
    assert features.shape == (6, 2 * judge.widths[-1]) and features.dtype == np.float64
    with torch.no_grad():
        logits = judge(as_batch(images))["shape"]
        from_features = judge.heads["shape"](torch.from_numpy(features).float())
    torch.testing.assert_close(from_features, logits, rtol=1e-4, atol=1e-4)


def test_kid_is_about_zero_for_the_same_set_and_larger_for_a_shifted_one():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(120, 16)), rng.normal(size=(120, 16))
    shifted = kid(a, b + 1.0)
    assert abs(kid(a, a).value) < 0.05 * shifted.value  # slightly below 0: a feature meets itself in k(x, y)
    assert abs(kid(a, b).value) < 0.05 * shifted.value
    assert shifted.value > 5 * shifted.standard_error > 0
    assert shifted == kid(a, b + 1.0)  # seeded subsets
    assert shifted.subset_size == 60


def test_kid_small_sets():
    rng = np.random.default_rng(1)
    small = kid(rng.normal(size=(5, 4)), rng.normal(size=(7, 4)), subset_size=50, subsets=10)
    assert small.subset_size == 5 and np.isfinite(small.value) and np.isfinite(small.standard_error)
    whole = kid(rng.normal(size=(4, 4)), rng.normal(size=(4, 4)), subset_size=4, subsets=5)
    assert np.isnan(whole.standard_error)  # subsets are the whole sets: no spread to measure
    with pytest.raises(ValueError, match="features_b"):
        kid(rng.normal(size=(5, 4)), rng.normal(size=(1, 4)))


def test_kid_contributions_average_to_the_whole_set_kid():
    rng = np.random.default_rng(2)
    reference, same, shifted = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) + 0.5
    whole = kid(reference, shifted, subset_size=40, subsets=1)  # one subset of all features: the whole-set KID
    contributions = kid_contributions(shifted, reference)
    assert contributions.shape == (40,) and contributions.mean() == pytest.approx(whole.value, rel=1e-12)
    assert abs(kid_contributions(same, reference).mean()) < 0.1 * whole.value
    x, y = shifted, reference  # by hand: the unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3
    k = lambda a, b: (a @ b.T / 6 + 1) ** 3  # noqa: E731
    off_diagonal = lambda m: (m.sum() - np.trace(m)) / (len(m) * (len(m) - 1))  # noqa: E731
    assert contributions.mean() == pytest.approx(off_diagonal(k(x, x)) + off_diagonal(k(y, y)) - 2 * k(x, y).mean())
    with pytest.raises(ValueError, match="width"):
        kid_contributions(shifted, reference[:, :5])


def test_diversity_is_the_mean_pairwise_distance_per_prompt():
    features = [[[0, 0], [3, 4], [0, 0]], [[1, 1], [1, 1], [1, 1]]]
    np.testing.assert_allclose(diversity(features), [10 / 3, 0.0])
    with pytest.raises(ValueError, match="seeds"):
        diversity([[[0, 0]]])


# CLIP and reference images


def test_clip_scores_and_image_features(clip_folder):
    images, labels = ground_truth(3, seed=5)
    clip = load_clip(clip_folder)
    scores = clip_scores(images, [caption(label) for label in labels], clip)
    assert scores.shape == (3,) and np.isfinite(scores).all() and (scores >= 0).all()
    features = clip_image_features([Image.fromarray(image) for image in images], clip, batch_size=2)
    assert features.shape == (3, 16) and np.isfinite(features).all()


def test_bad_clip_folder_is_refused(tmp_path):
    for folder in (tmp_path, tmp_path / "missing", JUDGE_DIR):
        with pytest.raises(ValueError, match="--clip"):
            check_clip_folder(folder)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="--clip"):
        load_clip(tmp_path)  # a config alone is no model


def test_reference_images(tmp_path):
    with pytest.raises(ValueError, match="--reference"):
        load_reference_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="--reference"):
        load_reference_images(tmp_path)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "b.png")
    Image.new("L", (8, 8), 128).save(tmp_path / "a.JPG")
    images = load_reference_images(tmp_path)
    assert [image.mode for image in images] == ["RGB", "RGB"] and images[1].getpixel((0, 0)) == (255, 0, 0)


# Report


def test_report_files(tmp_path):
    baseline = [0.5, 0.25, 1.0, 0.75]
    results = {"none": {"adherence": MetricResult(0.625, 4), "kid": MetricResult(0.02, 64, error=0.004)}}
    for mode, shift in (("cfg", 0.25), ("cfg+tpg", 0.0)):
        comparison = paired_comparison(np.add(baseline, shift), baseline)
        kid_comparison = paired_comparison([0.01, 0.02, 0.0, 0.01], [0.02, 0.03, 0.02, 0.02], higher_is_better=False)
        results[mode] = {"adherence": MetricResult(comparison.mean, 4, comparison=comparison),
                         "kid": MetricResult(0.01, 64, error=0.003, comparison=kid_comparison)}  # fmt: skip
    examples = {mode: [render(random_labels(np.random.default_rng(i))) for i in range(2)] for mode in results}
    paths = write_report(tmp_path / "out", results, "none", examples, labels=["a red circle on a blue background"] * 2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(paths)  # no temporary files left
    data = json.loads(paths["results.json"].read_text())
    assert data["baseline"] == "none" and data["modes"]["cfg"]["adherence"]["comparison"]["verdict"] == "better"
    with open(paths["results.csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["mode"] for row in rows] == ["none", "cfg", "cfg+tpg"]
    assert rows[1]["adherence.verdict"] == "better" and rows[0]["adherence.verdict"] == ""
    table = paths["results.md"].read_text()
    assert "| cfg+tpg |" in table and "no difference" in table and "better" in table
    for name in ("metrics.png", "examples.png"):
        with Image.open(paths[name]) as image:
            assert image.format == "PNG" and min(image.size) > 100
    with pytest.raises(ValueError, match="baseline"):
        write_report(tmp_path / "other", results, "cfg+nag")


# Negative prompts: what the negative names, on hand-made images


def scene(color, background="blue", shape="circle"):
    return render({"shape": shape, "color": color, "background": background, "size": "medium", "position": ""})


def test_negated_hits_count_the_image_that_shows_the_negated_value(judge):
    images = [scene("red"), scene("green"), scene("red", shape="star"), scene("white", "red")]
    negatives = ["red", "a red shape", "a circle", "a shape on a red background"]
    hits = negated_hits(images, negatives, judge)
    assert tuple(hits) == NEGATED
    assert hits["negated"].tolist() == [1.0, 0.0, 0.0, 1.0]  # red shown; green not; a star is no circle; red ground
    assert np.array_equal(hits["negated_color"], [1.0, 0.0, np.nan, np.nan], equal_nan=True)
    assert np.array_equal(hits["negated_shape"], [np.nan, np.nan, 0.0, np.nan], equal_nan=True)
    assert np.array_equal(hits["negated_background"], [np.nan, np.nan, np.nan, 1.0], equal_nan=True)
    with pytest.raises(ValueError, match="one colour, shape or background"):
        negated_hits(images[:1], ["blurry"], judge)


def test_attribute_hits_check_only_what_a_partial_prompt_names(judge):
    images = [scene("red"), scene("green", shape="star"), scene("yellow")]
    prompts = ["a circle on a blue background", "a red shape on a blue background", "a shape"]
    hits = attribute_hits(images, prompts, judge)
    assert np.array_equal(hits["color"], [np.nan, 0.0, np.nan], equal_nan=True)
    assert np.array_equal(hits["shape"], [1.0, np.nan, np.nan], equal_nan=True)
    assert np.array_equal(hits["background"], [1.0, 1.0, np.nan], equal_nan=True)
    assert np.array_equal(hits["overall"], [1.0, 0.0, np.nan], equal_nan=True)  # the named one of shape, colour


def test_report_has_the_negative_prompt_table(tmp_path):
    base = [0.5, 0.25, 0.0, 0.5]
    better = paired_comparison([0.0, 0.0, 0.0, 0.25], base, higher_is_better=False)
    same = paired_comparison([1.0, 1.0, 0.5, 1.0], [1.0, 1.0, 0.5, 1.0])
    results = {
        "cfg": {"adherence": MetricResult(0.875, 4), "negated": MetricResult(0.3125, 4),
                "negated_color": MetricResult(0.25, 2), "kid": MetricResult(0.1, 8, error=0.01)},
        "cfg+nag": {"adherence": MetricResult(0.875, 4, comparison=same),
                    "negated": MetricResult(0.0625, 4, comparison=better),
                    "negated_color": MetricResult(0.0, 2), "kid": MetricResult(0.1, 8, error=0.01)},
    }  # fmt: skip
    paths = write_report(tmp_path, results, "cfg")
    text = paths["results.md"].read_text()
    main, negative = text.split("Negative prompts:")
    assert "| mode | adherence | negated | negated_color | kid |" in main
    assert "| mode | negated | negated_color | adherence |" in negative
    assert "0.0625 (Δ -0.25 [" in negative and ") better |" in negative  # lower is better
    assert "Negative prompts" not in write_report(tmp_path / "plain", {"cfg": {"kid": MetricResult(0.1, 8)}},
                                                  "cfg")["results.md"].read_text()  # fmt: skip
