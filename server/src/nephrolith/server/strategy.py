"""FedAvg/FedProx with reply validation, the round log and per-site bookkeeping."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from nephrolith.common.constants import NUM_EXAMPLES_KEY
from nephrolith.server.roundlog import RoundLog

logger = logging.getLogger(__name__)

# Record keys of the replies (the ClientApp writes them; see nephrolith.client.flower_app).
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
SITE_KEY = "site"
SITE_ID_KEY = "site-id"
SITE_WARNINGS_KEY = "warnings"

Expected = list[tuple[str, tuple[int, ...], str]]


def expected_layout(arrays: ArrayRecord) -> Expected:
    """Return (key, shape, dtype) of every array of the global model, in order."""
    return [(key, tuple(array.shape), str(array.dtype)) for key, array in arrays.items()]


def _check_weight(metrics: MetricRecord | None) -> str | None:
    if metrics is None or NUM_EXAMPLES_KEY not in metrics:
        return f"no MetricRecord with {NUM_EXAMPLES_KEY!r}"
    count = metrics[NUM_EXAMPLES_KEY]
    if isinstance(count, list) or not math.isfinite(float(count)) or float(count) <= 0:
        return f"{NUM_EXAMPLES_KEY} must be a positive number, got {count!r}"
    return None


def validate_train_reply(content: RecordDict, expected: Expected) -> str | None:
    """Check one train reply against the global model sent in that round.

    Args:
        content: the reply's RecordDict.
        expected: (key, shape, dtype) per array of the global model sent this round.

    Returns:
        None when the reply can be aggregated, else the reason to reject it.
    """
    if len(content.array_records) != 1:
        return f"expected 1 ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected 1 MetricRecord, got {len(content.metric_records)}"
    reason = _check_weight(next(iter(content.metric_records.values())))
    if reason:
        return reason

    arrays = next(iter(content.array_records.values()))
    if list(arrays.keys()) != [key for key, _, _ in expected]:
        return (
            f"expected {len(expected)} arrays with keys 0..{len(expected) - 1}, "
            f"got {len(arrays)} arrays"
        )
    for key, shape, dtype in expected:
        array = arrays[key]
        if tuple(array.shape) != shape:
            return f"array {key}: expected shape {shape}, got {tuple(array.shape)}"
        if str(array.dtype) != dtype:
            return f"array {key}: expected dtype {dtype}, got {array.dtype}"
        values = array.numpy()
        if not np.all(np.isfinite(values)):
            bad = int(values.size - np.count_nonzero(np.isfinite(values)))
            return f"array {key}: {bad} NaN or infinite values"
    return None


def weighted_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Average every numeric metric weighted by `weight_key`, skipping NaN values per metric.

    A site whose validation split has one class reports AUC as NaN; it is left out
    of that metric's mean instead of turning the aggregate into NaN. A metric with no
    finite value (or zero total weight) aggregates to NaN. The weight key itself is
    summed.
    """
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    count_total = 0.0
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        weight = float(metrics.get(weight_key, 0.0))
        count_total += weight
        for key, value in metrics.items():
            if key == weight_key or isinstance(value, list):
                continue
            totals.setdefault(key, 0.0)
            weights.setdefault(key, 0.0)
            if math.isfinite(float(value)) and weight > 0:
                totals[key] += weight * float(value)
                weights[key] += weight
    result = MetricRecord({weight_key: count_total})
    for key in totals:
        result[key] = totals[key] / weights[key] if weights[key] > 0 else float("nan")
    return result


def _metrics_dict(record: MetricRecord | None) -> dict[str, Any]:
    return {} if record is None else {k: v for k, v in record.items()}


