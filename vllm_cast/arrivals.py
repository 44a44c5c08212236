"""The batch size arriving requests will decode at, forecast from the recent arrivals.

A wave of requests whose prompts exceed a step's token budget reaches the runner over
several steps (vLLM's chunked prefill): sum's 1.4k-token prompts at B=8 arrive one to three
per 4096-token step, so the first steps hold 1-7 requests. Judged at those partial batch
sizes, where speculation had no measured verdict (or it had gone stale,
vllm_cast.throughput), the first chunks were drafted: the draft's first pass over up to
4096 prompt rows, 75-170 ms where vanilla decodes the cell in 1.6 s. A few steps later the
batch reached the size at which speculating had measured slower and the requests were not
drafted after all: sum read 0.86-0.89x of vanilla at T=1 from B=4 up, all plain, where the
other tasks read 0.96-1.00x.

Requests are arriving from the step that schedules the first of them until every one's
prompt is computed; the first step after that is where they decode, and its batch size is
kept. A step with arriving requests is judged at the smallest such batch size of the last
``RECENT_ARRIVALS`` arrivals, when that is larger than the step's own: the smallest, since
speculation's gain only shrinks as the batch grows, and recent, so a change to smaller
batches is followed after one arrival. (Kept per request instead, the wave's own first
requests, decoding while the rest still arrived at 3-6, pulled the forecast down within
the wave.)"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

RECENT_ARRIVALS = 4
"""Recent arrivals whose decoding batch size is kept."""


class ArrivalForecast:
    """Tracks arriving requests until they all decode (see module doc)."""

    def __init__(self) -> None:
        self.arriving: set[str] = set()
        """Requests whose prompts were not fully computed as of the last step."""
        self.decode_batch_sizes: deque[int] = deque(maxlen=RECENT_ARRIVALS)
        """Batch sizes of the first steps after the last arrivals at which all of them decoded."""

    def step(self, new_req_ids: Iterable[str], batch_size: int, index_of: dict[str, int],
             computed_tokens: np.ndarray, prompt_tokens: np.ndarray) -> bool:
        """Before a step of ``batch_size`` requests, ``new_req_ids`` new: whether requests are
        arriving (a prompt is not fully computed: ``computed_tokens`` below ``prompt_tokens``,
        per batch row, at the rows ``index_of`` gives; requests not in the batch left)."""
        self.arriving.update(new_req_ids)
        if not self.arriving:
            return False
        self.arriving = {req_id for req_id in self.arriving if (index := index_of.get(req_id)) is not None
                         and computed_tokens[index] < prompt_tokens[index]}
        if self.arriving:
            return True
        self.decode_batch_sizes.append(batch_size)
        return False

    def judged_batch_size(self, batch_size: int, arriving: bool) -> int:
        """The batch size a step of ``batch_size`` requests is judged at: the recent arrivals'
        smallest decoding batch size when requests are arriving and that is larger."""
        if not arriving or not self.decode_batch_sizes:
            return batch_size
        return max(batch_size, min(self.decode_batch_sizes))
