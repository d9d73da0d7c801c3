"""Evaluating the K points of a step: one batched model call, or chunks when memory or the graph asks for it."""
from __future__ import annotations

import logging

import torch

from epd_core.runtime import free_cache, is_oom

log = logging.getLogger("epd")


class PointEvaluator:
    """Denoises K stacked points in one call of batch K*B, point-major (all B samples of point 1, then point 2,
    ...), which is how ComfyUI tiles conditioning. Falls back to chunks of whole points when `max_batch` asks
    for it or the device runs out of memory (remembered for the rest of the run), and to one call per point
    in `sequential` mode (one sigma per call when all samples share a table)."""

    def __init__(self, model, extra_args=None, max_batch: int | None = None, sequential: bool = False):
        self.model = model
        self.extra_args = extra_args or {}
        self.max_batch = max_batch
        self.sequential = sequential
        self.points_per_call: int | None = 1 if sequential else None
        self.calls = 0

    def __call__(self, xs: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """xs (K, B, ...) at sigmas (K,) (one per point) or (K, B) (one per point and sample)."""
        num_points, batch = xs.shape[:2]
        per_call = self.points_per_call or num_points
        if self.max_batch:
            per_call = min(per_call, max(1, self.max_batch // batch))
        while True:
            try:
                return self._run(xs, sigmas, per_call)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, everything else re-raised
                if not is_oom(e) or per_call == 1:
                    raise
                per_call = max(1, per_call // 2)
                self.points_per_call = per_call
                free_cache(xs.device)
                log.warning("EPD: out of memory on the batch of %d points; retrying %d point(s) per call for "
                            "the rest of this run", num_points, per_call)

    def _run(self, xs, sigmas, per_call):
        num_points, batch = xs.shape[:2]
        outs = []
        for start in range(0, num_points, per_call):
            chunk = xs[start:start + per_call]
            n = chunk.shape[0]
            sig = sigmas[start:start + n].to(xs.dtype).reshape(n, -1).expand(n, batch).reshape(-1)
            out = self.model(chunk.reshape(n * batch, *xs.shape[2:]), sig, **self.extra_args)
            self.calls += 1
            outs.append(out.reshape(chunk.shape))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
