# Python 3.11 from Debian 12's packages (docker/base-images.sh): a stand-in for python:3.11-slim-bookworm.
ARG DEBIAN_IMAGE=robust-ensembles/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
