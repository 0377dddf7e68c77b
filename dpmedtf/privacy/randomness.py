"""The per-run secret: the only source of the DP mechanism's randomness.

DP-SGD's guarantee assumes the adversary cannot predict which records a step sampled or which noise it
added. The adversary of DESIGN.md holds the code, the job file, the run records and the bundle, so the
mechanism's randomness may follow from none of them. One ``RunSecret`` of 256 bits is drawn from OS
entropy when a run starts and lives only in the run's checkpoints (so a resumed step redraws exactly
the same batch and noise); everything random about the mechanism is derived from it:

- Poisson sampling: uniforms from ChaCha20 keyed by an HMAC-SHA256 sub-key of the secret, one stream per
  (purpose, step) — a cryptographically secure generator, as Opacus' ``secure_mode`` and JAX Privacy use.
- Noise seeds: each (step, variable) noise stream gets its own 128-bit Philox seed from that generator,
  so every stream depends on the whole key (no 32-bit fold: ``stateless_fold_in`` with a Python int
  keeps only 2³² seeds per variable, and at 180k steps two steps of one variable would repeat noise).
- Secure noise (``privacy.secure_rng``): the Gaussian values themselves from the CSPRNG (see
  ``secure_gaussian``).

A run with ``privacy.noise_seed`` gets a secret derived from that published seed: reproducible, and
for that very reason no DP guarantee — the ledger and certificate say so and the release policy refuses it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SECRET_BYTES = 32
"""256 bits: well beyond the 128 bits an adversary could never enumerate."""
_WORDS = SECRET_BYTES // 8
_UNIT = 2.0 ** -53  # a uniform double is k · 2⁻⁵³ for k uniform in [0, 2⁵³)


@dataclass(frozen=True, repr=False)
class RunSecret:
    """256 secret bits and whether they were derived from a published seed (an experiment, not a release)."""

    key: bytes
    experiment_seed: int | None = None
    """The ``privacy.noise_seed`` this key was derived from; None for a secret drawn from OS entropy."""

    def __post_init__(self):
        if len(self.key) != SECRET_BYTES:
            raise ValueError(f"a run secret has {SECRET_BYTES} bytes, got {len(self.key)}")

    def __repr__(self) -> str:  # never print the key (logs are public)
        return f"RunSecret({'experiment seed' if self.is_experiment else 'secret'})"

    @classmethod
    def fresh(cls) -> "RunSecret":
        return cls(os.urandom(SECRET_BYTES))

    @classmethod
    def from_experiment_seed(cls, seed: int) -> "RunSecret":
        """Every random draw of the mechanism fixed by a public seed: reproducible, never private."""
        digest = hashlib.sha256(b"dpmedtf experiment seed\0" + int(seed).to_bytes(16, "little")).digest()
        return cls(digest, experiment_seed=int(seed))

    @property
    def is_experiment(self) -> bool:
        return self.experiment_seed is not None

    @property
    def is_erased(self) -> bool:
        return self.key == bytes(SECRET_BYTES)

    # Checkpoints hold the key as four int64 words (a tf.Variable); these convert both ways.
    def to_words(self) -> np.ndarray:
        return np.frombuffer(self.key, dtype="<i8").copy()

    @classmethod
    def from_words(cls, words, experiment_seed: int | None = None) -> "RunSecret":
        words = np.asarray(words, dtype="<i8")
        if words.shape != (_WORDS,):
            raise ValueError(f"a run secret is {_WORDS} int64 words, got shape {words.shape}")
        return cls(words.tobytes(), experiment_seed)

    # --- derived streams --------------------------------------------------------------------------
    def _subkey(self, purpose: str) -> bytes:
        return hmac.new(self.key, b"dpmedtf/" + purpose.encode(), hashlib.sha256).digest()

    def random_bytes(self, purpose: str, step: int, count: int) -> bytes:
        """``count`` bytes of the ChaCha20 keystream for (purpose, step): independent streams per pair."""
        if step < 0:
            raise ValueError(f"step must be ≥ 0, got {step}")
        # cryptography's 16-byte ChaCha20 nonce is the 32-bit block counter then a 96-bit nonce; the step
        # goes into the nonce, the counter starts at 0 and can address 256 GiB per stream.
        nonce = (0).to_bytes(4, "little") + int(step).to_bytes(12, "little")
        encryptor = Cipher(algorithms.ChaCha20(self._subkey(purpose), nonce), mode=None).encryptor()
        return encryptor.update(bytes(count))

    def uniforms(self, purpose: str, step: int, count: int) -> np.ndarray:
        """``count`` independent uniforms on the grid {k·2⁻⁵³: 0 ≤ k < 2⁵³} ⊂ [0, 1), float64.

        ``uniforms(...) < q`` is a Bernoulli draw with probability ⌈q·2⁵³⌉/2⁵³, above q by < 1.2e-16:
        far below anything an accountant resolves."""
        words = np.frombuffer(self.random_bytes(purpose, step, 8 * count), dtype="<u8")
        return (words >> np.uint64(11)).astype(np.float64) * _UNIT

    def noise_seeds(self, step: int, streams: int) -> np.ndarray:
        """(streams, 2) int64: a 128-bit Philox seed per noise stream (one stream per variable) of ``step``."""
        return np.frombuffer(self.random_bytes("noise-seeds", step, 16 * streams), dtype="<i8").reshape(streams, 2).copy()

    def secure_gaussian(self, purpose: str, step: int, sizes: list[int], stddev: float) -> list[np.ndarray]:
        """Gaussian noise entirely from the CSPRNG, float32, one flat array per requested size.

        Floating-point Gaussian samplers leave gaps and biases in the low bits that can reveal the value
        noise was added to (Mironov 2012; Jin et al. 2022). Each value here is the sum of four
        independent N(0, 1) draws (Box–Muller in float64 on 53-bit uniforms) divided by 2, the defence
        Opacus' secure mode uses after Holohan & Braghin (2021): the sum smooths the sampler's gaps.
        """
        total = int(sum(sizes))
        u = self.uniforms(purpose, step, 8 * total).reshape(4, 2, total)
        radius = np.sqrt(-2.0 * np.log1p(-u[:, 0]))  # 1 − u ∈ (0, 1]: log is finite
        normals = radius * np.cos(2.0 * np.pi * u[:, 1])
        values = (normals.sum(axis=0) / 2.0 * stddev).astype(np.float32)
        return np.split(values, np.cumsum(sizes)[:-1])


def noise_stddev_float32(noise_multiplier: float, clip_norm: float) -> float:
    """σ·C rounded *up* to the next float32: the graph adds float32 noise, and rounding to nearest could
    add a hair less than the accountant was told. Returned as the exact float32 value (a Python float)."""
    exact = float(noise_multiplier) * float(clip_norm)
    value = np.float32(exact)
    if float(value) < exact:
        value = np.nextafter(value, np.float32(np.inf))
    return float(value)


def effective_noise_multiplier(noise_multiplier: float, clip_norm: float) -> float:
    """The σ the graph actually applies: float32 σ·C divided by the sensitivity C (≥ the requested σ).
    The plan, the ledger and the certificate carry this value, so ε is accounted on what ran."""
    return noise_stddev_float32(noise_multiplier, clip_norm) / float(clip_norm)
