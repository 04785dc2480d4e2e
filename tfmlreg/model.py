"""The multilevel registration model (the paper's Algorithm 1) as one ``keras.Model``.

Level 1 is the network input grid, level ``L`` the coarsest. On level ``l`` the moving image is
warped by the composition ``Y_l`` of all coarser deformations, prolongated to level ``l``; the
level's U-Net sees ``(M_l(Y_l), F_l)`` and returns ``y_l``, and the new total is ``Y_l ∘ y_l``:
the finer correction is applied first (innermost), because the network registers ``F_l`` to the
already-warped image ``M_l(Y_l)``, i.e. ``F_l(x) ≈ M_l(Y_l(y_l(x)))``. (The paper writes the
composition as ``y_1 ∘ ... ∘ y_L``; read with ``(a ∘ b)(x) = a(b(x))`` and pull-back warping,
the order that matches its Algorithm 1 is ``y_L ∘ ... ∘ y_1``.)

Training happens one level at a time (``active_level``): the finer levels are not computed, the
coarser ones are frozen, and the loss of eq. 2 is taken on the active level's grid, on the total
displacement of that level (as in conventional multilevel schemes the regulariser acts on the
whole deformation ``y``, not only the level's increment).

The geometry steps (warp, compose, prolongation) are the XLA-compiled ones of
:mod:`tfmlreg.layers` on the TensorFlow backend; the U-Nets run on oneDNN. For inference and
export, :meth:`MultilevelRegistration.for_inference` gives a copy with the networks in a chosen
precision (geometry stays float32) and a batch normalisation folded into the convolutions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
from keras import ops

from tfmlreg import geometry, layers, losses
from tfmlreg.ct import HU_WINDOW as DEFAULT_WINDOW  # the model's default (refinement's too)
from tfmlreg.layers import IntensityWindow, serializable
from tfmlreg.networks import BATCHNORM_MOMENTUM, copy_weights, required_divisor, unet
from tfmlreg.types import Shape, Tensor

LOSS_TERMS = ("ngf", "curvature", "mask", "supervised")
# network precision -> the U-Nets' Keras dtype policy (None: the global policy)
PRECISIONS = {None: None, "float32": "float32", "bfloat16": "mixed_bfloat16",
              "float16": "mixed_float16"}


def _inference_normalization(normalization: str) -> str:
    """The normalisation of a model's inference copy: a batch normalisation is folded."""
    return "none" if normalization == "batch" else normalization


