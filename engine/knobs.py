"""Runtime knobs: what the tuner searches. Kept apart from the frozen architecture config."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import KnobError

DRAFTERS = ("none", "ngram", "mtp")
MAX_DRAFT_TOKENS = 8  # sliding ring buffers keep window + MAX_DRAFT_TOKENS + 1 slots


@dataclass(frozen=True)
class Knobs:
    """Serving knobs. `sliding_window=None` means the window the model was trained with."""

    sliding_window: int | None = None
    batch_size: int = 1
    draft_tokens: int = 0
    drafter: str = "none"
    centroid_top_k: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, trained_window: int | None, num_centroids: int | None = None) -> None:
        """Raise KnobError naming the knob when a value cannot run on this model."""
        if self.sliding_window is not None:
            if trained_window is None:
                raise KnobError("sliding_window: this model has no sliding-window layers")
            if not 1 <= self.sliding_window <= trained_window:
                raise KnobError(
                    f"sliding_window={self.sliding_window}: must be between 1 and the trained window {trained_window}"
                )
        if self.batch_size < 1:
            raise KnobError(f"batch_size={self.batch_size}: must be at least 1")
        if self.drafter not in DRAFTERS:
            raise KnobError(f"drafter={self.drafter!r}: must be one of {', '.join(DRAFTERS)}")
        if not 0 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise KnobError(
                f"draft_tokens={self.draft_tokens}: must be between 0 and {MAX_DRAFT_TOKENS} (the cache headroom)"
            )
        if self.draft_tokens > 0 and self.drafter == "none":
            raise KnobError(f"draft_tokens={self.draft_tokens} needs a drafter (ngram or mtp)")
        if self.centroid_top_k is not None:
            if num_centroids is None:
                raise KnobError("centroid_top_k: needs the MTP assistant drafter (--drafter mtp --assistant REF)")
            if not 1 <= self.centroid_top_k <= num_centroids:
                raise KnobError(
                    f"centroid_top_k={self.centroid_top_k}: must be between 1 and the assistant's {num_centroids} centroids"
                )
