"""The multilevel model and the staged fit (issue 4's checks that need no phantom)."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmlreg import geometry
from tfmlreg.model import MultilevelRegistration
from tfmlreg.training import fit_progressive

SPACING = np.array([2.0, 2.0, 2.0], np.float32)


def blob_image(n, shift_mm):
    """Four Gaussian blobs (HU) on an n³ grid of 2 mm, shifted by ``shift_mm``."""
    x = geometry.grid_points_numpy((n, n, n), 2.0)
    image = np.full((n, n, n), -1000.0, np.float32)
    for centre in ([20, 24, 30], [40, 36, 28], [30, 44, 40], [26, 30, 46]):
        r2 = ((x - (np.asarray(centre) * n / 32 + shift_mm)) ** 2).sum(-1)
        image += 900.0 * np.exp(-r2 / (2 * 4.0**2))
    return image[None, ..., None]


def translated_pair(n, translation):
    """fixed(x) = moving(x + t): the displacement that registers them is t everywhere."""
    return {"fixed": blob_image(n, 0.0), "moving": blob_image(n, np.asarray(translation)),
            "spacing": SPACING[None]}


def dataset(pair, steps):
    element = {key: value[0] for key, value in pair.items()}
    return tf.data.Dataset.from_tensors(element).repeat(steps).batch(1)


def small_model(n=16, levels=3, **kwargs):
    return MultilevelRegistration((n, n, n), levels=levels, base_filters=4, **kwargs)


def test_translation_is_recovered_in_mm():
    translation = np.array([6.0, -4.0, 0.0])
    pair = translated_pair(32, translation)
    model = MultilevelRegistration((32, 32, 32), levels=2, base_filters=8, alpha=0.1, epsilon=0.05)
    fit_progressive(model, dataset(pair, 8), epochs_per_level=5, learning_rate=3e-3, verbose=0)
    displacement = np.asarray(model(pair)["displacement"])[0]
    on_blobs = pair["fixed"][0, ..., 0] > -700
    np.testing.assert_allclose(displacement[on_blobs].mean(axis=0), translation, atol=1.0)


@pytest.mark.slow
def test_trained_on_a_shift_and_its_reverse_both_are_registered():
    """The network must read the direction off the images: one field for both pairs (a learned
    average motion) is at least |t| off on one of them, since |d - t| + |d + t| >= 2|t|."""
    keras.utils.set_random_seed(0)
    translation = np.array([6.0, -4.0, 0.0])
    pairs = [translated_pair(32, sign * translation) for sign in (1.0, -1.0)]
    both = tf.data.Dataset.from_tensor_slices(
        {key: np.concatenate([p[key] for p in pairs]) for key in pairs[0]})
    model = MultilevelRegistration((32, 32, 32), levels=2, base_filters=8, alpha=0.1, epsilon=0.05)
    fit_progressive(model, both.repeat(10).shuffle(20, seed=0).batch(1), epochs_per_level=6,
                    learning_rate=3e-3, verbose=0)
    for sign, pair in zip((1.0, -1.0), pairs):
        on_blobs = pair["fixed"][0, ..., 0] > -700
        recovered = np.asarray(model(pair)["displacement"])[0][on_blobs].mean(axis=0)
        assert np.linalg.norm(recovered - sign * translation) < 0.8 * np.linalg.norm(translation)


def test_network_output_is_scaled_to_mm_by_the_level_spacing():
    model = small_model(levels=1)
    flow = model.net(1).get_layer("flow")
    flow.kernel.assign(np.zeros(flow.kernel.shape, np.float32))
    flow.bias.assign(np.array([1.0, -0.5, 0.25], np.float32))  # voxels
    spacing = np.array([[2.0, 1.0, 4.0]], np.float32)
    pair = {"fixed": blob_image(16, 0.0), "moving": blob_image(16, 0.0), "spacing": spacing}
    displacement = np.asarray(model(pair)["displacement"])
    np.testing.assert_allclose(displacement, np.broadcast_to([2.0, -0.5, 1.0], displacement.shape),
                               atol=1e-6)


class WeightsAtStageStart(keras.callbacks.Callback):
    """Records every level's weights when each stage's fit begins."""

    def __init__(self):
        super().__init__()
        self.snapshots = []

    def on_train_begin(self, logs=None):
        self.snapshots.append({
            "active": self.model.active_level,
            "weights": [[w.copy() for w in net.get_weights()] for net in self.model.nets],
        })


def weights_of(model):
    return [[w.copy() for w in net.get_weights()] for net in model.nets]


def assert_same(a, b):
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def assert_changed(a, b):
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_staged_fit_freezes_coarser_levels_and_starts_from_pretrained_weights():
    model = small_model()
    pair = translated_pair(16, [2.0, 0.0, 0.0])
    recorder = WeightsAtStageStart()
    after_stage = {}

    class AfterStage(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            after_stage[self.model.active_level] = weights_of(self.model)

    histories = fit_progressive(model, dataset(pair, 2), epochs_per_level=1, init="pretrained",
                                callbacks=[recorder, AfterStage()], verbose=0)
    assert sorted(histories) == [1, 2, 3]
    assert [s["active"] for s in recorder.snapshots] == [3, 2, 1]
    for snapshot in recorder.snapshots[1:]:
        level = snapshot["active"]
        start = snapshot["weights"]
        # pretrained: the new level starts with exactly the lower (coarser) level's weights
        # (as they are now: trained, then batch-norm statistics re-estimated, then frozen)
        assert_same(start[level - 1], start[level])
        assert_changed(start[level], recorder.snapshots[0]["weights"][level])
        end = after_stage[level]
        # every frozen coarser network is bit-identical; the trained level changed
        for coarser in range(level + 1, model.levels + 1):
            assert_same(end[coarser - 1], start[coarser - 1])
        assert_changed(end[level - 1], start[level - 1])


def test_xavier_init_draws_new_weights_for_each_finer_level():
    model = small_model(levels=2)
    recorder = WeightsAtStageStart()
    fit_progressive(model, dataset(translated_pair(16, [2.0, 0, 0]), 1), epochs_per_level=1,
                    init="xavier", callbacks=[recorder], verbose=0)
    fine_start, coarse = recorder.snapshots[1]["weights"]
    kernels = [(a, b) for a, b in zip(fine_start, coarse) if a.ndim == 5]
    assert kernels and all(not np.array_equal(a, b) for a, b in kernels)


def test_keep_init_fine_tunes_every_level_from_its_own_weights(tmp_path):
    from tfmlreg import experiment

    trained = small_model(levels=2)
    fit_progressive(trained, dataset(translated_pair(16, [2.0, 0, 0]), 1), epochs_per_level=1,
                    verbose=0)
    trained.save(tmp_path / "trained.keras")
    model = small_model(levels=2)
    experiment.load_initial_weights(model, str(tmp_path / "trained.keras"))
    assert_same(sum(weights_of(model), []), sum(weights_of(trained), []))
    recorder = WeightsAtStageStart()
    fit_progressive(model, dataset(translated_pair(16, [2.0, 0, 0]), 1), epochs_per_level=1,
                    init="keep", callbacks=[recorder], verbose=0)
    # the fine level starts from its own loaded weights, not the coarse level's
    fine_start = recorder.snapshots[1]["weights"][0]
    assert_same(fine_start, weights_of(trained)[0])


def test_resume_skips_finished_stages(tmp_path):
    pair = translated_pair(16, [2.0, 0, 0])
    first = small_model(levels=2)
    fit_progressive(first, dataset(pair, 1), epochs_per_level=1, checkpoint_dir=tmp_path, verbose=0)
    second = small_model(levels=2)
    histories = fit_progressive(second, dataset(pair, 1), epochs_per_level=1,
                                checkpoint_dir=tmp_path, verbose=0)
    assert histories == {}
    assert_same(sum(weights_of(first), []), sum(weights_of(second), []))


def test_save_and_load_give_identical_outputs(tmp_path):
    model = small_model()
    pair = translated_pair(16, [2.0, 0, 0])
    fit_progressive(model, dataset(pair, 1), epochs_per_level=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for key in ("displacement", "warped"):
        np.testing.assert_array_equal(model(pair)[key], loaded(pair)[key])


def test_single_level_baseline_trains_through_model_fit():
    model = small_model(levels=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(dataset(translated_pair(16, [2.0, 0, 0]), 3), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert {"ngf", "curvature"} <= set(history.history)


def test_shapes_the_unet_cannot_take_are_refused():
    with pytest.raises(ValueError, match="shape: every spatial size must be a positive multiple of 16"):
        MultilevelRegistration((40, 40, 40), levels=3)


def test_mixed_precision_keeps_outputs_float32():
    # bfloat16 is the CPU's mixed policy (TF's CPU AvgPool3D has no float16 kernel); GPUs take either.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = small_model(levels=2)
        outputs = model(translated_pair(16, [2.0, 0, 0]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert outputs["displacement"].dtype == tf.float32
    assert outputs["warped"].dtype == tf.float32


MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tfmlreg.model import MultilevelRegistration
    from tfmlreg.training import fit_progressive
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    rng = np.random.default_rng(0)
    element = {"fixed": rng.uniform(-1000, 0, (16, 16, 16, 1)).astype("float32"),
               "moving": rng.uniform(-1000, 0, (16, 16, 16, 1)).astype("float32"),
               "spacing": np.array([2.0, 2.0, 2.0], "float32")}
    data = tf.data.Dataset.from_tensors(element).repeat(4).batch(2)
    with strategy.scope():
        model = MultilevelRegistration((16, 16, 16), levels=2, base_filters=4)
        histories = fit_progressive(model, data, epochs_per_level=1, verbose=0)
    losses = [h.history["loss"][-1] for h in histories.values()]
    assert all(np.isfinite(losses)), losses
    print("MIRRORED_OK", losses)
""")


