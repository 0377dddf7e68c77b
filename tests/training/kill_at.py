"""``dpmedtf train`` that SIGKILLs itself at one chosen point of its writes (for the interrupted-run tests).

    python -m tests.training.kill_at POINT JOB OUT

POINT is where the process dies, with the file system as a real kill there leaves it:
- ``model-save``: the final model file half written;
- ``secret-erased``: after the last checkpoint erased the run's secret, before the model took its name;
- ``checkpoint-write``: inside the second checkpoint's write, its state files half written;
- ``after-first-checkpoint``: right after the first checkpoint (a worker of a cluster lost mid-training).
The process kills itself (a real SIGKILL, no clean-up runs) rather than being killed from outside, so
the point is exact however fast or slow the machine is.
"""

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _halve(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _install(point: str) -> None:
    import tensorflow as tf

    from dpmedtf.training import checkpoints

    if point == "model-save":
        save = tf.keras.Model.save

        def save_then_die(self, filepath, *args, **kwargs):
            save(self, filepath, *args, **kwargs)
            if str(filepath).endswith(".keras"):
                _halve(str(filepath))
                _die()

        tf.keras.Model.save = save_then_die
    elif point == "secret-erased":
        erase = checkpoints.erase_secret

        def erase_then_die(*args, **kwargs):
            erase(*args, **kwargs)
            _die()

        checkpoints.erase_secret = erase_then_die
    elif point == "checkpoint-write":
        write, calls = tf.train.Checkpoint.write, []

        def write_then_die(self, file_prefix, *args, **kwargs):
            result = write(self, file_prefix, *args, **kwargs)
            calls.append(file_prefix)
            if len(calls) == 2:
                directory = os.path.dirname(str(file_prefix))
                for name in os.listdir(directory):
                    if name.startswith("state"):
                        _halve(os.path.join(directory, name))
                _die()
            return result

        tf.train.Checkpoint.write = write_then_die
    elif point == "after-first-checkpoint":  # e.g. one worker of a cluster, lost mid-training
        from dpmedtf.training import callbacks

        save = callbacks.save_checkpoint

        def save_then_die(*args, **kwargs):
            save(*args, **kwargs)
            _die()

        callbacks.save_checkpoint = save_then_die
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    point, job, out = sys.argv[1:4]
    _install(point)
    from dpmedtf.cli import main

    main(["train", job, "--out", out])
