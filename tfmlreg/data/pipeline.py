"""From pairs to what the model trains on: the network grid and a ``tf.data`` pipeline.

The network grid (the paper: 160³) covers the fixed image's physical extent ``[0, n·h]`` per axis
with ``shape`` cells, so its spacing is ``n·h / shape`` per axis and per sample. The fixed image is
resampled onto it; the moving image (which may have another size and spacing) is sampled at the
same physical points, air (-1000 HU) outside its domain. When a grid is coarser than the image
by more than 1.5× along an axis, the image is first smoothed there with a Gaussian of
``(factor - 1) / 2`` voxels (the usual anti-aliasing choice), so small vessels do not alias.
Label maps become one-hot masks of labels ``1..K`` (background excluded) resampled trilinearly.

Training that teaches registration rather than a motion prior (docs/DESIGN.md section 6)
draws, per element and per epoch (:func:`make_dataset`'s keyword options):

* geometry (:func:`augment_geometry`, NumPy, on one network-grid element): random flips and axis
  permutations, a swap of fixed and moving (the motion reversed), a global shift of the moving
  image, random crops of the field of view; each applied to the images, their masks and, when
  present, the ground-truth displacement and landmarks, consistently (a flipped axis negates its
  displacement component; a permutation permutes the components with the axes);
* intensity (:func:`_augment`): HU offset and density scale per image;
* synthetic breathing on real CT: a source item that is a scan (``{"image", "spacing"}``, HU in
  RAS+ order) gives a new random pair each epoch (:func:`tfmlreg.data.synthetic.random_pair`:
  random amplitude and direction, small motion and pure shifts included).

Every random draw comes from the dataset's ``seed``: same seed, same elements, epoch by epoch.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import tensorflow as tf
from numpy.typing import ArrayLike

from tfmlreg import geometry
from tfmlreg.ct import AIR_HU, NUM_LABELS
from tfmlreg.data import io
from tfmlreg.types import Array, PathLike, Shape, Spacing, Tensor

if TYPE_CHECKING:  # synthetic imports this module
    from tfmlreg.data.synthetic import Anatomy, RandomMotion

# a folder of pair folders, or pair dicts (fixed, moving, ...) and scan dicts (image, spacing)
Source = Union[PathLike, list[dict[str, Any]], tuple[dict[str, Any], ...]]



def network_spacing(image_shape: Shape, spacing: Spacing, shape: Shape) -> Array:
    """Spacing (mm) of ``shape`` cells over the extent of an image of ``image_shape``."""
    return (np.asarray(image_shape, np.float64) * np.asarray(spacing, np.float64)
            / np.asarray(shape, np.float64)).astype(np.float32)


def antialias_sigma(image_spacing: Spacing, grid_spacing: Spacing) -> Array:
    """Gaussian σ (cells of the image, per axis) before sampling it on a grid of ``grid_spacing``:
    ``(f - 1) / 2`` along an axis that coarsens ``f > 1.5``-fold, none otherwise."""
    factor = np.asarray(grid_spacing, np.float64) / np.asarray(image_spacing, np.float64)
    return np.where(factor > 1.5, (factor - 1.0) / 2.0, 0.0)


def sample_on_grid(volume: ArrayLike, volume_spacing: Spacing, shape: Shape, grid_spacing: Spacing,
                   fill_value: float | None = None, antialias: bool = False) -> Array:
    """``volume (D, H, W[, C])`` at the cell centres of ``shape`` cells of ``grid_spacing`` (both
    grids start at the frame's origin); with ``antialias``, blurred first by
    :func:`antialias_sigma` (in the same pass: :func:`tfmlreg.geometry.sample_axes`)."""
    volume = np.asarray(volume, np.float32)
    channels = volume[..., None] if volume.ndim == 3 else volume
    sigma = antialias_sigma(volume_spacing, grid_spacing) if antialias else 0.0
    values = geometry.sample_axes(channels, geometry.axis_centres(shape, grid_spacing), volume_spacing,
                                  fill_value, sigma)
    return values[..., 0] if volume.ndim == 3 else values


def resample_image(image: ArrayLike, spacing: Spacing, shape: Shape,
                   fill_value: float | None = AIR_HU) -> tuple[Array, Array]:
    """``(image on shape cells over its own extent, their spacing)``, anti-aliased, trilinear."""
    shape = tuple(int(n) for n in shape)
    grid_spacing = network_spacing(np.shape(image), spacing, shape)
    return sample_on_grid(image, spacing, shape, grid_spacing, fill_value, antialias=True), grid_spacing


def one_hot(labels: ArrayLike, num_labels: int = NUM_LABELS) -> Array:
    """``(D, H, W, K)`` float32 masks of labels ``1..K`` (background excluded)."""
    labels = np.asarray(labels)
    return np.stack([labels == k for k in range(1, num_labels + 1)], axis=-1).astype(np.float32)


def to_network_grid(pair: Mapping[str, Any], shape: Shape,
                    num_labels: int = NUM_LABELS) -> dict[str, Any]:
    """``{"fixed", "moving": shape, "spacing": (3,)[, "fixed_mask", "moving_mask": shape + (K,)]}``."""
    shape = tuple(int(n) for n in shape)
    fixed_shape = np.shape(pair["fixed"])
    spacing = network_spacing(fixed_shape, pair["spacing_fixed"], shape)
    out = {"spacing": spacing}
    for side in ("fixed", "moving"):
        out[side] = sample_on_grid(pair[side], pair[f"spacing_{side}"], shape, spacing, AIR_HU,
                                   antialias=True)
        if pair.get(f"{side}_labels") is not None:
            out[f"{side}_mask"] = sample_on_grid(
                one_hot(pair[f"{side}_labels"], num_labels), pair[f"spacing_{side}"], shape,
                spacing, 0.0)
    return out


def displacement_to_full_resolution(displacement: ArrayLike, spacing: Spacing,
                                    fixed_shape: Shape) -> Array:
    """A network-grid displacement (mm) evaluated on the fixed image's original grid."""
    return _on_grid(displacement, spacing, fixed_shape)


def _items(source: Source) -> list[dict[str, Any]]:
    """The pairs and scans of ``source``: a folder of pairs, or a list of pair dicts (with
    ``fixed``) and scan dicts (with ``image`` and ``spacing``, for synthetic breathing)."""
    if not isinstance(source, (list, tuple)):
        cases = io.list_pairs(source)
        if not cases:
            raise io.DataError(f"{source}: no pairs found (expected <case>/fixed.nii.gz and moving.nii.gz)")
        return [io.load_pair(case) for case in cases]
    for index, item in enumerate(source):
        if not isinstance(item, dict) or not ("fixed" in item or {"image", "spacing"} <= set(item)):
            raise io.DataError(f"source[{index}]: expected a pair dict (fixed, moving, ...) or a "
                               "scan dict (image, spacing)")
    return list(source)


def _pairs(source: Source) -> list[dict[str, Any]]:
    pairs = _items(source)
    if any("fixed" not in item for item in pairs):
        raise io.DataError("source: scans (image, spacing) need make_dataset's synthetic mode")
    return pairs


def _grid_element(pair: Mapping[str, Any], shape: Shape, num_labels: int,
                  displacement: bool) -> dict[str, Any]:
    """One pair on the network grid; with ``displacement``, its ground truth too (mm values kept)."""
    element = to_network_grid(pair, shape, num_labels)
    for key in ("fixed", "moving"):
        element[key] = element[key][..., None]
    if displacement:
        if pair.get("displacement") is None:
            raise io.DataError(f"{pair.get('name', 'a pair')}: no ground-truth displacement "
                               "(asked for with displacement=True)")
        element["displacement"] = _on_grid(pair["displacement"], pair["spacing_fixed"], shape)
    return element


def _on_grid(field: ArrayLike, spacing: Spacing, shape: Shape) -> Array:
    """A displacement (mm) on another grid of the same domain."""
    field = np.asarray(field, np.float32)
    grid_spacing = network_spacing(field.shape[:3], np.asarray(spacing, np.float32), shape)
    return geometry.sample_axes(field, geometry.axis_centres(shape, grid_spacing), spacing)


def grid_arrays(source: Source, shape: Shape, masks: bool = True, num_labels: int = NUM_LABELS,
                displacement: bool = False) -> dict[str, Array]:
    """All pairs of ``source`` (a folder or a list of pair dicts) on the network grid, stacked;
    with ``displacement``, their ground-truth fields too."""
    elements = [_grid_element(pair, shape, num_labels, displacement) for pair in _pairs(source)]
    keys = _element_keys(elements, masks, displacement)
    return {key: np.stack([e[key] for e in elements]) for key in keys}


def _element_keys(elements: Sequence[Mapping[str, Any]], masks: bool,
                  displacement: bool) -> list[str]:
    keys = ["fixed", "moving", "spacing"]
    if masks and all("fixed_mask" in e and "moving_mask" in e for e in elements):
        keys += ["fixed_mask", "moving_mask"]
    if displacement:
        keys.append("displacement")
    return keys


def _augment(element: Mapping[str, Tensor], seed: Tensor) -> dict[str, Tensor]:
    """Intensity augmentation only: geometry stays as the physics made it.

    Each image gets its own HU offset (±30) and a tissue-density scale (0.95–1.05 about air),
    so the network does not key on exact lung HU, which vary with scanner and breath hold.
    """
    out = dict(element)
    for index, key in enumerate(("fixed", "moving")):
        pair_seed = tf.stack([seed, tf.constant(index, tf.int64)])
        draws = tf.random.stateless_uniform((2,), pair_seed, -1.0, 1.0)
        image = element[key]
        out[key] = (image - AIR_HU) * (1.0 + 0.05 * draws[0]) + AIR_HU + 30.0 * draws[1]
    return out


# --- geometric augmentation (NumPy, one unbatched network-grid element) -----------------------


def _extent(element: Mapping[str, Any]) -> Array:
    return np.asarray(element["fixed"].shape[:3]) * np.asarray(element["spacing"], np.float64)


def flip(element: Mapping[str, Any], axis: int) -> dict[str, Any]:
    """The element mirrored along array ``axis``: images, masks and field reversed there, the
    field's ``axis`` component negated, landmarks ``p → extent - p`` along it."""
    out = dict(element)
    for key in _VOLUMES:
        if key in element:
            out[key] = np.flip(element[key], axis)
    if "displacement" in element:
        out["displacement"] = out["displacement"].copy()
        out["displacement"][..., axis] *= -1.0
    for key in _LANDMARKS:
        if key in element:
            out[key] = np.array(element[key], copy=True)
            out[key][:, axis] = _extent(element)[axis] - out[key][:, axis]
    return out


def permute(element: Mapping[str, Any], order: Sequence[int]) -> dict[str, Any]:
    """The element with its array axes reordered (new axis ``j`` = old axis ``order[j]``):
    spacing, field components and landmark coordinates reordered with them."""
    order = [int(k) for k in order]
    out = dict(element)
    for key in _VOLUMES:
        if key in element:
            out[key] = np.transpose(element[key], order + [3])
    out["spacing"] = np.asarray(element["spacing"])[order]
    if "displacement" in element:
        out["displacement"] = out["displacement"][..., order]
    for key in _LANDMARKS:
        if key in element:
            out[key] = np.asarray(element[key])[:, order]
    return out


def swap(element: Mapping[str, Any]) -> dict[str, Any]:
    """Fixed and moving exchanged: the motion reversed. The field becomes the inverse of
    ``y = x + u`` (numerically, :func:`tfmlreg.data.synthetic.invert_displacement`)."""
    from tfmlreg.data import synthetic  # synthetic imports this module

    out = dict(element)
    for first, second in (("fixed", "moving"), ("fixed_mask", "moving_mask"),
                          ("fixed_landmarks", "moving_landmarks")):
        if first in element and second in element:
            out[first], out[second] = element[second], element[first]
    if "displacement" in element:
        out["displacement"], _ = synthetic.invert_displacement(element["displacement"],
                                                               element["spacing"])
    return out


def shift_moving(element: Mapping[str, Any], shift_mm: Spacing) -> dict[str, Any]:
    """The moving image moved by ``-shift_mm`` (``moving'(x) = moving(x + shift)``): the field
    becomes ``u - shift``, moving landmarks ``p - shift``; beyond the border the border continues."""
    shift = np.asarray(shift_mm, np.float32)
    points = geometry.axis_centres(element["fixed"].shape[:3], element["spacing"], shift)
    out = dict(element)
    for key in ("moving", "moving_mask"):
        if key in element:
            out[key] = geometry.sample_axes(element[key], points, element["spacing"])
    if "displacement" in element:
        out["displacement"] = element["displacement"] - shift
    if "moving_landmarks" in element:
        out["moving_landmarks"] = element["moving_landmarks"] - shift
    return out


def crop(element: Mapping[str, Any], start: Shape, size: Shape) -> dict[str, Any]:
    """The box of ``size`` voxels from voxel ``start`` (per axis), resampled back to the element's
    shape: the new grid covers the box, so its spacing is ``size * h / shape``; mm values are
    kept (the field's, the landmarks' relative to the box corner)."""
    shape = np.asarray(element["fixed"].shape[:3])
    spacing = np.asarray(element["spacing"], np.float64)
    origin = np.asarray(start) * spacing
    box_spacing = (np.asarray(size) * spacing / shape).astype(np.float32)
    points = geometry.axis_centres(tuple(shape), box_spacing, origin)
    out = dict(element, spacing=box_spacing)
    for key in _VOLUMES:
        if key in element:
            out[key] = geometry.sample_axes(element[key], points, spacing)
    for key in _LANDMARKS:
        if key in element:
            out[key] = (element[key] - origin).astype(np.float32)
    return out


_VOLUMES = ("fixed", "moving", "fixed_mask", "moving_mask", "displacement")
_LANDMARKS = ("fixed_landmarks", "moving_landmarks")


def augment_geometry(element: dict[str, Any], rng: np.random.Generator, flips: bool = False,
                     permutations: bool = False, swaps: bool = False, shift_mm: float = 0.0,
                     crop_fraction: float | None = None) -> dict[str, Any]:
    """One random geometric augmentation of a network-grid element (unbatched, channels last).

    In order: a swap of fixed and moving (probability 1/2), a crop keeping a random box of at
    least ``crop_fraction`` of each axis, a shift of the moving image uniform in ±``shift_mm``
    per axis, a flip of each axis (1/2 each), a random permutation among the axes of equal size
    (the shape must not change). The ground truth (``displacement``, landmarks) follows.
    """
    if swaps and rng.random() < 0.5:
        element = swap(element)
    if crop_fraction is not None:
        shape = np.asarray(element["fixed"].shape[:3])
        size = rng.integers(np.ceil(crop_fraction * shape).astype(int), shape + 1)
        element = crop(element, rng.integers(0, shape - size + 1), size)
    if shift_mm:
        element = shift_moving(element, rng.uniform(-shift_mm, shift_mm, 3))
    if flips:
        for axis in np.nonzero(rng.random(3) < 0.5)[0]:
            element = flip(element, int(axis))
    if permutations:
        shape = element["fixed"].shape[:3]
        orders = [order for order in itertools.permutations(range(3))
                  if all(shape[order[j]] == shape[j] for j in range(3))]
        element = permute(element, orders[rng.integers(len(orders))])
    return element


# --- the dataset ------------------------------------------------------------------------------


def make_dataset(source: Source, shape: Shape, batch_size: int = 1, masks: bool = True,
                 shuffle: bool = True, augment: bool = False, seed: int = 0, repeat: bool = False,
                 num_labels: int = NUM_LABELS, *, flips: bool = False, permutations: bool = False,
                 swaps: bool = False, shift_mm: float = 0.0, crop_fraction: float | None = None,
                 displacement: bool = False, motion: RandomMotion | None = None) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of batched model inputs from a folder of pairs or a list of pairs
    and scans.

    Elements: ``{"fixed", "moving": (B, D, H, W, 1) raw HU, "spacing": (B, 3) mm}`` plus
    ``"fixed_mask"``/``"moving_mask"`` ``(B, D, H, W, K)`` when ``masks`` and every item has
    labels, and ``"displacement"`` ``(B, D, H, W, 3)`` (mm, ground truth) with ``displacement``.
    Pairs are resampled once and held in memory (that is the cache); batches are prefetched.
    ``augment``: intensity augmentation. Keyword options (all off by default, which keeps the
    element stream of earlier versions): ``flips``, ``permutations``, ``swaps``, ``shift_mm``,
    ``crop_fraction`` as :func:`augment_geometry`, drawn anew for every element every epoch.
    A scan's synthetic pairs are never swapped: each draws its direction (exhale or inhale) itself.
    A scan in the list (``{"image", "spacing"}``) is resampled onto the network grid once and gives
    a new synthetic breathing pair every time it is drawn, with the motion of ``motion`` (a
    :class:`tfmlreg.data.synthetic.RandomMotion`; default ``RandomMotion()``).
    """
    if crop_fraction is not None and not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction: expected a fraction in (0, 1], got {crop_fraction}")
    geometric = dict(flips=flips, permutations=permutations, swaps=swaps, shift_mm=shift_mm,
                     crop_fraction=crop_fraction)
    items = _items(source)
    if not any(geometric.values()) and all("fixed" in item for item in items):
        arrays = grid_arrays(items, shape, masks, num_labels, displacement)
        return _batched(tf.data.Dataset.from_tensor_slices(arrays), len(arrays["fixed"]), batch_size,
                        shuffle, augment, seed, repeat)
    elements = _ElementSource(items, shape, num_labels, displacement, motion, geometric)
    return elements.dataset(masks, displacement, batch_size, shuffle, augment, seed, repeat)


def _batched(data: tf.data.Dataset, count: int, batch_size: int, shuffle: bool, augment: bool,
             seed: int, repeat: bool) -> tf.data.Dataset:
    """The cached path (as in earlier versions): shuffle, repeat, intensity augmentation seeded by
    a per-element counter, batch, prefetch."""
    if shuffle:
        data = data.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        data = data.repeat()
    if augment:
        counter = tf.data.Dataset.counter(start=seed)
        data = tf.data.Dataset.zip((data, counter)).map(
            _augment, num_parallel_calls=tf.data.AUTOTUNE)
    return data.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)


class _ElementSource:
    """Elements made in Python per draw: cached pairs and scans (synthetic breathing), then the
    geometric augmentation; each draw's NumPy generator is seeded from the dataset's seed."""

    def __init__(self, items: Sequence[Mapping[str, Any]], shape: Shape, num_labels: int,
                 displacement: bool, motion: RandomMotion | None,
                 geometric: Mapping[str, Any]) -> None:
        from tfmlreg.data import synthetic  # synthetic imports this module

        self.shape = tuple(int(n) for n in shape)
        self.num_labels, self.geometric = num_labels, geometric
        self.motion = motion if motion is not None else synthetic.RandomMotion()
        pairs = [item for item in items if "fixed" in item]
        self.cached = [_grid_element(pair, shape, num_labels, displacement) for pair in pairs]
        # a scan listed several times (several draws per epoch) is analysed once
        analysed: dict[int, Anatomy] = {}
        self.anatomies = [self._anatomy(item, analysed) for item in items if "fixed" not in item]

    def _anatomy(self, scan: Mapping[str, Any], analysed: dict[int, Anatomy]) -> Anatomy:
        from tfmlreg.data import synthetic

        if id(scan) not in analysed:
            image, spacing = resample_image(scan["image"], scan["spacing"], self.shape)
            analysed[id(scan)] = synthetic.analyse(image, spacing, name=scan.get("name", "scan"))
        return analysed[id(scan)]

    def __len__(self) -> int:
        return len(self.cached) + len(self.anatomies)

    def element(self, index: int, seed: int) -> dict[str, Any]:
        """Item ``index`` drawn with the generator of ``seed``."""
        from tfmlreg.data import synthetic

        rng = np.random.default_rng(int(seed))
        if index < len(self.cached):
            element = self.cached[index]
        else:
            anatomy = self.anatomies[index - len(self.cached)]
            pair, _ = synthetic.random_pair(anatomy, rng, self.motion)
            element = {"fixed": pair["fixed"][..., None], "moving": pair["moving"][..., None],
                       "spacing": pair["spacing"], "displacement": pair["displacement"],
                       "fixed_mask": one_hot(pair["fixed_labels"], self.num_labels),
                       "moving_mask": one_hot(pair["moving_labels"], self.num_labels)}
            # a synthetic pair draws its direction itself: a swap would add nothing but the
            # inversion of its field (costlier than the draw)
            return augment_geometry(element, rng, **dict(self.geometric, swaps=False))
        return augment_geometry(element, rng, **self.geometric)

    def signature(self, masks: bool, displacement: bool) -> dict[str, tuple[int, ...]]:
        """``{key: shape}`` of the elements (a scan's pairs have masks and a displacement)."""
        with_masks = [{"fixed_mask": 0, "moving_mask": 0}] * len(self.anatomies)
        keys = _element_keys(self.cached + with_masks, masks, displacement)
        channels = {"fixed": 1, "moving": 1, "fixed_mask": self.num_labels,
                    "moving_mask": self.num_labels, "displacement": 3}
        return {key: (3,) if key == "spacing" else self.shape + (channels[key],) for key in keys}

    def dataset(self, masks: bool, displacement: bool, batch_size: int, shuffle: bool,
                augment: bool, seed: int, repeat: bool) -> tf.data.Dataset:
        """Elements from a Python generator fed by a background thread (:class:`_Producer`).

        The elements are made with TensorFlow (the geometry) in a plain Python thread: TensorFlow
        run from a ``py_function`` inside ``tf.data`` can deadlock (tensorflow/tensorflow#32454),
        while ``from_generator`` only waits on a queue here. Epoch ``e`` visits the items in an
        order and with per-element seeds drawn from ``(seed, e)``: same seed, same stream.
        """
        count = len(self)
        signature = self.signature(masks, displacement)
        epochs = itertools.count()

        def make(index: int, element_seed: int) -> tuple[dict[str, Array], int]:
            element = self.element(index, element_seed)
            return {key: np.asarray(element[key], np.float32) for key in signature}, element_seed

        def epoch() -> Iterator[Any]:
            rng = np.random.default_rng([seed, next(epochs)])
            order = rng.permutation(count) if shuffle else np.arange(count)
            seeds = rng.integers(0, 2**62, count)
            producer = _Producer([(make, int(i), int(s)) for i, s in zip(order, seeds)])
            try:
                yield from producer
            finally:
                producer.stop()

        output = ({key: tf.TensorSpec(shape, tf.float32) for key, shape in signature.items()},
                  tf.TensorSpec((), tf.int64))
        data = tf.data.Dataset.from_generator(epoch, output_signature=output)
        # the epoch's length, so Keras need not run out of data to learn it (and warn)
        data = data.apply(tf.data.experimental.assert_cardinality(count))
        if repeat:
            data = data.repeat()
        data = data.map(_augment if augment else (lambda element, _: element),
                        num_parallel_calls=tf.data.AUTOTUNE)
        return data.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)


class _Producer:
    """Runs ``function(*args)`` for each job in a daemon thread, a few ahead of the consumer;
    iterating yields the results in order (an error is raised where its result would be)."""

    def __init__(self, jobs: Iterable[Sequence[Any]], ahead: int = 2) -> None:
        self._results: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=ahead)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(jobs,), daemon=True)
        self._thread.start()

    def _run(self, jobs: Iterable[Sequence[Any]]) -> None:
        for function, *args in jobs:
            try:
                result = (True, function(*args))
            except Exception as error:  # noqa: BLE001  handed to the consumer
                result = (False, error)
            if not self._put(result) or not result[0]:
                return
        self._put((True, _DONE))

    def _put(self, result: tuple[bool, Any]) -> bool:
        """Queue ``result`` unless the consumer stops first; True when queued."""
        while not self._stopped.is_set():
            try:
                self._results.put(result, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while True:
            ok, result = self._results.get()
            if not ok:
                raise result
            if result is _DONE:
                return
            yield result

    def stop(self) -> None:
        self._stopped.set()


_DONE = object()
