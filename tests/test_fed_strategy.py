"""The federation strategy with hand-made Flower messages: validation, FedAvg means, round log."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from nephrolith.server.roundlog import RoundLog, load_state, read_events
from nephrolith.server.strategy import (
    expected_layout,
    make_strategy,
    validate_train_reply,
    weighted_metrics,
)

GLOBAL = [np.zeros((2, 3), np.float32), np.zeros((4,), np.float32)]


def _metadata(src: int, dst: int, message_id: str, reply_to: str = "") -> Metadata:
    return Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )


def _sent(node: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord(GLOBAL), "config": ConfigRecord({})})
    return Message(content=content, metadata=_metadata(0, node, f"sent-{node}"))


def _reply(
    node: int, arrays: list[np.ndarray], examples: float, site: str, loss: float = 1.0
) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(arrays),
            "metrics": MetricRecord({"num-examples": examples, "train-loss": loss}),
            "site": ConfigRecord({"site-id": site, "warnings": ""}),
        }
    )
    return Message(content=content, metadata=_metadata(node, 0, f"reply-{node}", f"sent-{node}"))


def _error(node: int, reason: str) -> Message:
    # Flower fills placeholder node ids into some error replies; the strategy must map
    # them back to the node it sent to through reply_to_message_id.
    return Message(
        error=Error(code=0, reason=reason),
        metadata=_metadata(1, 0, f"reply-{node}", f"sent-{node}"),
    )


@pytest.fixture
def strategy(tmp_path):
    log = RoundLog(tmp_path / "rounds.jsonl")
    strat = make_strategy("fedavg", log, min_clients=1, dump_dir=tmp_path / "replies")
    strat._expected = expected_layout(ArrayRecord(GLOBAL))
    strat._sent_messages = [_sent(n) for n in (11, 12, 13, 14, 15)]
    return strat


def test_fedavg_mean_excludes_invalid_and_failed_replies(strategy, tmp_path):
    # Prepare: two good sites, one NaN update, one wrong shape, one failed node.
    a = [np.full((2, 3), 1.0, np.float32), np.arange(4, dtype=np.float32)]
    b = [np.full((2, 3), 4.0, np.float32), np.full((4,), 10.0, np.float32)]
    nan = [np.full((2, 3), np.nan, np.float32), np.zeros(4, np.float32)]
    wrong = [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)]
    replies = [
        _reply(11, a, 30, "alpha", loss=2.0),
        _reply(12, b, 10, "beta", loss=1.0),
        _reply(13, nan, 1000, "gamma"),
        _reply(14, wrong, 1000, "delta"),
        _error(15, "Node Unavailable"),
    ]

    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)

    # Assert: the mean is (30 * a + 10 * b) / 40, computed here by hand.
    got = arrays.to_numpy_ndarrays()
    np.testing.assert_allclose(got[0], np.full((2, 3), (30 * 1.0 + 10 * 4.0) / 40))
    np.testing.assert_allclose(got[1], (30 * np.arange(4) + 10 * 10.0) / 40)
    assert metrics["train-loss"] == pytest.approx((30 * 2.0 + 10 * 1.0) / 40)
    assert metrics["num-examples"] == 40

    events, _ = read_events(tmp_path / "rounds.jsonl")
    rejected = {e["site"]: e["reason"] for e in events if e["event"] == "train_rejected"}
    assert set(rejected) == {"gamma", "delta"}
    assert "6 NaN or infinite values" in rejected["gamma"]
    assert "expected shape (2, 3), got (3, 2)" in rejected["delta"]
    failures = [e for e in events if e["event"] == "train_failure"]
    assert [(e["site"], e["reason"]) for e in failures] == [("node-15", "Node Unavailable")]
    aggregated = [e for e in events if e["event"] == "train_aggregated"][0]
    assert sorted(aggregated["participants"]) == ["alpha", "beta"]

    # The dumped replies are what was aggregated (used by the process-level test).
    dumped = np.load(tmp_path / "replies" / "round-001" / "alpha.npz")
    np.testing.assert_array_equal(dumped["w0"], a[0])
    assert float(dumped["num_examples"]) == 30


def test_all_replies_invalid_keeps_global_model(strategy, tmp_path):
    nan = [np.full((2, 3), np.inf, np.float32), np.zeros(4, np.float32)]
    strategy._sent_messages = [_sent(11)]
    arrays, _ = strategy.aggregate_train(1, [_reply(11, nan, 5, "alpha")])
    assert arrays is None
    state = load_state(tmp_path / "rounds.jsonl")
    assert state.rounds[1].failures == [("alpha", "array 0: 6 NaN or infinite values")]


@pytest.mark.parametrize(
    ("arrays", "examples", "reason"),
    [
        ([np.zeros((2, 3), np.float32)], 5, "expected 2 arrays"),
        ([np.zeros((2, 3), np.float64), np.zeros(4, np.float32)], 5, "expected dtype float32"),
        ([np.zeros((2, 3), np.float32), np.zeros(4, np.float32)], 0, "must be a positive number"),
        ([np.zeros((2, 3), np.float32), np.zeros(4, np.float32)], float("nan"), "positive number"),
    ],
)
def test_validate_train_reply_reasons(arrays, examples, reason):
    content = _reply(11, arrays, examples, "x").content
    assert reason in validate_train_reply(content, expected_layout(ArrayRecord(GLOBAL)))


def test_weighted_metrics_skip_nan_per_metric():
    # A site with a single-class validation split reports AUC NaN; its loss still counts.
    records = [
        RecordDict({"m": MetricRecord({"num-examples": 10, "val-auc": 0.8, "val-loss": 1.0})}),
        RecordDict(
            {"m": MetricRecord({"num-examples": 30, "val-auc": float("nan"), "val-loss": 3.0})}
        ),
        RecordDict({"m": MetricRecord({"num-examples": 0, "val-auc": 0.1, "val-loss": 9.0})}),
    ]
    result = weighted_metrics(records, "num-examples")
    assert result["val-auc"] == pytest.approx(0.8)
    assert result["val-loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)
    assert result["num-examples"] == 40
    only_nan = weighted_metrics(records[1:2], "num-examples")
    assert math.isnan(only_nan["val-auc"])


def test_round_log_is_strict_json_and_tail_safe(tmp_path):
    path = tmp_path / "rounds.jsonl"
    log = RoundLog(path)
    log.write("evaluate_aggregated", round=1, metrics={"val-auc": float("nan")})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"event": "round_end", "rou')  # a line still being written
    events, offset = read_events(path)
    assert events[0]["metrics"] == {"val-auc": None}
    assert len(events) == 1
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('nd": 1, "time": 5.0}\n')
    more, _ = read_events(path, offset)
    assert more == [{"event": "round_end", "round": 1, "time": 5.0}]
    for line in path.read_text().splitlines():
        json.loads(line)
