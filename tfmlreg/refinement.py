"""Test-time refinement ("instance optimisation"): the paper's objective optimised for one pair.

The network gives a displacement in one shot; :func:`refine` then minimises the same objective the
network was trained on, ``NGF(F, M∘y) + α·S(u)`` (:mod:`tfmlreg.losses`), for this pair alone,
coarse to fine, starting from the network's field (or from zero: the conventional multilevel
NGF + curvature scheme the paper transfers to deep learning). On the finest level a folding
penalty ``folding·P(u)`` (:func:`tfmlreg.losses.folding`, zero unless ``det(I + ∇u) < 0.1``) is
added; ``folding=0`` is the paper's objective alone. See docs/DESIGN.md, "The accurate path".

How it works, and why:

* **Working grids.** The fixed image's domain is covered by ``levels`` grids, the finest no finer
  than ``finest_spacing_mm`` and with at most ``max_voxels`` cells, each coarser one with half the
  cells per axis. Fixed and moving images are smoothed (anti-aliased) and resampled to each level
  on their own domains; intensities are mapped through the model's HU window to [0, 1].
* **Parameters.** On level ``l`` the unknown is a displacement increment on a control grid with
  ``control_factor`` times fewer cells per axis than the level grid, prolongated trilinearly: a
  smooth parameterisation with few unknowns, so Adam converges in tens of steps. The total field is
  ``initial + Σ increments``; the curvature term acts on the total (as in the model's loss).
* **Steps.** One Adam step is one compiled function (XLA from ``XLA_MIN_CELLS`` cells on, a plain
  graph below), traced once per level shape (inputs are tensors, hyper-parameters included, so
  repeated calls with one shape never retrace). The Python
  loop around it stops a level early when the loss improved by less than ``tolerance`` (relative)
  over the last ``patience`` steps, and keeps the best state seen, so a level never ends with a
  higher loss than it started with.
* **Output.** ``initial`` stays exact at full resolution; the increments (smooth by construction)
  are prolongated onto the fixed grid and added.

:func:`refine_graph` is the same algorithm with a fixed number of steps per level inside a
``tf.while_loop``, for the exported SavedModel signature ``register_refined``.

Defaults and how they were chosen are in docs/REFINEMENT.md (``benchmarks/refine.py`` on phantoms
and on real CTs with synthetic breathing).
"""

import dataclasses
import time

import numpy as np
import tensorflow as tf
from keras import ops

