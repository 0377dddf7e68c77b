# Two images from one file:
#   docker build --target consumer -t dpmedtf:consumer .   verify, load and predict (`pip install dpmedtf`, no TensorFlow)
#   docker build -t dpmedtf .                              training, evaluation and release on TensorFlow's GPU image
# The training image is the last stage, so a plain `docker build .` builds it as before.

# --- consumer: what a hospital runs next to its PACS -----------------------------------------------------
FROM python:3.11-slim AS consumer

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/dpmedtf
# release/ (schemas, policy) and pipelines/ ship inside the package as dpmedtf.release_files / pipeline_files.
COPY pyproject.toml constraints.txt README.md ./
COPY dpmedtf ./dpmedtf
COPY release ./release
COPY pipelines ./pipelines

# The same lock as every other install; the build fails if the plain install pulled in TensorFlow.
RUN set -eux; \
    python -m pip install -c constraints.txt .; \
    dpmedtf --version; \
    if python -c "import tensorflow" 2>/dev/null; then echo "the consumer image must not contain TensorFlow" >&2; exit 1; fi

RUN useradd --create-home --uid 10001 dpmedtf && mkdir -p /work && chown dpmedtf /work
USER dpmedtf
WORKDIR /work
ENTRYPOINT ["dpmedtf"]
CMD ["--help"]

# --- training: dpmedtf[train] on TensorFlow's GPU image ---------------------------------------------------
# The image's own TensorFlow (built against its CUDA) is kept: every other package comes from the same
# lock as `make test`, and pip is forbidden to touch TF.
FROM tensorflow/tensorflow:2.15.0-gpu AS train

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /opt/dpmedtf
COPY pyproject.toml constraints.txt README.md ./
COPY dpmedtf ./dpmedtf
COPY release ./release
COPY pipelines ./pipelines

# The lock pins tensorflow 2.15.1 for CPU installs; here the constraint becomes whatever TF the
# base image has, so the resolver can only keep it. The final check fails the build if TF changed.
RUN set -eux; \
    tf_before="$(python3 -c 'import tensorflow as tf; print(tf.__version__)')"; \
    grep -v -i -E '^tensorflow==' constraints.txt > /tmp/constraints.txt; \
    echo "tensorflow==${tf_before}" >> /tmp/constraints.txt; \
    python3 -m pip install -c /tmp/constraints.txt ".[train]"; \
    tf_after="$(python3 -c 'import tensorflow as tf; print(tf.__version__)')"; \
    test "${tf_before}" = "${tf_after}"; \
    dpmedtf --version; \
    rm /tmp/constraints.txt

RUN useradd --create-home --uid 10001 dpmedtf && mkdir -p /work && chown dpmedtf /work
USER dpmedtf
WORKDIR /work
ENTRYPOINT ["dpmedtf"]
CMD ["--help"]
