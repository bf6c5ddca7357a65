"""What every registered attribution method and trust metric must do, checked for each entry of
attribution.METHODS and trust.METRICS: a newly registered one is tested without a new test.

Methods: maps at the input's resolution, finite, one per image and target; the same map for the same
image, target and seed whichever batch computes it; stored and read back by explain.py unchanged.
Metrics: per-map values aligned with the maps they describe, summaries over what they measured, and
every value stored by explain.py --trust.
"""
import numpy as np
import pytest
import torch

import attribution as A
import data as D
import explain as X
import model as M
import trust as T
from db import ExplanationDB

SIZES = (10, 10, 12)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net(lightcnn_with_fitted_head):
    return lightcnn_with_fitted_head(200, 2e-2, 50)


@pytest.fixture(scope="module")
def split():
    return D.load_data("synthetic", 28, splits=("test",), synthetic_sizes=SIZES).splits["test"]


SETTINGS = A.AttributionSettings(ig_steps=4, nt_samples=2, batch_size=4)
# expected gradients' references, drawn as explain.py draws them from the split it explains
SETTINGS.references = A.draw_references(
    D.load_data("synthetic", 28, splits=("test",), synthetic_sizes=SIZES).splits["test"].images,
    SETTINGS.eg_references, "cpu")


@pytest.mark.parametrize("name", sorted(A.METHODS))
def test_method_maps_are_per_image_and_do_not_depend_on_the_batch(net, split, name):
    method, fast = A.METHODS[name], M.inference_copy(net)
    layer = M.gradcam_layer(fast, "lightcnn")
    x, t, seeds = D.normalize(split.images[:6]), torch.arange(6) % 9, np.arange(6) + 100
    out = method.attribute(fast, layer, x, t, SETTINGS, seeds)
    assert out.maps.shape in {(6, 3, 28, 28), (6, 28, 28)} and torch.isfinite(out.maps).all()
    assert out.delta is None or out.delta.shape == (6,)
    assert out.maps.abs().sum() > 0
    alone = method.attribute(fast, layer, x[4:5], t[4:5], SETTINGS, seeds[4:5])
    torch.testing.assert_close(alone.maps[0], out.maps[4], rtol=1e-4, atol=1e-5 * out.maps.abs().max().item())
    params = method.params(SETTINGS, "features.4")
    assert params and params == method.params(SETTINGS, "features.4")  # a database key: plain, stable


@pytest.mark.parametrize("name", sorted(A.METHODS))
def test_method_maps_go_through_the_database_unchanged(net, split, name, tmp_path):
    ckpt = tmp_path / "run" / "best.pt"
    ckpt.parent.mkdir()
    M.save_checkpoint(ckpt, {"model": net.state_dict(), "arch": {"in_channels": 3, "num_classes": 9},
                             "config": {"dataset": "synthetic", "size": 28, "data_dir": "data", "model": "lightcnn",
                                        "seed": 0, "synthetic_sizes": ",".join(map(str, SIZES))}})
    db = tmp_path / "x.db"
    X.main(["--checkpoint", str(ckpt), "--db", str(db), "--device", "cpu", "--no-figures", "--methods", name,
            "--n", "5", "--ig-steps", "4", "--nt-samples", "2", "--batch-size", "5", "--store-dtype", "float32"])
    with ExplanationDB(db) as d:
        rows = d.maps(method=name)
    fast = M.inference_copy(net)
    x = D.normalize(split.images[:5]).contiguous(memory_format=torch.channels_last)
    with ExplanationDB(db) as d:
        key = d.summary()[0]["dataset"]
    seeds = A.map_seeds(key, "test", rows["index"], rows["target"])
    out = A.METHODS[name].attribute(fast, M.gradcam_layer(fast, "lightcnn"), x, torch.from_numpy(rows["target"]),
                                    SETTINGS, seeds)
    np.testing.assert_array_equal(rows["index"], np.arange(5))
    np.testing.assert_array_equal(rows["maps"], out.maps.detach().numpy())


@pytest.fixture(scope="module")
def ig_maps(net, split) -> T.Maps:
    """IG maps of 6 synthetic test images (which have evidence masks) for their true class."""
    t = split.labels[:6]
    seeds = np.arange(6)
    maps, delta = A.attribute_batches(A.integrated_gradients, net, None, split.images[:6], t, X.ExplainConfig(
        ig_steps=4), "cpu", 6, seeds)
    return T.Maps("ig", np.arange(6) + 1, np.arange(6), t.numpy(), t.numpy(), seeds, maps, delta,
                  split.images[:6], split.masks[:6])


@pytest.mark.parametrize("name", sorted(T.METRICS))
def test_metric_values_are_per_map_and_summarised(net, ig_maps, name):
    cfg = X.ExplainConfig(ig_steps=4, trust_steps="2,4", curve_steps=4, batch_size=6)
    ctx = T.Context(net, "features.4", cfg, torch.device("cpu"), list(D.SYNTHETIC_CLASSES))
    metric = T.METRICS[name]
    values = metric.measure(ctx, ig_maps)
    assert values, f"{name} measures nothing on IG maps of synthetic data (which have masks and deltas)"
    for key, v in values.items():
        assert isinstance(v, np.ndarray) and len(v) == 6, key  # one entry (row) per map
    summary = metric.summarise({**values, "_label": ig_maps.label, "_target": ig_maps.target}, ctx)
    assert summary
    for key, s in summary.items():
        assert isinstance(s, T.Summary) and 0 <= s.n <= 6, key
        assert s.value is None or np.isnan(s.value) or np.isfinite(s.value), key
    again = metric.measure(ctx, ig_maps)
    for key in values:  # seeded: the same numbers twice
        np.testing.assert_array_equal(values[key], again[key])
