"""Empirical privacy audits: what an attacker can actually learn, next to what the accountant certifies.

- ``membership``: membership-inference attacks on the released model (training vs held-out images);
- ``one_run``: the one-run canary estimator (Steinke, Nasr & Jagielski, NeurIPS 2023) that turns an
  attacker's guesses about randomly included canaries into a statistically valid lower bound on ε;
- ``canaries``: which canaries a run includes and samples, from the run's secret, and how they are scored.
"""
