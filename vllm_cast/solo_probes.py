"""Judging a request that decodes alone on its own drafts.

At batch size 1 a step's speed is one request's, and how far the draft head's guesses run
differs most between requests (code and extractive answers against open chat), so the
pooled verdict of vllm_cast.throughput, formed on earlier requests, says little about the
next one. A request decoding alone is judged on its own instead: its first
``PROBE_STEPS`` drafting steps are probes, top-1 chains as deep as allowed and verified
whole (the most a step can gain if the request is predictable, and the quickest way for the
calibrator to learn its record); it keeps speculating while its own speculative steps,
from its first, measure no fewer tokens per second than plain decoding at batch size 1 and
the request's context (the cost table's plain step there with the measured plain overhead,
as the cohort ledger prices it: plain steps pooled over other requests are other contexts'
and, right after drafting steps, slower than plain decoding's own pace; on the bench pair
they read 8.0-8.7 ms where the priced step was 7.2 ms). Once they measure fewer it is not
drafted (its rows are kept, vllm_cast.dormancy) and, after ``REPROBE_WAIT_STEPS`` plain
steps, probed afresh: judged on the new probes alone, it speculates again or waits twice as
long (up to ``LONGEST_REPROBE_WAIT``). A request whose first probes missed is often
predictable later (greedy B=1, 64 tokens, six tasks, side by side in one process: with
requests undrafted for good after their probes, CAST read 1.17x of vanilla where always
speculating read 1.25x; with re-probes, 1.24x against 1.24x): a response's opening tokens
are its least predictable, and of the greedy bench-pair requests whose two probes were
both rejected at their first node, most drafted 3-5 tokens deep a few steps later.
Where no recent probed request of the mode paid, a request measured slower is not drafted
again at all. Two probes, not one, because a response's first tokens are its least
predictable (one probe at the first decode step lost alpaca requests whose later drafts ran
4-5 tokens deep).

A probe is as deep as the longest run of drafts the recent probes of its verification mode
had accepted, plus ``PROBE_DEPTH_HEADROOM`` (as deep as allowed before any): a probe that
cannot be accepted costs its layers for nothing (sampled verification with this head
accepted none, and its six-node probes cost each request ~20 ms of ~150), and one accepted
whole lets the next probes grow. A request with runs of its own (its earlier probes, or
steps it drafted in a batch of several: ``note_runs``) is probed as deep as the longest of
them, plus the same headroom; once it has been re-probed, as deep as the longest run of
its latest re-probes. At full depth, the re-probes of a greedy MT-Bench request
whose probes were accepted one or two tokens deep cost it 48 ms for 8 tokens (two re-probes
of three steps), where plain decoding takes 20 ms; and a request left alone when the rest
of its batch finished was probed 6 deep at 7-9 ms a step for 1-2 tokens, its drafts in the
batch having been accepted one deep on every step. Going by its longest run ever, such a
request (greedy B=2 GSM8K, its drafts accepted one deep in the batch and never alone) was
re-probed 3 deep every 8-16 steps, 9.2-9.9 ms a probe for no token, where a plain step took
4.4 ms.

The step that verifies a request's last probe knows, before its drafting call, the tokens
it emitted and the seconds it has run: when even those seconds (the step's whole time is
longer) leave its probes slower than plain decoding (``slower`` with ``pending``), it drafts
nothing. Judged only once the step ended, such a request drafted once more (7 ms at greedy
B=1) before its wait began. It also knows how deep the probe it verified was accepted: the
next probe goes by that run (``note_runs`` before its drafting call). Noted only once the
step ended, a request's second probe was drafted before the first's run was noted, as deep
as the mode's runs allowed: of 20 greedy requests on the bench pair (sum's left out), 9 had
their first 5-6-deep probes accepted no token deep, and their second probes were as deep
again.

Probing costs a request its prompt's draft pass and its probe steps. While none of the last
``PROBE_OUTCOMES`` probed requests of a verification mode paid (sampled verification with
this head: rarely), new solo requests are not probed and the pooled verdict rules them,
until the pooled speculative samples go stale (vllm_cast.throughput) and
``REEXAMINED_PROBES`` new requests are probed. Nor is a request probed, or re-probed,
where no chain could pay even at the best first-rank rate among its mode's recent requests
(``CastProposer.speculation_hopeless``): with this head's sampled rates far below what a
chain needs, one probe that emitted 3 tokens in 2 steps counted as paid and kept the next
sampled requests probed and re-probed (bench pair, T=1 B=1, 72 requests side by side in one
process: 0.966x of vanilla, 0.997x without those probes; the ``ci`` pair 0.948x and
0.966x).

A request that arrives alone is not always left alone: clients in step with each other (a
benchmark's waves, fixed-length requests) send a burst whose first request reaches the
engine a step before the rest. Its prompt's draft pass and probe (+10-25 ms on a 7-50 ms
prompt step here) are wasted when the burst makes speculation hopeless at the next step.
While each of the last ``COMPANY_OUTCOMES`` lone arrivals was joined by others at its next
step, a lone arrival's drafting waits a step (vllm_cast.dormancy keeps its prompt rows):
joined, it is judged at the new batch size; still alone, its probe drafts one step late."""

