"""Calibration settings beyond the single quantile survive bundling: PAC δ and confidence bins."""

from dataclasses import replace

import numpy as np
import pytest

from rrise import Bundle, Calibration, certify_from_probs
from rrise.calibration import conformalize
from rrise.export.bundler import BundleSources, add_variant, pack_bundle
from rrise.runtime.backends import OnnxRuntimeBackend


def _rebuild(tiny_bundle, out, **settings):
    src = Bundle.load(tiny_bundle)
    with np.load(src.file("calibration.npz")) as z:
        images, counts = z["images"], z["counts"]
    probs = OnnxRuntimeBackend(src.file("surrogate.onnx")).run(images)
    base = src.calibration()
    spec = replace(base.spec, **settings)
    cal = conformalize(
        spec, probs, counts, base_sha256=base.base_sha256, surrogate_sha256=base.surrogate_sha256
    )
    bundle = pack_bundle(
        out,
        BundleSources(
            surrogate_onnx=src.file("surrogate.onnx"),
            base_onnx=src.file("base.onnx"),
            calibration=cal,
            calibration_npz=src.file("calibration.npz"),
            labels=src.labels,
            preprocess=src.manifest["preprocess"],
            dataset="digits",
            input_shape=(1, 8, 8),
        ),
    )
    return bundle, cal, probs, images


def test_pac_delta_is_kept_by_the_bundle_and_its_variants(tiny_bundle, tmp_path):
    bundle, cal, _, _ = _rebuild(tiny_bundle, tmp_path / "b", delta=0.1)
    assert bundle.manifest["calibration"]["delta"] == 0.1
    fp32 = bundle.calibration(bundle.variant("fp32"))
    assert fp32.delta == 0.1
    assert fp32.quantile == pytest.approx(cal.quantile)  # the PAC rank, not the marginal one


def test_confidence_bins_travel_to_the_runtime_and_each_variant_gets_its_own(tiny_bundle, tmp_path):
    from rrise.runtime import Runtime

    src = Bundle.load(tiny_bundle)
    with np.load(src.file("calibration.npz")) as z:
        top = OnnxRuntimeBackend(src.file("surrogate.onnx")).run(z["images"]).max(1)
    edge = float(np.median(top))
    bundle, cal, probs, images = _rebuild(tiny_bundle, tmp_path / "b", bin_edges=(edge,))
    assert bundle.manifest["calibration"]["bin_edges"] == [edge]
    variant = bundle.variant("fp32")
    deployed = bundle.calibration(variant)
    assert deployed.bin_edges == (edge,) and len(deployed.bin_quantiles) == 2
    assert deployed.bin_quantiles == pytest.approx(cal.bin_quantiles)
    rt = Runtime(bundle.path, backend="onnxruntime")
    frame = np.rint(images[0, 0] * 255).astype(np.uint8)
    record = rt.certify(frame)
    expected = certify_from_probs(rt._backend.run(rt.preprocessor(frame)[None])[0], deployed)
    assert record["radius"] == pytest.approx(expected.radius)

    # A variant with other numerics gets its own bin quantiles, from its own outputs.
    sharper = probs**1.05 / (probs**1.05).sum(1, keepdims=True)
    updated = add_variant(
        bundle.path,
        bundle.file("surrogate.onnx"),
        precision="fp16",
        backend="onnxruntime",
        probs=sharper,
        name="surrogate.sharper.onnx",
        calibrated_with="onnxruntime-cpu",
    )
    v = updated.variant("fp16", "onnxruntime")
    assert len(v["bin_quantiles"]) == 2
    assert tuple(v["bin_quantiles"]) != tuple(variant["bin_quantiles"])
    assert updated.calibration(v).bin_quantiles != deployed.bin_quantiles


def test_a_binned_bundle_variant_without_bin_quantiles_is_refused(tiny_bundle, tmp_path):
    from rrise import BundleError

    src = Bundle.load(tiny_bundle)
    with np.load(src.file("calibration.npz")) as z:
        top = OnnxRuntimeBackend(src.file("surrogate.onnx")).run(z["images"]).max(1)
    bundle, _, _, _ = _rebuild(tiny_bundle, tmp_path / "b", bin_edges=(float(np.median(top)),))
    variant = dict(bundle.variant("fp32"))
    del variant["bin_quantiles"]
    with pytest.raises(BundleError, match="bin_quantiles"):
        bundle.calibration(variant)
    assert isinstance(bundle.calibration(), Calibration)


MAP = {"score_map_x": (-0.5, 0.5, 1.5, 2.5), "score_map_y": (-1.0, 0.2, 1.1, 2.3)}
SCALE = {"score_scale_x": (0.0, 1.0, 2.0), "score_scale_y": (0.9, 0.5, 0.2)}


@pytest.mark.parametrize(
    "settings, shown", [(MAP, ["Score map"]), ({**MAP, **SCALE}, ["Score map", "Score scale"])]
)
def test_a_score_map_and_scale_travel_to_the_runtime_inspect_and_variants(
    tiny_bundle, tmp_path, settings, shown
):
    from rrise.inspect import format_inspection, inspect_bundle
    from rrise.runtime import Runtime

    bundle, cal, probs, images = _rebuild(tiny_bundle, tmp_path / "b", **settings)
    for key, knots in settings.items():
        assert bundle.manifest["calibration"][key] == list(knots)
    deployed = bundle.calibration(bundle.variant("fp32"))
    assert deployed.spec == cal.spec and deployed.quantile == pytest.approx(cal.quantile)
    rt = Runtime(bundle.path, backend="onnxruntime")
    frame = np.rint(images[0, 0] * 255).astype(np.uint8)
    expected = certify_from_probs(rt._backend.run(rt.preprocessor(frame)[None])[0], deployed)
    plain = certify_from_probs(rt._backend.run(rt.preprocessor(frame)[None])[0], cal.with_quantile(0.0))
    record = rt.certify(frame)
    assert record["p_lower"] == pytest.approx(expected.p_lower)
    assert record["p_lower"] != pytest.approx(plain.p_lower)
    # another variant is recalibrated through the same map
    sharper = probs**1.05 / (probs**1.05).sum(1, keepdims=True)
    updated = add_variant(
        bundle.path, bundle.file("surrogate.onnx"), precision="fp16", backend="onnxruntime", probs=sharper,
        name="surrogate.sharper.onnx",
        calibrated_with="onnxruntime-cpu",
    )  # fmt: skip
    counts = np.load(bundle.file("calibration.npz"))["counts"]
    expected_q = conformalize(cal.spec, sharper, counts).quantile
    assert updated.variant("fp16", "onnxruntime")["quantile"] == pytest.approx(expected_q)
    summary, problems = inspect_bundle(bundle.path)
    text = format_inspection(summary, problems)
    assert not problems and all(label in text for label in shown)