@pytest.mark.slow
def test_training_runs_under_mirrored_strategy_on_two_logical_cpus():
    # Logical devices must be configured before TensorFlow starts, hence a fresh interpreter.
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True,
                            text=True, timeout=600)
    assert "MIRRORED_OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_overfitting_one_phantom_pair_lowers_the_loss_and_the_landmark_error():
    from tfmlreg.data import phantom, pipeline
    from tfmlreg.inference import KerasPredictor, register_pair
    from tfmlreg.metrics import tre

    keras.utils.set_random_seed(0)  # the same initial weights on every run
    pair = phantom.as_case(phantom.make_pair((48, 48, 48), seed=2), "overfit")
    data = pipeline.make_dataset([pair], (32, 32, 32)).repeat(8)
    model = MultilevelRegistration((32, 32, 32), levels=2, base_filters=8, epsilon=0.01)
    predictor = KerasPredictor(model)

    def landmark_error():
        displacement = register_pair(predictor, pair)["displacement"]
        return tre(displacement, pair["spacing_fixed"], pair["fixed_landmarks"],
                   pair["moving_landmarks"]).mean()

    initial = landmark_error()
    histories = fit_progressive(model, data, epochs_per_level=3, learning_rate=3e-3, verbose=0)
    coarse, fine = histories[2].history["loss"], histories[1].history["loss"]
    assert coarse[-1] < 0.6 * coarse[0]  # the coarse level does the large motion
    assert fine[-1] < fine[0]  # the fine level refines what is left
    assert landmark_error() < 0.7 * initial


def test_gamma_adds_the_supervised_term_only_when_the_data_carry_ground_truth():
    pair = translated_pair(16, [4.0, 0.0, 0.0])
    truth = np.zeros((1, 16, 16, 16, 3), np.float32)
    truth[..., 0] = 4.0
    model = MultilevelRegistration((16, 16, 16), levels=2, base_filters=4, gamma=0.5)
    outputs = model(pair)
    unsupervised = model.loss_terms(pair, outputs)
    supervised = model.loss_terms({**pair, "displacement": truth}, outputs)
    assert "supervised" not in unsupervised
    error = np.mean(np.sum((np.asarray(outputs["displacement_level1"]) - truth) ** 2, axis=-1))
    np.testing.assert_allclose(np.asarray(supervised["supervised"]), [error], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(supervised["loss"]),
                               np.asarray(unsupervised["loss"]) + 0.5 * error, rtol=1e-4)
    assert MultilevelRegistration.from_config(model.get_config()).gamma == 0.5
    with pytest.raises(ValueError, match="gamma: expected a weight >= 0"):
        MultilevelRegistration((16, 16, 16), levels=2, gamma=-1.0)