from __future__ import annotations

from collections import Counter, deque

from vllm_cast.throughput import RecentTotals

PROBE_STEPS = 2
"""Drafting steps of a solo request that are probes, and its speculative steps before its
own verdict (measured at greedy B=1, 32 tokens, six tasks side by side: one probe 1.07x,
two 1.14x of vanilla, the EAGLE-3 chain with 4 tokens 1.09x)."""
PROBE_OUTCOMES = 8
"""Recent probed requests per verification mode; probing stops while none of them paid."""
REEXAMINED_PROBES = 2
"""Requests probed when a mode's pooled samples go stale while none of its recent probed
requests paid: as many as the cohorts a bucket re-examines on (vllm_cast.throughput's
``COHORTS_TO_JUDGE``, whose wait prices that many). Probing ``PROBE_OUTCOMES`` afresh, 16 of
24 sampled B=1 requests in a row were probed (two probes up to 6 deep and a prompt pass,
~8 ms of a ~170 ms request each), none of them paying."""
PROBE_DEPTH_HEADROOM = 2
"""Draft nodes a probe drafts beyond the longest run of its mode's recent probes."""
COMPANY_OUTCOMES = 4
"""Recent lone arrivals whose next step is kept (was the request joined by others?)."""
REPROBE_WAIT_STEPS = 1
"""Plain steps a request measured slower decodes before its first re-probe (then 2, 4, ...).
Greedy B=1, 32 tokens, six tasks x 4 prompts x 3 rounds side by side in one process (ratio
of summed times to vanilla's): on the bench pair 1.150x with a first wait of 8, 1.178x with
4, 1.191x with 2 (one run), then 1.199x with 2, 1.238x with 1, 1.160x never judged slower
(the next); in a third run, 1.123x with 8 and 1.178x with 1, the K=2 and K=4 chains 1.175x
and 1.196x. On the ``ci`` pair 1.439x / 1.409x (8 / 1), then 1.352x / 1.437x; sampled (T=1)
on the bench pair 0.967x / 0.985x."""
LONGEST_REPROBE_WAIT = 64
"""Longest wait before a re-probe (each wait is twice the request's previous one)."""


