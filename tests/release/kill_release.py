"""``dpmedtf release`` that SIGKILLs itself at one point of publishing (for the interrupted-release tests).

    python -m tests.release.kill_release POINT JOB RUN OUT

- ``signed``: the bundle assembled, signed and verified in its workspace, not yet renamed into place;
- ``renamed``: the bundle renamed into place, its signature not yet moved in.
The process kills itself (a real SIGKILL: no clean-up runs), so the point is exact on any machine.
"""

import sys

from tests.training.kill_at import _die


if __name__ == "__main__":
    point, job, run, out = sys.argv[1:5]
    from dpmedtf.release import bundle

    if point == "signed":
        verify = bundle.verify_bundle

        def verify_then_die(*args, **kwargs):
            verify(*args, **kwargs)
            _die()

        bundle.verify_bundle = verify_then_die
    elif point == "renamed":
        bundle._move_signature_in = lambda *args, **kwargs: _die()
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    from dpmedtf.cli import main

    main(["release", job, "--run", run, "--out", out, "--override-policy", "test model on synthetic data"])
