"""gRPC client for a registration model behind TensorFlow Serving (see ``serving/README.md``).

    from tfmlreg.serving import RegistrationClient
    with RegistrationClient("gpu-host:8500", model_name="chest_ct") as client:
        client.grid()  # (64, 64, 64): the served model's grid, from TF Serving's model metadata
        out = client.register(fixed, moving, spacing=(5.0, 5.0, 5.0))
    out["displacement"]  # (D, H, W, 3) mm;  out["warped"]  # (D, H, W)

Images must already be on the exported model's grid (64³ for the shipped ``chest_ct``; to register
scans of any size, use :class:`tfmlreg.inference.RemotePredictor` with
:func:`tfmlreg.inference.register_pair`, see ``serving/README.md``); the server answers a wrong size
with INVALID_ARGUMENT naming the expected shape (likewise an empty batch or NaN values, naming the
input), raised here as a one-line :class:`ServingError`; an unreachable or too slow server as a
one-line ``ConnectionError``.
Needs ``grpcio`` and ``tensorflow-serving-api`` (``pip install --no-deps`` the latter: it would
otherwise pull the full ``tensorflow`` wheel over ``tensorflow-cpu``).
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
import numpy as np
import tensorflow as tf
from numpy.typing import ArrayLike
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from tfmlreg import geometry
from tfmlreg.interface import OUTPUTS, SIGNATURE
from tfmlreg.types import Array, Spacing

DEFAULT_MODEL_NAME = "chest_ct"  # the default shipped model (tfmlreg.models), as in serving/models.config
# A 160³ float32 pair is ~33 MB and its reply ~65 MB, far over gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
# The server is unreachable or too slow: the caller may retry elsewhere, hence ConnectionError.
CONNECTION_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class ServingError(RuntimeError):
    """TF Serving answered with an error (or an unusable reply); the message is one line."""


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC options raising the send and receive limits (use them on test servers too)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class RegistrationClient:
    """Calls the ``Predict`` RPC of TF Serving with ``fixed``, ``moving`` and ``spacing``.

    ``timeout`` is the deadline of one request in seconds (generous: the first request after a
    model load is slow when the export has no warm-up records). ``version`` pins a model
    version; by default the server's latest is used.
    """

    def __init__(self, address: str = "localhost:8500", model_name: str = DEFAULT_MODEL_NAME,
                 signature: str = SIGNATURE, timeout: float = 60.0, version: int | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.address, self.model_name, self.signature = address, model_name, signature
        self.timeout, self.version = timeout, version
        self._channel = grpc.insecure_channel(address, options=channel_options(max_message_bytes))
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def register(self, fixed: ArrayLike, moving: ArrayLike,
                 spacing: Spacing = 1.0) -> dict[str, Array]:
        """Register ``moving`` to ``fixed``; returns NumPy ``{"displacement", "warped"}``.

        ``fixed`` and ``moving`` are one image ``(D, H, W)`` / ``(D, H, W, 1)`` or a batch
        ``(B, D, H, W, 1)``; ``spacing`` is a scalar, ``(3,)`` or ``(B, 3)`` in mm. The outputs
        follow the input layout: ``displacement`` ``([B,] D, H, W, 3)`` mm, ``warped`` shaped like
        ``moving``.
        """
        fixed_batch, layout = as_batch(fixed, "fixed")
        moving_batch, _ = as_batch(moving, "moving")
        if moving_batch.shape != fixed_batch.shape:
            raise ValueError(
                f"moving: expected the shape of fixed {fixed_batch.shape}, got {moving_batch.shape}"
            )
        inputs = {
            "fixed": fixed_batch,
            "moving": moving_batch,
            "spacing": geometry.check_spacing(spacing, "spacing",
                                              batch_size=fixed_batch.shape[0]).astype(np.float32),
        }
        outputs = self.predict(inputs)
        if layout == "batch":
            return outputs
        return {
            "displacement": outputs["displacement"][0],
            "warped": outputs["warped"][0].reshape(np.shape(moving)),
        }

    def grid(self) -> tuple[int, ...]:
        """The served model's grid ``(D, H, W)``, read from the input ``fixed`` of its signature
        (TF Serving's ``GetModelMetadata``, no inference run)."""
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = self.model_name
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        request.metadata_field.append("signature_def")
        try:
            response = self._stub.GetModelMetadata(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None
        signatures = get_model_metadata_pb2.SignatureDefMap()
        if "signature_def" not in response.metadata or not response.metadata[
                "signature_def"].Unpack(signatures):
            raise ServingError(f"TF Serving at {self.address}: model {self.model_name!r} sent no "
                               "signature metadata")
        where = f"TF Serving at {self.address}: model {self.model_name!r} signature {self.signature!r}"
        if self.signature not in signatures.signature_def:
            raise ServingError(f"{where}: not served (signatures: "
                               f"{', '.join(sorted(signatures.signature_def)) or 'none'})")
        inputs = signatures.signature_def[self.signature].inputs
        dims = [dim.size for dim in inputs["fixed"].tensor_shape.dim] if "fixed" in inputs else []
        if len(dims) != 5 or min(dims[1:4]) < 1:
            raise ServingError(f"{where}: input 'fixed' of shape {dims or 'unknown'} is not "
                               "(B, D, H, W, 1) with a fixed grid; is it a tfmlreg export?")
        return tuple(int(n) for n in dims[1:4])

    def predict(self, inputs: Mapping[str, ArrayLike]) -> dict[str, Array]:
        """One ``Predict`` call: dict of NumPy arrays in, ``{"displacement", "warped"}`` out."""
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = self.signature
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        try:
            response = self._stub.Predict(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None
        missing = set(OUTPUTS) - set(response.outputs)
        if missing:
            raise ServingError(
                f"TF Serving at {self.address}: model {self.model_name!r} signature "
                f"{self.signature!r} returned no {sorted(missing)}; is it a tfmlreg export?"
            )
        return {name: tf.make_ndarray(response.outputs[name]) for name in OUTPUTS}

    def _error(self, error: grpc.RpcError) -> Exception:
        """A one-line exception naming the server, the model and gRPC's reason."""
        details = next((line for line in (error.details() or "").splitlines() if line.strip()), "")
        message = (
            f"TF Serving at {self.address} (model {self.model_name!r}, signature "
            f"{self.signature!r}): {error.code().name}: {details.strip()}"
        )
        if error.code() in CONNECTION_CODES:
            return ConnectionError(message)
        return ServingError(message)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RegistrationClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def as_batch(image: ArrayLike, name: str) -> tuple[Array, str]:
    """``(B, D, H, W, 1)`` float32 and ``"single"`` or ``"batch"``: how the caller passed it."""
    image = np.asarray(image, np.float32)
    if image.ndim == 3:
        return image[None, ..., None], "single"
    if image.ndim == 4 and image.shape[-1] == 1:
        return image[None], "single"
    if image.ndim == 5 and image.shape[-1] == 1:
        return image, "batch"
    raise ValueError(
        f"{name}: expected (D, H, W), (D, H, W, 1) or (B, D, H, W, 1), got {image.shape}"
    )