class _RoundLogging:
    """Mixin over FedAvg/FedProx that validates replies and writes the round log.

    Attributes:
        sites: node id -> site name, learnt from the replies.
        global_arrays: the aggregated arrays of the last round (None before round 1).
        evaluate_metrics: server round -> aggregated federated evaluation metrics.
        dump_dir: when set, accepted train replies are saved as .npz for audits and tests.
    """

    round_log: RoundLog
    sites: dict[int, str]
    global_arrays: ArrayRecord | None
    evaluate_metrics: dict[int, dict[str, Any]]
    dump_dir: Path | None

    def _init_logging(self, round_log: RoundLog, dump_dir: Path | None) -> None:
        self.round_log = round_log
        self.dump_dir = dump_dir
        self.sites = {}
        self.global_arrays = None
        self.evaluate_metrics = {}
        self._sent: dict[str, int] = {}
        self._expected: Expected = []
        self._round_started = 0.0

    def site_name(self, node_id: int) -> str:
        """Return the site name a node reported, or "node-<id>" before its first reply."""
        return self.sites.get(node_id, f"node-{node_id}")

    def _learn_site(self, msg: Message) -> str:
        record = msg.content.config_records.get(SITE_KEY) if not msg.has_error() else None
        node = msg.metadata.src_node_id
        if record is not None and SITE_ID_KEY in record:
            name = str(record[SITE_ID_KEY])
            if self.sites.get(node) != name:
                self.sites[node] = name
            for warning in filter(None, str(record.get(SITE_WARNINGS_KEY, "")).split("\n")):
                logger.warning("site %s: %s", name, warning)
                self.round_log.write("site_warning", site=name, message=warning)
        return self.site_name(node)

    def _remember_sent(self, messages: Iterable[Message]) -> list[Message]:
        sent = list(messages)
        # The grid sets message ids when it pushes; keep the objects to map replies later.
        self._sent_messages = sent
        return sent

    def _sender(self, msg: Message) -> str:
        """Return the site a reply comes from, found through the message it replies to.

        Error replies may carry a placeholder src_node_id instead of the node's id.
        """
        for sent in getattr(self, "_sent_messages", []):
            if (
                sent.metadata.message_id
                and sent.metadata.message_id == msg.metadata.reply_to_message_id
            ):
                return self.site_name(sent.metadata.dst_node_id)
        return self.site_name(msg.metadata.src_node_id)

    def _missing(self, replies: list[Message]) -> list[str]:
        answered = {m.metadata.reply_to_message_id for m in replies}
        return [
            self.site_name(s.metadata.dst_node_id)
            for s in getattr(self, "_sent_messages", [])
            if s.metadata.message_id and s.metadata.message_id not in answered
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample hospitals, remember the global layout and log the round start."""
        self._round_started = time.time()
        self._expected = expected_layout(arrays)
        messages = self._remember_sent(
            super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]
        )
        nodes = [m.metadata.dst_node_id for m in messages]
        self.round_log.write(
            "round_start",
            round=server_round,
            sampled=[self.site_name(n) for n in nodes],
            connected=len(list(grid.get_node_ids())),
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Reject invalid updates, aggregate the rest and log every reply."""
        replies = list(replies)
        accepted: list[Message] = []
        for msg in replies:
            site = self._learn_site(msg) if not msg.has_error() else self._sender(msg)
            if msg.has_error():
                reason = msg.error.reason
                logger.warning("round %d: %s failed: %s", server_round, site, reason)
                self.round_log.write("train_failure", round=server_round, site=site, reason=reason)
                continue
            reason = validate_train_reply(msg.content, self._expected)
            if reason:
                logger.warning("round %d: update of %s rejected: %s", server_round, site, reason)
                self.round_log.write("train_rejected", round=server_round, site=site, reason=reason)
                continue
            accepted.append(msg)
            metrics = next(iter(msg.content.metric_records.values()))
            arrays = next(iter(msg.content.array_records.values()))
            self.round_log.write(
                "train_reply",
                round=server_round,
                site=site,
                metrics=_metrics_dict(metrics),
                bytes=arrays.count_bytes(),
            )
            self._dump(server_round, site, arrays, metrics)
        for site in self._missing(replies):
            self.round_log.write(
                "train_failure", round=server_round, site=site, reason="no reply before the timeout"
            )

        arrays, metrics = super().aggregate_train(server_round, accepted)  # type: ignore[misc]
        if arrays is not None:
            self.global_arrays = arrays
        self.round_log.write(
            "train_aggregated",
            round=server_round,
            participants=[self.site_name(m.metadata.src_node_id) for m in accepted],
            metrics=_metrics_dict(metrics),
            seconds=round(time.time() - self._round_started, 3),
            updated=arrays is not None,
        )
        if arrays is None:
            logger.error("round %d: no valid update; the global model is unchanged", server_round)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to every connected hospital for validation.

        FedAvg's own sampling waits until `min_available_nodes` are connected, which
        blocks forever after a hospital drops out mid-round. Here evaluation goes to
        the hospitals connected now, and waits only while none is connected.
        """
        node_ids = list(grid.get_node_ids())
        while not node_ids:
            time.sleep(1.0)
            node_ids = list(grid.get_node_ids())
        config["server-round"] = server_round
        record = RecordDict({ARRAYS_KEY: arrays, "config": config})
        messages = self._construct_messages(record, node_ids, MessageType.EVALUATE)  # type: ignore[attr-defined]
        return self._remember_sent(messages)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate validation metrics weighted by example count and log each site."""
        replies = list(replies)
        valid: list[Message] = []
        for msg in replies:
            if msg.has_error():
                site = self._sender(msg)
                self.round_log.write(
                    "evaluate_failure", round=server_round, site=site, reason=msg.error.reason
                )
                continue
            site = self._learn_site(msg)
            metrics = next(iter(msg.content.metric_records.values()), None)
            if metrics is None or NUM_EXAMPLES_KEY not in metrics:
                self.round_log.write(
                    "evaluate_failure",
                    round=server_round,
                    site=site,
                    reason=f"no MetricRecord with {NUM_EXAMPLES_KEY!r}",
                )
                continue
            valid.append(msg)
            self.round_log.write(
                "evaluate_reply", round=server_round, site=site, metrics=_metrics_dict(metrics)
            )
        for site in self._missing(replies):
            self.round_log.write(
                "evaluate_failure",
                round=server_round,
                site=site,
                reason="no reply before the timeout",
            )
        metrics = weighted_metrics([m.content for m in valid], NUM_EXAMPLES_KEY) if valid else None
        self.evaluate_metrics[server_round] = _metrics_dict(metrics)
        self.round_log.write(
            "evaluate_aggregated",
            round=server_round,
            metrics=_metrics_dict(metrics),
            sites=[self.site_name(m.metadata.src_node_id) for m in valid],
        )
        return metrics

    def _dump(
        self, server_round: int, site: str, arrays: ArrayRecord, metrics: MetricRecord
    ) -> None:
        if self.dump_dir is None:
            return
        folder = self.dump_dir / f"round-{server_round:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        payload = {f"w{key}": array.numpy() for key, array in arrays.items()}
        np.savez(folder / f"{site}.npz", num_examples=float(metrics[NUM_EXAMPLES_KEY]), **payload)


class LoggedFedAvg(_RoundLogging, FedAvg):
    """FedAvg (McMahan et al. 2017) with validation, NaN-aware metric means and the round log."""

    def __init__(self, round_log: RoundLog, dump_dir: Path | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", weighted_metrics)
        super().__init__(**kwargs)
        self._init_logging(round_log, dump_dir)


class LoggedFedProx(_RoundLogging, FedProx):
    """FedProx (Li et al. 2020): FedAvg plus "proximal-mu" in every train config."""

    def __init__(self, round_log: RoundLog, dump_dir: Path | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", weighted_metrics)
        super().__init__(**kwargs)
        self._init_logging(round_log, dump_dir)


def make_strategy(
    name: str,
    round_log: RoundLog,
    *,
    proximal_mu: float = 0.0,
    min_clients: int = 2,
    fraction_train: float = 1.0,
    dump_dir: Path | None = None,
) -> LoggedFedAvg | LoggedFedProx:
    """Build the strategy named in FedConfig ("fedavg" or "fedprox").

    Training waits for `min_clients` connected hospitals and samples
    max(fraction_train * connected, min_clients) of them. Evaluation goes to every
    connected hospital and needs only one reply.
    """
    common: dict[str, Any] = dict(
        fraction_train=fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=min_clients,
        min_evaluate_nodes=1,
        min_available_nodes=min_clients,
        dump_dir=dump_dir,
    )
    if name == "fedprox":
        return LoggedFedProx(round_log, proximal_mu=proximal_mu, **common)
    if name == "fedavg":
        return LoggedFedAvg(round_log, **common)
    raise ValueError(f"strategy: expected 'fedavg' or 'fedprox', got {name!r}")