from tfmlreg import geometry, losses
from tfmlreg.layers import IntensityWindow
from tfmlreg.model import DEFAULT_WINDOW

ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8
# The zero start replaces the initial field only when its coarsest-level objective is lower by
# this fraction: from a correct network field both ends lie within a few per cent (the coarse grid
# cannot tell them apart), and the initial one keeps the fine detail the coarse level cannot hold.
ZERO_START_MARGIN = 0.1
MIN_LEVEL_SIZE = 8  # cells per axis below which a coarser level adds nothing


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """Settings of :func:`refine`; every default is explained in docs/REFINEMENT.md."""

    levels: int = 4
    iterations: int = 60  # Adam steps at the finest level, at most
    iteration_growth: float = 2.0  # each coarser level may take this many times more (cheap) steps
    alpha: float = 8.0  # curvature weight (mm²), as in the training loss NGF + α·S(u)
    folding: float = 10.0  # weight of the folding penalty (losses.folding), finest level only
    epsilon: float = 0.01  # NGF edge noise level, window-normalised intensity per mm
    learning_rate: float = 0.4  # mm per Adam step at the finest level (doubles per coarser level)
    finest_spacing_mm: float | None = 2.0  # None: the finest level is the fixed image's own grid
    max_voxels: int = 1_000_000  # cap on the finest level's cells (memory and time)
    control_factor: int = 2  # level cells per control-grid cell, per axis
    tolerance: float = 1e-4  # relative loss improvement over `patience` steps that ends a level
    patience: int = 10
    intensity_window: tuple = DEFAULT_WINDOW  # HU -> [0, 1], as the model normalises
    smoothing: float = 0.5  # least Gaussian σ (cells of the image) before each level's resampling

    def __post_init__(self):
        checks = {
            "levels": self.levels >= 1, "iterations": self.iterations >= 0,
            "iteration_growth": self.iteration_growth >= 1,
            "alpha": self.alpha >= 0, "folding": self.folding >= 0, "epsilon": self.epsilon > 0,
            "learning_rate": self.learning_rate > 0, "max_voxels": self.max_voxels >= 27,
            "control_factor": self.control_factor >= 1, "tolerance": self.tolerance >= 0,
            "patience": self.patience >= 1, "smoothing": self.smoothing >= 0,
            "finest_spacing_mm": self.finest_spacing_mm is None or self.finest_spacing_mm > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid refinement setting {getattr(self, name)!r}")


# --- grids --------------------------------------------------------------------------------------


def level_shapes(shape, spacing, config):
    """Cell counts of the working grids over the fixed domain, finest first."""
    shape = np.asarray(shape, np.int64)
    if config.finest_spacing_mm is None:
        finest = shape
    else:
        extent = shape * np.asarray(spacing, np.float64)
        target = np.maximum(np.asarray(spacing, np.float64), config.finest_spacing_mm)
        finest = np.maximum(np.round(extent / target), 1).astype(np.int64)
        excess = np.prod(finest) / config.max_voxels
        if excess > 1:
            finest = np.maximum(np.round(finest / excess ** (1 / 3)), 1).astype(np.int64)
    shapes = [tuple(int(n) for n in finest)]
    for level in range(1, config.levels):
        coarse = np.maximum(np.ceil(finest / 2**level), np.minimum(finest, MIN_LEVEL_SIZE))
        shapes.append(tuple(int(n) for n in coarse))
    return shapes


def control_shape(level_shape, config):
    return tuple(max(int(np.ceil(n / config.control_factor)), 2) for n in level_shape)


def _ratio(source_shape, target_shape):
    return np.asarray(source_shape, np.float32) / np.asarray(target_shape, np.float32)


def smooth_resample(image, target_shape, smoothing=0.0):
    """``image (B, D, H, W, 1)`` on ``target_shape`` cells of its domain, smoothed first by a
    Gaussian of ``max((f - 1) / 2, smoothing)`` cells along an axis that shrinks ``f``-fold
    (``(f - 1) / 2``: the anti-aliasing rule of the data pipeline, so coarse levels do not alias;
    ``smoothing``: a floor that also smooths a level on the image's own grid, against the noise in
    the NGF's gradients).

    Axis by axis, the most shrinking first: a blur along one axis and the interpolation along
    another commute, so this is the blur of the whole image followed by the resampling, with each
    later axis done on a volume already shrunk along the earlier ones. Along an axis the blur and
    the interpolation are one ``(target, source)`` matrix, applied as a matrix product: onto a
    refinement level from a full-resolution CT (512 cells shrinking 4.6-fold), one BLAS call
    instead of a wide convolution over the whole scan and a gather."""
    ratio = _ratio(geometry.spatial_shape(image), target_shape)
    image = ops.cast(image, geometry.FLOAT)
    for axis in np.argsort(-ratio, kind="stable"):
        sigma = max((ratio[axis] - 1.0) / 2.0 if ratio[axis] > 1.5 else 0.0, smoothing)
        size, target = int(image.shape[axis + 1]), int(target_shape[axis])
        if sigma > 0:
            blur = geometry.gaussian_matrix(size, sigma, int(np.ceil(2.5 * sigma)))
            image = geometry.along_axis(image, int(axis),
                                        geometry.interpolation_matrix(target, size) @ blur)
        else:
            image = geometry.resample_axis(image, int(axis), target)
    return image


def prolongate(control, shape):
    """``control (B, d, h, w, C)`` carried trilinearly to ``shape`` over the same domain.

    Separable: three small matrix products instead of eight gathers per fine voxel, so the
    gradient with respect to ``control`` is matrix products too (a gather's gradient is a
    scatter-add, which XLA runs serially on CPU: the slowest part of a step otherwise)."""
    source = geometry.spatial_shape(control)
    out = ops.cast(control, geometry.FLOAT)
    for axis, subscripts in enumerate(("zi,bijkc->bzjkc", "zj,bijkc->bizkc", "zk,bijkc->bijzc")):
        matrix = ops.convert_to_tensor(geometry.interpolation_matrix(shape[axis], source[axis]))
        out = ops.einsum(subscripts, matrix, out)
    return out


# --- one Adam step on one level -----------------------------------------------------------------


def _objective(control, level, alpha, epsilon, fold):
    """Per-sample ``NGF + α·S + fold·P`` of the level's total field ``offset + prolongated
    control`` (``P``: :func:`tfmlreg.losses.folding`)."""
    dims = geometry.spatial_shape(level["fixed"])
    spacing = level["spacing"]
    total = level["offset"] + prolongate(control, dims)
    points = geometry.grid_points(dims, spacing) + total
    # Beyond the moving scan its border continues (no fill value): a scan cut through the body
    # would otherwise end in a step to "air" that sample points cross as the field grows, a cliff
    # in the objective that Adam's steps jump onto (radiomics-lung1, inhale: the coarsest level's
    # loss rose 3x in one step and the level ended at its best early state, bases 20 mm off).
    warped = geometry.sample(level["moving"], points, level["moving_spacing"])
    # ...but the voxels whose points fall there leave the similarity, as conventional registration
    # discards samples mapped outside the moving image: the continued border's stripes drew lung
    # bases past a scan cut through the lungs (the 1.5 mm box of benchmarks/register_time.py,
    # inhale: landmark errors up to 42 mm at the cut).
    seen = geometry.domain_weight(points, geometry.spatial_shape(level["moving"]),
                                  level["moving_spacing"])
    weights = seen if level.get("weights") is None else seen * level["weights"]
    similarity = losses.ngf(level["fixed"], warped, spacing, epsilon, weights)
    return (similarity + alpha * losses.curvature(total, spacing)
            + fold * losses.folding(total, spacing))


def _adam_step(control, m, v, step, learning_rate, alpha, epsilon, fold, level):
    """One Adam step on ``control``; returns the new state and the loss *before* the step."""
    with tf.GradientTape() as tape:
        tape.watch(control)
        loss = _objective(control, level, alpha, epsilon, fold)
        total = ops.sum(loss)  # samples are independent: their gradients do not mix
    gradient = tape.gradient(total, control)
    beta1, beta2 = ADAM_BETAS
    m = beta1 * m + (1.0 - beta1) * gradient
    v = beta2 * v + (1.0 - beta2) * ops.square(gradient)
    m_hat = m / (1.0 - ops.power(beta1, step))
    v_hat = v / (1.0 - ops.power(beta2, step))
    control = control - learning_rate * m_hat / (ops.sqrt(v_hat) + ADAM_EPSILON)
    return control, m, v, loss


compiled_step = tf.function(_adam_step, jit_compile=True, autograph=False)  # no control flow to convert
# Small levels run the step as a plain graph: XLA's compilation (~1.2 s per shape on 2 cores)
# costs more there than all its steps save (12×10×11 cells: 0.5 s cold as a graph against 1.2 s
# with XLA, 110 steps each; from 45×38×42 cells on, XLA is faster even cold).
graph_step = tf.function(_adam_step, autograph=False)
XLA_MIN_CELLS = 32_768


def step_for(shape):
    """The step function for a level of ``shape`` cells: XLA from ``XLA_MIN_CELLS`` on."""
    return compiled_step if np.prod(shape) >= XLA_MIN_CELLS else graph_step


# --- levels -------------------------------------------------------------------------------------


def _prepare_level(images, level_shape, delta):
    """Tensors of one level: images, spacings, and the fixed part of the field (``initial`` plus
    the coarser levels' increments) as ``offset``; ``increments`` alone as well."""
    spacing = images["spacing_fixed"] * _as_row(_ratio(images["fixed_shape"], level_shape))
    moving_shape = _moving_level_shape(images["moving_shape"], images["moving_extent_ratio"],
                                      level_shape)
    moving_spacing = images["spacing_moving"] * _as_row(_ratio(images["moving_shape"], moving_shape))
    field, field_spacing = delta
    increments = geometry.resample(field, field_spacing, level_shape)
    level = {
        "fixed": smooth_resample(images["fixed"], level_shape, images["smoothing"]),
        "moving": smooth_resample(images["moving"], moving_shape, images["smoothing"]),
        "spacing": spacing, "moving_spacing": moving_spacing,
        "offset": increments + _carry_initial(images, level_shape),
    }
    if images["weights"] is not None:
        level["weights"] = smooth_resample(images["weights"], level_shape)
    return level, increments


def _moving_level_shape(moving_shape, extent_ratio, level_shape):
    """The moving image keeps its own grid unless the level is at least 2× coarser along an axis:
    resampling it to nearly its own resolution would only blur it (an interpolation of an
    interpolation), which flattens the similarity measure without saving time (sampling costs
    per point, not per voxel)."""
    own = np.asarray(moving_shape, np.float64)
    level_cells = np.asarray(level_shape) * extent_ratio  # in the moving extent
    ratio = own / level_cells
    return tuple(int(n) if r < 2.0 else int(max(round(n / r), 3)) for n, r in zip(own, ratio))


def _as_row(values):
    return ops.convert_to_tensor(np.asarray(values, np.float32))[None, :]


def _carry_initial(images, level_shape):
    if images["initial"] is None:
        return 0.0
    return geometry.resample(images["initial"], images["spacing_fixed"], level_shape)


def _level_result(level, increments, control):
    """``(increments so far on the level grid, its spacing)``, the level's control prolongated."""
    dims = geometry.spatial_shape(level["fixed"])
    return increments + prolongate(control, dims), level["spacing"]


def _inputs(fixed, moving, spacing_fixed, spacing_moving, initial, mask, config, same_grid=False):
    """Batched float32 tensors and shapes shared by both paths (window-normalised images)."""
    window = IntensityWindow(config.intensity_window)
    fixed_shape = geometry.spatial_shape(fixed)
    moving_shape = geometry.spatial_shape(moving)
    batch = ops.shape(fixed)[0]
    spacing_fixed = geometry.as_spacing(spacing_fixed, batch)
    spacing_moving = geometry.as_spacing(spacing_moving, batch)
    return {
        "fixed": window(fixed), "moving": window(moving),
        "fixed_shape": fixed_shape, "moving_shape": moving_shape,
        "spacing_fixed": spacing_fixed, "spacing_moving": spacing_moving,
        "moving_extent_ratio": np.ones(3) if same_grid else _moving_extent_ratio(
            fixed_shape, moving_shape, spacing_fixed, spacing_moving),
        "initial": None if initial is None else ops.cast(initial, geometry.FLOAT),
        "weights": mask, "smoothing": config.smoothing,
    }


def _moving_extent_ratio(fixed_shape, moving_shape, spacing_fixed, spacing_moving):
    """Moving extent / fixed extent per axis (sets the moving image's level shapes)."""
    fixed = np.asarray(fixed_shape) * ops.convert_to_numpy(spacing_fixed)[0]
    moving = np.asarray(moving_shape) * ops.convert_to_numpy(spacing_moving)[0]
    return moving / fixed


def _zero_delta(images, shape):
    zeros = ops.zeros((ops.shape(images["fixed"])[0], *shape, 3), geometry.FLOAT)
    return zeros, images["spacing_fixed"] * _as_row(_ratio(images["fixed_shape"], shape))


def _finish(images, delta):
    """``initial + increments`` on the fixed grid."""
    field, spacing = delta
    increments = geometry.resample(field, spacing, images["fixed_shape"])
    return increments if images["initial"] is None else images["initial"] + increments


def level_iterations(config, index):
    """Steps allowed on level ``index`` (0 finest): a coarser level's step costs about 8× less,
    and it is where large motion is found, so it may take ``iteration_growth`` times more."""
    return int(round(config.iterations * config.iteration_growth**index))


def _level_folding(config, index):
    """The folding penalty's weight on level ``index``: the finest level only, where folding is
    measured and where the last, smallest-scale changes could make it (on coarser levels it held
    back the large motion: radiomics-lung1, inhale, TRE 0.81 -> 2.2 mm)."""
    return config.folding if index == 0 else 0.0


def _level_rate(config, index):
    return config.learning_rate * 2.0**index  # coarser cells move further per step


# --- the Python path ------------------------------------------------------------------------------


def refine(fixed, moving, spacing_fixed, spacing_moving=None, initial=None, mask=None,
           config=None, progress=False, **settings):
    """Refine a displacement for one pair by minimising ``NGF + α·curvature``, coarse to fine.

    ``fixed (D, H, W)`` and ``moving (D', H', W')`` are raw intensities (HU) on their own grids,
    sharing one mm frame (cell-centred, origin at the fixed grid's corner); spacings in mm
    (``spacing_moving`` defaults to ``spacing_fixed``). ``initial`` ``(D, H, W, 3)`` mm on the fixed
    grid (e.g. the network's field) or None for zero. ``mask`` ``(D, H, W)`` >= 0 weighs the
    similarity (e.g. a body or lung mask). Settings: a :class:`RefineConfig` or its fields as
    keywords. ``progress`` shows a tqdm bar (level, step, loss).

    Returns ``{"displacement": (D, H, W, 3) mm, "loss": [per level: losses per step],
    "steps": [per level], "start": "initial" or "zero" (see :func:`_coarsest_level`),
    "seconds": wall time}``.
    """
    config = dataclasses.replace(config or RefineConfig(), **settings)
    start = time.perf_counter()
    spacing_moving = spacing_fixed if spacing_moving is None else spacing_moving
    images = _inputs(_batched(fixed, "fixed"), _batched(moving, "moving"),
                     np.asarray(spacing_fixed, np.float32), np.asarray(spacing_moving, np.float32),
                     None if initial is None else np.asarray(initial, np.float32)[None],
                     None if mask is None else _batched(mask, "mask"), config)
    shapes = level_shapes(images["fixed_shape"], ops.convert_to_numpy(images["spacing_fixed"])[0],
                          config)
    bar = _progress_bar(config, len(shapes)) if progress else None
    images, delta, losses_seen, start_from = _coarsest_level(images, shapes, config, bar)
    history, steps = [losses_seen], [len(losses_seen)]
    for index in range(len(shapes) - 2, -1, -1):
        level, increments = _prepare_level(images, shapes[index], delta)
        control, losses_seen = _run_level(level, shapes[index], config, index, bar)
        delta = _level_result(level, increments, control)
        history.append(losses_seen)
        steps.append(len(losses_seen))
    if bar is not None:
        bar.close()
    displacement = ops.convert_to_numpy(_finish(images, delta))[0]
    if not np.all(np.isfinite(displacement)):
        raise FloatingPointError("refinement produced a non-finite displacement")
    return {"displacement": displacement, "loss": history, "steps": steps, "start": start_from,
            "seconds": time.perf_counter() - start}


def _coarsest_level(images, shapes, config, bar):
    """The coarsest level from ``initial`` and, when there is one, also from zero; the zero run is
    kept only if it ends with a clearly lower objective (``ZERO_START_MARGIN``; ``start``:
    "initial" or "zero"). A network that is wrong for this pair (e.g. one trained on other
    anatomy) then costs one cheap level instead of leaving its error in the result; both runs
    optimise the same objective on the same grid, so their losses compare."""
    index = len(shapes) - 1
    level, increments = _prepare_level(images, shapes[index], _zero_delta(images, shapes[index]))
    starts = {"zero": (images, level)}
    if images["initial"] is not None:  # the zero start: the same level images, no offset
        starts = {"initial": (images, level),
                  "zero": (dict(images, initial=None), dict(level, offset=increments))}
    runs: dict[str, tuple] = {}
    for name, (inputs, level) in starts.items():
        control, seen = _run_level(level, shapes[index], config, index, bar if not runs else None)
        runs[name] = (min(seen, default=np.inf), inputs, _level_result(level, increments, control),
                      seen)
    name = "zero"
    if "initial" in runs and not runs["zero"][0] < (1.0 - ZERO_START_MARGIN) * runs["initial"][0]:
        name = "initial"
    _, inputs, delta, seen = runs[name]
    return inputs, delta, seen, name


def objective(fixed, moving, spacing_fixed, displacement, spacing_moving=None, config=None,
              **settings):
    """The finest level's ``NGF + α·S + folding·P`` (what :func:`refine` minimises last) of a
    full-resolution ``displacement (D, H, W, 3)``: compares fields, e.g. the network's with the
    refined one."""
    config = dataclasses.replace(config or RefineConfig(), **settings)
    spacing_moving = spacing_fixed if spacing_moving is None else spacing_moving
    images = _inputs(_batched(fixed, "fixed"), _batched(moving, "moving"),
                     np.asarray(spacing_fixed, np.float32), np.asarray(spacing_moving, np.float32),
                     np.asarray(displacement, np.float32)[None], None, config)
    shape = level_shapes(images["fixed_shape"], ops.convert_to_numpy(images["spacing_fixed"])[0],
                         config)[0]
    level, _ = _prepare_level(images, shape, _zero_delta(images, shape))
    control = ops.zeros((1, *control_shape(shape, config), 3), geometry.FLOAT)
    return float(_objective(control, level, config.alpha, config.epsilon, config.folding)[0])


def _batched(volume, name):
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3:
        raise ValueError(f"{name}: expected a (D, H, W) volume, got shape {volume.shape}")
    return volume[None, ..., None]


def _run_level(level, shape, config, index, bar):
    """Adam steps with early stopping; returns the best control seen and the losses per step."""
    control = ops.zeros((1, *control_shape(shape, config), 3), geometry.FLOAT)
    m, v = ops.zeros_like(control), ops.zeros_like(control)
    constants = [tf.constant(x, tf.float32) for x in
                 (_level_rate(config, index), config.alpha, config.epsilon,
                  _level_folding(config, index))]
    best, best_loss, seen = control, np.inf, []
    step_function = step_for(shape)
    for step in range(1, level_iterations(config, index) + 1):
        new, m, v, loss = step_function(control, m, v, tf.constant(step, tf.float32),
                                        *constants, level)
        loss = float(loss[0])
        seen.append(loss)
        if loss < best_loss:
            best, best_loss = control, loss
        control = new
        if bar is not None:
            bar.set_postfix(level=index + 1, step=step, loss=f"{loss:.4f}")
            bar.update(1)
        if _converged(seen, config):
            break
    if bar is not None:
        bar.update(level_iterations(config, index) - len(seen))
    return best, seen


def _converged(seen, config):
    if config.tolerance == 0 or len(seen) <= config.patience:
        return False
    before, now = min(seen[:-config.patience]), min(seen)
    return before - now <= config.tolerance * abs(before)


def _progress_bar(config, levels):
    from tqdm import tqdm

    total = sum(level_iterations(config, index) for index in range(levels))
    return tqdm(total=total, desc="refining", unit="step", leave=False)


# --- the in-graph path (SavedModel) ---------------------------------------------------------------


def refine_graph(fixed, moving, spacing, initial, config=None, **settings):
    """:func:`refine` for a batch on one grid with exactly ``iterations`` steps per level, as graph
    ops (a ``tf.while_loop`` per level, the step XLA-compiled): what the exported signature runs.

    ``fixed``, ``moving`` ``(B, D, H, W, 1)`` raw HU on one grid, ``spacing`` ``(B, 3)`` mm,
    ``initial`` ``(B, D, H, W, 3)`` mm. The finest level is the input grid (``finest_spacing_mm``
    is ignored: shapes must not depend on values here). Returns the refined ``(B, D, H, W, 3)``.
    """
    settings["finest_spacing_mm"] = None
    config = dataclasses.replace(config or RefineConfig(), **settings)
    images = _inputs(fixed, moving, spacing, spacing, initial, None, config, same_grid=True)
    shapes = level_shapes(images["fixed_shape"], None, config)
    images, delta = _graph_coarsest_level(images, shapes, config)
    for index in range(len(shapes) - 2, -1, -1):
        level, increments = _prepare_level(images, shapes[index], delta)
        control, _ = _graph_level(level, shapes[index], config, index)
        delta = _level_result(level, increments, control)
    return _finish(images, delta)


def _graph_coarsest_level(images, shapes, config):
    """:func:`_coarsest_level` per sample: from ``initial`` and from zero, the zero run kept
    where its objective is lower by ``ZERO_START_MARGIN``."""
    index, runs = len(shapes) - 1, []
    for inputs in (images, dict(images, initial=None)):
        level, increments = _prepare_level(inputs, shapes[index], _zero_delta(inputs, shapes[index]))
        control, best_loss = _graph_level(level, shapes[index], config, index)
        runs.append((best_loss, _level_result(level, increments, control)))
    (loss_initial, (delta_initial, spacing)), (loss_zero, (delta_zero, _)) = runs
    zero = ops.reshape(loss_zero < (1.0 - ZERO_START_MARGIN) * loss_initial, (-1, 1, 1, 1, 1))
    initial = ops.where(zero, ops.zeros_like(images["initial"]), images["initial"])
    return dict(images, initial=initial), (ops.where(zero, delta_zero, delta_initial), spacing)


def _graph_level(level, shape, config, index):
    batch = ops.shape(level["fixed"])[0]
    control = ops.zeros((batch, *control_shape(shape, config), 3), geometry.FLOAT)
    constants = [tf.constant(x, tf.float32) for x in
                 (_level_rate(config, index), config.alpha, config.epsilon,
                  _level_folding(config, index))]
    best_loss = tf.fill([batch], np.float32(np.inf))

    def body(step, control, m, v, best, best_loss):
        new, m, v, loss = step_for(shape)(control, m, v, ops.cast(step, "float32"), *constants,
                                        level)
        better = ops.reshape(loss < best_loss, (-1, 1, 1, 1, 1))
        best = ops.where(better, control, best)
        return step + 1, new, m, v, best, ops.minimum(loss, best_loss)

    state = (tf.constant(1), control, ops.zeros_like(control), ops.zeros_like(control), control,
             best_loss)
    steps = level_iterations(config, index)
    state = tf.while_loop(lambda step, *_: step <= steps, body, state)
    return state[4], state[5]
