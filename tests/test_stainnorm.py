"""Stain normalisation (stainnorm.py) on the real test-split images: Macenko equal to torchstain's
numpy normaliser image by image, a reference image kept, two re-stainings of the same tissue
brought together, a batch equal to its images one by one, background left alone."""
import warnings

import numpy as np
import pytest
import torch

import data as D
import stain as S
import stainnorm as N


@pytest.fixture(scope="module")
def real(shared_data) -> D.Split:
    return D.load_data("pathmnist", 28, shared_data / "pathmnist28_real_test718.npz", ("test",)).splits["test"]


@pytest.fixture(scope="module")
def tissue(real) -> torch.Tensor:
    return real.images[real.labels != 1][:48]  # not the background class


def test_macenko_equals_torchstains_image_by_image(real, tissue):
    macenko = pytest.importorskip("torchstain.numpy.normalizers.macenko")
    reference = N.fit("macenko", real.images[:300])
    theirs = macenko.NumpyMacenkoNormalizer()
    pick = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:N.FIT_IMAGES]
    theirs.fit(real.images[:300][pick].permute(0, 2, 3, 1).reshape(-1, 1, 3).numpy())  # the pooled pixels
    np.testing.assert_allclose(reference["stains"], theirs.HERef, atol=1e-9)
    np.testing.assert_allclose(reference["max_concentration"], theirs.maxCRef, atol=1e-9)
    ours = N.normalise(tissue, reference).permute(0, 2, 3, 1).numpy()
    compared = 0
    for image, mine in zip(tissue.permute(0, 2, 3, 1).numpy(), ours):
        try:
            with warnings.catch_warnings():  # torchstain's covariance of an image without tissue warns, then fails
                warnings.simplefilter("ignore", RuntimeWarning)
                expected, _, _ = theirs.normalize(image, stains=False)
        except np.linalg.LinAlgError:  # too few tissue pixels for torchstain: ours leaves such images alone
            assert np.array_equal(mine, image)
            continue
        assert np.abs(expected.astype(int) - mine.astype(int)).max() <= 1  # float rounding before truncation
        compared += 1
    assert compared >= 40


# Measured on these 48 images (mean |difference| in grey levels between two re-stainings, before ->
# after): Reinhard 10.6 -> 2.4 (hed), 12.6 -> 1.9 (hed_offset), 20.1 -> 2.8 (hed with light changes);
# Macenko 10.6 -> 6.0, 12.6 -> 13.9 and 20.1 -> 19.0: on 28 px images its percentiles of a few
# hundred tissue pixels undo a stain's scaling, not its shift or the light's changes.
@pytest.mark.parametrize("kind, light, bound", [("reinhard", True, 0.2), ("macenko", False, 0.7)])
def test_a_reference_keeps_its_stain_and_two_restainings_come_together(tissue, kind, light, bound):
    reference = N.fit(kind, tissue[:1])
    kept = (N.normalise(tissue[:1], reference).float() - tissue[:1].float()).abs().mean()
    assert kept < 4, kept  # Macenko keeps two stains of three optical densities: not exactly the image
    a, b = S.perturb(tissue, "hed", 4, seed=1), S.perturb(tissue, "hed", 4, seed=2)
    if light:
        a, b = S.perturb(a, "darker", 2), S.perturb(b, "less_saturation", 2)
    before = (a.float() - b.float()).abs().mean()
    reference = N.fit(kind, tissue)
    after = (N.normalise(a, reference).float() - N.normalise(b, reference).float()).abs().mean()
    assert after < bound * before, (kind, before, after)


@pytest.mark.parametrize("kind", ["reinhard", "macenko"])
def test_a_batch_equals_its_images_one_by_one(real, kind):
    reference = N.fit(kind, real.images[:200])
    images = real.images[200:240]
    together = N.normalise(images, reference, batch=16)
    alone = torch.cat([N.normalise(images[i:i + 1], reference) for i in range(len(images))])
    assert torch.equal(together, alone) and together.dtype == torch.uint8


def test_background_is_left_alone_and_none_changes_nothing(real):
    reference = N.fit("macenko", real.images[:200])
    blank = torch.full((2, 3, 28, 28), 235, dtype=torch.uint8)  # no optical density above 0.15: no tissue
    assert torch.equal(N.normalise(blank, reference), blank)
    assert torch.equal(N.normalise(real.images[:4], None), real.images[:4])
    with pytest.raises(ValueError, match="too little tissue"):
        N.fit("macenko", blank)
    with pytest.raises(ValueError, match="one of none, reinhard, macenko"):
        N.fit("vahadane", real.images[:4])


def test_train_fits_the_reference_on_its_training_split_and_every_prediction_uses_it(tmp_path, monkeypatch):
    """train.py --stain-norm: the reference in the checkpoint is the one fitted on the raw training
    images; evaluate.py's scores and explain.py's predictions are those of the normalised images;
    the stain benchmark normalises each changed image, as a scan would be."""
    import explain
    import model as M
    import report
    import robustness
    import train
    monkeypatch.chdir(tmp_path)
    sizes = (200, 40, 40)
    run = train.main(["--dataset", "synthetic", "--synthetic-sizes", ",".join(map(str, sizes)), "--epochs", "1",
                      "--epoch-steps", "3", "--batch-size", "32", "--device", "cpu", "--stain-norm", "reinhard",
                      "--out", str(tmp_path / "run")])
    model, config, ckpt = M.load_checkpoint(run / "best.pt")
    data = D.load_data("synthetic", 28, "data", ("train", "test"), seed=0, synthetic_sizes=sizes)
    reference = N.fit("reinhard", data.splits["train"].images, seed=0)
    assert M.stain_reference(ckpt) == reference and config["stain_norm"] == "reinhard"
    test = data.splits["test"]
    normalised = N.normalise(test.images, reference)
    assert not torch.equal(normalised, test.images)
    scored = report.score_checkpoint(str(run / "best.pt"), "test", 64, "off", "cpu")
    np.testing.assert_allclose(scored.scores, M.predict(model, normalised, 64, "cpu", "multi-class"), atol=1e-6)
    assert not np.allclose(scored.scores, M.predict(model, test.images, 64, "cpu", "multi-class"), atol=1e-6)
    shifted = robustness.stain_shift(model, test.images, test.labels.numpy(), 64, "cpu", stain=reference)
    by_hand = (M.predict(model, N.normalise(S.perturb(test.images, "hed", 3), reference), 64, "cpu",
                         "multi-class").argmax(1) == test.labels.numpy()).mean()
    assert shifted["accuracy"]["hed"][3] == pytest.approx(by_hand)
    out = explain.main(["--checkpoint", str(run / "best.pt"), "--db", str(tmp_path / "x.db"), "--n", "12",
                        "--methods", "gradcam", "--no-figures", "--device", "cpu"])
    assert out["summary"]
    from db import ExplanationDB
    with ExplanationDB(tmp_path / "x.db") as db:
        rows = db.maps(method="gradcam")
    expected = M.predict(model, normalised[:12], 64, "cpu", "multi-class").argmax(1)
    np.testing.assert_array_equal(rows["predicted"][np.argsort(rows["index"])], expected)