@serializable
class MultilevelRegistration(keras.Model):
    """mlVIRNET: one U-Net per level, coarse to fine; ``levels=1`` is the single-level baseline.

    Inputs: a dict ``{"fixed", "moving": (B, D, H, W, 1) raw intensities, "spacing": (B, 3) mm}``,
    plus optional one-hot ``"fixed_mask"`` / ``"moving_mask"`` ``(B, D, H, W, K)`` (labels 1..K)
    used by the training loss only. Outputs: a dict with ``"displacement"`` (mm, finest grid),
    ``"warped"`` (the moving image in its raw intensities) and ``"displacement_level{l}"`` (the
    total displacement on level ``l``'s grid, mm) for every computed level.

    ``alpha``, ``beta`` and ``epsilon`` weigh the loss ``NGF + α·S + β/2·mask`` (eq. 2); ``epsilon``
    is in normalised intensity per mm (the window maps to [0, 1]). The defaults (1, 1, 0.01) were
    chosen on the phantoms by validation landmark error (docs/DEMO_MODEL.md).

    ``gamma`` > 0 adds ``γ·mean_x |u - u_true|²`` (mm²) when the data carry the ground-truth
    ``"displacement"`` (synthetic pairs and phantoms do): the paper's loss is unsupervised
    (``gamma=0``, the default); with exact ground truth the supervised term teaches registration
    in far fewer steps (as RegNet trains on synthetic motion), and NGF keeps the images aligned.

    ``precision`` (None: the global policy, or ``"float32"``, ``"bfloat16"``, ``"float16"``) is
    the U-Nets' compute precision. ``normalization`` is the U-Nets' (:mod:`tfmlreg.networks`:
    ``"instance"``, ``"batch"`` or ``"none"``); :meth:`for_inference` folds a batch
    normalisation into a ``"none"`` copy. A saved config from before ``normalization`` existed
    loads as it was: ``"batch"``, or ``"none"`` for a folded copy (``batchnorm=False``).
    """

    def __init__(self, shape: Shape, levels: int = 3, base_filters: int = 16, depth: int = 3,
                 convs_per_block: int = 2,
                 intensity_window: Sequence[float] = DEFAULT_WINDOW, alpha: float = 1.0,
                 beta: float = 1.0, epsilon: float = 0.01, gamma: float = 0.0,
                 batchnorm_momentum: float = BATCHNORM_MOMENTUM, active_level: int = 1,
                 precision: str | None = None, normalization: str = "instance",
                 **kwargs: Any) -> None:
        trainable_levels = kwargs.pop("trainable_levels", None)  # as get_config saved them
        super().__init__(**kwargs)
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of float32, bfloat16, float16, got {precision!r}")
        self.precision, self.normalization = precision, normalization
        self.shape = geometry.check_divisible(
            shape, 2 ** (levels - 1) * required_divisor(depth), "shape"
        )
        self.levels = int(levels)
        self.base_filters, self.depth, self.convs_per_block = base_filters, depth, convs_per_block
        self.batchnorm_momentum = float(batchnorm_momentum)
        self.alpha, self.beta, self.epsilon = float(alpha), float(beta), float(epsilon)
        if not float(gamma) >= 0.0:
            raise ValueError(f"gamma: expected a weight >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.normalise = IntensityWindow(intensity_window, name="intensity_window")
        self.nets = [
            unet(geometry.level_shape(self.shape, level) + (2,), base_filters, depth,
                 convs_per_block, batchnorm_momentum=self.batchnorm_momentum,
                 name=f"unet_level{level}", normalization=self.normalization,
                 dtype=PRECISIONS[precision])
            for level in range(1, self.levels + 1)
        ]
        # the supervised term is logged only by models that use it
        self.trackers = {term: keras.metrics.Mean(name=term) for term in LOSS_TERMS
                         if term != "supervised" or self.gamma > 0.0}
        # A fresh model trains all levels jointly (end to end, loss on the active level);
        # fit_progressive freezes the coarser levels stage by stage, as the paper does.
        self.active_level = self._check_level(active_level)
        if trainable_levels is not None:  # so a loaded optimizer's state matches what it trains
            for index, net in enumerate(self.nets, start=1):
                net.trainable = index in trainable_levels
        self.built = True

    # --- levels -------------------------------------------------------------------------------

    def net(self, level: int) -> keras.Model:
        """The U-Net of ``level`` (1 = finest)."""
        return self.nets[level - 1]

    def _check_level(self, level: int) -> int:
        if not 1 <= int(level) <= self.levels:
            raise ValueError(f"active_level: expected 1..{self.levels}, got {level}")
        return int(level)

    def set_active_level(self, level: int) -> None:
        """Compute levels ``L..level`` and freeze all but ``level``'s network. Recompile after."""
        self.active_level = self._check_level(level)
        for index, net in enumerate(self.nets, start=1):
            net.trainable = index == level

    def level_spacing(self, spacing: Tensor, level: int) -> Tensor:
        return spacing * float(2 ** (level - 1))

    # --- inference ----------------------------------------------------------------------------

    def for_inference(self, precision: str | None = "float32") -> MultilevelRegistration:
        """A copy for inference and export: the U-Nets in ``precision``, a batch normalisation
        folded into the convolutions (the same output to float32 rounding); see
        :meth:`load_inference_weights`."""
        config = {**self.get_config(), "precision": precision,
                  "normalization": _inference_normalization(self.normalization)}
        config.pop("name", None)
        copy = MultilevelRegistration(**config)
        return copy.load_inference_weights(self)

    def load_inference_weights(self, source: MultilevelRegistration) -> MultilevelRegistration:
        """Set this inference copy's weights from ``source``, the trainable model it was made
        from (:func:`tfmlreg.networks.copy_weights`: folded when this copy is)."""
        if _inference_normalization(source.normalization) != self.normalization:
            raise ValueError(f"source: a {source.normalization!r}-normalised model cannot give "
                             f"a {self.normalization!r} copy its weights")
        for mine, theirs in zip(self.nets, source.nets):
            copy_weights(theirs, mine)
        return self

    # --- forward ------------------------------------------------------------------------------

    def __call__(self, inputs: Mapping[str, Tensor], *args: Any,
                 **kwargs: Any) -> dict[str, Tensor]:
        # before Keras' call machinery, so a wrong structure is one line, not a KeyError inside
        if not (isinstance(inputs, dict) and {"fixed", "moving", "spacing"} <= set(inputs)):
            got = (f"a dict with keys {sorted(inputs)}" if isinstance(inputs, dict) else
                   f"a {type(inputs).__name__} of {len(inputs)} items"
                   if isinstance(inputs, (list, tuple)) else "a single array")
            raise ValueError("inputs: expected a dict {'fixed': ..., 'moving': ..., 'spacing': "
                             "...} (plus optional masks), got " + got)
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs: Mapping[str, Tensor], training: bool | None = None) -> dict[str, Tensor]:
        fixed, moving = inputs["fixed"], inputs["moving"]
        spacing = geometry.as_spacing(inputs["spacing"], ops.shape(fixed)[0])
        fixed_levels = geometry.pyramid(self.normalise(fixed), self.levels)
        moving_levels = geometry.pyramid(self.normalise(moving), self.levels)
        outputs = {}
        total = None
        for level in range(self.levels, self.active_level - 1, -1):
            total = self._refine(level, total, fixed_levels, moving_levels, spacing, training)
            outputs[f"displacement_level{level}"] = total
        displacement = layers.resample_displacement(
            total, self.level_spacing(spacing, self.active_level), self.shape
        )
        outputs["displacement"] = displacement
        outputs["warped"] = layers.warp(moving, displacement, spacing, self.normalise.window[0])
        return outputs

    def _refine(self, level: int, coarse_total: Tensor | None, fixed_levels: Sequence[Tensor],
                moving_levels: Sequence[Tensor], spacing: Tensor, training: bool | None) -> Tensor:
        """One step of Algorithm 1: warp ``M_l`` by the prolongated coarse total, run the level's net."""
        level_spacing = self.level_spacing(spacing, level)
        level_dims = geometry.level_shape(self.shape, level)
        moving = moving_levels[level - 1]
        if coarse_total is not None:
            coarse_total = layers.resample_displacement(
                coarse_total, self.level_spacing(spacing, level + 1), level_dims
            )
            moving = layers.warp(moving, coarse_total, level_spacing)
        pair = ops.concatenate([moving, fixed_levels[level - 1]], axis=-1)
        increment = ops.cast(self.net(level)(pair, training=training), "float32")
        increment = increment * level_spacing[:, None, None, None, :]
        if coarse_total is None:
            return increment
        return layers.compose(coarse_total, increment, level_spacing)

    # --- training -----------------------------------------------------------------------------

    def compute_loss(self, x: Any = None, y: Any = None, y_pred: Any = None,
                     sample_weight: Any = None, training: bool = True) -> Tensor:
        """Eq. 2 on the active level's grid; ``y`` is unused (unsupervised + masks from ``x``)."""
        terms = self.loss_terms(x, y_pred)
        for name in LOSS_TERMS:
            if name in terms:  # "mask", "supervised" only when the data carry masks, ground truth
                self.trackers[name].update_state(terms[name])
        loss = ops.mean(terms["loss"])
        extra = self.losses
        return loss + ops.sum(extra) if extra else loss

    def loss_terms(self, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-sample ``{"loss", "ngf", "curvature", "mask"[, "supervised"]}`` on the active level:
        eq. 2, plus ``gamma`` times the supervised term when ``inputs`` has ``"displacement"``."""
        level = self.active_level
        spacing = self.level_spacing(
            geometry.as_spacing(inputs["spacing"], ops.shape(inputs["fixed"])[0]), level
        )
        total = outputs[f"displacement_level{level}"]
        fixed = self._at_level(self.normalise(inputs["fixed"]), level)
        warped = layers.warp(self._at_level(self.normalise(inputs["moving"]), level), total, spacing)
        masks = {}
        if "fixed_mask" in inputs and "moving_mask" in inputs:
            masks["fixed_onehot"] = self._at_level(inputs["fixed_mask"], level)
            masks["warped_onehot"] = layers.warp(
                self._at_level(inputs["moving_mask"], level), total, spacing
            )
        terms = losses.registration_loss_terms(
            fixed, warped, total, spacing, self.alpha, self.beta, self.epsilon, **masks
        )
        if self.gamma > 0.0 and "displacement" in inputs:
            truth = self._at_level(ops.cast(inputs["displacement"], "float32"), level)
            terms["supervised"] = losses.displacement_error(total, truth)
            terms["loss"] = terms["loss"] + self.gamma * terms["supervised"]
        return terms

    def _at_level(self, volume: Tensor, level: int) -> Tensor:
        return geometry.pyramid(volume, level)[-1]

    # --- Keras plumbing -----------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> MultilevelRegistration:
        """A saved model. One saved before ``normalization`` existed was batch-normalised, or a
        folded copy when its config has ``batchnorm=False``."""
        if "normalization" not in config:
            legacy = dict(config)
            legacy["normalization"] = "batch" if legacy.pop("batchnorm", True) else "none"
            config = legacy
        return super().from_config(config, custom_objects=custom_objects)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "shape": self.shape, "levels": self.levels, "base_filters": self.base_filters,
            "depth": self.depth, "convs_per_block": self.convs_per_block,
            "batchnorm_momentum": self.batchnorm_momentum,
            "intensity_window": self.normalise.window, "alpha": self.alpha, "beta": self.beta,
            "epsilon": self.epsilon, "gamma": self.gamma, "active_level": self.active_level,
            "trainable_levels": [i for i, net in enumerate(self.nets, start=1) if net.trainable],
            "precision": self.precision, "normalization": self.normalization,
        }
