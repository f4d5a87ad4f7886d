# syntax=docker/dockerfile:1
# The operator image: one Python process (kopf), non-root, read-only root file system friendly.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.source="https://github.com/stepcache/stepcache" \
      org.opencontainers.image.description="stepcache: skip Kubernetes pipeline steps whose result is already known"
COPY --from=build /install /usr/local
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 9443 8080 8081
ENTRYPOINT ["stepcache"]
CMD ["run"]
