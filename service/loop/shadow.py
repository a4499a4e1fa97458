"""Shadow evaluation: a fine-tune candidate replayed beside the live model before promotion.

On the ring of recent inputs (``TrafficRing.recent``, unlabelled): how often the two agree and
how the mean confidence shifts. On reviewed items (``ReviewQueue.labelled_items``, labelled by
people), minus those the job itself trained on: the accuracy of both and the exact one-sided
McNemar p-value that the candidate is worse (``model.finetune.worse_p_value``, the gate's own
test). The gate rejects a candidate worse there at ``review_alpha``; with no reviewed items
the report says so and the rule does not block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from model.finetune import correct, worse_p_value
from model.registry import Registry
from model.train import predict_logits
from service.loop.review import ReviewQueue
from service.loop.traffic import TrafficRing


def recent_evidence(registry: Registry, ring_size: int, job_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recent traffic, reviewed images, their labels) from the registry; reviewed items this job
    trained on are left out (a model is not judged on what it learnt)."""
    traffic = TrafficRing(registry, ring_size).recent(ring_size)
    items = [item for item in ReviewQueue(registry).labelled_items() if item.state.job_id != job_id]
    images = np.asarray([item.image for item in items], dtype=np.uint8).reshape(-1, 28, 28)
    return traffic, images, np.asarray([item.state.label for item in items], dtype=np.int64)


def _probabilities(model: nn.Module, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return predict_logits(model, torch.from_numpy(images)).softmax(1)


def replay(live: nn.Module, candidate: nn.Module, traffic: np.ndarray, reviewed: np.ndarray,
           labels: np.ndarray, alpha: float) -> dict[str, Any]:
    """The job record's ``shadow`` section; ``worse`` is what the gate acts on."""
    report: dict[str, Any] = {"traffic_samples": len(traffic), "reviewed_samples": len(reviewed), "alpha": alpha,
                              "worse": False}
    if len(traffic):
        before, after = _probabilities(live, traffic), _probabilities(candidate, traffic)
        confidence_before, confidence_after = float(before.max(1).values.mean()), float(after.max(1).values.mean())
        report.update(agreement=round(float((before.argmax(1) == after.argmax(1)).float().mean()), 4),
                      live_mean_confidence=round(confidence_before, 4),
                      candidate_mean_confidence=round(confidence_after, 4),
                      confidence_shift=round(confidence_after - confidence_before, 4))
    else:
        report["traffic"] = "no recent traffic in the ring: agreement and confidence shift not measured"
    if not len(reviewed):
        report["decision"] = "no reviewed items: the shadow rule does not block"
        return report
    with torch.no_grad():
        live_right = correct(live, torch.from_numpy(reviewed), torch.from_numpy(labels))
        candidate_right = correct(candidate, torch.from_numpy(reviewed), torch.from_numpy(labels))
    fixed = int((candidate_right & ~live_right).sum())
    broken = int((live_right & ~candidate_right).sum())
    p_value = worse_p_value(fixed, broken)
    report.update(live_accuracy=round(float(live_right.float().mean()), 4),
                  candidate_accuracy=round(float(candidate_right.float().mean()), 4),
                  fixed=fixed, broken=broken, p_value=round(p_value, 6), worse=p_value < alpha)
    report["decision"] = (f"worse on reviewed traffic (p = {p_value:.3g} < {alpha})" if report["worse"]
                          else f"not worse on reviewed traffic (p = {p_value:.3g})")
    return report
