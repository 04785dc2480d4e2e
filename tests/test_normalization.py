"""The U-Nets' normalisation (tfmlreg.networks): batch, instance or none. Trained with batch 1,
batch normalisation is one function in training and another at inference; instance
normalisation and none are one function; weights carry over between them as documented."""

import json

import numpy as np
import pytest

from conftest import random_inputs, trained_looking_weights
from tfmlreg import experiment, layers
from tfmlreg.model import MultilevelRegistration
from tfmlreg.networks import InstanceNormalization, copy_weights, unet

SHAPE = (16, 16, 16)


def batch_normalised_net(seed=0):
    """A small batch-normalised U-Net with non-trivial scale, offset and statistics."""
    net = unet(SHAPE + (2,), base_filters=4, depth=2, name="net", normalization="batch")
    return trained_looking_weights(net, seed)


@pytest.fixture(scope="module")
def pair():
    return np.random.default_rng(1).normal(0.5, 0.2, (1,) + SHAPE + (2,)).astype("float32")


def test_instance_normalisation_is_batch_normalisation_in_training_on_one_sample(pair):
    source = batch_normalised_net()
    target = unet(SHAPE + (2,), base_filters=4, depth=2, name="net", normalization="instance")
    copy_weights(source, target)
    assert any(isinstance(layer, InstanceNormalization) for layer in target.layers)
    trained = np.asarray(source(pair, training=True))
    np.testing.assert_allclose(target(pair, training=False), trained, rtol=1e-4, atol=1e-5)
    # ...and batch normalisation at inference is another function (the reason for the option)
    assert np.abs(np.asarray(source(pair, training=False)) - trained).max() > 0.01


def test_unnormalised_net_takes_the_folded_inference_function(pair):
    source = batch_normalised_net()
    target = unet(SHAPE + (2,), base_filters=4, depth=2, name="net", normalization="none")
    copy_weights(source, target)
    np.testing.assert_allclose(target(pair), source(pair, training=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("normalization", ["instance", "none"])
def test_training_and_inference_compute_one_function(normalization):
    model = MultilevelRegistration(SHAPE, levels=2, base_filters=4, depth=2,
                                   normalization=normalization)
    flow = model.net(1).get_layer("flow")
    flow.kernel.assign(np.random.default_rng(2).normal(0, 0.3, flow.kernel.shape))
    inputs = random_inputs(SHAPE, batch=2, seed=3)
    with layers.plain_geometry():
        trained = np.asarray(model(inputs, training=True)["displacement"])
        inferred = model(inputs, training=False)["displacement"]
        copy = model.for_inference("float32")(inputs)["displacement"]
    assert np.abs(trained).max() > 0.1
    np.testing.assert_allclose(inferred, trained, atol=1e-5)
    np.testing.assert_allclose(copy, trained, atol=1e-5)


def test_configs_saved_before_the_option_load_as_they_were_trained():
    model = MultilevelRegistration(SHAPE, levels=2, base_filters=4, depth=2)
    assert model.normalization == "instance"  # the default
    old = {key: value for key, value in model.get_config().items() if key != "normalization"}
    assert MultilevelRegistration.from_config(dict(old, batchnorm=True)).normalization == "batch"
    assert MultilevelRegistration.from_config(dict(old, batchnorm=False)).normalization == "none"
    oldest = {key: value for key, value in old.items() if key != "batchnorm"}  # the demo model's
    assert MultilevelRegistration.from_config(oldest).normalization == "batch"
    with pytest.raises(ValueError, match="normalization: expected one of batch, instance, none"):
        MultilevelRegistration(SHAPE, levels=2, base_filters=4, depth=2, normalization="layer")


def test_a_run_record_from_before_the_option_is_no_change_for_batch_normalisation(tmp_path):
    config = {"data": {"train": "pairs"}, "model": {"shape": [16, 16, 16], "levels": 1,
                                                    "base_filters": 4, "depth": 2,
                                                    "normalization": "batch"},
              "output": "out"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    loaded = experiment.load_config(path)
    record = json.loads(json.dumps(loaded))
    del record["model"]["normalization"]
    assert experiment.config_changes(record, loaded) == []
    changed = json.loads(json.dumps(loaded))
    changed["model"]["normalization"] = "none"
    assert experiment.config_changes(record, changed) == ['model.normalization: "batch" -> "none"']


def test_an_instance_normalised_model_exports_to_savedmodel_and_onnx(tmp_path):
    import onnxruntime
    import tensorflow as tf

    from tfmlreg.export import export_onnx, export_saved_model
    from tfmlreg.interface import SIGNATURE

    model = trained_looking_weights(MultilevelRegistration(SHAPE, levels=2, base_filters=4,
                                                           depth=2, normalization="instance"))
    inputs = random_inputs(SHAPE, batch=2, seed=4)
    expected = np.asarray(model.for_inference("float32")(inputs)["displacement"])
    scale = np.abs(expected).max()
    assert scale > 1.0
    export_saved_model(model, tmp_path / "m", version=1)
    loaded = tf.saved_model.load(str(tmp_path / "m" / "1"))
    served = loaded.signatures[SIGNATURE](**{k: tf.constant(v) for k, v in inputs.items()})
    onnx_file = export_onnx(model, str(tmp_path / "m.onnx"), opset=17)
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    converted = session.run(["displacement"], inputs)[0]
    # float32 reductions in another order, through two normalised levels: 1e-4 of the field
    for actual in (served["displacement"].numpy(), converted):
        error = np.abs(actual - expected).max()
        assert error < 1e-4 * scale, (error, scale)
