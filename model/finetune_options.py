"""The knobs of a fine-tune job, apart from the training code: the API validates them where torch
is not installed (a CPU serving replica queues jobs for the trainer)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class FinetuneOptions(BaseModel):
    """Bounded knobs of a fine-tune job (defaults suit a few hundred samples)."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(8, ge=1, le=100)
    learning_rate: float = Field(5e-4, gt=0, le=0.05)
    batch_size: int = Field(64, ge=8, le=512)
    replay_ratio: float = Field(1.0, ge=0, le=10, description="MNIST replay samples per uploaded sample")
    holdout_fraction: float = Field(0.2, ge=0.05, le=0.5, description="share of the upload kept for the gate")
    max_accuracy_drop: float = Field(
        0.005, ge=0, le=0.1, description="allowed MNIST test accuracy drop (0.005 = 0.5 points)"
    )
    holdout_alpha: float = Field(
        0.05, gt=0, le=0.5,
        description="reject when the candidate is worse on the held-out upload at this one-sided significance "
                    "(exact McNemar test on the samples it fixes and breaks)",
    )
    min_holdout_samples: int = Field(
        20, ge=5, le=10_000,
        description="no promotion on fewer held-out samples (with 4 or fewer no test can reject at 0.05)",
    )
    slice_alpha: float = Field(
        0.05, gt=0, le=0.5,
        description="reject when the candidate is worse on any slice of the slice suite at this family-wise "
                    "significance (exact McNemar test per slice, Holm's correction)",
    )
    guard_slices: bool = Field(
        True, description="false: a slice worse beyond chance is reported in the record and the reason but does "
                          "not block the promotion (a deliberate trade, e.g. teaching a new domain)",
    )
    review_alpha: float = Field(
        0.05, gt=0, le=0.5,
        description="shadow evaluation: reject when the candidate is worse than the live model on reviewed "
                    "traffic at this one-sided significance (exact McNemar test); no reviewed items: no block",
    )
    seed: int = Field(0, ge=0)
