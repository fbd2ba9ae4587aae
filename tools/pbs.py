"""How stale a follower read can be: the prediction of "Probabilistically Bounded Staleness"
(Bailis et al., VLDB 2012) for this store's delay model. Pure arithmetic, tested on its own.

Each of `n` followers applies a write after its own delay D_i, uniform on [MIN, MAX] and
independent. The leader acknowledges at quorum W when the W-th fastest has confirmed, at
D_(W). A read sent to a random follower t ms after the acknowledgement sees the write iff
that follower's delay is at most D_(W) + t. The W fastest always have it (probability
W/n); each of the other n - W has a delay uniform on [D_(W), MAX] given that it is slower,
so it has the write with probability min(1, t / (MAX - D_(W))). Hence

    P(fresh | t) = W/n + (n - W)/n * E[ min(1, t / (MAX - D_(W))) ]

with (D_(W) - MIN) / (MAX - MIN) distributed Beta(W, n - W + 1): the expectation is
integrated numerically. Processing and network time beyond the simulated delay are left out;
they make real reads a little fresher than predicted at t = 0 (the acknowledgement itself
takes a moment to reach the client, while slower followers keep applying).
"""

from __future__ import annotations

from math import exp, lgamma, log

STEPS = 4_000


def beta_density(x: float, a: int, b: int) -> float:
    if not 0 < x < 1:
        return 0.0
    log_norm = lgamma(a + b) - lgamma(a) - lgamma(b)
    return exp(log_norm + (a - 1) * log(x) + (b - 1) * log(1 - x))


def p_fresh(t_ms: float, quorum: int, followers: int, min_ms: float, max_ms: float) -> float:
    """The probability that a read from a random follower, t_ms after a write was acknowledged
    at `quorum`, returns that write."""
    if not 1 <= quorum <= followers:
        raise ValueError("quorum must be between 1 and the number of followers")
    if t_ms < 0:
        raise ValueError("t_ms must not be negative")
    n, w = followers, quorum
    if w == n or max_ms <= min_ms:
        return 1.0
    spread = max_ms - min_ms
    total = 0.0
    for i in range(STEPS):
        b = (i + 0.5) / STEPS  # midpoint rule over the Beta(W, n - W + 1) density
        remaining = spread * (1 - b)  # MAX - D_(W)
        fraction = 1.0 if remaining <= t_ms else t_ms / remaining
        total += fraction * beta_density(b, w, n - w + 1)
    return w / n + (n - w) / n * total / STEPS
