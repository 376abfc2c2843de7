"""FedAvg's contract for a train reply, as securemark_mod checks it: one ArrayRecord with the arrays sent (same
names, shapes, finite values), one MetricRecord with the example count (a whole number >= 1); and the round's
quantization as a masked train message states it. Pure reading: no state, no keys."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from securemark.errors import SecureMarkError
from securemark.flower import wire
from securemark.secagg import protocol as P
from securemark.secagg.quantize import QuantConfig, QuantizationError


class ContractError(SecureMarkError, ValueError):
    """The train function's reply breaks FedAvg's contract (one ArrayRecord with the keys sent, a MetricRecord
    with the example count), or a securemark message is malformed."""


COUNT_KEY = "num-examples"  # FedAvg's example count: masked, never sent in clear


def whole_number(value: object) -> bool:
    """A metric that could be a count: an integer, a float with no fraction, or a list holding one."""
    if isinstance(value, list):
        return any(whole_number(v) for v in value)
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def quantization(head: ConfigRecord, sizes: list[int]) -> QuantConfig:
    """The round's quantization as sent: one range per floating tensor of the update (``secagg.ranges``)."""
    ranges = head["ranges"]
    if not isinstance(ranges, list) or len(ranges) != len(sizes):
        raise P.ProtocolViolation(f"the round's quantization must give one range for each of {len(sizes)} tensors")
    if not all(isinstance(r, float) for r in ranges):
        raise P.ProtocolViolation("the round's quantization ranges must be floating-point numbers")
    try:
        parts = tuple(zip(sizes, (float(r) for r in ranges), strict=True))
        return QuantConfig.of_parts(parts, int(head["bits"]), int(head["max-weight"]), int(head["max-clients"]))
    except (QuantizationError, TypeError, ValueError, OverflowError) as exc:
        raise P.ProtocolViolation(f"the round's quantization is malformed: {exc}") from None


def contract(
    before: dict[str, np.ndarray], reply: RecordDict, weight_key: str
) -> tuple[np.ndarray, int, str, MetricRecord]:
    """Check a train reply against FedAvg's contract; return (the update relative to ``before``, flat float64 in
    ``wire.float_keys`` order; its weight; the MetricRecord's key; the other metrics)."""
    returned = only(reply.array_records, "the train function's reply", "ArrayRecord")
    after = wire.arrays_of(returned)
    if before.keys() != after.keys():
        missing, extra = sorted(before.keys() - after.keys()), sorted(after.keys() - before.keys())
        raise ContractError(f"the reply's arrays differ from those sent: missing {missing[:5]}, extra {extra[:5]}")
    for k, a in before.items():
        if after[k].shape != a.shape:
            raise ContractError(f"array {k!r} came back with shape {after[k].shape}, sent {a.shape}")
        if wire.is_float(a) and not np.isfinite(after[k]).all():
            raise ContractError(f"array {k!r} holds NaN or infinite values; refusing to send an update")
    metrics_key, record = only(reply.metric_records, "the train function's reply", "MetricRecord", with_key=True)
    if weight_key not in record:
        raise ContractError(f"the reply's MetricRecord has no {weight_key!r}: the update's weight (example count)")
    weight = record[weight_key]
    whole = isinstance(weight, int) or (isinstance(weight, float) and math.isfinite(weight) and weight.is_integer())
    if isinstance(weight, bool) or not whole or weight < 1:
        raise ContractError(f"{weight_key!r} must be a whole number >= 1")  # its value is secret
    names = wire.float_keys(before)
    delta = wire.difference(after, before, names)
    others = MetricRecord({k: v for k, v in record.items() if k != weight_key})
    return delta, int(weight), metrics_key, others


def only(records: dict, where: str, kind: str, with_key: bool = False):  # type: ignore[no-untyped-def]
    if len(records) != 1:
        raise ContractError(f"{where} must hold exactly one {kind} (FedAvg's contract), found {len(records)}")
    key, value = next(iter(records.items()))
    return (key, value) if with_key else value