class SoloProbes:
    """Per request decoding alone: probes drafted and speculative (tokens, seconds) steps;
    per verification mode (greedy False, all sampled True): whether recent probed requests
    paid (see module doc)."""

    def __init__(self) -> None:
        self.probes_drafted: Counter[str] = Counter()
        self.steps = RecentTotals()
        self.paid: dict[bool, deque[bool]] = {mode: deque(maxlen=PROBE_OUTCOMES) for mode in (False, True)}
        self.accepted_runs: dict[bool, deque[int]] = {
            mode: deque(maxlen=PROBE_OUTCOMES * PROBE_STEPS) for mode in (False, True)}
        """Per mode: draft tokens the recent probes accepted, one entry per probe."""
        self.request_runs: dict[str, int] = {}
        """Per request: the most draft tokens it had accepted on one of its probes or on a
        step it drafted in a batch (``note_runs``); since its last wait, on its re-probes."""
        self.reprobing: set[str] = set()
        """Requests whose wait ended and whose first re-probe has not been verified yet:
        the next run noted replaces their record."""
        self.joined: deque[bool] = deque(maxlen=COMPANY_OUTCOMES)
        """Per recent lone arrival: whether other requests joined it at its next step."""
        self.steps_until_reprobe: dict[str, int] = {}
        """Per request measured slower and waiting: plain steps left before its re-probe."""
        self.next_wait: dict[str, int] = {}
        """Per request that has waited: its next wait in plain steps."""
        self.drafting_only: dict[str, tuple[int, float]] = {}
        """Per request: tokens and seconds of its steps that drafted but verified nothing
        since its last recorded step."""
        self.plain_rates: dict[str, float] = {}
        """Per probed request: plain decoding's tokens per second at its context, as of its
        latest recorded step (``record``)."""

    def record_arrival(self, joined: bool) -> None:
        """The step after a lone request's prompt step: whether other requests joined it."""
        self.joined.append(joined)

    def expects_company(self) -> bool:
        """Whether a request arriving alone should put its drafting off by a step: each of
        the last ``COMPANY_OUTCOMES`` lone arrivals was joined (see module doc)."""
        return len(self.joined) == COMPANY_OUTCOMES and all(self.joined)

    def wants_probe(self, req_id: str, all_sampled: bool) -> bool:
        """Whether this solo request's next drafting step is a probe."""
        paid = self.paid[all_sampled]
        return self.probes_drafted[req_id] < PROBE_STEPS and (len(paid) < PROBE_OUTCOMES or any(paid))

    def drafted_probe(self, req_id: str) -> None:
        self.probes_drafted[req_id] += 1

    def note_runs(self, req_ids: list[str], accepted: list[int]) -> None:
        """Draft tokens each of ``req_ids`` accepted on one step (``[B]``): on its probes,
        or on a step it drafted in a batch of several. Its later probes go by the longest,
        since its latest re-probes if it was re-probed (see module doc)."""
        runs = self.request_runs
        for req_id, run in zip(req_ids, accepted):
            if req_id in self.reprobing:
                self.reprobing.discard(req_id)
                runs[req_id] = run
            elif run > runs.get(req_id, -1):
                runs[req_id] = run

    def probe_depth(self, req_id: str, all_sampled: bool, deepest: int) -> int:
        """Draft nodes of the request's next probe in this mode, at most ``deepest`` (see
        module doc: a request with runs of its own goes by them)."""
        own_run = self.request_runs.get(req_id)
        runs = self.accepted_runs[all_sampled] if own_run is None else [own_run]
        return deepest if not runs else min(deepest, max(runs) + PROBE_DEPTH_HEADROOM)

    def record(self, req_id: str, all_sampled: bool, tokens: int, seconds: float, plain_rate: float,
               verified: bool = True) -> None:
        """One speculative decode step of a probed request decoding alone (``tokens``
        emitted in ``seconds``); ``plain_rate``: plain decoding's tokens per second at batch
        size 1 and this request's context (see module doc); ``verified``: it verified drafts
        (else it only drafted, as a re-probe's first step does: its tokens and seconds join
        the next step's).
        Its first ``PROBE_STEPS`` steps verify its probes (their accepted runs are kept per
        mode and noted as the request's own, ``note_runs``); the last of them settles
        whether probing it paid."""
        if req_id not in self.probes_drafted or seconds <= 0:
            return
        self.plain_rates[req_id] = plain_rate
        step = self._after_drafting_only(req_id, tokens, seconds)
        self.drafting_only.pop(req_id, None)
        if not verified:
            self.drafting_only[req_id] = step
            return
        self.steps.add(req_id, step)
        if len(self.steps.windows[req_id]) <= PROBE_STEPS:
            self.accepted_runs[all_sampled].append(tokens - 1)
            self.note_runs([req_id], [tokens - 1])
        if len(self.steps.windows[req_id]) == PROBE_STEPS:
            self.paid[all_sampled].append(not self.slower(req_id))

    def slower(self, req_id: str, pending: tuple[int, float] | None = None) -> bool | None:
        """None for a request that was not probed; else whether its speculative steps
        measured fewer tokens per second than plain decoding at its context (``record``'s
        latest ``plain_rate``; False until ``PROBE_STEPS`` of them are measured).
        ``pending``: the step now running, which verified drafts and has emitted these
        tokens in at least these seconds, counted as one of them (a lower bound on its
        seconds: slower with it is slower at its end)."""
        if req_id not in self.probes_drafted:
            return None
        if pending is not None:
            pending = self._after_drafting_only(req_id, *pending)
        rate = self.steps.rate(req_id, min_steps=PROBE_STEPS, pending=pending)
        return rate is not None and rate < self.plain_rates[req_id]

    def _after_drafting_only(self, req_id: str, tokens: int, seconds: float) -> tuple[int, float]:
        """A step's (tokens, seconds) with those of the request's steps since its last
        recorded one that only drafted (``drafting_only``) joined in."""
        earlier_tokens, earlier_seconds = self.drafting_only.get(req_id, (0, 0.0))
        return earlier_tokens + tokens, earlier_seconds + seconds

    def reprobes(self, all_sampled: bool) -> bool:
        """Whether a request of this mode measured slower waits for a re-probe (else it is
        not drafted again): some recent probed request of the mode paid."""
        return any(self.paid[all_sampled])

    def waited_a_step(self, req_id: str) -> None:
        """The request, measured slower, decoded a step without drafting. Its first such
        step starts its wait; the last one ends it, and its next drafting steps are probes
        judged on their own (its earlier steps are forgotten)."""
        left = self.steps_until_reprobe.pop(req_id, None)
        if left is None:
            left = self.next_wait.get(req_id, REPROBE_WAIT_STEPS)
            self.next_wait[req_id] = min(2 * left, LONGEST_REPROBE_WAIT)
        if left > 1:
            self.steps_until_reprobe[req_id] = left - 1
            return
        self.probes_drafted[req_id] = 0
        self.steps.forget(req_id)
        self.reprobing.add(req_id)

    def resume_probing(self, all_sampled: bool) -> None:
        """The pooled samples went stale: forget how deep this mode's recent probes were
        accepted, and whether its oldest ``REEXAMINED_PROBES`` probed requests paid (so that
        many new requests are probed before outcomes of which none paid stop probing again)."""
        paid = self.paid[all_sampled]
        for _ in range(min(REEXAMINED_PROBES, len(paid))):
            paid.popleft()
        self.accepted_runs[all_sampled].clear()

    def retain(self, req_ids: list[str]) -> None:
        """Forget requests not in ``req_ids`` (finished or preempted)."""
        kept = set(req_ids)
        for req_id in set(self.probes_drafted) - kept:
            del self.probes_drafted[req_id]
            self.steps.forget(req_id)
            self.steps_until_reprobe.pop(req_id, None)
            self.next_wait.pop(req_id, None)
            self.drafting_only.pop(req_id, None)
            self.plain_rates.pop(req_id, None)
        self.reprobing &= kept
        if not self.request_runs.keys() <= kept:
            self.request_runs = {req_id: run for req_id, run in self.request_runs.items() if req_id in kept}
